//! HTTPS listeners: clb (TLS termination, cookie persistence) against HAProxy (`bind … ssl crt
//! … alpn h2,http/1.1`, `cookie SRV insert indirect nocache`) and nginx (`listen … ssl http2`,
//! round robin), with the same certificate (P-256), the same clients and three nginx backends
//! answering `return 200` (so the backends are not what is measured).
//!
//! Per proxy, one after the other: requests/s on kept-alive connections over HTTP/1.1
//! (`h2load --h1`, 32 connections) and over HTTP/2 (`h2load`, 8 connections × 10 streams),
//! each request carrying the proxy's own persistence cookie; p50/p99 from h2load's per-request
//! log; full TLS handshakes/s and resumed handshakes/s (`openssl s_time -new` / `-reuse`).
//! Clients, proxies and backends share the VM's 2 cores.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    Proc, Scale,
    report::{Report, Row},
    spawn_in,
};
use crate::{
    daemon::Daemon,
    netns::{NetNs, Topology, VIP, backend_ip, unique_name},
    wait_for,
};

const BACKEND_PORT: u16 = 8080;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Clb,
    Haproxy,
    Nginx,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Clb => "clb",
            Peer::Haproxy => "haproxy",
            Peer::Nginx => "nginx",
        }
    }
}

/// One proxy's figures.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub h1_rps: f64,
    pub h1_p50_ms: f64,
    pub h1_p99_ms: f64,
    pub h2_rps: f64,
    pub h2_p50_ms: f64,
    pub h2_p99_ms: f64,
    pub full_hs: f64,
    pub resumed_hs: f64,
    /// Failed requests over both loads.
    pub failed: u64,
}

#[expect(dead_code, reason = "held for their Drop")]
enum Running {
    Clb(Box<Daemon>),
    Process(Proc),
}

/// The certificate every proxy serves: (chain, key, both in one file for HAProxy).
fn certs(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    crate::pki::make_ca(dir)?;
    crate::pki::issue(dir, "shop", "shop.example")?;
    let (cert, key, both) = (
        dir.join("shop.pem"),
        dir.join("shop.key"),
        dir.join("both.pem"),
    );
    std::fs::write(
        &both,
        std::fs::read_to_string(&cert)? + &std::fs::read_to_string(&key)?,
    )?;
    Ok((cert, key, both))
}

fn backends() -> Vec<String> {
    (0..3)
        .map(|i| format!("{}:{BACKEND_PORT}", backend_ip(i)))
        .collect()
}

/// nginx `return 200` in each backend namespace.
fn start_backends(topo: &Topology, dir: &Path) -> anyhow::Result<Vec<Proc>> {
    let mut v = Vec::new();
    for (i, ns) in topo.backends.iter().enumerate() {
        let d = dir.join(format!("be{i}"));
        std::fs::create_dir_all(&d)?;
        let cfg = format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/err.log;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  keepalive_requests 1000000;\n  server {{\n    listen {BACKEND_PORT};\n    location / {{ return 200 \"b{i}\\n\"; }}\n  }}\n}}\n",
            d = d.display()
        );
        let p = d.join("nginx.conf");
        std::fs::write(&p, cfg)?;
        v.push(spawn_in(
            ns,
            &[
                "nginx",
                "-c",
                p.to_str().unwrap(),
                "-p",
                d.to_str().unwrap(),
                "-e",
                d.join("err.log").to_str().unwrap(),
            ],
            &d.join("out.log"),
        )?);
    }
    Ok(v)
}

fn start(
    topo: &Topology,
    peer: Peer,
    dir: &Path,
    cert: &Path,
    key: &Path,
    both: &Path,
) -> anyhow::Result<Running> {
    let log = dir.join(format!("{}.log", peer.name()));
    let vip = format!("{VIP}:443");
    Ok(match peer {
        Peer::Clb => {
            let mut cfg = format!(
                "[[listener]]\nname = \"shop\"\nvip = \"{vip}\"\nproto = \"https\"\npersist = 600\n[[listener.certificate]]\ncert = \"{}\"\nkey = \"{}\"\n",
                cert.display(),
                key.display()
            );
            for b in backends() {
                cfg += &format!("[[listener.backend]]\naddr = \"{b}\"\n");
            }
            Running::Clb(Box::new(Daemon::start(topo, &cfg)))
        }
        Peer::Haproxy => {
            let servers: String = backends()
                .iter()
                .enumerate()
                .map(|(i, a)| format!("  server b{i} {a} cookie b{i}\n"))
                .collect();
            let cfg = format!(
                "global\n  maxconn 8000\n  pidfile {d}/haproxy.pid\n  tune.ssl.default-dh-param 2048\ndefaults\n  mode http\n  option forwardfor\n  option http-keep-alive\n  timeout connect 5s\n  timeout client 75s\n  timeout server 30s\n  timeout http-keep-alive 75s\n  maxconn 8000\nfrontend fe\n  bind {vip} ssl crt {both} alpn h2,http/1.1\n  http-request set-header X-Forwarded-Proto https\n  default_backend be\nbackend be\n  balance roundrobin\n  http-reuse always\n  cookie SRV insert indirect nocache secure httponly\n{servers}",
                d = dir.display(),
                both = both.display()
            );
            let p = dir.join("haproxy.cfg");
            std::fs::write(&p, cfg)?;
            Running::Process(spawn_in(
                &topo.lb,
                &["haproxy", "-db", "-f", p.to_str().unwrap()],
                &log,
            )?)
        }
        Peer::Nginx => {
            let servers: String = backends()
                .iter()
                .map(|a| format!("    server {a};\n"))
                .collect();
            let d = dir.join("nginx");
            std::fs::create_dir_all(&d)?;
            let cfg = format!(
                "daemon off;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err;\nevents {{ worker_connections 8000; }}\nhttp {{\n  access_log off;\n  ssl_session_cache shared:SSL:10m;\n  upstream be {{\n{servers}    keepalive 64;\n  }}\n  server {{\n    listen {vip} ssl http2;\n    ssl_certificate {cert};\n    ssl_certificate_key {key};\n    keepalive_timeout 75s;\n    keepalive_requests 1000000;\n    http2_max_requests 1000000;\n    location / {{\n      proxy_pass http://be;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n      proxy_set_header X-Forwarded-Proto https;\n    }}\n  }}\n}}\n",
                d = d.display(),
                cert = cert.display(),
                key = key.display()
            );
            let p = d.join("nginx.conf");
            std::fs::write(&p, cfg)?;
            Running::Process(spawn_in(
                &topo.lb,
                &[
                    "nginx",
                    "-c",
                    p.to_str().unwrap(),
                    "-p",
                    d.to_str().unwrap(),
                    "-e",
                    d.join("nginx.err").to_str().unwrap(),
                ],
                &log,
            )?)
        }
    })
}

fn curl_cookie(ns: &NetNs, jar: &Path) -> Option<String> {
    ns.exec(&[
        "curl",
        "-sk",
        "--max-time",
        "2",
        "-o",
        "/dev/null",
        "-c",
        jar.to_str().unwrap(),
        &format!("https://{VIP}/"),
    ])
    .ok()?;
    let text = std::fs::read_to_string(jar).ok()?;
    // Netscape cookie jar: domain, flag, path, secure, expiry, name, value.
    text.lines()
        .filter(|l| !l.starts_with('#') || l.starts_with("#HttpOnly_"))
        .find_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() == 7).then(|| format!("{}={}", f[5], f[6]))
        })
}

/// (requests/s, p50 ms, p99 ms, failed) of one h2load run.
fn h2load(
    ns: &NetNs,
    dir: &Path,
    secs: f64,
    h1: bool,
    cookie: Option<&str>,
) -> anyhow::Result<(f64, f64, f64, u64)> {
    let log = dir.join(unique_name("h2load"));
    let d = format!("{}", secs.round().max(1.0) as u64);
    let logarg = format!("--log-file={}", log.display());
    let mut a = vec!["h2load", "-D", &d, "--warm-up-time=1", &logarg];
    let header;
    if let Some(c) = cookie {
        header = format!("cookie: {c}");
        a.extend(["-H", &header]);
    }
    if h1 {
        a.extend(["--h1", "-c", "32", "-m", "1"]);
    } else {
        a.extend(["-c", "8", "-m", "10"]);
    }
    let url = format!("https://{VIP}/");
    a.push(&url);
    let out = ns.exec(&a)?;
    let rps = out
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.trim_end_matches(" req/s").parse::<f64>().ok())
        .ok_or_else(|| anyhow::anyhow!("no req/s in h2load's output:\n{out}"))?;
    let failed = out
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .and_then(|l| l.split(", ").find_map(|p| p.strip_suffix(" failed")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // Per request: start (µs since the epoch), status, duration (µs).
    let mut lat: Vec<f64> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse::<f64>().ok())
        .collect();
    std::fs::remove_file(&log).ok();
    lat.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
            / 1000.0
    };
    Ok((rps, q(0.5), q(0.99), failed))
}

/// Handshakes/s with `openssl s_time` (`-new`: full, `-reuse`: resumed).
fn s_time(ns: &NetNs, secs: f64, reuse: bool) -> anyhow::Result<f64> {
    let t = format!("{}", secs.round().max(1.0) as u64);
    let vip = format!("{VIP}:443");
    let out = ns.exec(&[
        "openssl",
        "s_time",
        "-connect",
        &vip,
        if reuse { "-reuse" } else { "-new" },
        "-time",
        &t,
    ])?;
    out.lines()
        .find(|l| l.contains("connections/user sec"))
        .and_then(|l| l.split(" connections in ").next())
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse::<f64>().ok())
        .map(|n| n / secs.round().max(1.0))
        .ok_or_else(|| anyhow::anyhow!("no connection count in openssl s_time's output:\n{out}"))
}

/// Measures every proxy.
pub fn measure(scale: &Scale) -> anyhow::Result<Vec<(Peer, Figures)>> {
    let dir = std::env::temp_dir().join(unique_name("bench-https"));
    std::fs::create_dir_all(&dir)?;
    let (cert, key, both) = certs(&dir)?;
    let topo = Topology::new("bhttps", 3, 0)?;
    let _backends = start_backends(&topo, &dir)?;
    let secs = scale.l7_secs.max(3.0);
    let mut out = Vec::new();
    for peer in [Peer::Clb, Peer::Haproxy, Peer::Nginx] {
        let running = start(&topo, peer, &dir, &cert, &key, &both)?;
        let jar = dir.join(format!("{}.jar", peer.name()));
        let up = wait_for(Duration::from_secs(15), || {
            std::fs::remove_file(&jar).ok();
            topo.client
                .exec(&[
                    "curl",
                    "-sk",
                    "--max-time",
                    "1",
                    "-o",
                    "/dev/null",
                    &format!("https://{VIP}/"),
                ])
                .ok()
        });
        anyhow::ensure!(up.is_some(), "{} never answered over HTTPS", peer.name());
        let cookie = curl_cookie(&topo.client, &jar);
        anyhow::ensure!(
            peer == Peer::Nginx || cookie.is_some(),
            "{} set no cookie",
            peer.name()
        );
        let (h1_rps, h1_p50_ms, h1_p99_ms, f1) =
            h2load(&topo.client, &dir, secs, true, cookie.as_deref())?;
        let (h2_rps, h2_p50_ms, h2_p99_ms, f2) =
            h2load(&topo.client, &dir, secs, false, cookie.as_deref())?;
        let full_hs = s_time(&topo.client, secs, false)?;
        let resumed_hs = s_time(&topo.client, secs, true)?;
        let f = Figures {
            h1_rps,
            h1_p50_ms,
            h1_p99_ms,
            h2_rps,
            h2_p50_ms,
            h2_p99_ms,
            full_hs,
            resumed_hs,
            failed: f1 + f2,
        };
        println!("  {:<8} {f:?}", peer.name());
        out.push((peer, f));
        drop(running);
    }
    std::fs::remove_dir_all(&dir).ok();
    Ok(out)
}

/// Runs the section and adds its rows to `report`.
pub fn run(scale: &Scale, report: &mut Report) -> anyhow::Result<()> {
    let r = measure(scale)?;
    let section = "HTTPS listeners (TLS termination, cookie persistence)";
    let note = format!(
        "{:.0} s per load per proxy; h1: h2load --h1 32 kept-alive connections; h2: 8 connections × 10 streams; each with the proxy's own cookie (nginx: none, round robin); P-256 certificate, TLS 1.3; handshakes: openssl s_time -new / -reuse (one client); 3 nginx `return 200` backends; clients, proxy and backends share 2 cores; failed requests: {}",
        scale.l7_secs.max(3.0),
        r.iter()
            .map(|(p, f)| format!("{} {}", p.name(), f.failed))
            .collect::<Vec<_>>()
            .join(", ")
    );
    type Get = fn(&Figures) -> f64;
    // (figure, unit, value, higher is better, target vs: best peer or haproxy)
    let figures: [(&str, &str, Get, bool, bool); 8] = [
        ("HTTPS h1 requests/s", "/s", |f| f.h1_rps, true, true),
        ("HTTPS h1 latency p50", "ms", |f| f.h1_p50_ms, false, false),
        ("HTTPS h1 latency p99", "ms", |f| f.h1_p99_ms, false, false),
        ("HTTPS h2 requests/s", "/s", |f| f.h2_rps, true, true),
        ("HTTPS h2 latency p50", "ms", |f| f.h2_p50_ms, false, false),
        ("HTTPS h2 latency p99", "ms", |f| f.h2_p99_ms, false, false),
        ("TLS full handshakes/s", "/s", |f| f.full_hs, true, false),
        (
            "TLS resumed handshakes/s",
            "/s",
            |f| f.resumed_hs,
            true,
            false,
        ),
    ];
    for (figure, unit, get, higher, vs_best) in figures {
        let clb = get(&r[0].1);
        let peers: Vec<(String, f64)> = r[1..]
            .iter()
            .map(|(p, f)| (p.name().to_owned(), get(f)))
            .collect();
        let haproxy = peers[0].1;
        let (against, base) = if vs_best {
            peers
                .iter()
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(n, v)| (format!("best peer ({n})"), *v))
                .unwrap_or(("haproxy".into(), haproxy))
        } else {
            ("haproxy".into(), haproxy)
        };
        let ratio = clb / base;
        let (target, met) = if higher {
            (format!("≥ {against}"), ratio >= 1.0)
        } else {
            (format!("≤ {against}"), ratio <= 1.0)
        };
        report.push(Row {
            section: section.into(),
            figure: figure.into(),
            unit: unit.into(),
            clb,
            peers,
            ratio: Some((against, ratio)),
            target: Some((target, met)),
            note: note.clone(),
        });
    }
    Ok(())
}
