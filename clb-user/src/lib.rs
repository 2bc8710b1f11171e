//! clb user space. The tree is the architecture; dependencies point one way:
//!
//! ```text
//! main ─ daemon (wiring; imported by nothing)
//!          │
//!   api  cli  health  metrics  l7  bgp  supervise      the edges
//!          │
//!       control      the owner: model, config file, transactions, snapshots
//!          │
//!       balancer     ids, projection to clb-common layouts, ordered diff + rollback
//!          │
//!   sched  certs  datapath   schedules; TLS certificates (loaded, checked); aya maps
//!                            (writer, reader), loader, locks, sweeper, batches
//!          │
//!      clb-common    the types kernel and user space agree on
//! ```

pub mod api;
pub mod balancer;
pub mod bgp;
pub mod certs;
pub mod cli;
pub mod console;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod health;
pub mod l7;
pub mod metrics;
pub mod sched;
pub mod supervise;
pub mod time;

/// The compiled XDP object (`clb-ebpf`), embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/clb"));

/// The version and the commit the binary was built from.
pub const fn version() -> &'static str {
    concat!(env!("CARGO_PKG_VERSION"), " (", env!("CLB_COMMIT"), ")")
}
