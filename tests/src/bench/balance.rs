//! Held-connection balance under a skewed workload: least connections against round robin
//! (both clb) and nftables' hash, with real TCP clients. The workload is a shop's page view
//! repeated: one long-lived connection (a WebSocket for the cart) and two short requests
//! (connect, one request, close). Round robin sends every third connection — the held ones —
//! to the same backend; a hash spreads them at random; least connections places each new
//! connection on the backend with the fewest open. Counts, not timings: the figure is the
//! busiest backend's held connections over the mean (1.0 is even), and the note gives the
//! counts (max/min).

use std::{
    io::{BufRead as _, BufReader},
    net::{SocketAddrV4, TcpStream},
    time::Duration,
};

use clb::control::model::{Kind, Proto, Sched};

use super::{
    Scale,
    conns::{FastServer, ask, connect_from},
    listener,
    report::{Report, Row},
    start_clb,
};
use crate::{
    netns::{Topology, VIP, backend_ip},
    wait_for,
};

const BACKEND_PORT: u16 = 8080;
const BACKENDS: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    Lc,
    Wrr,
    NftHash,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Lc => "clb lc",
            Peer::Wrr => "clb wrr",
            Peer::NftHash => "nft hash",
        }
    }
}

/// Held connections per backend after `views` page views through `peer`.
fn measure(i: usize, peer: Peer, views: usize) -> anyhow::Result<[usize; BACKENDS]> {
    let topo = Topology::new(&format!("bal{i}"), BACKENDS, 1)?;
    let _servers: Vec<FastServer> = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, ns)| FastServer::start(ns, format!("b{i}")))
        .collect::<Result<_, _>>()?;
    let vip = SocketAddrV4::new(VIP, 80);
    let backends: Vec<SocketAddrV4> = (0..BACKENDS)
        .map(|i| SocketAddrV4::new(backend_ip(i), BACKEND_PORT))
        .collect();
    let _clb = match peer {
        Peer::Lc | Peer::Wrr => {
            let mut l = listener("web", vip, Proto::Tcp, 0, &backends);
            if let (Kind::L4(k), Peer::Lc) = (&mut l.kind, peer) {
                k.sched = Sched::Lc;
            }
            Some(start_clb(&topo, vec![l])?)
        }
        Peer::NftHash => {
            let rules = format!(
                "table ip clbbal {{\n chain pre {{\n  type nat hook prerouting priority dstnat; policy accept;\n  ip daddr {VIP} tcp dport 80 dnat to jhash ip saddr . tcp sport mod 3 map {{ 0 : {}, 1 : {}, 2 : {} }} : {BACKEND_PORT}\n }}\n}}\n",
                backend_ip(0),
                backend_ip(1),
                backend_ip(2)
            );
            let p = std::env::temp_dir().join(format!("{}.nft", topo.lb.name()));
            std::fs::write(&p, rules)?;
            let r = topo.lb.exec(&["nft", "-f", p.to_str().expect("utf-8")]);
            std::fs::remove_file(&p).ok();
            r?;
            None
        }
    };
    let src = topo.extra_clients[0];
    let answer = |c: TcpStream| -> std::io::Result<(usize, BufReader<TcpStream>)> {
        let mut r = BufReader::new(c);
        std::io::Write::write_all(r.get_mut(), b"who\n")?;
        let mut line = String::new();
        r.read_line(&mut line)?;
        let n = line
            .trim()
            .strip_prefix('b')
            .and_then(|n| n.parse().ok())
            .filter(|n| *n < BACKENDS)
            .ok_or_else(|| std::io::Error::other(format!("answer {line:?}")))?;
        Ok((n, r))
    };
    let ready = wait_for(Duration::from_secs(10), || {
        connect_from(&topo.client, src)
            .and_then(|c| ask(&mut BufReader::new(c)))
            .ok()
    });
    anyhow::ensure!(ready.is_some(), "{} never answered", peer.name());
    let mut held = Vec::new();
    let mut counts = [0usize; BACKENDS];
    for _ in 0..views {
        let (n, c) = answer(connect_from(&topo.client, src)?)?;
        counts[n] += 1;
        held.push(c);
        for _ in 0..2 {
            let (_, c) = answer(connect_from(&topo.client, src)?)?;
            drop(c);
        }
    }
    drop(held);
    Ok(counts)
}

/// The busiest backend's load over the mean.
fn peak_to_mean(c: &[usize; BACKENDS]) -> f64 {
    let max = c.iter().copied().max().unwrap_or(0) as f64;
    let mean = c.iter().sum::<usize>() as f64 / BACKENDS as f64;
    max / mean.max(1e-9)
}

/// Runs the balance figure and adds it to `report`.
pub fn run(scale: &Scale, report: &mut Report) -> anyhow::Result<()> {
    // 30 page views in a full or quick run (90 connections), 9 in a tiny one.
    let views = if scale.rounds >= 11 { 30 } else { 9 };
    let mut res = Vec::new();
    for (i, p) in [Peer::Lc, Peer::Wrr, Peer::NftHash].into_iter().enumerate() {
        let c = measure(i, p, views)?;
        println!("  {}: held per backend {c:?}", p.name());
        res.push((p, c));
    }
    let counts: Vec<String> = res
        .iter()
        .map(|(p, c)| {
            format!(
                "{} {} (max/min {}/{})",
                p.name(),
                c.map(|n| n.to_string()).join("/"),
                c.iter().max().unwrap_or(&0),
                c.iter().min().unwrap_or(&0)
            )
        })
        .collect();
    report.push(Row {
        section: "balance (held connections)".into(),
        figure: format!(
            "busiest backend's held connections over the mean, {views} page views (1 held + 2 short each), 3 backends"
        ),
        unit: "×".into(),
        clb: peak_to_mean(&res[0].1),
        peers: res[1..]
            .iter()
            .map(|(p, c)| (p.name().to_owned(), peak_to_mean(c)))
            .collect(),
        ratio: None,
        target: None,
        note: format!(
            "1.0 is even, 3.0 all on one; clb lc is the clb column; {}",
            counts.join(", ")
        ),
    });
    Ok(())
}
