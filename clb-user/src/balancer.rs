//! The control plane's authoritative state and its projection onto the datapath's maps.
//!
//! Every change goes through [`Balancer::apply`] (or a runtime-state method: health, drain):
//! the whole candidate configuration is validated first, so a refused change touches nothing;
//! then only what differs is written, in an order that never lets the datapath see a
//! half-made change (backends before the schedule that names them, the schedule's inactive
//! half before the flip, the listener's address last when adding and first when removing).
//!
//! Listener and backend ids are what the connection and persistence tables store, so they
//! must survive a daemon restart: [`Balancer::restore`] reads the ids already in the (pinned)
//! maps and [`Balancer::apply`] reuses them for the same VIP / backend address.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::{Instant, SystemTime},
};

use clb_common::{
    BACKEND_F_ACCEPTING, BACKEND_F_PRESENT, BackendAddrInfo, BackendAddrKey, BackendInfo, CONN_FIN,
    CONN_OPEN, CONN_RST, ConnKey, ConnValue, LISTENER_F_ACTIVE, ListenerInfo, ListenerKey,
    MAX_BACKENDS, MAX_LISTENERS, MAX_LISTENERS_PER_BACKEND_ADDR, NO_LISTENER, NS_PER_SEC,
    NUM_COUNTERS, SCHED_SLOTS, SessionKey, SessionValue, TrafficCounters, conn_timeout_ns,
    ip_from_be, ip_to_be, is_expired, port_from_be, port_to_be,
};
use serde::{Deserialize, Serialize};

use crate::{
    dataplane::{Dataplane, DpError, Tables},
    model::{BackendSpec, ConfigError, ListenerSpec, Proto, validate_all},
    sched::{Weighted, smooth_wrr},
    time::monotonic_ns,
};

/// A refused or failed control-plane operation.
#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    /// The request or configuration is invalid; nothing was changed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A map operation failed.
    #[error("dataplane: {0}")]
    Dataplane(#[from] DpError),
}

/// Health of a backend as the health checker last decided it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    Unhealthy,
}

/// A backend being drained.
#[derive(Clone, Copy, Debug)]
pub struct Drain {
    /// When its remaining connections are cut; `None` once they have been.
    pub deadline: Option<Instant>,
    pub started: SystemTime,
}

/// Runtime state of one backend.
#[derive(Clone, Debug)]
pub struct Backend {
    pub spec: BackendSpec,
    /// Datapath backend id (index into the backend map).
    pub id: u32,
    pub health: Health,
    pub health_since: SystemTime,
    pub drain: Option<Drain>,
    /// Whether the datapath was last told it accepts new connections.
    accepting: bool,
    /// Whether the backend map slot has been written since this state was created.
    written: bool,
}

/// Runtime state of one listener.
#[derive(Clone, Debug)]
pub struct Listener {
    /// Settings (its `backends` field is kept empty: the backends live in `backends`).
    pub spec: ListenerSpec,
    /// Datapath listener id; L4 listeners only.
    pub id: Option<u32>,
    pub backends: Vec<Backend>,
    /// Active schedule half.
    half: u32,
    /// What each schedule half holds, when known (`None`: unknown, rewrite all of it).
    shadow: [Option<Vec<u32>>; 2],
}

impl Listener {
    /// The full spec, backends included.
    pub fn full_spec(&self) -> ListenerSpec {
        let mut s = self.spec.clone();
        s.backends = self.backends.iter().map(|b| b.spec.clone()).collect();
        s
    }

    /// Whether every backend that could take traffic is unhealthy (then all of them take it).
    pub fn all_unhealthy(&self) -> bool {
        let eligible: Vec<&Backend> = self.backends.iter().filter(|b| eligible(b)).collect();
        !eligible.is_empty() && eligible.iter().all(|b| b.health == Health::Unhealthy)
    }

    /// Which backends accept new connections: weight > 0, not draining, and healthy — or,
    /// when every such backend is unhealthy, all of them (the cloud LB's fail-open rule).
    pub fn accepting(&self) -> Vec<bool> {
        let fail_open = self.all_unhealthy();
        self.backends
            .iter()
            .map(|b| eligible(b) && (fail_open || b.health == Health::Healthy))
            .collect()
    }

    pub fn backend(&self, addr: SocketAddrV4) -> Option<&Backend> {
        self.backends.iter().find(|b| b.spec.addr == addr)
    }
}

fn eligible(b: &Backend) -> bool {
    b.spec.weight > 0 && b.drain.is_none()
}

/// The control plane: authoritative state plus the dataplane it projects onto.
pub struct Balancer<D: Dataplane> {
    dp: D,
    listeners: BTreeMap<String, Listener>,
    listener_ids: BTreeSet<u32>,
    backend_ids: BTreeSet<u32>,
    next_listener: u32,
    next_backend: u32,
    /// Ids found in the maps at start, not yet claimed by the configuration.
    restored_listeners: HashMap<(SocketAddrV4, u8), u32>,
    restored_backends: HashMap<(u32, SocketAddrV4), u32>,
}

impl<D: Dataplane> Balancer<D> {
    /// A balancer over `dp` that adopts the ids already in its maps (a restart over pinned
    /// maps). Call [`Balancer::apply`] with the configuration, then
    /// [`Balancer::release_unclaimed`].
    pub fn restore(dp: D) -> Result<Self, BalancerError> {
        let mut restored_listeners = HashMap::new();
        for (k, id) in dp.listener_addrs()? {
            if k.proto == 0 {
                continue; // VIP marker
            }
            let vip = SocketAddrV4::new(Ipv4Addr::from(ip_from_be(k.vip)), port_from_be(k.port));
            restored_listeners.insert((vip, k.proto), id);
        }
        let mut restored_backends = HashMap::new();
        for (id, b) in dp.backends()? {
            let addr = SocketAddrV4::new(Ipv4Addr::from(ip_from_be(b.addr)), port_from_be(b.port));
            restored_backends.insert((u32::from(b.listener), addr), id);
        }
        Ok(Self {
            dp,
            listeners: BTreeMap::new(),
            listener_ids: BTreeSet::new(),
            backend_ids: BTreeSet::new(),
            next_listener: 0,
            next_backend: 0,
            restored_listeners,
            restored_backends,
        })
    }

    /// How many listener and backend ids were found in the maps at start and not yet
    /// claimed by the configuration.
    pub fn dataplane_restored_summary(&self) -> (usize, usize) {
        (self.restored_listeners.len(), self.restored_backends.len())
    }

    /// The dataplane (for reads the balancer does not wrap).
    pub fn dataplane(&self) -> &D {
        &self.dp
    }

    /// Mutable dataplane access (tests, benchmarks).
    pub fn dataplane_mut(&mut self) -> &mut D {
        &mut self.dp
    }

    /// Listeners by name.
    pub fn listeners(&self) -> &BTreeMap<String, Listener> {
        &self.listeners
    }

    /// The configuration as it stands (what the config file is written from).
    pub fn specs(&self) -> Vec<ListenerSpec> {
        self.listeners.values().map(Listener::full_spec).collect()
    }

    /// Replaces the configuration with `specs`, changing only what differs. Validates the
    /// whole of it first: an invalid configuration changes nothing.
    pub fn apply(&mut self, specs: Vec<ListenerSpec>) -> Result<(), BalancerError> {
        validate_all(&specs)?;
        let wanted: HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        let gone: Vec<String> = self
            .listeners
            .keys()
            .filter(|n| !wanted.contains(n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            self.remove_listener(&name)?;
        }
        // A listener that moves to another VIP or protocol is removed and added again; do the
        // removals first so its old address is free for another listener.
        for s in &specs {
            if let Some(l) = self.listeners.get(&s.name)
                && (l.spec.vip != s.vip || l.spec.proto != s.proto)
            {
                self.remove_listener(&s.name)?;
            }
        }
        for s in specs {
            if self.listeners.contains_key(&s.name) {
                self.update_listener(s)?;
            } else {
                self.add_listener(s)?;
            }
        }
        Ok(())
    }

    /// Clears map entries of restored ids the configuration did not claim (listeners and
    /// backends removed from the config while the daemon was down) and their table entries.
    pub fn release_unclaimed(&mut self) -> Result<(), BalancerError> {
        let listeners: Vec<((SocketAddrV4, u8), u32)> = self.restored_listeners.drain().collect();
        let backends: Vec<((u32, SocketAddrV4), u32)> = self.restored_backends.drain().collect();
        let mut gone_l = HashSet::new();
        for ((vip, proto), id) in listeners {
            self.dp.del_listener_addr(&listener_key(vip, proto))?;
            self.dp.put_listener(id, &ListenerInfo::default())?;
            gone_l.insert(id);
            self.sync_vip_marker(*vip.ip())?;
        }
        let mut gone_b = HashSet::new();
        for ((_, addr), id) in backends {
            self.dp.put_backend(id, &BackendInfo::default())?;
            gone_b.insert(id);
            for proto in [clb_common::PROTO_TCP, clb_common::PROTO_UDP] {
                self.sync_backend_addr(addr, proto)?;
            }
        }
        if !gone_l.is_empty() || !gone_b.is_empty() {
            purge(&mut self.dp, |lid, bid| {
                gone_l.contains(&lid) || gone_b.contains(&bid)
            })?;
        }
        Ok(())
    }

    /// Registers an interface the datapath may redirect to.
    pub fn add_device(&mut self, ifindex: u32) -> Result<(), BalancerError> {
        Ok(self.dp.put_device(ifindex)?)
    }

    // ---- listeners --------------------------------------------------------------------------

    fn add_listener(&mut self, mut spec: ListenerSpec) -> Result<(), BalancerError> {
        let backends = std::mem::take(&mut spec.backends);
        let id = if spec.proto.is_l4() {
            let key = (spec.vip, spec.proto.ip_proto());
            Some(match self.restored_listeners.remove(&key) {
                Some(id) if !self.listener_ids.contains(&id) => {
                    self.listener_ids.insert(id);
                    id
                }
                _ => alloc(
                    &mut self.listener_ids,
                    &mut self.next_listener,
                    MAX_LISTENERS,
                )
                .ok_or(ConfigError::Capacity {
                    what: "listeners",
                    max: MAX_LISTENERS as usize,
                })?,
            })
        } else {
            None
        };
        // The active half of a restored listener is in the map: keep serving from it while
        // the other half is written.
        let half = match id {
            Some(id) => self.dp.listener(id)?.sched_half(),
            None => 0,
        };
        let now = SystemTime::now();
        let mut l = Listener {
            spec,
            id,
            backends: Vec::new(),
            half,
            shadow: [None, None],
        };
        for b in backends {
            let bid = self.alloc_backend(id, b.addr)?;
            l.backends.push(Backend {
                spec: b,
                id: bid,
                health: Health::Healthy,
                health_since: now,
                drain: None,
                accepting: false,
                written: false,
            });
        }
        let name = l.spec.name.clone();
        self.listeners.insert(name.clone(), l);
        self.program(&name)?;
        if let Some(id) = id {
            let l = &self.listeners[&name];
            let (vip, proto) = (l.spec.vip, l.spec.proto.ip_proto());
            let addrs: Vec<SocketAddrV4> = l.backends.iter().map(|b| b.spec.addr).collect();
            for a in addrs {
                self.sync_backend_addr(a, proto)?;
            }
            // Activation last: the VIP marker and the listener's address.
            self.sync_vip_marker(*vip.ip())?;
            self.dp.put_listener_addr(listener_key(vip, proto), id)?;
        }
        Ok(())
    }

    fn remove_listener(&mut self, name: &str) -> Result<(), BalancerError> {
        let Some(l) = self.listeners.remove(name) else {
            return Err(ConfigError::UnknownListener(name.into()).into());
        };
        if let Some(id) = l.id {
            let proto = l.spec.proto.ip_proto();
            // Deactivation first: no new packet finds the listener.
            self.dp
                .del_listener_addr(&listener_key(l.spec.vip, proto))?;
            self.sync_vip_marker(*l.spec.vip.ip())?;
            self.dp.put_listener(id, &ListenerInfo::default())?;
            let bids: HashSet<u32> = l.backends.iter().map(|b| b.id).collect();
            for b in &l.backends {
                self.dp.put_backend(b.id, &BackendInfo::default())?;
                self.sync_backend_addr(b.spec.addr, proto)?;
            }
            purge(&mut self.dp, |lid, bid| lid == id || bids.contains(&bid))?;
            self.listener_ids.remove(&id);
        }
        for b in &l.backends {
            self.backend_ids.remove(&b.id);
        }
        Ok(())
    }

    fn update_listener(&mut self, mut spec: ListenerSpec) -> Result<(), BalancerError> {
        let backends = std::mem::take(&mut spec.backends);
        let name = spec.name.clone();
        let (id, proto) = {
            let l = self.listeners.get_mut(&name).expect("caller checked");
            l.spec = spec;
            (l.id, l.spec.proto.ip_proto())
        };
        // Removed backends: out of the schedule first, then out of the maps.
        let removed: Vec<Backend> = {
            let l = self.listeners.get_mut(&name).expect("present");
            let keep: HashSet<SocketAddrV4> = backends.iter().map(|b| b.addr).collect();
            let (gone, kept): (Vec<Backend>, Vec<Backend>) = std::mem::take(&mut l.backends)
                .into_iter()
                .partition(|b| !keep.contains(&b.spec.addr));
            l.backends = kept;
            gone
        };
        // Changed weights and new backends.
        let now = SystemTime::now();
        let mut added = Vec::new();
        for b in backends {
            let existing = self
                .listeners
                .get_mut(&name)
                .expect("present")
                .backends
                .iter_mut()
                .find(|x| x.spec.addr == b.addr);
            match existing {
                Some(x) => {
                    if x.spec.weight != b.weight {
                        // A new weight ends a drain: the operator put the backend back.
                        x.drain = None;
                    }
                    x.spec = b;
                }
                None => {
                    let bid = self.alloc_backend(id, b.addr)?;
                    added.push(b.addr);
                    self.listeners
                        .get_mut(&name)
                        .expect("present")
                        .backends
                        .push(Backend {
                            spec: b,
                            id: bid,
                            health: Health::Healthy,
                            health_since: now,
                            drain: None,
                            accepting: false,
                            written: false,
                        });
                }
            }
        }
        self.program(&name)?;
        if id.is_some() {
            for a in added {
                self.sync_backend_addr(a, proto)?;
            }
            let gone_ids: HashSet<u32> = removed.iter().map(|b| b.id).collect();
            for b in &removed {
                self.dp.put_backend(b.id, &BackendInfo::default())?;
                self.sync_backend_addr(b.spec.addr, proto)?;
            }
            if !gone_ids.is_empty() {
                purge(&mut self.dp, |_, bid| gone_ids.contains(&bid))?;
            }
        }
        for b in &removed {
            self.backend_ids.remove(&b.id);
        }
        Ok(())
    }

    fn alloc_backend(
        &mut self,
        listener: Option<u32>,
        addr: SocketAddrV4,
    ) -> Result<u32, BalancerError> {
        if let Some(lid) = listener
            && let Some(id) = self.restored_backends.remove(&(lid, addr))
            && !self.backend_ids.contains(&id)
        {
            self.backend_ids.insert(id);
            return Ok(id);
        }
        // Never hand out an id still named by an unclaimed restored entry.
        let reserved: HashSet<u32> = self.restored_backends.values().copied().collect();
        loop {
            let id = alloc(&mut self.backend_ids, &mut self.next_backend, MAX_BACKENDS).ok_or(
                ConfigError::Capacity {
                    what: "backends in total",
                    max: MAX_BACKENDS as usize,
                },
            )?;
            if !reserved.contains(&id) {
                return Ok(id);
            }
        }
    }

    // ---- runtime state: health, drain -----------------------------------------------------

    /// Records a health transition (from the health checker). Returns whether it changed.
    pub fn set_health(
        &mut self,
        listener: &str,
        addr: SocketAddrV4,
        health: Health,
    ) -> Result<bool, BalancerError> {
        let l = self
            .listeners
            .get_mut(listener)
            .ok_or_else(|| ConfigError::UnknownListener(listener.into()))?;
        let b = l
            .backends
            .iter_mut()
            .find(|b| b.spec.addr == addr)
            .ok_or_else(|| ConfigError::UnknownBackend {
                listener: listener.into(),
                addr,
            })?;
        if b.health == health {
            return Ok(false);
        }
        b.health = health;
        b.health_since = SystemTime::now();
        self.program(listener)?;
        Ok(true)
    }

    /// Starts draining a backend: no new connections or persisted clients; at `deadline`
    /// (or now, with `None`) its remaining connections are removed from the table.
    pub fn drain(
        &mut self,
        listener: &str,
        addr: SocketAddrV4,
        deadline: Option<Instant>,
    ) -> Result<(), BalancerError> {
        let l = self
            .listeners
            .get_mut(listener)
            .ok_or_else(|| ConfigError::UnknownListener(listener.into()))?;
        let b = l
            .backends
            .iter_mut()
            .find(|b| b.spec.addr == addr)
            .ok_or_else(|| ConfigError::UnknownBackend {
                listener: listener.into(),
                addr,
            })?;
        b.drain = Some(Drain {
            deadline: Some(deadline.unwrap_or_else(Instant::now)),
            started: SystemTime::now(),
        });
        self.program(listener)?;
        self.finish_drains(Instant::now())?;
        Ok(())
    }

    /// Cuts the connections of drained backends whose deadline has passed. Returns how many
    /// connection entries were removed.
    pub fn finish_drains(&mut self, now: Instant) -> Result<usize, BalancerError> {
        let mut due = HashSet::new();
        for l in self.listeners.values_mut() {
            for b in &mut l.backends {
                if let Some(d) = &mut b.drain
                    && d.deadline.is_some_and(|t| t <= now)
                {
                    d.deadline = None;
                    due.insert(b.id);
                }
            }
        }
        if due.is_empty() {
            return Ok(0);
        }
        Ok(purge_conns(&mut self.dp, |_, bid| due.contains(&bid))?)
    }

    // ---- projection -------------------------------------------------------------------------

    /// Writes listener `name`'s backends' flags, its schedule (inactive half, then the flip)
    /// and its settings.
    fn program(&mut self, name: &str) -> Result<(), BalancerError> {
        let l = self.listeners.get_mut(name).expect("caller checked");
        let Some(id) = l.id else {
            return Ok(()); // L7: user space serves it
        };
        let accepting = l.accepting();
        let proto = l.spec.proto.ip_proto();
        let info_of = |b: &Backend, acc: bool| BackendInfo {
            addr: ip_to_be(b.spec.addr.ip().octets()),
            port: port_to_be(b.spec.addr.port()),
            listener: id as u16,
            flags: BACKEND_F_PRESENT | if acc { BACKEND_F_ACCEPTING } else { 0 },
        };
        // Backends that start accepting (or are new) before the schedule names them.
        for (b, &acc) in l.backends.iter_mut().zip(&accepting) {
            if !b.written || (acc && !b.accepting) {
                let flag = acc || b.accepting;
                self.dp.put_backend(b.id, &info_of(b, flag))?;
                b.written = true;
                b.accepting = flag;
            }
        }
        let weighted: Vec<Weighted> = l
            .backends
            .iter()
            .zip(&accepting)
            .filter(|(_, a)| **a)
            .map(|(b, _)| Weighted {
                id: b.id,
                weight: b.spec.weight,
            })
            .collect();
        let seq = smooth_wrr(&weighted, SCHED_SLOTS as usize);
        let inactive = l.half ^ 1;
        let old = l.shadow[inactive as usize].take();
        write_diff(&mut self.dp, id, inactive, old.as_deref(), &seq)?;
        l.shadow[inactive as usize] = Some(seq.clone());
        l.half = inactive;
        let info = ListenerInfo {
            persist_ns: u64::from(l.spec.persist) * NS_PER_SEC,
            idle_timeout_ns: u64::from(l.spec.idle_timeout_secs()) * NS_PER_SEC,
            vip: ip_to_be(l.spec.vip.ip().octets()),
            port: port_to_be(l.spec.vip.port()),
            proto,
            _pad: 0,
            flags: LISTENER_F_ACTIVE,
            sched: ListenerInfo::pack_sched(l.half, seq.len() as u32),
        };
        self.dp.put_listener(id, &info)?;
        // Backends that stop accepting after the schedule stopped naming them.
        for (b, &acc) in l.backends.iter_mut().zip(&accepting) {
            if b.accepting && !acc {
                self.dp.put_backend(b.id, &info_of(b, false))?;
                b.accepting = false;
            }
        }
        Ok(())
    }

    /// Sets the reply-path entry of a backend address to the L4 listeners that use it.
    fn sync_backend_addr(&mut self, addr: SocketAddrV4, proto: u8) -> Result<(), BalancerError> {
        let key = BackendAddrKey {
            addr: ip_to_be(addr.ip().octets()),
            port: port_to_be(addr.port()),
            proto,
            _pad: 0,
        };
        let mut ids: Vec<u16> = self
            .listeners
            .values()
            .filter(|l| l.spec.proto.is_l4() && l.spec.proto.ip_proto() == proto)
            .filter(|l| l.backend(addr).is_some())
            .filter_map(|l| l.id.map(|i| i as u16))
            .collect();
        ids.sort_unstable();
        if ids.is_empty() {
            self.dp.del_backend_addr(&key)?;
            return Ok(());
        }
        let mut v = BackendAddrInfo {
            listeners: [NO_LISTENER; MAX_LISTENERS_PER_BACKEND_ADDR],
        };
        for (slot, id) in v.listeners.iter_mut().zip(ids) {
            *slot = id;
        }
        self.dp.put_backend_addr(key, &v)?;
        Ok(())
    }

    /// Sets or clears the "this address is a VIP" marker.
    fn sync_vip_marker(&mut self, vip: Ipv4Addr) -> Result<(), BalancerError> {
        let key = ListenerKey {
            vip: ip_to_be(vip.octets()),
            port: 0,
            proto: 0,
            _pad: 0,
        };
        let used = self
            .listeners
            .values()
            .any(|l| l.id.is_some() && *l.spec.vip.ip() == vip);
        if used {
            self.dp.put_listener_addr(key, 0)?;
        } else {
            self.dp.del_listener_addr(&key)?;
        }
        Ok(())
    }

    // ---- reads ------------------------------------------------------------------------------

    /// What the sweeper needs to know: timeouts per listener id.
    pub fn sweep_policy(&self) -> SweepPolicy {
        let ix = self.id_index();
        SweepPolicy {
            listeners: ix
                .listeners
                .iter()
                .map(|(id, (_, idle, persist))| (*id, (*idle, *persist)))
                .collect(),
        }
    }

    /// Calls `f(listener, key, value, backend address, now)` for every live connection entry
    /// (known listener and backend, not expired) of listener id `want` (or all).
    fn for_each_live_conn(
        &self,
        want: Option<u32>,
        mut f: impl FnMut(&Listener, &ConnKey, &ConnValue, SocketAddrV4, u64),
    ) -> Result<(), BalancerError> {
        let ix = self.id_index();
        let now = monotonic_ns();
        self.dp.scan_conns(&mut |keys, vals| {
            for (k, v) in keys.iter().zip(vals) {
                let lid = u32::from(k.listener);
                if want.is_some_and(|w| w != lid) {
                    continue;
                }
                if let Some((l, idle, _)) = ix.listeners.get(&lid)
                    && !is_expired(now, v.last_seen_ns, conn_timeout_ns(v.state, *idle))
                    && let Some(backend) = ix.backends.get(&v.backend)
                {
                    f(l, k, v, *backend, now);
                }
            }
            true
        })?;
        Ok(())
    }

    /// Calls `f(listener, key, value, backend address, persist ns, now)` for every live
    /// persistence entry of listener id `want` (or all).
    fn for_each_live_session(
        &self,
        want: Option<u32>,
        mut f: impl FnMut(&Listener, &SessionKey, &SessionValue, SocketAddrV4, u64, u64),
    ) -> Result<(), BalancerError> {
        let ix = self.id_index();
        let now = monotonic_ns();
        self.dp.scan_sessions(&mut |keys, vals| {
            for (k, v) in keys.iter().zip(vals) {
                let lid = u32::from(k.listener);
                if want.is_some_and(|w| w != lid) {
                    continue;
                }
                if let Some((l, _, persist)) = ix.listeners.get(&lid)
                    && *persist != 0
                    && !is_expired(now, v.last_seen_ns, *persist)
                    && let Some(backend) = ix.backends.get(&v.backend)
                {
                    f(l, k, v, *backend, *persist, now);
                }
            }
            true
        })?;
        Ok(())
    }

    /// Live connection entries, optionally of one listener.
    pub fn conns(&self, listener: Option<&str>) -> Result<Vec<ConnView>, BalancerError> {
        let mut out = Vec::new();
        self.for_each_live_conn(self.filter_id(listener)?, |l, k, v, backend, now| {
            out.push(ConnView {
                listener: l.spec.name.clone(),
                proto: l.spec.proto,
                client: SocketAddrV4::new(
                    Ipv4Addr::from(ip_from_be(k.client)),
                    port_from_be(k.client_port),
                ),
                vip: l.spec.vip,
                backend,
                state: match v.state {
                    CONN_OPEN => "open",
                    CONN_FIN => "fin",
                    CONN_RST => "rst",
                    _ => "unknown",
                }
                .into(),
                idle_secs: now.saturating_sub(v.last_seen_ns) / NS_PER_SEC,
            });
        })?;
        out.sort_by(|a, b| (&a.listener, a.client).cmp(&(&b.listener, b.client)));
        Ok(out)
    }

    /// Live persistence entries, optionally of one listener.
    pub fn sessions(&self, listener: Option<&str>) -> Result<Vec<SessionView>, BalancerError> {
        let mut out = Vec::new();
        self.for_each_live_session(
            self.filter_id(listener)?,
            |l, k, v, backend, persist, now| {
                let idle = now.saturating_sub(v.last_seen_ns);
                out.push(SessionView {
                    listener: l.spec.name.clone(),
                    client: Ipv4Addr::from(ip_from_be(k.client)),
                    backend,
                    idle_secs: idle / NS_PER_SEC,
                    expires_in_secs: persist.saturating_sub(idle).div_ceil(NS_PER_SEC),
                });
            },
        )?;
        out.sort_by(|a, b| (&a.listener, a.client).cmp(&(&b.listener, b.client)));
        Ok(out)
    }

    /// Live connection entries per backend id (for `backend ls` while draining).
    pub fn conn_counts(&self) -> Result<HashMap<u32, u64>, BalancerError> {
        let mut out: HashMap<u32, u64> = HashMap::new();
        self.for_each_live_conn(None, |_, _, v, _, _| {
            *out.entry(v.backend).or_default() += 1
        })?;
        Ok(out)
    }

    /// Counters per listener and backend, plus live table entry counts and global counters.
    pub fn stats(&self) -> Result<Stats, BalancerError> {
        let conns_by_backend = self.conn_counts()?;
        let mut sessions_by_backend: HashMap<u32, u64> = HashMap::new();
        self.for_each_live_session(None, |_, _, v, _, _, _| {
            *sessions_by_backend.entry(v.backend).or_default() += 1
        })?;
        let mut listeners = Vec::new();
        for l in self.listeners.values() {
            let counters = match l.id {
                Some(id) => self.dp.listener_stats(id)?,
                None => TrafficCounters::default(),
            };
            let mut backends = Vec::new();
            let mut lc = 0;
            let mut ls = 0;
            for b in &l.backends {
                let c = if l.id.is_some() {
                    self.dp.backend_stats(b.id)?
                } else {
                    TrafficCounters::default()
                };
                let conns = conns_by_backend.get(&b.id).copied().unwrap_or(0);
                let sessions = sessions_by_backend.get(&b.id).copied().unwrap_or(0);
                lc += conns;
                ls += sessions;
                backends.push(BackendStats {
                    addr: b.spec.addr,
                    counters: c,
                    current_conns: conns,
                    persisted_clients: sessions,
                });
            }
            listeners.push(ListenerStats {
                name: l.spec.name.clone(),
                proto: l.spec.proto,
                counters,
                current_conns: lc,
                persisted_clients: ls,
                backends,
            });
        }
        let raw = self.dp.counters()?;
        let mut counters = BTreeMap::new();
        for i in 0..NUM_COUNTERS {
            let name = clb_common::counter::NAMES[i as usize];
            if !name.is_empty() {
                counters.insert(name.to_string(), raw[i as usize]);
            }
        }
        Ok(Stats {
            listeners,
            counters,
        })
    }

    fn filter_id(&self, listener: Option<&str>) -> Result<Option<u32>, BalancerError> {
        match listener {
            None => Ok(None),
            Some(n) => {
                let l = self
                    .listeners
                    .get(n)
                    .ok_or_else(|| ConfigError::UnknownListener(n.into()))?;
                // An L7 listener has no table entries: an id no entry carries.
                Ok(Some(l.id.unwrap_or(u32::MAX)))
            }
        }
    }

    fn id_index(&self) -> IdIndex<'_> {
        let mut ix = IdIndex {
            listeners: HashMap::new(),
            backends: HashMap::new(),
        };
        for l in self.listeners.values() {
            if let Some(id) = l.id {
                ix.listeners.insert(
                    id,
                    (
                        l,
                        u64::from(l.spec.idle_timeout_secs()) * NS_PER_SEC,
                        u64::from(l.spec.persist) * NS_PER_SEC,
                    ),
                );
                for b in &l.backends {
                    ix.backends.insert(b.id, b.spec.addr);
                }
            }
        }
        ix
    }
}

struct IdIndex<'a> {
    /// listener id → (listener, idle timeout ns, persist ns)
    listeners: HashMap<u32, (&'a Listener, u64, u64)>,
    backends: HashMap<u32, SocketAddrV4>,
}

fn listener_key(vip: SocketAddrV4, proto: u8) -> ListenerKey {
    ListenerKey {
        vip: ip_to_be(vip.ip().octets()),
        port: port_to_be(vip.port()),
        proto,
        _pad: 0,
    }
}

/// Next-fit id allocation: the lowest free id at or after the cursor, wrapping, so a freed id
/// is reused as late as possible.
fn alloc(used: &mut BTreeSet<u32>, cursor: &mut u32, max: u32) -> Option<u32> {
    if used.len() >= max as usize {
        return None;
    }
    let mut id = *cursor % max;
    while used.contains(&id) {
        id = (id + 1) % max;
    }
    used.insert(id);
    *cursor = (id + 1) % max;
    Some(id)
}

/// Writes the slots of `new` that differ from `old` (all of them if `old` is unknown).
fn write_diff<D: Dataplane>(
    dp: &mut D,
    id: u32,
    half: u32,
    old: Option<&[u32]>,
    new: &[u32],
) -> Result<(), DpError> {
    let mut i = 0;
    while i < new.len() {
        if old.is_some_and(|o| o.get(i) == Some(&new[i])) {
            i += 1;
            continue;
        }
        let start = i;
        while i < new.len() && !old.is_some_and(|o| o.get(i) == Some(&new[i])) {
            i += 1;
        }
        dp.put_sched(id, half, start as u32, &new[start..i])?;
    }
    Ok(())
}

/// Removes connection and persistence entries for which `gone(listener id, backend id)`.
fn purge<T: Tables + ?Sized>(t: &mut T, gone: impl Fn(u32, u32) -> bool) -> Result<(), DpError> {
    purge_conns(t, &gone)?;
    let mut keys = Vec::new();
    t.scan_sessions(&mut |ks, vs| {
        for (k, v) in ks.iter().zip(vs) {
            if gone(u32::from(k.listener), v.backend) {
                keys.push(*k);
            }
        }
        true
    })?;
    t.del_sessions(&keys)?;
    Ok(())
}

fn purge_conns<T: Tables + ?Sized>(
    t: &mut T,
    gone: impl Fn(u32, u32) -> bool,
) -> Result<usize, DpError> {
    let mut keys = Vec::new();
    t.scan_conns(&mut |ks, vs| {
        for (k, v) in ks.iter().zip(vs) {
            if gone(u32::from(k.listener), v.backend) {
                keys.push(*k);
            }
        }
        true
    })?;
    t.del_conns(&keys)
}

/// Timeouts per listener id, for the sweeper.
#[derive(Clone, Debug, Default)]
pub struct SweepPolicy {
    /// listener id → (idle timeout ns, persistence ns)
    pub listeners: HashMap<u32, (u64, u64)>,
}

/// What one sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepReport {
    pub conns_scanned: u64,
    pub conns_removed: u64,
    pub sessions_scanned: u64,
    pub sessions_removed: u64,
    pub micros: u64,
}

/// Removes expired entries. Connections: idle timeout, or FIN/RST aging. Sessions:
/// persistence duration (all of a listener's when its persistence is off).
///
/// Entries of listeners or backends that no longer exist are not the sweeper's business: the
/// control plane purges them when it removes them (and at start for ones removed while the
/// daemon was down), so a policy snapshot that lags a change can never make the sweeper
/// delete a live entry of a new listener or backend. The policy is read once per batch, so a
/// change is seen within one batch.
///
/// `pause` is waited after each batch of [`crate::dataplane::TABLE_BATCH`] entries: the
/// daemon paces its sweeps so they do not compete with the datapath flat out.
///
/// Each batch is deleted right after it is read: the only window in which the datapath could
/// re-create an expired key (a returning client) before the sweeper deletes it is that of one
/// batch (about a millisecond); the client's next packet then simply creates it again.
pub fn sweep<T: Tables + ?Sized>(
    t: &mut T,
    policy: &dyn Fn() -> std::sync::Arc<SweepPolicy>,
    now_ns: u64,
    pause: std::time::Duration,
) -> Result<SweepReport, DpError> {
    let started = Instant::now();
    let mut r = SweepReport::default();
    let (scanned, removed) = t.prune_conns(pause, &mut |ks, vs, dead| {
        let p = policy();
        for (k, v) in ks.iter().zip(vs) {
            if let Some((idle, _)) = p.listeners.get(&u32::from(k.listener))
                && is_expired(now_ns, v.last_seen_ns, conn_timeout_ns(v.state, *idle))
            {
                dead.push(*k);
            }
        }
    })?;
    (r.conns_scanned, r.conns_removed) = (scanned, removed);
    let (scanned, removed) = t.prune_sessions(pause, &mut |ks, vs, dead| {
        let p = policy();
        for (k, v) in ks.iter().zip(vs) {
            if let Some((_, persist)) = p.listeners.get(&u32::from(k.listener))
                && (*persist == 0 || is_expired(now_ns, v.last_seen_ns, *persist))
            {
                dead.push(*k);
            }
        }
    })?;
    (r.sessions_scanned, r.sessions_removed) = (scanned, removed);
    r.micros = started.elapsed().as_micros() as u64;
    Ok(r)
}

/// One connection entry, for `clb conn ls`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnView {
    pub listener: String,
    pub proto: Proto,
    pub client: SocketAddrV4,
    pub vip: SocketAddrV4,
    pub backend: SocketAddrV4,
    /// "open", "fin" or "rst".
    pub state: String,
    pub idle_secs: u64,
}

/// One persistence entry, for `clb session ls`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionView {
    pub listener: String,
    pub client: Ipv4Addr,
    pub backend: SocketAddrV4,
    /// Seconds since the client's last packet.
    pub idle_secs: u64,
    /// Seconds until the entry expires without a new packet.
    pub expires_in_secs: u64,
}

/// Counters of a backend.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackendStats {
    pub addr: SocketAddrV4,
    #[serde(flatten)]
    pub counters: TrafficCounters,
    /// Live entries in the connection table naming this backend.
    pub current_conns: u64,
    /// Live persistence entries naming this backend.
    pub persisted_clients: u64,
}

/// Counters of a listener.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListenerStats {
    pub name: String,
    pub proto: Proto,
    #[serde(flatten)]
    pub counters: TrafficCounters,
    pub current_conns: u64,
    pub persisted_clients: u64,
    pub backends: Vec<BackendStats>,
}

/// Everything `clb stats` shows.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    pub listeners: Vec<ListenerStats>,
    /// Verdicts, events and drops by reason, summed over CPUs.
    pub counters: BTreeMap<String, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::MemDataplane;

    fn spec(name: &str, vip: &str, backends: &[(&str, u32)]) -> ListenerSpec {
        let mut s = ListenerSpec::new(name, vip.parse().unwrap(), Proto::Tcp);
        s.backends = backends
            .iter()
            .map(|(a, w)| BackendSpec {
                addr: a.parse().unwrap(),
                weight: *w,
            })
            .collect();
        s
    }

    fn lb() -> Balancer<MemDataplane> {
        Balancer::restore(MemDataplane::default()).unwrap()
    }

    fn addr_of(dp: &MemDataplane, id: u32) -> SocketAddrV4 {
        let b = dp.backends[&id];
        SocketAddrV4::new(Ipv4Addr::from(ip_from_be(b.addr)), port_from_be(b.port))
    }

    #[test]
    fn add_listener_projects_everything() {
        let mut lb = lb();
        lb.apply(vec![spec(
            "web",
            "10.0.0.100:80",
            &[("10.1.0.1:80", 10), ("10.1.0.2:80", 10)],
        )])
        .unwrap();
        let dp = lb.dataplane();
        let id = lb.listeners()["web"].id.unwrap();
        let key = listener_key("10.0.0.100:80".parse().unwrap(), 6);
        assert_eq!(dp.listener_addr[&key], id);
        // The VIP marker.
        assert!(
            dp.listener_addr
                .keys()
                .any(|k| k.port == 0 && k.vip == key.vip)
        );
        let l = dp.listeners[&id];
        assert_eq!(l.flags, LISTENER_F_ACTIVE);
        assert_eq!(l.idle_timeout_ns, 900 * NS_PER_SEC);
        let sched = dp.active_schedule(id);
        assert_eq!(sched.len(), 2);
        let addrs: HashSet<SocketAddrV4> = sched.iter().map(|&b| addr_of(dp, b)).collect();
        assert_eq!(addrs.len(), 2);
        assert_eq!(dp.backend_addr.len(), 2);
    }

    #[test]
    fn refused_change_changes_nothing() {
        let mut lb = lb();
        lb.apply(vec![spec("web", "10.0.0.100:80", &[("10.1.0.1:80", 10)])])
            .unwrap();
        let before = format!("{:?}", lb.dataplane());
        let mut bad = lb.specs();
        bad[0].persist = 4000;
        let err = lb.apply(bad).unwrap_err();
        assert!(err.to_string().contains("persist 4000"), "{err}");
        assert_eq!(before, format!("{:?}", lb.dataplane()));
        assert_eq!(lb.specs()[0].persist, 0);
    }

    #[test]
    fn quiescent_backend_leaves_schedule_but_stays_present() {
        let mut lb = lb();
        lb.apply(vec![spec(
            "web",
            "10.0.0.100:80",
            &[("10.1.0.1:80", 10), ("10.1.0.2:80", 10)],
        )])
        .unwrap();
        let mut s = lb.specs();
        s[0].backends[1].weight = 0;
        lb.apply(s).unwrap();
        let id = lb.listeners()["web"].id.unwrap();
        let dp = lb.dataplane();
        let sched = dp.active_schedule(id);
        assert_eq!(sched.len(), 1);
        let b2 = lb.listeners()["web"].backends[1].id;
        assert_eq!(dp.backends[&b2].flags, BACKEND_F_PRESENT);
    }

    #[test]
    fn schedule_flips_halves_and_writes_only_changed_slots() {
        let mut lb = lb();
        lb.apply(vec![spec(
            "web",
            "10.0.0.100:80",
            &[("10.1.0.1:80", 1), ("10.1.0.2:80", 1)],
        )])
        .unwrap();
        let id = lb.listeners()["web"].id.unwrap();
        let h0 = lb.dataplane().listeners[&id].sched_half();
        let mut s = lb.specs();
        s[0].persist = 60;
        lb.apply(s.clone()).unwrap();
        assert_ne!(lb.dataplane().listeners[&id].sched_half(), h0);
        assert_eq!(lb.dataplane().listeners[&id].persist_ns, 60 * NS_PER_SEC);
        let writes = lb.dataplane().sched_writes;
        // Same schedule again into a half that already holds it: no slot writes.
        s[0].persist = 61;
        lb.apply(s.clone()).unwrap();
        s[0].persist = 62;
        lb.apply(s).unwrap();
        assert_eq!(
            lb.dataplane().sched_writes,
            writes,
            "both halves already hold it"
        );
    }

    #[test]
    fn health_fail_open_when_all_unhealthy() {
        let mut lb = lb();
        lb.apply(vec![spec(
            "web",
            "10.0.0.100:80",
            &[("10.1.0.1:80", 10), ("10.1.0.2:80", 10)],
        )])
        .unwrap();
        let a: SocketAddrV4 = "10.1.0.1:80".parse().unwrap();
        let b: SocketAddrV4 = "10.1.0.2:80".parse().unwrap();
        let id = lb.listeners()["web"].id.unwrap();
        lb.set_health("web", a, Health::Unhealthy).unwrap();
        assert_eq!(lb.dataplane().active_schedule(id).len(), 1);
        assert!(!lb.listeners()["web"].all_unhealthy());
        lb.set_health("web", b, Health::Unhealthy).unwrap();
        assert!(lb.listeners()["web"].all_unhealthy());
        assert_eq!(lb.dataplane().active_schedule(id).len(), 2);
        lb.set_health("web", a, Health::Healthy).unwrap();
        assert_eq!(lb.dataplane().active_schedule(id).len(), 1);
    }

    #[test]
    fn removing_a_backend_purges_its_entries_only() {
        let mut lb = lb();
        lb.apply(vec![spec(
            "web",
            "10.0.0.100:80",
            &[("10.1.0.1:80", 10), ("10.1.0.2:80", 10)],
        )])
        .unwrap();
        let l = &lb.listeners()["web"];
        let (lid, b1, b2) = (l.id.unwrap(), l.backends[0].id, l.backends[1].id);
        let now = monotonic_ns();
        for (port, b) in [(1000u16, b1), (1001, b2)] {
            lb.dataplane_mut().conns.insert(
                ConnKey {
                    client: 1,
                    client_port: port,
                    listener: lid as u16,
                    proto: 6,
                    _pad: [0; 3],
                },
                ConnValue {
                    last_seen_ns: now,
                    backend: b,
                    state: CONN_OPEN,
                    _pad: [0; 3],
                },
            );
        }
        let mut s = lb.specs();
        s[0].backends.remove(0);
        lb.apply(s).unwrap();
        let dp = lb.dataplane();
        assert_eq!(dp.conns.len(), 1);
        assert_eq!(dp.conns.values().next().unwrap().backend, b2);
        assert_eq!(dp.backends[&b1].flags, 0);
        assert_eq!(dp.backend_addr.len(), 1);
    }

    #[test]
    fn restore_reuses_ids_from_the_maps() {
        let mut lb = lb();
        let cfg = vec![
            spec("a", "10.0.0.100:80", &[("10.1.0.1:80", 10)]),
            spec(
                "b",
                "10.0.0.101:80",
                &[("10.1.0.2:80", 10), ("10.1.0.3:80", 5)],
            ),
        ];
        lb.apply(cfg.clone()).unwrap();
        let ids: Vec<(Option<u32>, Vec<u32>)> = lb
            .listeners()
            .values()
            .map(|l| (l.id, l.backends.iter().map(|b| b.id).collect()))
            .collect();
        let dp = std::mem::take(lb.dataplane_mut());
        // A new daemon over the same maps, config applied in another order.
        let mut lb2 = Balancer::restore(dp).unwrap();
        let mut rev = cfg.clone();
        rev.reverse();
        lb2.apply(rev).unwrap();
        lb2.release_unclaimed().unwrap();
        let ids2: Vec<(Option<u32>, Vec<u32>)> = lb2
            .listeners()
            .values()
            .map(|l| (l.id, l.backends.iter().map(|b| b.id).collect()))
            .collect();
        assert_eq!(ids, ids2);
    }

    #[test]
    fn sweep_removes_expired_entries_only() {
        let mut lb = lb();
        let mut s = spec("web", "10.0.0.100:80", &[("10.1.0.1:80", 10)]);
        s.idle_timeout = Some(10);
        s.persist = 5;
        lb.apply(vec![s]).unwrap();
        let lid = lb.listeners()["web"].id.unwrap() as u16;
        let bid = lb.listeners()["web"].backends[0].id;
        let now = 1_000 * NS_PER_SEC;
        let conn = |port, age_s: u64, state, backend| {
            (
                ConnKey {
                    client: 7,
                    client_port: port,
                    listener: lid,
                    proto: 6,
                    _pad: [0; 3],
                },
                ConnValue {
                    last_seen_ns: now - age_s * NS_PER_SEC,
                    backend,
                    state,
                    _pad: [0; 3],
                },
            )
        };
        let entries = [
            conn(1, 5, CONN_OPEN, bid),  // live
            conn(2, 11, CONN_OPEN, bid), // idle too long
            conn(3, 9, CONN_FIN, bid),   // FIN, under 10 s
            conn(4, 5, CONN_OPEN, 999),  // unknown backend: the control plane's to purge
        ];
        let policy = lb.sweep_policy();
        let dp = lb.dataplane_mut();
        dp.conns.extend(entries);
        dp.sessions.insert(
            SessionKey {
                client: 7,
                listener: lid,
                _pad: 0,
            },
            SessionValue {
                last_seen_ns: now - 6 * NS_PER_SEC,
                backend: bid,
                _pad: 0,
            },
        );
        let policy = std::sync::Arc::new(policy);
        let r = sweep(dp, &|| policy.clone(), now, std::time::Duration::ZERO).unwrap();
        assert_eq!(r.conns_scanned, 4);
        assert_eq!(r.conns_removed, 1);
        assert_eq!(r.sessions_removed, 1);
        let mut left: Vec<u16> = dp.conns.keys().map(|k| k.client_port).collect();
        left.sort_unstable();
        assert_eq!(left, vec![1, 3, 4]);
    }
}
