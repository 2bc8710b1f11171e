//! Packet-level tests: the real XDP program run through `BPF_PROG_TEST_RUN` on hand-built
//! frames, provisioned through the same control plane the daemon runs
//! ([`clb::control::Controller`] over the real maps).
//!
//! The program runs inside a private namespace whose routes and permanent neighbours make the
//! datapath's FIB lookup succeed: `l0` (10.0.1.1/24, fd00:1::1/64) faces clients (10.0.1.2
//! and 10.2.0.0/16 behind it; fd00:1::2 and fd00:2::/48 behind it), `l2` (10.1.0.1/24,
//! fd00:10::1/64) faces backends 10.1.0.2-9 and fd00:10::2-9 with fixed MACs
//! [`backend_mac`]. A forwarded packet therefore comes out as `XDP_REDIRECT` with the
//! next hop's MAC, ready to compare byte for byte.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsFd as _,
    path::PathBuf,
    sync::Arc,
    time::Instant,
};

use aya::{
    maps::{HashMap as AyaHashMap, Map, MapData},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use clb::{
    control::{
        ControlOptions, Controller,
        file::ConfigFile,
        model::{ListenerSpec, TablesSpec},
        status::DaemonInfo,
    },
    datapath::{
        Reader as _, SessionTable,
        aya::{AyaReader, AyaTables},
        loader::{self, TableSizes},
    },
    time::monotonic_ns,
};
use clb_common::{
    ConnKey, ConnKey6, ConnValue, HalfOpenValue, NS_PER_SEC, SessionKey, SessionKey6, SessionValue,
    TrafficCounters, XDP_PROGRAM,
};

use crate::{
    netns::{NetNs, fmt_mac},
    packet::{self, CLIENT_MAC},
};

/// XDP verdicts.
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// Name of a verdict.
pub fn verdict_name(v: u32) -> &'static str {
    match v {
        XDP_ABORTED => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "?",
    }
}

/// MAC of backend `10.1.0.n` in the lab.
pub fn backend_mac(n: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x10, n]
}

/// Address `10.1.0.n:port` of a lab backend.
pub fn backend(n: u8, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, n), port)
}

/// Address `[fd00:10::n]:port` of a lab backend (the same MAC as `10.1.0.n`).
pub fn backend6(n: u8, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(
        Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, u16::from(n)),
        port,
        0,
        0,
    )
}

/// The lab's IPv6 client next to the balancer, `fd00:1::2`.
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2);

/// The loaded program and the control plane over its maps, inside the lab namespace.
pub struct PacketLab {
    pub ebpf: aya::Ebpf,
    pub ctl: Arc<Controller>,
    reader: Arc<AyaReader>,
    config: PathBuf,
    /// ifindex of `l0` (client side) and its MAC.
    pub client_if: u32,
    pub client_if_mac: [u8; 6],
    /// ifindex of `l2` (backend side) and its MAC.
    pub backend_if: u32,
    pub backend_if_mac: [u8; 6],
}

fn setup(ns: &NetNs) -> anyhow::Result<()> {
    ns.ip(&["link", "add", "l0", "type", "veth", "peer", "name", "l1"])?;
    ns.ip(&["link", "add", "l2", "type", "veth", "peer", "name", "l3"])?;
    for d in ["l0", "l1", "l2", "l3"] {
        ns.ip(&["link", "set", d, "up"])?;
    }
    ns.ip(&["addr", "add", "10.0.1.1/24", "dev", "l0"])?;
    ns.ip(&["addr", "add", "10.1.0.1/24", "dev", "l2"])?;
    ns.ip(&["addr", "add", "fd00:1::1/64", "dev", "l0", "nodad"])?;
    ns.ip(&["addr", "add", "fd00:10::1/64", "dev", "l2", "nodad"])?;
    ns.sysctl("net.ipv4.ip_forward=1")?;
    ns.sysctl("net.ipv6.conf.all.forwarding=1")?;
    ns.ip(&[
        "-6",
        "neigh",
        "replace",
        &CLIENT6.to_string(),
        "lladdr",
        &fmt_mac(CLIENT_MAC),
        "dev",
        "l0",
        "nud",
        "permanent",
    ])?;
    ns.ip(&[
        "-6",
        "route",
        "add",
        "fd00:2::/48",
        "via",
        &CLIENT6.to_string(),
    ])?;
    ns.ip(&[
        "neigh",
        "replace",
        "10.0.1.2",
        "lladdr",
        &fmt_mac(CLIENT_MAC),
        "dev",
        "l0",
        "nud",
        "permanent",
    ])?;
    ns.ip(&["route", "add", "10.2.0.0/16", "via", "10.0.1.2"])?;
    for n in 2..=9u8 {
        ns.ip(&[
            "neigh",
            "replace",
            &format!("10.1.0.{n}"),
            "lladdr",
            &fmt_mac(backend_mac(n)),
            "dev",
            "l2",
            "nud",
            "permanent",
        ])?;
        ns.ip(&[
            "-6",
            "neigh",
            "replace",
            &backend6(n, 0).ip().to_string(),
            "lladdr",
            &fmt_mac(backend_mac(n)),
            "dev",
            "l2",
            "nud",
            "permanent",
        ])?;
    }
    Ok(())
}

/// Runs `f` with a fresh lab (namespace, program, control plane); everything is removed
/// afterwards, also when `f` panics.
pub fn with_lab<R: Send>(f: impl FnOnce(&mut PacketLab) -> R + Send) -> R {
    with_lab_tables(TablesSpec::default(), f)
}

/// [`with_lab`] with the flow tables sized by `tables`.
pub fn with_lab_tables<R: Send>(
    tables: TablesSpec,
    f: impl FnOnce(&mut PacketLab) -> R + Send,
) -> R {
    let ns = NetNs::new("pk").expect("lab namespace");
    setup(&ns).expect("lab setup");
    let (client_if, client_if_mac) = (ns.ifindex("l0").unwrap(), ns.mac("l0").unwrap());
    let (backend_if, backend_if_mac) = (ns.ifindex("l2").unwrap(), ns.mac("l2").unwrap());
    let dir = std::env::temp_dir().join(crate::netns::unique_name("lab"));
    std::fs::create_dir_all(&dir).expect("lab dir");
    let config = dir.join("clb.toml");
    let r = ns.run(move || {
        // One CPU: per-CPU state (counters, the flood window, the RST budget) is then the
        // whole state, and fixtures can count on it.
        pin_to_cpu0();
        let sizes = TableSizes {
            connections: tables.connections,
            half_open: tables.half_open,
            sessions: tables.sessions,
            connections6: tables.connections6,
            half_open6: tables.half_open6,
            sessions6: tables.sessions6,
        };
        let loaded = loader::load(None, &sizes).expect("loading the XDP program");
        let reader = Arc::new(loaded.dataplane.reader().expect("reader"));
        let cfg = ConfigFile {
            tables,
            ..ConfigFile::default()
        };
        cfg.save(&config).expect("lab config");
        let ctl = Controller::start(
            Box::new(loaded.dataplane),
            reader.clone(),
            cfg,
            ControlOptions {
                config_path: config.clone(),
                local_addrs: vec![
                    IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1)),
                    IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1)),
                    "fd00:1::1".parse().unwrap(),
                    "fd00:10::1".parse().unwrap(),
                ],
                cpus: 2,
                info: DaemonInfo {
                    ifaces: vec!["l0".into(), "l2".into()],
                    xdp_mode: "test".into(),
                    bpffs: PathBuf::new(),
                    config: config.clone(),
                    started: Instant::now(),
                    upgraded: Default::default(),
                },
            },
        )
        .expect("control plane");
        ctl.add_device(client_if).unwrap();
        ctl.add_device(backend_if).unwrap();
        let mut lab = PacketLab {
            ebpf: loaded.ebpf,
            ctl,
            reader,
            config,
            client_if,
            client_if_mac,
            backend_if,
            backend_if_mac,
        };
        f(&mut lab)
    });
    std::fs::remove_dir_all(&dir).ok();
    r
}

fn pin_to_cpu0() {
    pin_to_cpu(0);
}

/// Pins the calling thread to CPU `n` (panics if it cannot).
pub fn pin_to_cpu(n: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET/sched_setaffinity only touch it and this
    // thread's affinity.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(n, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            panic!(
                "pinning the lab thread: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn reopen<K: aya::Pod, V: aya::Pod>(m: &MapData) -> AyaHashMap<MapData, K, V> {
    let id = m.info().expect("map info").id();
    let m = MapData::from_id(id).expect("map by id");
    AyaHashMap::try_from(Map::LruHashMap(m)).expect("hash map")
}

/// The entry of `key` in the hash map `m`.
fn entry<K: aya::Pod, V: aya::Pod>(m: &MapData, key: &K) -> Option<V> {
    reopen::<K, V>(m).get(key, 0).ok()
}

/// Writes `key` → `v` into the hash map `m` (`what` names it in a failure).
fn put_entry<K: aya::Pod, V: aya::Pod>(m: &MapData, key: &K, v: &V, what: &str) {
    reopen::<K, V>(m)
        .insert(key, v, 0)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// A timestamp `secs` seconds ago on the datapath's clock. Fixtures backdate entries by
/// at most 30 s, so this never needs a machine up for long (the suite runs minutes after
/// boot at the earliest: the build alone takes that).
pub fn ago(secs: u64) -> u64 {
    let now = monotonic_ns();
    assert!(
        now > (secs + 1) * NS_PER_SEC,
        "backdating by {secs} s needs the machine up longer than that (up {} s)",
        now / NS_PER_SEC
    );
    now - secs * NS_PER_SEC
}

impl PacketLab {
    /// Runs the balancer once on `frame` as if received on `ingress`; returns the verdict and
    /// the frame as the program left it.
    pub fn run_on(&self, ingress: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        let (v, out, _) = self.run_prog(XDP_PROGRAM, ingress, frame);
        (v, out)
    }

    /// Runs program `name` (the balancer or the pass program) once on `frame`; returns the
    /// verdict, the output frame and the kernel-measured run time in ns.
    pub fn run_prog(&self, name: &str, ingress: u32, frame: &[u8]) -> (u32, Vec<u8>, u64) {
        let prog: &Xdp = self
            .ebpf
            .program(name)
            .expect("program")
            .try_into()
            .expect("xdp");
        // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex }: the kernel wants data = 0 and data_end = the frame's length.
        let ctx: Vec<u8> = [0u32, frame.len() as u32, 0, ingress, 0, 0]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let mut out = vec![0u8; frame.len() + 512];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out, r.duration.as_nanos() as u64)
    }

    /// [`PacketLab::run_on`] on the client-side interface.
    pub fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_on(self.client_if, frame)
    }

    /// Runs every fixture in order; on the first mismatch panics with the description and
    /// the input, expected and actual frames.
    pub fn check(&self, fixtures: &[Fixture]) {
        for (i, fx) in fixtures.iter().enumerate() {
            let (verdict, out) = self.run_on(fx.ingress.unwrap_or(self.client_if), &fx.input);
            let expected = fx.output.as_ref().unwrap_or(&fx.input);
            let checks_ok = !fx.verify_checksums || packet::verify_checksums(&out).is_ok();
            if verdict != fx.verdict || &out != expected || !checks_ok {
                panic!(
                    "fixture {i} \"{}\" failed\n verdict: expected {} got {}\n checksums: {:?}\n input:\n{}\n expected output:\n{}\n actual output:\n{}",
                    fx.desc,
                    verdict_name(fx.verdict),
                    verdict_name(verdict),
                    packet::verify_checksums(&out),
                    packet::hexdump(&fx.input),
                    packet::hexdump(expected),
                    packet::hexdump(&out),
                );
            }
            println!("fixture ok: {} -> {}", fx.desc, verdict_name(verdict));
        }
    }

    /// The global counter named `name` (see `clb_common::counter::NAMES`).
    pub fn counter(&self, name: &str) -> u64 {
        let raw = self.reader.counters().expect("counters");
        let i = clb_common::counter::NAMES
            .iter()
            .position(|n| *n == name)
            .unwrap_or_else(|| panic!("no counter {name}"));
        raw[i]
    }

    /// Backend `addr` of listener `name`'s active connections (`clb_common::LOAD_MAP`).
    pub fn active(&self, name: &str, addr: impl Into<SocketAddr>) -> i64 {
        let id = self.backend_id(name, addr);
        clb::datapath::Tables::actives(&*self.reader)[id as usize]
    }

    /// One walk of the sweeper over the tables, as the daemon's does (expiry, live counts,
    /// active-count corrections).
    pub fn sweep(&self) -> clb::datapath::sweep::SweepReport {
        let ctl = self.ctl.clone();
        clb::datapath::sweep::sweep(
            &*self.reader,
            &|| ctl.snapshot().policy.clone(),
            clb::time::monotonic_ns(),
            std::time::Duration::ZERO,
        )
        .expect("sweep")
    }

    /// The datapath reader (tables, counters).
    pub fn reader(&self) -> &AyaReader {
        &self.reader
    }

    /// Every global counter, by index.
    pub fn counters(&self) -> [u64; clb_common::NUM_COUNTERS as usize] {
        self.reader.counters().expect("counters")
    }

    /// Makes `listeners` the configuration, through the control plane's transaction.
    pub fn apply(&self, listeners: Vec<ListenerSpec>) {
        self.ctl
            .change(
                clb::control::audit::Source::Api,
                "apply the lab's listeners",
                |c| {
                    c.listeners = listeners;
                    Ok(())
                },
            )
            .map(drop)
            .expect("applying the configuration");
    }

    /// The config file the lab's controller writes.
    pub fn config_path(&self) -> &std::path::Path {
        &self.config
    }

    /// The datapath id of listener `name`.
    pub fn listener_id(&self, name: &str) -> u16 {
        self.ctl
            .snapshot()
            .listener(name)
            .and_then(|l| l.id)
            .unwrap_or_else(|| panic!("no L4 listener {name}")) as u16
    }

    /// The datapath id of backend `addr` of listener `name`.
    pub fn backend_id(&self, name: &str, addr: impl Into<SocketAddr>) -> u32 {
        let addr = addr.into();
        self.ctl
            .snapshot()
            .listener(name)
            .and_then(|l| l.backend(addr))
            .and_then(|b| b.id)
            .unwrap_or_else(|| panic!("no backend {addr} in {name}"))
    }

    /// Listener `name`'s traffic counters.
    pub fn listener_counters(&self, name: &str) -> TrafficCounters {
        self.reader
            .listener_stats(u32::from(self.listener_id(name)))
            .expect("listener stats")
    }

    fn tables(&self) -> &AyaTables {
        self.reader.aya_tables()
    }

    /// The connection-table entry of `key`.
    pub fn conn(&self, key: &ConnKey) -> Option<ConnValue> {
        entry::<ConnKey, ConnValue>(self.tables().conn_map(), key)
    }

    /// Deletes a connection-table entry behind the datapath's back (as an LRU eviction does).
    pub fn delete_conn(&self, key: &ConnKey) {
        clb::datapath::batch::delete_one(self.tables().conn_map().fd().as_fd(), key)
            .expect("conn delete");
    }

    /// Writes a connection-table entry.
    pub fn put_conn(&self, key: ConnKey, v: ConnValue) {
        put_entry::<ConnKey, ConnValue>(self.tables().conn_map(), &key, &v, "conn insert");
    }

    /// The half-open entry of `key`.
    pub fn half_open(&self, key: &ConnKey) -> Option<HalfOpenValue> {
        self.tables().half_open().get(key)
    }

    /// Writes a half-open entry.
    pub fn put_half_open(&self, key: ConnKey, v: HalfOpenValue) {
        assert!(
            self.tables().half_open().put(&key, &v),
            "half-open insert: its set is full or stayed busy"
        );
    }

    /// The (verified or pending) persistence entry of `key`.
    pub fn session(&self, table: SessionTable, key: &SessionKey) -> Option<SessionValue> {
        match table {
            SessionTable::Verified => {
                entry::<SessionKey, SessionValue>(self.tables().session_map(), key)
            }
            SessionTable::Pending => self.tables().pending().get(key),
        }
    }

    /// Writes a persistence entry.
    pub fn put_session(&self, table: SessionTable, key: SessionKey, v: SessionValue) {
        match table {
            SessionTable::Verified => put_entry::<SessionKey, SessionValue>(
                self.tables().session_map(),
                &key,
                &v,
                "session insert",
            ),
            SessionTable::Pending => assert!(
                self.tables().pending().put(&key, &v),
                "pending-session insert: its set is full or stayed busy"
            ),
        }
    }

    /// The IPv6 connection-table entry of `key`.
    pub fn conn6(&self, key: &ConnKey6) -> Option<ConnValue> {
        entry::<ConnKey6, ConnValue>(self.tables().conn6_map(), key)
    }

    /// Writes an IPv6 connection-table entry.
    pub fn put_conn6(&self, key: ConnKey6, v: ConnValue) {
        put_entry::<ConnKey6, ConnValue>(self.tables().conn6_map(), &key, &v, "conn6 insert");
    }

    /// The IPv6 half-open entry of `key`.
    pub fn half_open6(&self, key: &ConnKey6) -> Option<HalfOpenValue> {
        self.tables().half_open6().get(key)
    }

    /// The (verified or pending) IPv6 persistence entry of `key`.
    pub fn session6(&self, table: SessionTable, key: &SessionKey6) -> Option<SessionValue> {
        match table {
            SessionTable::Verified => {
                entry::<SessionKey6, SessionValue>(self.tables().session6_map(), key)
            }
            SessionTable::Pending => self.tables().pending6().get(key),
        }
    }

    /// Writes an IPv6 persistence entry.
    pub fn put_session6(&self, table: SessionTable, key: SessionKey6, v: SessionValue) {
        match table {
            SessionTable::Verified => put_entry::<SessionKey6, SessionValue>(
                self.tables().session6_map(),
                &key,
                &v,
                "session6 insert",
            ),
            SessionTable::Pending => assert!(
                self.tables().pending6().put(&key, &v),
                "pending-session6 insert: its set is full or stayed busy"
            ),
        }
    }

    /// Writes many connection entries at once (benchmarks).
    pub fn fill_conns(&self, keys: &[ConnKey], vals: &[ConnValue]) -> std::io::Result<usize> {
        clb::datapath::batch::update(self.tables().conn_map().fd().as_fd(), keys, vals)
    }

    /// Writes many half-open entries (benchmarks); returns how many were written.
    pub fn fill_half_open(&self, keys: &[ConnKey], vals: &[HalfOpenValue]) -> usize {
        let t = self.tables().half_open();
        keys.iter().zip(vals).filter(|(k, v)| t.put(k, v)).count()
    }

    /// Writes many verified persistence entries at once (benchmarks).
    pub fn fill_sessions(
        &self,
        keys: &[SessionKey],
        vals: &[SessionValue],
    ) -> std::io::Result<usize> {
        clb::datapath::batch::update(self.tables().session_map().fd().as_fd(), keys, vals)
    }

    /// Entries in `table`.
    pub fn count_sessions(&self, table: SessionTable) -> usize {
        match table {
            SessionTable::Verified => {
                reopen::<SessionKey, SessionValue>(self.tables().session_map())
                    .keys()
                    .count()
            }
            SessionTable::Pending => self.tables().pending().len(),
        }
    }

    /// Entries in the connection table.
    pub fn count_conns(&self) -> usize {
        reopen::<ConnKey, ConnValue>(self.tables().conn_map())
            .keys()
            .count()
    }

    /// Entries in the half-open table.
    pub fn count_half_open(&self) -> usize {
        self.tables().half_open().len()
    }
}

/// One row of a fixture table: input frame, expected verdict and output frame.
pub struct Fixture {
    pub desc: &'static str,
    pub input: Vec<u8>,
    pub verdict: u32,
    /// Expected output; `None` = the input, unchanged.
    pub output: Option<Vec<u8>>,
    /// Interface the frame arrives on (default: the client side).
    pub ingress: Option<u32>,
    /// Also recompute and verify the output's checksums.
    pub verify_checksums: bool,
}

impl Fixture {
    /// A frame that must come out unchanged with `verdict`.
    pub fn unchanged(desc: &'static str, input: Vec<u8>, verdict: u32) -> Self {
        Self {
            desc,
            input,
            verdict,
            output: None,
            ingress: None,
            verify_checksums: false,
        }
    }

    /// A frame that must come out as `output` with `verdict`, checksums verified.
    pub fn rewritten(desc: &'static str, input: Vec<u8>, verdict: u32, output: Vec<u8>) -> Self {
        Self {
            desc,
            input,
            verdict,
            output: Some(output),
            ingress: None,
            verify_checksums: true,
        }
    }

    pub fn on(mut self, ingress: u32) -> Self {
        self.ingress = Some(ingress);
        self
    }
}
