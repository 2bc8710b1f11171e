//! clb user space: the control plane (model, balancer, sweeper), the aya loader, the daemon
//! with its API, the CLI, health checks, metrics and the L7 HTTP listener.

pub mod api;
pub mod balancer;
pub mod batch;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod health;
pub mod l7;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod sched;
pub mod time;

/// The compiled XDP object (`clb-ebpf`), embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/clb"));

/// Benchmark-only XDP object: the live-frames traffic generator (`clb_gen`) and the counting
/// drop sink (`clb_sink`) of `cargo xtask bench`. Never loaded by the daemon.
pub static GEN_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/clb-gen"));
