//! Every integration test of clb in one test binary: each file below was a binary of its own,
//! and each of them linked the whole harness and its dependencies again (about a minute of
//! the suite's build on two cores). Test names keep their file as a prefix
//! (`e2e_l7::cookie_persistence_…`), so `cargo xtask test e2e_l7` still selects one file.
//! The runner uses one thread: the tests share kernel state (namespaces, bpffs, XDP).

mod bench_smoke;
mod e2e_console;
mod e2e_control;
mod e2e_deploy;
mod e2e_dsr;
mod e2e_fleet;
mod e2e_flood;
mod e2e_health;
mod e2e_hostile;
mod e2e_https;
mod e2e_ipv6;
mod e2e_l4;
mod e2e_l7;
mod e2e_lc;
mod e2e_maglev;
mod e2e_owner;
mod e2e_tables;
mod e2e_upgrade;
mod fuzz_smoke;
mod packet_fixtures;
mod packet_fixtures6;
