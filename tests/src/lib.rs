//! clb's test harness: network namespaces and topologies ([`netns`]), hand-built frames
//! ([`packet`], [`packet6`]), the XDP program under `BPF_PROG_TEST_RUN` ([`lab`]), name-answering backends
//! and clients ([`servers`]), the daemon and CLI as processes ([`daemon`]).

pub mod bench;
pub mod browser;
pub mod cgroup;
pub mod daemon;
pub mod deploy;
pub mod fleet;
pub mod flood;
pub mod fuzz;
pub mod http;
pub mod http_fuzz;
pub mod lab;
pub mod netns;
pub mod packet;
pub mod packet6;
pub mod pki;
pub mod releases;
pub mod servers;

use std::time::{Duration, Instant};

/// The test traffic generator and sink (`tests/gen`), built by `build.rs`.
pub static GEN_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/clb-gen"));

/// Polls `f` every 50 ms until it returns `Some`, for at most `timeout`.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
