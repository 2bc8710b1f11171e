//! From a [`Plan`] (what the L4 listeners should be, in datapath terms) and the ids assigned
//! to them, the exact contents of the configuration maps, encoded in `clb-common`'s layouts.
//! A pure function: the same plan and ids always give the same [`DpConfig`].

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use clb_common::{
    BACKEND_F_ACCEPTING, BACKEND_F_PRESENT, BACKEND_F_V6, BackendAddrInfo, BackendAddrKey,
    BackendAddrKey6, BackendInfo, DENY_BACKEND, DENY_LOCAL, DENY_VIP, FLOOD_WINDOW_NS,
    GlobalConfig, LISTENER_F_ACTIVE, LISTENER_F_DSR, LISTENER_F_LC, LISTENER_F_MAGLEV,
    LISTENER_F_SHARED_BACKENDS, LISTENER_F_V6, ListenerInfo, ListenerInfo6, ListenerKey,
    ListenerKey6, MAX_LISTENERS_PER_BACKEND_ADDR, NO_LISTENER, NS_PER_SEC, WRR_SLOTS, ip_to_be,
    ip6_to_be, lc_slot, port_to_be, prefix_mask_be, prefix_mask6_be,
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
    /// Weighted least connections: the schedule lists each accepting backend once with its
    /// weight (`clb_common::lc_slot`); the datapath compares their active connections.
    Lc,
    /// Maglev with a table of this many slots.
    Maglev(u32),
}

/// One backend of an L4 listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendPlan {
    pub addr: SocketAddr,
    pub weight: u32,
    /// Takes new flows and new persisted clients (weight > 0, healthy or all unhealthy, not
    /// draining).
    pub accepting: bool,
}

/// One L4 listener, as the datapath needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerPlan {
    pub vip: SocketAddr,
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
    pub vips: Vec<IpAddr>,
    /// The balancer's own addresses (refused as sources too).
    pub local_addrs: Vec<IpAddr>,
    pub global: GlobalPlan,
}

/// The IPv4 listener address key of `vip` for `proto` (`None` for an IPv6 VIP).
pub fn listener_key(vip: SocketAddr, proto: u8) -> Option<ListenerKey> {
    let IpAddr::V4(ip) = vip.ip() else {
        return None;
    };
    Some(ListenerKey {
        vip: ip_to_be(ip.octets()),
        port: port_to_be(vip.port()),
        proto,
        _pad: 0,
    })
}

/// The IPv6 listener address key of `vip` for `proto` (`None` for an IPv4 VIP).
pub fn listener_key6(vip: SocketAddr, proto: u8) -> Option<ListenerKey6> {
    let IpAddr::V6(ip) = vip.ip() else {
        return None;
    };
    Some(ListenerKey6 {
        vip: ip6_to_be(ip.octets()),
        port: port_to_be(vip.port()),
        proto,
        _pad: [0; 5],
    })
}

/// The VIP marker key of an IPv4 address.
pub fn vip_marker(ip: std::net::Ipv4Addr) -> ListenerKey {
    ListenerKey {
        vip: ip_to_be(ip.octets()),
        port: 0,
        proto: 0,
        _pad: 0,
    }
}

/// Puts `reason` for source `ip` into the family's denied map.
fn deny(c: &mut DpConfig, ip: IpAddr, reason: u32) {
    match ip {
        IpAddr::V4(v4) => {
            c.denied.insert(ip_to_be(v4.octets()), reason);
        }
        IpAddr::V6(v6) => {
            c.denied6.insert(ip6_to_be(v6.octets()), reason);
        }
    }
}

/// The map contents for `plan` under `ids` (which must hold an id for every listener and
/// backend of the plan).
pub fn project(plan: &Plan, ids: &Ids) -> DpConfig {
    let mut c = DpConfig::default();
    // (address key of either family, its listeners).
    let mut by_backend_addr: BTreeMap<(Option<BackendAddrKey>, Option<BackendAddrKey6>), Vec<u16>> =
        BTreeMap::new();
    for l in &plan.listeners {
        let Some(id) = ids.listener(l.vip, l.proto) else {
            continue;
        };
        let mut flags = LISTENER_F_ACTIVE;
        match l.vip.ip() {
            IpAddr::V4(ip) => {
                if let Some(k) = listener_key(l.vip, l.proto) {
                    c.listener_addr.insert(k, id);
                }
                c.listener_addr.insert(vip_marker(ip), 0);
            }
            IpAddr::V6(ip) => {
                flags |= LISTENER_F_V6;
                if let Some(k) = listener_key6(l.vip, l.proto) {
                    c.listener_addr6.insert(k, id);
                }
                let marker = ListenerKey6 {
                    vip: ip6_to_be(ip.octets()),
                    port: 0,
                    proto: 0,
                    _pad: [0; 5],
                };
                c.listener_addr6.insert(marker, 0);
                c.listeners6.insert(
                    id,
                    ListenerInfo6 {
                        vip: ip6_to_be(ip.octets()),
                        client_mask: prefix_mask6_be(l.persist_mask),
                    },
                );
            }
        }
        match l.sched {
            SchedPlan::Maglev(_) => flags |= LISTENER_F_MAGLEV,
            SchedPlan::Lc => flags |= LISTENER_F_LC,
            SchedPlan::Wrr => {}
        }
        if l.dsr {
            flags |= LISTENER_F_DSR;
        }
        let (vip4, mask4) = match l.vip.ip() {
            IpAddr::V4(ip) => (ip_to_be(ip.octets()), prefix_mask_be(l.persist_mask)),
            IpAddr::V6(_) => (0, 0),
        };
        c.listeners.insert(
            id,
            ListenerInfo {
                persist_ns: u64::from(l.persist_secs) * NS_PER_SEC,
                idle_timeout_ns: u64::from(l.idle_timeout_secs) * NS_PER_SEC,
                vip: vip4,
                port: port_to_be(l.vip.port()),
                proto: l.proto,
                _pad: 0,
                flags,
                client_mask: mask4,
            },
        );
        let mut members = Vec::new();
        for b in &l.backends {
            let Some(bid) = ids.backend(id, b.addr) else {
                continue;
            };
            let state = BACKEND_F_PRESENT | if b.accepting { BACKEND_F_ACCEPTING } else { 0 };
            let port = port_to_be(b.addr.port());
            let key = match b.addr.ip() {
                IpAddr::V4(ip) => {
                    c.backends.insert(
                        bid,
                        BackendInfo {
                            addr: ip_to_be(ip.octets()),
                            port,
                            listener: id as u16,
                            flags: state,
                        },
                    );
                    (
                        Some(BackendAddrKey {
                            addr: ip_to_be(ip.octets()),
                            port,
                            proto: l.proto,
                            _pad: 0,
                        }),
                        None,
                    )
                }
                IpAddr::V6(ip) => {
                    c.backends.insert(
                        bid,
                        BackendInfo {
                            addr: 0,
                            port,
                            listener: id as u16,
                            flags: state | BACKEND_F_V6,
                        },
                    );
                    c.backends6.insert(bid, ip6_to_be(ip.octets()));
                    (
                        None,
                        Some(BackendAddrKey6 {
                            addr: ip6_to_be(ip.octets()),
                            port,
                            proto: l.proto,
                            _pad: [0; 5],
                        }),
                    )
                }
            };
            if !l.dsr {
                by_backend_addr.entry(key).or_default().push(id as u16);
            }
            deny(&mut c, b.addr.ip(), DENY_BACKEND);
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
            SchedPlan::Lc => members.iter().map(|m| lc_slot(m.id, m.weight)).collect(),
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
        match k {
            (Some(k4), _) => {
                c.backend_addr.insert(k4, v);
            }
            (None, Some(k6)) => {
                c.backend_addr6.insert(k6, v);
            }
            (None, None) => {}
        }
    }
    for a in &plan.local_addrs {
        deny(&mut c, *a, DENY_LOCAL);
    }
    for v in &plan.vips {
        deny(&mut c, *v, DENY_VIP);
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
