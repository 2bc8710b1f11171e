//! Every map of the datapath, one purpose line each. Names and layouts come from `clb-common`
//! (the `_V1` suffix is the layout version). None is declared pinned here: the daemon pins
//! them under its bpffs directory by name, the packet tests load them unpinned.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use clb_common::{
    BackendAddrInfo, BackendAddrKey, BackendInfo, ConnKey, ConnValue, ListenerInfo, ListenerKey,
    ListenerRef, MAX_BACKENDS, MAX_CONNS, MAX_DEVICES, MAX_LISTENERS, MAX_SESSIONS, NUM_COUNTERS,
    SCHED_SLOTS, SessionKey, SessionValue, TrafficCounters,
};

/// (VIP, port, proto) → listener id; (VIP, 0, 0) says "this address is a VIP".
#[map]
pub static CLB_LSN_ADDR_V1: HashMap<ListenerKey, ListenerRef> =
    HashMap::with_max_entries(MAX_LISTENERS * 2, 0);

/// Listener id → settings (persistence, idle timeout, VIP, active schedule).
#[map]
pub static CLB_LSN_V1: Array<ListenerInfo> = Array::with_max_entries(MAX_LISTENERS, 0);

/// Backend id → address and flags (present, accepting new connections).
#[map]
pub static CLB_BE_V1: Array<BackendInfo> = Array::with_max_entries(MAX_BACKENDS, 0);

/// (backend IP, port, proto) → listeners it serves: how the reply path finds the connection.
#[map]
pub static CLB_BE_ADDR_V1: HashMap<BackendAddrKey, BackendAddrInfo> =
    HashMap::with_max_entries(MAX_BACKENDS, 0);

/// Connection table: (client, client port, listener, proto) → backend, last seen, state.
#[map]
pub static CLB_CONN_V1: LruHashMap<ConnKey, ConnValue> = LruHashMap::with_max_entries(MAX_CONNS, 0);

/// Persistence table: (client IP, listener) → backend, last seen.
#[map]
pub static CLB_SESS_V1: LruHashMap<SessionKey, SessionValue> =
    LruHashMap::with_max_entries(MAX_SESSIONS, 0);

/// Weighted round-robin schedules, two halves per listener (user space writes the inactive
/// half, then flips `ListenerInfo::sched`): slot → backend id.
#[map]
pub static CLB_SCHED_V1: Array<u32> = Array::with_max_entries(MAX_LISTENERS * 2 * SCHED_SLOTS, 0);

/// Listener id → round-robin cursor, shared by all CPUs (atomic fetch-and-add) so consecutive
/// new connections take consecutive slots.
#[map]
pub static CLB_RR_V1: Array<u64> = Array::with_max_entries(MAX_LISTENERS, 0);

/// ifindex → interface, the devmap redirects go through (filled by user space).
#[map]
pub static CLB_DEVS_V1: DevMapHash = DevMapHash::with_max_entries(MAX_DEVICES, 0);

/// Per-CPU traffic counters per listener id.
#[map]
pub static CLB_LSN_STAT_V1: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(MAX_LISTENERS, 0);

/// Per-CPU traffic counters per backend id.
#[map]
pub static CLB_BE_STAT_V1: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Per-CPU counters: verdicts, events, drops by reason (`clb_common::counter`).
#[map]
pub static CLB_COUNT_V1: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);
