//! Per-packet cost through `BPF_PROG_TEST_RUN`, against the XDP_PASS program of the same
//! object, A/B interleaved round by round; the figure is the median of the per-round ratios.
//!
//! Every run is a separate `repeat = 1` test run on a frame chosen so the path is really
//! taken each time (a repeated run would see its own rewritten frame): established flows
//! re-send one packet of a flow whose entry exists; new flows use a fresh source port or
//! address every run. The kernel-reported time of a single run includes a fixed overhead
//! that XDP_PASS pays too, so ratios here are lower bounds of the programs' own cost ratio.

use std::net::{Ipv4Addr, SocketAddrV4};

use clb::{
    model::{ListenerSpec, Proto},
    time::monotonic_ns,
};
use clb_common::{PASS_PROGRAM, PROTO_TCP, XDP_PROGRAM};

use super::{
    Scale, entries, listener, median,
    report::{Report, Row},
};
use crate::{
    lab::{PacketLab, XDP_PASS, XDP_REDIRECT, backend, with_lab},
    packet::{ACK, FrameSpec, SYN, parse},
};

const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 80);

fn web(persist: u32) -> ListenerSpec {
    let backends: Vec<SocketAddrV4> = (2..=4).map(|n| backend(n, 8080)).collect();
    listener("web", VIP, Proto::Tcp, persist, &backends)
}

/// A unique source for the i-th new flow of a figure (`base` keeps figures apart).
fn source(base: u8, i: usize) -> SocketAddrV4 {
    let ip = (u32::from(base) << 24) | (3 << 16) | ((i / 50_000) as u32);
    SocketAddrV4::new(Ipv4Addr::from(ip), 1024 + (i % 50_000) as u16)
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
                "run {i}: verdict {v}, expected {expect}: the path was not taken"
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

/// Fills the tables to `n` live entries each (beyond what the figures themselves create).
fn fill(lab: &mut PacketLab, n: usize) -> anyhow::Result<()> {
    let l = &lab.lb.listeners()["web"];
    let (lid, bid) = (l.id.expect("L4") as u16, l.backends[0].id);
    let (ck, cv, sk, sv) = entries(n, lid, bid, PROTO_TCP, monotonic_ns());
    let dp = lab.lb.dataplane_mut();
    dp.put_conns(&ck, &cv)?;
    dp.put_sessions(&sk, &sv)?;
    Ok(())
}

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

/// Runs every per-packet figure and adds them to `report`.
pub fn run(scale: &Scale, report: &mut Report) -> anyhow::Result<()> {
    let rows = with_lab(|lab| -> anyhow::Result<Vec<Row>> {
        let mut rows = Vec::new();
        let mut by_size = Vec::new();
        for (size, label) in [(1000usize, "1k"), (scale.large_table, "large")] {
            let label = if label == "large" {
                format!("{}k", size / 1000)
            } else {
                label.to_owned()
            };
            lab.lb.apply(vec![web(0)])?;
            fill(lab, size)?;
            // Established: one flow's ACK, again and again.
            let c = SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 2), 40000);
            let (v, out) = lab.run(&FrameSpec::tcp(c, VIP, SYN).build());
            anyhow::ensure!(v == XDP_REDIRECT, "SYN not forwarded");
            let be = parse(&out).map_err(anyhow::Error::msg)?.dst;
            let ack = FrameSpec::tcp(c, VIP, ACK)
                .payload(b"GET / HTTP/1.1\r\n\r\n")
                .build();
            let est = measure(lab, scale, XDP_REDIRECT, |_| (lab.client_if, ack.clone()))?;
            let mut reply = FrameSpec::tcp(be, c, ACK).payload(b"HTTP/1.1 200 OK\r\n\r\n");
            reply.dst_mac = lab.backend_if_mac;
            let reply = reply.build();
            let rep = measure(lab, scale, XDP_REDIRECT, |_| {
                (lab.backend_if, reply.clone())
            })?;
            let newf = measure(lab, scale, XDP_REDIRECT, |i| {
                (
                    lab.client_if,
                    FrameSpec::tcp(source(10, i), VIP, SYN).build(),
                )
            })?;
            // Persistence on.
            lab.lb.apply(vec![web(600)])?;
            let hit_client = Ipv4Addr::new(10, 4, 0, 1);
            let (v, _) =
                lab.run(&FrameSpec::tcp(SocketAddrV4::new(hit_client, 1), VIP, SYN).build());
            anyhow::ensure!(v == XDP_REDIRECT, "SYN not forwarded");
            let hit = measure(lab, scale, XDP_REDIRECT, |i| {
                let src = SocketAddrV4::new(hit_client, 2 + (i % 60_000) as u16);
                (lab.client_if, FrameSpec::tcp(src, VIP, SYN).build())
            })?;
            let write = measure(lab, scale, XDP_REDIRECT, |i| {
                (
                    lab.client_if,
                    FrameSpec::tcp(source(11, i), VIP, SYN).build(),
                )
            })?;
            by_size.push((label, est, rep, newf, hit, write));
        }
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
        let (small, large) = (&by_size[0], &by_size[1]);
        rows.push(row(
            &format!("established TCP flow ({} entries)", small.0),
            &small.1,
            Some((4.5, "≤ 4.5× XDP_PASS")),
            "conntrack hit, DNAT, cached next hop, devmap redirect",
        ));
        rows.push(row(
            &format!("new TCP flow, persistence off ({})", small.0),
            &small.3,
            None,
            "schedule + conn insert",
        ));
        rows.push(row(
            &format!("new flow hitting a persistence entry ({})", small.0),
            &small.4,
            None,
            "session hit + conn insert",
        ));
        rows.push(row(
            &format!("new flow writing a persistence entry ({})", small.0),
            &small.5,
            Some((6.0, "≤ 6× XDP_PASS")),
            "schedule + session insert + conn insert",
        ));
        rows.push(row(
            &format!("reply-path packet ({})", small.0),
            &small.2,
            None,
            "reverse lookup, SNAT to VIP",
        ));
        rows.push(row(
            "non-VIP pass-through",
            &nonvip,
            None,
            "two lookups, XDP_PASS",
        ));
        for (i, what) in [
            (1usize, "established TCP flow"),
            (3, "new TCP flow, persistence off"),
            (5, "new flow writing a persistence entry"),
        ] {
            let pick = |s: &(String, Timing, Timing, Timing, Timing, Timing)| match i {
                1 => s.1.path_ns,
                3 => s.3.path_ns,
                _ => s.5.path_ns,
            };
            let (a, b) = (pick(small), pick(large));
            let r = b / a;
            rows.push(Row {
                section: "per-packet (BPF_PROG_TEST_RUN)".into(),
                figure: format!("{what}: {} vs {} entries", large.0, small.0),
                unit: "ns".into(),
                clb: b,
                peers: vec![(format!("{} entries", small.0), a)],
                ratio: Some((format!("{} entries", small.0), r)),
                target: Some(("within 1.2×".into(), r <= 1.2)),
                note: "same figure with the tables pre-filled".into(),
            });
        }
        Ok(rows)
    })?;
    for r in rows {
        report.push(r);
    }
    Ok(())
}
