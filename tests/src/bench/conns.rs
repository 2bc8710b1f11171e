//! Connections/s and requests/s with real TCP clients, from many source addresses, through
//! clb, nftables DNAT (jhash on the source: persistence), HAProxy (`mode tcp`, `balance source`,
//! consistent hashing) and nginx stream (`hash $remote_addr consistent`), to the same backends.
//! Everything shares the VM's 2 cores: clients, balancer and backends.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clb::control::model::Proto;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

use super::{
    Proc, Scale, listener,
    report::{Report, Row},
    spawn_in, start_clb,
};
use crate::{
    netns::{NetNs, Topology, VIP, backend_ip},
    wait_for,
};

const BACKEND_PORT: u16 = 8080;

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, 80)
}

/// An event-driven line server (`who` → name) in a backend namespace; stops on drop.
pub(super) struct FastServer {
    rt: Option<tokio::runtime::Runtime>,
}

impl FastServer {
    pub(super) fn start(ns: &NetNs, name: String) -> anyhow::Result<Self> {
        let rt = ns.run(move || -> anyhow::Result<_> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            let l = rt.block_on(tokio::net::TcpListener::bind(SocketAddrV4::new(
                Ipv4Addr::UNSPECIFIED,
                BACKEND_PORT,
            )))?;
            rt.spawn(async move {
                loop {
                    let Ok((s, _)) = l.accept().await else {
                        continue;
                    };
                    let name = name.clone();
                    tokio::spawn(async move {
                        s.set_nodelay(true).ok();
                        let (r, mut w) = s.into_split();
                        let mut lines = tokio::io::BufReader::new(r).lines();
                        while let Ok(Some(_)) = lines.next_line().await {
                            if w.write_all(format!("{name}\n").as_bytes()).await.is_err() {
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

impl Drop for FastServer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    Clb,
    Nft,
    Haproxy,
    Nginx,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Clb => "clb",
            Peer::Nft => "nft jhash",
            Peer::Haproxy => "haproxy",
            Peer::Nginx => "nginx stream",
        }
    }
}

/// Whatever runs the balancing; dropping it stops it.
#[expect(
    dead_code,
    reason = "held for their Drop: the balancer lives as long as the run"
)]
enum Running {
    Clb(super::InProcess),
    Process(Proc, std::path::PathBuf),
    Nothing,
}

fn start_peer(topo: &Topology, peer: Peer) -> anyhow::Result<Running> {
    let backends: Vec<SocketAddrV4> = (0..3)
        .map(|i| SocketAddrV4::new(backend_ip(i), BACKEND_PORT))
        .collect();
    let dir = std::env::temp_dir().join(topo.lb.name());
    std::fs::create_dir_all(&dir)?;
    let nsenter = |args: &[&str]| spawn_in(&topo.lb, args, &dir.join("peer.log"));
    let running = match peer {
        Peer::Clb => Running::Clb(start_clb(
            topo,
            vec![listener("web", vip(), Proto::Tcp, 600, &backends)],
        )?),
        Peer::Nft => {
            let rules = format!(
                "table ip clbbench {{\n chain pre {{\n  type nat hook prerouting priority dstnat; policy accept;\n  ip daddr {VIP} tcp dport 80 dnat to jhash ip saddr mod 3 map {{ 0 : {}, 1 : {}, 2 : {} }} : {BACKEND_PORT}\n }}\n}}\n",
                backend_ip(0),
                backend_ip(1),
                backend_ip(2)
            );
            let p = dir.join("rules.nft");
            std::fs::write(&p, rules)?;
            topo.lb.exec(&["nft", "-f", p.to_str().expect("utf-8")])?;
            Running::Nothing
        }
        Peer::Haproxy => {
            let servers: String = backends
                .iter()
                .enumerate()
                .map(|(i, a)| format!("  server b{i} {a}\n"))
                .collect();
            let cfg = format!(
                "global\n  maxconn 8000\n  pidfile {d}/haproxy.pid\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  maxconn 8000\nfrontend fe\n  bind {vip}\n  default_backend be\nbackend be\n  balance source\n  hash-type consistent\n{servers}",
                d = dir.display(),
                vip = vip()
            );
            let p = dir.join("haproxy.cfg");
            std::fs::write(&p, cfg)?;
            Running::Process(
                nsenter(&["haproxy", "-db", "-f", p.to_str().expect("utf-8")])?,
                dir.clone(),
            )
        }
        Peer::Nginx => {
            let servers: String = backends
                .iter()
                .map(|a| format!("    server {a};\n"))
                .collect();
            let cfg = format!(
                "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\ndaemon off;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err;\nevents {{ worker_connections 8000; }}\nstream {{\n  upstream be {{\n    hash $remote_addr consistent;\n{servers}  }}\n  server {{\n    listen {vip};\n    proxy_pass be;\n  }}\n}}\n",
                d = dir.display(),
                vip = vip()
            );
            let p = dir.join("nginx.conf");
            std::fs::write(&p, cfg)?;
            Running::Process(
                nsenter(&[
                    "nginx",
                    "-c",
                    p.to_str().expect("utf-8"),
                    "-p",
                    dir.to_str().expect("utf-8"),
                    "-e",
                    dir.join("nginx.err").to_str().expect("utf-8"),
                ])?,
                dir.clone(),
            )
        }
    };
    Ok(running)
}

pub(super) fn connect_from(ns: &NetNs, src: Ipv4Addr) -> std::io::Result<TcpStream> {
    let s = ns.run(|| {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
        std::io::Result::Ok(s)
    })?;
    s.connect_timeout(&SocketAddr::V4(vip()).into(), Duration::from_secs(2))?;
    let t = TcpStream::from(s);
    t.set_read_timeout(Some(Duration::from_secs(2)))?;
    t.set_nodelay(true)?;
    Ok(t)
}

pub(super) fn ask(r: &mut BufReader<TcpStream>) -> std::io::Result<()> {
    r.get_mut().write_all(b"who\n")?;
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Results of one peer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rates {
    pub conns_per_s: f64,
    pub requests_per_s: f64,
    pub errors: u64,
}

/// Runs the client load against whatever balances on `topo`.
fn load(topo: &Topology, scale: &Scale) -> anyhow::Result<Rates> {
    let clients = topo.extra_clients.clone();
    let errors = Arc::new(AtomicU64::new(0));
    // Connections per second: connect, one request, close.
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..scale.conn_threads {
            let (done, stop, errors, clients) =
                (done.clone(), stop.clone(), errors.clone(), &clients);
            s.spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let src = clients[i % clients.len()];
                    i += scale.conn_threads;
                    match connect_from(&topo.client, src).and_then(|c| ask(&mut BufReader::new(c)))
                    {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
        std::thread::sleep(Duration::from_secs_f64(scale.conn_secs));
        stop.store(true, Ordering::Relaxed);
    });
    let conns_per_s = done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
    // Requests per second: one kept-alive connection per thread.
    let reqs = Arc::new(AtomicU64::new(0));
    stop.store(false, Ordering::Relaxed);
    let t1 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..scale.conn_threads {
            let (reqs, stop, errors, src) = (
                reqs.clone(),
                stop.clone(),
                errors.clone(),
                clients[t % clients.len()],
            );
            s.spawn(move || {
                let Ok(c) = connect_from(&topo.client, src) else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let mut r = BufReader::new(c);
                while !stop.load(Ordering::Relaxed) {
                    if ask(&mut r).is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    reqs.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        std::thread::sleep(Duration::from_secs_f64(scale.conn_secs));
        stop.store(true, Ordering::Relaxed);
    });
    Ok(Rates {
        conns_per_s,
        requests_per_s: reqs.load(Ordering::Relaxed) as f64 / t1.elapsed().as_secs_f64(),
        errors: errors.load(Ordering::Relaxed),
    })
}

fn measure(i: usize, peer: Peer, scale: &Scale) -> anyhow::Result<Rates> {
    let topo = Topology::new(&format!("cr{i}"), 3, 50)?;
    for ns in std::iter::once(&topo.client).chain(std::iter::once(&topo.lb)) {
        ns.sysctl("net.ipv4.ip_local_port_range=1024 65000")?;
        ns.sysctl("net.ipv4.tcp_tw_reuse=1")?;
    }
    let _servers: Vec<FastServer> = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, ns)| FastServer::start(ns, format!("b{i}")))
        .collect::<Result<_, _>>()?;
    let running = start_peer(&topo, peer)?;
    // Ready once a request goes through.
    let ready = wait_for(Duration::from_secs(10), || {
        connect_from(&topo.client, topo.extra_clients[0])
            .and_then(|c| ask(&mut BufReader::new(c)))
            .ok()
    });
    anyhow::ensure!(
        ready.is_some(),
        "{} never answered through the VIP",
        peer.name()
    );
    let r = load(&topo, scale)?;
    if let Running::Process(_, dir) = &running {
        std::fs::remove_dir_all(dir).ok();
    }
    drop(running);
    Ok(r)
}

/// Runs the connection and request figures and adds them to `report`.
pub fn run(scale: &Scale, report: &mut Report) -> anyhow::Result<()> {
    let peers = [Peer::Clb, Peer::Nft, Peer::Haproxy, Peer::Nginx];
    let mut res = Vec::new();
    for (i, p) in peers.iter().enumerate() {
        let r = measure(i, *p, scale)?;
        println!("  {}: {r:?}", p.name());
        res.push((*p, r));
    }
    let clb = res[0].1;
    let errs: Vec<String> = res
        .iter()
        .map(|(p, r)| format!("{} {} errors", p.name(), r.errors))
        .collect();
    for (figure, get) in [
        (
            "new TCP connections/s (connect, 1 request, close)",
            (|r: &Rates| r.conns_per_s) as fn(&Rates) -> f64,
        ),
        ("requests/s on kept-alive connections", |r: &Rates| {
            r.requests_per_s
        }),
    ] {
        let best_peer = res[1..].iter().map(|(_, r)| get(r)).fold(0.0, f64::max);
        report.push(Row {
            section: "connections (real TCP clients)".into(),
            figure: figure.into(),
            unit: "/s".into(),
            clb: get(&clb),
            peers: res[1..].iter().map(|(p, r)| (p.name().to_owned(), get(r))).collect(),
            ratio: Some(("best peer".into(), get(&clb) / best_peer.max(1.0))),
            target: None,
            note: format!(
                "{} client threads, 50 source addresses, 3 backends; bottleneck: the 2 shared cores (clients, backends and, for the proxies, their user-space relay all compete; clb and nft add only kernel work); {}",
                scale.conn_threads,
                errs.join(", ")
            ),
        });
    }
    Ok(())
}
