//! Packet rate end to end: a live-frames XDP generator in the client namespace (the project's
//! `clb_gen`, run through `BPF_PROG_TEST_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES`) sends out the
//! client veth; the balancer namespace runs clb (native XDP) or nftables DNAT with conntrack;
//! three backend namespaces count and drop in XDP (`clb_sink`). Offered and delivered rates,
//! loss, and whether any client moved between backends, for each, in one run.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, PerCpuArray},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp},
};
use clb::control::model::{ListenerSpec, Proto, TablesSpec};
use clb_common::{ip_to_be, port_to_be};
use clb_gen::{
    GEN_CONFIG_MAP, GEN_SEQ_MAP, GenConfig, PROTO_TCP, PROTO_UDP, SINK_COUNT_MAP, SINK_SEEN_MAP,
    SINK_SEEN_WORDS,
};

use super::{
    InProcess, Scale, listener, median,
    report::{Report, Row},
    start_clb_with,
};
use crate::netns::{NetNs, Topology, VIP, backend_ip};

const UDP_PORT: u16 = 53;
const TCP_PORT: u16 = 80;

fn load_gen() -> anyhow::Result<Ebpf> {
    let mut e = EbpfLoader::new().load(crate::GEN_OBJECT)?;
    for p in ["clb_gen", "clb_sink"] {
        let prog: &mut Xdp = e.program_mut(p).expect("program").try_into()?;
        prog.load()?;
    }
    Ok(e)
}

/// A counting drop sink on a backend's eth0.
pub(super) struct Sink {
    ebpf: Ebpf,
}

impl Sink {
    pub(super) fn attach(ns: &NetNs) -> anyhow::Result<Self> {
        ns.run(|| {
            let mut ebpf = load_gen()?;
            let prog: &mut Xdp = ebpf.program_mut("clb_sink").expect("sink").try_into()?;
            prog.attach(c"eth0", aya::programs::XdpMode::Driver)?;
            Ok(Sink { ebpf })
        })
    }

    fn count(&self) -> anyhow::Result<u64> {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(SINK_COUNT_MAP).expect("map"))?;
        Ok(m.get(&0, 0)?.iter().sum())
    }

    /// The low 16 bits of every source address seen.
    fn sources(&self) -> anyhow::Result<Vec<u32>> {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(SINK_SEEN_MAP).expect("map"))?;
        let mut out = Vec::new();
        for w in 0..SINK_SEEN_WORDS {
            let bits = m.get(&w, 0)?.iter().fold(0u64, |a, b| a | b);
            out.extend((0..64).filter(|b| bits & (1 << b) != 0).map(|b| w * 64 + b));
        }
        Ok(out)
    }
}

/// What the balancer namespace runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Peer {
    Clb { persist: u32 },
    NftJhash,
    NftNumgen,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Clb { .. } => "clb",
            Peer::NftJhash => "nft jhash",
            Peer::NftNumgen => "nft numgen",
        }
    }
}

/// The balancer side of a run; dropping it leaves the namespace as it was (the program and
/// its maps are held only so they live as long as the run).
pub(super) enum Balancing {
    /// clb in-process (held so it stays loaded and attached).
    Clb(InProcess),
    Nft,
}

fn spec(name: &str, port: u16, proto: Proto, persist: u32) -> ListenerSpec {
    let backends: Vec<SocketAddrV4> = (0..3)
        .map(|i| SocketAddrV4::new(backend_ip(i), port))
        .collect();
    listener(
        name,
        SocketAddrV4::new(VIP, port),
        proto,
        persist,
        &backends,
    )
}

pub(super) fn setup_balancer(topo: &Topology, peer: Peer) -> anyhow::Result<Balancing> {
    match peer {
        Peer::Clb { persist } => {
            // Room for every generated flow in the half-open table (the sinks never answer, so
            // the flows stay unverified), and flood mode off: this measures forwarding rates.
            let tables = TablesSpec {
                half_open: 1 << 21,
                flood_threshold: Some(0),
                ..TablesSpec::default()
            };
            let clb = start_clb_with(
                topo,
                tables,
                vec![
                    spec("udp", UDP_PORT, Proto::Udp, persist),
                    spec("tcp", TCP_PORT, Proto::Tcp, persist),
                ],
            )?;
            Ok(Balancing::Clb(clb))
        }
        Peer::NftJhash | Peer::NftNumgen => {
            // The generator redirects into the client veth; its peer c0 needs GRO (or an XDP
            // program) for the frames to be delivered. GRO keeps XDP out of nft's path.
            topo.lb.exec(&["ethtool", "-K", "c0", "gro", "on"])?;
            let map = "{ 0 : 10.0.10.2, 1 : 10.0.11.2, 2 : 10.0.12.2 }";
            let sel = if peer == Peer::NftJhash {
                "jhash ip saddr mod 3"
            } else {
                "numgen inc mod 3"
            };
            let rules = format!(
                "table ip clbbench {{\n chain pre {{\n  type nat hook prerouting priority dstnat; policy accept;\n  ip daddr {VIP} udp dport {UDP_PORT} dnat to {sel} map {map}\n  ip daddr {VIP} tcp dport {TCP_PORT} dnat to {sel} map {map}\n }}\n}}\n"
            );
            let path = std::env::temp_dir().join(format!("{}.nft", topo.lb.name()));
            std::fs::write(&path, rules)?;
            topo.lb
                .exec(&["nft", "-f", path.to_str().expect("utf-8 path")])?;
            std::fs::remove_file(&path).ok();
            Ok(Balancing::Nft)
        }
    }
}

/// The generator in the client namespace.
pub(super) struct Generator {
    ebpf: Ebpf,
    cfg: GenConfig,
    frame_len: usize,
}

impl Generator {
    pub(super) fn new(
        topo: &Topology,
        proto: u8,
        sources: u32,
        ports: u32,
    ) -> anyhow::Result<Self> {
        let ebpf = topo.client.run(load_gen)?;
        let frame_len = if proto == PROTO_TCP { 54 } else { 64 };
        let cfg = GenConfig {
            dst_mac: topo.lb.mac("c0")?,
            src_mac: topo.client.mac("eth0")?,
            src_base: u32::from(Ipv4Addr::new(10, 2, 0, 1)),
            sources,
            dst: ip_to_be(VIP.octets()),
            dport: port_to_be(if proto == PROTO_TCP {
                TCP_PORT
            } else {
                UDP_PORT
            }),
            sport_base: 10_000,
            ports,
            ifindex: topo.client.ifindex("eth0")?,
            proto,
            tcp_flags: 0,
            _pad: [0; 2],
            frame_len: frame_len as u32,
        };
        let mut g = Self {
            ebpf,
            cfg,
            frame_len,
        };
        let mut m: Array<_, GenConfig> =
            Array::try_from(g.ebpf.map_mut(GEN_CONFIG_MAP).expect("map"))?;
        m.set(0, &g.cfg, 0)?;
        g.reset()?;
        Ok(g)
    }

    /// Changes the first source port (a new set of flows).
    pub(super) fn set_sport_base(&mut self, base: u16) -> anyhow::Result<()> {
        self.cfg.sport_base = base;
        let mut m: Array<_, GenConfig> =
            Array::try_from(self.ebpf.map_mut(GEN_CONFIG_MAP).expect("map"))?;
        m.set(0, &self.cfg, 0)?;
        Ok(())
    }

    pub(super) fn reset(&mut self) -> anyhow::Result<()> {
        let mut seq: Array<_, u64> = Array::try_from(self.ebpf.map_mut(GEN_SEQ_MAP).expect("map"))?;
        seq.set(0, &0, 0)?;
        Ok(())
    }

    /// Sends `n` frames; returns the time it took.
    pub(super) fn send(&self, ns: &NetNs, n: u64) -> anyhow::Result<Duration> {
        let prog: &Xdp = self.ebpf.program("clb_gen").expect("gen").try_into()?;
        let frame = vec![0u8; self.frame_len];
        ns.run(|| -> anyhow::Result<Duration> {
            let t0 = Instant::now();
            let mut left = n;
            while left > 0 {
                // One test run sends at most u32::MAX frames; chunks also keep each call short.
                let chunk = left.min(1 << 22) as u32;
                prog.test_run(TestRunOptions {
                    data_in: Some(&frame),
                    repeat: chunk,
                    attrs: TestRunAttrs::new().xdp_live_frames(64),
                    ..Default::default()
                })?;
                left -= u64::from(chunk);
            }
            Ok(t0.elapsed())
        })
    }
}

/// One measured phase.
#[derive(Clone, Copy, Debug, Default)]
pub struct Phase {
    pub offered_pps: f64,
    pub delivered_pps: f64,
    pub sent: u64,
    pub delivered: u64,
    /// Sources that reached more than one backend.
    pub moved: u64,
    pub sources: u64,
}

fn total(sinks: &[Sink]) -> anyhow::Result<u64> {
    sinks.iter().map(Sink::count).sum()
}

/// Runs one (peer, protocol) phase on a fresh topology.
fn phase(tag: &str, peer: Peer, proto: u8, scale: &Scale) -> anyhow::Result<Phase> {
    let topo = Topology::bare(tag, 3, 0)?;
    let sinks: Vec<Sink> = topo
        .backends
        .iter()
        .map(Sink::attach)
        .collect::<Result<_, _>>()?;
    let _balancing = setup_balancer(&topo, peer)?;
    let ports = if proto == PROTO_TCP {
        scale.syn_ports
    } else {
        1
    };
    let mut g = Generator::new(&topo, proto, scale.sources, ports)?;
    let n = if proto == PROTO_UDP {
        // Establish every flow first, then measure established flows only.
        g.send(&topo.client, u64::from(scale.sources))?;
        std::thread::sleep(Duration::from_millis(300));
        scale.packets
    } else {
        u64::from(scale.sources) * u64::from(scale.syn_ports)
    };
    // Repetitions (new source ports each time for SYNs, so every SYN is a new flow); the
    // median delivered rate counts: where the kernel runs the veth consumers varies from run
    // to run on a 2-core VM.
    let (mut offered, mut rates, mut sent_total, mut delivered_total) =
        (Vec::new(), Vec::new(), 0u64, 0u64);
    for rep in 0..scale.rate_reps {
        if proto == PROTO_TCP {
            g.set_sport_base(10_000 + (rep as u32 * scale.syn_ports) as u16)?;
        }
        let before = total(&sinks)?;
        g.reset()?;
        let took = g.send(&topo.client, n)?;
        std::thread::sleep(Duration::from_millis(300));
        let delivered = total(&sinks)? - before;
        let secs = took.as_secs_f64();
        offered.push(n as f64 / secs);
        rates.push(delivered as f64 / secs);
        sent_total += n;
        delivered_total += delivered;
    }
    // Persistence check: a source seen at two backends moved.
    let mut seen: HashMap<u32, u32> = HashMap::new();
    for s in &sinks {
        for src in s.sources()? {
            *seen.entry(src).or_default() += 1;
        }
    }
    let moved = seen.values().filter(|&&c| c > 1).count() as u64;
    drop(sinks);
    Ok(Phase {
        offered_pps: median(&mut offered),
        delivered_pps: median(&mut rates),
        sent: sent_total,
        delivered: delivered_total,
        moved,
        sources: seen.len() as u64,
    })
}

/// Runs every packet-rate figure and adds them to `report`.
pub fn run(scale: &Scale, report: &mut Report) -> anyhow::Result<()> {
    let udp_peers = [Peer::Clb { persist: 0 }, Peer::NftJhash, Peer::NftNumgen];
    let syn_peers = [Peer::Clb { persist: 600 }, Peer::NftJhash, Peer::NftNumgen];
    let mut udp = Vec::new();
    for (i, p) in udp_peers.iter().enumerate() {
        let ph = phase(&format!("ru{i}"), *p, PROTO_UDP, scale)?;
        println!("  UDP established, {}: {ph:?}", p.name());
        udp.push((*p, ph));
    }
    let mut syn = Vec::new();
    for (i, p) in syn_peers.iter().enumerate() {
        let ph = phase(&format!("rs{i}"), *p, PROTO_TCP, scale)?;
        println!("  TCP SYN new flows, {}: {ph:?}", p.name());
        syn.push((*p, ph));
    }
    for (figure, phases, target, unit_note) in [
        (
            "UDP established-flow rate",
            &udp,
            4.0,
            format!(
                "{} sources, one flow each, all flows established before timing",
                scale.sources
            ),
        ),
        (
            "new-flow rate (TCP SYN)",
            &syn,
            5.0,
            format!(
                "{} distinct source address/port pairs, each a new flow (clb: a half-open entry and, persist 600 s, a pending-persistence entry; nft: a conntrack entry)",
                u64::from(scale.sources) * u64::from(scale.syn_ports)
            ),
        ),
    ] {
        let clb = phases[0].1;
        let best_nft = phases[1..]
            .iter()
            .map(|(_, p)| p.delivered_pps)
            .fold(0.0, f64::max);
        let ratio = clb.delivered_pps / best_nft.max(1.0);
        let loss: Vec<String> = phases
            .iter()
            .map(|(p, ph)| {
                format!(
                    "{}: offered {:.2} Mpps, lost {}",
                    p.name(),
                    ph.offered_pps / 1e6,
                    ph.sent.saturating_sub(ph.delivered)
                )
            })
            .collect();
        report.push(Row {
            section: "packet rate (veth, native XDP)".into(),
            figure: figure.into(),
            unit: "pps delivered".into(),
            clb: clb.delivered_pps,
            peers: phases[1..]
                .iter()
                .map(|(p, ph)| (p.name().to_owned(), ph.delivered_pps))
                .collect(),
            ratio: Some(("best nft".into(), ratio)),
            target: Some((format!("≥ {target}× nft"), ratio >= target)),
            note: format!(
                "{unit_note}; {}; 1 generator core shared with the balancer",
                loss.join("; ")
            ),
        });
    }
    let moved: Vec<String> = udp
        .iter()
        .map(|(p, ph)| format!("UDP {}: {}/{}", p.name(), ph.moved, ph.sources))
        .chain(
            syn.iter()
                .map(|(p, ph)| format!("SYN {}: {}/{}", p.name(), ph.moved, ph.sources)),
        )
        .collect();
    let clb_moved = udp[0].1.moved + syn[0].1.moved;
    report.push(Row {
        section: "persistence check".into(),
        figure: "clients seen at more than one backend".into(),
        unit: "clients".into(),
        clb: clb_moved as f64,
        peers: vec![
            ("nft jhash".into(), (udp[1].1.moved + syn[1].1.moved) as f64),
            (
                "nft numgen".into(),
                (udp[2].1.moved + syn[2].1.moved) as f64,
            ),
        ],
        ratio: None,
        target: Some(("0 moved".into(), clb_moved == 0)),
        note: moved.join(", "),
    });
    Ok(())
}

/// For the smoke test: one small phase per protocol through clb, returned raw.
pub fn smoke(scale: &Scale) -> anyhow::Result<(Phase, Phase)> {
    let udp = phase("su", Peer::Clb { persist: 0 }, PROTO_UDP, scale)?;
    let syn = phase("ss", Peer::Clb { persist: 600 }, PROTO_TCP, scale)?;
    Ok((udp, syn))
}
