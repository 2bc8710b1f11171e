//! The one place where the clb XDP program and clb user space agree on types.
//!
//! Every type here is `#[repr(C)]`, derives [`bytemuck::Pod`] (so hidden padding is a compile
//! error: padding is spelled out as `_pad` fields) and has a size assertion. Addresses and ports
//! are kept in **network byte order** exactly as they sit in the packet (the field comments say
//! so), so the datapath never swaps bytes; user space converts with [`ip_to_be`]/[`port_to_be`].
//! Map values hold integers only — no `bool`, no enums; user space turns them into enums with
//! `TryFrom`.
//!
//! Map names carry a layout version (`_V1`, `_V2`): a pinned map whose layout changes gets a new
//! name, so a daemon never misreads an older daemon's pins.
//!
//! Functions both sides must compute identically live here too: expiry ([`is_expired`]), the
//! consistent hash of a client ([`flow_hash`], [`client_hash`]) that picks a Maglev slot, and the
//! prefix mask of persistence ([`prefix_mask_be`]).
#![no_std]

use bytemuck::{Pod, Zeroable};

pub mod layouts;
pub mod slots;
pub use slots::{HalfSlot, HalfSlot6, PendSlot, PendSlot6, SLOT_WAYS, slot_sets};

// ---------------------------------------------------------------------------------------------
// Capacities. User space rejects configuration that would overflow them with a clear error.
// ---------------------------------------------------------------------------------------------

/// Listeners (VIP, port, protocol) the data plane can hold.
pub const MAX_LISTENERS: u32 = 1024;
/// Backends, over all listeners.
pub const MAX_BACKENDS: u32 = 65536;
/// Default size of the connection table (verified flows: TCP after the handshake, UDP after a
/// two-way exchange). LRU; the operator sizes it (`[tables] connections`).
pub const DEFAULT_CONNS: u32 = 1 << 20;
/// Default size of the persistence table (clients with a verified flow). LRU.
pub const DEFAULT_SESSIONS: u32 = 1 << 20;
/// Default size of the half-open table (unverified flows: TCP before the handshake completes,
/// UDP before a two-way exchange, adopted mid-stream flows) and of the pending-session table,
/// in slots (in-place tables, see [`slots`]: 32 bytes a slot). Sets of 8 ways overflow long
/// before a table is full, so it is sized for live handshakes to fill a few per cent of it:
/// with 262 144 slots and 5 000 live handshakes (50 000 new flows/s at 100 ms round trips) a
/// set overflows with a live entry about once in 10^11 SYNs; with 25 000 (250 000/s), once in
/// 700 000.
pub const DEFAULT_HALF_OPEN: u32 = 1 << 18;
/// Default sizes of the IPv6 tables (their own maps: a 16-byte address makes every key larger,
/// and IPv4 entries stay as small as they are); `[tables] connections6` etc.
pub const DEFAULT_CONNS6: u32 = 1 << 18;
/// Default size of the IPv6 persistence table.
pub const DEFAULT_SESSIONS6: u32 = 1 << 18;
/// Default size of the IPv6 half-open and pending-session tables (48 bytes a slot).
pub const DEFAULT_HALF_OPEN6: u32 = 1 << 18;
/// Smallest table the operator may configure.
pub const MIN_TABLE: u32 = 1024;
/// Largest table the operator may configure (the kernel may refuse less).
pub const MAX_TABLE: u32 = 1 << 26;
/// Backends one listener may have.
pub const MAX_BACKENDS_PER_LISTENER: u32 = 1024;
/// Longest weighted round-robin sequence of a listener: every backend at the largest weight,
/// so the weights of any allowed set of backends hold exactly (after dividing by their
/// greatest common divisor) and no backend is rounded up to a share it was not given. Each
/// listener's inner schedule map is sized to its own sequence (400 KiB at this worst case).
pub const WRR_SLOTS: u32 = MAX_BACKENDS_PER_LISTENER * MAX_WEIGHT;
/// Default Maglev lookup-table size (a prime).
pub const DEFAULT_MAGLEV_SIZE: u32 = 65537;
/// Largest Maglev lookup-table size.
pub const MAX_MAGLEV_SIZE: u32 = 1_000_003;
/// Entries of the schedule map's inner-map template (each listener's own inner map is sized to
/// its schedule: 1 + sequence or table length; see [`SCHED_MAP`]).
pub const SCHED_TEMPLATE_SLOTS: u32 = 1 + MAX_BACKENDS_PER_LISTENER;
/// `BPF_F_INNER_MAP`: inner maps of the schedule map may differ in size from the template.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// Interfaces the program can redirect to.
pub const MAX_DEVICES: u32 = 256;
/// Listeners one backend address (IP, port, protocol) may serve at once; see [`BackendAddrInfo`].
pub const MAX_LISTENERS_PER_BACKEND_ADDR: usize = 4;
/// Source addresses the datapath refuses on packets to a VIP, besides the fixed martian
/// ranges: VIPs, backend addresses, the balancer's own addresses.
pub const MAX_DENIED_SOURCES: u32 = 65536 + 2 * MAX_LISTENERS + 4096;
/// Number of per-CPU global counters, see [`counter`].
pub const NUM_COUNTERS: u32 = 64;

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
/// After an RST is seen a connection entry lives at most this long (IPVS `close`), seconds,
/// unless later normal packets from both ends show the connection is still alive.
pub const RST_TIMEOUT_SECS: u32 = 10;
/// An unverified flow (half-open table) lives at most this long without a packet (IPVS
/// `synrecv` is 60 s; a handshake takes milliseconds, a retransmitted SYN seconds).
pub const HALF_OPEN_TIMEOUT_SECS: u32 = 30;
/// Flood mode: the window over which each CPU counts new unverified flows.
pub const FLOOD_WINDOW_NS: u64 = 100_000_000;
/// Flood mode lasts at least this long after the last window over the threshold.
pub const FLOOD_HOLD_NS: u64 = 5 * NS_PER_SEC;
/// After flood mode ends, packets of flows that began during it are still resolved by the
/// stateless hash for this long (their handshakes complete, their replies are NATed).
pub const FLOOD_GRACE_NS: u64 = 10 * NS_PER_SEC;
/// Default RSTs the datapath may build per second per CPU (it must not be a reflector).
pub const DEFAULT_RST_PER_SEC: u32 = 1000;

/// The datapath writes a `last_seen` timestamp at most once per this interval per entry, so a
/// busy flow does not write shared memory on every packet. Expiry adds the same slack, so an
/// entry is never expired early: it lives between `timeout` and `timeout + REFRESH_NS` after
/// the last packet.
pub const REFRESH_NS: u64 = 250_000_000;

/// Nanoseconds per second.
pub const NS_PER_SEC: u64 = 1_000_000_000;

/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IPv6 next-header number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;
/// IPv6 extension headers skipped at most, before the transport header (more: dropped).
pub const MAX_EXT_HEADERS: usize = 4;
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
pub const LISTENER_MAP: &str = "CLB_LSN_V2";
/// backend id → [`BackendInfo`].
pub const BACKEND_MAP: &str = "CLB_BE_V1";
/// (backend IP, port, proto) → [`BackendAddrInfo`]: which listeners a reply may belong to.
pub const BACKEND_ADDR_MAP: &str = "CLB_BE_ADDR_V1";
/// [`ConnKey`] → [`ConnValue`], the connection table: verified flows (LRU).
pub const CONN_MAP: &str = "CLB_CONN_V2";
/// [`HalfSlot`]s, the half-open table: unverified flows (an in-place table, see [`slots`]).
pub const HALF_OPEN_MAP: &str = "CLB_HALF_V3";
/// [`SessionKey`] → [`SessionValue`], the persistence table: clients with a verified flow (LRU).
pub const SESSION_MAP: &str = "CLB_SESS_V2";
/// [`PendSlot`]s, pending persistence: clients seen only in unverified flows, so parallel
/// SYNs of one new client land on one backend (in-place, sized like the half-open table).
pub const PENDING_SESSION_MAP: &str = "CLB_PSESS_V2";
/// listener id → inner array: slot 0 = length `n`, slots `1..=n` = backend ids (a weighted
/// round-robin sequence or a Maglev lookup table). Replaced whole, atomically.
pub const SCHED_MAP: &str = "CLB_SCHED_V2";
/// listener id → round-robin cursor (atomically incremented by every CPU).
pub const CURSOR_MAP: &str = "CLB_RR_V1";
/// ifindex → ifindex, the devmap that redirects go through.
pub const DEVICE_MAP: &str = "CLB_DEVS_V1";
/// Per-CPU [`TrafficCounters`] per listener id.
pub const LISTENER_STATS_MAP: &str = "CLB_LSN_STAT_V1";
/// Per-CPU [`TrafficCounters`] per backend id.
pub const BACKEND_STATS_MAP: &str = "CLB_BE_STAT_V1";
/// Per-CPU `u64` counters indexed by [`counter`].
pub const COUNTER_MAP: &str = "CLB_COUNT_V2";
/// Per-CPU next-hop cache ([`NextHop`] per slot).
pub const NEXTHOP_MAP: &str = "CLB_NH_V1";
/// Source address (network byte order) → `DENY_*` reason: packets to a VIP from it are dropped.
pub const DENY_SRC_MAP: &str = "CLB_NOSRC_V1";
/// The one [`GlobalConfig`], written by user space.
pub const GLOBAL_MAP: &str = "CLB_GLOBAL_V1";
/// Shared datapath state ([`SharedState`]): flood mode.
pub const SHARED_STATE_MAP: &str = "CLB_SHARED_V1";
/// Per-CPU datapath state ([`CpuState`]): flood window, RST tokens.
pub const CPU_STATE_MAP: &str = "CLB_CPU_V1";

/// IPv6 [`ListenerKey6`] → [`ListenerRef`]; (VIP, 0, 0) marks an address as a VIP.
pub const LISTENER_ADDR6_MAP: &str = "CLB_LSN_ADDR6_V1";
/// listener id → [`ListenerInfo6`], the IPv6 half of an IPv6 listener's settings.
pub const LISTENER6_MAP: &str = "CLB_LSN6_V1";
/// backend id → the IPv6 address of an IPv6 backend ([`Addr6`]).
pub const BACKEND6_MAP: &str = "CLB_BE6_V1";
/// [`BackendAddrKey6`] → [`BackendAddrInfo`].
pub const BACKEND_ADDR6_MAP: &str = "CLB_BE_ADDR6_V1";
/// [`ConnKey6`] → [`ConnValue`]: verified IPv6 flows (LRU).
pub const CONN6_MAP: &str = "CLB_CONN6_V1";
/// [`HalfSlot6`]s: unverified IPv6 flows (in-place).
pub const HALF_OPEN6_MAP: &str = "CLB_HALF6_V3";
/// [`SessionKey6`] → [`SessionValue`]: IPv6 clients with a verified flow (LRU).
pub const SESSION6_MAP: &str = "CLB_SESS6_V1";
/// [`PendSlot6`]s: pending IPv6 persistence (in-place).
pub const PENDING_SESSION6_MAP: &str = "CLB_PSESS6_V2";
/// IPv6 source ([`Addr6`]) → `DENY_*` reason.
pub const DENY_SRC6_MAP: &str = "CLB_NOSRC6_V1";
/// Per-CPU IPv6 next-hop cache ([`NextHop6`] per slot).
pub const NEXTHOP6_MAP: &str = "CLB_NH6_V1";

/// Tail-call slot → program (see [`TAIL_PROGRAMS`]).
pub const PROGRAM_MAP: &str = "CLB_PROGS_V1";
/// Per-CPU scratch for the FIB lookup's argument.
pub const FIB_SCRATCH_MAP: &str = "CLB_FIB_SCRATCH_V1";

/// Per-CPU scratch of the ICMPv6 program.
pub const ICMP6_SCRATCH_MAP: &str = "CLB_ICMP6_SCRATCH_V1";

/// backend id → [`BackendLoad`]: active connections (the datapath counts opens and closes,
/// the sweeper corrects what it cannot see) and the weight least connections divides by.
/// Mapped into user space (`BPF_F_MMAPABLE`), which adjusts counts with atomic adds too.
pub const LOAD_MAP: &str = "CLB_LOAD_V1";

/// [`FragKey`] → [`FragValue`]: IPv4 datagrams whose first fragment was a backend's reply,
/// SNATed to the VIP, so that their later fragments (which carry no ports) are rewritten the
/// same way (LRU, [`FRAG_ENTRIES`]).
pub const FRAG_MAP: &str = "CLB_FRAG_V1";
/// [`FragKey6`] → [`FragValue6`]: the same for IPv6 (fragment header identification).
pub const FRAG6_MAP: &str = "CLB_FRAG6_V1";
/// Per-CPU scratch where the IPv6 reply path builds a [`FRAG6_MAP`] entry (its 72 bytes do
/// not fit that path's stack).
pub const FRAG6_SCRATCH_MAP: &str = "CLB_FRAG6_SCRATCH_V1";

/// Every map of the program, for pinning and teardown.
pub const ALL_MAPS: [&str; 36] = [
    FRAG_MAP,
    FRAG6_MAP,
    FRAG6_SCRATCH_MAP,
    LOAD_MAP,
    PROGRAM_MAP,
    FIB_SCRATCH_MAP,
    ICMP6_SCRATCH_MAP,
    LISTENER_ADDR6_MAP,
    LISTENER6_MAP,
    BACKEND6_MAP,
    BACKEND_ADDR6_MAP,
    CONN6_MAP,
    HALF_OPEN6_MAP,
    SESSION6_MAP,
    PENDING_SESSION6_MAP,
    DENY_SRC6_MAP,
    NEXTHOP6_MAP,
    LISTENER_ADDR_MAP,
    LISTENER_MAP,
    BACKEND_MAP,
    BACKEND_ADDR_MAP,
    CONN_MAP,
    HALF_OPEN_MAP,
    SESSION_MAP,
    PENDING_SESSION_MAP,
    SCHED_MAP,
    CURSOR_MAP,
    DEVICE_MAP,
    LISTENER_STATS_MAP,
    BACKEND_STATS_MAP,
    COUNTER_MAP,
    NEXTHOP_MAP,
    DENY_SRC_MAP,
    GLOBAL_MAP,
    SHARED_STATE_MAP,
    CPU_STATE_MAP,
];

/// `BPF_F_MMAPABLE`: the in-place tables are arrays user space maps into its memory, so it
/// reads and writes slots with the same atomic protocol as the datapath.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Global variable of the object (set at load time): sets of the IPv4 in-place tables.
pub const SLOT_SETS_GLOBAL: &str = "CLB_SLOT_SETS";
/// Global variable of the object: sets of the IPv6 in-place tables.
pub const SLOT_SETS6_GLOBAL: &str = "CLB_SLOT_SETS6";

/// Name of the load-balancing XDP program.
pub const XDP_PROGRAM: &str = "clb_xdp";
/// The IPv6 program, tail-called from [`XDP_PROGRAM`] at [`TAIL_V6`].
pub const XDP6_PROGRAM: &str = "clb_xdp6";
/// The ICMPv6 program, tail-called from [`XDP6_PROGRAM`] at [`TAIL_V6_ICMP`].
pub const XDP6_ICMP_PROGRAM: &str = "clb_xdp6_icmp";
/// The IPv6 later-fragment program, tail-called from [`XDP6_PROGRAM`] at [`TAIL_V6_FRAG`].
pub const XDP6_FRAG_PROGRAM: &str = "clb_xdp6_frag";
/// Slots of [`PROGRAM_MAP`].
pub const TAIL_SLOTS: u32 = 4;
/// Slot of [`XDP6_PROGRAM`] in [`PROGRAM_MAP`].
pub const TAIL_V6: u32 = 0;
/// Slot of [`XDP6_ICMP_PROGRAM`] in [`PROGRAM_MAP`].
pub const TAIL_V6_ICMP: u32 = 1;
/// Slot of [`XDP6_FRAG_PROGRAM`] in [`PROGRAM_MAP`].
pub const TAIL_V6_FRAG: u32 = 2;
/// The programs tail-called, with their slots.
pub const TAIL_PROGRAMS: [(&str, u32); 3] = [
    (XDP6_PROGRAM, TAIL_V6),
    (XDP6_ICMP_PROGRAM, TAIL_V6_ICMP),
    (XDP6_FRAG_PROGRAM, TAIL_V6_FRAG),
];
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

/// The network-byte-order mask of an IPv4 prefix of `bits` (0–32) bits.
#[inline(always)]
pub const fn prefix_mask_be(bits: u8) -> u32 {
    let host = if bits == 0 {
        0
    } else if bits >= 32 {
        u32::MAX
    } else {
        u32::MAX << (32 - bits)
    };
    u32::from_ne_bytes(host.to_be_bytes())
}

/// An IPv6 address: its sixteen bytes as they sit in the packet, held in two `u64` (native
/// order of those bytes). Two registers, not sixteen bytes or four words: the datapath keeps
/// addresses in registers across map lookups, and BPF's 512-byte stack has no room for more.
pub type Addr6 = [u64; 2];

/// The [`Addr6`] of an IPv6 address's octets.
#[inline(always)]
pub const fn ip6_to_be(o: [u8; 16]) -> Addr6 {
    [
        u64::from_ne_bytes([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]]),
        u64::from_ne_bytes([o[8], o[9], o[10], o[11], o[12], o[13], o[14], o[15]]),
    ]
}

/// The octets of an [`Addr6`].
#[inline(always)]
pub const fn ip6_from_be(a: Addr6) -> [u8; 16] {
    let (h, l) = (a[0].to_ne_bytes(), a[1].to_ne_bytes());
    [
        h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], l[0], l[1], l[2], l[3], l[4], l[5], l[6],
        l[7],
    ]
}

/// Word `i` (0–3) of an address, as the packet holds it (for hashes).
#[inline(always)]
pub const fn word6(a: &Addr6, i: usize) -> u32 {
    let b = a[i / 2].to_ne_bytes();
    let o = (i % 2) * 4;
    u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// The 16-bit word `i` (0–7) of an address, as the packet holds it (for checksums).
#[inline(always)]
pub const fn half6(a: &Addr6, i: usize) -> u16 {
    let b = a[i / 4].to_ne_bytes();
    let o = (i % 4) * 2;
    u16::from_ne_bytes([b[o], b[o + 1]])
}

/// The mask of an IPv6 prefix of `bits` (0–128) bits.
#[inline(always)]
pub const fn prefix_mask6_be(bits: u8) -> Addr6 {
    let mut m = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        let from = i as u32 * 8;
        let b = bits as u32;
        m[i] = if b <= from {
            0
        } else if b - from >= 8 {
            0xff
        } else {
            0xffu8 << (8 - (b - from))
        };
        i += 1;
    }
    ip6_to_be(m)
}

/// Whether two addresses are equal.
#[inline(always)]
pub const fn addr6_eq(a: &Addr6, b: &Addr6) -> bool {
    a[0] == b[0] && a[1] == b[1]
}

/// `a & m`.
#[inline(always)]
pub const fn mask6(a: Addr6, m: Addr6) -> Addr6 {
    [a[0] & m[0], a[1] & m[1]]
}

// ---------------------------------------------------------------------------------------------
// Listener maps
// ---------------------------------------------------------------------------------------------

/// Key of [`LISTENER_ADDR_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
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
/// Listener flag: new flows are placed by the Maglev table (a consistent hash of the client),
/// and mid-stream packets without state go where the hash says instead of being reset.
pub const LISTENER_F_MAGLEV: u32 = 2;
/// Listener flag: direct server return (only the destination MAC is rewritten; replies do not
/// pass the balancer).
pub const LISTENER_F_DSR: u32 = 4;
/// Listener flag: an IPv6 listener (its VIP and persistence mask are in [`LISTENER6_MAP`]).
pub const LISTENER_F_V6: u32 = 16;
/// Listener flag: weighted least connections. A new flow goes to the accepting backend with the
/// fewest active connections per unit of weight ([`BackendLoad`]); the schedule then lists each
/// accepting backend once, and a rotating start breaks ties.
pub const LISTENER_F_LC: u32 = 32;
/// Listener flag: a backend address (IP, port, protocol) of this listener serves another
/// listener too. A reply can then only be told apart by its flow's state, so this listener's
/// SYNs write their half-open entry even in flood mode (the stateless hash cannot say which
/// listener a SYN-ACK answers).
pub const LISTENER_F_SHARED_BACKENDS: u32 = 8;

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
    /// Mask applied to a client address before it keys persistence and the hash, network byte
    /// order (`prefix_mask_be(persist_mask)`; all ones = one entry per address).
    pub client_mask: u32,
}
const _: () = assert!(core::mem::size_of::<ListenerInfo>() == 32);

/// Key of [`LISTENER_ADDR6_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ListenerKey6 {
    pub vip: Addr6,
    /// Port, network byte order; 0 with `proto` 0 marks "this address is a VIP".
    pub port: u16,
    pub proto: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<ListenerKey6>() == 24);

/// Value of [`LISTENER6_MAP`] (an array indexed by listener id; used for IPv6 listeners, whose
/// [`ListenerInfo`] has `vip` and `client_mask` 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ListenerInfo6 {
    pub vip: Addr6,
    /// Persistence mask (`prefix_mask6_be(persist_mask)`).
    pub client_mask: Addr6,
}
const _: () = assert!(core::mem::size_of::<ListenerInfo6>() == 32);

// ---------------------------------------------------------------------------------------------
// Backend maps
// ---------------------------------------------------------------------------------------------

/// Backend flag: the slot holds a configured backend (established flows may use it).
pub const BACKEND_F_PRESENT: u32 = 1;
/// Backend flag: new connections and new persisted clients may go to it
/// (weight > 0, healthy or every backend of the listener unhealthy, not draining).
pub const BACKEND_F_ACCEPTING: u32 = 2;

/// Backend flag: an IPv6 backend (`addr` is 0; its address is in [`BACKEND6_MAP`]).
pub const BACKEND_F_V6: u32 = 4;

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

/// Value of [`LOAD_MAP`] (an array indexed by backend id).
///
/// `active` counts the backend's verified connections in state [`CONN_OPEN`] (TCP until FIN,
/// RST or idle expiry; UDP flows while live), whatever the listener's scheduler: the datapath
/// adds 1 when an entry enters that state and subtracts 1 when it leaves it, and the sweeper
/// adds the difference to what its walk found (entries that leave without a packet: idle
/// expiry, LRU eviction, purges). A two's-complement count: a transient negative value reads
/// as 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BackendLoad {
    /// Active connections (wrapping; read as `i64`).
    pub active: u64,
}
const _: () = assert!(core::mem::size_of::<BackendLoad>() == 8);

/// Entries of each fragment table: datagrams being fragmented at one instant (a datagram's
/// fragments leave its backend back to back; an entry is needed only until its last one).
pub const FRAG_ENTRIES: u32 = 4096;
/// How long a fragment entry rewrites later fragments of its datagram (Linux reassembles for
/// up to 30 s, but a sender emits a datagram's fragments in one burst; an identification the
/// sender reuses later for another destination port must not be rewritten by a stale entry).
pub const FRAG_TTL_NS: u64 = 2_000_000_000;

/// Key of [`FRAG_MAP`]: what every fragment of one IPv4 datagram shares (RFC 791), addresses
/// and identification in network byte order, as the backend sent them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragKey {
    /// The backend's address (the fragments' source).
    pub src: u32,
    /// The client's address.
    pub dst: u32,
    /// IPv4 identification.
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 12);

/// Key of [`FRAG6_MAP`] (RFC 8200 §4.5: source, destination, identification).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragKey6 {
    pub src: Addr6,
    pub dst: Addr6,
    /// The fragment header's identification, network byte order.
    pub id: u32,
    /// The fragmented packet's upper-layer protocol.
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FragKey6>() == 40);

/// Value of [`FRAG_MAP`]: the VIP the datagram's first fragment was rewritten to, and whose
/// counters its fragments add to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragValue {
    /// Monotonic ns after which the entry rewrites nothing.
    pub expires_ns: u64,
    /// The VIP (network byte order).
    pub vip: u32,
    pub listener: u32,
    pub backend: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<FragValue>() == 24);

/// Value of [`FRAG6_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragValue6 {
    pub expires_ns: u64,
    pub vip: Addr6,
    pub listener: u32,
    pub backend: u32,
}
const _: () = assert!(core::mem::size_of::<FragValue6>() == 32);

/// Schedule slots a least-connections choice compares per new flow: with at most this many
/// accepting backends it is exact; with more, it is the least loaded of this many consecutive
/// ones from a rotating start.
pub const LC_SCAN: u32 = 32;

/// Bits of a schedule slot that hold the backend id ([`MAX_BACKENDS`] ids). A
/// least-connections schedule keeps the backend's weight in the bits above
/// ([`lc_slot`]); the round-robin and Maglev schedules leave them 0.
pub const SCHED_ID_MASK: u32 = MAX_BACKENDS - 1;
const _: () = assert!(MAX_BACKENDS.is_power_of_two() && MAX_BACKENDS == 1 << 16);

/// A least-connections schedule slot: backend `id` with `weight` (1..=[`MAX_WEIGHT`]).
pub const fn lc_slot(id: u32, weight: u32) -> u32 {
    (id & SCHED_ID_MASK) | (weight << 16)
}

/// Key of [`BACKEND_ADDR_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
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

/// Key of [`BACKEND_ADDR6_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct BackendAddrKey6 {
    pub addr: Addr6,
    /// Backend port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<BackendAddrKey6>() == 24);

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

/// Reasons in [`DENY_SRC_MAP`]: why packets to a VIP from this source are dropped.
pub const DENY_VIP: u32 = 1;
/// The source is a backend address: a backend's packet to a VIP is never a new client flow.
pub const DENY_BACKEND: u32 = 2;
/// The source is one of the balancer's own addresses.
pub const DENY_LOCAL: u32 = 3;

// ---------------------------------------------------------------------------------------------
// Global configuration and state
// ---------------------------------------------------------------------------------------------

/// The one value of [`GLOBAL_MAP`], written by user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct GlobalConfig {
    /// New unverified flows per CPU per [`FLOOD_WINDOW_NS`] above which flood mode starts
    /// (0 = never).
    pub flood_threshold: u32,
    /// RSTs the datapath may send per second per CPU.
    pub rst_per_sec: u32,
    /// Half-open entry lifetime without a packet, ns.
    pub half_open_timeout_ns: u64,
}
const _: () = assert!(core::mem::size_of::<GlobalConfig>() == 16);

/// The one value of [`SHARED_STATE_MAP`], written by the datapath (rarely: at most once per
/// flood window per CPU while a flood lasts).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SharedState {
    /// Flood mode is on until this `CLOCK_MONOTONIC` ns.
    pub flood_until_ns: u64,
}
const _: () = assert!(core::mem::size_of::<SharedState>() == 8);

/// Per-CPU datapath state in [`CPU_STATE_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CpuState {
    /// Start of the current flood-detection window, ns.
    pub window_start_ns: u64,
    /// New unverified flows seen in the current window.
    pub window_new: u64,
    /// RST token bucket: tokens left (scaled by [`RST_TOKEN_SCALE`]) and last refill time.
    pub rst_tokens: u64,
    pub rst_refill_ns: u64,
}
const _: () = assert!(core::mem::size_of::<CpuState>() == 32);

/// Scale of [`CpuState::rst_tokens`]: one RST costs this many tokens.
pub const RST_TOKEN_SCALE: u64 = 1_000_000;

/// Whether flood-mode state says flows may be resolved by the stateless hash at `now`.
#[inline(always)]
pub const fn flood_recent(s: &SharedState, now_ns: u64) -> bool {
    s.flood_until_ns != 0 && now_ns < s.flood_until_ns + FLOOD_GRACE_NS
}

// ---------------------------------------------------------------------------------------------
// Connection, half-open and persistence tables
// ---------------------------------------------------------------------------------------------

/// Key of [`CONN_MAP`] and [`HALF_OPEN_MAP`]. The client side of a flow plus the listener
/// identify it from both directions: client → VIP packets give (client, listener by VIP),
/// backend → client replies give (client, listener by backend address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
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

/// Key of [`CONN6_MAP`] and [`HALF_OPEN6_MAP`]: [`ConnKey`] with an IPv6 client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ConnKey6 {
    pub client: Addr6,
    /// Client port, network byte order.
    pub client_port: u16,
    /// Listener id.
    pub listener: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<ConnKey6>() == 24);

/// Connection state: open (established TCP; any verified UDP flow).
pub const CONN_OPEN: u8 = 1;
/// Connection state: a FIN was seen; the entry lives at most [`FIN_TIMEOUT_SECS`].
pub const CONN_FIN: u8 = 2;
/// Connection state: an RST was seen; the entry lives at most [`RST_TIMEOUT_SECS`] unless
/// normal packets from both ends follow ([`CONN_F_SEEN_FWD`], [`CONN_F_SEEN_REV`]).
pub const CONN_RST: u8 = 3;

/// Connection flag: after an RST, a normal client packet was seen.
pub const CONN_F_SEEN_FWD: u8 = 1;
/// Connection flag: after an RST, a normal backend packet was seen.
pub const CONN_F_SEEN_REV: u8 = 2;
/// Connection flag: a FIN was seen before the RST (the flow returns to FIN, not OPEN).
pub const CONN_F_FIN_BEFORE: u8 = 4;

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
    /// `CONN_F_*` bits.
    pub flags: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<ConnValue>() == 16);

/// Half-open kind: a TCP SYN was seen; the client's handshake-completing ACK promotes it.
pub const HALF_SYN: u8 = 1;
/// Half-open kind: a new UDP flow; a client packet after a backend reply (NAT) or a second
/// client packet (DSR) promotes it.
pub const HALF_UDP: u8 = 2;
/// Half-open kind: a TCP mid-stream packet without state, forwarded where the hash (or the
/// client's persistence entry) says; a normal backend reply (NAT) or a second client packet
/// (DSR) promotes it.
pub const HALF_ADOPTED: u8 = 3;

/// Half-open flag: the backend answered (NAT): a UDP flow's backend sent a datagram, or a TCP
/// SYN entry's backend sent its SYN-ACK, whose initial sequence number is then in
/// [`HalfOpenValue::backend_isn`].
pub const HALF_F_REPLIED: u8 = 1;
/// Half-open flag: the backend was picked by the stateless hash (flood mode).
pub const HALF_F_HASHED: u8 = 2;
/// Half-open flag (DSR, TCP SYN entries): the client's handshake-completing ACK was seen. On a
/// DSR listener that ACK proves nothing (clb never sees the backend's SYN-ACK, so it cannot
/// check the acknowledged number): the flow is promoted on a later client segment carrying
/// data.
pub const HALF_F_ACKED: u8 = 4;

/// Value of [`HALF_OPEN_MAP`] (16 bytes: an in-place slot stays 32, and an insert passes it
/// in two registers).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct HalfOpenValue {
    /// Last packet, `CLOCK_MONOTONIC` ns.
    pub last_seen_ns: u64,
    /// TCP on a NAT listener: the backend's initial sequence number (host order), from its
    /// SYN-ACK, valid once [`HALF_F_REPLIED`] is set. The client's ACK completes the handshake
    /// only if it acknowledges exactly this number + 1: proof that the client received the
    /// SYN-ACK, which an off-path sender of spoofed packets never sees.
    pub backend_isn: u32,
    /// Backend id (below [`MAX_BACKENDS`], so 16 bits hold it).
    pub backend: u16,
    /// `HALF_*` kind.
    pub kind: u8,
    /// `HALF_F_*` bits.
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<HalfOpenValue>() == 16);
const _: () = assert!(MAX_BACKENDS <= 1 << 16);

/// Key of [`SESSION_MAP`] and [`PENDING_SESSION_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SessionKey {
    /// Client IPv4 masked by the listener's persistence mask, network byte order.
    pub client: u32,
    /// Listener id.
    pub listener: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SessionKey>() == 8);

/// Key of [`SESSION6_MAP`] and [`PENDING_SESSION6_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SessionKey6 {
    /// Client address masked by the listener's persistence mask.
    pub client: Addr6,
    /// Listener id.
    pub listener: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<SessionKey6>() == 24);

/// Value of [`SESSION_MAP`] and [`PENDING_SESSION_MAP`].
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
// The consistent hash (Maglev slot of a client or flow)
// ---------------------------------------------------------------------------------------------

/// Seed of [`flow_hash`]: every node uses the same, so every node picks the same slot.
pub const HASH_SEED: u32 = 0x636c_6221; // "clb!"

/// Bob Jenkins' lookup3 final mix (as the kernel's `jhash_3words`), the hash Katran uses for
/// its Maglev ring: cheap in eBPF (no loop, no table) and well mixed.
#[inline(always)]
pub const fn jhash_3words(a: u32, b: u32, c: u32, initval: u32) -> u32 {
    const GOLDEN: u32 = 0xdead_beef;
    let mut a = a
        .wrapping_add(GOLDEN)
        .wrapping_add(initval)
        .wrapping_add(12);
    let mut b = b
        .wrapping_add(GOLDEN)
        .wrapping_add(initval)
        .wrapping_add(12);
    let mut c = c
        .wrapping_add(GOLDEN)
        .wrapping_add(initval)
        .wrapping_add(12);
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(24));
    c
}

/// Hash of a flow (5-tuple seen from the client side; addresses and ports network byte order),
/// for listeners without persistence.
#[inline(always)]
pub const fn flow_hash(client: u32, client_port: u16, vip: u32, vip_port: u16, proto: u8) -> u32 {
    let ports = ((client_port as u32) << 16) | vip_port as u32;
    jhash_3words(client, vip, ports, HASH_SEED ^ proto as u32)
}

/// Hash of a (masked) client address, for listeners with persistence: all connections of the
/// client (or its prefix) hash alike.
#[inline(always)]
pub const fn client_hash(masked_client: u32, vip: u32, vip_port: u16, proto: u8) -> u32 {
    jhash_3words(
        masked_client,
        vip,
        vip_port as u32,
        HASH_SEED ^ proto as u32,
    )
}

/// An IPv6 address folded to 32 bits for the hashes (every word counts).
#[inline(always)]
pub const fn fold6(a: Addr6) -> u32 {
    jhash_3words(
        word6(&a, 1),
        word6(&a, 2),
        word6(&a, 3),
        word6(&a, 0) ^ HASH_SEED,
    )
}

/// [`flow_hash`] of an IPv6 flow.
#[inline(always)]
pub const fn flow_hash6(
    client: Addr6,
    client_port: u16,
    vip: Addr6,
    vip_port: u16,
    proto: u8,
) -> u32 {
    flow_hash(fold6(client), client_port, fold6(vip), vip_port, proto)
}

/// [`client_hash`] of a (masked) IPv6 client.
#[inline(always)]
pub const fn client_hash6(masked_client: Addr6, vip: Addr6, vip_port: u16, proto: u8) -> u32 {
    client_hash(fold6(masked_client), fold6(vip), vip_port, proto)
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
    /// 1 if the destination is on-link (the FIB gave no gateway): DSR needs that.
    pub onlink: u8,
    pub _pad: u8,
    /// The route's MTU towards `dst` (from the FIB); 0 = not known (an entry written by an
    /// older clb: looked up again).
    pub mtu: u16,
}
const _: () = assert!(core::mem::size_of::<NextHop>() == 32);

/// [`NextHop`] for an IPv6 destination (in [`NEXTHOP6_MAP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NextHop6 {
    pub expires_ns: u64,
    /// Destination; all zero = empty slot.
    pub dst: Addr6,
    pub ifindex: u32,
    pub _pad0: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub onlink: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<NextHop6>() == 48);

/// The slot of an IPv6 destination in the IPv6 next-hop cache.
#[inline(always)]
pub const fn nh_slot6(dst: &Addr6) -> u32 {
    nh_slot(word6(dst, 0) ^ word6(dst, 1) ^ word6(dst, 2) ^ word6(dst, 3))
}

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
    /// New flows scheduled (a SYN, a new UDP flow, an adopted mid-stream flow).
    pub new_conns: u64,
    /// New flows decided by a live persistence entry.
    pub session_hits: u64,
    /// Persistence entries committed (new or rescheduled client with a verified flow).
    pub session_new: u64,
    /// TCP RSTs sent for packets of connections the balancer does not know.
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
    /// A rewritten packet handed to the stack: it needs fragmenting (the stack fragments it
    /// or answers "fragmentation needed").
    pub const FWD_STACK_FRAG: u32 = 6;
    /// (unused since TTL ≤ 1 packets to a VIP are dropped: see [`DROP_TTL`]).
    pub const FWD_STACK_TTL: u32 = 7;
    /// A rewritten packet handed to the stack: the egress device is not in the devmap.
    pub const FWD_STACK_NO_DEV: u32 = 8;
    /// TCP RSTs built and sent for packets of connections the balancer does not know.
    pub const RST_SENT: u32 = 9;
    /// Reply-path packets of a backend address with no matching flow (passed).
    pub const REPLY_NO_CONN: u32 = 10;
    /// Forwarded packets whose next hop came from the per-CPU cache (no FIB lookup).
    pub const NEXTHOP_CACHED: u32 = 11;
    /// Unverified flows written to the half-open table.
    pub const HALF_OPEN_INSERT: u32 = 12;
    /// Unverified flows promoted to the connection table (handshake completed, two-way UDP,
    /// adopted flow answered).
    pub const HALF_OPEN_PROMOTE: u32 = 13;
    /// Packets that needed a half-open entry that was gone (evicted or expired) and were
    /// resolved by the stateless hash instead.
    pub const HALF_OPEN_MISS_HASHED: u32 = 14;
    /// New flows placed by the stateless hash because flood mode was on.
    pub const FLOOD_HASHED: u32 = 15;
    /// Times a CPU switched flood mode on (it was off).
    pub const FLOOD_ENTERED: u32 = 16;
    /// Mid-stream TCP packets without state, adopted (forwarded where the hash or the client's
    /// persistence entry says, and tracked as unverified).
    pub const ADOPTED: u32 = 17;
    /// ICMP errors about a tracked flow NATed to its backend.
    pub const ICMP_NATED: u32 = 18;
    /// DSR packets forwarded.
    pub const DSR_FORWARDED: u32 = 19;
    /// Half-open entries removed because the client reset the flow.
    pub const HALF_OPEN_CLOSED: u32 = 20;
    /// Live half-open entries pushed out by a new flow in their set (the oldest of its ways):
    /// the table churns, so flood mode is switched on (their handshakes, if placed by the
    /// stateless hash, still complete).
    pub const HALF_OPEN_EVICTED: u32 = 21;
    /// Live pending-persistence entries pushed out by a new client in their set.
    pub const PENDING_EVICTED: u32 = 22;
    /// New unverified flows whose set another CPU was writing at that instant: placed by the
    /// stateless hash without state (flood mode switched on so their next packets agree).
    pub const SLOT_BUSY: u32 = 24;
    /// Handshake-completing ACKs (NAT) that did not acknowledge the backend's SYN-ACK (no
    /// SYN-ACK seen, or another number): sent blind, so they verify nothing.
    pub const HALF_OPEN_UNPROVEN: u32 = 25;
    /// A packet too big for its egress MTU with don't-fragment set, answered by clb with an
    /// ICMP "fragmentation needed" quoting it as its sender sent it (before the NAT).
    pub const FRAG_NEEDED_SENT: u32 = 26;
    /// First fragments of a backend's UDP reply, SNATed to the VIP like any reply and noted
    /// (source, destination, identification) so the datagram's later fragments follow.
    pub const REPLY_FRAG_FIRST: u32 = 27;
    /// Later fragments of a noted reply datagram, rewritten to come from the VIP.
    pub const REPLY_FRAG_REWRITTEN: u32 = 28;
    /// Later fragments (no ports) of no noted datagram: passed to the stack (not a reply of
    /// clb's, or its first fragment arrived after them or was missed).
    pub const FRAG_NOT_NOTED: u32 = 29;

    /// First drop reason: IPv4 header length below 20 bytes.
    pub const DROP_BAD_IHL: u32 = 32;
    /// Drop: the frame is shorter than the IPv4 header or total length says.
    pub const DROP_TRUNCATED_IP: u32 = 33;
    /// Drop: the L4 header is cut off.
    pub const DROP_TRUNCATED_L4: u32 = 34;
    /// Drop: an IPv4 fragment addressed to a VIP (L4 ports unavailable).
    pub const DROP_FRAGMENT: u32 = 35;
    /// Drop: the listener has no backend accepting new connections.
    pub const DROP_NO_BACKEND: u32 = 36;
    /// Drop: TCP packet without SYN for an unknown connection, and no RST could be built.
    pub const DROP_NO_CONN: u32 = 37;
    /// Drop: a table insert failed.
    pub const DROP_CONN_TABLE: u32 = 38;
    /// Drop: IP version field is not 4 in an IPv4 frame to a VIP.
    pub const DROP_BAD_VERSION: u32 = 39;
    /// Drop: source address is martian (loopback, 0.0.0.0/8, multicast, limited broadcast,
    /// class E).
    pub const DROP_SRC_MARTIAN: u32 = 40;
    /// Drop: source address is a VIP.
    pub const DROP_SRC_VIP: u32 = 41;
    /// Drop: source address is a backend (a backend's packet to a VIP is never a client).
    pub const DROP_SRC_BACKEND: u32 = 42;
    /// Drop: source address is one of the balancer's own.
    pub const DROP_SRC_LOCAL: u32 = 43;
    /// Drop: TTL ≤ 1 on a packet to a VIP (forwarding it would expose the backend in the ICMP
    /// time-exceeded the next hop sends).
    pub const DROP_TTL: u32 = 44;
    /// Drop: an RST would have been sent but the per-CPU RST budget was spent.
    pub const DROP_RST_RATE: u32 = 45;
    /// Drop: an RST arrived for a flow the balancer does not know.
    pub const DROP_STRAY_RST: u32 = 46;
    /// Drop: a DSR backend cannot be reached at layer 2 (the FIB names a gateway, has no
    /// neighbour entry yet, or the egress is not in the devmap); the stack would only route the
    /// packet by its VIP.
    pub const DROP_DSR_NO_NEXTHOP: u32 = 47;
    /// Drop: malformed ICMP error to a VIP.
    pub const DROP_BAD_ICMP: u32 = 48;
    /// Drop: no route to the packet's destination (after NAT; the stack would drop it too).
    pub const DROP_NO_ROUTE: u32 = 49;
    /// Drop: an IPv6 packet to a VIP whose extension headers cannot be walked (too many, a
    /// routing header, truncated, unknown).
    pub const DROP_BAD_EXTHDR: u32 = 50;
    /// Drop: an IPv6 UDP datagram to a VIP with checksum 0 (not allowed over IPv6: the
    /// backend's stack would discard it after it took a backend and state).
    pub const DROP_UDP6_ZERO_CSUM: u32 = 51;
    /// A tail call into the IPv6 programs failed (their slot is empty): the packet passed.
    pub const TAIL_CALL_FAILED: u32 = 23;

    /// Names of the counters, for display (index → name); empty for unused indices.
    pub const NAMES: [&str; super::NUM_COUNTERS as usize] = {
        let mut n = [""; super::NUM_COUNTERS as usize];
        n[VERDICT_PASS as usize] = "verdict_pass";
        n[VERDICT_DROP as usize] = "verdict_drop";
        n[VERDICT_TX as usize] = "verdict_tx";
        n[VERDICT_REDIRECT as usize] = "verdict_redirect";
        n[VERDICT_ABORTED as usize] = "verdict_aborted";
        n[FWD_STACK_NO_NEIGH as usize] = "fwd_stack_no_neigh";
        n[FWD_STACK_FRAG as usize] = "fwd_stack_frag";
        n[FWD_STACK_TTL as usize] = "fwd_stack_ttl";
        n[FWD_STACK_NO_DEV as usize] = "fwd_stack_no_dev";
        n[RST_SENT as usize] = "rst_sent";
        n[REPLY_NO_CONN as usize] = "reply_no_conn";
        n[NEXTHOP_CACHED as usize] = "nexthop_cached";
        n[HALF_OPEN_INSERT as usize] = "half_open_insert";
        n[HALF_OPEN_PROMOTE as usize] = "half_open_promote";
        n[HALF_OPEN_MISS_HASHED as usize] = "half_open_miss_hashed";
        n[FLOOD_HASHED as usize] = "flood_hashed";
        n[FLOOD_ENTERED as usize] = "flood_entered";
        n[ADOPTED as usize] = "adopted";
        n[ICMP_NATED as usize] = "icmp_nated";
        n[DSR_FORWARDED as usize] = "dsr_forwarded";
        n[HALF_OPEN_CLOSED as usize] = "half_open_closed";
        n[HALF_OPEN_EVICTED as usize] = "half_open_evicted";
        n[PENDING_EVICTED as usize] = "pending_evicted";
        n[SLOT_BUSY as usize] = "slot_busy";
        n[HALF_OPEN_UNPROVEN as usize] = "half_open_unproven";
        n[FRAG_NEEDED_SENT as usize] = "frag_needed_sent";
        n[REPLY_FRAG_FIRST as usize] = "reply_frag_first";
        n[REPLY_FRAG_REWRITTEN as usize] = "reply_frag_rewritten";
        n[FRAG_NOT_NOTED as usize] = "frag_not_noted";
        n[DROP_BAD_IHL as usize] = "drop_bad_ihl";
        n[DROP_TRUNCATED_IP as usize] = "drop_truncated_ip";
        n[DROP_TRUNCATED_L4 as usize] = "drop_truncated_l4";
        n[DROP_FRAGMENT as usize] = "drop_fragment";
        n[DROP_NO_BACKEND as usize] = "drop_no_backend";
        n[DROP_NO_CONN as usize] = "drop_no_conn";
        n[DROP_CONN_TABLE as usize] = "drop_conn_table";
        n[DROP_BAD_VERSION as usize] = "drop_bad_version";
        n[DROP_SRC_MARTIAN as usize] = "drop_src_martian";
        n[DROP_SRC_VIP as usize] = "drop_src_vip";
        n[DROP_SRC_BACKEND as usize] = "drop_src_backend";
        n[DROP_SRC_LOCAL as usize] = "drop_src_local";
        n[DROP_TTL as usize] = "drop_ttl";
        n[DROP_RST_RATE as usize] = "drop_rst_rate";
        n[DROP_STRAY_RST as usize] = "drop_stray_rst";
        n[DROP_DSR_NO_NEXTHOP as usize] = "drop_dsr_no_nexthop";
        n[DROP_BAD_ICMP as usize] = "drop_bad_icmp";
        n[DROP_NO_ROUTE as usize] = "drop_no_route";
        n[DROP_BAD_EXTHDR as usize] = "drop_bad_exthdr";
        n[DROP_UDP6_ZERO_CSUM as usize] = "drop_udp6_zero_csum";
        n[TAIL_CALL_FAILED as usize] = "tail_call_failed";
        n
    };

    /// Whether counter `i` is a drop reason.
    pub const fn is_drop_reason(i: u32) -> bool {
        i >= DROP_BAD_IHL && i <= DROP_UDP6_ZERO_CSUM
    }
}

// ---------------------------------------------------------------------------------------------
// aya::Pod for user space
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "user")]
mod user {
    use super::*;

    macro_rules! pod {
        ($($t:ty),*) => {
            $(
                // SAFETY: every type is `#[repr(C)]`, `bytemuck::Pod` (no padding, any bit
                // pattern valid).
                unsafe impl aya::Pod for $t {}
            )*
        };
    }
    pod!(
        FragKey,
        FragKey6,
        FragValue,
        FragValue6,
        ListenerKey6,
        ListenerInfo6,
        BackendAddrKey6,
        ConnKey6,
        SessionKey6,
        NextHop6,
        ListenerKey,
        ListenerRef,
        ListenerInfo,
        BackendInfo,
        BackendAddrKey,
        BackendAddrInfo,
        ConnKey,
        ConnValue,
        HalfOpenValue,
        SessionKey,
        SessionValue,
        HalfSlot,
        HalfSlot6,
        PendSlot,
        PendSlot6,
        TrafficCounters,
        GlobalConfig,
        SharedState,
        CpuState
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_helpers() {
        let o = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(ip6_from_be(ip6_to_be(o)), o);
        assert!(addr6_eq(&ip6_to_be(o), &ip6_to_be(o)));
        assert_eq!(half6(&ip6_to_be(o), 1), u16::from_ne_bytes([0x0d, 0xb8]));
        assert_eq!(word6(&ip6_to_be(o), 3), u32::from_ne_bytes([0, 0, 0, 1]));
        let all = ip6_from_be(prefix_mask6_be(128));
        assert_eq!(all, [0xff; 16]);
        assert_eq!(ip6_from_be(prefix_mask6_be(0)), [0; 16]);
        let m = ip6_from_be(prefix_mask6_be(52));
        assert_eq!(&m[..7], &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xf0]);
        assert!(m[7..].iter().all(|b| *b == 0));
        let masked = ip6_from_be(mask6(ip6_to_be(o), prefix_mask6_be(32)));
        assert_eq!(
            masked,
            [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        // The hash sees every word.
        let mut p = o;
        p[15] = 2;
        assert_ne!(fold6(ip6_to_be(o)), fold6(ip6_to_be(p)));
        p = o;
        p[0] = 0x30;
        assert_ne!(fold6(ip6_to_be(o)), fold6(ip6_to_be(p)));
    }

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
    fn prefix_masks() {
        let a = ip_to_be([10, 2, 3, 4]);
        assert_eq!(ip_from_be(a & prefix_mask_be(32)), [10, 2, 3, 4]);
        assert_eq!(ip_from_be(a & prefix_mask_be(24)), [10, 2, 3, 0]);
        assert_eq!(ip_from_be(a & prefix_mask_be(12)), [10, 0, 0, 0]);
        assert_eq!(prefix_mask_be(0), 0);
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
    fn client_hash_spreads_evenly() {
        // 30 000 consecutive client addresses over 3 buckets: each within 3 % of a third.
        let mut buckets = [0u32; 3];
        for i in 0..30_000u32 {
            let c = ip_to_be((0x0a02_0000 + i).to_be_bytes());
            buckets[(client_hash(c, ip_to_be([10, 0, 0, 100]), port_to_be(80), 6) % 3) as usize] +=
                1;
        }
        for b in buckets {
            assert!((9_700..=10_300).contains(&b), "{buckets:?}");
        }
        assert_ne!(flow_hash(1, 1, 2, 3, 6), flow_hash(1, 2, 2, 3, 6));
    }

    #[test]
    fn counter_names_are_unique() {
        let mut seen = [""; NUM_COUNTERS as usize];
        for (i, n) in counter::NAMES.iter().enumerate() {
            if n.is_empty() {
                continue;
            }
            assert!(!seen.contains(n), "{n} twice");
            seen[i] = n;
            assert_eq!(
                counter::is_drop_reason(i as u32),
                n.starts_with("drop_"),
                "{n}"
            );
        }
    }
}
