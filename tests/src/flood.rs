//! Floods for tests and benchmarks: the test generator (`tests/gen`, an XDP program run with
//! live frames) sending spoofed SYNs or UDP datagrams from a range of distinct sources out of
//! a namespace's interface, at a bounded rate for a bounded count.

use std::time::{Duration, Instant};

use aya::{
    Ebpf, EbpfLoader,
    maps::Array,
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp},
};
use clb_gen::{GEN_CONFIG_MAP, GEN_PROGRAM, GEN_SEQ_MAP, GenConfig};

use crate::netns::NetNs;

/// A flood generator loaded in a namespace.
pub struct Flood {
    ebpf: Ebpf,
    frame_len: usize,
}

/// What to send.
#[derive(Clone, Copy, Debug)]
pub struct FloodSpec {
    /// Destination MAC (the balancer's interface) and source MAC.
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// Sources `src_base + n % sources` (host-order address).
    pub src_base: std::net::Ipv4Addr,
    pub sources: u32,
    pub dst: std::net::SocketAddrV4,
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
    /// TCP flags (0: SYN).
    pub tcp_flags: u8,
    /// Interface index to send out of (in the generator's namespace).
    pub ifindex: u32,
}

impl Flood {
    /// Loads the generator in `ns`.
    pub fn new(ns: &NetNs, spec: FloodSpec) -> anyhow::Result<Self> {
        let frame_len = 64usize;
        ns.run(|| {
            let mut ebpf = EbpfLoader::new().load(crate::GEN_OBJECT)?;
            let prog: &mut Xdp = ebpf
                .program_mut(GEN_PROGRAM)
                .ok_or_else(|| anyhow::anyhow!("no generator program"))?
                .try_into()?;
            prog.load()?;
            let cfg = GenConfig {
                dst_mac: spec.dst_mac,
                src_mac: spec.src_mac,
                src_base: u32::from(spec.src_base),
                sources: spec.sources,
                dst: clb_common::ip_to_be(spec.dst.ip().octets()),
                dport: clb_common::port_to_be(spec.dst.port()),
                sport_base: 1024,
                ports: 60_000,
                ifindex: spec.ifindex,
                proto: spec.proto,
                tcp_flags: spec.tcp_flags,
                _pad: [0; 2],
                frame_len: frame_len as u32,
            };
            let mut m: Array<_, GenConfig> = Array::try_from(
                ebpf.map_mut(GEN_CONFIG_MAP)
                    .ok_or_else(|| anyhow::anyhow!("no config map"))?,
            )?;
            m.set(0, &cfg, 0)?;
            Ok(Self { ebpf, frame_len })
        })
    }

    /// Sends `n` frames as one live-frames test run (on the calling thread, which must be in
    /// the generator's namespace).
    fn burst(&self, n: u32) -> anyhow::Result<()> {
        let prog: &Xdp = self
            .ebpf
            .program(GEN_PROGRAM)
            .ok_or_else(|| anyhow::anyhow!("no generator program"))?
            .try_into()?;
        let frame = vec![0u8; self.frame_len];
        prog.test_run(TestRunOptions {
            data_in: Some(&frame),
            repeat: n,
            attrs: TestRunAttrs::new().xdp_live_frames(64),
            ..Default::default()
        })?;
        Ok(())
    }

    /// Sends `total` frames at about `pps` from `ns` (bursts of 1/100 s, paced), for at most
    /// `max` wall time. Returns the frames sent.
    pub fn send(&self, ns: &NetNs, total: u64, pps: u64, max: Duration) -> anyhow::Result<u64> {
        // Bursts of 1/100 s, at most 64 k frames (one test run each), so `max` holds.
        let burst = (pps / 100).clamp(1, 1 << 16);
        ns.run(|| {
            let start = Instant::now();
            let mut sent = 0u64;
            while sent < total && start.elapsed() < max {
                let n = burst.min(total - sent) as u32;
                self.burst(n)?;
                sent += u64::from(n);
                let due = Duration::from_secs_f64(sent as f64 / pps as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait.min(Duration::from_millis(50)));
                }
            }
            Ok(sent)
        })
    }

    /// Frames the generator has written so far.
    pub fn sequence(&self) -> anyhow::Result<u64> {
        let m: Array<_, u64> = Array::try_from(
            self.ebpf
                .map(GEN_SEQ_MAP)
                .ok_or_else(|| anyhow::anyhow!("no sequence map"))?,
        )?;
        Ok(m.get(&0, 0)?)
    }
}
