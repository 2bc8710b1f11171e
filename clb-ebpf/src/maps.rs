//! Every map of the datapath, one purpose line each. Names and layouts come from `clb-common`
//! (the `_V1` suffix is the layout version). The maps are BTF-defined (`.maps` section), so
//! `bpftool map dump` shows keys and values field by field. None is declared pinned here: the
//! daemon pins them under its bpffs directory by name, the packet tests load them unpinned.

use aya_ebpf::{
    btf_maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use clb_common::{
    BackendAddrInfo, BackendAddrKey, BackendInfo, ConnKey, ConnValue, ListenerInfo, ListenerKey,
    ListenerRef, MAX_BACKENDS, MAX_CONNS, MAX_DEVICES, MAX_LISTENERS, MAX_SESSIONS, NH_SLOTS,
    NUM_COUNTERS, NextHop, SCHED_SLOTS, SessionKey, SessionValue, TrafficCounters,
};

const LISTENERS: usize = MAX_LISTENERS as usize;
const BACKENDS: usize = MAX_BACKENDS as usize;

/// (VIP, port, proto) → listener id; (VIP, 0, 0) says "this address is a VIP".
#[btf_map]
pub static CLB_LSN_ADDR_V1: HashMap<ListenerKey, ListenerRef, { LISTENERS * 2 }> = HashMap::new();

/// Listener id → settings (persistence, idle timeout, VIP, active schedule).
#[btf_map]
pub static CLB_LSN_V1: Array<ListenerInfo, LISTENERS> = Array::new();

/// Backend id → address and flags (present, accepting new connections).
#[btf_map]
pub static CLB_BE_V1: Array<BackendInfo, BACKENDS> = Array::new();

/// (backend IP, port, proto) → listeners it serves: how the reply path finds the connection.
#[btf_map]
pub static CLB_BE_ADDR_V1: HashMap<BackendAddrKey, BackendAddrInfo, BACKENDS> = HashMap::new();

// Both tables use one LRU list shared by all CPUs, not `BPF_F_NO_COMMON_LRU`: per-CPU lists
// split the capacity between CPUs (the CPU of one busy RX queue would evict at
// max_entries / CPUs), so "1 M entries" would not mean 1 M. Measured with per-CPU lists, new
// flows at 1 M entries were ~20 % faster and established flows no different.

/// Connection table: (client, client port, listener, proto) → backend, last seen, state.
#[btf_map]
pub static CLB_CONN_V1: LruHashMap<ConnKey, ConnValue, { MAX_CONNS as usize }> = LruHashMap::new();

/// Persistence table: (client IP, listener) → backend, last seen.
#[btf_map]
pub static CLB_SESS_V1: LruHashMap<SessionKey, SessionValue, { MAX_SESSIONS as usize }> =
    LruHashMap::new();

/// Weighted round-robin schedules, two halves per listener (user space writes the inactive
/// half, then flips `ListenerInfo::sched`): slot → backend id.
#[btf_map]
pub static CLB_SCHED_V1: Array<u32, { LISTENERS * 2 * SCHED_SLOTS as usize }> = Array::new();

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
pub static CLB_COUNT_V1: PerCpuArray<u64, { NUM_COUNTERS as usize }> = PerCpuArray::new();

/// Per-CPU next-hop cache: destination → egress and MACs, for `NH_TTL_NS` (a FIB lookup is
/// the most expensive step of forwarding an established packet).
#[btf_map]
pub static CLB_NH_V1: PerCpuArray<NextHop, { NH_SLOTS as usize }> = PerCpuArray::new();
