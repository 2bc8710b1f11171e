//! The control plane's state: the configuration plus what is not configured — each backend's
//! health and drain, the balancer's own addresses — and the two things computed from it: the
//! [`Plan`] the balancer writes to the datapath, and the [`Snapshot`] every reader sees.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Instant, SystemTime},
};

use clb_common::{DEFAULT_MAGLEV_SIZE, HALF_OPEN_TIMEOUT_SECS, NS_PER_SEC};
use serde::{Deserialize, Serialize};

use super::{
    file::ConfigFile,
    model::{BackendSpec, ConfigError, Forward, ListenerSpec, Sched},
};
use crate::{
    balancer::{BackendPlan, GlobalPlan, Ids, ListenerPlan, Plan, SchedPlan},
    certs::Loaded,
    datapath::sweep::SweepPolicy,
};

/// Health of a backend as the health checker last decided it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    Unhealthy,
}

/// A backend being drained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drain {
    /// When its remaining connections are cut; `None` once they have been.
    pub deadline: Option<Instant>,
    pub started: SystemTime,
}

/// What is known of a backend besides its configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendRuntime {
    pub health: Health,
    pub health_since: SystemTime,
    pub drain: Option<Drain>,
    /// When its slow start began (it joined, or came back healthy); `None` at full weight.
    pub ramp_from: Option<Instant>,
}

impl BackendRuntime {
    fn new() -> Self {
        Self {
            health: Health::Healthy,
            health_since: SystemTime::now(),
            drain: None,
            ramp_from: None,
        }
    }
}

/// A backend's weight `at`, in its listener's slow start of `secs` seconds begun at `from`:
/// from a tenth of `weight` (at least 1) up to all of it, linearly; `weight` itself outside a
/// slow start.
pub fn ramped_weight(weight: u32, from: Option<Instant>, secs: u32, at: Instant) -> u32 {
    let Some(t0) = from else {
        return weight;
    };
    let total = std::time::Duration::from_secs(u64::from(secs));
    let gone = at.saturating_duration_since(t0);
    if weight == 0 || gone >= total {
        return weight;
    }
    let share = 0.1 + 0.9 * gone.as_secs_f64() / total.as_secs_f64();
    ((f64::from(weight) * share).round() as u32).clamp(1, weight)
}

/// (listener name, backend address).
pub type BackendKey = (String, SocketAddr);

/// Health transitions since the daemon started: (listener, backend, to) → count.
pub type Transitions = BTreeMap<(String, SocketAddr, Health), u64>;

/// HTTPS listeners' loaded certificates, by listener name.
pub type Certs = BTreeMap<String, Arc<[Loaded]>>;

/// Everything the writer owns.
#[derive(Clone, Debug)]
pub struct State {
    pub config: ConfigFile,
    /// HTTPS listeners' certificates as loaded from their files: listener name → in
    /// configuration order. Loaded by the transaction that configured them (or by a reload,
    /// which reads every file again), so a bad file is refused before anything changes.
    pub certs: Certs,
    /// Listeners whose certificates could not be loaded when the daemon started: why. A
    /// change that loads them clears it.
    pub cert_errors: BTreeMap<String, String>,
    pub runtime: HashMap<BackendKey, BackendRuntime>,
    pub transitions: Transitions,
    pub local_addrs: Vec<IpAddr>,
    pub cpus: u32,
}

impl State {
    pub fn new(config: ConfigFile, local_addrs: Vec<IpAddr>, cpus: u32) -> Self {
        let mut s = Self {
            config,
            certs: BTreeMap::new(),
            cert_errors: BTreeMap::new(),
            runtime: HashMap::new(),
            transitions: BTreeMap::new(),
            local_addrs,
            cpus,
        };
        s.reconcile_runtime(None);
        s
    }

    /// Loads the certificates of every HTTPS listener of the configuration. With `reread`
    /// (a reload) every file is read again; otherwise a listener whose certificate files are
    /// the ones already loaded keeps them (an unrelated change never fails on a certificate
    /// that expired since). The first file refused fails the whole change.
    pub fn load_certs(&self, config: &ConfigFile, reread: bool) -> Result<Certs, ConfigError> {
        let now = SystemTime::now();
        let mut out = BTreeMap::new();
        for l in &config.listeners {
            let Some(h) = l.http().filter(|h| h.tls) else {
                continue;
            };
            if !reread
                && let Some(old) = self.certs.get(&l.name)
                && old.len() == h.certs.len()
                && old.iter().zip(&h.certs).all(|(o, c)| o.spec == *c)
            {
                out.insert(l.name.clone(), old.clone());
                continue;
            }
            // Refused at start and not changed since: stays refused (shown by `listener
            // ls`) without blocking changes to everything else.
            if !reread
                && self.cert_errors.contains_key(&l.name)
                && self
                    .config
                    .listeners
                    .iter()
                    .any(|p| p.name == l.name && p.http().map(|x| &x.certs) == Some(&h.certs))
            {
                continue;
            }
            let loaded = h
                .certs
                .iter()
                .map(|c| crate::certs::load(c, now))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ConfigError::Certificate {
                    listener: l.name.clone(),
                    why: e.to_string(),
                })?;
            out.insert(l.name.clone(), loaded.into());
        }
        Ok(out)
    }

    /// Loads every HTTPS listener's certificates, one listener at a time: a listener whose
    /// files are refused gets none and its error is kept in [`State::cert_errors`].
    pub fn load_certs_at_start(&mut self) {
        let config = self.config.clone();
        for l in &config.listeners {
            let one = ConfigFile {
                listeners: vec![l.clone()],
                ..config.clone()
            };
            match self.load_certs(&one, true) {
                Ok(c) => self.certs.extend(c),
                Err(e) => {
                    tracing::warn!(listener = l.name, "{e}");
                    self.cert_errors.insert(l.name.clone(), e.to_string());
                }
            }
        }
    }

    /// Whether `certs` holds exactly the certificates loaded now (same files, same contents).
    pub fn same_certs(&self, certs: &Certs) -> bool {
        self.certs.len() == certs.len()
            && self.certs.iter().zip(certs).all(|((a, x), (b, y))| {
                a == b
                    && x.len() == y.len()
                    && x.iter()
                        .zip(y.iter())
                        .all(|(p, q)| p.spec == q.spec && p.fingerprint == q.fingerprint)
            })
    }

    /// Brings the runtime state in line with the configuration: new backends start healthy
    /// (checks prove otherwise) and, added by a change (`previous` is the configuration before
    /// it), in slow start; removed ones are forgotten, and a backend whose weight or state
    /// (maintenance) changed leaves its drain: the operator decided otherwise.
    pub fn reconcile_runtime(&mut self, previous: Option<&ConfigFile>) {
        let mut next = HashMap::new();
        for l in &self.config.listeners {
            for b in &l.backends {
                let key = (l.name.clone(), b.addr);
                let mut rt = self.runtime.get(&key).copied().unwrap_or_else(|| {
                    let mut rt = BackendRuntime::new();
                    if previous.is_some() && l.slow_start > 0 {
                        rt.ramp_from = Some(Instant::now());
                    }
                    rt
                });
                let old = previous
                    .and_then(|p| p.listeners.iter().find(|x| x.name == l.name))
                    .and_then(|x| x.backends.iter().find(|x| x.addr == b.addr))
                    .map(|x| (x.weight, x.state));
                if old.is_some_and(|o| o != (b.weight, b.state)) {
                    rt.drain = None;
                }
                next.insert(key, rt);
            }
        }
        self.runtime = next;
    }

    fn runtime_of(&self, l: &ListenerSpec, b: &BackendSpec) -> BackendRuntime {
        self.runtime
            .get(&(l.name.clone(), b.addr))
            .copied()
            .unwrap_or_else(BackendRuntime::new)
    }

    /// Backend `b` of `l`'s weight `now` (lower during its slow start).
    pub fn weight_now(&self, l: &ListenerSpec, b: &BackendSpec, now: Instant) -> u32 {
        ramped_weight(b.weight, self.runtime_of(l, b).ramp_from, l.slow_start, now)
    }

    /// Which backends of `l` accept new connections: weight > 0, in service (not `maint`), not
    /// draining, and healthy —
    /// or, when every such backend is unhealthy, all of them (the cloud LB's fail-open rule).
    /// Also returns whether that fail-open rule is in force.
    pub fn accepting(&self, l: &ListenerSpec) -> (Vec<bool>, bool) {
        let eligible: Vec<(bool, Health)> = l
            .backends
            .iter()
            .map(|b| {
                let rt = self.runtime_of(l, b);
                (
                    b.weight > 0 && b.state.is_ready() && rt.drain.is_none(),
                    rt.health,
                )
            })
            .collect();
        let any = eligible.iter().any(|(e, _)| *e);
        let fail_open = any
            && eligible
                .iter()
                .filter(|(e, _)| *e)
                .all(|(_, h)| *h == Health::Unhealthy);
        (
            eligible
                .iter()
                .map(|(e, h)| *e && (fail_open || *h == Health::Healthy))
                .collect(),
            fail_open,
        )
    }

    /// What the datapath should do.
    pub fn plan(&self) -> Plan {
        let now = Instant::now();
        let mut listeners = Vec::new();
        for l in &self.config.listeners {
            let Some(k) = l.l4() else {
                continue;
            };
            let (accepting, _) = self.accepting(l);
            listeners.push(ListenerPlan {
                vip: l.vip,
                proto: l.proto().ip_proto(),
                persist_secs: l.persist,
                idle_timeout_secs: l.idle_timeout_secs(),
                sched: match k.sched {
                    Sched::Wrr => SchedPlan::Wrr,
                    Sched::Lc => SchedPlan::Lc,
                    Sched::Maglev => {
                        SchedPlan::Maglev(k.maglev_size.unwrap_or(DEFAULT_MAGLEV_SIZE))
                    }
                },
                dsr: k.forward == Forward::Dsr,
                persist_mask: k
                    .persist_mask
                    .unwrap_or(if l.vip.is_ipv4() { 32 } else { 128 }),
                backends: l
                    .backends
                    .iter()
                    .zip(accepting)
                    .map(|(b, accepting)| BackendPlan {
                        addr: b.addr,
                        weight: self.weight_now(l, b, now),
                        accepting,
                    })
                    .collect(),
            });
        }
        let mut vips: Vec<IpAddr> = self.config.listeners.iter().map(|l| l.vip.ip()).collect();
        vips.sort_unstable();
        vips.dedup();
        let t = &self.config.tables;
        Plan {
            listeners,
            vips,
            local_addrs: self.local_addrs.clone(),
            global: GlobalPlan {
                flood_per_sec: t.flood_per_sec(),
                cpus: self.cpus,
                rst_per_sec: t.rst_per_sec,
                half_open_timeout_secs: HALF_OPEN_TIMEOUT_SECS,
            },
        }
    }

    /// The view every reader sees, with the datapath ids `ids` gave.
    pub fn snapshot(&self, ids: &Ids, generation: u64) -> Snapshot {
        let now = Instant::now();
        let mut listeners = Vec::new();
        let mut by_id = HashMap::new();
        let mut backend_by_id = HashMap::new();
        let mut policy = SweepPolicy {
            listeners: HashMap::new(),
            half_open_ns: u64::from(HALF_OPEN_TIMEOUT_SECS) * NS_PER_SEC,
        };
        for l in &self.config.listeners {
            let id = l
                .l4()
                .and_then(|_| ids.listener(l.vip, l.proto().ip_proto()));
            let (accepting, all_unhealthy) = self.accepting(l);
            let backends = l
                .backends
                .iter()
                .zip(accepting)
                .map(|(b, accepting)| {
                    let rt = self.runtime_of(l, b);
                    let bid = id.and_then(|i| ids.backend(i, b.addr));
                    if let Some(bid) = bid {
                        backend_by_id.insert(bid, (l.name.clone(), b.addr));
                    }
                    BackendState {
                        spec: b.clone(),
                        weight_now: self.weight_now(l, b, now),
                        id: bid,
                        health: rt.health,
                        health_since: rt.health_since,
                        drain: rt.drain,
                        accepting,
                    }
                })
                .collect();
            if let Some(id) = id {
                by_id.insert(id, listeners.len());
                policy.listeners.insert(
                    id,
                    (
                        u64::from(l.idle_timeout_secs()) * NS_PER_SEC,
                        u64::from(l.persist) * NS_PER_SEC,
                    ),
                );
            }
            listeners.push(ListenerState {
                spec: l.clone(),
                id,
                backends,
                all_unhealthy,
                certs: self
                    .certs
                    .get(&l.name)
                    .cloned()
                    .unwrap_or_else(|| Arc::new([])),
                cert_error: self.cert_errors.get(&l.name).cloned(),
            });
        }
        Snapshot {
            generation,
            config: self.config.clone(),
            listeners,
            by_id,
            backend_by_id,
            policy: Arc::new(policy),
            transitions: self.transitions.clone(),
        }
    }
}

/// A backend as readers see it.
#[derive(Clone, Debug)]
pub struct BackendState {
    pub spec: BackendSpec,
    /// The weight in effect (below `spec.weight` during a slow start).
    pub weight_now: u32,
    /// Datapath id (L4 listeners).
    pub id: Option<u32>,
    pub health: Health,
    pub health_since: SystemTime,
    pub drain: Option<Drain>,
    /// Takes new flows and new persisted clients.
    pub accepting: bool,
}

/// A listener as readers see it.
#[derive(Clone, Debug)]
pub struct ListenerState {
    pub spec: ListenerSpec,
    /// Datapath id (L4 listeners).
    pub id: Option<u32>,
    pub backends: Vec<BackendState>,
    /// Every backend that could take traffic is unhealthy, so all of them get it.
    pub all_unhealthy: bool,
    /// HTTPS: its certificates, in configuration order (empty otherwise).
    pub certs: Arc<[Loaded]>,
    /// HTTPS: why its certificates could not be loaded at start, if so.
    pub cert_error: Option<String>,
}

impl ListenerState {
    pub fn backend(&self, addr: impl Into<SocketAddr>) -> Option<&BackendState> {
        let addr = addr.into();
        self.backends.iter().find(|b| b.spec.addr == addr)
    }
}

/// An immutable picture of the control plane after one transaction. Readers (API GETs,
/// `/metrics`, health checks, HTTP routing, the sweeper) load it atomically and never wait.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Bumped by every transaction.
    pub generation: u64,
    pub config: ConfigFile,
    /// In configuration order.
    pub listeners: Vec<ListenerState>,
    /// Datapath listener id → index into `listeners`.
    pub by_id: HashMap<u32, usize>,
    /// Datapath backend id → (listener name, address).
    pub backend_by_id: HashMap<u32, (String, SocketAddr)>,
    /// What the sweeper expires entries by.
    pub policy: Arc<SweepPolicy>,
    pub transitions: Transitions,
}

impl Snapshot {
    pub fn listener(&self, name: &str) -> Option<&ListenerState> {
        self.listeners.iter().find(|l| l.spec.name == name)
    }

    /// The listener with datapath id `id`.
    pub fn listener_by_id(&self, id: u32) -> Option<&ListenerState> {
        self.by_id.get(&id).map(|i| &self.listeners[*i])
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::ramped_weight;

    #[test]
    fn a_slow_start_ramps_from_a_tenth_to_the_full_weight() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(ramped_weight(50, None, 10, at(0)), 50, "no slow start");
        assert_eq!(ramped_weight(50, Some(t0), 10, at(0)), 5);
        assert_eq!(ramped_weight(50, Some(t0), 10, at(5)), 28);
        assert_eq!(ramped_weight(50, Some(t0), 10, at(10)), 50);
        assert_eq!(ramped_weight(50, Some(t0), 10, at(60)), 50);
        assert_eq!(ramped_weight(3, Some(t0), 10, at(0)), 1, "at least 1");
        assert_eq!(
            ramped_weight(0, Some(t0), 10, at(0)),
            0,
            "quiescent stays so"
        );
        assert_eq!(ramped_weight(10, Some(t0), 0, at(0)), 10, "slow start off");
    }
}
