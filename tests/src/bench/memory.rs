//! Map memory per table entry (the kernel's `memlock` accounting), and the sweeper: wall and
//! CPU time to remove a million expired entries, and the datapath's packet rate while it runs.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsFd as _,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use clb::{
    control::model::{Kind, Proto, TablesSpec},
    datapath::{Reader as _, sweep::sweep},
    time::monotonic_ns,
};
use clb_common::{DEFAULT_CONNS, DEFAULT_SESSIONS, NS_PER_SEC, PROTO_TCP, PROTO_UDP};

use super::{
    Scale, entries, listener, median,
    rate::{Balancing, Generator, Peer, Sink, setup_balancer},
    report::{Report, Row},
};
use crate::{lab::with_lab_tables, netns::Topology};

/// CPU time (user + system) of the calling thread.
fn thread_cpu() -> Duration {
    // SAFETY: a zeroed rusage is a valid out-buffer.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer; RUSAGE_THREAD is Linux-specific and supported.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Runs the memory and sweep figures and adds them to `report`.
pub fn run(scale: &Scale, report: &mut Report) -> anyhow::Result<()> {
    let rows = with_lab_tables(TablesSpec::default(), |lab| -> anyhow::Result<Vec<Row>> {
        let mut rows = Vec::new();
        let [conns, half, sessions, pending, conns6, half6, sessions6, _] =
            lab.reader().table_info()?;
        let conn_bytes = conns.memory_bytes as f64 / f64::from(conns.capacity);
        let sess_bytes = sessions.memory_bytes as f64 / f64::from(sessions.capacity);
        rows.push(Row {
            section: "memory".into(),
            figure: "map memory per connection entry".into(),
            unit: "B".into(),
            clb: conn_bytes,
            peers: vec![("per session entry".into(), sess_bytes)],
            ratio: None,
            // The map's fixed header (a few hundred bytes) is part of memlock: compare per
            // entry at the precision shown.
            target: Some(("≤ 96 B".into(), (conn_bytes * 100.0).round() <= 9600.0)),
            note: format!(
                "memlock ÷ max_entries: {} B / {} (sessions {} B / {}); 12 B key + 16 B value + kernel element header + bucket",
                conns.memory_bytes, conns.capacity, sessions.memory_bytes, sessions.capacity
            ),
        });

        let conn6_bytes = conns6.memory_bytes as f64 / f64::from(conns6.capacity);
        let sess6_bytes = sessions6.memory_bytes as f64 / f64::from(sessions6.capacity);
        rows.push(Row {
            section: "memory".into(),
            figure: "IPv6: map memory per connection entry".into(),
            unit: "B".into(),
            clb: conn6_bytes,
            peers: vec![
                ("per session entry".into(), sess6_bytes),
                ("IPv4".into(), conn_bytes),
            ],
            ratio: None,
            target: None,
            note: format!(
                "memlock ÷ max_entries: {} B / {} (sessions {} B / {}); 24 B key (128-bit client) + 16 B value + kernel element header + bucket",
                conns6.memory_bytes, conns6.capacity, sessions6.memory_bytes, sessions6.capacity
            ),
        });

        let per = |t: &clb::datapath::TableInfo| t.memory_bytes as f64 / f64::from(t.capacity);
        rows.push(Row {
            section: "memory".into(),
            figure: "map memory per half-open slot (in-place table)".into(),
            unit: "B".into(),
            clb: per(&half),
            peers: vec![
                ("per pending-session slot".into(), per(&pending)),
                ("IPv6".into(), per(&half6)),
                ("LRU connection entry".into(), conn_bytes),
            ],
            ratio: None,
            target: None,
            note: format!(
                "memlock ÷ slots: {} B / {} (pending {} B / {}, IPv6 {} B / {}); a slot is its 12 B key, 16 B value and a 4 B sequence word, 8 slots an array element, no kernel element header",
                half.memory_bytes,
                half.capacity,
                pending.memory_bytes,
                pending.capacity,
                half6.memory_bytes,
                half6.capacity
            ),
        });

        // Sweep on its own.
        let mut l = listener(
            "web",
            SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 80),
            Proto::Tcp,
            60,
            &["10.1.0.2:80".parse::<std::net::SocketAddr>()?],
        );
        if let Kind::L4(k) = &mut l.kind {
            k.idle_timeout = Some(10);
        }
        lab.apply(vec![l]);
        let (lid, bid) = (
            lab.listener_id("web"),
            lab.backend_id("web", "10.1.0.2:80".parse::<std::net::SocketAddr>()?),
        );
        let n = scale
            .sweep_entries
            .min(DEFAULT_CONNS.min(DEFAULT_SESSIONS) as usize);
        let old = monotonic_ns().saturating_sub(100 * NS_PER_SEC);
        let (ck, cv, sk, sv) = entries(n, lid, bid, PROTO_TCP, old);
        lab.fill_conns(&ck, &cv)?;
        lab.fill_sessions(&sk, &sv)?;
        let (c0, t0) = (thread_cpu(), Instant::now());
        let r = sweep(
            lab.reader(),
            &|| lab.ctl.snapshot().policy.clone(),
            monotonic_ns(),
            Duration::ZERO,
        )?;
        let (wall, cpu) = (t0.elapsed(), thread_cpu() - c0);
        anyhow::ensure!(
            r.conns_removed as usize == n,
            "swept {} of {n} connections",
            r.conns_removed
        );
        let entries = (r.conns_removed + r.sessions_removed) as f64;
        let per_million = cpu.as_secs_f64() * 1e6 / entries;
        rows.push(Row {
            section: "sweeper".into(),
            figure: "CPU to sweep 1 M expired entries".into(),
            unit: "s CPU".into(),
            clb: per_million,
            peers: vec![("wall per 1 M".into(), wall.as_secs_f64() * 1e6 / entries)],
            ratio: None,
            target: Some(("≤ 1 s of one core".into(), per_million <= 1.0)),
            note: format!(
                "one unpaced sweep of {n} connections + {n} sessions (batch read 8192, batch delete): {:.2} s CPU, {:.2} s wall, removed {} + {}",
                cpu.as_secs_f64(),
                wall.as_secs_f64(),
                r.conns_removed,
                r.sessions_removed
            ),
        });
        Ok(rows)
    })?;
    for r in rows {
        report.push(r);
    }
    dip(scale, report)
}

/// Packet rate of established UDP flows before and while the sweeper removes ~1 M entries
/// from the same connection table.
fn dip(scale: &Scale, report: &mut Report) -> anyhow::Result<()> {
    let topo = Topology::bare("md", 3, 0)?;
    let sinks: Vec<Sink> = topo
        .backends
        .iter()
        .map(Sink::attach)
        .collect::<Result<_, _>>()?;
    let balancing = setup_balancer(&topo, Peer::Clb { persist: 0 })?;
    let Balancing::Clb(clb) = &balancing else {
        anyhow::bail!("clb expected");
    };
    let mut g = Generator::new(&topo, PROTO_UDP, scale.sources, 1)?;
    g.send(&topo.client, u64::from(scale.sources))?;
    g.reset()?;
    let burst = (scale.packets / 20).max(1000);
    let samples: Mutex<Vec<(Instant, Instant, f64)>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let snap = clb.ctl.snapshot();
    let udp = snap
        .listener("udp")
        .ok_or_else(|| anyhow::anyhow!("no udp listener"))?;
    let (lid, bid) = (
        udp.id.ok_or_else(|| anyhow::anyhow!("no id"))? as u16,
        udp.backends[0].id.ok_or_else(|| anyhow::anyhow!("no id"))?,
    );
    let n = (scale.sweep_entries.min(DEFAULT_CONNS as usize))
        .saturating_sub(scale.sources as usize + 50_000)
        .max(1000);
    // Expired: older than the UDP idle timeout (300 s) — or as old as the clock allows on a
    // machine up for less (the figure then sweeps what it can; the report says how many).
    let old = monotonic_ns().saturating_sub(400 * NS_PER_SEC);
    let (ck, cv, _, _) = entries(n, lid, bid, PROTO_UDP, old);
    let window = std::thread::scope(|s| -> anyhow::Result<(Instant, Instant, u64)> {
        let gen_thread = s.spawn(|| -> anyhow::Result<()> {
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                let took = g.send(&topo.client, burst)?;
                samples.lock().expect("samples").push((
                    start,
                    Instant::now(),
                    burst as f64 / took.as_secs_f64(),
                ));
            }
            Ok(())
        });
        std::thread::sleep(Duration::from_millis(500));
        clb::datapath::batch::update(clb.reader.aya_tables().conn_map().fd().as_fd(), &ck, &cv)?;
        std::thread::sleep(Duration::from_secs(1));
        let from = Instant::now();
        let r = sweep(
            clb.reader.as_ref(),
            &|| clb.ctl.snapshot().policy.clone(),
            monotonic_ns(),
            clb::daemon::SWEEP_PAUSE,
        )?;
        let to = Instant::now();
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        gen_thread
            .join()
            .map_err(|_| anyhow::anyhow!("generator thread panicked"))??;
        Ok((from, to, r.conns_removed))
    })?;
    let (from, to, removed) = window;
    let samples = samples.into_inner().expect("samples");
    // "Before": bursts after the table was filled (the fill competes for it too) and before
    // the sweep started.
    let fill_done = from - Duration::from_secs(1);
    let mut before: Vec<f64> = samples
        .iter()
        .filter(|(b, e, _)| *b >= fill_done && *e < from)
        .map(|(_, _, p)| *p)
        .collect();
    let mut during: Vec<f64> = samples
        .iter()
        .filter(|(b, e, _)| *e > from && *b < to)
        .map(|(_, _, p)| *p)
        .collect();
    let (b, d) = (median(&mut before), median(&mut during));
    let dip = 1.0 - d / b;
    drop(sinks);
    report.push(Row {
        section: "sweeper".into(),
        figure: format!("UDP established pps while sweeping {removed} entries"),
        unit: "pps".into(),
        clb: d,
        peers: vec![("before the sweep".into(), b)],
        ratio: Some(("before".into(), d / b)),
        target: Some(("no visible dip (< 10 %)".into(), dip < 0.10)),
        note: format!(
            "median of {} generator bursts during vs {} before; the daemon's paced sweep (2 ms pause per 8192 entries) took {:.2} s wall",
            during.len(),
            before.len(),
            (to - from).as_secs_f64()
        ),
    });
    Ok(())
}
