//! The one place where the clb XDP program and clb user space agree on types.
//!
//! Every type here is `#[repr(C)]`, derives [`bytemuck::Pod`] (so hidden padding is a compile
//! error: padding is spelled out as `_pad` fields) and has a size assertion. Addresses and ports
//! are kept in **network byte order** exactly as they sit in the packet (the field comments say
//! so), so the datapath never swaps bytes; user space converts with [`ip_to_be`]/[`port_to_be`].
//! Map values hold integers only — no `bool`, no enums; user space turns them into enums with
//! `TryFrom`.
//!
//! Map names carry a layout version (`_V1`): a pinned map whose layout changes gets a new name,
//! so a daemon never misreads an older daemon's pins.
#![no_std]

use bytemuck::{Pod, Zeroable};

// ---------------------------------------------------------------------------------------------
// Capacities. User space rejects configuration that would overflow them with a clear error.
// ---------------------------------------------------------------------------------------------

/// Listeners (VIP, port, protocol) the data plane can hold.
pub const MAX_LISTENERS: u32 = 1024;
/// Backends, over all listeners.
pub const MAX_BACKENDS: u32 = 65536;
/// Tracked connections (LRU: under pressure the least recently used entry is evicted).
pub const MAX_CONNS: u32 = 1 << 20;
/// Persisted clients (LRU), over all listeners.
pub const MAX_SESSIONS: u32 = 1 << 20;
/// Slots of one listener's weighted round-robin schedule (one of two halves, see [`SCHED_MAP`]).
pub const SCHED_SLOTS: u32 = 1024;
/// A backend with weight > 0 needs at least one schedule slot.
pub const MAX_BACKENDS_PER_LISTENER: u32 = SCHED_SLOTS;
/// Interfaces the program can redirect to.
pub const MAX_DEVICES: u32 = 256;
/// Listeners one backend address (IP, port, protocol) may serve at once; see [`BackendAddrInfo`].
pub const MAX_LISTENERS_PER_BACKEND_ADDR: usize = 4;
/// Number of per-CPU global counters, see [`counter`].
pub const NUM_COUNTERS: u32 = 32;

/// Largest accepted persistence duration, seconds.
pub const MAX_PERSIST_SECS: u32 = 3600;
/// Idle timeout range, seconds.
pub const MIN_IDLE_TIMEOUT_SECS: u32 = 1;
/// Idle timeout range, seconds.
pub const MAX_IDLE_TIMEOUT_SECS: u32 = 3600;
/// Default connection idle timeout for TCP, seconds.
pub const DEFAULT_TCP_IDLE_TIMEOUT_SECS: u32 = 900;
/// Default connection idle timeout for UDP, seconds.
pub const DEFAULT_UDP_IDLE_TIMEOUT_SECS: u32 = 300;
/// Largest backend weight.
pub const MAX_WEIGHT: u32 = 100;
/// Default backend weight.
pub const DEFAULT_WEIGHT: u32 = 10;
/// After a FIN is seen a connection entry lives at most this long (IPVS `tcpfin`), seconds.
pub const FIN_TIMEOUT_SECS: u32 = 120;
/// After an RST is seen a connection entry lives at most this long (IPVS `close`), seconds.
pub const RST_TIMEOUT_SECS: u32 = 10;

/// The datapath writes a `last_seen` timestamp at most once per this interval per entry, so a
/// busy flow does not write shared memory on every packet. Expiry adds the same slack, so an
/// entry is never expired early: it lives between `timeout` and `timeout + REFRESH_NS` after
/// the last packet.
pub const REFRESH_NS: u64 = 250_000_000;

/// Nanoseconds per second.
pub const NS_PER_SEC: u64 = 1_000_000_000;

/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

// ---------------------------------------------------------------------------------------------
// Map names (ELF symbol names of the maps in clb-ebpf, also their pin file names).
// ---------------------------------------------------------------------------------------------

/// (VIP, port, proto) → listener id; (VIP, 0, 0) marks an address as a VIP.
pub const LISTENER_ADDR_MAP: &str = "CLB_LSN_ADDR_V1";
/// listener id → [`ListenerInfo`].
pub const LISTENER_MAP: &str = "CLB_LSN_V1";
/// backend id → [`BackendInfo`].
pub const BACKEND_MAP: &str = "CLB_BE_V1";
/// (backend IP, port, proto) → [`BackendAddrInfo`]: which listeners a reply may belong to.
pub const BACKEND_ADDR_MAP: &str = "CLB_BE_ADDR_V1";
/// [`ConnKey`] → [`ConnValue`], the connection table (LRU).
pub const CONN_MAP: &str = "CLB_CONN_V1";
/// [`SessionKey`] → [`SessionValue`], the persistence table (LRU).
pub const SESSION_MAP: &str = "CLB_SESS_V1";
/// `listener id * 2 * SCHED_SLOTS + half * SCHED_SLOTS + slot` → backend id.
pub const SCHED_MAP: &str = "CLB_SCHED_V1";
/// listener id → round-robin cursor (atomically incremented by every CPU).
pub const CURSOR_MAP: &str = "CLB_RR_V1";
/// ifindex → ifindex, the devmap that redirects go through.
pub const DEVICE_MAP: &str = "CLB_DEVS_V1";
/// Per-CPU [`TrafficCounters`] per listener id.
pub const LISTENER_STATS_MAP: &str = "CLB_LSN_STAT_V1";
/// Per-CPU [`TrafficCounters`] per backend id.
pub const BACKEND_STATS_MAP: &str = "CLB_BE_STAT_V1";
/// Per-CPU `u64` counters indexed by [`counter`].
pub const COUNTER_MAP: &str = "CLB_COUNT_V1";
/// Per-CPU next-hop cache ([`NextHop`] per slot).
pub const NEXTHOP_MAP: &str = "CLB_NH_V1";

/// Every map of the program, for pinning and teardown.
pub const ALL_MAPS: [&str; 13] = [
    LISTENER_ADDR_MAP,
    LISTENER_MAP,
    BACKEND_MAP,
    BACKEND_ADDR_MAP,
    CONN_MAP,
    SESSION_MAP,
    SCHED_MAP,
    CURSOR_MAP,
    DEVICE_MAP,
    LISTENER_STATS_MAP,
    BACKEND_STATS_MAP,
    COUNTER_MAP,
    NEXTHOP_MAP,
];

/// Name of the load-balancing XDP program.
pub const XDP_PROGRAM: &str = "clb_xdp";
/// Name of the XDP program that only passes packets (for veth peers, and as a benchmark floor).
pub const PASS_PROGRAM: &str = "clb_pass";

// ---------------------------------------------------------------------------------------------
// Byte-order helpers (the datapath keeps addresses and ports as they are on the wire).
// ---------------------------------------------------------------------------------------------

/// The in-memory `u32` that holds `ip` in network byte order.
#[inline(always)]
pub const fn ip_to_be(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// The address octets of a network-byte-order `u32`.
#[inline(always)]
pub const fn ip_from_be(v: u32) -> [u8; 4] {
    v.to_ne_bytes()
}

/// The in-memory `u16` that holds `port` in network byte order.
#[inline(always)]
pub const fn port_to_be(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

/// The host-order port of a network-byte-order `u16`.
#[inline(always)]
pub const fn port_from_be(v: u16) -> u16 {
    u16::from_be_bytes(v.to_ne_bytes())
}

// ---------------------------------------------------------------------------------------------
// Listener maps
// ---------------------------------------------------------------------------------------------

/// Key of [`LISTENER_ADDR_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ListenerKey {
    /// VIP, network byte order.
    pub vip: u32,
    /// Port, network byte order; 0 with `proto` 0 marks "this address is a VIP".
    pub port: u16,
    /// IP protocol number ([`PROTO_TCP`], [`PROTO_UDP`]), 0 for the VIP marker.
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ListenerKey>() == 8);

/// Value of [`LISTENER_ADDR_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ListenerRef {
    /// Index into [`LISTENER_MAP`]; unused for the VIP marker.
    pub id: u32,
}
const _: () = assert!(core::mem::size_of::<ListenerRef>() == 4);

/// Listener flag: the listener is configured and forwards.
pub const LISTENER_F_ACTIVE: u32 = 1;

/// Value of [`LISTENER_MAP`] (an array indexed by listener id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ListenerInfo {
    /// Persistence duration, ns; 0 = persistence off.
    pub persist_ns: u64,
    /// Connection idle timeout, ns.
    pub idle_timeout_ns: u64,
    /// VIP, network byte order (the reply path rewrites the source back to it).
    pub vip: u32,
    /// Port, network byte order.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    pub _pad: u8,
    /// `LISTENER_F_*` bits.
    pub flags: u32,
    /// Active schedule: `half << 16 | len`, one word so a reader never sees a half of one
    /// schedule with the length of the other. `len` 0 = no backend accepts new connections.
    pub sched: u32,
}
const _: () = assert!(core::mem::size_of::<ListenerInfo>() == 32);

impl ListenerInfo {
    /// Packs a schedule half (0 or 1) and length into [`ListenerInfo::sched`].
    #[inline(always)]
    pub const fn pack_sched(half: u32, len: u32) -> u32 {
        (half << 16) | (len & 0xffff)
    }
    /// Length of the active schedule.
    #[inline(always)]
    pub const fn sched_len(&self) -> u32 {
        self.sched & 0xffff
    }
    /// Active half (0 or 1) of the schedule.
    #[inline(always)]
    pub const fn sched_half(&self) -> u32 {
        (self.sched >> 16) & 1
    }
}

// ---------------------------------------------------------------------------------------------
// Backend maps
// ---------------------------------------------------------------------------------------------

/// Backend flag: the slot holds a configured backend (established flows may use it).
pub const BACKEND_F_PRESENT: u32 = 1;
/// Backend flag: new connections and new persisted clients may go to it
/// (weight > 0, healthy or every backend of the listener unhealthy, not draining).
pub const BACKEND_F_ACCEPTING: u32 = 2;

/// Value of [`BACKEND_MAP`] (an array indexed by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BackendInfo {
    /// Backend IPv4, network byte order.
    pub addr: u32,
    /// Backend port, network byte order.
    pub port: u16,
    /// Owning listener id.
    pub listener: u16,
    /// `BACKEND_F_*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<BackendInfo>() == 12);

/// Key of [`BACKEND_ADDR_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct BackendAddrKey {
    /// Backend IPv4, network byte order.
    pub addr: u32,
    /// Backend port, network byte order.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<BackendAddrKey>() == 8);

/// Unused slot of [`BackendAddrInfo::listeners`].
pub const NO_LISTENER: u16 = u16::MAX;

/// Value of [`BACKEND_ADDR_MAP`]: the listeners a reply from this backend address may belong
/// to. The reply path looks the connection up under each of them in turn.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BackendAddrInfo {
    /// Listener ids, [`NO_LISTENER`] where unused.
    pub listeners: [u16; MAX_LISTENERS_PER_BACKEND_ADDR],
}
const _: () = assert!(core::mem::size_of::<BackendAddrInfo>() == 8);

impl Default for BackendAddrInfo {
    fn default() -> Self {
        Self {
            listeners: [NO_LISTENER; MAX_LISTENERS_PER_BACKEND_ADDR],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connection and persistence tables
// ---------------------------------------------------------------------------------------------

/// Key of [`CONN_MAP`]. The client side of a flow plus the listener identify it from both
/// directions: client → VIP packets give (client, listener by VIP), backend → client replies
/// give (client, listener by backend address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ConnKey {
    /// Client IPv4, network byte order.
    pub client: u32,
    /// Client port, network byte order.
    pub client_port: u16,
    /// Listener id.
    pub listener: u16,
    /// IP protocol number.
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<ConnKey>() == 12);

/// Connection state: open (SYN seen or established; any UDP flow).
pub const CONN_OPEN: u8 = 1;
/// Connection state: a FIN was seen; the entry lives at most [`FIN_TIMEOUT_SECS`].
pub const CONN_FIN: u8 = 2;
/// Connection state: an RST was seen; the entry lives at most [`RST_TIMEOUT_SECS`].
pub const CONN_RST: u8 = 3;

/// Value of [`CONN_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ConnValue {
    /// Last packet seen (either direction), `CLOCK_MONOTONIC` ns, refreshed at most every
    /// [`REFRESH_NS`].
    pub last_seen_ns: u64,
    /// Backend id.
    pub backend: u32,
    /// `CONN_*` state.
    pub state: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<ConnValue>() == 16);

/// Key of [`SESSION_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SessionKey {
    /// Client IPv4, network byte order.
    pub client: u32,
    /// Listener id.
    pub listener: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SessionKey>() == 8);

/// Value of [`SESSION_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SessionValue {
    /// Last client packet of a flow this entry governs, `CLOCK_MONOTONIC` ns.
    pub last_seen_ns: u64,
    /// Backend id.
    pub backend: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SessionValue>() == 16);

/// Whether an entry last seen at `last_seen_ns` is expired at `now_ns` under `timeout_ns`.
/// Shared by the datapath (on lookup) and the user-space sweeper, so both agree; adds
/// [`REFRESH_NS`] of slack because `last_seen` is only refreshed that often.
#[inline(always)]
pub const fn is_expired(now_ns: u64, last_seen_ns: u64, timeout_ns: u64) -> bool {
    now_ns > last_seen_ns && now_ns - last_seen_ns > timeout_ns + REFRESH_NS
}

/// The timeout that applies to a connection entry in `state` on a listener with `idle_ns`.
#[inline(always)]
pub const fn conn_timeout_ns(state: u8, idle_ns: u64) -> u64 {
    let cap = match state {
        CONN_FIN => FIN_TIMEOUT_SECS as u64 * NS_PER_SEC,
        CONN_RST => RST_TIMEOUT_SECS as u64 * NS_PER_SEC,
        _ => return idle_ns,
    };
    if cap < idle_ns { cap } else { idle_ns }
}

// ---------------------------------------------------------------------------------------------
// Next-hop cache (datapath-internal)
// ---------------------------------------------------------------------------------------------

/// Slots of the per-CPU next-hop cache (a power of two; direct-mapped by destination).
pub const NH_SLOTS: u32 = 4096;
/// How long a cached next hop is used before the FIB is asked again: route and neighbour
/// changes reach the datapath within this time.
pub const NH_TTL_NS: u64 = NS_PER_SEC;

/// A cached `bpf_fib_lookup` result for one destination (per CPU, in [`NEXTHOP_MAP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NextHop {
    /// Destination IPv4, network byte order; 0 = empty slot.
    pub dst: u32,
    /// Egress ifindex.
    pub ifindex: u32,
    /// `CLOCK_MONOTONIC` ns after which the entry is not used.
    pub expires_ns: u64,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub _pad: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<NextHop>() == 32);

/// The slot of `dst` (network byte order) in the next-hop cache.
#[inline(always)]
pub const fn nh_slot(dst: u32) -> u32 {
    (dst.wrapping_mul(0x9e37_79b1) >> 20) & (NH_SLOTS - 1)
}

// ---------------------------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------------------------

/// Per-CPU traffic counters per listener and per backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct TrafficCounters {
    /// Client → backend packets.
    pub fwd_packets: u64,
    /// Client → backend bytes (IP length).
    pub fwd_bytes: u64,
    /// Backend → client (reply) packets.
    pub rev_packets: u64,
    /// Backend → client (reply) bytes.
    pub rev_bytes: u64,
    /// New connection entries created.
    pub new_conns: u64,
    /// New connections decided by a live persistence entry.
    pub session_hits: u64,
    /// Persistence entries written (new or rescheduled client).
    pub session_new: u64,
    /// TCP RSTs sent for packets of unknown connections.
    pub resets: u64,
}
const _: () = assert!(core::mem::size_of::<TrafficCounters>() == 64);

impl TrafficCounters {
    /// Field-wise sum (for folding per-CPU values).
    pub fn add(&mut self, o: &Self) {
        self.fwd_packets += o.fwd_packets;
        self.fwd_bytes += o.fwd_bytes;
        self.rev_packets += o.rev_packets;
        self.rev_bytes += o.rev_bytes;
        self.new_conns += o.new_conns;
        self.session_hits += o.session_hits;
        self.session_new += o.session_new;
        self.resets += o.resets;
    }
}

/// Indices into [`COUNTER_MAP`]: verdicts, events and drops by reason.
pub mod counter {
    /// Verdict XDP_PASS.
    pub const VERDICT_PASS: u32 = 0;
    /// Verdict XDP_DROP.
    pub const VERDICT_DROP: u32 = 1;
    /// Verdict XDP_TX.
    pub const VERDICT_TX: u32 = 2;
    /// Verdict XDP_REDIRECT.
    pub const VERDICT_REDIRECT: u32 = 3;
    /// Verdict XDP_ABORTED (a bug: should stay 0).
    pub const VERDICT_ABORTED: u32 = 4;
    /// A rewritten packet handed to the kernel stack: no neighbour entry yet (`NO_NEIGH`).
    pub const FWD_STACK_NO_NEIGH: u32 = 5;
    /// A rewritten packet handed to the stack: the FIB lookup did not give a next hop.
    pub const FWD_STACK_NO_ROUTE: u32 = 6;
    /// A rewritten packet handed to the stack: TTL would expire here (the stack sends ICMP).
    pub const FWD_STACK_TTL: u32 = 7;
    /// A rewritten packet handed to the stack: the egress device is not in the devmap.
    pub const FWD_STACK_NO_DEV: u32 = 8;
    /// TCP RSTs built and sent for packets of connections the balancer does not know.
    pub const RST_SENT: u32 = 9;
    /// Reply-path packets of a backend address with no matching connection (passed).
    pub const REPLY_NO_CONN: u32 = 10;
    /// Forwarded packets whose next hop came from the per-CPU cache (no FIB lookup).
    pub const NEXTHOP_CACHED: u32 = 11;
    /// First drop reason: IPv4 header length below 20 bytes.
    pub const DROP_BAD_IHL: u32 = 16;
    /// Drop: the frame is shorter than the IPv4 header or total length says.
    pub const DROP_TRUNCATED_IP: u32 = 17;
    /// Drop: the L4 header is cut off.
    pub const DROP_TRUNCATED_L4: u32 = 18;
    /// Drop: an IPv4 fragment addressed to a VIP (L4 ports unavailable).
    pub const DROP_FRAGMENT: u32 = 19;
    /// Drop: the listener has no backend accepting new connections.
    pub const DROP_NO_BACKEND: u32 = 20;
    /// Drop: TCP packet without SYN for an unknown connection, and no RST could be built.
    pub const DROP_NO_CONN: u32 = 21;
    /// Drop: the connection table insert failed.
    pub const DROP_CONN_TABLE: u32 = 22;
    /// Drop: IP version field is not 4 in an IPv4 frame to a VIP.
    pub const DROP_BAD_VERSION: u32 = 23;

    /// Names of the counters, for display (index → name); empty for unused indices.
    pub const NAMES: [&str; super::NUM_COUNTERS as usize] = [
        "verdict_pass",
        "verdict_drop",
        "verdict_tx",
        "verdict_redirect",
        "verdict_aborted",
        "fwd_stack_no_neigh",
        "fwd_stack_no_route",
        "fwd_stack_ttl",
        "fwd_stack_no_dev",
        "rst_sent",
        "reply_no_conn",
        "nexthop_cached",
        "",
        "",
        "",
        "",
        "drop_bad_ihl",
        "drop_truncated_ip",
        "drop_truncated_l4",
        "drop_fragment",
        "drop_no_backend",
        "drop_no_conn",
        "drop_conn_table",
        "drop_bad_version",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
    ];

    /// Whether counter `i` is a drop reason.
    pub const fn is_drop_reason(i: u32) -> bool {
        i >= DROP_BAD_IHL && i <= DROP_BAD_VERSION
    }
}

// ---------------------------------------------------------------------------------------------
// Benchmark-only: the traffic generator and drop sink (`clb-gen`, not part of the balancer)
// ---------------------------------------------------------------------------------------------

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

/// What the generator writes into every frame: Ethernet/IPv4/UDP (no checksum) or TCP SYN
/// (valid checksum), source `src_base + n % sources`, source port
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
    /// [`PROTO_UDP`] or [`PROTO_TCP`] (SYN).
    pub proto: u8,
    pub _pad: [u8; 3],
    /// Frame length in bytes (the test run's input frame has this length).
    pub frame_len: u32,
}
const _: () = assert!(core::mem::size_of::<GenConfig>() == 44);

// ---------------------------------------------------------------------------------------------
// aya::Pod for user space
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: every type is `#[repr(C)]`, `bytemuck::Pod` (no padding, any bit pattern valid).
    unsafe impl aya::Pod for ListenerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ListenerRef {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ListenerInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BackendInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BackendAddrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BackendAddrInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SessionKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SessionValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TrafficCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for GenConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_order_helpers_round_trip() {
        let v = ip_to_be([10, 0, 0, 1]);
        assert_eq!(ip_from_be(v), [10, 0, 0, 1]);
        assert_eq!(v.to_ne_bytes(), [10, 0, 0, 1]);
        let p = port_to_be(8080);
        assert_eq!(p.to_ne_bytes(), 8080u16.to_be_bytes());
        assert_eq!(port_from_be(p), 8080);
    }

    #[test]
    fn expiry_has_refresh_slack_and_never_expires_early() {
        let t = 5 * NS_PER_SEC;
        assert!(!is_expired(100 * NS_PER_SEC, 95 * NS_PER_SEC, t));
        assert!(!is_expired(
            100 * NS_PER_SEC + REFRESH_NS,
            95 * NS_PER_SEC,
            t
        ));
        assert!(is_expired(
            100 * NS_PER_SEC + REFRESH_NS + 1,
            95 * NS_PER_SEC,
            t
        ));
        // A timestamp from the future (another CPU wrote it just now) is not expired.
        assert!(!is_expired(1, 2, 0));
    }

    #[test]
    fn closing_states_cap_the_idle_timeout() {
        let idle = 900 * NS_PER_SEC;
        assert_eq!(conn_timeout_ns(CONN_OPEN, idle), idle);
        assert_eq!(conn_timeout_ns(CONN_FIN, idle), 120 * NS_PER_SEC);
        assert_eq!(conn_timeout_ns(CONN_RST, idle), 10 * NS_PER_SEC);
        assert_eq!(conn_timeout_ns(CONN_FIN, 2 * NS_PER_SEC), 2 * NS_PER_SEC);
    }

    #[test]
    fn sched_word_packs_half_and_len() {
        let l = ListenerInfo {
            sched: ListenerInfo::pack_sched(1, 777),
            ..Default::default()
        };
        assert_eq!(l.sched_half(), 1);
        assert_eq!(l.sched_len(), 777);
    }
}
