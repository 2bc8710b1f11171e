//! The seam between clb's authoritative state and the kernel maps.
//!
//! [`Dataplane`] is everything the control plane does to the datapath's maps. [`AyaDataplane`]
//! does it to the real maps (pinned or not); [`MemDataplane`] keeps the same maps in memory so
//! the control logic can be unit-tested without a kernel.

use std::{
    collections::{BTreeMap, HashMap},
    os::fd::AsFd,
};

use aya::{
    Ebpf,
    maps::{Array, DevMapHash, HashMap as AyaHashMap, IterableMap, MapData, MapError, PerCpuArray},
};
use clb_common::{
    BACKEND_ADDR_MAP, BACKEND_F_PRESENT, BACKEND_MAP, BACKEND_STATS_MAP, BackendAddrInfo,
    BackendAddrKey, BackendInfo, CONN_MAP, COUNTER_MAP, CURSOR_MAP, ConnKey, ConnValue, DEVICE_MAP,
    LISTENER_ADDR_MAP, LISTENER_MAP, LISTENER_STATS_MAP, ListenerInfo, ListenerKey, ListenerRef,
    MAX_BACKENDS, NUM_COUNTERS, SCHED_MAP, SCHED_SLOTS, SESSION_MAP, SessionKey, SessionValue,
    TrafficCounters,
};

use crate::batch;

/// A dataplane operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DpError {
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
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
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DpError {
    move |source| DpError::Map { map, source }
}

/// Picks, from one batch of a table (keys, values), the keys to delete.
pub type Decide<'a, K, V> = dyn FnMut(&[K], &[V], &mut Vec<K>) + 'a;

/// Entries read or deleted per batch syscall when walking the connection/session tables.
pub const TABLE_BATCH: usize = 8192;

/// The connection and persistence tables: walked and pruned by the sweeper, listed by the API.
pub trait Tables {
    /// Walks the connection table in batches until `f` returns false.
    fn scan_conns(
        &self,
        f: &mut dyn FnMut(&[ConnKey], &[ConnValue]) -> bool,
    ) -> Result<(), DpError>;
    fn del_conns(&mut self, keys: &[ConnKey]) -> Result<usize, DpError>;
    /// Walks the persistence table in batches until `f` returns false.
    fn scan_sessions(
        &self,
        f: &mut dyn FnMut(&[SessionKey], &[SessionValue]) -> bool,
    ) -> Result<(), DpError>;
    fn del_sessions(&mut self, keys: &[SessionKey]) -> Result<usize, DpError>;
    /// Walks the connection table in batches; `decide` pushes the keys of a batch to delete,
    /// which are deleted before the next batch is read, then waits `pause` (pacing, so the
    /// walk does not compete with the datapath flat out). Returns (scanned, deleted).
    fn prune_conns(
        &mut self,
        pause: std::time::Duration,
        decide: &mut Decide<'_, ConnKey, ConnValue>,
    ) -> Result<(u64, u64), DpError>;
    /// [`Tables::prune_conns`] for the persistence table.
    fn prune_sessions(
        &mut self,
        pause: std::time::Duration,
        decide: &mut Decide<'_, SessionKey, SessionValue>,
    ) -> Result<(u64, u64), DpError>;
    /// One connection entry.
    fn get_conn(&self, key: &ConnKey) -> Result<Option<ConnValue>, DpError>;
    /// One persistence entry.
    fn get_session(&self, key: &SessionKey) -> Result<Option<SessionValue>, DpError>;
}

/// What the control plane does to the datapath.
pub trait Dataplane: Tables {
    fn put_listener_addr(&mut self, key: ListenerKey, id: u32) -> Result<(), DpError>;
    fn del_listener_addr(&mut self, key: &ListenerKey) -> Result<(), DpError>;
    fn listener_addrs(&self) -> Result<Vec<(ListenerKey, u32)>, DpError>;

    fn put_listener(&mut self, id: u32, info: &ListenerInfo) -> Result<(), DpError>;
    fn listener(&self, id: u32) -> Result<ListenerInfo, DpError>;

    fn put_backend(&mut self, id: u32, info: &BackendInfo) -> Result<(), DpError>;
    /// Every backend slot with `BACKEND_F_PRESENT` set.
    fn backends(&self) -> Result<Vec<(u32, BackendInfo)>, DpError>;

    fn put_backend_addr(&mut self, key: BackendAddrKey, v: &BackendAddrInfo)
    -> Result<(), DpError>;
    fn del_backend_addr(&mut self, key: &BackendAddrKey) -> Result<(), DpError>;

    /// Writes `slots[i]` into slot `offset + i` of listener `id`'s schedule half `half`.
    fn put_sched(&mut self, id: u32, half: u32, offset: u32, slots: &[u32]) -> Result<(), DpError>;

    fn put_device(&mut self, ifindex: u32) -> Result<(), DpError>;

    fn listener_stats(&self, id: u32) -> Result<TrafficCounters, DpError>;
    fn backend_stats(&self, id: u32) -> Result<TrafficCounters, DpError>;
    fn counters(&self) -> Result<[u64; NUM_COUNTERS as usize], DpError>;
}

fn sched_index(id: u32, half: u32, slot: u32) -> u32 {
    id * 2 * SCHED_SLOTS + half * SCHED_SLOTS + slot
}

/// The real maps of a loaded program.
pub struct AyaDataplane {
    listener_addr: AyaHashMap<MapData, ListenerKey, ListenerRef>,
    listeners: Array<MapData, ListenerInfo>,
    backends: Array<MapData, BackendInfo>,
    backend_addr: AyaHashMap<MapData, BackendAddrKey, BackendAddrInfo>,
    tables: AyaTables,
    sched: Array<MapData, u32>,
    devices: DevMapHash<MapData>,
    listener_stats: PerCpuArray<MapData, TrafficCounters>,
    backend_stats: PerCpuArray<MapData, TrafficCounters>,
    counters: PerCpuArray<MapData, u64>,
    /// Kept so the cursor map stays open with the others (the datapath owns its contents).
    _cursors: aya::maps::Map,
}

macro_rules! take {
    ($ebpf:expr, $name:expr) => {{
        let m = $ebpf.take_map($name).ok_or(DpError::Missing($name))?;
        m.try_into().map_err(map_err($name))?
    }};
}

impl AyaDataplane {
    /// Takes the maps out of a loaded program.
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, DpError> {
        Ok(Self {
            listener_addr: take!(ebpf, LISTENER_ADDR_MAP),
            listeners: take!(ebpf, LISTENER_MAP),
            backends: take!(ebpf, BACKEND_MAP),
            backend_addr: take!(ebpf, BACKEND_ADDR_MAP),
            tables: AyaTables {
                conns: take!(ebpf, CONN_MAP),
                sessions: take!(ebpf, SESSION_MAP),
            },
            sched: take!(ebpf, SCHED_MAP),
            devices: take!(ebpf, DEVICE_MAP),
            listener_stats: take!(ebpf, LISTENER_STATS_MAP),
            backend_stats: take!(ebpf, BACKEND_STATS_MAP),
            counters: take!(ebpf, COUNTER_MAP),
            _cursors: ebpf
                .take_map(CURSOR_MAP)
                .ok_or(DpError::Missing(CURSOR_MAP))?,
        })
    }

    /// Inserts a connection entry directly (tests provision established flows this way).
    pub fn put_conn(&mut self, key: ConnKey, v: ConnValue) -> Result<(), DpError> {
        self.tables
            .conns
            .insert(&key, &v, 0)
            .map_err(map_err(CONN_MAP))
    }

    /// Reads one connection entry.
    pub fn conn(&self, key: &ConnKey) -> Result<Option<ConnValue>, DpError> {
        self.get_conn(key)
    }

    /// Inserts a persistence entry directly (tests, benchmarks).
    pub fn put_session(&mut self, key: SessionKey, v: SessionValue) -> Result<(), DpError> {
        self.tables
            .sessions
            .insert(&key, &v, 0)
            .map_err(map_err(SESSION_MAP))
    }

    /// Reads one persistence entry.
    pub fn session(&self, key: &SessionKey) -> Result<Option<SessionValue>, DpError> {
        self.get_session(key)
    }

    /// Writes many connection entries at once (benchmarks, tests).
    pub fn put_conns(&mut self, keys: &[ConnKey], values: &[ConnValue]) -> Result<usize, DpError> {
        batch::update(self.conn_map().fd().as_fd(), keys, values).map_err(|source| DpError::Io {
            map: CONN_MAP,
            source,
        })
    }

    /// Writes many persistence entries at once (benchmarks, tests).
    pub fn put_sessions(
        &mut self,
        keys: &[SessionKey],
        values: &[SessionValue],
    ) -> Result<usize, DpError> {
        batch::update(self.session_map().fd().as_fd(), keys, values).map_err(|source| DpError::Io {
            map: SESSION_MAP,
            source,
        })
    }

    /// The connection map's handle (memory accounting in the benchmarks).
    pub fn conn_map(&self) -> &MapData {
        self.tables.conn_map()
    }

    /// The persistence map's handle.
    pub fn session_map(&self) -> &MapData {
        self.tables.session_map()
    }
}

fn get_or_not_found<T>(r: Result<T, MapError>, map: &'static str) -> Result<Option<T>, DpError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(map_err(map)(e)),
    }
}

fn del_ignore_missing(r: Result<(), MapError>, map: &'static str) -> Result<(), DpError> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(map_err(map)(e)),
    }
}

fn sum_percpu<T: aya::Pod + Default>(
    values: aya::maps::PerCpuValues<T>,
    add: impl Fn(&mut T, &T),
) -> T {
    let mut acc = T::default();
    for v in values.iter() {
        add(&mut acc, v);
    }
    acc
}

impl Tables for AyaDataplane {
    fn prune_conns(
        &mut self,
        pause: std::time::Duration,
        decide: &mut Decide<'_, ConnKey, ConnValue>,
    ) -> Result<(u64, u64), DpError> {
        self.tables.prune_conns(pause, decide)
    }
    fn prune_sessions(
        &mut self,
        pause: std::time::Duration,
        decide: &mut Decide<'_, SessionKey, SessionValue>,
    ) -> Result<(u64, u64), DpError> {
        self.tables.prune_sessions(pause, decide)
    }
    fn get_conn(&self, key: &ConnKey) -> Result<Option<ConnValue>, DpError> {
        self.tables.get_conn(key)
    }
    fn get_session(&self, key: &SessionKey) -> Result<Option<SessionValue>, DpError> {
        self.tables.get_session(key)
    }
    fn scan_conns(
        &self,
        f: &mut dyn FnMut(&[ConnKey], &[ConnValue]) -> bool,
    ) -> Result<(), DpError> {
        self.tables.scan_conns(f)
    }
    fn del_conns(&mut self, keys: &[ConnKey]) -> Result<usize, DpError> {
        self.tables.del_conns(keys)
    }
    fn scan_sessions(
        &self,
        f: &mut dyn FnMut(&[SessionKey], &[SessionValue]) -> bool,
    ) -> Result<(), DpError> {
        self.tables.scan_sessions(f)
    }
    fn del_sessions(&mut self, keys: &[SessionKey]) -> Result<usize, DpError> {
        self.tables.del_sessions(keys)
    }
}

impl Dataplane for AyaDataplane {
    fn put_listener_addr(&mut self, key: ListenerKey, id: u32) -> Result<(), DpError> {
        self.listener_addr
            .insert(&key, &ListenerRef { id }, 0)
            .map_err(map_err(LISTENER_ADDR_MAP))
    }

    fn del_listener_addr(&mut self, key: &ListenerKey) -> Result<(), DpError> {
        del_ignore_missing(self.listener_addr.remove(key), LISTENER_ADDR_MAP)
    }

    fn listener_addrs(&self) -> Result<Vec<(ListenerKey, u32)>, DpError> {
        self.listener_addr
            .iter()
            .map(|r| {
                r.map(|(k, v)| (k, v.id))
                    .map_err(map_err(LISTENER_ADDR_MAP))
            })
            .collect()
    }

    fn put_listener(&mut self, id: u32, info: &ListenerInfo) -> Result<(), DpError> {
        self.listeners
            .set(id, info, 0)
            .map_err(map_err(LISTENER_MAP))
    }

    fn listener(&self, id: u32) -> Result<ListenerInfo, DpError> {
        self.listeners.get(&id, 0).map_err(map_err(LISTENER_MAP))
    }

    fn put_backend(&mut self, id: u32, info: &BackendInfo) -> Result<(), DpError> {
        self.backends.set(id, info, 0).map_err(map_err(BACKEND_MAP))
    }

    fn backends(&self) -> Result<Vec<(u32, BackendInfo)>, DpError> {
        let mut out = Vec::new();
        for id in 0..MAX_BACKENDS {
            let b = self.backends.get(&id, 0).map_err(map_err(BACKEND_MAP))?;
            if b.flags & BACKEND_F_PRESENT != 0 {
                out.push((id, b));
            }
        }
        Ok(out)
    }

    fn put_backend_addr(
        &mut self,
        key: BackendAddrKey,
        v: &BackendAddrInfo,
    ) -> Result<(), DpError> {
        self.backend_addr
            .insert(&key, v, 0)
            .map_err(map_err(BACKEND_ADDR_MAP))
    }

    fn del_backend_addr(&mut self, key: &BackendAddrKey) -> Result<(), DpError> {
        del_ignore_missing(self.backend_addr.remove(key), BACKEND_ADDR_MAP)
    }

    fn put_sched(&mut self, id: u32, half: u32, offset: u32, slots: &[u32]) -> Result<(), DpError> {
        for (i, b) in slots.iter().enumerate() {
            self.sched
                .set(sched_index(id, half, offset + i as u32), b, 0)
                .map_err(map_err(SCHED_MAP))?;
        }
        Ok(())
    }

    fn put_device(&mut self, ifindex: u32) -> Result<(), DpError> {
        self.devices
            .insert(ifindex, ifindex, None, 0)
            .map_err(|e| DpError::Device(e.to_string()))
    }

    fn listener_stats(&self, id: u32) -> Result<TrafficCounters, DpError> {
        let v = self
            .listener_stats
            .get(&id, 0)
            .map_err(map_err(LISTENER_STATS_MAP))?;
        Ok(sum_percpu(v, TrafficCounters::add))
    }

    fn backend_stats(&self, id: u32) -> Result<TrafficCounters, DpError> {
        let v = self
            .backend_stats
            .get(&id, 0)
            .map_err(map_err(BACKEND_STATS_MAP))?;
        Ok(sum_percpu(v, TrafficCounters::add))
    }

    fn counters(&self) -> Result<[u64; NUM_COUNTERS as usize], DpError> {
        let mut out = [0u64; NUM_COUNTERS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let v = self
                .counters
                .get(&(i as u32), 0)
                .map_err(map_err(COUNTER_MAP))?;
            *slot = v.iter().sum();
        }
        Ok(out)
    }
}

/// The datapath's maps kept in memory, for unit tests of the control logic.
#[derive(Default, Debug)]
pub struct MemDataplane {
    pub listener_addr: HashMap<ListenerKey, u32>,
    pub listeners: BTreeMap<u32, ListenerInfo>,
    pub backends: BTreeMap<u32, BackendInfo>,
    pub backend_addr: HashMap<BackendAddrKey, BackendAddrInfo>,
    pub sched: HashMap<u32, u32>,
    pub devices: Vec<u32>,
    pub conns: HashMap<ConnKey, ConnValue>,
    pub sessions: HashMap<SessionKey, SessionValue>,
    /// Number of schedule slot writes, to check that only changed slots are written.
    pub sched_writes: usize,
}

impl MemDataplane {
    /// The active schedule of listener `id`, as the datapath would read it.
    pub fn active_schedule(&self, id: u32) -> Vec<u32> {
        let Some(l) = self.listeners.get(&id) else {
            return Vec::new();
        };
        (0..l.sched_len())
            .map(|s| {
                self.sched
                    .get(&sched_index(id, l.sched_half(), s))
                    .copied()
                    .unwrap_or(u32::MAX)
            })
            .collect()
    }
}

impl Tables for MemDataplane {
    fn prune_conns(
        &mut self,
        _pause: std::time::Duration,
        decide: &mut Decide<'_, ConnKey, ConnValue>,
    ) -> Result<(u64, u64), DpError> {
        let (k, v): (Vec<ConnKey>, Vec<ConnValue>) =
            self.conns.iter().map(|(k, v)| (*k, *v)).unzip();
        let mut dead = Vec::new();
        decide(&k, &v, &mut dead);
        Ok((k.len() as u64, self.del_conns(&dead)? as u64))
    }
    fn prune_sessions(
        &mut self,
        _pause: std::time::Duration,
        decide: &mut Decide<'_, SessionKey, SessionValue>,
    ) -> Result<(u64, u64), DpError> {
        let (k, v): (Vec<SessionKey>, Vec<SessionValue>) =
            self.sessions.iter().map(|(k, v)| (*k, *v)).unzip();
        let mut dead = Vec::new();
        decide(&k, &v, &mut dead);
        Ok((k.len() as u64, self.del_sessions(&dead)? as u64))
    }
    fn get_conn(&self, key: &ConnKey) -> Result<Option<ConnValue>, DpError> {
        Ok(self.conns.get(key).copied())
    }
    fn get_session(&self, key: &SessionKey) -> Result<Option<SessionValue>, DpError> {
        Ok(self.sessions.get(key).copied())
    }
    fn scan_conns(
        &self,
        f: &mut dyn FnMut(&[ConnKey], &[ConnValue]) -> bool,
    ) -> Result<(), DpError> {
        let (k, v): (Vec<ConnKey>, Vec<ConnValue>) =
            self.conns.iter().map(|(k, v)| (*k, *v)).unzip();
        f(&k, &v);
        Ok(())
    }
    fn del_conns(&mut self, keys: &[ConnKey]) -> Result<usize, DpError> {
        Ok(keys
            .iter()
            .filter(|k| self.conns.remove(k).is_some())
            .count())
    }
    fn scan_sessions(
        &self,
        f: &mut dyn FnMut(&[SessionKey], &[SessionValue]) -> bool,
    ) -> Result<(), DpError> {
        let (k, v): (Vec<SessionKey>, Vec<SessionValue>) =
            self.sessions.iter().map(|(k, v)| (*k, *v)).unzip();
        f(&k, &v);
        Ok(())
    }
    fn del_sessions(&mut self, keys: &[SessionKey]) -> Result<usize, DpError> {
        Ok(keys
            .iter()
            .filter(|k| self.sessions.remove(k).is_some())
            .count())
    }
}

impl Dataplane for MemDataplane {
    fn put_listener_addr(&mut self, key: ListenerKey, id: u32) -> Result<(), DpError> {
        self.listener_addr.insert(key, id);
        Ok(())
    }
    fn del_listener_addr(&mut self, key: &ListenerKey) -> Result<(), DpError> {
        self.listener_addr.remove(key);
        Ok(())
    }
    fn listener_addrs(&self) -> Result<Vec<(ListenerKey, u32)>, DpError> {
        Ok(self.listener_addr.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn put_listener(&mut self, id: u32, info: &ListenerInfo) -> Result<(), DpError> {
        self.listeners.insert(id, *info);
        Ok(())
    }
    fn listener(&self, id: u32) -> Result<ListenerInfo, DpError> {
        Ok(self.listeners.get(&id).copied().unwrap_or_default())
    }
    fn put_backend(&mut self, id: u32, info: &BackendInfo) -> Result<(), DpError> {
        self.backends.insert(id, *info);
        Ok(())
    }
    fn backends(&self) -> Result<Vec<(u32, BackendInfo)>, DpError> {
        Ok(self
            .backends
            .iter()
            .filter(|(_, b)| b.flags & BACKEND_F_PRESENT != 0)
            .map(|(k, v)| (*k, *v))
            .collect())
    }
    fn put_backend_addr(
        &mut self,
        key: BackendAddrKey,
        v: &BackendAddrInfo,
    ) -> Result<(), DpError> {
        self.backend_addr.insert(key, *v);
        Ok(())
    }
    fn del_backend_addr(&mut self, key: &BackendAddrKey) -> Result<(), DpError> {
        self.backend_addr.remove(key);
        Ok(())
    }
    fn put_sched(&mut self, id: u32, half: u32, offset: u32, slots: &[u32]) -> Result<(), DpError> {
        for (i, b) in slots.iter().enumerate() {
            self.sched
                .insert(sched_index(id, half, offset + i as u32), *b);
            self.sched_writes += 1;
        }
        Ok(())
    }
    fn put_device(&mut self, ifindex: u32) -> Result<(), DpError> {
        self.devices.push(ifindex);
        Ok(())
    }
    fn listener_stats(&self, _id: u32) -> Result<TrafficCounters, DpError> {
        Ok(TrafficCounters::default())
    }
    fn backend_stats(&self, _id: u32) -> Result<TrafficCounters, DpError> {
        Ok(TrafficCounters::default())
    }
    fn counters(&self) -> Result<[u64; NUM_COUNTERS as usize], DpError> {
        Ok([0; NUM_COUNTERS as usize])
    }
}

/// Handles of the two tables alone, opened by map id: the sweeper's own, so it never waits
/// for the control plane (or makes it wait).
pub struct AyaTables {
    conns: AyaHashMap<MapData, ConnKey, ConnValue>,
    sessions: AyaHashMap<MapData, SessionKey, SessionValue>,
}

impl AyaTables {
    fn conn_map(&self) -> &MapData {
        IterableMap::map(&self.conns)
    }

    fn session_map(&self) -> &MapData {
        IterableMap::map(&self.sessions)
    }

    /// Opens new handles on the tables of `dp`.
    pub fn open(dp: &AyaDataplane) -> Result<Self, DpError> {
        let reopen = |m: &MapData, name: &'static str| -> Result<MapData, DpError> {
            let id = m.info().map_err(map_err(name))?.id();
            MapData::from_id(id).map_err(map_err(name))
        };
        Ok(Self {
            conns: AyaHashMap::try_from(aya::maps::Map::LruHashMap(reopen(
                dp.conn_map(),
                CONN_MAP,
            )?))
            .map_err(map_err(CONN_MAP))?,
            sessions: AyaHashMap::try_from(aya::maps::Map::LruHashMap(reopen(
                dp.session_map(),
                SESSION_MAP,
            )?))
            .map_err(map_err(SESSION_MAP))?,
        })
    }
}

/// Batch-reads the hash map `fd`, deleting after each batch the keys `decide` picks.
fn prune<K: aya::Pod + bytemuck::Pod, V: aya::Pod + bytemuck::Pod>(
    fd: std::os::fd::BorrowedFd<'_>,
    map: &'static str,
    pause: std::time::Duration,
    decide: &mut Decide<'_, K, V>,
) -> Result<(u64, u64), DpError> {
    let (mut scanned, mut deleted) = (0u64, 0u64);
    let mut dead = Vec::new();
    let mut err = None;
    batch::for_each_batch(fd, TABLE_BATCH, |ks: &[K], vs: &[V]| {
        scanned += ks.len() as u64;
        dead.clear();
        decide(ks, vs, &mut dead);
        match batch::delete(fd, &dead) {
            Ok(n) => {
                deleted += n as u64;
                if !pause.is_zero() {
                    std::thread::sleep(pause);
                }
                true
            }
            Err(e) => {
                err = Some(e);
                false
            }
        }
    })
    .map_err(|source| DpError::Io { map, source })?;
    if let Some(source) = err {
        return Err(DpError::Io { map, source });
    }
    Ok((scanned, deleted))
}

impl Tables for AyaTables {
    fn prune_conns(
        &mut self,
        pause: std::time::Duration,
        decide: &mut Decide<'_, ConnKey, ConnValue>,
    ) -> Result<(u64, u64), DpError> {
        prune(self.conn_map().fd().as_fd(), CONN_MAP, pause, decide)
    }
    fn prune_sessions(
        &mut self,
        pause: std::time::Duration,
        decide: &mut Decide<'_, SessionKey, SessionValue>,
    ) -> Result<(u64, u64), DpError> {
        prune(self.session_map().fd().as_fd(), SESSION_MAP, pause, decide)
    }
    fn get_conn(&self, key: &ConnKey) -> Result<Option<ConnValue>, DpError> {
        get_or_not_found(self.conns.get(key, 0), CONN_MAP)
    }
    fn get_session(&self, key: &SessionKey) -> Result<Option<SessionValue>, DpError> {
        get_or_not_found(self.sessions.get(key, 0), SESSION_MAP)
    }
    fn scan_conns(
        &self,
        f: &mut dyn FnMut(&[ConnKey], &[ConnValue]) -> bool,
    ) -> Result<(), DpError> {
        batch::for_each_batch(self.conn_map().fd().as_fd(), TABLE_BATCH, f).map_err(|source| {
            DpError::Io {
                map: CONN_MAP,
                source,
            }
        })
    }
    fn del_conns(&mut self, keys: &[ConnKey]) -> Result<usize, DpError> {
        batch::delete(self.conn_map().fd().as_fd(), keys).map_err(|source| DpError::Io {
            map: CONN_MAP,
            source,
        })
    }
    fn scan_sessions(
        &self,
        f: &mut dyn FnMut(&[SessionKey], &[SessionValue]) -> bool,
    ) -> Result<(), DpError> {
        batch::for_each_batch(
            IterableMap::map(&self.sessions).fd().as_fd(),
            TABLE_BATCH,
            f,
        )
        .map_err(|source| DpError::Io {
            map: SESSION_MAP,
            source,
        })
    }
    fn del_sessions(&mut self, keys: &[SessionKey]) -> Result<usize, DpError> {
        batch::delete(self.session_map().fd().as_fd(), keys).map_err(|source| DpError::Io {
            map: SESSION_MAP,
            source,
        })
    }
}
