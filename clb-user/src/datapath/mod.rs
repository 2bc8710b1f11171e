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
pub mod lock;
pub mod mem;
pub mod sweep;

use std::{collections::BTreeMap, sync::Arc};

use clb_common::{
    BackendAddrInfo, BackendAddrKey, BackendInfo, ConnKey, ConnValue, GlobalConfig, HalfOpenValue,
    ListenerInfo, ListenerKey, NUM_COUNTERS, SessionKey, SessionValue, SharedState,
    TrafficCounters,
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

/// The four flow tables: walked and pruned by the sweeper, listed by the API, purged by the
/// control plane. Each walk is in batches; `f` returning false stops it.
pub trait Tables: Send + Sync {
    fn scan_conns(
        &self,
        f: &mut dyn FnMut(&[ConnKey], &[ConnValue]) -> bool,
    ) -> Result<(), DpError>;
    fn scan_half_open(
        &self,
        f: &mut dyn FnMut(&[ConnKey], &[HalfOpenValue]) -> bool,
    ) -> Result<(), DpError>;
    fn scan_sessions(
        &self,
        table: SessionTable,
        f: &mut dyn FnMut(&[SessionKey], &[SessionValue]) -> bool,
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
    /// (connections, half-open, sessions, pending sessions).
    fn table_info(&self) -> Result<[TableInfo; 4], DpError>;
}

/// Deletes every flow-table entry for which `gone(listener id, backend id)`.
pub fn purge(t: &dyn Tables, gone: &dyn Fn(u32, u32) -> bool) -> Result<u64, DpError> {
    let zero = std::time::Duration::ZERO;
    let mut n = 0;
    n += t
        .prune_conns(zero, &mut |ks, vs, dead| {
            for (k, v) in ks.iter().zip(vs) {
                if gone(u32::from(k.listener), v.backend) {
                    dead.push(*k);
                }
            }
        })?
        .1;
    n += t
        .prune_half_open(zero, &mut |ks, vs, dead| {
            for (k, v) in ks.iter().zip(vs) {
                if gone(u32::from(k.listener), v.backend) {
                    dead.push(*k);
                }
            }
        })?
        .1;
    for table in [SessionTable::Verified, SessionTable::Pending] {
        n += t
            .prune_sessions(table, zero, &mut |ks, vs, dead| {
                for (k, v) in ks.iter().zip(vs) {
                    if gone(u32::from(k.listener), v.backend) {
                        dead.push(*k);
                    }
                }
            })?
            .1;
    }
    Ok(n)
}

/// Deletes the connection-table entries (verified and half-open) naming one of `backends`: a
/// drained backend's remaining connections are cut.
pub fn cut_connections(t: &dyn Tables, backends: &dyn Fn(u32) -> bool) -> Result<u64, DpError> {
    let zero = std::time::Duration::ZERO;
    let a = t
        .prune_conns(zero, &mut |ks, vs, dead| {
            for (k, v) in ks.iter().zip(vs) {
                if backends(v.backend) {
                    dead.push(*k);
                }
            }
        })?
        .1;
    let b = t
        .prune_half_open(zero, &mut |ks, vs, dead| {
            for (k, v) in ks.iter().zip(vs) {
                if backends(v.backend) {
                    dead.push(*k);
                }
            }
        })?
        .1;
    Ok(a + b)
}
