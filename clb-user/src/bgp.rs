//! VIP announcement over BGP, through BIRD 2 (not a home-made speaker).
//!
//! With `[bgp]` in the config, the daemon runs its own BIRD (`bird -f`, a supervised child,
//! with its configuration, log and control socket under `<state-dir>/bird/`): one BGP session
//! per `[[bgp.peer]]`, BFD on them unless turned off, and a static protocol whose routes are
//! the VIPs this node announces, exported to the peers with this node as next hop: IPv4 VIPs
//! to the IPv4 peers, IPv6 VIPs (static protocol `clb_vips6`) to the IPv6 peers, one session
//! per peer and family as routers are usually set up.
//!
//! A VIP is announced while the datapath is attached and one of its listeners has a backend
//! that takes new connections (weight > 0, healthy, not draining); otherwise it is withdrawn —
//! also on `clb bgp withdraw` (maintenance) and when the daemon stops (before anything else
//! shuts down). The announced set is written to an include file and BIRD is told to
//! `configure`: a soft reconfiguration that keeps the sessions up. A node that dies without a
//! word is dropped by its peers when BFD misses `bfd_multiplier` packets
//! (`bfd_interval_ms × bfd_multiplier`, 300 ms by default), or after the BGP hold time without
//! BFD.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tracing::{info, warn};

use crate::control::{Controller, lock, model::BgpSpec, state::Health};

/// One BGP session as BIRD reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub address: IpAddr,
    pub remote_as: u32,
    /// BIRD's protocol state and info, e.g. "up Established" or "start Connect".
    pub state: String,
    /// BFD session state, when BFD is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd: Option<String>,
}

/// `GET /v1/bgp`, and part of `clb status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpStatus {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    /// VIPs withdrawn by command.
    pub maintenance: bool,
    /// The VIPs announced now (both families).
    pub announced: Vec<IpAddr>,
    pub peers: Vec<PeerStatus>,
    /// How long peers keep this node's routes after it goes silent, at most.
    pub withdrawal_bound_ms: u64,
    /// Whether BIRD is running.
    pub bird_running: bool,
}

/// The daemon's BGP side.
pub struct Speaker {
    spec: BgpSpec,
    /// The router id in effect (configured, or this node's address towards its first peer).
    router_id: Ipv4Addr,
    dir: PathBuf,
    bird: PathBuf,
    birdc: PathBuf,
    maintenance: AtomicBool,
    announced: Mutex<BTreeSet<IpAddr>>,
    child: tokio::sync::Mutex<Option<Child>>,
    /// Serializes writes of the include file and `configure` calls.
    configuring: tokio::sync::Mutex<()>,
}

impl Speaker {
    /// Prepares BIRD's files under `state_dir/bird` (nothing runs yet: see [`Speaker::run`]).
    pub fn new(spec: BgpSpec, state_dir: &Path, bird: &Path) -> anyhow::Result<Self> {
        let dir = state_dir.join("bird");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let bird = resolve(bird).with_context(|| {
            format!(
                "{} not found: BGP needs BIRD 2 (Debian: `apt-get install bird2`)",
                bird.display()
            )
        })?;
        let birdc = match bird.file_name().and_then(|n| n.to_str()) {
            Some("bird") => bird.with_file_name("birdc"),
            _ => PathBuf::from("birdc"),
        };
        let router_id = match spec.router_id {
            Some(id) => id,
            None => source_towards(&spec)?,
        };
        stop_orphan(&dir);
        let s = Self {
            spec,
            router_id,
            dir,
            bird,
            birdc,
            maintenance: AtomicBool::new(false),
            announced: Mutex::new(BTreeSet::new()),
            child: tokio::sync::Mutex::new(None),
            configuring: tokio::sync::Mutex::new(()),
        };
        std::fs::write(s.vips_path(), "").context("writing BIRD's VIP include file")?;
        std::fs::write(s.vips6_path(), "").context("writing BIRD's VIP include file")?;
        std::fs::write(s.conf_path(), s.config()).context("writing BIRD's configuration")?;
        Ok(s)
    }

    fn conf_path(&self) -> PathBuf {
        self.dir.join("bird.conf")
    }
    fn vips_path(&self) -> PathBuf {
        self.dir.join("vips.conf")
    }
    fn vips6_path(&self) -> PathBuf {
        self.dir.join("vips6.conf")
    }
    fn socket(&self) -> PathBuf {
        self.dir.join("bird.ctl")
    }

    /// BIRD's configuration for the spec.
    pub fn config(&self) -> String {
        let b = &self.spec;
        let mut c = format!(
            "# Written by the clb daemon; changes are overwritten at its next start.\n\
             router id {};\n\
             log \"{}\" all;\n\
             protocol device {{ scan time 10; }}\n\
             protocol static clb_vips {{\n  ipv4;\n  include \"{}\";\n}}\n\
             protocol static clb_vips6 {{\n  ipv6;\n  include \"{}\";\n}}\n",
            self.router_id,
            self.dir.join("bird.log").display(),
            self.vips_path().display(),
            self.vips6_path().display()
        );
        if b.bfd {
            c += &format!(
                "protocol bfd {{\n  interface \"*\" {{ interval {} ms; multiplier {}; }};\n}}\n",
                b.bfd_interval_ms, b.bfd_multiplier
            );
        }
        for (i, p) in b.peers.iter().enumerate() {
            c += &format!(
                "protocol bgp peer{i} {{\n  local as {};\n  neighbor {} as {};\n  hold time {};\n  connect retry time 1;\n  error wait time 1, 10;\n{}  {} {{ import none; export where proto = \"{}\"; next hop self; }};\n}}\n",
                b.local_as,
                p.address,
                p.remote_as,
                b.hold_time,
                if b.bfd { "  bfd on;\n" } else { "" },
                if p.address.is_ipv4() { "ipv4" } else { "ipv6" },
                if p.address.is_ipv4() {
                    "clb_vips"
                } else {
                    "clb_vips6"
                },
            );
        }
        c
    }

    /// Runs BIRD and keeps the announcements in line with the controller until the daemon
    /// stops; restarts BIRD if it dies.
    pub async fn run(self: Arc<Self>, ctl: Arc<Controller>) -> anyhow::Result<()> {
        self.ensure_bird().await?;
        let mut rx = ctl.subscribe();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Ok(()) },
                _ = tick.tick() => {}
            }
            self.ensure_bird().await?;
            self.apply(self.wanted(&ctl)).await?;
        }
    }

    /// The VIPs this node should announce now: those of a family some peer carries.
    pub fn wanted(&self, ctl: &Controller) -> BTreeSet<IpAddr> {
        if self.maintenance.load(Ordering::Relaxed) || ctl.detached().is_some() {
            return BTreeSet::new();
        }
        let v4 = self.spec.peers.iter().any(|p| p.address.is_ipv4());
        let v6 = self.spec.peers.iter().any(|p| p.address.is_ipv6());
        ctl.snapshot()
            .listeners
            .iter()
            .filter(|l| {
                l.backends
                    .iter()
                    .any(|b| b.spec.weight > 0 && b.drain.is_none() && b.health == Health::Healthy)
            })
            .map(|l| l.spec.vip.ip())
            .filter(|ip| if ip.is_ipv4() { v4 } else { v6 })
            .collect()
    }

    /// Makes BIRD announce exactly `vips`.
    async fn apply(&self, vips: BTreeSet<IpAddr>) -> anyhow::Result<()> {
        let _one = self.configuring.lock().await;
        if *lock(&self.announced) == vips {
            return Ok(());
        }
        for (path, v6, len) in [
            (self.vips_path(), false, 32),
            (self.vips6_path(), true, 128),
        ] {
            let text: String = vips
                .iter()
                .filter(|v| v.is_ipv6() == v6)
                .map(|v| format!("route {v}/{len} via \"lo\";\n"))
                .collect();
            let tmp = self.dir.join(".vips.conf.tmp");
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, path)?;
        }
        let out = self.birdc(&["configure"]).await?;
        if !out.contains("Reconfigured") && !out.contains("Reconfiguration in progress") {
            bail!("birdc configure: {}", out.trim());
        }
        info!(announced = ?vips, "BGP announcements updated");
        *lock(&self.announced) = vips;
        Ok(())
    }

    async fn ensure_bird(&self) -> anyhow::Result<()> {
        let mut child = self.child.lock().await;
        if let Some(c) = child.as_mut() {
            match c.try_wait() {
                Ok(None) => return Ok(()),
                Ok(Some(st)) => warn!("BIRD exited ({st}); starting it again"),
                Err(e) => warn!("BIRD: {e}; starting it again"),
            }
        }
        std::fs::remove_file(self.socket()).ok();
        // Whatever was announced is gone with the old process.
        lock(&self.announced).clear();
        std::fs::write(self.vips_path(), "")?;
        std::fs::write(self.vips6_path(), "")?;
        let mut cmd = Command::new(&self.bird);
        // BIRD goes with the daemon, however the daemon ends: a BIRD left behind would keep
        // sessions (and announcements) no daemon supervises, and clash with the next one's.
        // SAFETY: prctl in the child between fork and exec; async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let c = cmd
            .arg("-f")
            .arg("-c")
            .arg(self.conf_path())
            .arg("-s")
            .arg(self.socket())
            .arg("-P")
            .arg(self.dir.join("bird.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting BIRD ({})", self.bird.display()))?;
        info!(pid = c.id(), conf = %self.conf_path().display(), "BIRD started");
        *child = Some(c);
        drop(child);
        // Wait (bounded) for its control socket.
        for _ in 0..50 {
            if self.socket().exists() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "BIRD did not open its control socket within 5 s (see {})",
            self.dir.join("bird.log").display()
        )
    }

    async fn birdc(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = tokio::time::timeout(
            Duration::from_secs(5),
            Command::new(&self.birdc)
                .arg("-s")
                .arg(self.socket())
                .args(args)
                .stdin(Stdio::null())
                .output(),
        )
        .await
        .context("birdc did not answer within 5 s")?
        .with_context(|| format!("running {}", self.birdc.display()))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Maintenance: withdraw (`true`) or announce again (`false`).
    pub async fn set_maintenance(&self, ctl: &Controller, on: bool) -> anyhow::Result<()> {
        self.maintenance.store(on, Ordering::Relaxed);
        info!(maintenance = on, "BGP maintenance");
        self.apply(self.wanted(ctl)).await
    }

    /// Withdraws everything and stops BIRD (daemon shutdown): peers drop this node at once.
    pub async fn shutdown(&self) {
        self.maintenance.store(true, Ordering::Relaxed);
        if let Err(e) = self.apply(BTreeSet::new()).await {
            warn!("withdrawing VIPs at shutdown: {e:#}");
        }
        let mut child = self.child.lock().await;
        if let Some(mut c) = child.take() {
            if let Some(pid) = c.id() {
                // SAFETY: signalling our own child by pid.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            if tokio::time::timeout(Duration::from_secs(3), c.wait())
                .await
                .is_err()
            {
                c.kill().await.ok();
            }
        }
    }

    /// Sessions and announcements, from BIRD.
    pub async fn status_live(&self) -> BgpStatus {
        let protocols = self.birdc(&["show", "protocols"]).await.unwrap_or_default();
        let bfd = if self.spec.bfd {
            self.birdc(&["show", "bfd", "sessions"])
                .await
                .unwrap_or_default()
        } else {
            String::new()
        };
        let mut s = self.status();
        for (i, p) in s.peers.iter_mut().enumerate() {
            let name = format!("peer{i}");
            if let Some(line) = protocols
                .lines()
                .find(|l| l.split_whitespace().next() == Some(name.as_str()))
            {
                let t: Vec<&str> = line.split_whitespace().collect();
                let state = t.get(3).copied().unwrap_or("?");
                let info = t.get(5..).map(|x| x.join(" ")).unwrap_or_default();
                p.state = format!("{state} {info}").trim().to_owned();
            }
            if self.spec.bfd {
                let addr = p.address.to_string();
                p.bfd = Some(
                    bfd.lines()
                        .find(|l| l.split_whitespace().next() == Some(addr.as_str()))
                        .and_then(|l| l.split_whitespace().nth(2))
                        .unwrap_or("none")
                        .to_owned(),
                );
            }
        }
        s
    }

    /// What is known without asking BIRD.
    pub fn status(&self) -> BgpStatus {
        BgpStatus {
            local_as: self.spec.local_as,
            router_id: self.router_id,
            maintenance: self.maintenance.load(Ordering::Relaxed),
            announced: lock(&self.announced).iter().copied().collect(),
            peers: self
                .spec
                .peers
                .iter()
                .map(|p| PeerStatus {
                    address: p.address,
                    remote_as: p.remote_as,
                    state: "unknown".into(),
                    bfd: None,
                })
                .collect(),
            withdrawal_bound_ms: self.spec.withdrawal_bound_ms(),
            bird_running: self.child.try_lock().map(|c| c.is_some()).unwrap_or(true),
        }
    }
}

/// `bird` itself if it is a path, else found on `PATH` or in the sbin directories (which a
/// non-login root shell may lack).
fn resolve(bird: &Path) -> Option<PathBuf> {
    if bird.components().count() > 1 {
        return bird.is_file().then(|| bird.to_owned());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(bird))
        .find(|p| p.is_file())
}

/// This node's source address towards its first IPv4 peer (its BGP router id when none is
/// configured): unique in a fleet, and the same in every node's config file.
fn source_towards(spec: &BgpSpec) -> anyhow::Result<Ipv4Addr> {
    let peer = spec
        .peers
        .iter()
        .find(|p| p.address.is_ipv4())
        .ok_or_else(|| anyhow::anyhow!("bgp: no IPv4 peer to take a router id from"))?;
    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
    s.connect((peer.address, 179))
        .with_context(|| format!("no route to BGP peer {}", peer.address))?;
    match s.local_addr()? {
        std::net::SocketAddr::V4(a) => Ok(*a.ip()),
        std::net::SocketAddr::V6(_) => bail!("no IPv4 address towards {}", peer.address),
    }
}

/// Stops a BIRD an earlier daemon left running on this state directory (its pid file names
/// it, and its command line names our configuration).
fn stop_orphan(dir: &Path) {
    let Ok(pid) = std::fs::read_to_string(dir.join("bird.pid")) else {
        return;
    };
    let Ok(pid) = pid.trim().parse::<i32>() else {
        return;
    };
    let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(&*dir.join("bird.conf").to_string_lossy()))
        .unwrap_or(false);
    if ours {
        warn!(pid, "stopping a BIRD left behind by an earlier daemon");
        // SAFETY: a signal to a process verified to be the BIRD of this state directory.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        for _ in 0..30 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
