//! HTTP listeners: clb (cookie-insertion persistence) against HAProxy (`mode http`,
//! `cookie SRV insert indirect nocache`) and nginx (`proxy_pass`, round robin), the same
//! closed-loop clients and the same three HTTP backends; then clb's tail latency while its
//! `/metrics` is scraped every 100 ms with 1 M entries in the connection and persistence tables,
//! against the same without scrapes (interleaved phases).
//!
//! Every client connection sends `GET /` over keep-alive, returns the cookie it was given, and
//! reconnects every [`REQUESTS_PER_CONN`] requests; latency is write-to-last-byte of one
//! request. Clients, proxies and backends share the VM's 2 cores.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{Array, Map, MapData};
use clb_common::{
    BACKEND_MAP, BackendInfo, CONN_MAP, PROTO_TCP, SESSION_MAP, ip_to_be, port_to_be,
};

use super::{
    Proc, Scale, entries,
    report::{Report, Row},
    spawn_in,
};
use crate::{
    daemon::Daemon,
    http::HttpServer,
    netns::{NetNs, Topology, VIP, backend_ip, enter},
    wait_for,
};

const BACKEND_PORT: u16 = 8082;
/// The L4 listener whose table entries fill the maps (no traffic reaches it).
const FILL_PORT: u16 = 81;
const FILL_BACKEND_PORT: u16 = 9081;
const METRICS: &str = "127.0.0.1:9901";
/// Requests per client connection before it reconnects (with its cookie).
pub const REQUESTS_PER_CONN: u64 = 100;

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, 80)
}

/// One load phase's outcome.
#[derive(Clone, Debug, Default)]
pub struct Load {
    /// Per-request latencies, µs.
    pub latencies_us: Vec<u32>,
    pub secs: f64,
    pub errors: u64,
    /// Requests carrying a persistence cookie answered by another backend than the cookie's
    /// first answer on that client.
    pub moved: u64,
    /// Requests that carried a cookie.
    pub with_cookie: u64,
}

impl Load {
    pub fn requests_per_s(&self) -> f64 {
        self.latencies_us.len() as f64 / self.secs.max(1e-9)
    }

    /// The `q` quantile (0..=1) of latency, ms.
    pub fn quantile_ms(&mut self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        self.latencies_us.sort_unstable();
        let i = ((self.latencies_us.len() as f64 - 1.0) * q).round() as usize;
        f64::from(self.latencies_us[i]) / 1000.0
    }

    fn merge(&mut self, o: Load) {
        self.latencies_us.extend(o.latencies_us);
        self.secs += o.secs;
        self.errors += o.errors;
        self.moved += o.moved;
        self.with_cookie += o.with_cookie;
    }
}

/// One HTTP/1.1 response: status, `Set-Cookie` (name=value), body.
struct Response {
    status: u16,
    set_cookie: Option<String>,
    body: Vec<u8>,
    close: bool,
}

fn read_response(r: &mut BufReader<TcpStream>) -> std::io::Result<Response> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned());
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let (mut len, mut chunked, mut set_cookie, mut close) = (None, false, None, false);
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let Some((k, v)) = l.split_once(':') else {
            return Err(bad("bad header"));
        };
        let v = v.trim();
        match k.to_ascii_lowercase().as_str() {
            "content-length" => len = v.parse::<usize>().ok(),
            "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
            "set-cookie" => set_cookie = v.split(';').next().map(str::to_owned),
            "connection" => close = v.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let n = usize::from_str_radix(line.trim(), 16).map_err(|_| bad("bad chunk size"))?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        body.resize(len.ok_or_else(|| bad("no length"))?, 0);
        r.read_exact(&mut body)?;
    }
    Ok(Response {
        status,
        set_cookie,
        body,
        close,
    })
}

fn backend_of(body: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(body).ok()?;
    Some(
        s.split("\"backend\":\"")
            .nth(1)?
            .split('"')
            .next()?
            .to_owned(),
    )
}

/// Closed-loop clients in `ns`: `conns` threads, each one connection at a time, for `secs`.
pub fn drive(ns: &NetNs, conns: usize, secs: f64) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let path = ns.path();
    let t0 = Instant::now();
    let mut total = Load::default();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..conns)
            .map(|_| {
                let (stop, path) = (stop.clone(), path.clone());
                s.spawn(move || client(&path, &stop))
            })
            .collect();
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            if let Ok(l) = h.join() {
                total.merge(l);
            }
        }
    });
    total.secs = t0.elapsed().as_secs_f64();
    total
}

fn client(ns_path: &str, stop: &AtomicBool) -> Load {
    let mut out = Load::default();
    if enter(ns_path).is_err() {
        out.errors += 1;
        return out;
    }
    let mut cookie: Option<String> = None;
    let mut home: Option<String> = None;
    while !stop.load(Ordering::Relaxed) {
        let Ok(c) = TcpStream::connect_timeout(&vip().into(), Duration::from_secs(2)) else {
            out.errors += 1;
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        c.set_nodelay(true).ok();
        c.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let mut r = BufReader::new(c);
        for _ in 0..REQUESTS_PER_CONN {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let req = match &cookie {
                Some(c) => format!("GET / HTTP/1.1\r\nHost: shop\r\nCookie: {c}\r\n\r\n"),
                None => "GET / HTTP/1.1\r\nHost: shop\r\n\r\n".to_owned(),
            };
            let t = Instant::now();
            let resp = r
                .get_mut()
                .write_all(req.as_bytes())
                .and_then(|()| read_response(&mut r));
            let us = t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
            let resp = match resp {
                Ok(resp) if resp.status == 200 => resp,
                _ => {
                    out.errors += 1;
                    break;
                }
            };
            out.latencies_us.push(us);
            let be = backend_of(&resp.body);
            if cookie.is_some() {
                out.with_cookie += 1;
                match (&home, be) {
                    (None, b) => home = b,
                    (Some(h), Some(b)) if *h != b => out.moved += 1,
                    _ => {}
                }
            }
            if let Some(c) = resp.set_cookie {
                cookie = Some(c);
            }
            if resp.close {
                break;
            }
        }
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    Clb,
    Haproxy,
    Nginx,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Clb => "clb",
            Peer::Haproxy => "haproxy cookie insert",
            Peer::Nginx => "nginx round robin",
        }
    }
}

/// The running proxy; dropping it stops it.
#[expect(dead_code, reason = "held for their Drop")]
enum Running {
    Clb(Box<Daemon>),
    Process(Proc),
}

fn backends() -> Vec<SocketAddrV4> {
    (0..3)
        .map(|i| SocketAddrV4::new(backend_ip(i), BACKEND_PORT))
        .collect()
}

/// clb's config: the HTTP listener, and the L4 listener whose entries fill the tables.
fn clb_config() -> String {
    let mut s = format!(
        "[[listener]]\nname = \"shop\"\nvip = \"{}\"\nproto = \"http\"\npersist = 600\n",
        vip()
    );
    for b in backends() {
        s += &format!("[[listener.backend]]\naddr = \"{b}\"\n");
    }
    s += &format!(
        "[[listener]]\nname = \"fill\"\nvip = \"{VIP}:{FILL_PORT}\"\nproto = \"tcp\"\npersist = 3600\n[listener.health_check]\nkind = \"none\"\n[[listener.backend]]\naddr = \"{}:{FILL_BACKEND_PORT}\"\n",
        backend_ip(0)
    );
    s
}

fn start(topo: &Topology, peer: Peer, dir: &Path) -> anyhow::Result<Running> {
    let log = dir.join("peer.log");
    Ok(match peer {
        Peer::Clb => Running::Clb(Box::new(Daemon::start_with(
            topo,
            &clb_config(),
            &["--metrics", METRICS],
        ))),
        Peer::Haproxy => {
            let servers: String = backends()
                .iter()
                .enumerate()
                .map(|(i, a)| format!("  server b{i} {a} cookie b{i}\n"))
                .collect();
            let cfg = format!(
                "global\n  maxconn 8000\n  pidfile {d}/haproxy.pid\ndefaults\n  mode http\n  option forwardfor\n  timeout connect 5s\n  timeout client 75s\n  timeout server 30s\n  timeout http-keep-alive 75s\n  maxconn 8000\nfrontend fe\n  bind {vip}\n  default_backend be\nbackend be\n  balance roundrobin\n  cookie SRV insert indirect nocache\n{servers}",
                d = dir.display(),
                vip = vip()
            );
            let p = dir.join("haproxy.cfg");
            std::fs::write(&p, cfg)?;
            Running::Process(spawn_in(
                &topo.lb,
                &["haproxy", "-db", "-f", p.to_str().expect("utf-8")],
                &log,
            )?)
        }
        Peer::Nginx => {
            let servers: String = backends()
                .iter()
                .map(|a| format!("    server {a};\n"))
                .collect();
            let cfg = format!(
                "daemon off;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err;\nevents {{ worker_connections 8000; }}\nhttp {{\n  access_log off;\n  upstream be {{\n{servers}    keepalive 32;\n  }}\n  server {{\n    listen {vip};\n    keepalive_timeout 75s;\n    keepalive_requests 1000000;\n    location / {{\n      proxy_pass http://be;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n    }}\n  }}\n}}\n",
                d = dir.display(),
                vip = vip()
            );
            let p = dir.join("nginx.conf");
            std::fs::write(&p, cfg)?;
            Running::Process(spawn_in(
                &topo.lb,
                &[
                    "nginx",
                    "-c",
                    p.to_str().expect("utf-8"),
                    "-p",
                    dir.to_str().expect("utf-8"),
                    "-e",
                    dir.join("nginx.err").to_str().expect("utf-8"),
                ],
                &log,
            )?)
        }
    })
}

/// Waits until a request goes through the VIP.
fn ready(topo: &Topology, what: &str) -> anyhow::Result<()> {
    let ok = wait_for(Duration::from_secs(15), || {
        let l = drive(&topo.client, 1, 0.05);
        (l.errors == 0 && !l.latencies_us.is_empty()).then_some(())
    });
    anyhow::ensure!(ok.is_some(), "{what} never answered through the VIP");
    Ok(())
}

/// Writes `n` connection and persistence entries, last seen now, for the daemon's fill
/// listener, through its pinned maps. Returns the listener id.
fn fill(daemon: &Daemon, n: usize) -> anyhow::Result<u16> {
    let maps = daemon.bpffs.join("maps");
    let pin = |name: &str| MapData::from_pin(maps.join(name));
    let be_map: Array<MapData, BackendInfo> = Array::try_from(Map::Array(pin(BACKEND_MAP)?))?;
    let (want_addr, want_port) = (
        ip_to_be(backend_ip(0).octets()),
        port_to_be(FILL_BACKEND_PORT),
    );
    let mut found = None;
    for i in 0..be_map.len() {
        let b = be_map.get(&i, 0)?;
        if b.addr == want_addr && b.port == want_port {
            found = Some((i, b.listener));
            break;
        }
    }
    let (bid, lid) = found.ok_or_else(|| anyhow::anyhow!("fill backend not in {BACKEND_MAP}"))?;
    let (ck, cv, sk, sv) = entries(n, lid, bid, PROTO_TCP, clb::time::monotonic_ns());
    use std::os::fd::AsFd as _;
    let conns = pin(CONN_MAP)?;
    clb::datapath::batch::update(conns.fd().as_fd(), &ck, &cv)?;
    let sessions = pin(SESSION_MAP)?;
    clb::datapath::batch::update(sessions.fd().as_fd(), &sk, &sv)?;
    Ok(lid)
}

/// `GET /metrics` from the balancer namespace (`ns_path`): the body.
fn scrape() -> std::io::Result<String> {
    let mut s = TcpStream::connect(METRICS)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: clb\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The `clb_listener_current_connections` and `..._persisted_clients` of listener `fill`.
fn fill_counts(metrics: &str) -> (u64, u64) {
    let get = |family: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with(family) && l.contains("listener=\"fill\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    };
    (
        get("clb_listener_current_connections{"),
        get("clb_listener_persisted_clients{"),
    )
}

/// Scrapes every 100 ms from the balancer namespace until `stop`; returns (scrape durations in
/// µs, failures).
fn scraper(ns_path: String, stop: Arc<AtomicBool>) -> (Vec<u32>, u64) {
    if enter(&ns_path).is_err() {
        return (Vec::new(), 1);
    }
    let (mut ok, mut failed) = (Vec::new(), 0);
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        match scrape() {
            Ok(body) if body.contains("clb_listener_current_connections") => {
                ok.push(t.elapsed().as_micros() as u32)
            }
            _ => failed += 1,
        }
        if let Some(rest) = Duration::from_millis(100).checked_sub(t.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    (ok, failed)
}

/// Results of the scrape comparison.
pub struct Scrapes {
    pub quiet: Load,
    pub scraped: Load,
    pub scrapes: u64,
    pub scrape_failures: u64,
    /// Median and longest scrape, ms.
    pub scrape_ms: (f64, f64),
    /// p99 per round, ms: (without, with).
    pub rounds: Vec<(f64, f64)>,
    /// Live entries the metrics reported for the fill listener (connections, sessions).
    pub live: (u64, u64),
}

fn scrape_phases(topo: &Topology, daemon: &Daemon, scale: &Scale) -> anyhow::Result<Scrapes> {
    fill(daemon, scale.fill_entries)?;
    // Measure once the sweeper has counted them (what /metrics reports).
    let want = scale.fill_entries as u64;
    let counted = wait_for(Duration::from_secs(90), || {
        let body = topo.lb.run(scrape).ok()?;
        let c = fill_counts(&body);
        (c.0 >= want && c.1 >= want).then_some(c)
    });
    let live = counted
        .ok_or_else(|| anyhow::anyhow!("the sweeper never reported the {want} filled entries"))?;
    let (mut quiet, mut scraped) = (Load::default(), Load::default());
    let (mut durations, mut scrape_failures, mut rounds) = (Vec::new(), 0, Vec::new());
    // ABBA order, so that drift over the run weighs on both sides alike.
    for round in 0..scale.l7_rounds {
        let mut pair = [Load::default(), Load::default()];
        for with in if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        } {
            let stop = Arc::new(AtomicBool::new(false));
            let h = with.then(|| {
                let (p, s) = (topo.lb.path(), stop.clone());
                std::thread::spawn(move || scraper(p, s))
            });
            pair[usize::from(with)] = drive(&topo.client, scale.l7_conns, scale.l7_secs);
            stop.store(true, Ordering::Relaxed);
            if let Some(h) = h {
                let (ok, failed) = h.join().unwrap_or((Vec::new(), 1));
                durations.extend(ok);
                scrape_failures += failed;
            }
        }
        let [mut q, mut s] = pair;
        rounds.push((q.quantile_ms(0.99), s.quantile_ms(0.99)));
        quiet.merge(q);
        scraped.merge(s);
    }
    let scrapes = durations.len() as u64;
    durations.sort_unstable();
    let scrape_ms = (
        durations
            .get(durations.len() / 2)
            .map_or(f64::NAN, |d| f64::from(*d) / 1000.0),
        durations
            .last()
            .map_or(f64::NAN, |d| f64::from(*d) / 1000.0),
    );
    Ok(Scrapes {
        quiet,
        scraped,
        scrapes,
        scrape_failures,
        scrape_ms,
        rounds,
        live,
    })
}

/// Everything the section measures.
pub struct Results {
    pub peers: Vec<(&'static str, Load)>,
    pub scrapes: Scrapes,
}

/// Measures every peer, then clb under scrapes.
pub fn measure(scale: &Scale) -> anyhow::Result<Results> {
    let topo = Topology::new("l7b", 3, 0)?;
    let _servers: Vec<HttpServer> = (0..3)
        .map(|i| {
            HttpServer::start(
                &topo.backends[i],
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, BACKEND_PORT),
                &format!("b{i}"),
            )
        })
        .collect::<Result<_, _>>()?;
    let dir = std::env::temp_dir().join(crate::netns::unique_name("l7b"));
    std::fs::create_dir_all(&dir)?;
    let res = (|| {
        let mut peers = Vec::new();
        let mut scrapes = None;
        for peer in [Peer::Clb, Peer::Haproxy, Peer::Nginx] {
            let running = start(&topo, peer, &dir)?;
            ready(&topo, peer.name())?;
            // Warm up (connection pools, caches), then measure.
            drive(&topo.client, scale.l7_conns, scale.l7_secs / 2.0);
            let load = drive(&topo.client, scale.l7_conns, scale.l7_secs * 3.0);
            println!(
                "  {}: {:.0} req/s, {} errors, {} moved",
                peer.name(),
                load.requests_per_s(),
                load.errors,
                load.moved
            );
            peers.push((peer.name(), load));
            if let Running::Clb(d) = &running {
                scrapes = Some(scrape_phases(&topo, d, scale)?);
            }
            drop(running);
        }
        Ok(Results {
            peers,
            scrapes: scrapes.expect("clb ran"),
        })
    })();
    std::fs::remove_dir_all(&dir).ok();
    res
}

/// Runs the section and adds its rows to `report`.
pub fn run(scale: &Scale, report: &mut Report) -> anyhow::Result<()> {
    let r = measure(scale)?;
    rows(r, scale, report);
    Ok(())
}

/// Adds the rows of `r` to `report`.
pub fn rows(mut r: Results, scale: &Scale, report: &mut Report) {
    let section = "HTTP listeners (cookie persistence)";
    let common = format!(
        "{:.0} s per proxy; {} closed-loop clients, keep-alive, reconnect every {REQUESTS_PER_CONN} requests with the cookie, 3 hyper backends; clients, proxy and backends share 2 cores",
        scale.l7_secs * 3.0,
        scale.l7_conns
    );
    let errs: Vec<String> = r
        .peers
        .iter()
        .map(|(n, l)| {
            format!(
                "{n}: {} errors, {} of {} moved",
                l.errors, l.moved, l.with_cookie
            )
        })
        .collect();
    type Get = fn(&mut Load) -> f64;
    for (figure, unit, get) in [
        (
            "HTTP requests/s",
            "/s",
            (|l: &mut Load| l.requests_per_s()) as Get,
        ),
        ("HTTP latency p50", "ms", |l: &mut Load| l.quantile_ms(0.5)),
        ("HTTP latency p99", "ms", |l: &mut Load| l.quantile_ms(0.99)),
    ] {
        let clb = get(&mut r.peers[0].1);
        let peers: Vec<(String, f64)> = r.peers[1..]
            .iter_mut()
            .map(|(n, l)| ((*n).to_owned(), get(l)))
            .collect();
        let haproxy = peers[0].1;
        report.push(Row {
            section: section.into(),
            figure: figure.into(),
            unit: unit.into(),
            clb,
            peers,
            ratio: Some(("haproxy".into(), clb / haproxy)),
            target: None,
            note: format!("{common}; {}", errs.join(", ")),
        });
    }
    let s = &mut r.scrapes;
    // The median over rounds of each round's p99: one noisy phase on a shared VM (another
    // tenant, a sweep) moves a pooled p99 of the whole run, not the median.
    let mut q: Vec<f64> = s.rounds.iter().map(|r| r.0).collect();
    let mut w: Vec<f64> = s.rounds.iter().map(|r| r.1).collect();
    let (quiet, scraped) = (super::median(&mut q), super::median(&mut w));
    let (pooled_q, pooled_w) = (s.quiet.quantile_ms(0.99), s.scraped.quantile_ms(0.99));
    let ratio = scraped / quiet;
    report.push(Row {
        section: section.into(),
        figure: "clb HTTP p99 with /metrics scraped every 100 ms, 1 M entries per table".into(),
        unit: "ms".into(),
        clb: scraped,
        peers: vec![("without scrapes".into(), quiet)],
        ratio: Some(("without scrapes".into(), ratio)),
        target: Some(("≤ 1.1×".into(), ratio <= 1.1)),
        note: format!(
            "median of per-round p99 over {} ABBA rounds of {:.1} s each way (without/with: {}; pooled over the run {:.2}/{:.2} ms); {} scrapes ({} failed; median {:.1} ms, longest {:.1} ms); live entries reported: {} connections, {} persisted clients; {:.0} vs {:.0} req/s; errors {} / {}",
            scale.l7_rounds,
            scale.l7_secs,
            s.rounds
                .iter()
                .map(|(q, w)| format!("{q:.2}/{w:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            pooled_q,
            pooled_w,
            s.scrapes,
            s.scrape_failures,
            s.scrape_ms.0,
            s.scrape_ms.1,
            s.live.0,
            s.live.1,
            s.scraped.requests_per_s(),
            s.quiet.requests_per_s(),
            s.scraped.errors,
            s.quiet.errors,
        ),
    });
}
