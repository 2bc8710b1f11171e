//! Types shared by the traffic generator and drop sink (`main.rs`, XDP, built for BPF) and the
//! tests and benchmarks that configure and read them (host). Not part of the balancer.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Map of the generator's settings (one [`GenConfig`]).
pub const GEN_CONFIG_MAP: &str = "GEN_CFG";
/// Map of the generator's sequence number.
pub const GEN_SEQ_MAP: &str = "GEN_SEQ";
/// Per-CPU packet counter of the sink.
pub const SINK_COUNT_MAP: &str = "SINK_COUNT";
/// Sources the sink has seen: a per-CPU bitmap indexed by the low 16 bits of the source
/// address (the generator's sources are consecutive, so up to 65 536 are told apart).
pub const SINK_SEEN_MAP: &str = "SINK_BITS";
/// Words of [`SINK_SEEN_MAP`] (65 536 bits).
pub const SINK_SEEN_WORDS: u32 = 1024;
/// Name of the generator program.
pub const GEN_PROGRAM: &str = "clb_gen";
/// Name of the sink program.
pub const SINK_PROGRAM: &str = "clb_sink";

/// IP protocol numbers the generator writes.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// What the generator writes into every frame: Ethernet/IPv4/UDP (no checksum) or TCP with
/// `tcp_flags` (valid checksum, no payload), source `src_base + n % sources`, source port
/// `sport_base + (n / sources) % ports`, for the n-th frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct GenConfig {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// First source address, host byte order.
    pub src_base: u32,
    /// Distinct source addresses.
    pub sources: u32,
    /// Destination address, network byte order.
    pub dst: u32,
    /// Destination port, network byte order.
    pub dport: u16,
    /// First source port, host byte order.
    pub sport_base: u16,
    /// Distinct source ports per address.
    pub ports: u32,
    /// Interface to redirect the frames out of.
    pub ifindex: u32,
    /// [`PROTO_UDP`] or [`PROTO_TCP`].
    pub proto: u8,
    /// TCP flags (0 = SYN).
    pub tcp_flags: u8,
    pub _pad: [u8; 2],
    /// Frame length in bytes (the test run's input frame has this length).
    pub frame_len: u32,
}
const _: () = assert!(core::mem::size_of::<GenConfig>() == 44);

#[cfg(not(target_arch = "bpf"))]
// SAFETY: `#[repr(C)]`, `bytemuck::Pod`: no padding, any bit pattern valid.
unsafe impl aya::Pod for GenConfig {}
