//! Per-packet cost through `BPF_PROG_TEST_RUN`, against the XDP_PASS program of the same
//! object, A/B interleaved round by round; the figure is the median of the per-round ratios.
//!
//! Every run is a separate `repeat = 1` test run on a frame chosen so the path is really
//! taken each time (a repeated run would see its own rewritten frame): established flows
//! re-send one packet of a flow whose entry exists; new flows use a fresh source port or
//! address every run. The kernel-reported time of a single run includes a fixed overhead
//! that XDP_PASS pays too, so ratios here are lower bounds of the programs' own cost ratio.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use clb::{
    control::model::{Kind, ListenerSpec, Proto, Sched, TablesSpec},
    time::monotonic_ns,
};
use clb_common::{
    ConnKey, HALF_F_REPLIED, HALF_SYN, HalfOpenValue, PASS_PROGRAM, PROTO_TCP, XDP_PROGRAM,
    ip_to_be, port_to_be,
};

use super::{
    Scale, entries, listener, median,
    report::{Report, Row},
};
use crate::{
    lab::{CLIENT6, PacketLab, XDP_PASS, XDP_REDIRECT, backend, backend6, with_lab_tables},
    packet::{ACK, FrameSpec, SYN, parse},
    packet6::{Frame6Spec, parse6},
};

const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 80);
const VIP6: SocketAddrV6 =
    SocketAddrV6::new(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100), 80, 0, 0);

fn web6() -> ListenerSpec {
    let backends: Vec<SocketAddrV6> = (2..=4).map(|n| backend6(n, 8080)).collect();
    listener("web6", VIP6, Proto::Tcp, 0, &backends)
}

/// A unique IPv6 source for the i-th new flow (behind the lab's client-side router).
fn source6(i: usize) -> SocketAddrV6 {
    let ip = Ipv6Addr::new(0xfd00, 2, 3, (i / 50_000) as u16, 0, 0, 0, 1);
    SocketAddrV6::new(ip, 1024 + (i % 50_000) as u16, 0, 0)
}

fn web(persist: u32) -> ListenerSpec {
    let backends: Vec<SocketAddrV4> = (2..=4).map(|n| backend(n, 8080)).collect();
    listener("web", VIP, Proto::Tcp, persist, &backends)
}

fn maglev(persist: u32) -> ListenerSpec {
    let mut l = web(persist);
    if let Kind::L4(k) = &mut l.kind {
        k.sched = Sched::Maglev;
    }
    l
}

fn least_conns(persist: u32) -> ListenerSpec {
    let mut l = web(persist);
    if let Kind::L4(k) = &mut l.kind {
        k.sched = Sched::Lc;
    }
    l
}

/// A unique source for the i-th new flow of a figure (`base` keeps figures apart).
fn source(base: u8, i: usize) -> SocketAddrV4 {
    let ip = (u32::from(base) << 24) | (3 << 16) | ((i / 50_000) as u32);
    SocketAddrV4::new(Ipv4Addr::from(ip), 1024 + (i % 50_000) as u16)
}

/// A client of its own for the i-th new flow of a figure: a new client every run.
fn new_client(base: u8, i: usize) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from((u32::from(base) << 24) | (i as u32 + 1)),
        40000,
    )
}

/// Source, destination and TCP flags of a test frame, for error messages.
fn describe(f: &[u8]) -> String {
    match parse(f) {
        Ok(p) => format!("{} → {} flags {:#04x}", p.src, p.dst, p.tcp_flags),
        Err(_) => match parse6(f) {
            Ok(p) => format!("{} → {} flags {:#04x}", p.src, p.dst, p.tcp_flags),
            Err(e) => e,
        },
    }
}

/// One figure: (median ns of the path, median ns of XDP_PASS, median ratio).
struct Timing {
    path_ns: f64,
    pass_ns: f64,
    ratio: f64,
}

fn measure(
    lab: &PacketLab,
    scale: &Scale,
    expect: u32,
    mut frame: impl FnMut(usize) -> (u32, Vec<u8>),
) -> anyhow::Result<Timing> {
    let pass_frame = FrameSpec::tcp("10.0.1.2:40000".parse()?, VIP, ACK).build();
    let (mut paths, mut passes, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut i = 0;
    for _ in 0..scale.rounds {
        let mut pass_total = 0u64;
        for _ in 0..scale.runs_per_round {
            let (_, _, ns) = lab.run_prog(PASS_PROGRAM, lab.client_if, &pass_frame);
            pass_total += ns;
        }
        let mut path_total = 0u64;
        for _ in 0..scale.runs_per_round {
            let (ingress, f) = frame(i);
            i += 1;
            let (v, _, ns) = lab.run_prog(XDP_PROGRAM, ingress, &f);
            anyhow::ensure!(
                v == expect,
                "run {i}: verdict {v}, expected {expect}: the path was not taken (frame {})",
                describe(&f)
            );
            path_total += ns;
        }
        let n = scale.runs_per_round as f64;
        let (p, q) = (path_total as f64 / n, pass_total as f64 / n);
        paths.push(p);
        passes.push(q);
        ratios.push(p / q.max(1.0));
    }
    Ok(Timing {
        path_ns: median(&mut paths),
        pass_ns: median(&mut passes),
        ratio: median(&mut ratios),
    })
}

/// [`measure`] on this thread (CPU 0) while a second thread on CPU 1 runs `other` frames
/// through the same program without pause: both CPUs take the path at once.
fn measure_parallel(
    lab: &PacketLab,
    scale: &Scale,
    expect: u32,
    frame: impl FnMut(usize) -> (u32, Vec<u8>),
    other: impl Fn(usize) -> (u32, Vec<u8>) + Sync,
) -> anyhow::Result<Timing> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = AtomicBool::new(false);
    let runs = AtomicU64::new(0);
    std::thread::scope(|s| {
        let busy = s.spawn(|| {
            crate::lab::pin_to_cpu(1);
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let (ingress, f) = other(i);
                lab.run_prog(XDP_PROGRAM, ingress, &f);
                i += 1;
                runs.store(i as u64, Ordering::Relaxed);
            }
        });
        // Time only once the other CPU is busy (its thread may start late).
        let started = crate::wait_for(std::time::Duration::from_secs(5), || {
            (runs.load(Ordering::Relaxed) > 0).then_some(())
        });
        let t = if started.is_some() {
            measure(lab, scale, expect, frame)
        } else {
            Err(anyhow::anyhow!("the second CPU ran nothing within 5 s"))
        };
        stop.store(true, Ordering::Relaxed);
        busy.join().ok();
        t
    })
}

/// Fills the verified tables to `n` live entries each (beyond what the figures create).
fn fill(lab: &PacketLab, n: usize) -> anyhow::Result<()> {
    let lid = lab.listener_id("web");
    let bid = lab.backend_id("web", backend(2, 8080));
    let (ck, cv, sk, sv) = entries(n, lid, bid, PROTO_TCP, monotonic_ns());
    lab.fill_conns(&ck, &cv)?;
    lab.fill_sessions(&sk, &sv)?;
    Ok(())
}

/// Half-open entries for the flows `source(base, 0..n)`, as their SYNs would have left them.
fn half_open_for(lab: &PacketLab, base: u8, n: usize) -> anyhow::Result<()> {
    let lid = lab.listener_id("web");
    let bid = lab.backend_id("web", backend(2, 8080));
    let now = monotonic_ns();
    let keys: Vec<ConnKey> = (0..n)
        .map(|i| {
            let s = source(base, i);
            ConnKey {
                client: ip_to_be(s.ip().octets()),
                client_port: port_to_be(s.port()),
                listener: lid,
                proto: PROTO_TCP,
                _pad: [0; 3],
            }
        })
        .collect();
    let vals = vec![
        HalfOpenValue {
            last_seen_ns: now,
            backend: bid as u16,
            kind: HALF_SYN,
            // The backend's SYN-ACK seen: the bench's ACKs (ack 2000) prove the handshake.
            flags: HALF_F_REPLIED,
            backend_isn: HANDSHAKE_ISN,
        };
        n
    ];
    let written = lab.fill_half_open(&keys, &vals);
    anyhow::ensure!(
        written == n,
        "{written} of {n} half-open entries written (a set stayed busy)"
    );
    Ok(())
}

/// The backends' initial sequence number in the bench's handshakes: `FrameSpec::tcp`'s ACKs
/// (ack 2000) acknowledge it.
const HANDSHAKE_ISN: u32 = 1999;

fn row(figure: &str, t: &Timing, target: Option<(f64, &str)>, note: &str) -> Row {
    Row {
        section: "per-packet (BPF_PROG_TEST_RUN)".into(),
        figure: figure.into(),
        unit: "ns".into(),
        clb: t.path_ns,
        peers: vec![("XDP_PASS".into(), t.pass_ns)],
        ratio: Some(("XDP_PASS".into(), t.ratio)),
        target: target.map(|(max, text)| (text.to_owned(), t.ratio <= max)),
        note: note.into(),
    }
}

/// The figures measured at one table size.
struct AtSize {
    label: String,
    established: Timing,
    reply: Timing,
    syn: Timing,
    syn_pending: Timing,
    syn_hit: Timing,
    handshake_ack: Timing,
}

/// Runs every per-packet figure and adds them to `report`.
pub fn run(scale: &Scale, report: &mut Report) -> anyhow::Result<()> {
    // Tables large enough for the "large" figure, and no flood mode: the figures measure the
    // ordinary paths (flood mode gets its own).
    let tables = TablesSpec {
        connections: (scale.large_table as u32).max(1 << 16).next_power_of_two(),
        sessions: (scale.large_table as u32).max(1 << 16).next_power_of_two(),
        half_open: 1 << 17,
        flood_threshold: Some(0),
        ..TablesSpec::default()
    };
    let rows = with_lab_tables(tables, |lab| -> anyhow::Result<Vec<Row>> {
        let mut rows = Vec::new();
        let mut by_size: Vec<AtSize> = Vec::new();
        let runs = scale.rounds * scale.runs_per_round;
        for (round, size) in [1000usize, scale.large_table].into_iter().enumerate() {
            let label = format!("{}k", size / 1000);
            let base = 20 + 10 * round as u8;
            lab.apply(vec![web(0)]);
            fill(lab, size)?;
            // Established: one verified flow's data, again and again.
            let c = SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 2), 40000);
            let (v, out) = lab.run(&FrameSpec::tcp(c, VIP, SYN).build());
            anyhow::ensure!(v == XDP_REDIRECT, "SYN not forwarded");
            let be = parse(&out).map_err(anyhow::Error::msg)?.dst;
            // The backend's SYN-ACK, whose number the client's ACK acknowledges (the proof
            // that promotes the flow).
            let mut sa = FrameSpec::tcp(be, c, SYN | ACK);
            sa.dst_mac = lab.backend_if_mac;
            sa.seq = HANDSHAKE_ISN;
            let (v, _) = lab.run_on(lab.backend_if, &sa.build());
            anyhow::ensure!(v == XDP_REDIRECT, "SYN-ACK not forwarded");
            let (v, _) = lab.run(&FrameSpec::tcp(c, VIP, ACK).build());
            anyhow::ensure!(v == XDP_REDIRECT, "ACK not forwarded");
            let key = ConnKey {
                client: ip_to_be(c.ip().octets()),
                client_port: port_to_be(c.port()),
                listener: lab.listener_id("web"),
                proto: PROTO_TCP,
                _pad: [0; 3],
            };
            anyhow::ensure!(
                lab.conn(&key).is_some(),
                "the handshake did not promote the flow"
            );
            let ack = FrameSpec::tcp(c, VIP, ACK)
                .payload(b"GET / HTTP/1.1\r\n\r\n")
                .build();
            let established = measure(lab, scale, XDP_REDIRECT, |_| (lab.client_if, ack.clone()))?;
            let mut reply = FrameSpec::tcp(be, c, ACK).payload(b"HTTP/1.1 200 OK\r\n\r\n");
            reply.dst_mac = lab.backend_if_mac;
            let reply = reply.build();
            let reply = measure(lab, scale, XDP_REDIRECT, |_| {
                (lab.backend_if, reply.clone())
            })?;
            let syn = measure(lab, scale, XDP_REDIRECT, |i| {
                (
                    lab.client_if,
                    FrameSpec::tcp(source(base, i), VIP, SYN).build(),
                )
            })?;
            half_open_for(lab, base + 1, runs)?;
            let handshake_ack = measure(lab, scale, XDP_REDIRECT, |i| {
                (
                    lab.client_if,
                    FrameSpec::tcp(source(base + 1, i), VIP, ACK).build(),
                )
            })?;
            // Persistence on.
            lab.apply(vec![web(600)]);
            let hit_client = Ipv4Addr::new(10, 4, 0, 1);
            let (v, _) =
                lab.run(&FrameSpec::tcp(SocketAddrV4::new(hit_client, 1), VIP, SYN).build());
            anyhow::ensure!(v == XDP_REDIRECT, "SYN not forwarded");
            let syn_hit = measure(lab, scale, XDP_REDIRECT, |i| {
                let src = SocketAddrV4::new(hit_client, 2 + (i % 60_000) as u16);
                (lab.client_if, FrameSpec::tcp(src, VIP, SYN).build())
            })?;
            let syn_pending = measure(lab, scale, XDP_REDIRECT, |i| {
                (
                    lab.client_if,
                    FrameSpec::tcp(new_client(base + 2, i), VIP, SYN).build(),
                )
            })?;
            by_size.push(AtSize {
                label,
                established,
                reply,
                syn,
                syn_pending,
                syn_hit,
                handshake_ack,
            });
        }
        // Schedulers and flood mode, persistence off, small tables.
        lab.apply(vec![maglev(0)]);
        let syn_maglev = measure(lab, scale, XDP_REDIRECT, |i| {
            (
                lab.client_if,
                FrameSpec::tcp(source(60, i), VIP, SYN).build(),
            )
        })?;
        // Both CPUs scheduling new flows at once: the round-robin cursor is the one cache
        // line every CPU writes per new flow; Maglev writes nothing shared.
        let syn_maglev_par = measure_parallel(
            lab,
            scale,
            XDP_REDIRECT,
            |i| {
                (
                    lab.client_if,
                    FrameSpec::tcp(source(61, i), VIP, SYN).build(),
                )
            },
            |i| {
                (
                    lab.client_if,
                    FrameSpec::tcp(source(62, i), VIP, SYN).build(),
                )
            },
        )?;
        lab.apply(vec![web(0)]);
        let syn_wrr = measure(lab, scale, XDP_REDIRECT, |i| {
            (
                lab.client_if,
                FrameSpec::tcp(source(63, i), VIP, SYN).build(),
            )
        })?;
        let syn_wrr_par = measure_parallel(
            lab,
            scale,
            XDP_REDIRECT,
            |i| {
                (
                    lab.client_if,
                    FrameSpec::tcp(source(64, i), VIP, SYN).build(),
                )
            },
            |i| {
                (
                    lab.client_if,
                    FrameSpec::tcp(source(65, i), VIP, SYN).build(),
                )
            },
        )?;
        // Least connections: the cursor as round robin, plus a comparison of every accepting
        // backend's count (3 here).
        lab.apply(vec![least_conns(0)]);
        let syn_lc = measure(lab, scale, XDP_REDIRECT, |i| {
            (
                lab.client_if,
                FrameSpec::tcp(source(66, i), VIP, SYN).build(),
            )
        })?;
        let syn_lc_par = measure_parallel(
            lab,
            scale,
            XDP_REDIRECT,
            |i| {
                (
                    lab.client_if,
                    FrameSpec::tcp(source(67, i), VIP, SYN).build(),
                )
            },
            |i| {
                (
                    lab.client_if,
                    FrameSpec::tcp(source(68, i), VIP, SYN).build(),
                )
            },
        )?;
        lab.apply(vec![web(0)]);
        let nonvip = measure(lab, scale, XDP_PASS, |_| {
            (
                lab.client_if,
                FrameSpec::tcp(
                    "10.0.1.2:40001".parse().expect("addr"),
                    "10.0.0.200:80".parse().expect("addr"),
                    SYN,
                )
                .build(),
            )
        })?;
        // IPv6: the balancer tail-calls its IPv6 program; same paths, 16-byte addresses.
        lab.apply(vec![web(0), web6()]);
        let c6 = SocketAddrV6::new(CLIENT6, 40000, 0, 0);
        let (v, out) = lab.run(&Frame6Spec::tcp(c6, VIP6, SYN).build());
        anyhow::ensure!(v == XDP_REDIRECT, "IPv6 SYN not forwarded");
        let be6 = parse6(&out).map_err(anyhow::Error::msg)?.dst;
        let mut sa6 = Frame6Spec::tcp(be6, c6, SYN | ACK);
        sa6.dst_mac = lab.backend_if_mac;
        sa6.seq = HANDSHAKE_ISN;
        let (v, _) = lab.run_on(lab.backend_if, &sa6.build());
        anyhow::ensure!(v == XDP_REDIRECT, "IPv6 SYN-ACK not forwarded");
        let (v, _) = lab.run(&Frame6Spec::tcp(c6, VIP6, ACK).build());
        anyhow::ensure!(v == XDP_REDIRECT, "IPv6 ACK not forwarded");
        let ack6 = Frame6Spec::tcp(c6, VIP6, ACK)
            .payload(b"GET / HTTP/1.1\r\n\r\n")
            .build();
        let established6 = measure(lab, scale, XDP_REDIRECT, |_| (lab.client_if, ack6.clone()))?;
        let mut reply6 = Frame6Spec::tcp(be6, c6, ACK).payload(b"HTTP/1.1 200 OK\r\n\r\n");
        reply6.dst_mac = lab.backend_if_mac;
        let reply6 = reply6.build();
        let reply6 = measure(lab, scale, XDP_REDIRECT, |_| {
            (lab.backend_if, reply6.clone())
        })?;
        let syn6 = measure(lab, scale, XDP_REDIRECT, |i| {
            (
                lab.client_if,
                Frame6Spec::tcp(source6(i), VIP6, SYN).build(),
            )
        })?;
        let nonvip6 = measure(lab, scale, XDP_PASS, |_| {
            (
                lab.client_if,
                Frame6Spec::tcp(c6, "[fd00::200]:80".parse().expect("addr"), SYN).build(),
            )
        })?;
        let small = &by_size[0];
        let large = &by_size[1];
        rows.push(row(
            &format!("established TCP flow ({} entries)", small.label),
            &small.established,
            Some((4.5, "≤ 4.5× XDP_PASS")),
            "connection-table hit, DNAT, cached next hop, devmap redirect",
        ));
        rows.push(row(
            &format!("SYN, persistence off ({})", small.label),
            &small.syn,
            Some((6.0, "≤ 6× XDP_PASS")),
            "round robin + half-open insert (no connection entry)",
        ));
        rows.push(row(
            &format!("SYN of a new client, persistence on ({})", small.label),
            &small.syn_pending,
            Some((6.0, "≤ 6× XDP_PASS")),
            "round robin + half-open insert + pending-persistence insert",
        ));
        rows.push(row(
            &format!("SYN of a persisted client ({})", small.label),
            &small.syn_hit,
            None,
            "persistence hit + half-open insert",
        ));
        rows.push(row(
            &format!("handshake-completing ACK ({})", small.label),
            &small.handshake_ack,
            None,
            "half-open hit, promotion: connection insert + half-open delete",
        ));
        rows.push(row(
            &format!("SYN, Maglev scheduler ({})", small.label),
            &syn_maglev,
            None,
            "hash + Maglev table lookup + half-open insert",
        ));
        rows.push(Row {
            section: "per-packet (BPF_PROG_TEST_RUN)".into(),
            figure: format!("SYN, least connections ({})", small.label),
            unit: "ns".into(),
            clb: syn_lc.path_ns,
            peers: vec![("round robin".into(), syn_wrr.path_ns)],
            ratio: Some(("round robin".into(), syn_lc.path_ns / syn_wrr.path_ns)),
            target: Some((
                "≤ 1.1× round robin".into(),
                syn_lc.path_ns / syn_wrr.path_ns <= 1.1,
            )),
            note: "cursor + a global function comparing 3 backends' active counts + half-open insert; same run, round robin's SYN of the same listener shape".into(),
        });
        for (what, single, par) in [
            ("SYN, round robin", &syn_wrr, &syn_wrr_par),
            ("SYN, Maglev", &syn_maglev, &syn_maglev_par),
            ("SYN, least connections", &syn_lc, &syn_lc_par),
        ] {
            let r = par.path_ns / single.path_ns;
            rows.push(Row {
                section: "per-packet (BPF_PROG_TEST_RUN)".into(),
                figure: format!("{what}: both CPUs at once vs one"),
                unit: "ns".into(),
                clb: par.path_ns,
                peers: vec![("one CPU".into(), single.path_ns)],
                ratio: Some(("one CPU".into(), r)),
                target: None,
                note: "CPU 0 measured while CPU 1 runs SYNs of other clients through the same listener; round robin and least connections share one cursor cache line between CPUs (least connections reads the counts, its SYNs write none), Maglev shares nothing written".into(),
            });
        }
        rows.push(row(
            &format!("reply-path packet ({})", small.label),
            &small.reply,
            None,
            "reverse lookup, SNAT to VIP",
        ));
        rows.push(row(
            "non-VIP pass-through",
            &nonvip,
            None,
            "two lookups, XDP_PASS",
        ));
        for (what, t, v4, note) in [
            (
                "IPv6 established TCP flow",
                &established6,
                &small.established,
                "tail call, extension-header walk, connection-table hit, DNAT, cached next hop",
            ),
            (
                "IPv6 SYN, persistence off",
                &syn6,
                &small.syn,
                "round robin + IPv6 half-open insert",
            ),
            (
                "IPv6 reply-path packet",
                &reply6,
                &small.reply,
                "reverse lookup, SNAT to the IPv6 VIP",
            ),
            (
                "IPv6 non-VIP pass-through",
                &nonvip6,
                &nonvip,
                "tail call + lookups, XDP_PASS",
            ),
        ] {
            let mut r = row(what, t, None, note);
            r.peers.push(("IPv4".into(), v4.path_ns));
            r.note = format!("{note}; IPv4's same path {:.2}× XDP_PASS", v4.ratio);
            rows.push(r);
        }
        type Pick = fn(&AtSize) -> f64;
        let compare: [(&str, Pick); 3] = [
            ("established TCP flow", |s| s.established.path_ns),
            ("SYN, persistence off", |s| s.syn.path_ns),
            ("handshake-completing ACK", |s| s.handshake_ack.path_ns),
        ];
        for (what, pick) in compare {
            let (a, b) = (pick(small), pick(large));
            let r = b / a;
            rows.push(Row {
                section: "per-packet (BPF_PROG_TEST_RUN)".into(),
                figure: format!("{what}: {} vs {} entries", large.label, small.label),
                unit: "ns".into(),
                clb: b,
                peers: vec![(format!("{} entries", small.label), a)],
                ratio: Some((format!("{} entries", small.label), r)),
                target: Some(("within 1.2×".into(), r <= 1.2)),
                note: "same figure with the verified tables pre-filled".into(),
            });
        }
        Ok(rows)
    })?;
    for r in rows {
        report.push(r);
    }
    Ok(())
}

/// Katran's per-packet figures from the same run, and each clb path's ratio to them: the
/// established flow against Katran's established flow (target ≤ 1.0×), every new-flow path
/// against Katran's new flow (≤ 0.6×), the non-VIP pass-through against Katran's. `src`:
/// Katran's source (`--katran-src`); `None` reports the peer absent.
pub fn katran_rows(scale: &Scale, src: Option<&std::path::Path>, report: &mut Report) {
    let Some(src) = src else {
        println!(
            "  Katran: absent (no source; --katran-src DIR, default ../shared/peers/katran/src)"
        );
        return;
    };
    let k = match super::katran::measure(src, scale.rounds, scale.runs_per_round) {
        Ok(k) => k,
        Err(e) => {
            println!("  Katran: not measured: {e:#}");
            return;
        }
    };
    let clb = |prefix: &str| {
        report
            .rows
            .iter()
            .find(|r| r.section.starts_with("per-packet") && r.figure.starts_with(prefix))
            .map(|r| r.clb)
    };
    // clb's XDP_PASS floor, measured beside its established flow.
    let pass = report
        .rows
        .iter()
        .find(|r| r.figure.starts_with("established TCP flow (1k"))
        .and_then(|r| r.peers.iter().find(|(n, _)| n == "XDP_PASS"))
        .map_or(f64::NAN, |(_, v)| *v);
    let pairs: [(&str, &str, f64, Option<f64>); 8] = [
        (
            "established TCP flow (1k",
            "established flow",
            k.established,
            Some(1.0),
        ),
        (
            "SYN, persistence off (1k",
            "new flow",
            k.new_flow,
            Some(0.6),
        ),
        (
            "SYN of a new client, persistence on (1k",
            "new flow",
            k.new_flow,
            Some(0.6),
        ),
        (
            "SYN of a persisted client (1k",
            "new flow",
            k.new_flow,
            Some(0.6),
        ),
        (
            "SYN, Maglev scheduler (1k",
            "new flow",
            k.new_flow,
            Some(0.6),
        ),
        (
            "SYN, least connections (1k",
            "new flow",
            k.new_flow,
            Some(0.6),
        ),
        (
            "IPv6 SYN, persistence off",
            "new flow",
            k.new_flow,
            Some(0.6),
        ),
        (
            "non-VIP pass-through",
            "non-VIP pass-through",
            k.non_vip,
            None,
        ),
    ];
    let mut rows = Vec::new();
    for (prefix, theirs, kns, max) in pairs {
        let Some(c) = clb(prefix) else {
            continue;
        };
        let r = c / kns;
        rows.push(Row {
            section: "per-packet vs Katran (BPF_PROG_TEST_RUN)".into(),
            figure: format!("{} vs Katran's {theirs}", prefix.trim_end_matches(" (1k")),
            unit: "ns".into(),
            clb: c,
            peers: vec![
                ("Katran".into(), kns),
                ("XDP_PASS (Katran's run)".into(), k.pass),
            ],
            ratio: Some(("Katran".into(), r)),
            target: max.map(|m| (format!("≤ {m}× Katran"), r <= m)),
            note: format!(
                "Katran 19f08fe built with its own recipe (clang/llc 22), one VIP, three reals, Maglev ring, per-CPU LRU; timed by its reference harness right after clb's rows (XDP_PASS {:.1} ns there, {pass:.1} ns in clb's)",
                k.pass
            ),
        });
    }
    for r in rows {
        report.push(r);
    }
}
