//! The projection of the control plane's state onto the datapath's maps.
//!
//! [`Balancer::commit`] takes a [`Plan`] (what the L4 listeners should be), assigns ids,
//! computes the exact map contents ([`project::project`]), diffs them against what the maps
//! hold, and writes only the difference, in an order that never lets the datapath see a
//! half-made change: a backend is present (and accepting) before a schedule names it, a
//! schedule is complete before its listener is active, a listener's address appears last when
//! it is added and goes first when it is removed. If any write fails, the writes already made
//! are undone in reverse order, and the maps, the ids and the balancer's view are as before.
//! Entries of removed listeners and backends are purged from the flow tables last.
//!
//! Listener and backend ids are what the flow tables store, so they must survive a daemon
//! restart: [`Balancer::restore`] reads the maps and adopts the ids found there; the same VIP
//! (listener) and the same backend address of a listener keep their id.

pub mod project;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use clb_common::{
    Addr6, BACKEND_F_V6, BackendAddrInfo, BackendAddrKey, BackendAddrKey6, BackendInfo,
    GlobalConfig, ListenerInfo, ListenerInfo6, ListenerKey, ListenerKey6, MAX_BACKENDS,
    MAX_LISTENERS, ip_from_be, ip6_from_be, port_from_be,
};

pub use self::project::{BackendPlan, GlobalPlan, ListenerPlan, Plan, SchedPlan};
use crate::datapath::{Dataplane, DpConfig, DpError, Tables};

/// A failed commit.
#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    /// More listeners or backends than the datapath holds.
    #[error("capacity exceeded: at most {max} {what}")]
    Capacity { what: &'static str, max: usize },
    /// A map write failed; the writes made before it were undone.
    #[error("dataplane: {0} (the change was rolled back)")]
    RolledBack(Box<DpError>),
    /// A map write failed and undoing the earlier writes failed too: the maps may hold part of
    /// the change (the next commit re-reads them and converges).
    #[error("dataplane: {first}; undoing it failed too: {undo}")]
    Inconsistent {
        first: Box<DpError>,
        undo: Box<DpError>,
    },
    /// Purging the entries of removed listeners or backends failed (the change itself is in
    /// place; the entries age out).
    #[error("dataplane: purging removed entries: {0}")]
    Purge(Box<DpError>),
}

/// Listener and backend ids, allocated next-fit so a freed id is reused as late as possible.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ids {
    listeners: BTreeMap<(SocketAddr, u8), u32>,
    backends: BTreeMap<(u32, SocketAddr), u32>,
    next_listener: u32,
    next_backend: u32,
}

impl Ids {
    /// The id of the L4 listener on `vip` for `proto`.
    pub fn listener(&self, vip: SocketAddr, proto: u8) -> Option<u32> {
        self.listeners.get(&(vip, proto)).copied()
    }

    /// The id of backend `addr` of listener id `listener`.
    pub fn backend(&self, listener: u32, addr: SocketAddr) -> Option<u32> {
        self.backends.get(&(listener, addr)).copied()
    }

    /// The ids of a map's contents (a restart).
    fn from_config(c: &DpConfig) -> Self {
        let mut ids = Ids::default();
        for (k, id) in &c.listener_addr {
            if k.proto != 0 && c.listeners.contains_key(id) {
                let vip = SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::from(ip_from_be(k.vip))),
                    port_from_be(k.port),
                );
                ids.listeners.insert((vip, k.proto), *id);
            }
        }
        for (k, id) in &c.listener_addr6 {
            if k.proto != 0 && c.listeners.contains_key(id) {
                let vip = SocketAddr::new(
                    IpAddr::V6(Ipv6Addr::from(ip6_from_be(k.vip))),
                    port_from_be(k.port),
                );
                ids.listeners.insert((vip, k.proto), *id);
            }
        }
        for (id, b) in &c.backends {
            let ip = if b.flags & BACKEND_F_V6 != 0 {
                match c.backends6.get(id) {
                    Some(a) => IpAddr::V6(Ipv6Addr::from(ip6_from_be(*a))),
                    None => continue,
                }
            } else {
                IpAddr::V4(Ipv4Addr::from(ip_from_be(b.addr)))
            };
            let addr = SocketAddr::new(ip, port_from_be(b.port));
            ids.backends.insert((u32::from(b.listener), addr), *id);
        }
        ids.next_listener = ids.listeners.values().max().map_or(0, |m| m + 1) % MAX_LISTENERS;
        ids.next_backend = ids.backends.values().max().map_or(0, |m| m + 1) % MAX_BACKENDS;
        ids
    }

    /// The ids for `plan`: existing ones kept, new ones allocated, the rest released.
    fn assign(&self, plan: &Plan) -> Result<Ids, BalancerError> {
        let mut next = Ids {
            next_listener: self.next_listener,
            next_backend: self.next_backend,
            ..Ids::default()
        };
        let mut used_l: BTreeSet<u32> = BTreeSet::new();
        let mut used_b: BTreeSet<u32> = BTreeSet::new();
        // Keep every id that stays first, so a new one never takes it.
        for l in &plan.listeners {
            if let Some(id) = self.listener(l.vip, l.proto) {
                next.listeners.insert((l.vip, l.proto), id);
                used_l.insert(id);
                for b in &l.backends {
                    if let Some(bid) = self.backend(id, b.addr) {
                        next.backends.insert((id, b.addr), bid);
                        used_b.insert(bid);
                    }
                }
            }
        }
        for l in &plan.listeners {
            let id = match next.listener(l.vip, l.proto) {
                Some(id) => id,
                None => {
                    let id = alloc(&mut used_l, &mut next.next_listener, MAX_LISTENERS).ok_or(
                        BalancerError::Capacity {
                            what: "listeners",
                            max: MAX_LISTENERS as usize,
                        },
                    )?;
                    next.listeners.insert((l.vip, l.proto), id);
                    id
                }
            };
            for b in &l.backends {
                if next.backend(id, b.addr).is_none() {
                    let bid = alloc(&mut used_b, &mut next.next_backend, MAX_BACKENDS).ok_or(
                        BalancerError::Capacity {
                            what: "backends in total",
                            max: MAX_BACKENDS as usize,
                        },
                    )?;
                    next.backends.insert((id, b.addr), bid);
                }
            }
        }
        Ok(next)
    }

    /// listener id → (VIP, proto).
    pub fn listeners(&self) -> impl Iterator<Item = (u32, SocketAddr, u8)> + '_ {
        self.listeners.iter().map(|((v, p), id)| (*id, *v, *p))
    }

    /// backend id → (listener id, address).
    pub fn backends(&self) -> impl Iterator<Item = (u32, u32, SocketAddr)> + '_ {
        self.backends.iter().map(|((l, a), id)| (*id, *l, *a))
    }
}

/// Next-fit id allocation: the lowest free id at or after the cursor, wrapping.
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

/// One map write, or its undo.
#[derive(Clone, Debug, PartialEq)]
enum Op {
    Global(GlobalConfig),
    ListenerAddr(ListenerKey, Option<u32>),
    Listener(u32, ListenerInfo),
    Backend(u32, BackendInfo),
    BackendAddr(BackendAddrKey, Option<BackendAddrInfo>),
    Schedule(u32, Option<Arc<Vec<u32>>>),
    Denied(u32, Option<u32>),
    ListenerAddr6(ListenerKey6, Option<u32>),
    Listener6(u32, ListenerInfo6),
    Backend6(u32, Addr6),
    BackendAddr6(BackendAddrKey6, Option<BackendAddrInfo>),
    Denied6(Addr6, Option<u32>),
}

impl Op {
    fn run(&self, dp: &mut dyn Dataplane) -> Result<(), DpError> {
        match self {
            Op::Global(g) => dp.put_global(g),
            Op::ListenerAddr(k, v) => dp.put_listener_addr(*k, *v),
            Op::Listener(id, v) => dp.put_listener(*id, v),
            Op::Backend(id, v) => dp.put_backend(*id, v),
            Op::BackendAddr(k, v) => dp.put_backend_addr(*k, v.as_ref()),
            Op::Schedule(id, v) => dp.put_schedule(*id, v.as_deref().map(Vec::as_slice)),
            Op::Denied(a, r) => dp.put_denied(*a, *r),
            Op::ListenerAddr6(k, v) => dp.put_listener_addr6(*k, *v),
            Op::Listener6(id, v) => dp.put_listener6(*id, v),
            Op::Backend6(id, a) => dp.put_backend6(*id, a),
            Op::BackendAddr6(k, v) => dp.put_backend_addr6(*k, v.as_ref()),
            Op::Denied6(a, r) => dp.put_denied6(*a, *r),
        }
    }
}

/// The writes that turn `old` into `new`, each with its undo, in a safe order.
fn diff(old: &DpConfig, new: &DpConfig) -> Vec<(Op, Op)> {
    // Phases: lower runs first.
    let mut ops: Vec<(u8, Op, Op)> = Vec::new();
    if old.global != new.global {
        ops.push((0, Op::Global(new.global), Op::Global(old.global)));
    }
    // Listener addresses (and VIP markers): removals first, additions last.
    for (k, v) in &old.listener_addr {
        if new.listener_addr.get(k) != Some(v) && !new.listener_addr.contains_key(k) {
            ops.push((
                1,
                Op::ListenerAddr(*k, None),
                Op::ListenerAddr(*k, Some(*v)),
            ));
        }
    }
    for (k, v) in &new.listener_addr {
        let prev = old.listener_addr.get(k).copied();
        if prev != Some(*v) {
            ops.push((
                11,
                Op::ListenerAddr(*k, Some(*v)),
                Op::ListenerAddr(*k, prev),
            ));
        }
    }
    // Backends: gaining flags (new, or now accepting) before schedules name them; losing
    // them (stopped accepting, removed) after schedules stopped naming them.
    let zero = BackendInfo::default();
    for (id, v) in &new.backends {
        let prev = old.backends.get(id).copied().unwrap_or(zero);
        if prev != *v {
            let phase = if prev.flags & !v.flags == 0 { 2 } else { 8 };
            ops.push((phase, Op::Backend(*id, *v), Op::Backend(*id, prev)));
        }
    }
    for (id, v) in &old.backends {
        if !new.backends.contains_key(id) {
            ops.push((8, Op::Backend(*id, zero), Op::Backend(*id, *v)));
        }
    }
    for (k, v) in &new.backend_addr {
        let prev = old.backend_addr.get(k).copied();
        if prev != Some(*v) {
            ops.push((3, Op::BackendAddr(*k, Some(*v)), Op::BackendAddr(*k, prev)));
        }
    }
    for (k, v) in &old.backend_addr {
        if !new.backend_addr.contains_key(k) {
            ops.push((9, Op::BackendAddr(*k, None), Op::BackendAddr(*k, Some(*v))));
        }
    }
    for (a, r) in &new.denied {
        let prev = old.denied.get(a).copied();
        if prev != Some(*r) {
            ops.push((4, Op::Denied(*a, Some(*r)), Op::Denied(*a, prev)));
        }
    }
    for (a, r) in &old.denied {
        if !new.denied.contains_key(a) {
            ops.push((10, Op::Denied(*a, None), Op::Denied(*a, Some(*r))));
        }
    }
    for (id, s) in &new.schedules {
        let prev = old.schedules.get(id).cloned();
        if prev.as_ref() != Some(s) {
            ops.push((
                5,
                Op::Schedule(*id, Some(s.clone())),
                Op::Schedule(*id, prev),
            ));
        }
    }
    for (id, s) in &old.schedules {
        if !new.schedules.contains_key(id) {
            ops.push((
                7,
                Op::Schedule(*id, None),
                Op::Schedule(*id, Some(s.clone())),
            ));
        }
    }
    let none = ListenerInfo::default();
    for (id, v) in &new.listeners {
        let prev = old.listeners.get(id).copied().unwrap_or(none);
        if prev != *v {
            ops.push((6, Op::Listener(*id, *v), Op::Listener(*id, prev)));
        }
    }
    for (id, v) in &old.listeners {
        if !new.listeners.contains_key(id) {
            ops.push((6, Op::Listener(*id, none), Op::Listener(*id, *v)));
        }
    }
    // IPv6: the same phases. A listener's IPv6 half is in place before the listener is
    // active and goes after it is gone; a backend's address before its flags, and after.
    keyed(
        &mut ops,
        &old.listener_addr6,
        &new.listener_addr6,
        (1, 11),
        |k, v| Op::ListenerAddr6(*k, v.copied()),
    );
    keyed(
        &mut ops,
        &old.backend_addr6,
        &new.backend_addr6,
        (9, 3),
        |k, v| Op::BackendAddr6(*k, v.copied()),
    );
    keyed(&mut ops, &old.denied6, &new.denied6, (10, 4), |k, v| {
        Op::Denied6(*k, v.copied())
    });
    keyed(
        &mut ops,
        &old.listeners6,
        &new.listeners6,
        (7, 5),
        |id, v| Op::Listener6(*id, v.copied().unwrap_or_default()),
    );
    keyed(&mut ops, &old.backends6, &new.backends6, (9, 1), |id, v| {
        Op::Backend6(*id, v.copied().unwrap_or_default())
    });
    ops.sort_by_key(|(phase, _, _)| *phase);
    ops.into_iter().map(|(_, op, undo)| (op, undo)).collect()
}

/// The writes (with undos) that turn map `old` into `new`: removals in phase `phases.0`,
/// additions and changes in `phases.1`; `op(key, Some(value))` writes, `op(key, None)` removes.
fn keyed<K: Ord, V: PartialEq>(
    ops: &mut Vec<(u8, Op, Op)>,
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    phases: (u8, u8),
    op: impl Fn(&K, Option<&V>) -> Op,
) {
    for (k, v) in old {
        if !new.contains_key(k) {
            ops.push((phases.0, op(k, None), op(k, Some(v))));
        }
    }
    for (k, v) in new {
        let prev = old.get(k);
        if prev != Some(v) {
            ops.push((phases.1, op(k, Some(v)), op(k, prev)));
        }
    }
}

/// What a commit did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Map writes made.
    pub writes: usize,
    /// Flow-table entries purged (removed listeners and backends).
    pub purged: u64,
}

/// The datapath writer, the ids, and what the maps hold.
pub struct Balancer {
    dp: Box<dyn Dataplane>,
    ids: Ids,
    applied: DpConfig,
}

impl Balancer {
    /// A balancer over `dp` that adopts the ids and contents already in its maps (a restart
    /// over pinned maps). The next commit reconciles them with the configuration: stale
    /// entries are removed, absent ones written.
    pub fn restore(dp: Box<dyn Dataplane>) -> Result<Self, DpError> {
        let applied = dp.read()?;
        Ok(Self {
            ids: Ids::from_config(&applied),
            applied,
            dp,
        })
    }

    /// The ids in use.
    pub fn ids(&self) -> &Ids {
        &self.ids
    }

    /// What the maps hold, as far as the balancer knows.
    pub fn applied(&self) -> &DpConfig {
        &self.applied
    }

    /// Makes the maps hold `plan` (see the module docs). All or nothing: on error the maps,
    /// ids and view are as before (except [`BalancerError::Inconsistent`] and
    /// [`BalancerError::Purge`]).
    pub fn commit(&mut self, plan: &Plan) -> Result<Outcome, BalancerError> {
        let ids = self.ids.assign(plan)?;
        let next = project::project(plan, &ids);
        let ops = diff(&self.applied, &next);
        let mut done: Vec<&Op> = Vec::new();
        for (op, undo) in &ops {
            if let Err(first) = op.run(self.dp.as_mut()) {
                for u in done.into_iter().rev() {
                    if let Err(undo) = u.run(self.dp.as_mut()) {
                        // Converge on the next commit from what the maps really hold.
                        if let Ok(actual) = self.dp.read() {
                            self.applied = actual;
                        }
                        return Err(BalancerError::Inconsistent {
                            first: Box::new(first),
                            undo: Box::new(undo),
                        });
                    }
                }
                return Err(BalancerError::RolledBack(Box::new(first)));
            }
            done.push(undo);
        }
        let old_l: BTreeSet<u32> = self.applied.listeners.keys().copied().collect();
        let old_b: BTreeSet<u32> = self.applied.backends.keys().copied().collect();
        let gone_l: BTreeSet<u32> = old_l
            .into_iter()
            .filter(|id| !next.listeners.contains_key(id))
            .collect();
        let gone_b: BTreeSet<u32> = old_b
            .into_iter()
            .filter(|id| !next.backends.contains_key(id))
            .collect();
        self.ids = ids;
        self.applied = next;
        let mut out = Outcome {
            writes: ops.len(),
            purged: 0,
        };
        if !gone_l.is_empty() || !gone_b.is_empty() {
            out.purged = crate::datapath::purge(self.dp.tables(), &|l, b| {
                gone_l.contains(&l) || gone_b.contains(&b)
            })
            .map_err(|e| BalancerError::Purge(Box::new(e)))?;
        }
        Ok(out)
    }

    /// Removes the flow-table entries of the backends for which `cut` holds (drained).
    pub fn cut(&mut self, cut: &dyn Fn(u32) -> bool) -> Result<u64, DpError> {
        crate::datapath::cut_connections(self.dp.tables(), cut)
    }

    /// Registers an interface the datapath may redirect to.
    pub fn add_device(&mut self, ifindex: u32) -> Result<(), DpError> {
        self.dp.put_device(ifindex)
    }

    /// The flow tables (tests seed and inspect them through the writer's handles).
    pub fn tables(&mut self) -> &mut dyn Tables {
        self.dp.tables()
    }
}

#[cfg(test)]
mod tests {
    use clb_common::{
        BACKEND_F_ACCEPTING, BACKEND_F_PRESENT, CONN_OPEN, ConnKey, ConnValue, LISTENER_F_ACTIVE,
        NS_PER_SEC,
    };

    use super::*;
    use crate::datapath::mem::MemDataplane;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn listener(vip: &str, backends: &[(&str, u32)]) -> ListenerPlan {
        ListenerPlan {
            vip: sa(vip),
            proto: 6,
            persist_secs: 0,
            idle_timeout_secs: 900,
            sched: SchedPlan::Wrr,
            dsr: false,
            persist_mask: 32,
            backends: backends
                .iter()
                .map(|(a, w)| BackendPlan {
                    addr: sa(a),
                    weight: *w,
                    accepting: *w > 0,
                })
                .collect(),
        }
    }

    fn plan(listeners: Vec<ListenerPlan>) -> Plan {
        Plan {
            vips: listeners.iter().map(|l| l.vip.ip()).collect(),
            listeners,
            local_addrs: vec![],
            global: GlobalPlan {
                flood_per_sec: 65536,
                cpus: 2,
                rst_per_sec: 1000,
                half_open_timeout_secs: 30,
            },
        }
    }

    fn lb() -> (Balancer, MemDataplane) {
        let dp = MemDataplane::new();
        (Balancer::restore(Box::new(dp.clone())).unwrap(), dp)
    }

    #[test]
    fn a_listener_projects_everything() {
        let (mut lb, dp) = lb();
        lb.commit(&plan(vec![listener(
            "10.0.0.100:80",
            &[("10.1.0.1:80", 10), ("10.1.0.2:80", 10)],
        )]))
        .unwrap();
        let id = lb.ids().listener(sa("10.0.0.100:80"), 6).unwrap();
        let s = dp.state();
        let c = &s.config;
        assert_eq!(
            c.listener_addr[&project::listener_key(sa("10.0.0.100:80"), 6).unwrap()],
            id
        );
        assert!(
            c.listener_addr
                .contains_key(&project::vip_marker(Ipv4Addr::new(10, 0, 0, 100)))
        );
        assert_eq!(c.listeners[&id].flags, LISTENER_F_ACTIVE);
        assert_eq!(c.listeners[&id].idle_timeout_ns, 900 * NS_PER_SEC);
        assert_eq!(c.schedules[&id].len(), 2);
        assert_eq!(c.backend_addr.len(), 2);
        assert_eq!(c.denied.len(), 3, "the VIP and two backends");
        assert_eq!(c.global.flood_threshold, 65536 / 10 / 2);
    }

    #[test]
    fn a_quiescent_backend_leaves_the_schedule_but_stays_present() {
        let (mut lb, dp) = lb();
        lb.commit(&plan(vec![listener(
            "10.0.0.100:80",
            &[("10.1.0.1:80", 10), ("10.1.0.2:80", 10)],
        )]))
        .unwrap();
        lb.commit(&plan(vec![listener(
            "10.0.0.100:80",
            &[("10.1.0.1:80", 10), ("10.1.0.2:80", 0)],
        )]))
        .unwrap();
        let id = lb.ids().listener(sa("10.0.0.100:80"), 6).unwrap();
        let b2 = lb.ids().backend(id, sa("10.1.0.2:80")).unwrap();
        assert_eq!(dp.schedule(id).len(), 1);
        assert_eq!(dp.state().config.backends[&b2].flags, BACKEND_F_PRESENT);
    }

    #[test]
    fn only_what_changed_is_written() {
        let (mut lb, dp) = lb();
        let p = plan(vec![listener("10.0.0.100:80", &[("10.1.0.1:80", 10)])]);
        lb.commit(&p).unwrap();
        let w = dp.state().writes;
        assert_eq!(lb.commit(&p).unwrap().writes, 0);
        assert_eq!(dp.state().writes, w);
        let mut q = p.clone();
        q.listeners[0].persist_secs = 60;
        assert_eq!(
            lb.commit(&q).unwrap().writes,
            1,
            "only the listener's settings"
        );
    }

    #[test]
    fn a_failed_write_rolls_back_everything() {
        let (mut lb, dp) = lb();
        let p = plan(vec![listener(
            "10.0.0.100:80",
            &[("10.1.0.1:80", 10), ("10.1.0.2:80", 10)],
        )]);
        lb.commit(&p).unwrap();
        let before_maps = dp.state().config.clone();
        let before_ids = lb.ids().clone();
        let mut q = p.clone();
        q.listeners[0].backends.remove(0);
        q.listeners[0].backends.push(BackendPlan {
            addr: sa("10.1.0.3:80"),
            weight: 10,
            accepting: true,
        });
        q.listeners
            .push(listener("10.0.0.101:80", &[("10.1.0.4:80", 5)]));
        q.vips.push(Ipv4Addr::new(10, 0, 0, 101).into());
        // Fail at every possible write in turn: each time, nothing changed.
        let total = {
            let (mut probe, _) = self::lb();
            probe.commit(&p).unwrap();
            probe.commit(&q).unwrap().writes
        };
        assert!(total > 8, "{total}");
        for n in 0..total as u32 {
            dp.fail_after(Some(n));
            let e = lb.commit(&q).unwrap_err();
            assert!(matches!(e, BalancerError::RolledBack(_)), "{e}");
            dp.fail_after(None);
            assert_eq!(dp.state().config, before_maps, "after failing write {n}");
            assert_eq!(lb.ids(), &before_ids);
            assert_eq!(lb.applied(), &before_maps);
        }
        lb.commit(&q).unwrap();
        assert_ne!(dp.state().config, before_maps);
    }

    #[test]
    fn removing_a_backend_purges_its_entries_only() {
        let (mut lb, dp) = lb();
        let p = plan(vec![listener(
            "10.0.0.100:80",
            &[("10.1.0.1:80", 10), ("10.1.0.2:80", 10)],
        )]);
        lb.commit(&p).unwrap();
        let lid = lb.ids().listener(sa("10.0.0.100:80"), 6).unwrap();
        let b1 = lb.ids().backend(lid, sa("10.1.0.1:80")).unwrap();
        let b2 = lb.ids().backend(lid, sa("10.1.0.2:80")).unwrap();
        for (port, b) in [(1000u16, b1), (1001, b2)] {
            dp.state().conns.insert(
                ConnKey {
                    client: 1,
                    client_port: port,
                    listener: lid as u16,
                    proto: 6,
                    _pad: [0; 3],
                },
                ConnValue {
                    last_seen_ns: 1,
                    backend: b,
                    state: CONN_OPEN,
                    flags: 0,
                    _pad: [0; 2],
                },
            );
        }
        let mut q = p.clone();
        q.listeners[0].backends.remove(0);
        assert_eq!(lb.commit(&q).unwrap().purged, 1);
        let s = dp.state();
        assert_eq!(s.conns.len(), 1);
        assert_eq!(s.conns.values().next().unwrap().backend, b2);
        assert!(!s.config.backends.contains_key(&b1));
        assert_eq!(
            s.config.backends[&b2].flags,
            BACKEND_F_PRESENT | BACKEND_F_ACCEPTING
        );
        assert_eq!(s.config.backend_addr.len(), 1);
    }

    #[test]
    fn a_restart_reuses_ids_and_removes_what_the_config_lost() {
        let (mut lb, dp) = lb();
        let a = listener("10.0.0.100:80", &[("10.1.0.1:80", 10)]);
        let b = listener("10.0.0.101:80", &[("10.1.0.2:80", 10), ("10.1.0.3:80", 5)]);
        lb.commit(&plan(vec![a.clone(), b.clone()])).unwrap();
        let ids = lb.ids().clone();
        // A new daemon over the same maps, config applied in another order, minus a backend.
        let mut lb2 = Balancer::restore(Box::new(dp.clone())).unwrap();
        assert_eq!(lb2.ids(), &ids);
        let mut b2 = b.clone();
        b2.backends.pop();
        lb2.commit(&plan(vec![b2, a])).unwrap();
        let lid = ids.listener(sa("10.0.0.101:80"), 6).unwrap();
        assert_eq!(lb2.ids().listener(sa("10.0.0.101:80"), 6), Some(lid));
        assert_eq!(
            lb2.ids().backend(lid, sa("10.1.0.2:80")),
            ids.backend(lid, sa("10.1.0.2:80"))
        );
        assert!(lb2.ids().backend(lid, sa("10.1.0.3:80")).is_none());
        assert_eq!(dp.state().config.backends.len(), 2);
    }
}
