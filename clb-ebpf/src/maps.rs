//! Every map of the datapath, one purpose line each. Names and layouts come from `clb-common`
//! (the `_V*` suffix is the layout version). The maps are BTF-defined (`.maps` section), so
//! `bpftool map dump` shows keys and values field by field. None is declared pinned here: the
//! daemon pins them under its bpffs directory by name, the packet tests load them unpinned.
//! The sizes of the four flow tables below are defaults: the daemon sets them at load time
//! from its configuration (`[tables]`).

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    btf_maps::{Array, ArrayOfMaps, DevMapHash, HashMap, LruHashMap, PerCpuArray, ProgramArray},
    macros::btf_map,
};
use clb_common::{
    Addr6, BPF_F_INNER_MAP, BPF_F_MMAPABLE, BackendAddrInfo, BackendAddrKey, BackendAddrKey6,
    BackendInfo, BackendLoad, ConnKey, ConnKey6, ConnValue, CpuState, DEFAULT_CONNS,
    DEFAULT_CONNS6, DEFAULT_HALF_OPEN, DEFAULT_HALF_OPEN6, DEFAULT_SESSIONS, DEFAULT_SESSIONS6,
    FRAG_ENTRIES, FragKey, FragKey6, FragValue, FragValue6, GlobalConfig, HalfSlot, HalfSlot6,
    ListenerInfo, ListenerInfo6, ListenerKey, ListenerKey6, ListenerRef, MAX_BACKENDS,
    MAX_DENIED_SOURCES, MAX_DEVICES, MAX_LISTENERS, NH_SLOTS, NUM_COUNTERS, NextHop, NextHop6,
    PendSlot, PendSlot6, SCHED_TEMPLATE_SLOTS, SLOT_WAYS, SessionKey, SessionKey6, SessionValue,
    SharedState, TrafficCounters,
};

use crate::family::{Pkt, V6};

const LISTENERS: usize = MAX_LISTENERS as usize;
const BACKENDS: usize = MAX_BACKENDS as usize;
/// The in-place tables are mapped into user space's memory (see `clb_common::slots`).
const MMAPABLE: usize = BPF_F_MMAPABLE as usize;
/// Slots per set: an in-place table's map value is one set.
const WAYS: usize = SLOT_WAYS as usize;

/// Sets of the IPv4 in-place tables (half-open, pending persistence): `slot_sets` of their
/// size, set by the loader (`clb_common::SLOT_SETS_GLOBAL`), a constant to the verifier.
///
/// The initial value is a sentinel no other constant has: LLVM merges identical constants,
/// and with `0` here a promoted `&0` (a map key) became a reference to this global — which
/// the loader then overwrote (every schedule lookup asked for slot 16384).
#[unsafe(no_mangle)]
pub static CLB_SLOT_SETS: u32 = 0xc1b5_e7a4;
/// Sets of the IPv6 in-place tables (`clb_common::SLOT_SETS6_GLOBAL`); a sentinel as above.
#[unsafe(no_mangle)]
pub static CLB_SLOT_SETS6: u32 = 0xc1b5_e7a6;

/// (VIP, port, proto) → listener id; (VIP, 0, 0) says "this address is a VIP".
#[btf_map]
pub static CLB_LSN_ADDR_V1: HashMap<ListenerKey, ListenerRef, { LISTENERS * 2 }> = HashMap::new();

/// Listener id → settings (persistence, idle timeout, VIP, scheduler, forwarding, mask).
#[btf_map]
pub static CLB_LSN_V2: Array<ListenerInfo, LISTENERS> = Array::new();

/// Backend id → address and flags (present, accepting new connections).
#[btf_map]
pub static CLB_BE_V1: Array<BackendInfo, BACKENDS> = Array::new();

/// Backend id → active connections and weight (least connections; `backend ls` ACTIVE). Mapped
/// into user space, which corrects the counts with atomic adds of its own.
#[btf_map]
pub static CLB_LOAD_V1: Array<BackendLoad, BACKENDS, MMAPABLE> = Array::new();

/// IPv4 reply datagrams being fragmented: (backend, client, identification) → VIP.
#[btf_map]
pub static CLB_FRAG_V1: LruHashMap<FragKey, FragValue, { FRAG_ENTRIES as usize }> =
    LruHashMap::new();

/// IPv6 reply datagrams being fragmented.
#[btf_map]
pub static CLB_FRAG6_V1: LruHashMap<FragKey6, FragValue6, { FRAG_ENTRIES as usize }> =
    LruHashMap::new();

/// (backend IP, port, proto) → listeners it serves: how the reply path finds the connection.
#[btf_map]
pub static CLB_BE_ADDR_V1: HashMap<BackendAddrKey, BackendAddrInfo, BACKENDS> = HashMap::new();

// The verified tables use one LRU list shared by all CPUs, not `BPF_F_NO_COMMON_LRU`: per-CPU
// lists split the capacity between CPUs (the CPU of one busy RX queue would evict at
// max_entries / CPUs), so "1 M entries" would not mean 1 M. The unverified tables, which a
// flood churns and every SYN writes, are in-place arrays instead (`clb_common::slots`): a
// hash-map update is a helper call of ~200 ns, an in-place write ~20 ns.

/// Connection table, verified flows: (client, client port, listener, proto) → backend, last
/// seen, state. Only a completed handshake or a two-way UDP exchange writes it, so floods of
/// new sources cannot evict its entries.
#[btf_map]
pub static CLB_CONN_V2: LruHashMap<ConnKey, ConnValue, { DEFAULT_CONNS as usize }> =
    LruHashMap::new();

/// Half-open table, unverified flows: SYN seen, new UDP flow, adopted mid-stream flow. An
/// in-place table: sets of [`HalfSlot`]s.
#[btf_map]
pub static CLB_HALF_V3: Array<[HalfSlot; WAYS], { DEFAULT_HALF_OPEN as usize / WAYS }, MMAPABLE> =
    Array::new();

/// Persistence table: (masked client IP, listener) → backend, last seen; clients with at
/// least one verified flow.
#[btf_map]
pub static CLB_SESS_V2: LruHashMap<SessionKey, SessionValue, { DEFAULT_SESSIONS as usize }> =
    LruHashMap::new();

/// Pending persistence: clients seen only in unverified flows (parallel SYNs of one new
/// client find the backend the first one chose here). In-place, sized like the half-open table.
#[btf_map]
pub static CLB_PSESS_V2: Array<[PendSlot; WAYS], { DEFAULT_HALF_OPEN as usize / WAYS }, MMAPABLE> =
    Array::new();

/// Listener id → its schedule, an inner array replaced whole by user space: slot 0 = length,
/// then backend ids (a weighted round-robin sequence or a Maglev table). Inner maps may differ
/// in size (`BPF_F_INNER_MAP`).
#[btf_map]
pub static CLB_SCHED_V2: ArrayOfMaps<
    Array<u32, { SCHED_TEMPLATE_SLOTS as usize }, { BPF_F_INNER_MAP as usize }>,
    LISTENERS,
> = ArrayOfMaps::new();

/// Listener id → round-robin cursor, shared by all CPUs (atomic fetch-and-add) so consecutive
/// new connections take consecutive slots.
#[btf_map]
pub static CLB_RR_V1: Array<u64, LISTENERS> = Array::new();

/// ifindex → interface, the devmap redirects go through (filled by user space).
#[btf_map]
pub static CLB_DEVS_V1: DevMapHash<{ MAX_DEVICES as usize }> = DevMapHash::new();

/// Per-CPU traffic counters per listener id.
#[btf_map]
pub static CLB_LSN_STAT_V1: PerCpuArray<TrafficCounters, LISTENERS> = PerCpuArray::new();

/// Per-CPU traffic counters per backend id.
#[btf_map]
pub static CLB_BE_STAT_V1: PerCpuArray<TrafficCounters, BACKENDS> = PerCpuArray::new();

/// Per-CPU counters: verdicts, events, drops by reason (`clb_common::counter`).
#[btf_map]
pub static CLB_COUNT_V2: PerCpuArray<u64, { NUM_COUNTERS as usize }> = PerCpuArray::new();

/// Per-CPU next-hop cache: destination → egress and MACs, for `NH_TTL_NS` (a FIB lookup is
/// the most expensive step of forwarding an established packet).
#[btf_map]
pub static CLB_NH_V1: PerCpuArray<NextHop, { NH_SLOTS as usize }> = PerCpuArray::new();

/// Source address → reason: VIPs, backends and the balancer's own addresses never open a
/// flow to a VIP.
#[btf_map]
pub static CLB_NOSRC_V1: HashMap<u32, u32, { MAX_DENIED_SOURCES as usize }> = HashMap::new();

/// Settings user space writes (flood threshold, RST budget, half-open timeout).
#[btf_map]
pub static CLB_GLOBAL_V1: Array<GlobalConfig, 1> = Array::new();

/// Flood mode, shared by all CPUs.
#[btf_map]
pub static CLB_SHARED_V1: Array<SharedState, 1> = Array::new();

/// Per-CPU flood-detection window and RST token bucket.
#[btf_map]
pub static CLB_CPU_V1: PerCpuArray<CpuState, 1> = PerCpuArray::new();

// ---- IPv6: the same roles with 16-byte addresses (the IPv4 maps keep their small keys) ----

/// IPv6 (VIP, port, proto) → listener id; (VIP, 0, 0) says "this address is a VIP".
#[btf_map]
pub static CLB_LSN_ADDR6_V1: HashMap<ListenerKey6, ListenerRef, { LISTENERS * 2 }> = HashMap::new();

/// Listener id → the IPv6 VIP and persistence mask of an IPv6 listener.
#[btf_map]
pub static CLB_LSN6_V1: Array<ListenerInfo6, LISTENERS> = Array::new();

/// Backend id → the address of an IPv6 backend.
#[btf_map]
pub static CLB_BE6_V1: Array<Addr6, BACKENDS> = Array::new();

/// (IPv6 backend, port, proto) → listeners it serves.
#[btf_map]
pub static CLB_BE_ADDR6_V1: HashMap<BackendAddrKey6, BackendAddrInfo, BACKENDS> = HashMap::new();

/// Verified IPv6 flows.
#[btf_map]
pub static CLB_CONN6_V1: LruHashMap<ConnKey6, ConnValue, { DEFAULT_CONNS6 as usize }> =
    LruHashMap::new();

/// Unverified IPv6 flows (in-place).
#[btf_map]
pub static CLB_HALF6_V3: Array<
    [HalfSlot6; WAYS],
    { DEFAULT_HALF_OPEN6 as usize / WAYS },
    MMAPABLE,
> = Array::new();

/// IPv6 persistence: clients with a verified flow.
#[btf_map]
pub static CLB_SESS6_V1: LruHashMap<SessionKey6, SessionValue, { DEFAULT_SESSIONS6 as usize }> =
    LruHashMap::new();

/// IPv6 pending persistence (in-place).
#[btf_map]
pub static CLB_PSESS6_V2: Array<
    [PendSlot6; WAYS],
    { DEFAULT_HALF_OPEN6 as usize / WAYS },
    MMAPABLE,
> = Array::new();

/// IPv6 source → reason it never opens a flow to a VIP.
#[btf_map]
pub static CLB_NOSRC6_V1: HashMap<Addr6, u32, { MAX_DENIED_SOURCES as usize }> = HashMap::new();

/// Per-CPU IPv6 next-hop cache.
#[btf_map]
pub static CLB_NH6_V1: PerCpuArray<NextHop6, { NH_SLOTS as usize }> = PerCpuArray::new();

/// Per-CPU scratch for `bpf_fib_lookup`'s 64-byte argument, which would not fit the IPv6
/// path's 512-byte stack next to everything else.
#[btf_map]
pub static CLB_FIB_SCRATCH_V1: PerCpuArray<bpf_fib_lookup, 1> = PerCpuArray::new();

/// The programs the balancer tail-calls: `TAIL_V6` (IPv6 packets), `TAIL_V6_ICMP` (ICMPv6 to a
/// VIP). Filled by user space after loading.
#[btf_map]
pub static CLB_PROGS_V1: ProgramArray<{ clb_common::TAIL_SLOTS as usize }> = ProgramArray::new();

/// Per-CPU scratch of the IPv6 reply path: the fragment entry it is writing.
#[btf_map]
pub static CLB_FRAG6_SCRATCH_V1: PerCpuArray<FragEntry6, 1> = PerCpuArray::new();

/// An IPv6 fragment entry being written (see [`CLB_FRAG6_SCRATCH_V1`]).
#[repr(C)]
pub struct FragEntry6 {
    pub key: FragKey6,
    pub val: FragValue6,
}

/// Per-CPU scratch of the ICMPv6 program (the quote of an ICMPv6 error being handled).
#[btf_map]
pub static CLB_ICMP6_SCRATCH_V1: PerCpuArray<Quote, 1> = PerCpuArray::new();

/// The quoted flow of an ICMPv6 error and the backend it belongs to. Kept in a per-CPU map
/// slot ([`CLB_ICMP6_SCRATCH_V1`]), not on the stack, which the lookups' keys fill.
#[repr(C)]
pub struct Quote {
    /// The packet as the parser and the FIB lookup see it.
    pub pkt: Pkt<V6>,
    /// Offsets of the ICMPv6 header, of the quoted transport header, and the packet's end.
    pub off: usize,
    pub inner_l4: usize,
    pub end: usize,
    /// The quoted source: the VIP and its port.
    pub vip: Addr6,
    /// The backend's address and port.
    pub addr: Addr6,
    pub vip_port: u16,
    pub port: u16,
    pub iproto: u8,
    /// Whether the listener is DSR.
    pub dsr: u8,
}
