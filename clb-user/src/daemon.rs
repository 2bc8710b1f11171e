//! `clb daemon`: loads the datapath onto the interfaces (reusing pinned maps and links, so a
//! restart or crash loses no flow and no persisted client), applies the config file, serves
//! the API, sweeps the tables, runs health checks, exports metrics.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clb_common::XDP_PROGRAM;
use tokio::{net::UnixListener, signal::unix::SignalKind, sync::watch};
use tracing::{error, info, warn};

use crate::{
    api::{self, ApiError, HealthTransitionCount, StatsResponse, Status, SweeperStatus},
    balancer::{Balancer, Health, Stats, SweepPolicy, sweep},
    config::ConfigFile,
    dataplane::{AyaDataplane, AyaTables},
    health::HealthManager,
    l7::{self, L7Backend, L7Config, L7Manager},
    loader::{self, AttachMode},
    metrics,
    model::{ConfigError, ListenerSpec, Proto, validate_all},
    time::monotonic_ns,
};

/// Daemon settings (command-line flags).
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    pub config: PathBuf,
    pub ifaces: Vec<String>,
    pub xdp_mode: AttachMode,
    pub bpffs: PathBuf,
    pub api: PathBuf,
    pub metrics: Option<SocketAddr>,
    pub sweep_interval: Duration,
    /// State kept across restarts (the HTTP cookie key).
    pub state_dir: PathBuf,
}

/// State shared by the API handlers and the background loops.
pub struct Shared {
    pub lb: Mutex<Balancer<AyaDataplane>>,
    pub opts: DaemonOptions,
    /// What the sweeper needs, refreshed after every change (under the balancer lock).
    pub policy: Mutex<Arc<SweepPolicy>>,
    pub sweeper: Mutex<SweeperStatus>,
    pub health_transitions: Mutex<Vec<HealthTransitionCount>>,
    /// Bumped after every change; health checks and the HTTP listeners resync on it.
    pub generation: watch::Sender<u64>,
    /// The HTTP (L7) listeners.
    pub l7: tokio::sync::Mutex<L7Manager>,
    started: Instant,
}

impl Shared {
    /// Applies a change to the configuration: `f` edits a copy of the listener specs; the
    /// result is validated as a whole, staged to the config file, applied to the datapath, and
    /// only then renamed into place. Any refusal changes nothing.
    pub fn change(
        &self,
        f: impl FnOnce(&mut Vec<ListenerSpec>) -> Result<(), ConfigError>,
    ) -> Result<(), ApiError> {
        let mut lb = self.lb.lock().expect("balancer lock");
        let mut specs = lb.specs();
        f(&mut specs)?;
        validate_all(&specs)?;
        let staged = ConfigFile {
            listeners: specs.clone(),
        }
        .stage(&self.opts.config)?;
        lb.apply(specs)?;
        staged.commit()?;
        *self.policy.lock().expect("policy lock") = Arc::new(lb.sweep_policy());
        drop(lb);
        self.bump();
        Ok(())
    }

    /// After a runtime change (drain, health): refresh what the loops see.
    pub fn changed(&self) {
        let lb = self.lb.lock().expect("balancer lock");
        *self.policy.lock().expect("policy lock") = Arc::new(lb.sweep_policy());
        drop(lb);
        self.bump();
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Re-reads the config file and applies it. On failure the running state stays as it is.
    pub fn reload(&self) -> anyhow::Result<()> {
        let cfg = ConfigFile::load(&self.opts.config)?;
        let mut lb = self.lb.lock().expect("balancer lock");
        lb.apply(cfg.listeners)?;
        *self.policy.lock().expect("policy lock") = Arc::new(lb.sweep_policy());
        drop(lb);
        self.bump();
        info!(config = %self.opts.config.display(), "configuration reloaded");
        Ok(())
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> Status {
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            ifaces: self.opts.ifaces.clone(),
            xdp_mode: format!("{:?}", self.opts.xdp_mode).to_lowercase(),
            bpffs: self.opts.bpffs.display().to_string(),
            config: self.opts.config.display().to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            sweeper: self.sweeper.lock().expect("sweeper lock").clone(),
        }
    }

    /// Records a health transition (for stats and metrics).
    pub fn record_transition(&self, listener: &str, backend: std::net::SocketAddrV4, to: Health) {
        let mut t = self.health_transitions.lock().expect("transitions lock");
        match t
            .iter_mut()
            .find(|x| x.listener == listener && x.backend == backend && x.to == to)
        {
            Some(x) => x.count += 1,
            None => t.push(HealthTransitionCount {
                listener: listener.into(),
                backend,
                to,
                count: 1,
            }),
        }
    }

    /// `GET /v1/stats`.
    pub async fn stats_response(&self, stats: Stats) -> StatsResponse {
        // Awaited first: no std lock guard may live across an await.
        let http = self.l7.lock().await.stats();
        StatsResponse {
            stats,
            sweeper: self.sweeper.lock().expect("sweeper lock").clone(),
            health_transitions: self
                .health_transitions
                .lock()
                .expect("transitions lock")
                .clone(),
            http,
            current_conns_source: "connection table (live entries)".into(),
        }
    }
}

/// Runs the daemon until SIGTERM/SIGINT. The datapath, its pins and links stay when it stops.
pub async fn run(opts: DaemonOptions) -> anyhow::Result<()> {
    if opts.ifaces.is_empty() {
        bail!("--iface needs at least one interface");
    }
    // A broken config file is refused before anything is loaded.
    let cfg = ConfigFile::load(&opts.config).context("refusing to start")?;
    if loader::ensure_bpffs(&opts.bpffs)? {
        info!(dir = %opts.bpffs.display(), "bpffs was not mounted; mounted it");
    }
    let mut loaded = loader::load(Some(&opts.bpffs))?;
    // Objects built with CLB_EBPF_DEBUG_LOG=1 log drops through aya-log; the logger owns the
    // log map and must live as long as the program.
    let _logger = match aya_log::EbpfLogger::init(&mut loaded.ebpf) {
        Ok(logger) => Some(spawn_ebpf_logger(logger)?),
        Err(aya_log::Error::MapNotFound) => None,
        Err(e) => {
            warn!("eBPF logger unavailable: {e}");
            None
        }
    };
    let mut lb = Balancer::restore(loaded.dataplane)?;
    let restored = lb.dataplane_restored_summary();
    lb.apply(cfg.listeners)
        .context("applying the configuration")?;
    lb.release_unclaimed()?;
    for iface in &opts.ifaces {
        let ifindex = loader::attach(
            &mut loaded.ebpf,
            XDP_PROGRAM,
            iface,
            opts.xdp_mode,
            Some(&opts.bpffs),
        )?;
        lb.add_device(ifindex)?;
    }
    match std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward") {
        Ok(v) if v.trim() == "0" => warn!(
            "net.ipv4.ip_forward is 0: packets the datapath hands to the kernel (no neighbour \
             entry yet) will not be forwarded"
        ),
        _ => {}
    }
    let tables = AyaTables::open(lb.dataplane())?;
    info!(
        ifaces = ?opts.ifaces,
        mode = ?opts.xdp_mode,
        bpffs = %opts.bpffs.display(),
        listeners = lb.listeners().len(),
        restored_listeners = restored.0,
        restored_backends = restored.1,
        "datapath attached"
    );
    let key_path = opts.state_dir.join("cookie.key");
    let cookie_key = l7::load_or_create_key(&key_path)
        .with_context(|| format!("loading the HTTP cookie key {}", key_path.display()))?;
    let (generation, _) = watch::channel(0u64);
    let policy = lb.sweep_policy();
    let shared = Arc::new(Shared {
        lb: Mutex::new(lb),
        opts: opts.clone(),
        policy: Mutex::new(Arc::new(policy)),
        sweeper: Mutex::new(SweeperStatus::default()),
        health_transitions: Mutex::new(Vec::new()),
        generation,
        l7: tokio::sync::Mutex::new(L7Manager::new(cookie_key)),
        started: Instant::now(),
    });

    let stop = Arc::new(AtomicBool::new(false));
    let sweeper = spawn_sweeper(shared.clone(), tables, stop.clone());
    let drains = tokio::spawn(drain_loop(shared.clone()));
    let health = tokio::spawn(HealthManager::run(shared.clone()));
    let l7_task = tokio::spawn(l7_loop(shared.clone()));
    if let Some(addr) = opts.metrics {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics address {addr}"))?;
        info!(%addr, "serving Prometheus metrics at /metrics");
        tokio::spawn(metrics::serve(l, shared.clone()));
    }

    if let Some(dir) = opts.api.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(&opts.api) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", opts.api.display())),
    }
    let listener =
        UnixListener::bind(&opts.api).with_context(|| format!("binding {}", opts.api.display()))?;
    std::fs::set_permissions(&opts.api, std::fs::Permissions::from_mode(0o600))?;
    info!(api = %opts.api.display(), "API listening");

    let mut hup = tokio::signal::unix::signal(SignalKind::hangup())?;
    let reloader = {
        let shared = shared.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let s = shared.clone();
                match tokio::task::spawn_blocking(move || s.reload()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => error!("reload failed, keeping the running state: {e:#}"),
                    Err(e) => error!("reload task failed: {e}"),
                }
            }
        })
    };
    axum::serve(listener, api::router(shared.clone()))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving the API")?;

    info!("stopping; the datapath, its maps and links stay in place");
    stop.store(true, Ordering::Relaxed);
    reloader.abort();
    drains.abort();
    health.abort();
    l7_task.abort();
    sweeper.join().ok();
    std::fs::remove_file(&opts.api).ok();
    // `loaded.ebpf` drops here: the programs stay loaded through their pinned links.
    drop(loaded.ebpf);
    Ok(())
}

/// Reads the datapath's debug log records whenever the ring buffer has data.
fn spawn_ebpf_logger(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    // SAFETY: the logger owns the ring buffer's fd, which stays open and unchanged until the
    // logger (moved into the AsyncFd) is dropped.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("watching the eBPF log ring buffer: {e}"))?;
    info!("datapath debug logging is on (object built with CLB_EBPF_DEBUG_LOG=1)");
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Pause after each batch the sweeper walks (8192 entries, a few ms of work): keeps a big
/// sweep from competing with the datapath flat out, at ~0.25 s per million entries.
pub const SWEEP_PAUSE: Duration = Duration::from_millis(2);

/// The sweeper runs on its own thread with its own map handles, so a long sweep never holds
/// the control plane's lock.
fn spawn_sweeper(
    shared: Arc<Shared>,
    mut tables: AyaTables,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("clb-sweeper".into())
        .spawn(move || {
            let interval = shared.opts.sweep_interval;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let policy = || shared.policy.lock().expect("policy lock").clone();
                match sweep(&mut tables, &policy, monotonic_ns(), SWEEP_PAUSE) {
                    Ok(r) => {
                        if r.conns_removed + r.sessions_removed > 0 {
                            info!(
                                conns_removed = r.conns_removed,
                                sessions_removed = r.sessions_removed,
                                conns_scanned = r.conns_scanned,
                                sessions_scanned = r.sessions_scanned,
                                micros = r.micros,
                                "swept expired entries"
                            );
                        }
                        let mut s = shared.sweeper.lock().expect("sweeper lock");
                        s.runs += 1;
                        s.conns_removed_total += r.conns_removed;
                        s.sessions_removed_total += r.sessions_removed;
                        s.last = r;
                    }
                    Err(e) => error!("sweep failed: {e}"),
                }
                // Sleep in small steps so a stop is seen quickly.
                while t0.elapsed() < interval && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
        .expect("spawning the sweeper thread")
}

/// Keeps the HTTP listeners in line with the configuration and backend states.
async fn l7_loop(shared: Arc<Shared>) {
    let mut rx = shared.generation.subscribe();
    loop {
        let configs: Vec<L7Config> = {
            let lb = shared.lb.lock().expect("balancer lock");
            lb.listeners()
                .values()
                .filter(|l| l.spec.proto == Proto::Http)
                .map(|l| L7Config {
                    name: l.spec.name.clone(),
                    vip: l.spec.vip,
                    persist: l.spec.persist,
                    keepalive_secs: l.spec.keepalive_secs(),
                    cookie_name: l.spec.cookie().to_owned(),
                    backends: l
                        .backends
                        .iter()
                        .zip(l.accepting())
                        .map(|(b, accepting)| L7Backend {
                            addr: b.spec.addr,
                            weight: b.spec.weight,
                            accepting,
                        })
                        .collect(),
                })
                .collect()
        };
        if let Err(e) = shared.l7.lock().await.sync(configs).await {
            error!("HTTP listeners: {e:#}");
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Cuts the connections of drained backends when their drain deadline passes.
async fn drain_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let s = shared.clone();
        let res = tokio::task::spawn_blocking(move || {
            let mut lb = s.lb.lock().expect("balancer lock");
            lb.finish_drains(Instant::now())
        })
        .await;
        match res {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(
                conns_removed = n,
                "drain deadline reached, connections removed"
            ),
            Ok(Err(e)) => error!("finishing drains: {e}"),
            Err(e) => error!("drain task: {e}"),
        }
    }
}
