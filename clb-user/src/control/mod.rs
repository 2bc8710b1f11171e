//! The owner of the control plane's state. Every change — an API request, a reload, a health
//! transition, a drain — is one serialized transaction:
//!
//! 1. validate the whole new configuration (a refusal changes nothing);
//! 2. write the config file (atomically, through symlinks; a reload reads it instead, inside
//!    the transaction, so a reload never applies a stale copy);
//! 3. apply the difference to the datapath's maps ([`Balancer::commit`], all or nothing);
//! 4. on a map failure, put the file back as it was — maps, memory and file stay as before;
//! 5. publish a new [`Snapshot`] and bump the generation.
//!
//! Readers never take the writer's lock: they load the latest snapshot ([`arc_swap`]), the
//! sweeper's latest report, and read counters and tables through their own handles.

pub mod audit;
pub mod diff;
pub mod edit;
pub mod file;
pub mod model;
pub mod patch;
pub mod state;
pub mod status;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tracing::{info, warn};

use self::{
    audit::{Audit, Source},
    file::{ConfigFile, ConfigFileError, SaveError},
    model::ConfigError,
    state::{Drain, Health, Snapshot, State},
    status::{DaemonInfo, FloodWatch, Interfaces, Loops, SweepStatus},
};
use crate::{
    balancer::{Balancer, BalancerError},
    datapath::{Dataplane, DpError, Reader, sweep::SweepReport},
};

/// Locks a mutex, recovering the data if a holder panicked (the state it guards is replaced
/// whole by each transaction, never left half-written).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A change that was refused or failed. In every case the running state, the maps and the
/// config file are as they were (but see [`ChangeError::Inconsistent`]).
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The request or the resulting configuration is invalid.
    #[error(transparent)]
    Refused(#[from] ConfigError),
    /// The config file (on reload) cannot be used.
    #[error(transparent)]
    BadFile(#[from] ConfigFileError),
    /// The config file could not be written.
    #[error("{0}; nothing was changed")]
    File(#[from] SaveError),
    /// The datapath refused a write; the change was undone.
    #[error("{0}")]
    Datapath(BalancerError),
    /// The datapath refused a write and undoing it, or restoring the file, failed too.
    #[error("{0}")]
    Inconsistent(String),
    /// The datapath was torn down under the daemon.
    #[error("the datapath is detached ({0}); restart the daemon")]
    Detached(String),
}

/// The refusal of a change to `[tables]` while running.
fn tables_need_restart() -> ConfigError {
    ConfigError::Invalid(
        "[tables] sizes apply when the datapath is loaded: restart the daemon to resize the \
         tables (their live entries are copied)"
            .into(),
    )
}

/// The control plane.
pub struct Controller {
    writer: Mutex<Writer>,
    snapshot: ArcSwap<Snapshot>,
    sweep: ArcSwap<SweepStatus>,
    generation: watch::Sender<u64>,
    reader: Arc<dyn Reader>,
    loops: Loops,
    interfaces: Interfaces,
    flood: FloodWatch,
    detached: Mutex<Option<String>>,
    info: DaemonInfo,
    audit: Audit,
}

struct Writer {
    balancer: Balancer,
    state: State,
    generation: u64,
}

/// Where the controller keeps its file, and what it reports about the daemon.
pub struct ControlOptions {
    pub config_path: PathBuf,
    /// The balancer's own addresses (refused as sources of packets to a VIP).
    pub local_addrs: Vec<IpAddr>,
    /// CPUs the datapath runs on.
    pub cpus: u32,
    pub info: DaemonInfo,
}

impl Controller {
    /// Takes over the datapath `dp` (whatever its maps hold: a restart reconciles them with
    /// `config`, removing stale entries and writing missing ones) and publishes the first
    /// snapshot.
    pub fn start(
        dp: Box<dyn Dataplane>,
        reader: Arc<dyn Reader>,
        config: ConfigFile,
        opts: ControlOptions,
    ) -> Result<Arc<Self>, ChangeError> {
        config.validate()?;
        let mut balancer = Balancer::restore(dp)
            .map_err(|e| ChangeError::Datapath(BalancerError::RolledBack(Box::new(e))))?;
        let mut state = State::new(config, opts.local_addrs, opts.cpus);
        // At start a certificate that cannot be used stops only its own listener (reported
        // by `clb listener ls`); the L4 listeners and the other HTTP ones serve.
        state.load_certs_at_start();
        match balancer.commit(&state.plan()) {
            Ok(o) if o.purged > 0 => info!(
                purged = o.purged,
                "removed the flow entries of listeners and backends no longer configured"
            ),
            Ok(_) => {}
            Err(BalancerError::Purge(e)) => warn!("purging stale entries: {e}"),
            Err(e) => return Err(ChangeError::Datapath(e)),
        }
        let snap = state.snapshot(balancer.ids(), 1);
        let mut w = Writer {
            balancer,
            state,
            generation: 1,
        };
        // Backends in maintenance carry no connection, whatever the pinned tables hold (the
        // file may have been edited while the daemon was down).
        let maint = in_maint(&w.state.config, None);
        if !maint.is_empty() {
            match cut_backends(&mut w, &maint) {
                Ok(n) if n > 0 => info!(
                    removed = n,
                    "cut the connections of backends in maintenance"
                ),
                Ok(_) => {}
                Err(e) => warn!("cutting the connections of backends in maintenance: {e}"),
            }
        }
        let (generation, _) = watch::channel(1);
        Ok(Arc::new(Self {
            snapshot: ArcSwap::from_pointee(snap),
            sweep: ArcSwap::from_pointee(SweepStatus::default()),
            generation,
            reader,
            loops: Loops::default(),
            interfaces: Interfaces::default(),
            flood: FloodWatch::default(),
            detached: Mutex::new(None),
            audit: Audit::default(),
            info: DaemonInfo {
                config: opts.config_path,
                ..opts.info
            },
            writer: Mutex::new(w),
        }))
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Changes whenever a transaction publishes a new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Counters and tables, without the writer.
    pub fn reader(&self) -> &dyn Reader {
        self.reader.as_ref()
    }

    /// The supervised loops' states.
    pub fn loops(&self) -> &Loops {
        &self.loops
    }

    /// The daemon's interfaces: attached, missing or failing.
    pub fn interfaces(&self) -> &Interfaces {
        &self.interfaces
    }

    /// Flood-mode transitions user space has seen.
    pub fn flood(&self) -> &FloodWatch {
        &self.flood
    }

    /// What the daemon reports about itself.
    pub fn info(&self) -> &DaemonInfo {
        &self.info
    }

    /// The sweeper's latest report and totals.
    pub fn sweep_status(&self) -> Arc<SweepStatus> {
        self.sweep.load_full()
    }

    /// Records a sweep (the sweeper's loop calls this).
    pub fn record_sweep(&self, r: SweepReport) {
        let prev = self.sweep.load_full();
        self.sweep.store(Arc::new(SweepStatus {
            runs: prev.runs + 1,
            conns_removed_total: prev.conns_removed_total + r.conns_removed,
            half_open_removed_total: prev.half_open_removed_total + r.half_open_removed,
            sessions_removed_total: prev.sessions_removed_total + r.sessions_removed,
            pending_removed_total: prev.pending_removed_total + r.pending_removed,
            at: Some(SystemTime::now()),
            last: r,
        }));
    }

    /// Why the datapath is detached, if it is.
    pub fn detached(&self) -> Option<String> {
        lock(&self.detached).clone()
    }

    /// Marks the datapath detached (its pins were removed under the daemon).
    pub fn set_detached(&self, why: String) {
        let mut d = lock(&self.detached);
        if d.is_none() {
            warn!("{why}: the datapath no longer runs; changes are refused");
            *d = Some(why);
        }
    }

    fn publish(&self, w: &mut Writer) {
        w.generation += 1;
        let snap = w.state.snapshot(w.balancer.ids(), w.generation);
        self.snapshot.store(Arc::new(snap));
        self.generation.send_replace(w.generation);
    }

    fn check_attached(&self) -> Result<(), ChangeError> {
        match self.detached() {
            Some(why) => Err(ChangeError::Detached(why)),
            None => Ok(()),
        }
    }

    /// The audit trail of changes.
    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    /// Applies `f` to a copy of the configuration as one transaction (see the module docs).
    /// `what` says what was asked (`add backend web 10.0.1.1:80`), for the audit line of a
    /// refusal; an applied change is recorded by its difference. Returns that difference.
    pub fn change(
        &self,
        source: Source,
        what: &str,
        f: impl FnOnce(&mut ConfigFile) -> Result<(), ConfigError>,
    ) -> Result<Vec<String>, ChangeError> {
        let r = (|| {
            let mut w = lock(&self.writer);
            self.check_attached()?;
            let mut next = w.state.config.clone();
            f(&mut next)?;
            self.transact(&mut w, next, true, source)
        })();
        if let Err(e) = &r {
            self.audit.refused(source, what, &e.to_string());
        }
        r
    }

    /// Re-reads the config file and applies it, as one transaction (the file is read inside
    /// it, so concurrent changes are never lost to a stale copy). An unusable file changes
    /// nothing. Returns what changed (see [`diff::diff`]).
    pub fn reload(&self) -> Result<Vec<String>, ChangeError> {
        let r = (|| {
            let mut w = lock(&self.writer);
            self.check_attached()?;
            let next = ConfigFile::load(&self.info.config)?;
            self.transact(&mut w, next, false, Source::Reload)
        })();
        match &r {
            Ok(lines) => info!(
                config = %self.info.config.display(),
                changes = lines.len(),
                "configuration reloaded"
            ),
            Err(e) => self.audit.refused(Source::Reload, "reload", &e.to_string()),
        }
        r
    }

    /// What a reload would change now, applying nothing: the file is read and checked as a
    /// reload would (its certificates read too), and compared with the running configuration.
    pub fn reload_dry_run(&self) -> Result<Vec<String>, ChangeError> {
        let w = lock(&self.writer);
        let next = ConfigFile::load(&self.info.config)?;
        Self::would_change(&w, &next, true)
    }

    /// What [`Controller::change`] with `f` would change now, applying nothing: the result is
    /// validated and its certificates read exactly as the change would.
    pub fn preview(
        &self,
        f: impl FnOnce(&mut ConfigFile) -> Result<(), ConfigError>,
    ) -> Result<Vec<String>, ChangeError> {
        let w = lock(&self.writer);
        let mut next = w.state.config.clone();
        f(&mut next)?;
        next.validate()?;
        Self::would_change(&w, &next, false)
    }

    fn would_change(
        w: &Writer,
        next: &ConfigFile,
        reread: bool,
    ) -> Result<Vec<String>, ChangeError> {
        if next.tables != w.state.config.tables {
            return Err(tables_need_restart().into());
        }
        w.state.load_certs(next, reread)?;
        Ok(diff::diff(&w.state.config, next))
    }

    /// The running configuration.
    pub fn config(&self) -> ConfigFile {
        lock(&self.writer).state.config.clone()
    }

    fn transact(
        &self,
        w: &mut Writer,
        next: ConfigFile,
        write_file: bool,
        source: Source,
    ) -> Result<Vec<String>, ChangeError> {
        next.validate()?;
        if next.tables != w.state.config.tables {
            return Err(tables_need_restart().into());
        }
        // Certificates are read before anything changes: a bad file refuses the change. A
        // reload reads every file again (that is how a renewed certificate is taken in).
        let certs = w.state.load_certs(&next, !write_file)?;
        if next == w.state.config && w.state.same_certs(&certs) {
            return Ok(Vec::new());
        }
        let mut candidate = w.state.clone();
        candidate.certs = certs;
        candidate
            .cert_errors
            .retain(|name, _| !candidate.certs.contains_key(name));
        let previous = std::mem::replace(&mut candidate.config, next);
        candidate.reconcile_runtime(Some(&previous));
        // The file's text before the change: a refused change puts it back byte for byte.
        let replaced = if write_file {
            candidate.config.save(&self.info.config)?
        } else {
            None
        };
        match w.balancer.commit(&candidate.plan()) {
            Ok(_) => {}
            Err(BalancerError::Purge(e)) => warn!("purging removed entries: {e}"),
            Err(e) => {
                let restored = match &replaced {
                    Some(text) => file::write_text(&self.info.config, text),
                    None if write_file => previous.save(&self.info.config).map(drop),
                    None => Ok(()),
                };
                if let Err(restore) = restored {
                    return Err(ChangeError::Inconsistent(format!(
                        "{e}; putting the config file back failed too: {restore}"
                    )));
                }
                return Err(match e {
                    BalancerError::Inconsistent { .. } => ChangeError::Inconsistent(e.to_string()),
                    e => ChangeError::Datapath(e),
                });
            }
        }
        let mut lines = diff::diff(&previous, &candidate.config);
        if lines.is_empty() {
            lines.push("certificates read again".into());
        }
        self.audit.applied(source, &lines);
        w.state = candidate;
        // Backends put in maintenance by this change: their connections are cut now.
        let maint = in_maint(&w.state.config, Some(&previous));
        if !maint.is_empty()
            && let Err(e) = cut_backends(w, &maint)
        {
            warn!("cutting the connections of backends put in maintenance: {e}");
        }
        self.publish(w);
        Ok(lines)
    }

    /// Applies a runtime change (health, drain) as one transaction; no file is written.
    fn runtime_change(
        &self,
        f: impl FnOnce(&mut State) -> Result<bool, ConfigError>,
    ) -> Result<bool, ChangeError> {
        let mut w = lock(&self.writer);
        self.check_attached()?;
        let mut candidate = w.state.clone();
        if !f(&mut candidate)? {
            return Ok(false);
        }
        match w.balancer.commit(&candidate.plan()) {
            Ok(_) => {}
            Err(BalancerError::Purge(e)) => warn!("purging removed entries: {e}"),
            Err(e) => return Err(ChangeError::Datapath(e)),
        }
        w.state = candidate;
        self.publish(&mut w);
        Ok(true)
    }

    /// Records a health transition. Returns whether the backend's health changed.
    pub fn set_health(
        &self,
        listener: &str,
        addr: SocketAddr,
        health: Health,
    ) -> Result<bool, ChangeError> {
        let changed = self.runtime_change(|s| {
            let missing = unknown(s, listener, addr);
            let rt = s
                .runtime
                .get_mut(&(listener.to_owned(), addr))
                .ok_or(missing)?;
            if rt.health == health {
                return Ok(false);
            }
            if health == Health::Healthy
                && s.config
                    .listeners
                    .iter()
                    .any(|l| l.name == listener && l.slow_start > 0)
            {
                rt.ramp_from = Some(Instant::now());
            }
            rt.health = health;
            rt.health_since = SystemTime::now();
            *s.transitions
                .entry((listener.to_owned(), addr, health))
                .or_default() += 1;
            Ok(true)
        })?;
        if changed {
            let (was, now) = match health {
                Health::Healthy => ("unhealthy", "healthy"),
                Health::Unhealthy => ("healthy", "unhealthy"),
            };
            self.audit.applied(
                Source::Health,
                &[format!(
                    "listener {listener} backend {addr}: health {was} → {now}"
                )],
            );
        }
        Ok(changed)
    }

    /// Moves the backends in slow start on: their listeners' plans are computed again with
    /// the weights of now, and a backend whose slow start is over leaves it. Returns whether
    /// any was in slow start (the daemon calls it once a second).
    pub fn advance_ramps(&self) -> Result<bool, ChangeError> {
        {
            let w = lock(&self.writer);
            if w.state.runtime.values().all(|rt| rt.ramp_from.is_none()) {
                return Ok(false);
            }
        }
        self.runtime_change(|s| {
            let now = Instant::now();
            let secs: HashMap<String, u32> = s
                .config
                .listeners
                .iter()
                .map(|l| (l.name.clone(), l.slow_start))
                .collect();
            let mut any = false;
            for ((listener, _), rt) in s.runtime.iter_mut() {
                if let Some(t0) = rt.ramp_from {
                    any = true;
                    let total =
                        Duration::from_secs(u64::from(secs.get(listener).copied().unwrap_or(0)));
                    if now.saturating_duration_since(t0) >= total {
                        rt.ramp_from = None;
                    }
                }
            }
            Ok(any)
        })
    }

    /// Starts draining a backend: no new connections or persisted clients; at `deadline` (now,
    /// with `None`) its remaining connections are cut.
    pub fn drain(
        &self,
        source: Source,
        listener: &str,
        addr: SocketAddr,
        deadline: Option<Instant>,
    ) -> Result<(), ChangeError> {
        let what = format!(
            "listener {listener} backend {addr}: drain{}",
            match deadline {
                Some(t) => format!(
                    " (connections cut in {} s)",
                    t.saturating_duration_since(Instant::now())
                        .as_secs_f64()
                        .round()
                ),
                None => ", connections cut now".into(),
            }
        );
        let r = self.runtime_change(|s| {
            let missing = unknown(s, listener, addr);
            let rt = s
                .runtime
                .get_mut(&(listener.to_owned(), addr))
                .ok_or(missing)?;
            rt.drain = Some(Drain {
                deadline: Some(deadline.unwrap_or_else(Instant::now)),
                started: SystemTime::now(),
            });
            Ok(true)
        });
        match r {
            Ok(_) => self.audit.applied(source, &[what]),
            Err(e) => {
                self.audit.refused(source, &what, &e.to_string());
                return Err(e);
            }
        }
        self.finish_drains(Instant::now())?;
        Ok(())
    }

    /// Cuts the connections of drained backends whose deadline has passed. Returns how many
    /// flow entries were removed.
    pub fn finish_drains(&self, now: Instant) -> Result<u64, ChangeError> {
        let mut w = lock(&self.writer);
        let mut due = Vec::new();
        for ((listener, addr), rt) in w.state.runtime.iter_mut() {
            if let Some(d) = &mut rt.drain
                && d.deadline.is_some_and(|t| t <= now)
            {
                d.deadline = None;
                due.push((listener.clone(), *addr));
            }
        }
        if due.is_empty() {
            return Ok(0);
        }
        let n = cut_backends(&mut w, &due)?;
        let lines: Vec<String> = due
            .iter()
            .map(|(l, a)| format!("listener {l} backend {a}: drained, its connections cut"))
            .collect();
        self.audit.applied(Source::Timer, &lines);
        self.publish(&mut w);
        Ok(n)
    }

    /// Forgets the persisted clients of an L4 listener in `clients` (an address and prefix
    /// length; all of them with `None`): their next connection is scheduled again, their
    /// established connections stay. A client entry is selected when its network (the
    /// client masked by the listener's persistence mask) and `clients` overlap. Returns how
    /// many entries were removed.
    pub fn forget_sessions(
        &self,
        source: Source,
        listener: &str,
        clients: Option<(IpAddr, u8)>,
    ) -> Result<u64, ChangeError> {
        let what = match clients {
            Some((ip, bits)) => {
                format!("listener {listener}: forget persisted clients in {ip}/{bits}")
            }
            None => format!("listener {listener}: forget every persisted client"),
        };
        let r = (|| {
            let mut w = lock(&self.writer);
            self.check_attached()?;
            let l = w
                .state
                .config
                .listeners
                .iter()
                .find(|l| l.name == listener)
                .ok_or_else(|| ConfigError::UnknownListener(listener.to_owned()))?;
            let Some(k) = l.l4() else {
                return Err(ConfigError::Invalid(format!(
                    "listener {listener} is an HTTP listener: its clients are persisted by the \
                     cookie they hold, which clb cannot take back (lower its persist, or remove \
                     the backend)"
                ))
                .into());
            };
            let full: u8 = if l.vip.is_ipv4() { 32 } else { 128 };
            let mask = k.persist_mask.unwrap_or(full);
            if let Some((ip, bits)) = clients
                && ip.is_ipv4() != l.vip.is_ipv4()
            {
                return Err(ConfigError::Invalid(format!(
                    "client {ip}/{bits} is not of listener {listener}'s family ({})",
                    l.vip
                ))
                .into());
            }
            let Some(lid) = w.balancer.ids().listener(l.vip, l.proto().ip_proto()) else {
                return Ok(0);
            };
            let select = |entry: IpAddr| match clients {
                None => true,
                Some((ip, bits)) => same_net(entry, ip, bits.min(mask)),
            };
            crate::datapath::forget_sessions(w.balancer.tables(), lid, &select)
                .map_err(|e| ChangeError::Datapath(BalancerError::Purge(Box::new(e))))
        })();
        match &r {
            Ok(n) => self
                .audit
                .applied(source, &[format!("{what}: {n} removed")]),
            Err(e) => self.audit.refused(source, &what, &e.to_string()),
        }
        r
    }

    /// Registers an interface the datapath may redirect to.
    pub fn add_device(&self, ifindex: u32) -> Result<(), DpError> {
        lock(&self.writer).balancer.add_device(ifindex)
    }

    /// Runs `f` with the writer's datapath tables (tests seed flow entries this way).
    pub fn with_tables<R>(&self, f: impl FnOnce(&mut dyn crate::datapath::Tables) -> R) -> R {
        f(lock(&self.writer).balancer.tables())
    }
}

fn unknown(s: &State, listener: &str, addr: SocketAddr) -> ConfigError {
    if s.config.listeners.iter().any(|l| l.name == listener) {
        ConfigError::UnknownBackend {
            listener: listener.into(),
            addr,
        }
    } else {
        ConfigError::UnknownListener(listener.into())
    }
}

/// Whether `a` and `b` agree in their first `bits` bits (false across families).
fn same_net(a: IpAddr, b: IpAddr, bits: u8) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let m = u32::MAX
                .checked_shl(32 - u32::from(bits.min(32)))
                .unwrap_or(0);
            u32::from(a) & m == u32::from(b) & m
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let m = u128::MAX
                .checked_shl(128 - u32::from(bits.min(128)))
                .unwrap_or(0);
            u128::from(a) & m == u128::from(b) & m
        }
        _ => false,
    }
}

/// The backends of `config` in maintenance (listener, address) — with `previous`, only those
/// that were in service (or absent) there.
fn in_maint(config: &ConfigFile, previous: Option<&ConfigFile>) -> Vec<(String, SocketAddr)> {
    let was_maint = |l: &str, a: SocketAddr| {
        previous.is_some_and(|p| {
            p.listeners
                .iter()
                .filter(|x| x.name == l)
                .flat_map(|x| &x.backends)
                .any(|b| b.addr == a && !b.state.is_ready())
        })
    };
    config
        .listeners
        .iter()
        .flat_map(|l| {
            l.backends
                .iter()
                .filter(|b| !b.state.is_ready() && !was_maint(&l.name, b.addr))
                .map(|b| (l.name.clone(), b.addr))
        })
        .collect()
}

/// Removes the flow entries of `backends` (listener, address) from the datapath. Returns
/// how many were removed.
fn cut_backends(w: &mut Writer, backends: &[(String, SocketAddr)]) -> Result<u64, ChangeError> {
    let ids: Vec<u32> = backends
        .iter()
        .filter_map(|(l, a)| {
            let l = w.state.config.listeners.iter().find(|x| &x.name == l)?;
            let lid = w.balancer.ids().listener(l.vip, l.proto().ip_proto())?;
            w.balancer.ids().backend(lid, *a)
        })
        .collect();
    if ids.is_empty() {
        return Ok(0);
    }
    w.balancer
        .cut(&|b| ids.contains(&b))
        .map_err(|e: DpError| ChangeError::Datapath(BalancerError::Purge(Box::new(e))))
}
