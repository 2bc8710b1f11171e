//! `cargo xtask bench`: clb against the kernel's NAT (nftables DNAT + conntrack, standing in for
//! IPVS, which this kernel lacks), HAProxy and nginx stream, measured side by side in one run.
//!
//! Absolute numbers drift by tens of percent between runs on a shared 2-core VM, so every
//! comparison is a ratio of figures taken in the same run, interleaved where possible, and the
//! report says what bottleneck each figure hit.

pub mod balance;
pub mod conns;
pub mod dsr;
pub mod flood;
pub mod https;
pub mod katran;
pub mod l7;
pub mod memory;
pub mod perpacket;
pub mod rate;
pub mod report;

/// Scale of a run.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    /// Per-packet: A/B rounds, runs per round, and the "large table" size.
    pub rounds: usize,
    pub runs_per_round: usize,
    pub large_table: usize,
    /// Packet rate: packets per measurement, distinct sources, ports per source (new flows).
    pub packets: u64,
    pub sources: u32,
    pub syn_ports: u32,
    /// Repetitions of each packet-rate measurement (median reported).
    pub rate_reps: usize,
    /// Connections/requests: seconds per peer and client threads.
    pub conn_secs: f64,
    pub conn_threads: usize,
    /// Sweep: entries to sweep.
    pub sweep_entries: usize,
    /// HTTP: seconds per measurement, client connections, scrape/no-scrape rounds, and
    /// entries written to each table for the scrape comparison.
    pub l7_secs: f64,
    pub l7_conns: usize,
    pub l7_rounds: usize,
    pub fill_entries: usize,
    /// Flood: seconds of flooding per peer.
    pub flood_secs: f64,
}

impl Scale {
    /// The full run (under 10 minutes).
    pub const FULL: Scale = Scale {
        rounds: 31,
        runs_per_round: 300,
        large_table: 1 << 20,
        packets: 4_000_000,
        sources: 65_536,
        syn_ports: 16,
        rate_reps: 3,
        conn_secs: 5.0,
        conn_threads: 4,
        sweep_entries: 1 << 20,
        l7_secs: 2.0,
        l7_conns: 16,
        l7_rounds: 10,
        fill_entries: 1_000_000,
        flood_secs: 10.0,
    };
    /// `--quick` (under 2 minutes).
    pub const QUICK: Scale = Scale {
        rounds: 11,
        runs_per_round: 150,
        large_table: 1 << 20,
        packets: 1_000_000,
        sources: 65_536,
        syn_ports: 16,
        rate_reps: 1,
        conn_secs: 2.0,
        conn_threads: 4,
        sweep_entries: 1 << 20,
        l7_secs: 1.5,
        l7_conns: 16,
        l7_rounds: 4,
        fill_entries: 1_000_000,
        flood_secs: 4.0,
    };
    /// The smoke test's scale: checks the machinery, says nothing about speed.
    pub const TINY: Scale = Scale {
        rounds: 3,
        runs_per_round: 10,
        large_table: 1000,
        packets: 3000,
        sources: 256,
        syn_ports: 4,
        rate_reps: 1,
        conn_secs: 0.5,
        conn_threads: 2,
        sweep_entries: 5000,
        l7_secs: 0.5,
        l7_conns: 4,
        l7_rounds: 2,
        fill_entries: 2000,
        flood_secs: 1.0,
    };
}

/// Median of `v` (sorts it).
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

use std::net::Ipv4Addr;

use std::{path::PathBuf, sync::Arc, time::Instant};

use aya::Ebpf;
use clb::{
    control::{
        ControlOptions, Controller,
        file::ConfigFile,
        model::{BackendSpec, CheckKind, HealthCheckSpec, ListenerSpec, Proto, TablesSpec},
        status::DaemonInfo,
    },
    datapath::{
        aya::AyaReader,
        loader::{self, AttachMode, Loaded, TableSizes},
    },
};
use clb_common::{
    CONN_OPEN, ConnKey, ConnValue, SessionKey, SessionValue, XDP_PROGRAM, ip_to_be, port_to_be,
};

use crate::netns::Topology;

/// A listener without health checks (the benchmarks' backends are sinks or fixed servers)
/// over `backends`, weight 10 each.
pub fn listener<A: Into<std::net::SocketAddr> + Copy>(
    name: &str,
    vip: impl Into<std::net::SocketAddr>,
    proto: Proto,
    persist: u32,
    backends: &[A],
) -> ListenerSpec {
    let mut l = ListenerSpec::new(name, vip, proto);
    l.persist = persist;
    l.health_check = HealthCheckSpec::of(CheckKind::None);
    l.backends = backends.iter().map(|a| BackendSpec::new(*a, 10)).collect();
    l
}

/// clb running in-process (no API): the loaded program, the controller, and a reader.
pub struct InProcess {
    pub ebpf: Box<Ebpf>,
    pub ctl: Arc<Controller>,
    pub reader: Arc<AyaReader>,
    /// Holds the controller's config file.
    pub dir: PathBuf,
}

impl Drop for InProcess {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// clb in the topology's balancer namespace: loaded with `tables`, configured with
/// `listeners` through the control plane, attached natively to every balancer interface.
/// Drop it to stop it.
pub fn start_clb_with(
    topo: &Topology,
    tables: TablesSpec,
    listeners: Vec<ListenerSpec>,
) -> anyhow::Result<InProcess> {
    start_clb_on(&topo.lb, topo.lb_ifaces.clone(), tables, listeners)
}

/// [`start_clb_with`] in namespace `ns` on `ifaces`.
pub fn start_clb_on(
    ns: &crate::netns::NetNs,
    ifaces: Vec<String>,
    tables: TablesSpec,
    listeners: Vec<ListenerSpec>,
) -> anyhow::Result<InProcess> {
    let dir = std::env::temp_dir().join(crate::netns::unique_name("inproc"));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("clb.toml");
    ns.run(move || {
        let sizes = TableSizes {
            connections: tables.connections,
            half_open: tables.half_open,
            sessions: tables.sessions,
            connections6: tables.connections6,
            half_open6: tables.half_open6,
            sessions6: tables.sessions6,
        };
        let Loaded {
            mut ebpf,
            dataplane,
            ..
        } = loader::load(None, &sizes)?;
        let reader = Arc::new(dataplane.reader()?);
        let cfg = ConfigFile {
            tables,
            bgp: None,
            listeners,
        };
        cfg.save(&config)?;
        let ctl = Controller::start(
            Box::new(dataplane),
            reader.clone(),
            cfg,
            ControlOptions {
                config_path: config.clone(),
                local_addrs: Vec::new(),
                cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
                info: DaemonInfo {
                    ifaces: ifaces.clone(),
                    xdp_mode: "native".into(),
                    bpffs: PathBuf::new(),
                    config: config.clone(),
                    started: Instant::now(),
                    upgraded: Default::default(),
                },
            },
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        for dev in &ifaces {
            let idx = loader::attach(&mut ebpf, XDP_PROGRAM, dev, AttachMode::Native, None)?;
            ctl.add_device(idx)?;
        }
        Ok(InProcess {
            ebpf: Box::new(ebpf),
            ctl,
            reader,
            dir: config.parent().map(PathBuf::from).unwrap_or_default(),
        })
    })
}

/// [`start_clb_with`] the default tables.
pub fn start_clb(topo: &Topology, listeners: Vec<ListenerSpec>) -> anyhow::Result<InProcess> {
    start_clb_with(topo, TablesSpec::default(), listeners)
}

/// Table entries for `n` distinct clients (172.16.0.0 + i, port 7) of listener `lid` on
/// backend `bid`, last seen at `last_seen_ns`: connections and sessions.
pub fn entries(
    n: usize,
    lid: u16,
    bid: u32,
    proto: u8,
    last_seen_ns: u64,
) -> (
    Vec<ConnKey>,
    Vec<ConnValue>,
    Vec<SessionKey>,
    Vec<SessionValue>,
) {
    let ck: Vec<ConnKey> = (0..n)
        .map(|k| ConnKey {
            client: ip_to_be(Ipv4Addr::from(0xac10_0000u32 + k as u32).octets()),
            client_port: port_to_be(7),
            listener: lid,
            proto,
            _pad: [0; 3],
        })
        .collect();
    let cv = vec![
        ConnValue {
            last_seen_ns,
            backend: bid,
            state: CONN_OPEN,
            flags: 0,
            _pad: [0; 2]
        };
        n
    ];
    let sk = ck
        .iter()
        .map(|k| SessionKey {
            client: k.client,
            listener: lid,
            _pad: 0,
        })
        .collect();
    let sv = vec![
        SessionValue {
            last_seen_ns,
            backend: bid,
            _pad: 0
        };
        n
    ];
    (ck, cv, sk, sv)
}

/// A child process stopped on drop: SIGTERM (nginx's master then stops its workers, which a
/// SIGKILL would orphan), then SIGKILL if it has not exited within 3 s. By pid only.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let gone = crate::wait_for(std::time::Duration::from_secs(3), || {
            self.0.try_wait().ok().flatten()
        });
        if gone.is_none() {
            self.0.kill().ok();
            self.0.wait().ok();
        }
    }
}

/// Spawns `args` in `ns`'s network namespace (`nsenter --net`), stderr to `log`.
pub fn spawn_in(
    ns: &crate::netns::NetNs,
    args: &[&str],
    log: &std::path::Path,
) -> anyhow::Result<Proc> {
    let c = std::process::Command::new("nsenter")
        .arg(format!("--net={}", ns.path()))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()?;
    Ok(Proc(c))
}
