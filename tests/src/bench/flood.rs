//! A spoofed SYN flood at the generator's best rate, from a million sources on an attacker's
//! own link, against clb (default tables: 1 M connections and sessions, 256 k half-open slots) and
//! against nftables DNAT with conntrack (the kernel's table, `nf_conntrack_max`): how many of
//! 100 idle established connections (50 on a round-robin listener, 50 on a persistent one) and
//! 50 persisted clients survive, and how many real clients' connections succeed during it.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use clb::control::model::{Proto, TablesSpec};

use super::{
    Scale, listener,
    report::{Report, Row},
    start_clb_with,
};
use crate::{
    flood::{Flood, FloodSpec},
    netns::{Topology, VIP, backend_ip},
    servers::{NameServer, ask, ask_once, connect},
};

const BACKEND_PORT: u16 = 8080;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    Clb,
    Nft,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Clb => "clb",
            Peer::Nft => "nft DNAT + conntrack",
        }
    }
}

/// What one flood did to one peer.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub sent: u64,
    /// Flood SYNs that reached the balancer (clb: forwarded by its XDP program; nft: counted
    /// at prerouting, before conntrack).
    pub reached: u64,
    pub secs: f64,
    pub idle: usize,
    pub idle_alive: usize,
    pub persisted: usize,
    pub persisted_kept: usize,
    pub tries: u32,
    pub ok: u32,
}

impl Outcome {
    fn survival(&self) -> f64 {
        100.0 * self.idle_alive as f64 / self.idle.max(1) as f64
    }
    fn success(&self) -> f64 {
        100.0 * f64::from(self.ok) / f64::from(self.tries.max(1))
    }
    fn kept(&self) -> f64 {
        100.0 * self.persisted_kept as f64 / self.persisted.max(1) as f64
    }
}

/// Whatever balances; dropping it stops it.
enum Running {
    Clb(Box<super::InProcess>),
    Nft,
}

fn start(topo: &Topology, peer: Peer) -> anyhow::Result<Running> {
    let backends: Vec<SocketAddrV4> = (0..2)
        .map(|i| SocketAddrV4::new(backend_ip(i), BACKEND_PORT))
        .collect();
    Ok(match peer {
        Peer::Clb => Running::Clb(Box::new(start_clb_with(
            topo,
            TablesSpec::default(),
            vec![
                listener("off", SocketAddrV4::new(VIP, 80), Proto::Tcp, 0, &backends),
                listener("on", SocketAddrV4::new(VIP, 81), Proto::Tcp, 600, &backends),
            ],
        )?)),
        Peer::Nft => {
            let (a, b) = (backend_ip(0), backend_ip(1));
            let rules = format!(
                "table ip clbflood {{\n chain pre {{\n  type nat hook prerouting priority dstnat; policy accept;\n  ip daddr {VIP} tcp dport 80 dnat to numgen inc mod 2 map {{ 0 : {a}, 1 : {b} }} : {BACKEND_PORT}\n  ip daddr {VIP} tcp dport 81 dnat to jhash ip saddr mod 2 map {{ 0 : {a}, 1 : {b} }} : {BACKEND_PORT}\n }}\n chain raw {{\n  type filter hook prerouting priority raw; policy accept;\n  ip saddr 100.64.0.0/10 counter\n }}\n}}\n"
            );
            let dir = std::env::temp_dir().join(topo.lb.name());
            std::fs::create_dir_all(&dir)?;
            let p = dir.join("flood.nft");
            std::fs::write(&p, rules)?;
            topo.lb.exec(&["nft", "-f", p.to_str().expect("utf-8")])?;
            std::fs::remove_dir_all(&dir).ok();
            // The generator's frames arrive on a0 through the veth's XDP path, which needs
            // GRO (or an XDP program) on the receiving end; GRO keeps XDP out of nft's path.
            topo.lb.exec(&["ethtool", "-K", "a0", "gro", "on"])?;
            Running::Nft
        }
    })
}

/// Flood SYNs that reached the balancer so far.
fn reached(topo: &Topology, running: &Running) -> anyhow::Result<u64> {
    match running {
        Running::Clb(c) => {
            let snap = c.ctl.snapshot();
            let id = snap
                .listener("off")
                .and_then(|l| l.id)
                .ok_or_else(|| anyhow::anyhow!("listener off has no id"))?;
            Ok(clb::datapath::Reader::listener_stats(c.reader.as_ref(), id)?.fwd_packets)
        }
        Running::Nft => {
            let out = topo
                .lb
                .exec(&["nft", "list", "chain", "ip", "clbflood", "raw"])?;
            out.split("counter packets ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("no counter in {out}"))
        }
    }
}

fn measure(i: usize, peer: Peer, scale: &Scale) -> anyhow::Result<Outcome> {
    let topo = Topology::with_attacker(&format!("bf{i}"), 2, 260)?;
    let _servers: Vec<NameServer> = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            NameServer::tcp(
                ns,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, BACKEND_PORT),
                &format!("b{i}"),
            )
        })
        .collect::<Result<_, _>>()?;
    for ns in &topo.backends {
        // The backends face the flood too (it reaches them through either balancer).
        ns.sysctl("net.ipv4.tcp_syncookies=1")?;
    }
    let running = start(&topo, peer)?;
    let c = &topo.extra_clients;
    let ready = crate::wait_for(Duration::from_secs(10), || {
        ask_once(&topo.client, c[0], SocketAddrV4::new(VIP, 80)).ok()
    });
    anyhow::ensure!(ready.is_some(), "{} never answered", peer.name());
    let mut idle: Vec<(TcpStream, String)> = Vec::new();
    for (k, ip) in c[..100].iter().enumerate() {
        let mut s = connect(
            &topo.client,
            *ip,
            SocketAddrV4::new(VIP, 80 + (k / 50) as u16),
        )?;
        let b = ask(&mut s)?;
        idle.push((s, b));
    }
    let persisted: HashMap<Ipv4Addr, String> = c[100..150]
        .iter()
        .map(|ip| ask_once(&topo.client, *ip, SocketAddrV4::new(VIP, 81)).map(|b| (*ip, b)))
        .collect::<Result<_, _>>()?;
    let a = topo.attacker.as_ref().expect("attacker");
    let flood = Flood::new(
        a,
        FloodSpec {
            dst_mac: topo.lb.mac("a0")?,
            src_mac: a.mac("eth0")?,
            src_base: Ipv4Addr::new(100, 64, 0, 0),
            sources: 1 << 20,
            dst: SocketAddrV4::new(VIP, 80),
            proto: 6,
            tcp_flags: 0,
            ifindex: a.ifindex("eth0")?,
        },
    )?;
    let before = reached(&topo, &running)?;
    let going = AtomicBool::new(true);
    let t0 = Instant::now();
    let (sent, (tries, ok)) = std::thread::scope(|s| {
        let clients = s.spawn(|| {
            let (mut tries, mut ok) = (0u32, 0u32);
            let ips = &c[150..];
            while going.load(Ordering::Relaxed) && tries < 20_000 {
                let ip = ips[tries as usize % ips.len()];
                let port = 80 + (tries % 2) as u16;
                tries += 1;
                if connect(&topo.client, ip, SocketAddrV4::new(VIP, port))
                    .and_then(|mut s| ask(&mut s))
                    .is_ok()
                {
                    ok += 1;
                }
            }
            (tries, ok)
        });
        // As fast as the generator goes (an unreachable rate paces nothing).
        let sent = flood.send(
            a,
            u64::MAX,
            1_000_000_000,
            Duration::from_secs_f64(scale.flood_secs),
        );
        going.store(false, Ordering::Relaxed);
        (sent, clients.join().unwrap_or((0, 0)))
    });
    let secs = t0.elapsed().as_secs_f64();
    let sent = sent?;
    let reached = reached(&topo, &running)? - before;
    let idle_alive = idle
        .iter_mut()
        .map(|(s, b)| ask(s).is_ok_and(|now| now == *b))
        .filter(|alive| *alive)
        .count();
    let persisted_kept = persisted
        .iter()
        .filter(|(ip, b)| {
            ask_once(&topo.client, **ip, SocketAddrV4::new(VIP, 81)).is_ok_and(|now| now == **b)
        })
        .count();
    drop(running);
    Ok(Outcome {
        sent,
        reached,
        secs,
        idle: idle.len(),
        idle_alive,
        persisted: persisted.len(),
        persisted_kept,
        tries,
        ok,
    })
}

/// Both peers' outcomes.
pub fn measure_all(scale: &Scale) -> anyhow::Result<Vec<(&'static str, Outcome)>> {
    let mut out = Vec::new();
    for (i, p) in [Peer::Clb, Peer::Nft].into_iter().enumerate() {
        let o = measure(i, p, scale)?;
        println!("  {}: {o:?}", p.name());
        out.push((p.name(), o));
    }
    Ok(out)
}

/// Runs the section and adds its rows to `report`.
pub fn run(scale: &Scale, report: &mut Report) -> anyhow::Result<()> {
    let r = measure_all(scale)?;
    rows(&r, report);
    Ok(())
}

/// Adds the rows of `r` (clb first) to `report`.
pub fn rows(r: &[(&'static str, Outcome)], report: &mut Report) {
    let conntrack_max = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    let rates: Vec<String> = r
        .iter()
        .map(|(n, o)| {
            format!(
                "{n}: {:.2} Mpps offered, {:.2} Mpps reached the balancer ({} SYNs in {:.1} s), {}/{} real connections",
                o.sent as f64 / o.secs / 1e6,
                o.reached as f64 / o.secs / 1e6,
                o.reached,
                o.secs,
                o.ok,
                o.tries
            )
        })
        .collect();
    let note = format!(
        "spoofed SYNs from 2^20 sources on the attacker's own link, unpaced (the generator's best rate); clb tables 1 M connections/sessions, {} k half-open slots; nf_conntrack_max {conntrack_max}; {}",
        clb_common::DEFAULT_HALF_OPEN / 1024,
        rates.join("; ")
    );
    type Get = fn(&Outcome) -> f64;
    let figures: [(&str, Get, Option<&str>); 3] = [
        (
            "idle established connections alive after the flood",
            Outcome::survival,
            Some("100 %"),
        ),
        (
            "persisted clients still on their backend after the flood",
            Outcome::kept,
            Some("100 %"),
        ),
        (
            "real clients' connections succeeding during the flood",
            Outcome::success,
            Some("≥ 99 %"),
        ),
    ];
    for (figure, get, target) in figures {
        let clb = get(&r[0].1);
        let met = if target == Some("100 %") {
            clb >= 100.0
        } else {
            clb >= 99.0
        };
        report.push(Row {
            section: "SYN flood (namespaces, real sockets)".into(),
            figure: figure.into(),
            unit: "%".into(),
            clb,
            peers: r[1..]
                .iter()
                .map(|(n, o)| ((*n).to_owned(), get(o)))
                .collect(),
            ratio: None,
            target: target.map(|t| (t.into(), met)),
            note: note.clone(),
        });
    }
}
