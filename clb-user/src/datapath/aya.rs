//! The real maps of a loaded program, through aya: [`AyaDataplane`] writes the configuration
//! maps; [`AyaReader`] reads counters and walks the flow tables through its own handles
//! (opened by map id), so it never shares anything with the writer.

use std::os::fd::AsFd as _;

use aya::{
    Ebpf,
    maps::{
        Array, ArrayOfMaps, DevMapHash, HashMap as AyaHashMap, IterableMap, Map, MapData, MapError,
        PerCpuArray,
    },
    sys::SyscallError,
};
use clb_common::{
    Addr6, BACKEND_ADDR_MAP, BACKEND_ADDR6_MAP, BACKEND_F_PRESENT, BACKEND_F_V6, BACKEND_MAP,
    BACKEND_STATS_MAP, BACKEND6_MAP, BPF_F_INNER_MAP, BackendAddrInfo, BackendAddrKey,
    BackendAddrKey6, BackendInfo, CONN_MAP, CONN6_MAP, COUNTER_MAP, CURSOR_MAP, ConnKey, ConnKey6,
    ConnValue, DENY_SRC_MAP, DENY_SRC6_MAP, DEVICE_MAP, GLOBAL_MAP, GlobalConfig, HALF_OPEN_MAP,
    HALF_OPEN6_MAP, HalfOpenValue, HalfSlot, HalfSlot6, LISTENER_ADDR_MAP, LISTENER_ADDR6_MAP,
    LISTENER_F_ACTIVE, LISTENER_F_V6, LISTENER_MAP, LISTENER_STATS_MAP, LISTENER6_MAP, LOAD_MAP,
    ListenerInfo, ListenerInfo6, ListenerKey, ListenerKey6, ListenerRef, MAX_LISTENERS,
    NUM_COUNTERS, PENDING_SESSION_MAP, PENDING_SESSION6_MAP, PendSlot, PendSlot6, SCHED_MAP,
    SESSION_MAP, SESSION6_MAP, SHARED_STATE_MAP, SessionKey, SessionKey6, SessionValue,
    SharedState, TrafficCounters,
};

use super::{
    Dataplane, Decide, DpConfig, DpError, Reader, SWEEP_BATCH, Scan, SessionTable, TABLE_BATCH,
    TableInfo, Tables, batch, loads::LoadTable, slots::SlotTable,
};

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DpError {
    move |source| DpError::Map { map, source }
}

/// A missing key is not an error for a delete: aya reports it as `KeyNotFound` or as the
/// syscall's ENOENT, depending on the map type.
fn ignore_missing(r: Result<(), MapError>, map: &'static str) -> Result<(), DpError> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        Err(e) => Err(map_err(map)(e)),
    }
}

macro_rules! take {
    ($ebpf:expr, $name:expr) => {{
        let m = $ebpf.take_map($name).ok_or(DpError::Missing($name))?;
        m.try_into().map_err(map_err($name))?
    }};
}

/// Opens a second handle on the map behind `m`.
fn reopen(m: &MapData, name: &'static str) -> Result<MapData, DpError> {
    let id = m.info().map_err(map_err(name))?.id();
    MapData::from_id(id).map_err(map_err(name))
}

/// The flow tables: the verified ones (LRU hash maps) as raw map handles (batch syscalls work
/// on the fd), the unverified ones (in-place tables) mapped into memory.
pub struct AyaTables {
    conns: MapData,
    half_open: SlotTable<HalfSlot>,
    sessions: MapData,
    pending: SlotTable<PendSlot>,
    conns6: MapData,
    half_open6: SlotTable<HalfSlot6>,
    sessions6: MapData,
    pending6: SlotTable<PendSlot6>,
    /// Active connections per backend, mapped.
    loads: LoadTable,
}

/// The flow tables' names, in `AyaTables`'s field order.
const TABLE_MAPS: [&str; 8] = [
    CONN_MAP,
    HALF_OPEN_MAP,
    SESSION_MAP,
    PENDING_SESSION_MAP,
    CONN6_MAP,
    HALF_OPEN6_MAP,
    SESSION6_MAP,
    PENDING_SESSION6_MAP,
];

/// Maps an in-place table.
fn slot_table<S: clb_common::slots::Slot>(
    m: MapData,
    name: &'static str,
) -> Result<SlotTable<S>, DpError> {
    SlotTable::new(m).map_err(|source| DpError::Io { map: name, source })
}

impl AyaTables {
    /// Takes the tables out of a loaded program.
    fn take(ebpf: &mut Ebpf) -> Result<Self, DpError> {
        let mut m = TABLE_MAPS
            .iter()
            .map(
                |name| match ebpf.take_map(name).ok_or(DpError::Missing(name))? {
                    Map::LruHashMap(m) | Map::HashMap(m) | Map::Array(m) => Ok(m),
                    _ => Err(DpError::Missing(name)),
                },
            )
            .collect::<Result<Vec<_>, _>>()?
            .into_iter();
        let mut next = || m.next().ok_or(DpError::Missing(CONN_MAP));
        let loads = match ebpf.take_map(LOAD_MAP).ok_or(DpError::Missing(LOAD_MAP))? {
            Map::Array(m) => LoadTable::new(m).map_err(|source| DpError::Io {
                map: LOAD_MAP,
                source,
            })?,
            _ => return Err(DpError::Missing(LOAD_MAP)),
        };
        Ok(Self {
            loads,
            conns: next()?,
            half_open: slot_table(next()?, HALF_OPEN_MAP)?,
            sessions: next()?,
            pending: slot_table(next()?, PENDING_SESSION_MAP)?,
            conns6: next()?,
            half_open6: slot_table(next()?, HALF_OPEN6_MAP)?,
            sessions6: next()?,
            pending6: slot_table(next()?, PENDING_SESSION6_MAP)?,
        })
    }

    fn all(&self) -> [&MapData; 8] {
        [
            &self.conns,
            self.half_open.map(),
            &self.sessions,
            self.pending.map(),
            &self.conns6,
            self.half_open6.map(),
            &self.sessions6,
            self.pending6.map(),
        ]
    }

    fn reopen(&self) -> Result<Self, DpError> {
        let [a, b, c, d, e, f, g, h] = self.all();
        Ok(Self {
            conns: reopen(a, CONN_MAP)?,
            half_open: slot_table(reopen(b, HALF_OPEN_MAP)?, HALF_OPEN_MAP)?,
            sessions: reopen(c, SESSION_MAP)?,
            pending: slot_table(reopen(d, PENDING_SESSION_MAP)?, PENDING_SESSION_MAP)?,
            conns6: reopen(e, CONN6_MAP)?,
            half_open6: slot_table(reopen(f, HALF_OPEN6_MAP)?, HALF_OPEN6_MAP)?,
            sessions6: reopen(g, SESSION6_MAP)?,
            pending6: slot_table(reopen(h, PENDING_SESSION6_MAP)?, PENDING_SESSION6_MAP)?,
            loads: LoadTable::of(self.loads.map()).map_err(|source| DpError::Io {
                map: LOAD_MAP,
                source,
            })?,
        })
    }

    /// The slots of the in-place table called `name` (its map entries are sets of slots);
    /// `None` for a hash map, whose capacity is its `max_entries`.
    fn slot_capacity(&self, name: &str) -> Option<u32> {
        match name {
            HALF_OPEN_MAP => Some(self.half_open.capacity()),
            PENDING_SESSION_MAP => Some(self.pending.capacity()),
            HALF_OPEN6_MAP => Some(self.half_open6.capacity()),
            PENDING_SESSION6_MAP => Some(self.pending6.capacity()),
            _ => None,
        }
    }

    /// The handle of the flow table called `name` (one of the `*_MAP` names of clb-common).
    pub fn by_name(&self, name: &str) -> Option<&MapData> {
        TABLE_MAPS
            .iter()
            .position(|n| *n == name)
            .map(|i| self.all()[i])
    }

    /// The verified tables' handles (memory accounting, batch fills in tests and benchmarks).
    pub fn conn_map(&self) -> &MapData {
        &self.conns
    }
    pub fn session_map(&self) -> &MapData {
        &self.sessions
    }
    pub fn conn6_map(&self) -> &MapData {
        &self.conns6
    }
    pub fn session6_map(&self) -> &MapData {
        &self.sessions6
    }
    /// The in-place tables.
    pub fn half_open(&self) -> &SlotTable<HalfSlot> {
        &self.half_open
    }
    pub fn pending(&self) -> &SlotTable<PendSlot> {
        &self.pending
    }
    pub fn half_open6(&self) -> &SlotTable<HalfSlot6> {
        &self.half_open6
    }
    pub fn pending6(&self) -> &SlotTable<PendSlot6> {
        &self.pending6
    }
}

fn scan<K: aya::Pod + bytemuck::Pod, V: aya::Pod + bytemuck::Pod>(
    m: &MapData,
    name: &'static str,
    f: &mut dyn FnMut(&[K], &[V]) -> bool,
) -> Result<(), DpError> {
    batch::for_each_batch(m.fd().as_fd(), TABLE_BATCH, f)
        .map_err(|source| DpError::Io { map: name, source })
}

/// Batch-reads the hash map `m`, deleting after each batch the keys `decide` picks.
fn prune<K: aya::Pod + bytemuck::Pod, V: aya::Pod + bytemuck::Pod>(
    m: &MapData,
    name: &'static str,
    pause: std::time::Duration,
    decide: &mut Decide<'_, K, V>,
) -> Result<(u64, u64), DpError> {
    let fd = m.fd().as_fd();
    let (mut scanned, mut deleted) = (0u64, 0u64);
    let mut dead = Vec::new();
    let mut err = None;
    batch::for_each_batch(fd, SWEEP_BATCH, |ks: &[K], vs: &[V]| {
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
    .map_err(|source| DpError::Io { map: name, source })?;
    if let Some(source) = err {
        return Err(DpError::Io { map: name, source });
    }
    Ok((scanned, deleted))
}

/// Walks the in-place table `t` in batches.
fn scan_slots<S: clb_common::slots::Slot>(
    t: &SlotTable<S>,
    f: &mut Scan<'_, S::Key, S::Val>,
) -> Result<(), DpError> {
    t.walk(TABLE_BATCH, |k, v, _| f(k, v));
    Ok(())
}

/// Walks the in-place table `t`, emptying after each batch the slots of the keys `decide`
/// picks (unless the datapath rewrote them meanwhile).
fn prune_slots<S: clb_common::slots::Slot>(
    t: &SlotTable<S>,
    pause: std::time::Duration,
    decide: &mut Decide<'_, S::Key, S::Val>,
) -> Result<(u64, u64), DpError> {
    let (mut scanned, mut deleted) = (0u64, 0u64);
    let mut dead = Vec::new();
    t.walk(SWEEP_BATCH, |ks, vs, handles| {
        scanned += ks.len() as u64;
        dead.clear();
        decide(ks, vs, &mut dead);
        // `decide` picks keys in the batch's order: one pass pairs them with their slots.
        let mut next = 0;
        for (k, h) in ks.iter().zip(handles) {
            let picked = if dead.get(next) == Some(k) {
                next += 1;
                true
            } else {
                dead[next..].contains(k)
            };
            if picked && t.remove(h) {
                deleted += 1;
            }
        }
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
        true
    });
    Ok((scanned, deleted))
}

impl Tables for AyaTables {
    fn scan_conns(&self, f: &mut Scan<'_, ConnKey, ConnValue>) -> Result<(), DpError> {
        scan(&self.conns, CONN_MAP, f)
    }
    fn scan_half_open(&self, f: &mut Scan<'_, ConnKey, HalfOpenValue>) -> Result<(), DpError> {
        scan_slots(&self.half_open, f)
    }
    fn scan_sessions(
        &self,
        table: SessionTable,
        f: &mut Scan<'_, SessionKey, SessionValue>,
    ) -> Result<(), DpError> {
        match table {
            SessionTable::Verified => scan(&self.sessions, SESSION_MAP, f),
            SessionTable::Pending => scan_slots(&self.pending, f),
        }
    }
    fn prune_conns(
        &self,
        pause: std::time::Duration,
        decide: &mut Decide<'_, ConnKey, ConnValue>,
    ) -> Result<(u64, u64), DpError> {
        prune(&self.conns, CONN_MAP, pause, decide)
    }
    fn prune_half_open(
        &self,
        pause: std::time::Duration,
        decide: &mut Decide<'_, ConnKey, HalfOpenValue>,
    ) -> Result<(u64, u64), DpError> {
        prune_slots(&self.half_open, pause, decide)
    }
    fn prune_sessions(
        &self,
        table: SessionTable,
        pause: std::time::Duration,
        decide: &mut Decide<'_, SessionKey, SessionValue>,
    ) -> Result<(u64, u64), DpError> {
        match table {
            SessionTable::Verified => prune(&self.sessions, SESSION_MAP, pause, decide),
            SessionTable::Pending => prune_slots(&self.pending, pause, decide),
        }
    }
    fn scan_conns6(&self, f: &mut Scan<'_, ConnKey6, ConnValue>) -> Result<(), DpError> {
        scan(&self.conns6, CONN6_MAP, f)
    }
    fn scan_half_open6(&self, f: &mut Scan<'_, ConnKey6, HalfOpenValue>) -> Result<(), DpError> {
        scan_slots(&self.half_open6, f)
    }
    fn scan_sessions6(
        &self,
        table: SessionTable,
        f: &mut Scan<'_, SessionKey6, SessionValue>,
    ) -> Result<(), DpError> {
        match table {
            SessionTable::Verified => scan(&self.sessions6, SESSION6_MAP, f),
            SessionTable::Pending => scan_slots(&self.pending6, f),
        }
    }
    fn prune_conns6(
        &self,
        pause: std::time::Duration,
        decide: &mut Decide<'_, ConnKey6, ConnValue>,
    ) -> Result<(u64, u64), DpError> {
        prune(&self.conns6, CONN6_MAP, pause, decide)
    }
    fn prune_half_open6(
        &self,
        pause: std::time::Duration,
        decide: &mut Decide<'_, ConnKey6, HalfOpenValue>,
    ) -> Result<(u64, u64), DpError> {
        prune_slots(&self.half_open6, pause, decide)
    }
    fn prune_sessions6(
        &self,
        table: SessionTable,
        pause: std::time::Duration,
        decide: &mut Decide<'_, SessionKey6, SessionValue>,
    ) -> Result<(u64, u64), DpError> {
        match table {
            SessionTable::Verified => prune(&self.sessions6, SESSION6_MAP, pause, decide),
            SessionTable::Pending => prune_slots(&self.pending6, pause, decide),
        }
    }
    fn actives(&self) -> Vec<i64> {
        self.loads.all()
    }
    fn add_active(&self, id: u32, delta: i64) {
        self.loads.add(id, delta);
    }
}

/// The writer: the configuration maps of a loaded program, and handles on its tables.
pub struct AyaDataplane {
    listener_addr: AyaHashMap<MapData, ListenerKey, ListenerRef>,
    listeners: Array<MapData, ListenerInfo>,
    backends: Array<MapData, BackendInfo>,
    backend_addr: AyaHashMap<MapData, BackendAddrKey, BackendAddrInfo>,
    sched: ArrayOfMaps<MapData>,
    /// A second handle on the schedule map, for deletes (aya offers none on arrays of maps).
    sched_raw: MapData,
    denied: AyaHashMap<MapData, u32, u32>,
    listener_addr6: AyaHashMap<MapData, ListenerKey6, ListenerRef>,
    listeners6: Array<MapData, ListenerInfo6>,
    backends6: Array<MapData, Addr6>,
    backend_addr6: AyaHashMap<MapData, BackendAddrKey6, BackendAddrInfo>,
    denied6: AyaHashMap<MapData, Addr6, u32>,
    global: Array<MapData, GlobalConfig>,
    devices: DevMapHash<MapData>,
    tables: AyaTables,
    /// Opened for the reader, which takes them (see [`AyaDataplane::reader`]).
    listener_stats: MapData,
    backend_stats: MapData,
    counters: MapData,
    shared: MapData,
    /// Kept so the cursor and per-CPU state maps stay open with the others (the datapath owns
    /// their contents).
    _others: Vec<Map>,
}

impl AyaDataplane {
    /// Takes the maps out of a loaded program.
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, DpError> {
        let raw = |ebpf: &mut Ebpf, name: &'static str| -> Result<MapData, DpError> {
            match ebpf.take_map(name).ok_or(DpError::Missing(name))? {
                Map::LruHashMap(m) | Map::HashMap(m) | Map::PerCpuArray(m) | Map::Array(m) => Ok(m),
                _ => Err(DpError::Missing(name)),
            }
        };
        let sched_map = ebpf
            .take_map(SCHED_MAP)
            .ok_or(DpError::Missing(SCHED_MAP))?;
        let sched_raw = match &sched_map {
            Map::ArrayOfMaps(m) => reopen(m, SCHED_MAP)?,
            _ => return Err(DpError::Missing(SCHED_MAP)),
        };
        Ok(Self {
            listener_addr: take!(ebpf, LISTENER_ADDR_MAP),
            listeners: take!(ebpf, LISTENER_MAP),
            backends: take!(ebpf, BACKEND_MAP),
            backend_addr: take!(ebpf, BACKEND_ADDR_MAP),
            sched: ArrayOfMaps::try_from(sched_map).map_err(map_err(SCHED_MAP))?,
            sched_raw,
            denied: take!(ebpf, DENY_SRC_MAP),
            listener_addr6: take!(ebpf, LISTENER_ADDR6_MAP),
            listeners6: take!(ebpf, LISTENER6_MAP),
            backends6: take!(ebpf, BACKEND6_MAP),
            backend_addr6: take!(ebpf, BACKEND_ADDR6_MAP),
            denied6: take!(ebpf, DENY_SRC6_MAP),
            global: take!(ebpf, GLOBAL_MAP),
            devices: take!(ebpf, DEVICE_MAP),
            tables: AyaTables::take(ebpf)?,
            listener_stats: raw(ebpf, LISTENER_STATS_MAP)?,
            backend_stats: raw(ebpf, BACKEND_STATS_MAP)?,
            counters: raw(ebpf, COUNTER_MAP)?,
            shared: raw(ebpf, SHARED_STATE_MAP)?,
            _others: [
                CURSOR_MAP,
                clb_common::CPU_STATE_MAP,
                clb_common::NEXTHOP_MAP,
            ]
            .into_iter()
            .map(|n| ebpf.take_map(n).ok_or(DpError::Missing(n)))
            .collect::<Result<_, _>>()?,
        })
    }

    /// A reader over the same maps, with handles of its own.
    pub fn reader(&self) -> Result<AyaReader, DpError> {
        Ok(AyaReader {
            tables: self.tables.reopen()?,
            listener_stats: PerCpuArray::try_from(Map::PerCpuArray(reopen(
                &self.listener_stats,
                LISTENER_STATS_MAP,
            )?))
            .map_err(map_err(LISTENER_STATS_MAP))?,
            backend_stats: PerCpuArray::try_from(Map::PerCpuArray(reopen(
                &self.backend_stats,
                BACKEND_STATS_MAP,
            )?))
            .map_err(map_err(BACKEND_STATS_MAP))?,
            counters: PerCpuArray::try_from(Map::PerCpuArray(reopen(&self.counters, COUNTER_MAP)?))
                .map_err(map_err(COUNTER_MAP))?,
            shared: Array::try_from(Map::Array(reopen(&self.shared, SHARED_STATE_MAP)?))
                .map_err(map_err(SHARED_STATE_MAP))?,
        })
    }

    /// The flow tables' handles (tests and benchmarks fill them directly).
    pub fn aya_tables(&self) -> &AyaTables {
        &self.tables
    }

    fn read_schedule(&self, id: u32) -> Result<Option<Vec<u32>>, DpError> {
        let inner: MapData = match self.sched.get(&id, 0) {
            Ok(m) => m,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(map_err(SCHED_MAP)(e)),
        };
        let arr: Array<MapData, u32> =
            Array::try_from(Map::Array(inner)).map_err(map_err(SCHED_MAP))?;
        // Read in batches (a Maglev table is 65 538 slots: one syscall per 16 384, not one
        // per slot); slot 0 holds the length.
        let mut all: Vec<u32> = Vec::with_capacity(arr.len() as usize);
        batch::for_each_batch::<u32, u32>(arr.map().fd().as_fd(), 16384, |_, v| {
            all.extend_from_slice(v);
            true
        })
        .map_err(|source| DpError::Io {
            map: SCHED_MAP,
            source,
        })?;
        let len = all.first().copied().unwrap_or(0) as usize;
        Ok(Some(
            all.get(1..=len.min(all.len().saturating_sub(1)))
                .unwrap_or_default()
                .to_vec(),
        ))
    }
}

impl Dataplane for AyaDataplane {
    fn read(&self) -> Result<DpConfig, DpError> {
        let mut c = DpConfig::default();
        for r in self.listener_addr.iter() {
            let (k, v) = r.map_err(map_err(LISTENER_ADDR_MAP))?;
            c.listener_addr.insert(k, v.id);
        }
        for id in 0..MAX_LISTENERS {
            let l = self.listeners.get(&id, 0).map_err(map_err(LISTENER_MAP))?;
            if l.flags & LISTENER_F_ACTIVE != 0 {
                c.listeners.insert(id, l);
                if let Some(s) = self.read_schedule(id)? {
                    c.schedules.insert(id, s.into());
                }
            }
        }
        batch::for_each_batch(
            IterableMap::map(&self.backends).fd().as_fd(),
            TABLE_BATCH,
            |ids: &[u32], vs: &[BackendInfo]| {
                for (id, b) in ids.iter().zip(vs) {
                    if b.flags & BACKEND_F_PRESENT != 0 {
                        c.backends.insert(*id, *b);
                    }
                }
                true
            },
        )
        .map_err(|source| DpError::Io {
            map: BACKEND_MAP,
            source,
        })?;
        for r in self.backend_addr.iter() {
            let (k, v) = r.map_err(map_err(BACKEND_ADDR_MAP))?;
            c.backend_addr.insert(k, v);
        }
        for r in self.denied.iter() {
            let (k, v) = r.map_err(map_err(DENY_SRC_MAP))?;
            c.denied.insert(k, v);
        }
        for r in self.listener_addr6.iter() {
            let (k, v) = r.map_err(map_err(LISTENER_ADDR6_MAP))?;
            c.listener_addr6.insert(k, v.id);
        }
        for (id, l) in &c.listeners {
            if l.flags & LISTENER_F_V6 != 0 {
                let v = self.listeners6.get(id, 0).map_err(map_err(LISTENER6_MAP))?;
                c.listeners6.insert(*id, v);
            }
        }
        for (id, b) in &c.backends {
            if b.flags & BACKEND_F_V6 != 0 {
                let a = self.backends6.get(id, 0).map_err(map_err(BACKEND6_MAP))?;
                c.backends6.insert(*id, a);
            }
        }
        for r in self.backend_addr6.iter() {
            let (k, v) = r.map_err(map_err(BACKEND_ADDR6_MAP))?;
            c.backend_addr6.insert(k, v);
        }
        for r in self.denied6.iter() {
            let (k, v) = r.map_err(map_err(DENY_SRC6_MAP))?;
            c.denied6.insert(k, v);
        }
        c.global = self.global.get(&0, 0).map_err(map_err(GLOBAL_MAP))?;
        Ok(c)
    }

    fn put_listener_addr(&mut self, key: ListenerKey, id: Option<u32>) -> Result<(), DpError> {
        match id {
            Some(id) => self
                .listener_addr
                .insert(&key, &ListenerRef { id }, 0)
                .map_err(map_err(LISTENER_ADDR_MAP)),
            None => ignore_missing(self.listener_addr.remove(&key), LISTENER_ADDR_MAP),
        }
    }

    fn put_listener(&mut self, id: u32, info: &ListenerInfo) -> Result<(), DpError> {
        self.listeners
            .set(id, info, 0)
            .map_err(map_err(LISTENER_MAP))
    }

    fn put_backend(&mut self, id: u32, info: &BackendInfo) -> Result<(), DpError> {
        self.backends.set(id, info, 0).map_err(map_err(BACKEND_MAP))
    }

    fn put_backend_addr(
        &mut self,
        key: BackendAddrKey,
        v: Option<&BackendAddrInfo>,
    ) -> Result<(), DpError> {
        match v {
            Some(v) => self
                .backend_addr
                .insert(&key, v, 0)
                .map_err(map_err(BACKEND_ADDR_MAP)),
            None => ignore_missing(self.backend_addr.remove(&key), BACKEND_ADDR_MAP),
        }
    }

    fn put_schedule(&mut self, id: u32, slots: Option<&[u32]>) -> Result<(), DpError> {
        let Some(slots) = slots else {
            // Array-of-maps slots are deleted, not zeroed.
            return match batch::delete_one(self.sched_raw.fd().as_fd(), &id) {
                Ok(_) => Ok(()),
                Err(source) => Err(DpError::Io {
                    map: SCHED_MAP,
                    source,
                }),
            };
        };
        // A fresh inner map, filled, then swapped in: the datapath sees the old schedule or
        // the new one, never a mix.
        let inner: Array<MapData, u32> =
            Array::create(slots.len() as u32 + 1, BPF_F_INNER_MAP).map_err(map_err(SCHED_MAP))?;
        // Filled in batches: one syscall per 16 384 slots (a Maglev table took 65 538 calls).
        let keys: Vec<u32> = (0..=slots.len() as u32).collect();
        let mut vals = Vec::with_capacity(slots.len() + 1);
        vals.push(slots.len() as u32);
        vals.extend_from_slice(slots);
        batch::update(inner.map().fd().as_fd(), &keys, &vals).map_err(|source| DpError::Io {
            map: SCHED_MAP,
            source,
        })?;
        self.sched
            .set(id, IterableMap::map(&inner), 0)
            .map_err(map_err(SCHED_MAP))
    }

    fn put_denied(&mut self, addr: u32, reason: Option<u32>) -> Result<(), DpError> {
        match reason {
            Some(r) => self
                .denied
                .insert(&addr, &r, 0)
                .map_err(map_err(DENY_SRC_MAP)),
            None => ignore_missing(self.denied.remove(&addr), DENY_SRC_MAP),
        }
    }

    fn put_listener_addr6(&mut self, key: ListenerKey6, id: Option<u32>) -> Result<(), DpError> {
        match id {
            Some(id) => self
                .listener_addr6
                .insert(&key, &ListenerRef { id }, 0)
                .map_err(map_err(LISTENER_ADDR6_MAP)),
            None => ignore_missing(self.listener_addr6.remove(&key), LISTENER_ADDR6_MAP),
        }
    }

    fn put_listener6(&mut self, id: u32, info: &ListenerInfo6) -> Result<(), DpError> {
        self.listeners6
            .set(id, info, 0)
            .map_err(map_err(LISTENER6_MAP))
    }

    fn put_backend6(&mut self, id: u32, addr: &Addr6) -> Result<(), DpError> {
        self.backends6
            .set(id, addr, 0)
            .map_err(map_err(BACKEND6_MAP))
    }

    fn put_backend_addr6(
        &mut self,
        key: BackendAddrKey6,
        v: Option<&BackendAddrInfo>,
    ) -> Result<(), DpError> {
        match v {
            Some(v) => self
                .backend_addr6
                .insert(&key, v, 0)
                .map_err(map_err(BACKEND_ADDR6_MAP)),
            None => ignore_missing(self.backend_addr6.remove(&key), BACKEND_ADDR6_MAP),
        }
    }

    fn put_denied6(&mut self, addr: Addr6, reason: Option<u32>) -> Result<(), DpError> {
        match reason {
            Some(r) => self
                .denied6
                .insert(&addr, &r, 0)
                .map_err(map_err(DENY_SRC6_MAP)),
            None => ignore_missing(self.denied6.remove(&addr), DENY_SRC6_MAP),
        }
    }

    fn put_global(&mut self, g: &GlobalConfig) -> Result<(), DpError> {
        self.global.set(0, g, 0).map_err(map_err(GLOBAL_MAP))
    }

    fn put_device(&mut self, ifindex: u32) -> Result<(), DpError> {
        self.devices
            .insert(ifindex, ifindex, None, 0)
            .map_err(|e| DpError::Device(e.to_string()))
    }

    fn tables(&mut self) -> &mut dyn Tables {
        &mut self.tables
    }
}

/// Counters, shared state and the flow tables, through handles of its own.
pub struct AyaReader {
    tables: AyaTables,
    listener_stats: PerCpuArray<MapData, TrafficCounters>,
    backend_stats: PerCpuArray<MapData, TrafficCounters>,
    counters: PerCpuArray<MapData, u64>,
    shared: Array<MapData, SharedState>,
}

impl AyaReader {
    /// The flow tables' handles.
    pub fn aya_tables(&self) -> &AyaTables {
        &self.tables
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

/// `Tables` by delegation to a field.
macro_rules! delegate_tables {
    ($t:ty, $field:ident) => {
        impl Tables for $t {
            fn scan_conns(&self, f: &mut Scan<'_, ConnKey, ConnValue>) -> Result<(), DpError> {
                self.$field.scan_conns(f)
            }
            fn scan_half_open(
                &self,
                f: &mut Scan<'_, ConnKey, HalfOpenValue>,
            ) -> Result<(), DpError> {
                self.$field.scan_half_open(f)
            }
            fn scan_sessions(
                &self,
                table: SessionTable,
                f: &mut Scan<'_, SessionKey, SessionValue>,
            ) -> Result<(), DpError> {
                self.$field.scan_sessions(table, f)
            }
            fn prune_conns(
                &self,
                pause: std::time::Duration,
                decide: &mut Decide<'_, ConnKey, ConnValue>,
            ) -> Result<(u64, u64), DpError> {
                self.$field.prune_conns(pause, decide)
            }
            fn prune_half_open(
                &self,
                pause: std::time::Duration,
                decide: &mut Decide<'_, ConnKey, HalfOpenValue>,
            ) -> Result<(u64, u64), DpError> {
                self.$field.prune_half_open(pause, decide)
            }
            fn prune_sessions(
                &self,
                table: SessionTable,
                pause: std::time::Duration,
                decide: &mut Decide<'_, SessionKey, SessionValue>,
            ) -> Result<(u64, u64), DpError> {
                self.$field.prune_sessions(table, pause, decide)
            }
            fn scan_conns6(&self, f: &mut Scan<'_, ConnKey6, ConnValue>) -> Result<(), DpError> {
                self.$field.scan_conns6(f)
            }
            fn scan_half_open6(
                &self,
                f: &mut Scan<'_, ConnKey6, HalfOpenValue>,
            ) -> Result<(), DpError> {
                self.$field.scan_half_open6(f)
            }
            fn scan_sessions6(
                &self,
                table: SessionTable,
                f: &mut Scan<'_, SessionKey6, SessionValue>,
            ) -> Result<(), DpError> {
                self.$field.scan_sessions6(table, f)
            }
            fn prune_conns6(
                &self,
                pause: std::time::Duration,
                decide: &mut Decide<'_, ConnKey6, ConnValue>,
            ) -> Result<(u64, u64), DpError> {
                self.$field.prune_conns6(pause, decide)
            }
            fn prune_half_open6(
                &self,
                pause: std::time::Duration,
                decide: &mut Decide<'_, ConnKey6, HalfOpenValue>,
            ) -> Result<(u64, u64), DpError> {
                self.$field.prune_half_open6(pause, decide)
            }
            fn prune_sessions6(
                &self,
                table: SessionTable,
                pause: std::time::Duration,
                decide: &mut Decide<'_, SessionKey6, SessionValue>,
            ) -> Result<(u64, u64), DpError> {
                self.$field.prune_sessions6(table, pause, decide)
            }
            fn actives(&self) -> Vec<i64> {
                self.$field.actives()
            }
            fn add_active(&self, id: u32, delta: i64) {
                self.$field.add_active(id, delta)
            }
        }
    };
}

delegate_tables!(AyaReader, tables);

impl Reader for AyaReader {
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
        // One batch syscall for the whole per-CPU array (a value is one u64 per possible
        // CPU), not one per counter: `/metrics` and the fuzzer read it often.
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, source)| DpError::Io {
                map: COUNTER_MAP,
                source,
            })?
            .get() as usize;
        let mut out = [0u64; NUM_COUNTERS as usize];
        let fd = IterableMap::map(&self.counters).fd().as_fd();
        batch::for_each_batch_raw(fd, 4, 8 * cpus, NUM_COUNTERS as usize, |ks, vs| {
            for (k, v) in ks.chunks(4).zip(vs.chunks(8 * cpus)) {
                let i = u32::from_ne_bytes([k[0], k[1], k[2], k[3]]) as usize;
                if let Some(slot) = out.get_mut(i) {
                    *slot = v
                        .chunks(8)
                        .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8])))
                        .sum();
                }
            }
            true
        })
        .map_err(|source| DpError::Io {
            map: COUNTER_MAP,
            source,
        })?;
        Ok(out)
    }

    fn shared_state(&self) -> Result<SharedState, DpError> {
        self.shared.get(&0, 0).map_err(map_err(SHARED_STATE_MAP))
    }

    fn table_info(&self) -> Result<[TableInfo; 8], DpError> {
        let info = |m: &MapData, name: &'static str| -> Result<TableInfo, DpError> {
            let capacity = match self.tables.slot_capacity(name) {
                Some(slots) => slots,
                None => m.info().map_err(map_err(name))?.max_entries(),
            };
            let memory_bytes = batch::memlock(m.fd().as_fd()).unwrap_or(0);
            Ok(TableInfo {
                capacity,
                memory_bytes,
            })
        };
        let mut out = [TableInfo::default(); 8];
        for ((slot, m), name) in out.iter_mut().zip(self.tables.all()).zip(TABLE_MAPS) {
            *slot = info(m, name)?;
        }
        Ok(out)
    }
}
