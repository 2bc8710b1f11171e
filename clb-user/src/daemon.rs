//! `clb daemon`: the wiring. Takes the locks (one daemon per datapath), loads the datapath onto
//! the interfaces (reusing pinned maps and links, so a restart or crash loses no flow and no
//! persisted client), hands it to the controller (which reconciles the pins with the config
//! file), and runs the supervised loops around it: API, sweeper, drains, health checks, HTTP
//! listeners, metrics, BGP, and a watchdog that notices a datapath torn down underneath.
//!
//! Nothing imports this module but `main`.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clb_common::{LISTENER_ADDR_MAP, XDP_PROGRAM};
use tokio::signal::unix::SignalKind;
use tracing::{error, info, warn};

use crate::{
    api::{self, server::Api},
    bgp::Speaker,
    console,
    control::{
        ControlOptions, Controller,
        file::{ConfigFile, ConfigFileError},
        status::{DaemonInfo, InterfaceState},
    },
    datapath::{
        loader::{self, AttachMode, TableSizes},
        lock,
        sweep::sweep,
    },
    health, l7, metrics, supervise,
    time::monotonic_ns,
};

/// Daemon settings (command-line flags).
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    pub config: PathBuf,
    pub init_config: bool,
    pub ifaces: Vec<String>,
    pub xdp_mode: AttachMode,
    pub bpffs: PathBuf,
    pub api: PathBuf,
    pub metrics: Option<SocketAddr>,
    pub console: Option<SocketAddr>,
    pub console_token_file: Option<PathBuf>,
    pub console_session_idle: Duration,
    pub sweep_interval: Duration,
    /// State kept across restarts (the HTTP cookie key, the console token, BIRD's files).
    pub state_dir: PathBuf,
    pub bird: PathBuf,
    /// HTTP access log: a file or `-` (standard output); none by default.
    pub access_log: Option<PathBuf>,
    pub access_log_format: crate::l7::access::Format,
}

/// Pause after each batch the sweeper walks (1024 entries, a fraction of a millisecond of
/// work): keeps a big sweep from competing with the datapath flat out, at ~0.25 s per million
/// entries.
pub const SWEEP_PAUSE: Duration = Duration::from_micros(250);

/// Whether the pins under `bpffs` hold a configured datapath (at least one listener address).
fn pins_hold_listeners(bpffs: &std::path::Path) -> bool {
    let pin = bpffs.join("maps").join(LISTENER_ADDR_MAP);
    let Ok(m) = aya::maps::MapData::from_pin(&pin) else {
        return false;
    };
    let Ok(h) = aya::maps::HashMap::<_, clb_common::ListenerKey, clb_common::ListenerRef>::try_from(
        aya::maps::Map::HashMap(m),
    ) else {
        return false;
    };
    h.keys().next().is_some()
}

/// Reads the config file, or refuses to start (before anything is created, loaded or
/// changed: a pinned datapath keeps serving as it is). `None`: the file does not exist and
/// `--init-config` asks for an empty one, to be created once the locks are held.
fn read_config(opts: &DaemonOptions) -> anyhow::Result<Option<ConfigFile>> {
    match ConfigFile::load(&opts.config) {
        Ok(c) => Ok(Some(c)),
        Err(ConfigFileError::Missing { .. }) if opts.init_config => Ok(None),
        // `{e}` holds the whole reason (its source chain would print it twice).
        Err(e) => Err(anyhow::anyhow!("{e}").context(
            "refusing to start (nothing was loaded or changed; a pinned datapath keeps serving)",
        )),
    }
}

/// Creates the empty config file `--init-config` asked for — unless the pins already hold a
/// configured datapath, which an empty configuration would take down.
fn init_config(opts: &DaemonOptions) -> anyhow::Result<ConfigFile> {
    let path = &opts.config;
    if pins_hold_listeners(&opts.bpffs) {
        bail!(
            "refusing to start: {} does not exist, and the datapath pinned at {} holds listeners; starting with an empty configuration would take them down (check --config)",
            path.display(),
            opts.bpffs.display()
        );
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    ConfigFile::default()
        .save(path)
        .context("creating the config file")?;
    info!(config = %path.display(), "created an empty config file (--init-config)");
    Ok(ConfigFile::default())
}

/// The addresses of this network namespace's interfaces (but loopback and IPv6 link-local).
fn local_addrs() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we walk read-only and free once.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut p = ifap;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() && i32::from((*a).sa_family) == libc::AF_INET {
                let sin = a as *const libc::sockaddr_in;
                let ip = Ipv4Addr::from(u32::from_be((*sin).sin_addr.s_addr));
                if !ip.is_loopback() {
                    out.push(IpAddr::V4(ip));
                }
            }
            if !a.is_null() && i32::from((*a).sa_family) == libc::AF_INET6 {
                let sin6 = a as *const libc::sockaddr_in6;
                let ip = Ipv6Addr::from((*sin6).sin6_addr.s6_addr);
                if !ip.is_loopback() && (ip.segments()[0] & 0xffc0) != 0xfe80 {
                    out.push(IpAddr::V6(ip));
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn cpus() -> u32 {
    // SAFETY: plain sysconf query.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    u32::try_from(n).unwrap_or(1).max(1)
}

/// File descriptors kept for the control plane whatever the HTTP clients take: the API and its
/// clients, the config file, the pins and map handles, health checks, BIRD, the console.
pub const CONTROL_FDS: u64 = 256;

/// Raises the soft limit of open files to the hard one (a shell's `ulimit -n 1024` is often
/// far below what the host allows); returns the soft limit in force.
fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            warn!(
                "getrlimit(RLIMIT_NOFILE): {}",
                std::io::Error::last_os_error()
            );
            return 1024;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                info!(
                    from = r.rlim_cur,
                    to = r.rlim_max,
                    "raised the open-files limit to its hard limit"
                );
                r.rlim_cur = r.rlim_max;
            } else {
                warn!(
                    "could not raise the open-files limit from {}: {}",
                    r.rlim_cur,
                    std::io::Error::last_os_error()
                );
            }
        }
    }
    r.rlim_cur
}

/// Client connections the HTTP listeners may hold at once under an open-files limit of
/// `nofile`: two descriptors each (client and backend), after [`CONTROL_FDS`] (and an eighth
/// of the limit, for idle backend connections in the pools) are set aside.
fn http_connection_budget(nofile: u64) -> usize {
    let reserve = CONTROL_FDS + nofile / 8;
    let budget = nofile.saturating_sub(reserve) / 2;
    info!(
        nofile,
        http_connections = budget,
        "HTTP listeners hold at most this many client connections at once (2 descriptors each; the rest is the control plane's)"
    );
    usize::try_from(budget).unwrap_or(usize::MAX)
}

/// Tells systemd (`Type=notify`) the daemon's state, if it runs under it.
fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = PathBuf::from(path);
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            warn!("sd_notify: {e}");
            return;
        }
    };
    let bytes = path.as_os_str().as_encoded_bytes();
    let r = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt as _;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = r {
        warn!("sd_notify {state:?}: {e}");
    }
}

/// Feeds systemd's watchdog (`WatchdogSec=` sets `WATCHDOG_USEC`) at half its period, but only
/// while the daemon is alive where it matters: each ping follows a probe that takes the control
/// plane's writer lock (a change stuck forever fails it) and reads the datapath's counters map,
/// on the blocking pool, bounded by the period. A wedged runtime, a frozen control plane or an
/// unreadable datapath stop the pings, and systemd restarts the daemon — which breaks no flow,
/// the datapath and its tables being pinned.
fn spawn_watchdog(ctl: Arc<Controller>) -> Option<tokio::task::JoinHandle<()>> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        && pid != std::process::id()
    {
        return None;
    }
    let every = Duration::from_micros(usec / 2).max(Duration::from_millis(100));
    info!(
        every_ms = every.as_millis() as u64,
        "feeding the systemd watchdog"
    );
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let c = ctl.clone();
            let probe = tokio::task::spawn_blocking(move || {
                drop(c.config());
                c.reader().counters().map(drop)
            });
            match tokio::time::timeout(every, probe).await {
                Ok(Ok(Ok(()))) => sd_notify("WATCHDOG=1"),
                Ok(Ok(Err(e))) => warn!("watchdog probe: reading the datapath: {e}"),
                Ok(Err(e)) => warn!("watchdog probe failed: {e}"),
                Err(_) => warn!(?every, "watchdog probe did not finish in time"),
            }
        }
    }))
}

/// Runs the daemon until SIGTERM/SIGINT. The datapath, its pins and links stay when it stops.
pub async fn run(opts: DaemonOptions) -> anyhow::Result<()> {
    if opts.ifaces.is_empty() {
        bail!("--iface needs at least one interface");
    }
    let cfg = read_config(&opts)?;
    let http_budget = http_connection_budget(raise_nofile());
    if loader::ensure_bpffs(&opts.bpffs)? {
        info!(dir = %opts.bpffs.display(), "bpffs was not mounted; mounted it");
    }
    // One daemon per datapath: taken before anything is loaded or changed.
    let _locks = lock::acquire(&opts.bpffs, &opts.api, &opts.ifaces)
        .context("refusing to start (another daemon serves this datapath)")?;
    let cfg = match cfg {
        Some(c) => c,
        None => init_config(&opts)?,
    };
    let sizes = TableSizes {
        connections: cfg.tables.connections,
        half_open: cfg.tables.half_open,
        sessions: cfg.tables.sessions,
        connections6: cfg.tables.connections6,
        half_open6: cfg.tables.half_open6,
        sessions6: cfg.tables.sessions6,
    };
    let mut loaded = match loader::load(Some(&opts.bpffs), &sizes) {
        Ok(l) => l,
        Err(e) => {
            // A refused first load leaves no empty pin directory behind (remove_dir only
            // removes an empty one).
            std::fs::remove_dir(&opts.bpffs).ok();
            return Err(e);
        }
    };
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
    let reader = Arc::new(loaded.dataplane.reader()?);
    let loader::Loaded {
        mut ebpf,
        dataplane,
        mut resized,
        ..
    } = loaded;
    let bgp_spec = cfg.bgp.clone();
    let upgraded = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let ctl = Controller::start(
        Box::new(dataplane),
        reader,
        cfg,
        ControlOptions {
            config_path: opts.config.clone(),
            local_addrs: local_addrs(),
            cpus: cpus(),
            info: DaemonInfo {
                ifaces: opts.ifaces.clone(),
                xdp_mode: format!("{:?}", opts.xdp_mode).to_lowercase(),
                bpffs: opts.bpffs.clone(),
                config: opts.config.clone(),
                started: Instant::now(),
                upgraded: upgraded.clone(),
            },
        },
    )
    .context("applying the configuration to the datapath")?;
    for iface in &opts.ifaces {
        let ifindex = loader::attach(
            &mut ebpf,
            XDP_PROGRAM,
            iface,
            opts.xdp_mode,
            Some(&opts.bpffs),
        )?;
        ctl.add_device(ifindex)?;
        ctl.interfaces()
            .set(iface, InterfaceState::Attached, ifindex, None);
    }
    let done = loader::copy_resized(&mut resized, true)?;
    if let Ok(mut u) = upgraded.lock() {
        *u = done;
    }
    let ebpf = Arc::new(std::sync::Mutex::new(ebpf));
    match std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward") {
        Ok(v) if v.trim() == "0" => warn!(
            "net.ipv4.ip_forward is 0: packets the datapath hands to the kernel (no neighbour \
             entry yet) will not be forwarded"
        ),
        _ => {}
    }
    let v6 = ctl
        .snapshot()
        .listeners
        .iter()
        .any(|l| l.spec.vip.is_ipv6());
    match std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding") {
        Ok(v) if v6 && v.trim() == "0" => warn!(
            "net.ipv6.conf.all.forwarding is 0: the datapath's route lookups for IPv6 listeners \
             fail (counted as drop_no_route); set it to 1"
        ),
        _ => {}
    }
    info!(
        ifaces = ?opts.ifaces,
        mode = ?opts.xdp_mode,
        bpffs = %opts.bpffs.display(),
        listeners = ctl.snapshot().listeners.len(),
        "datapath attached"
    );

    let key_path = opts.state_dir.join("cookie.key");
    let cookie_key = l7::load_or_create_key(&key_path)
        .with_context(|| format!("loading the HTTP cookie key {}", key_path.display()))?;
    let mut proxies = l7::Proxies::new(cookie_key, l7::ConnBudget::new(http_budget));
    if let Some(dest) = &opts.access_log {
        proxies = proxies.with_access_log(
            l7::access::AccessLog::open(dest.clone(), opts.access_log_format).await?,
        );
        info!(access_log = %dest.display(), "HTTP access log on");
    }
    let proxies = Arc::new(proxies);
    let speaker = match bgp_spec {
        Some(spec) => Some(Arc::new(Speaker::new(spec, &opts.state_dir, &opts.bird)?)),
        None => None,
    };
    let api = Api {
        ctl: ctl.clone(),
        l7: proxies.clone(),
        bgp: speaker.clone(),
        sign_in: Arc::new(crate::api::signin::SignInCodes::new(opts.console)),
        source: crate::control::audit::Source::Api,
    };

    let mut loops = Vec::new();
    {
        let (c, every) = (ctl.clone(), opts.sweep_interval);
        loops.push(supervise::spawn(ctl.clone(), "sweeper", move || {
            sweeper(c.clone(), every)
        }));
        let c = ctl.clone();
        loops.push(supervise::spawn(ctl.clone(), "drains", move || {
            drains(c.clone())
        }));
        let c = ctl.clone();
        loops.push(supervise::spawn(ctl.clone(), "slow-start", move || {
            ramps(c.clone())
        }));
        let c = ctl.clone();
        loops.push(supervise::spawn(ctl.clone(), "health", move || {
            let c = c.clone();
            async move {
                health::run(c).await;
                Ok(())
            }
        }));
        let c = ctl.clone();
        loops.push(supervise::spawn(ctl.clone(), "dsr-neighbours", move || {
            health::warm_neighbours(c.clone())
        }));
        let (c, p) = (ctl.clone(), proxies.clone());
        loops.push(supervise::spawn(ctl.clone(), "http-listeners", move || {
            let (c, p) = (c.clone(), p.clone());
            async move {
                l7::run(c, p).await;
                Ok(())
            }
        }));
        let c = ctl.clone();
        loops.push(supervise::spawn(ctl.clone(), "flood-watch", move || {
            flood_watch(c.clone())
        }));
        let (c, e, o) = (ctl.clone(), ebpf.clone(), Arc::new(opts.clone()));
        loops.push(supervise::spawn(ctl.clone(), "interfaces", move || {
            interfaces(c.clone(), e.clone(), o.clone())
        }));
        let (c, dir) = (ctl.clone(), opts.bpffs.clone());
        loops.push(supervise::spawn(ctl.clone(), "watchdog", move || {
            watchdog(c.clone(), dir.clone())
        }));
        if let Some(addr) = opts.metrics {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics address {addr}"))?;
            info!(%addr, "serving Prometheus metrics at /metrics");
            let l = Arc::new(std::sync::Mutex::new(Some(l)));
            let a = api.clone();
            loops.push(supervise::spawn(ctl.clone(), "metrics", move || {
                let (l, a) = (l.clone(), a.clone());
                async move {
                    let taken = crate::control::lock(&l).take();
                    let listener = match taken {
                        Some(l) => l,
                        None => tokio::net::TcpListener::bind(addr).await?,
                    };
                    Ok(metrics::serve(listener, a).await?)
                }
            }));
        }
        if let Some(s) = &speaker {
            let (c, s) = (ctl.clone(), s.clone());
            loops.push(supervise::spawn(ctl.clone(), "bgp", move || {
                s.clone().run(c.clone())
            }));
        }
        if let Some(addr) = opts.console {
            let token =
                console::load_or_create_token(opts.console_token_file.as_deref(), &opts.state_dir)?;
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the console address {addr}"))?;
            info!(
                %addr,
                token = %opts
                    .console_token_file
                    .clone()
                    .unwrap_or_else(|| opts.state_dir.join("console.token"))
                    .display(),
                "serving the web console"
            );
            let series = console::Series::new();
            let web = console::Console::new(
                api.clone(),
                token,
                series.clone(),
                console::ConsoleOptions {
                    session_idle: opts.console_session_idle,
                },
            );
            let l = Arc::new(std::sync::Mutex::new(Some(l)));
            loops.push(supervise::spawn(ctl.clone(), "console", move || {
                let (l, web) = (l.clone(), web.clone());
                async move {
                    let taken = crate::control::lock(&l).take();
                    let listener = match taken {
                        Some(l) => l,
                        None => tokio::net::TcpListener::bind(addr).await?,
                    };
                    Ok(console::serve(listener, web).await?)
                }
            }));
            let a = api.clone();
            loops.push(supervise::spawn(ctl.clone(), "console-series", move || {
                console::sample(a.clone(), series.clone())
            }));
        }
    }

    let listener = api::bind(&opts.api)?;
    info!(api = %opts.api.display(), "API listening");
    sd_notify("READY=1");
    let watchdog = spawn_watchdog(ctl.clone());

    let mut hup = tokio::signal::unix::signal(SignalKind::hangup())?;
    let reloader = {
        let ctl = ctl.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let c = ctl.clone();
                match tokio::task::spawn_blocking(move || c.reload()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => error!("reload failed, keeping the running state: {e}"),
                    Err(e) => error!("reload task failed: {e}"),
                }
            }
        })
    };
    axum::serve(listener, api::server::router(api))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving the API")?;

    info!("stopping; the datapath, its maps and links stay in place");
    sd_notify("STOPPING=1");
    // Withdraw the VIPs first: peers move new flows elsewhere while this node still forwards.
    if let Some(s) = &speaker {
        s.shutdown().await;
    }
    reloader.abort();
    if let Some(w) = watchdog {
        w.abort();
    }
    for l in loops {
        l.abort();
    }
    proxies.stop_all();
    std::fs::remove_file(&opts.api).ok();
    // `ebpf` drops here (the loops holding it are stopped): the programs stay loaded
    // through their pinned links.
    drop(ebpf);
    Ok(())
}

/// Sweeps the tables every `every`, on a blocking thread (a walk of a million entries takes
/// about a second), and publishes the report.
async fn sweeper(ctl: Arc<Controller>, every: Duration) -> anyhow::Result<()> {
    loop {
        let t0 = Instant::now();
        let c = ctl.clone();
        let r = low_priority("clb-sweeper", move || {
            sweep(
                c.reader(),
                &|| c.snapshot().policy.clone(),
                monotonic_ns(),
                SWEEP_PAUSE,
            )
        })
        .await??;
        let removed =
            r.conns_removed + r.half_open_removed + r.sessions_removed + r.pending_removed;
        if removed > 0 {
            info!(
                conns_removed = r.conns_removed,
                half_open_removed = r.half_open_removed,
                sessions_removed = r.sessions_removed,
                pending_removed = r.pending_removed,
                micros = r.micros,
                "swept expired entries"
            );
        }
        ctl.record_sweep(r);
        tokio::time::sleep(every.saturating_sub(t0.elapsed())).await;
    }
}

/// Runs `f` on a thread of its own at the lowest CPU priority (nice 19), so that a table walk
/// yields the CPU to the L7 proxy, the API and the backends on a busy machine.
async fn low_priority<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            // SAFETY: gettid and setpriority on the calling thread only (Linux nice values
            // are per thread).
            let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as u32, 19) };
            if rc != 0 {
                warn!(
                    error = %std::io::Error::last_os_error(),
                    "could not lower the sweeper's CPU priority"
                );
            }
            // The receiver is gone only if the daemon is stopping.
            tx.send(f()).ok();
        })
        .context("starting a sweeper thread")?;
    rx.await.context("the sweeper thread died")
}

/// Cuts the connections of drained backends when their drain deadline passes.
async fn drains(ctl: Arc<Controller>) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let c = ctl.clone();
        let n = tokio::task::spawn_blocking(move || c.finish_drains(Instant::now())).await??;
        if n > 0 {
            info!(
                conns_removed = n,
                "drain deadline reached, connections removed"
            );
        }
    }
}

/// Raises the weights of backends in slow start once a second until they are full.
async fn ramps(ctl: Arc<Controller>) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let c = ctl.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || c.advance_ramps()).await? {
            // Detached or a map write refused: the next tick tries again.
            tracing::debug!("slow start not advanced: {e}");
        }
    }
}

/// Watches flood mode (the datapath switches it) and logs and counts its transitions.
async fn flood_watch(ctl: Arc<Controller>) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let s = ctl.reader().shared_state()?;
        match ctl.flood().observe(monotonic_ns() < s.flood_until_ns) {
            Some(true) => warn!(
                "flood mode ON: new unverified flows exceed the threshold; new TCP flows are placed by the stateless hash and write no state"
            ),
            Some(false) => info!("flood mode off"),
            None => {}
        }
    }
}

/// Notices a datapath torn down under the daemon (`clb teardown --force`): only pins that are
/// gone count. A failure to look (EMFILE when clients hold every descriptor, ENOMEM) is logged
/// once per kind of error and looked at again a second later; it never detaches anything.
async fn watchdog(ctl: Arc<Controller>, bpffs: PathBuf) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut failing: Option<std::io::ErrorKind> = None;
    let mut gone = false;
    loop {
        tick.tick().await;
        if ctl.detached().is_some() {
            continue;
        }
        match loader::attached(&bpffs) {
            Ok(true) => {
                gone = false;
                if failing.take().is_some() {
                    info!(pins = %bpffs.display(), "the datapath's pins can be read again");
                }
            }
            // Seen twice, a second apart: a severed link pin being replaced (see
            // `interfaces`) leaves `links/` empty for an instant.
            Ok(false) if gone => ctl.set_detached(format!(
                "its pins under {} were removed (clb teardown)",
                bpffs.display()
            )),
            Ok(false) => gone = true,
            Err(e) => {
                if failing != Some(e.kind()) {
                    warn!(
                        pins = %bpffs.display(),
                        "cannot look at the datapath's pins ({e}); looking again every second, the datapath is taken as attached"
                    );
                }
                failing = Some(e.kind());
            }
        }
    }
}

/// Follows the `--iface` interfaces as they come and go: one deleted is reported missing (its
/// link is severed; the kernel drops its devmap entry), and when an interface of that name
/// appears again (a new ifindex) the program is attached to it, replacing the severed link
/// pin, and it is put back in the devmap. Looks once a second (`if_nametoindex`), so a
/// re-created interface balances again within about a second.
async fn interfaces(
    ctl: Arc<Controller>,
    ebpf: Arc<std::sync::Mutex<aya::Ebpf>>,
    opts: Arc<DaemonOptions>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if ctl.detached().is_some() {
            continue;
        }
        for iface in &opts.ifaces {
            let Some(known) = ctl.interfaces().get(iface) else {
                continue;
            };
            let Ok(c_iface) = std::ffi::CString::new(iface.as_str()) else {
                continue;
            };
            // SAFETY: a valid NUL-terminated string.
            let now = unsafe { libc::if_nametoindex(c_iface.as_ptr()) };
            if now == 0 {
                if known.state != InterfaceState::Missing {
                    warn!(
                        iface,
                        "interface is gone; the datapath attaches to it again when it is re-created"
                    );
                    ctl.interfaces()
                        .set(iface, InterfaceState::Missing, 0, None);
                }
                continue;
            }
            if known.state == InterfaceState::Attached && known.ifindex == now {
                continue;
            }
            let r = {
                let mut e = crate::control::lock(&ebpf);
                loader::attach(&mut e, XDP_PROGRAM, iface, opts.xdp_mode, Some(&opts.bpffs))
            };
            match r.and_then(|ifindex| {
                ctl.add_device(ifindex)?;
                Ok(ifindex)
            }) {
                Ok(ifindex) => {
                    info!(
                        iface,
                        ifindex, "interface re-created: datapath attached again"
                    );
                    ctl.interfaces()
                        .set(iface, InterfaceState::Attached, ifindex, None);
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    if known.last_error.as_deref() != Some(&msg) {
                        warn!(
                            iface,
                            "attaching to the re-created interface failed: {msg}; trying again every second"
                        );
                    }
                    ctl.interfaces()
                        .set(iface, InterfaceState::Failed, 0, Some(msg));
                }
            }
        }
    }
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
    let term = tokio::signal::unix::signal(SignalKind::terminate());
    match term {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            warn!("no SIGTERM handler ({e}); stopping on Ctrl-C only");
            tokio::signal::ctrl_c().await.ok();
        }
    }
}
