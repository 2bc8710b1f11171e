//! The datapath's maps kept in memory, for unit and property tests of the control logic. The
//! writer ([`MemDataplane`]) and any number of readers share one state; a write can be made to
//! fail on purpose ([`MemDataplane::fail_after`]) to test rollback.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicI64, Ordering},
    },
};

use clb_common::{
    BackendAddrInfo, BackendAddrKey, BackendInfo, ConnKey, ConnValue, GlobalConfig, HalfOpenValue,
    ListenerInfo, ListenerKey, NUM_COUNTERS, SessionKey, SessionValue, SharedState,
    TrafficCounters,
};

use super::{Dataplane, Decide, DpConfig, DpError, Reader, SessionTable, TableInfo, Tables};

/// Everything the maps hold.
#[derive(Clone, Debug, Default)]
pub struct MemState {
    pub config: DpConfig,
    pub devices: Vec<u32>,
    pub conns: HashMap<ConnKey, ConnValue>,
    pub half_open: HashMap<ConnKey, HalfOpenValue>,
    pub sessions: HashMap<SessionKey, SessionValue>,
    pub pending: HashMap<SessionKey, SessionValue>,
    pub listener_stats: HashMap<u32, TrafficCounters>,
    pub backend_stats: HashMap<u32, TrafficCounters>,
    /// Map writes so far (schedules count once per replacement).
    pub writes: usize,
}

/// An in-memory datapath. Clones share the state.
#[derive(Clone)]
pub struct MemDataplane {
    state: Arc<Mutex<MemState>>,
    /// Writes left before one fails (negative: never).
    fail_in: Arc<AtomicI64>,
}

impl std::fmt::Debug for MemDataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemDataplane").finish_non_exhaustive()
    }
}

impl Default for MemDataplane {
    fn default() -> Self {
        Self::new()
    }
}

impl MemDataplane {
    pub fn new() -> Self {
        Self {
            state: Arc::default(),
            fail_in: Arc::new(AtomicI64::new(-1)),
        }
    }

    /// The state (tests inspect and seed the tables through it).
    pub fn state(&self) -> MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the write after the next `n` fail (`None`: no failure).
    pub fn fail_after(&self, n: Option<u32>) {
        self.fail_in
            .store(n.map_or(-1, i64::from), Ordering::SeqCst);
    }

    fn write(&self, map: &'static str, f: impl FnOnce(&mut MemState)) -> Result<(), DpError> {
        let left = self.fail_in.load(Ordering::SeqCst);
        if left == 0 {
            self.fail_in.store(-1, Ordering::SeqCst);
            return Err(DpError::Injected(map));
        }
        if left > 0 {
            self.fail_in.store(left - 1, Ordering::SeqCst);
        }
        let mut s = self.state();
        s.writes += 1;
        f(&mut s);
        Ok(())
    }

    /// The active schedule of listener `id`, as the datapath would read it.
    pub fn schedule(&self, id: u32) -> Vec<u32> {
        self.state()
            .config
            .schedules
            .get(&id)
            .map(|s| s.to_vec())
            .unwrap_or_default()
    }
}

fn put<K: Ord, V>(m: &mut std::collections::BTreeMap<K, V>, k: K, v: Option<V>) {
    match v {
        Some(v) => {
            m.insert(k, v);
        }
        None => {
            m.remove(&k);
        }
    }
}

impl Dataplane for MemDataplane {
    fn read(&self) -> Result<DpConfig, DpError> {
        Ok(self.state().config.clone())
    }
    fn put_listener_addr(&mut self, key: ListenerKey, id: Option<u32>) -> Result<(), DpError> {
        self.write("listener_addr", |s| {
            put(&mut s.config.listener_addr, key, id)
        })
    }
    fn put_listener(&mut self, id: u32, info: &ListenerInfo) -> Result<(), DpError> {
        let v = (*info != ListenerInfo::default()).then_some(*info);
        self.write("listeners", |s| put(&mut s.config.listeners, id, v))
    }
    fn put_backend(&mut self, id: u32, info: &BackendInfo) -> Result<(), DpError> {
        let v = (*info != BackendInfo::default()).then_some(*info);
        self.write("backends", |s| put(&mut s.config.backends, id, v))
    }
    fn put_backend_addr(
        &mut self,
        key: BackendAddrKey,
        v: Option<&BackendAddrInfo>,
    ) -> Result<(), DpError> {
        self.write("backend_addr", |s| {
            put(&mut s.config.backend_addr, key, v.copied())
        })
    }
    fn put_schedule(&mut self, id: u32, slots: Option<&[u32]>) -> Result<(), DpError> {
        self.write("schedules", |s| {
            put(
                &mut s.config.schedules,
                id,
                slots.map(|x| Arc::new(x.to_vec())),
            )
        })
    }
    fn put_denied(&mut self, addr: u32, reason: Option<u32>) -> Result<(), DpError> {
        self.write("denied", |s| put(&mut s.config.denied, addr, reason))
    }
    fn put_global(&mut self, g: &GlobalConfig) -> Result<(), DpError> {
        self.write("global", |s| s.config.global = *g)
    }
    fn put_device(&mut self, ifindex: u32) -> Result<(), DpError> {
        self.write("devices", |s| s.devices.push(ifindex))
    }
    fn tables(&mut self) -> &mut dyn Tables {
        self
    }
}

fn prune_map<K: Copy + Eq + std::hash::Hash, V: Copy>(
    m: &mut HashMap<K, V>,
    decide: &mut Decide<'_, K, V>,
) -> (u64, u64) {
    let (k, v): (Vec<K>, Vec<V>) = m.iter().map(|(k, v)| (*k, *v)).unzip();
    let mut dead = Vec::new();
    decide(&k, &v, &mut dead);
    let gone = dead.iter().filter(|k| m.remove(k).is_some()).count();
    (k.len() as u64, gone as u64)
}

fn scan_map<K: Copy, V: Copy>(m: &HashMap<K, V>, f: &mut dyn FnMut(&[K], &[V]) -> bool) {
    let (k, v): (Vec<K>, Vec<V>) = m.iter().map(|(k, v)| (*k, *v)).unzip();
    if !k.is_empty() {
        f(&k, &v);
    }
}

impl Tables for MemDataplane {
    fn scan_conns(
        &self,
        f: &mut dyn FnMut(&[ConnKey], &[ConnValue]) -> bool,
    ) -> Result<(), DpError> {
        let m = self.state().conns.clone();
        scan_map(&m, f);
        Ok(())
    }
    fn scan_half_open(
        &self,
        f: &mut dyn FnMut(&[ConnKey], &[HalfOpenValue]) -> bool,
    ) -> Result<(), DpError> {
        let m = self.state().half_open.clone();
        scan_map(&m, f);
        Ok(())
    }
    fn scan_sessions(
        &self,
        table: SessionTable,
        f: &mut dyn FnMut(&[SessionKey], &[SessionValue]) -> bool,
    ) -> Result<(), DpError> {
        let m = match table {
            SessionTable::Verified => self.state().sessions.clone(),
            SessionTable::Pending => self.state().pending.clone(),
        };
        scan_map(&m, f);
        Ok(())
    }
    fn prune_conns(
        &self,
        _pause: std::time::Duration,
        decide: &mut Decide<'_, ConnKey, ConnValue>,
    ) -> Result<(u64, u64), DpError> {
        Ok(prune_map(&mut self.state().conns, decide))
    }
    fn prune_half_open(
        &self,
        _pause: std::time::Duration,
        decide: &mut Decide<'_, ConnKey, HalfOpenValue>,
    ) -> Result<(u64, u64), DpError> {
        Ok(prune_map(&mut self.state().half_open, decide))
    }
    fn prune_sessions(
        &self,
        table: SessionTable,
        _pause: std::time::Duration,
        decide: &mut Decide<'_, SessionKey, SessionValue>,
    ) -> Result<(u64, u64), DpError> {
        let mut s = self.state();
        let m = match table {
            SessionTable::Verified => &mut s.sessions,
            SessionTable::Pending => &mut s.pending,
        };
        Ok(prune_map(m, decide))
    }
}

impl Reader for MemDataplane {
    fn listener_stats(&self, id: u32) -> Result<TrafficCounters, DpError> {
        Ok(self
            .state()
            .listener_stats
            .get(&id)
            .copied()
            .unwrap_or_default())
    }
    fn backend_stats(&self, id: u32) -> Result<TrafficCounters, DpError> {
        Ok(self
            .state()
            .backend_stats
            .get(&id)
            .copied()
            .unwrap_or_default())
    }
    fn counters(&self) -> Result<[u64; NUM_COUNTERS as usize], DpError> {
        Ok([0; NUM_COUNTERS as usize])
    }
    fn shared_state(&self) -> Result<SharedState, DpError> {
        Ok(SharedState::default())
    }
    fn table_info(&self) -> Result<[TableInfo; 4], DpError> {
        Ok([TableInfo::default(); 4])
    }
}
