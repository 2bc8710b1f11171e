//! From a [`Plan`] (what the L4 listeners should be, in datapath terms) and the ids assigned
//! to them, the exact contents of the configuration maps, encoded in `clb-common`'s layouts.
//! A pure function: the same plan and ids always give the same [`DpConfig`].

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use clb_common::{
    BACKEND_F_ACCEPTING, BACKEND_F_PRESENT, BackendAddrInfo, BackendAddrKey, BackendInfo,
    DENY_BACKEND, DENY_LOCAL, DENY_VIP, FLOOD_WINDOW_NS, GlobalConfig, LISTENER_F_ACTIVE,
    LISTENER_F_DSR, LISTENER_F_MAGLEV, LISTENER_F_SHARED_BACKENDS, ListenerInfo, ListenerKey,
    MAX_LISTENERS_PER_BACKEND_ADDR, NO_LISTENER, NS_PER_SEC, WRR_SLOTS, ip_to_be, port_to_be,
    prefix_mask_be,
};

use super::Ids;
use crate::{
    datapath::DpConfig,
    sched::{Member, Scheduler, maglev::Maglev, wrr::Wrr},
};

/// How an L4 listener schedules new clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedPlan {
    Wrr,
    /// Maglev with a table of this many slots.
    Maglev(u32),
}

/// One backend of an L4 listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendPlan {
    pub addr: SocketAddrV4,
    pub weight: u32,
    /// Takes new flows and new persisted clients (weight > 0, healthy or all unhealthy, not
    /// draining).
    pub accepting: bool,
}

/// One L4 listener, as the datapath needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerPlan {
    pub vip: SocketAddrV4,
    /// IP protocol number.
    pub proto: u8,
    pub persist_secs: u32,
    pub idle_timeout_secs: u32,
    pub sched: SchedPlan,
    pub dsr: bool,
    /// Persistence prefix length.
    pub persist_mask: u8,
    pub backends: Vec<BackendPlan>,
}

/// Datapath-wide settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalPlan {
    /// New unverified flows per second, all CPUs, that start flood mode (0 = never).
    pub flood_per_sec: u32,
    /// CPUs the datapath runs on (the threshold is per CPU).
    pub cpus: u32,
    pub rst_per_sec: u32,
    pub half_open_timeout_secs: u32,
}

/// What the datapath should do, whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub listeners: Vec<ListenerPlan>,
    /// Addresses of every VIP, L4 or not (sources refused on packets to a VIP).
    pub vips: Vec<Ipv4Addr>,
    /// The balancer's own addresses (refused as sources too).
    pub local_addrs: Vec<Ipv4Addr>,
    pub global: GlobalPlan,
}

/// The listener address key of `vip` for `proto`.
pub fn listener_key(vip: SocketAddrV4, proto: u8) -> ListenerKey {
    ListenerKey {
        vip: ip_to_be(vip.ip().octets()),
        port: port_to_be(vip.port()),
        proto,
        _pad: 0,
    }
}

/// The VIP marker key of `ip`.
pub fn vip_marker(ip: Ipv4Addr) -> ListenerKey {
    ListenerKey {
        vip: ip_to_be(ip.octets()),
        port: 0,
        proto: 0,
        _pad: 0,
    }
}

/// The map contents for `plan` under `ids` (which must hold an id for every listener and
/// backend of the plan).
pub fn project(plan: &Plan, ids: &Ids) -> DpConfig {
    let mut c = DpConfig::default();
    let mut by_backend_addr: BTreeMap<BackendAddrKey, Vec<u16>> = BTreeMap::new();
    for l in &plan.listeners {
        let Some(id) = ids.listener(l.vip, l.proto) else {
            continue;
        };
        c.listener_addr.insert(listener_key(l.vip, l.proto), id);
        c.listener_addr.insert(vip_marker(*l.vip.ip()), 0);
        let mut flags = LISTENER_F_ACTIVE;
        if matches!(l.sched, SchedPlan::Maglev(_)) {
            flags |= LISTENER_F_MAGLEV;
        }
        if l.dsr {
            flags |= LISTENER_F_DSR;
        }
        c.listeners.insert(
            id,
            ListenerInfo {
                persist_ns: u64::from(l.persist_secs) * NS_PER_SEC,
                idle_timeout_ns: u64::from(l.idle_timeout_secs) * NS_PER_SEC,
                vip: ip_to_be(l.vip.ip().octets()),
                port: port_to_be(l.vip.port()),
                proto: l.proto,
                _pad: 0,
                flags,
                client_mask: prefix_mask_be(l.persist_mask),
            },
        );
        let mut members = Vec::new();
        for b in &l.backends {
            let Some(bid) = ids.backend(id, b.addr) else {
                continue;
            };
            c.backends.insert(
                bid,
                BackendInfo {
                    addr: ip_to_be(b.addr.ip().octets()),
                    port: port_to_be(b.addr.port()),
                    listener: id as u16,
                    flags: BACKEND_F_PRESENT | if b.accepting { BACKEND_F_ACCEPTING } else { 0 },
                },
            );
            if !l.dsr {
                by_backend_addr
                    .entry(BackendAddrKey {
                        addr: ip_to_be(b.addr.ip().octets()),
                        port: port_to_be(b.addr.port()),
                        proto: l.proto,
                        _pad: 0,
                    })
                    .or_default()
                    .push(id as u16);
            }
            c.denied
                .insert(ip_to_be(b.addr.ip().octets()), DENY_BACKEND);
            if b.accepting && b.weight > 0 {
                members.push(Member {
                    id: bid,
                    addr: b.addr,
                    weight: b.weight,
                });
            }
        }
        let schedule = match l.sched {
            SchedPlan::Wrr => Wrr {
                max_len: WRR_SLOTS as usize,
            }
            .schedule(&members),
            SchedPlan::Maglev(size) => Maglev { size }.schedule(&members),
        };
        c.schedules.insert(id, Arc::new(schedule));
    }
    // Listeners sharing a backend address: their replies are told apart only by state.
    for ids in by_backend_addr.values().filter(|ids| ids.len() > 1) {
        for id in ids {
            if let Some(l) = c.listeners.get_mut(&u32::from(*id)) {
                l.flags |= LISTENER_F_SHARED_BACKENDS;
            }
        }
    }
    for (k, mut ids) in by_backend_addr {
        ids.sort_unstable();
        ids.truncate(MAX_LISTENERS_PER_BACKEND_ADDR);
        let mut v = BackendAddrInfo {
            listeners: [NO_LISTENER; MAX_LISTENERS_PER_BACKEND_ADDR],
        };
        for (slot, id) in v.listeners.iter_mut().zip(ids) {
            *slot = id;
        }
        c.backend_addr.insert(k, v);
    }
    for a in &plan.local_addrs {
        c.denied.insert(ip_to_be(a.octets()), DENY_LOCAL);
    }
    for v in &plan.vips {
        c.denied.insert(ip_to_be(v.octets()), DENY_VIP);
    }
    let g = &plan.global;
    let windows_per_sec = NS_PER_SEC / FLOOD_WINDOW_NS;
    c.global = GlobalConfig {
        flood_threshold: if g.flood_per_sec == 0 {
            0
        } else {
            (u64::from(g.flood_per_sec) / windows_per_sec / u64::from(g.cpus.max(1))).max(1) as u32
        },
        rst_per_sec: g.rst_per_sec,
        half_open_timeout_ns: u64::from(g.half_open_timeout_secs) * NS_PER_SEC,
    };
    c
}
