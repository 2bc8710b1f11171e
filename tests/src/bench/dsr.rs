//! Direct server return against NAT for a response-heavy load: every request (one line) is
//! answered with 64 KiB, on kept-alive connections. One balancer node and three backends on a
//! shared segment (the fleet topology): with NAT the backends route their answers back through
//! the node (which rewrites them); with DSR they answer from the VIP through the router. Both
//! listeners run in the same clb at once and are measured in alternating phases. The
//! balancer's CPU is the XDP program's own run time (`BPF_ENABLE_STATS`): all of the node's
//! work on these packets happens there.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::sys::{Stats, enable_stats};
use clb::control::model::{Forward, Kind, Proto, TablesSpec};
use clb_common::XDP_PROGRAM;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

use super::{
    InProcess, Scale, listener, median,
    report::{Report, Row},
    start_clb_on,
};
use crate::{
    fleet::{Fleet, ROUTER_IP, backend_ip, node_ip},
    netns::{NetNs, VIP, enter},
    wait_for,
};

/// Bytes per answer.
pub const RESPONSE: usize = 64 << 10;
const PORT: u16 = 80;
const NAT_PORT: u16 = 81;

/// A backend answering every line with [`RESPONSE`] bytes; stops on drop.
struct Bulk {
    rt: Option<tokio::runtime::Runtime>,
}

impl Bulk {
    fn start(ns: &NetNs) -> anyhow::Result<Self> {
        let rt = ns.run(|| -> anyhow::Result<_> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            let l = rt.block_on(tokio::net::TcpListener::bind(SocketAddrV4::new(
                Ipv4Addr::UNSPECIFIED,
                PORT,
            )))?;
            rt.spawn(async move {
                let body: Arc<[u8]> = vec![b'x'; RESPONSE].into();
                loop {
                    let Ok((s, _)) = l.accept().await else {
                        continue;
                    };
                    let body = body.clone();
                    tokio::spawn(async move {
                        let (r, mut w) = s.into_split();
                        let mut lines = tokio::io::BufReader::new(r).lines();
                        while let Ok(Some(_)) = lines.next_line().await {
                            if w.write_all(&body).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
            Ok(rt)
        })?;
        Ok(Self { rt: Some(rt) })
    }
}

impl Drop for Bulk {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// One phase's outcome.
#[derive(Clone, Copy, Debug, Default)]
pub struct Phase {
    pub requests: u64,
    pub secs: f64,
    /// XDP program run time and runs during the phase.
    pub xdp_ns: u64,
    pub xdp_runs: u64,
    pub errors: u64,
}

impl Phase {
    pub fn per_s(&self) -> f64 {
        self.requests as f64 / self.secs.max(1e-9)
    }
    /// Balancer CPU per request, µs.
    pub fn cpu_us(&self) -> f64 {
        self.xdp_ns as f64 / 1000.0 / self.requests.max(1) as f64
    }
}

fn xdp_stats(c: &InProcess) -> anyhow::Result<(u64, u64)> {
    let info = c
        .ebpf
        .program(XDP_PROGRAM)
        .ok_or_else(|| anyhow::anyhow!("no XDP program"))?
        .info()?;
    Ok((info.run_time().as_nanos() as u64, info.run_count()))
}

/// `threads` clients on kept-alive connections to VIP:`port`, for `secs`.
fn load(f: &Fleet, c: &InProcess, port: u16, threads: usize, secs: f64) -> anyhow::Result<Phase> {
    let (ns0, runs0) = xdp_stats(c)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (reqs, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let path = f.client.path();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (stop, reqs, errors, path) =
                (stop.clone(), reqs.clone(), errors.clone(), path.clone());
            let src = f.extra_clients[t % f.extra_clients.len()];
            s.spawn(move || {
                if enter(&path).is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let conn = socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                )
                .and_then(|s| {
                    s.bind(&std::net::SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
                    s.connect_timeout(
                        &std::net::SocketAddr::V4(SocketAddrV4::new(VIP, port)).into(),
                        Duration::from_secs(2),
                    )?;
                    Ok(TcpStream::from(s))
                });
                let Ok(mut conn) = conn else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                conn.set_read_timeout(Some(Duration::from_secs(5))).ok();
                conn.set_nodelay(true).ok();
                let mut buf = vec![0u8; RESPONSE];
                while !stop.load(Ordering::Relaxed) {
                    if conn.write_all(b"get\n").is_err() || conn.read_exact(&mut buf).is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    reqs.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
    });
    let secs = t0.elapsed().as_secs_f64();
    let (ns1, runs1) = xdp_stats(c)?;
    Ok(Phase {
        requests: reqs.load(Ordering::Relaxed),
        secs,
        xdp_ns: ns1 - ns0,
        xdp_runs: runs1 - runs0,
        errors: errors.load(Ordering::Relaxed),
    })
}

/// Medians over the rounds: (NAT, DSR) phases, and each round's phases.
pub struct Results {
    pub nat: Vec<Phase>,
    pub dsr: Vec<Phase>,
}

/// Runs the alternating phases.
pub fn measure(scale: &Scale) -> anyhow::Result<Results> {
    let f = Fleet::new("bd", 1, 3, 8)?;
    f.route_vip_via(0)?;
    let _servers: Vec<Bulk> = f
        .backends
        .iter()
        .map(Bulk::start)
        .collect::<Result<_, _>>()?;
    // NAT answers (from the backend's own address) go back through the node; DSR answers
    // (from the VIP) through the router.
    for b in &f.backends {
        for net in ["10.0.1.0/24", "10.2.0.0/16"] {
            b.ip(&["route", "add", net, "via", &node_ip(0).to_string()])?;
        }
        b.ip(&["rule", "add", "from", &VIP.to_string(), "lookup", "100"])?;
        b.ip(&[
            "route",
            "add",
            "default",
            "via",
            &ROUTER_IP.to_string(),
            "table",
            "100",
        ])?;
    }
    // No daemon here (no health checks, no neighbour warming): static neighbour entries.
    for j in 0..3 {
        f.nodes[0].ip(&[
            "neigh",
            "replace",
            &backend_ip(j).to_string(),
            "lladdr",
            &f.backend_mac(j)?,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
    }
    let backends: Vec<SocketAddrV4> = (0..3)
        .map(|j| SocketAddrV4::new(backend_ip(j), PORT))
        .collect();
    let mut dsr = listener(
        "dsr",
        SocketAddrV4::new(VIP, PORT),
        Proto::Tcp,
        0,
        &backends,
    );
    if let Kind::L4(k) = &mut dsr.kind {
        k.forward = Forward::Dsr;
    }
    let nat = listener(
        "nat",
        SocketAddrV4::new(VIP, NAT_PORT),
        Proto::Tcp,
        0,
        &backends,
    );
    let c = start_clb_on(
        &f.nodes[0],
        vec!["eth0".into()],
        TablesSpec::default(),
        vec![dsr, nat],
    )?;
    for port in [PORT, NAT_PORT] {
        let ok = wait_for(Duration::from_secs(10), || {
            let p = load(&f, &c, port, 1, 0.05).ok()?;
            (p.errors == 0 && p.requests > 0).then_some(())
        });
        anyhow::ensure!(ok.is_some(), "no answers through VIP:{port}");
    }
    // Holding the fd keeps the kernel counting programs' run time.
    let _stats = enable_stats(Stats::RunTime)?;
    let threads = scale.conn_threads;
    let mut out = Results {
        nat: Vec::new(),
        dsr: Vec::new(),
    };
    for round in 0..scale.rate_reps.max(2) {
        let order = if round % 2 == 0 {
            [NAT_PORT, PORT]
        } else {
            [PORT, NAT_PORT]
        };
        for port in order {
            let p = load(&f, &c, port, threads, scale.conn_secs)?;
            if port == PORT {
                out.dsr.push(p);
            } else {
                out.nat.push(p);
            }
        }
    }
    Ok(out)
}

/// Runs the section and adds its rows.
pub fn run(scale: &Scale, report: &mut Report) -> anyhow::Result<()> {
    let r = measure(scale)?;
    rows(&r, scale, report);
    Ok(())
}

/// Adds the rows of `r`.
pub fn rows(r: &Results, scale: &Scale, report: &mut Report) {
    let med = |v: &[Phase], f: fn(&Phase) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        median(&mut x)
    };
    let (nat_rps, dsr_rps) = (med(&r.nat, Phase::per_s), med(&r.dsr, Phase::per_s));
    let (nat_cpu, dsr_cpu) = (med(&r.nat, Phase::cpu_us), med(&r.dsr, Phase::cpu_us));
    let runs = |v: &[Phase]| {
        v.iter().map(|p| p.xdp_runs).sum::<u64>() as f64
            / v.iter().map(|p| p.requests).sum::<u64>().max(1) as f64
    };
    let errors: u64 = r.nat.iter().chain(&r.dsr).map(|p| p.errors).sum();
    let note = format!(
        "{} clients on kept-alive connections, 64 KiB per answer, 3 backends; {} alternating rounds of {:.0} s; packets through the balancer per request: NAT {:.1}, DSR {:.1}; {errors} errors",
        scale.conn_threads,
        r.nat.len(),
        scale.conn_secs,
        runs(&r.nat),
        runs(&r.dsr),
    );
    report.push(Row {
        section: "direct server return (64 KiB answers)".into(),
        figure: "requests/s".into(),
        unit: "/s".into(),
        clb: dsr_rps,
        peers: vec![("NAT".into(), nat_rps)],
        ratio: Some(("NAT".into(), dsr_rps / nat_rps.max(1e-9))),
        target: None,
        note: note.clone(),
    });
    report.push(Row {
        section: "direct server return (64 KiB answers)".into(),
        figure: "balancer CPU per request (XDP run time)".into(),
        unit: "µs".into(),
        clb: dsr_cpu,
        peers: vec![("NAT".into(), nat_cpu)],
        ratio: Some(("NAT".into(), dsr_cpu / nat_cpu.max(1e-9))),
        target: None,
        note,
    });
}
