//! The seam between clb's authoritative state and the kernel.
//!
//! - [`DpConfig`]: what the configuration maps hold (listeners, backends, schedules, denied
//!   sources, global settings), as one value the control plane computes and diffs.
//! - [`Dataplane`]: the writer, one map entry at a time, used only by the balancer inside a
//!   change transaction.
//! - [`Reader`]: counters and the flow tables, read through handles of its own, so API reads,
//!   metrics and the sweeper never wait for the writer (nor make it wait).
//!
//! [`aya::AyaDataplane`] / [`aya::AyaReader`] do it to the real maps (pinned or not);
//! [`mem::MemDataplane`] keeps the same maps in memory (with fault injection) for unit and
//! property tests of the control logic.

pub mod aya;
pub mod batch;
pub mod loader;
pub mod loads;
pub mod lock;
pub mod mem;
pub mod slots;
pub mod sweep;

use std::{collections::BTreeMap, sync::Arc};

use clb_common::{
    Addr6, BackendAddrInfo, BackendAddrKey, BackendAddrKey6, BackendInfo, ConnKey, ConnKey6,
    ConnValue, GlobalConfig, HalfOpenValue, ListenerInfo, ListenerInfo6, ListenerKey, ListenerKey6,
    NUM_COUNTERS, SessionKey, SessionKey6, SessionValue, SharedState, TrafficCounters,
};

/// A dataplane operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DpError {
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: ::aya::maps::MapError,
    },
    #[error("map {map}: {source}")]
    Io {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("map {0} is missing from the eBPF object")]
    Missing(&'static str),
    #[error("devmap: {0}")]
    Device(String),
    /// Injected by [`mem::MemDataplane`] (tests).
    #[error("injected failure writing {0}")]
    Injected(&'static str),
}

/// The contents of the datapath's configuration maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DpConfig {
    /// (VIP, port, proto) → listener id, including the VIP markers (VIP, 0, 0) → 0.
    pub listener_addr: BTreeMap<ListenerKey, u32>,
    /// Listener id → settings (only ids in use).
    pub listeners: BTreeMap<u32, ListenerInfo>,
    /// Backend id → address and flags (only present backends).
    pub backends: BTreeMap<u32, BackendInfo>,
    /// Backend address → listeners its replies may belong to.
    pub backend_addr: BTreeMap<BackendAddrKey, BackendAddrInfo>,
    /// Listener id → its schedule (backend ids; the inner map's length slot is implied).
    pub schedules: BTreeMap<u32, Arc<Vec<u32>>>,
    /// Source address → `DENY_*` reason.
    pub denied: BTreeMap<u32, u32>,
    pub global: GlobalConfig,
    /// IPv6: (VIP, port, proto) → listener id, with the VIP markers.
    pub listener_addr6: BTreeMap<ListenerKey6, u32>,
    /// IPv6 listeners' VIP and persistence mask, by listener id.
    pub listeners6: BTreeMap<u32, ListenerInfo6>,
    /// IPv6 backends' addresses, by backend id.
    pub backends6: BTreeMap<u32, Addr6>,
    pub backend_addr6: BTreeMap<BackendAddrKey6, BackendAddrInfo>,
    pub denied6: BTreeMap<Addr6, u32>,
}

/// Which half-open-sized or persistence table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionTable {
    /// Clients with a verified flow.
    Verified,
    /// Clients seen only in unverified flows.
    Pending,
}

/// Writes the configuration maps. Every method is one map operation; absent keys are fine to
/// delete.
pub trait Dataplane: Send {
    /// Reads back what the configuration maps hold (a restart over pinned maps).
    fn read(&self) -> Result<DpConfig, DpError>;
    /// Puts (`Some`) or deletes (`None`) a listener address.
    fn put_listener_addr(&mut self, key: ListenerKey, id: Option<u32>) -> Result<(), DpError>;
    fn put_listener(&mut self, id: u32, info: &ListenerInfo) -> Result<(), DpError>;
    fn put_backend(&mut self, id: u32, info: &BackendInfo) -> Result<(), DpError>;
    fn put_backend_addr(
        &mut self,
        key: BackendAddrKey,
        v: Option<&BackendAddrInfo>,
    ) -> Result<(), DpError>;
    /// Replaces listener `id`'s schedule whole (atomically for the datapath), or removes it.
    fn put_schedule(&mut self, id: u32, slots: Option<&[u32]>) -> Result<(), DpError>;
    fn put_denied(&mut self, addr: u32, reason: Option<u32>) -> Result<(), DpError>;
    fn put_listener_addr6(&mut self, key: ListenerKey6, id: Option<u32>) -> Result<(), DpError>;
    fn put_listener6(&mut self, id: u32, info: &ListenerInfo6) -> Result<(), DpError>;
    fn put_backend6(&mut self, id: u32, addr: &Addr6) -> Result<(), DpError>;
    fn put_backend_addr6(
        &mut self,
        key: BackendAddrKey6,
        v: Option<&BackendAddrInfo>,
    ) -> Result<(), DpError>;
    fn put_denied6(&mut self, addr: Addr6, reason: Option<u32>) -> Result<(), DpError>;
    fn put_global(&mut self, g: &GlobalConfig) -> Result<(), DpError>;
    /// Registers an interface the datapath may redirect to.
    fn put_device(&mut self, ifindex: u32) -> Result<(), DpError>;
    /// The flow tables, for purging the entries of removed listeners and backends.
    fn tables(&mut self) -> &mut dyn Tables;
}

/// Picks, from one batch of a table (keys, values), the keys to delete.
pub type Decide<'a, K, V> = dyn FnMut(&[K], &[V], &mut Vec<K>) + 'a;

/// Entries read or deleted per batch syscall when walking a table.
pub const TABLE_BATCH: usize = 8192;

/// Entries per batch syscall of the sweeper's walks: small, so that no single syscall holds
/// a CPU for long (a batch is not preempted part way; 1024 entries are ~0.3 ms of kernel work).
pub const SWEEP_BATCH: usize = 1024;

/// A flow-table key: which listener its entry belongs to.
pub trait FlowKey: Copy + Send + Sync + 'static {
    fn listener(&self) -> u32;
}
impl FlowKey for ConnKey {
    fn listener(&self) -> u32 {
        u32::from(self.listener)
    }
}
impl FlowKey for ConnKey6 {
    fn listener(&self) -> u32 {
        u32::from(self.listener)
    }
}
impl FlowKey for SessionKey {
    fn listener(&self) -> u32 {
        u32::from(self.listener)
    }
}
impl FlowKey for SessionKey6 {
    fn listener(&self) -> u32 {
        u32::from(self.listener)
    }
}

/// Walks table `$t` of `Tables` with callback `f`.
type Scan<'a, K, V> = dyn FnMut(&[K], &[V]) -> bool + 'a;

/// The flow tables, IPv4 and IPv6 (four each): walked and pruned by the sweeper, listed by
/// the API, purged by the control plane. Each walk is in batches; `f` returning false stops it.
pub trait Tables: Send + Sync {
    fn scan_conns(&self, f: &mut Scan<'_, ConnKey, ConnValue>) -> Result<(), DpError>;
    fn scan_half_open(&self, f: &mut Scan<'_, ConnKey, HalfOpenValue>) -> Result<(), DpError>;
    fn scan_sessions(
        &self,
        table: SessionTable,
        f: &mut Scan<'_, SessionKey, SessionValue>,
    ) -> Result<(), DpError>;
    /// Walks the connection table; `decide` picks the keys of a batch to delete, which are
    /// deleted before the next batch is read; then waits `pause` (pacing). Returns
    /// (scanned, deleted).
    fn prune_conns(
        &self,
        pause: std::time::Duration,
        decide: &mut Decide<'_, ConnKey, ConnValue>,
    ) -> Result<(u64, u64), DpError>;
    fn prune_half_open(
        &self,
        pause: std::time::Duration,
        decide: &mut Decide<'_, ConnKey, HalfOpenValue>,
    ) -> Result<(u64, u64), DpError>;
    fn prune_sessions(
        &self,
        table: SessionTable,
        pause: std::time::Duration,
        decide: &mut Decide<'_, SessionKey, SessionValue>,
    ) -> Result<(u64, u64), DpError>;

    fn scan_conns6(&self, f: &mut Scan<'_, ConnKey6, ConnValue>) -> Result<(), DpError>;
    fn scan_half_open6(&self, f: &mut Scan<'_, ConnKey6, HalfOpenValue>) -> Result<(), DpError>;
    fn scan_sessions6(
        &self,
        table: SessionTable,
        f: &mut Scan<'_, SessionKey6, SessionValue>,
    ) -> Result<(), DpError>;
    fn prune_conns6(
        &self,
        pause: std::time::Duration,
        decide: &mut Decide<'_, ConnKey6, ConnValue>,
    ) -> Result<(u64, u64), DpError>;
    fn prune_half_open6(
        &self,
        pause: std::time::Duration,
        decide: &mut Decide<'_, ConnKey6, HalfOpenValue>,
    ) -> Result<(u64, u64), DpError>;
    fn prune_sessions6(
        &self,
        table: SessionTable,
        pause: std::time::Duration,
        decide: &mut Decide<'_, SessionKey6, SessionValue>,
    ) -> Result<(u64, u64), DpError>;

    /// Active connections of every backend, by id (`clb_common::BackendLoad`; a count being
    /// corrected may be transiently negative).
    fn actives(&self) -> Vec<i64>;
    /// Adds `delta` to backend `id`'s active count, atomically with the datapath's own adds.
    fn add_active(&self, id: u32, delta: i64);
}

/// Size and memory of one table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TableInfo {
    /// Capacity (max entries).
    pub capacity: u32,
    /// Kernel memory charged to the map, bytes.
    pub memory_bytes: u64,
}

/// Reads counters, tables and shared state without the writer. Cheap to share.
pub trait Reader: Tables {
    fn listener_stats(&self, id: u32) -> Result<TrafficCounters, DpError>;
    fn backend_stats(&self, id: u32) -> Result<TrafficCounters, DpError>;
    fn counters(&self) -> Result<[u64; NUM_COUNTERS as usize], DpError>;
    fn shared_state(&self) -> Result<SharedState, DpError>;
    /// (connections, half-open, sessions, pending sessions), then the same for IPv6.
    fn table_info(&self) -> Result<[TableInfo; 8], DpError>;
}

/// Names of the tables `Reader::table_info` describes, in its order.
pub const TABLE_NAMES: [&str; 8] = [
    "connections",
    "half_open",
    "sessions",
    "pending_sessions",
    "connections6",
    "half_open6",
    "sessions6",
    "pending_sessions6",
];

/// A `Decide` that deletes the entries for which `gone(listener id, backend id)`.
fn pick<'a, K: FlowKey, V>(
    gone: &'a dyn Fn(u32, u32) -> bool,
    backend: impl Fn(&V) -> u32 + 'a,
) -> impl FnMut(&[K], &[V], &mut Vec<K>) + 'a {
    move |ks, vs, dead| {
        for (k, v) in ks.iter().zip(vs) {
            if gone(k.listener(), backend(v)) {
                dead.push(*k);
            }
        }
    }
}

/// A `Decide` over connection entries that deletes those for which `gone(listener id, backend
/// id)` and counts the open ones among them per backend in `open`.
fn pick_conns<'a, K: FlowKey>(
    gone: &'a dyn Fn(u32, u32) -> bool,
    open: &'a mut BTreeMap<u32, i64>,
) -> impl FnMut(&[K], &[ConnValue], &mut Vec<K>) + 'a {
    move |ks, vs, dead| {
        for (k, v) in ks.iter().zip(vs) {
            if gone(k.listener(), v.backend) {
                dead.push(*k);
                if v.state == clb_common::CONN_OPEN {
                    *open.entry(v.backend).or_default() += 1;
                }
            }
        }
    }
}

/// Deletes the connection and half-open entries (both families) for which
/// `gone(listener id, backend id)`; the open connections among them leave their backend's
/// active count.
fn purge_flows(t: &dyn Tables, gone: &dyn Fn(u32, u32) -> bool) -> Result<u64, DpError> {
    let zero = std::time::Duration::ZERO;
    let half = |v: &HalfOpenValue| u32::from(v.backend);
    let mut open: BTreeMap<u32, i64> = BTreeMap::new();
    let mut n = t.prune_conns(zero, &mut pick_conns(gone, &mut open))?.1;
    n += t.prune_conns6(zero, &mut pick_conns(gone, &mut open))?.1;
    n += t.prune_half_open(zero, &mut pick(gone, half))?.1;
    n += t.prune_half_open6(zero, &mut pick(gone, half))?.1;
    for (b, k) in open {
        t.add_active(b, -k);
    }
    Ok(n)
}

/// Deletes every flow-table entry (both families) for which `gone(listener id, backend id)`.
pub fn purge(t: &dyn Tables, gone: &dyn Fn(u32, u32) -> bool) -> Result<u64, DpError> {
    let zero = std::time::Duration::ZERO;
    let sess = |v: &SessionValue| v.backend;
    let mut n = purge_flows(t, gone)?;
    for table in [SessionTable::Verified, SessionTable::Pending] {
        n += t.prune_sessions(table, zero, &mut pick(gone, sess))?.1;
        n += t.prune_sessions6(table, zero, &mut pick(gone, sess))?.1;
    }
    Ok(n)
}

/// Deletes the persistence entries (verified and pending, both families) of listener id
/// `listener` whose client `forget` selects (the client as its entry holds it: masked by the
/// listener's persistence mask). Returns how many were deleted.
pub fn forget_sessions(
    t: &dyn Tables,
    listener: u32,
    forget: &dyn Fn(std::net::IpAddr) -> bool,
) -> Result<u64, DpError> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let zero = std::time::Duration::ZERO;
    // A client can have an entry in both tables (a verified one and a pending one not yet
    // swept): the answer counts clients, not entries.
    let mut gone = std::collections::HashSet::new();
    for table in [SessionTable::Verified, SessionTable::Pending] {
        t.prune_sessions(table, zero, &mut |ks: &[SessionKey], _, dead| {
            for k in ks.iter().filter(|k| u32::from(k.listener) == listener) {
                let ip = IpAddr::V4(Ipv4Addr::from(clb_common::ip_from_be(k.client)));
                if forget(ip) {
                    gone.insert(ip);
                    dead.push(*k);
                }
            }
        })?;
        t.prune_sessions6(table, zero, &mut |ks: &[SessionKey6], _, dead| {
            for k in ks.iter().filter(|k| u32::from(k.listener) == listener) {
                let ip = IpAddr::V6(Ipv6Addr::from(clb_common::ip6_from_be(k.client)));
                if forget(ip) {
                    gone.insert(ip);
                    dead.push(*k);
                }
            }
        })?;
    }
    Ok(gone.len() as u64)
}

/// Deletes the connection-table entries (verified and half-open, both families) naming one of
/// `backends`: a drained backend's remaining connections are cut.
pub fn cut_connections(t: &dyn Tables, backends: &dyn Fn(u32) -> bool) -> Result<u64, DpError> {
    purge_flows(t, &|_, b| backends(b))
}
