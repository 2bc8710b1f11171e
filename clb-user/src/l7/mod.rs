//! The L7 listeners: HTTP and HTTPS reverse proxies (tokio + hyper, rustls for TLS, HTTP/2 to
//! clients through ALPN) with cookie-insertion session persistence, the equivalent of
//! HAProxy's `cookie NAME insert indirect nocache httponly [secure]` (see [`proxy`] for what
//! a request goes through, [`tls`] for the TLS side).
//!
//! [`run`] keeps the running proxies in line with the controller's snapshots: it starts new
//! listeners, swaps the routing view of running ones (an [`ArcSwap`], so no connection is
//! dropped and no request waits), and stops removed ones. A listener whose address cannot be
//! bound is reported (`clb listener ls`, `clb status`) and retried on the next change; the API
//! refuses to add one whose address is taken in the first place ([`check_bindable`]).

pub mod access;
pub mod cookie;
pub mod proxy;
pub mod tls;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::{info, warn};

pub use self::cookie::{CookieKey, load_or_create_key};
pub use self::proxy::ConnBudget;
use self::proxy::{ListenerState, Snapshot};
use crate::certs::Loaded;
use crate::control::{
    Controller, lock,
    model::{
        DEFAULT_COOKIE_NAME, DEFAULT_HTTP_IO_TIMEOUT, DEFAULT_HTTP_MAX_CONNS,
        DEFAULT_HTTP_MAX_HEADERS, DEFAULT_KEEPALIVE_SECS, SameSite,
    },
};

/// One backend of an HTTP listener, as the control plane sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L7Backend {
    pub addr: SocketAddr,
    pub weight: u32,
    /// Takes new clients (weight > 0, not draining, healthy or all unhealthy).
    pub accepting: bool,
}

/// An HTTP or HTTPS listener's settings.
#[derive(Clone, Debug)]
pub struct L7Config {
    pub name: String,
    pub vip: SocketAddr,
    /// HTTPS: the certificates to serve (chosen by SNI, the first without one). `None`: HTTP.
    pub tls: Option<Arc<[Loaded]>>,
    /// HTTPS: why its certificates could not be loaded at start (it does not serve then).
    pub cert_error: Option<String>,
    /// `SameSite` of the persistence cookie.
    pub samesite: SameSite,
    /// HTTP: redirect every request to `https://` on this port instead of proxying.
    pub redirect_https: Option<u16>,
    /// Request header fields at most.
    pub max_headers: usize,
    /// Cookie persistence, seconds; 0 = off.
    pub persist: u32,
    /// Keep-alive idle timeout, seconds; 0 = close after each response.
    pub keepalive_secs: u32,
    pub cookie_name: String,
    /// Client connections at once.
    pub max_conns: u32,
    /// Write and backend-answer timeout, seconds.
    pub io_timeout_secs: u32,
    /// New clients go to the accepting backend with the fewest requests in flight per unit
    /// of weight (`sched = "lc"`), not by weighted round robin.
    pub least_requests: bool,
    pub backends: Vec<L7Backend>,
}

/// Counters of one backend of an HTTP listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct L7BackendStats {
    pub addr: SocketAddr,
    pub requests: u64,
}

/// Counters of an HTTP listener.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct L7ListenerStats {
    pub name: String,
    pub connections: u64,
    /// Connections open now.
    pub open_connections: u64,
    /// Connections refused at the cap (answered 503).
    pub refused_connections: u64,
    pub requests: u64,
    pub responses_2xx: u64,
    pub responses_3xx: u64,
    pub responses_4xx: u64,
    pub responses_5xx: u64,
    /// Responses that set a persistence cookie (new or rescheduled client, or a refresh).
    pub cookies_set: u64,
    /// Requests routed by a valid persistence cookie.
    pub cookie_hits: u64,
    /// Requests whose backend could not be reached or did not answer in time (502, 504).
    pub upstream_errors: u64,
    /// Requests refused for the client's own fault (bad framing, duplicate Host, too large).
    pub client_errors: u64,
    /// Connections closed because the client stopped reading or sending.
    pub timeouts: u64,
    /// Upgraded connections (WebSocket) passed through.
    #[serde(default)]
    pub upgrades: u64,
    /// Client connections that negotiated HTTP/2.
    #[serde(default)]
    pub h2_connections: u64,
    /// HTTPS: TLS handshakes completed, and of those resumed.
    #[serde(default)]
    pub tls_handshakes: u64,
    #[serde(default)]
    pub tls_resumed: u64,
    /// HTTPS: failed handshakes by reason: timeout, closed, protocol.
    #[serde(default)]
    pub tls_failures: BTreeMap<String, u64>,
    /// Request durations (request head in to response head out): counts per bucket of
    /// [`proxy::LATENCY_BUCKETS`] (not cumulative; the last is +Inf) and their sum, µs.
    #[serde(default)]
    pub latency_buckets: Vec<u64>,
    #[serde(default)]
    pub latency_sum_us: u64,
    pub backends: Vec<L7BackendStats>,
}

struct Running {
    vip: SocketAddr,
    state: Arc<ListenerState>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The HTTP listeners of the daemon.
pub struct Proxies {
    key: CookieKey,
    /// Client connections all listeners may hold at once (file descriptors).
    budget: Arc<ConnBudget>,
    running: Mutex<HashMap<String, Running>>,
    /// Listeners that could not start: name → why.
    failed: Mutex<HashMap<String, String>>,
    /// The controller generation the listeners route by (see [`Proxies::caught_up`]).
    synced: watch::Sender<u64>,
    /// The access log, when the daemon writes one.
    access: Option<Arc<access::AccessLog>>,
    /// Whether [`run`] keeps them in line (a control plane without HTTP listeners' loop,
    /// as in unit tests, has nothing to wait for).
    following: AtomicBool,
}

/// How long an API change waits for the HTTP listeners to route by it.
pub const CATCH_UP: std::time::Duration = std::time::Duration::from_secs(2);

impl Proxies {
    pub fn new(key: CookieKey, budget: Arc<ConnBudget>) -> Self {
        Self {
            key,
            budget,
            running: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            synced: watch::Sender::new(0),
            access: None,
            following: AtomicBool::new(false),
        }
    }

    /// Writes an entry per request to `log`.
    pub fn with_access_log(mut self, log: Arc<access::AccessLog>) -> Self {
        self.access = Some(log);
        self
    }

    /// The access log's (entries written, entries dropped), if there is one.
    pub fn access_log_counts(&self) -> Option<(u64, u64)> {
        self.access.as_ref().map(|a| a.counts())
    }

    /// Waits, at most `timeout`, until the listeners route by the controller's snapshot of
    /// `generation` (or a later one): an API change answers once HTTP traffic follows it,
    /// as L4 traffic does once its maps are written.
    pub async fn caught_up(&self, generation: u64, timeout: std::time::Duration) {
        if !self.following.load(Ordering::Acquire) {
            return;
        }
        let mut rx = self.synced.subscribe();
        // A timeout only means the loop is slow or restarting: the change stands either way.
        let _caught = tokio::time::timeout(timeout, rx.wait_for(|g| *g >= generation)).await;
    }

    /// "serving", or why listener `name` is not.
    pub fn serving(&self, name: &str) -> String {
        if let Some(why) = lock(&self.failed).get(name) {
            return format!("failed: {why}");
        }
        if lock(&self.running).contains_key(name) {
            "serving".into()
        } else {
            "starting".into()
        }
    }

    /// Counters of every running listener.
    pub fn stats(&self) -> Vec<L7ListenerStats> {
        let mut v: Vec<L7ListenerStats> = lock(&self.running)
            .values()
            .map(|r| r.state.stats())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Requests in flight now on each backend of HTTP listener `name` (empty when it does
    /// not run).
    pub fn in_flight(&self, name: &str) -> HashMap<SocketAddr, u64> {
        lock(&self.running)
            .get(name)
            .map(|r| r.state.in_flight())
            .unwrap_or_default()
    }

    /// Makes the running listeners match `configs`: starts new ones, swaps the routing view
    /// of running ones (their connections stay), stops removed ones (or ones whose VIP
    /// changed).
    pub fn sync(&self, configs: Vec<L7Config>) {
        let wanted: HashMap<String, L7Config> =
            configs.into_iter().map(|c| (c.name.clone(), c)).collect();
        let mut running = lock(&self.running);
        let mut failed = lock(&self.failed);
        failed.retain(|n, _| wanted.contains_key(n));
        let stale: Vec<String> = running
            .iter()
            .filter(|(n, r)| {
                wanted
                    .get(*n)
                    .is_none_or(|c| c.vip != r.vip || c.tls.is_some() != r.state.tls.is_some())
            })
            .map(|(n, _)| n.clone())
            .collect();
        for n in stale {
            if let Some(r) = running.remove(&n) {
                r.stop.send_replace(true);
                r.task.abort();
                info!(listener = n, vip = %r.vip, "HTTP listener stopped");
            }
        }
        for (name, cfg) in wanted {
            if let Some(why) = &cfg.cert_error {
                failed.insert(name, why.clone());
                continue;
            }
            match running.get(&name) {
                Some(r) => r.state.update(Snapshot::new(cfg, &self.key)),
                None => match self.start(cfg) {
                    Ok(r) => {
                        failed.remove(&name);
                        running.insert(name, r);
                    }
                    Err(e) => {
                        let why = format!("{e:#}");
                        if failed.get(&name) != Some(&why) {
                            warn!(
                                listener = name,
                                "HTTP listener not started (retried every {} s): {why}",
                                BIND_RETRY.as_secs()
                            );
                        }
                        failed.insert(name, why);
                    }
                },
            }
        }
    }

    fn start(&self, cfg: L7Config) -> anyhow::Result<Running> {
        let vip = cfg.vip;
        let listener =
            bind(vip).with_context(|| format!("binding HTTP listener {} on {vip}", cfg.name))?;
        let name = cfg.name.clone();
        let state = Arc::new(ListenerState::new(
            Snapshot::new(cfg, &self.key),
            self.key.clone(),
            self.budget.clone(),
            self.access.clone(),
        )?);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(proxy::accept_loop(listener, state.clone(), stop_rx));
        info!(listener = name, %vip, tls = state.tls.is_some(), "HTTP listener started");
        Ok(Running {
            vip,
            state,
            stop,
            task,
        })
    }

    /// Stops every listener (daemon shutdown).
    pub fn stop_all(&self) {
        for (_, r) in lock(&self.running).drain() {
            r.stop.send_replace(true);
            r.task.abort();
        }
    }
}

/// The HTTP listeners' configurations in snapshot `snap`.
fn configs(snap: &crate::control::state::Snapshot) -> Vec<L7Config> {
    snap.listeners
        .iter()
        .filter_map(|l| {
            let h = l.spec.http()?;
            Some(L7Config {
                name: l.spec.name.clone(),
                vip: l.spec.vip,
                tls: h.tls.then(|| l.certs.clone()),
                cert_error: l.cert_error.clone(),
                samesite: h.cookie_samesite.unwrap_or_default(),
                redirect_https: h.redirect_https,
                max_headers: h.max_headers.unwrap_or(DEFAULT_HTTP_MAX_HEADERS) as usize,
                persist: l.spec.persist,
                keepalive_secs: h.keepalive_timeout.unwrap_or(DEFAULT_KEEPALIVE_SECS),
                cookie_name: h
                    .cookie_name
                    .clone()
                    .unwrap_or_else(|| DEFAULT_COOKIE_NAME.into()),
                max_conns: h.max_conns.unwrap_or(DEFAULT_HTTP_MAX_CONNS),
                io_timeout_secs: h.io_timeout.unwrap_or(DEFAULT_HTTP_IO_TIMEOUT),
                least_requests: h.sched == crate::control::model::Sched::Lc,
                backends: l
                    .backends
                    .iter()
                    .map(|b| L7Backend {
                        addr: b.spec.addr,
                        weight: b.weight_now,
                        accepting: b.accepting,
                    })
                    .collect(),
            })
        })
        .collect()
}

/// How often a listener that could not bind tries again (its address may come up later, or
/// another process may release it).
pub const BIND_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps the HTTP listeners in line with the configuration and backend states until the
/// controller goes away; retries listeners that could not bind.
pub async fn run(ctl: Arc<Controller>, proxies: Arc<Proxies>) {
    let mut rx = ctl.subscribe();
    proxies.following.store(true, Ordering::Release);
    loop {
        let snap = ctl.snapshot();
        proxies.sync(configs(&snap));
        proxies.synced.send_replace(snap.generation);
        let retry = !lock(&proxies.failed).is_empty();
        tokio::select! {
            r = rx.changed() => if r.is_err() {
                return;
            },
            () = tokio::time::sleep(BIND_RETRY), if retry => {}
        }
    }
}

/// A listening socket on the VIP, with `IP_FREEBIND` so the VIP need not be configured on an
/// interface yet (it usually sits on `lo` of the balancer).
fn bind(vip: SocketAddr) -> anyhow::Result<TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(vip),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    if vip.is_ipv4() {
        s.set_freebind_v4(true)?;
    } else {
        s.set_freebind_v6(true)?;
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&vip.into())?;
    s.listen(1024)?;
    Ok(TcpListener::from_std(s.into())?)
}

/// Whether an HTTP listener could bind `vip` now (the API refuses one that could not).
pub async fn check_bindable(vip: SocketAddr) -> Result<(), String> {
    match bind(vip) {
        Ok(l) => {
            drop(l);
            Ok(())
        }
        Err(e) => Err(format!(
            "an HTTP listener cannot bind {vip}: {e:#} (is another process using it?)"
        )),
    }
}

impl ListenerState {
    fn stats(&self) -> L7ListenerStats {
        let s = self.snapshot.load();
        let c = &self.counters;
        let per = lock(&c.per_backend);
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let (latency_buckets, latency_sum_us) = c.latency.read();
        L7ListenerStats {
            name: s.cfg.name.clone(),
            connections: g(&c.connections),
            open_connections: c.open.load(Ordering::Relaxed) as u64,
            refused_connections: g(&c.refused),
            requests: g(&c.requests),
            responses_2xx: g(&c.by_class[0]),
            responses_3xx: g(&c.by_class[1]),
            responses_4xx: g(&c.by_class[2]),
            responses_5xx: g(&c.by_class[3]),
            cookies_set: g(&c.cookies_set),
            cookie_hits: g(&c.cookie_hits),
            upstream_errors: g(&c.upstream_errors),
            client_errors: g(&c.client_errors),
            timeouts: g(&c.timeouts),
            upgrades: g(&c.upgrades),
            h2_connections: g(&c.h2_connections),
            tls_handshakes: g(&c.tls_handshakes),
            tls_resumed: g(&c.tls_resumed),
            tls_failures: if self.tls.is_some() {
                tls::Failure::ALL
                    .iter()
                    .zip(&c.tls_failures)
                    .map(|(f, n)| (f.as_str().to_owned(), g(n)))
                    .collect()
            } else {
                BTreeMap::new()
            },
            latency_buckets,
            latency_sum_us,
            backends: s
                .cfg
                .backends
                .iter()
                .map(|b| L7BackendStats {
                    addr: b.addr,
                    requests: per.get(&b.addr).copied().unwrap_or(0),
                })
                .collect(),
        }
    }
}
