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
    Addr6, BackendAddrInfo, BackendAddrKey, BackendAddrKey6, BackendInfo, ConnKey, ConnKey6,
    ConnValue, GlobalConfig, HalfOpenValue, ListenerInfo, ListenerInfo6, ListenerKey, ListenerKey6,
    NUM_COUNTERS, SessionKey, SessionKey6, SessionValue, SharedState, TrafficCounters,
};

use super::{Dataplane, Decide, DpConfig, DpError, Reader, Scan, SessionTable, TableInfo, Tables};

/// Everything the maps hold.
#[derive(Clone, Debug, Default)]
pub struct MemState {
    pub config: DpConfig,
    pub devices: Vec<u32>,
    pub conns: HashMap<ConnKey, ConnValue>,
    pub half_open: HashMap<ConnKey, HalfOpenValue>,
    pub sessions: HashMap<SessionKey, SessionValue>,
    pub pending: HashMap<SessionKey, SessionValue>,
    pub conns6: HashMap<ConnKey6, ConnValue>,
    pub half_open6: HashMap<ConnKey6, HalfOpenValue>,
    pub sessions6: HashMap<SessionKey6, SessionValue>,
    pub pending6: HashMap<SessionKey6, SessionValue>,
    pub listener_stats: HashMap<u32, TrafficCounters>,
    pub backend_stats: HashMap<u32, TrafficCounters>,
    /// Active connections per backend id (`clb_common::LOAD_MAP`).
    pub active: HashMap<u32, i64>,
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
    fn put_listener_addr6(&mut self, key: ListenerKey6, id: Option<u32>) -> Result<(), DpError> {
        self.write("listener_addr6", |s| {
            put(&mut s.config.listener_addr6, key, id)
        })
    }
    fn put_listener6(&mut self, id: u32, info: &ListenerInfo6) -> Result<(), DpError> {
        let v = (*info != ListenerInfo6::default()).then_some(*info);
        self.write("listeners6", |s| put(&mut s.config.listeners6, id, v))
    }
    fn put_backend6(&mut self, id: u32, addr: &Addr6) -> Result<(), DpError> {
        let v = (*addr != Addr6::default()).then_some(*addr);
        self.write("backends6", |s| put(&mut s.config.backends6, id, v))
    }
    fn put_backend_addr6(
        &mut self,
        key: BackendAddrKey6,
        v: Option<&BackendAddrInfo>,
    ) -> Result<(), DpError> {
        self.write("backend_addr6", |s| {
            put(&mut s.config.backend_addr6, key, v.copied())
        })
    }
    fn put_denied6(&mut self, addr: Addr6, reason: Option<u32>) -> Result<(), DpError> {
        self.write("denied6", |s| put(&mut s.config.denied6, addr, reason))
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

/// `Tables` over the in-memory tables: `$(method, field, key, value)` per table.
macro_rules! mem_tables {
    ($($scan:ident $prune:ident $field:ident $k:ty, $v:ty;)* | $($sscan:ident $sprune:ident $verified:ident $pending:ident $sk:ty;)*) => {
        impl Tables for MemDataplane {
            $(
                fn $scan(&self, f: &mut Scan<'_, $k, $v>) -> Result<(), DpError> {
                    let m = self.state().$field.clone();
                    scan_map(&m, f);
                    Ok(())
                }
                fn $prune(
                    &self,
                    _pause: std::time::Duration,
                    decide: &mut Decide<'_, $k, $v>,
                ) -> Result<(u64, u64), DpError> {
                    Ok(prune_map(&mut self.state().$field, decide))
                }
            )*
            $(
                fn $sscan(
                    &self,
                    table: SessionTable,
                    f: &mut Scan<'_, $sk, SessionValue>,
                ) -> Result<(), DpError> {
                    let m = match table {
                        SessionTable::Verified => self.state().$verified.clone(),
                        SessionTable::Pending => self.state().$pending.clone(),
                    };
                    scan_map(&m, f);
                    Ok(())
                }
                fn $sprune(
                    &self,
                    table: SessionTable,
                    _pause: std::time::Duration,
                    decide: &mut Decide<'_, $sk, SessionValue>,
                ) -> Result<(u64, u64), DpError> {
                    let mut s = self.state();
                    let m = match table {
                        SessionTable::Verified => &mut s.$verified,
                        SessionTable::Pending => &mut s.$pending,
                    };
                    Ok(prune_map(m, decide))
                }
            )*
            fn actives(&self) -> Vec<i64> {
                let s = self.state();
                let mut v = vec![0; clb_common::MAX_BACKENDS as usize];
                for (id, n) in &s.active {
                    if let Some(slot) = v.get_mut(*id as usize) {
                        *slot = *n;
                    }
                }
                v
            }
            fn add_active(&self, id: u32, delta: i64) {
                *self.state().active.entry(id).or_default() += delta;
            }
        }
    };
}

mem_tables!(
    scan_conns prune_conns conns ConnKey, ConnValue;
    scan_half_open prune_half_open half_open ConnKey, HalfOpenValue;
    scan_conns6 prune_conns6 conns6 ConnKey6, ConnValue;
    scan_half_open6 prune_half_open6 half_open6 ConnKey6, HalfOpenValue;
    |
    scan_sessions prune_sessions sessions pending SessionKey;
    scan_sessions6 prune_sessions6 sessions6 pending6 SessionKey6;
);

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
    fn table_info(&self) -> Result<[TableInfo; 8], DpError> {
        Ok([TableInfo::default(); 8])
    }
}
