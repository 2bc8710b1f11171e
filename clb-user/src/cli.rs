//! The `clb` command line: `clb daemon` runs the balancer; every other command talks to a
//! running daemon through its API (the API validates; the CLI only parses and forwards) and
//! prints a table, or JSON with `--json` (the API's documented types, see `docs/api.md`).

use std::{
    fmt::Write as _,
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use hyper::Method;

use crate::{
    api::{
        BackendPatch, BackendView, DrainRequest, HealthCheckPatch, ListenerPatch, ListenerView,
        StatsResponse, Status,
    },
    balancer::{ConnView, SessionView},
    client::{Client, ClientError, seg},
    loader::{AttachMode, DEFAULT_BPFFS},
    model::{BackendSpec, CheckKind, HealthCheckSpec, ListenerSpec, Proto},
};

/// Default API socket.
pub const DEFAULT_API: &str = "/run/clb/api.sock";

/// clb — an XDP L4 load balancer with source-IP session persistence, and an L7 HTTP listener
/// with cookie persistence.
#[derive(Parser, Debug)]
#[command(name = "clb", version, about, long_about = None)]
pub struct Cli {
    /// The daemon's API socket.
    #[arg(long, global = true, env = "CLB_API", default_value = DEFAULT_API)]
    pub api: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the balancer: load the XDP program onto the interfaces, apply the config, serve the API.
    Daemon(DaemonArgs),
    /// Detach the datapath and remove every pin (stops the balancing; established flows break).
    Teardown {
        /// The daemon's pin directory.
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Re-read the config file (the running state stays if it is invalid).
    Reload,
    /// Daemon status.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Listeners: a VIP:port, protocol, persistence and timeouts.
    #[command(subcommand)]
    Listener(ListenerCmd),
    /// Backends of a listener.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// Persisted clients.
    #[command(subcommand)]
    Session(TableCmd),
    /// Tracked connections.
    #[command(subcommand)]
    Conn(TableCmd),
    /// Counters per listener and backend, drops by reason.
    Stats {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Config file (TOML); created on the first change if missing.
    #[arg(long, default_value = "/etc/clb/clb.toml")]
    pub config: PathBuf,
    /// Interfaces to attach to (client and backend sides), comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub iface: Vec<String>,
    /// XDP mode: native (driver), generic (skb), auto (native, else generic with a warning).
    #[arg(long, value_enum, default_value = "native")]
    pub xdp_mode: AttachMode,
    /// Pin directory on a bpffs (mounted if needed).
    #[arg(long, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9901).
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Seconds between sweeps of expired entries.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub sweep_interval: u64,
    /// Where the daemon keeps state that must survive restarts (the HTTP cookie key).
    #[arg(long, default_value = "/var/lib/clb")]
    pub state_dir: PathBuf,
}

/// Settings shared by `listener add` and `listener set`.
#[derive(Args, Debug, Default)]
pub struct ListenerOpts {
    /// Session persistence, seconds (0 = off; 1-3600, http 30-3600).
    #[arg(long)]
    pub persist: Option<u32>,
    /// Connection idle timeout, seconds (1-3600; default 900 tcp, 300 udp).
    #[arg(long)]
    pub idle_timeout: Option<u32>,
    /// HTTP keep-alive idle timeout, seconds (0-900, default 75).
    #[arg(long)]
    pub keepalive_timeout: Option<u32>,
    /// HTTP persistence cookie name (default clb_session).
    #[arg(long)]
    pub cookie_name: Option<String>,
    /// Health check: tcp (connect), http (GET), none.
    #[arg(long, value_parser = parse_check_kind)]
    pub hc: Option<CheckKind>,
    /// Health-check interval, seconds (2-300, default 5).
    #[arg(long)]
    pub hc_interval: Option<u32>,
    /// Health-check timeout, seconds (2-60, default 2).
    #[arg(long)]
    pub hc_timeout: Option<u32>,
    /// Consecutive successes to become healthy (2-10, default 3).
    #[arg(long)]
    pub hc_healthy: Option<u32>,
    /// Consecutive failures to become unhealthy (2-10, default 3).
    #[arg(long)]
    pub hc_unhealthy: Option<u32>,
    /// Port to check instead of the backend's.
    #[arg(long)]
    pub hc_port: Option<u16>,
    /// HTTP check path.
    #[arg(long)]
    pub hc_path: Option<String>,
    /// HTTP check accepted status range, e.g. 200-399.
    #[arg(long)]
    pub hc_status: Option<String>,
}

fn parse_check_kind(s: &str) -> Result<CheckKind, String> {
    match s {
        "tcp" => Ok(CheckKind::Tcp),
        "http" => Ok(CheckKind::Http),
        "none" => Ok(CheckKind::None),
        _ => Err(format!("health check must be tcp, http or none, not {s:?}")),
    }
}

impl ListenerOpts {
    fn health_patch(&self) -> Option<HealthCheckPatch> {
        let p = HealthCheckPatch {
            kind: self.hc,
            interval: self.hc_interval,
            timeout: self.hc_timeout,
            healthy_threshold: self.hc_healthy,
            unhealthy_threshold: self.hc_unhealthy,
            port: self.hc_port,
            path: self.hc_path.clone(),
            status: self.hc_status.clone(),
        };
        let any = p.kind.is_some()
            || p.interval.is_some()
            || p.timeout.is_some()
            || p.healthy_threshold.is_some()
            || p.unhealthy_threshold.is_some()
            || p.port.is_some()
            || p.path.is_some()
            || p.status.is_some();
        any.then_some(p)
    }
}

#[derive(Subcommand, Debug)]
pub enum ListenerCmd {
    /// Add a listener.
    Add {
        name: String,
        /// Virtual IP and port.
        #[arg(long)]
        vip: SocketAddrV4,
        #[arg(long, value_parser = |s: &str| s.parse::<Proto>())]
        proto: Proto,
        #[command(flatten)]
        opts: ListenerOpts,
    },
    /// Change a listener's settings (live; established flows stay).
    Set {
        name: String,
        #[command(flatten)]
        opts: ListenerOpts,
    },
    /// Remove a listener (its connections and persisted clients go with it).
    Rm { name: String },
    /// List listeners.
    Ls {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum BackendCmd {
    /// Add a backend to a listener.
    Add {
        listener: String,
        addr: SocketAddrV4,
        /// Weight 0-100 (0 = quiescent), default 10.
        #[arg(long)]
        weight: Option<u32>,
    },
    /// Change a backend's weight (ends a drain).
    Set {
        listener: String,
        addr: SocketAddrV4,
        #[arg(long)]
        weight: u32,
    },
    /// Remove a backend (its connections are cut: drain it first for a graceful exit).
    Rm {
        listener: String,
        addr: SocketAddrV4,
    },
    /// Drain a backend: no new connections or persisted clients; its connections are cut after the timeout.
    Drain {
        listener: String,
        addr: SocketAddrV4,
        /// Seconds until remaining connections are cut (0-3600, default 300).
        #[arg(long)]
        timeout: Option<u32>,
        /// Cut remaining connections at once.
        #[arg(long, conflicts_with = "timeout")]
        now: bool,
    },
    /// List a listener's backends with health and connections.
    Ls {
        listener: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum TableCmd {
    /// List live entries.
    Ls {
        listener: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A plain-text table with aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = w[i]))
            .collect();
        writeln!(out, "{}", s.join("  ").trim_end()).ok();
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn secs(s: u32) -> String {
    if s == 0 {
        "off".into()
    } else {
        format!("{s}s")
    }
}

fn health_summary(h: &HealthCheckSpec) -> String {
    match h.kind {
        CheckKind::None => "none".into(),
        CheckKind::Tcp => format!(
            "tcp/{}s {}↑{}↓",
            h.interval, h.healthy_threshold, h.unhealthy_threshold
        ),
        CheckKind::Http => format!(
            "http {} {}/{}s {}↑{}↓",
            h.path, h.status, h.interval, h.healthy_threshold, h.unhealthy_threshold
        ),
    }
}

/// Runs a client command. Errors carry the daemon's refusal message.
pub async fn run_client(cli: Cli) -> Result<(), ClientError> {
    let c = Client::new(&cli.api);
    match cli.command {
        Command::Daemon(_) | Command::Teardown { .. } => unreachable!("handled by main"),
        Command::Reload => c.send_empty(Method::POST, "/v1/reload").await?,
        Command::Status { json } => {
            let s: Status = c.get("/v1/status").await?;
            if json {
                print_json(&s)?;
            } else {
                println!(
                    "clb {} up {}s, ifaces {} ({}), pins {}, config {}\nsweeper: {} runs, {} connections and {} sessions removed",
                    s.version,
                    s.uptime_secs,
                    s.ifaces.join(","),
                    s.xdp_mode,
                    s.bpffs,
                    s.config,
                    s.sweeper.runs,
                    s.sweeper.conns_removed_total,
                    s.sweeper.sessions_removed_total
                );
            }
        }
        Command::Listener(cmd) => listener(&c, cmd).await?,
        Command::Backend(cmd) => backend(&c, cmd).await?,
        Command::Session(TableCmd::Ls { listener, json }) => {
            let q = listener
                .map(|l| format!("?listener={}", seg(&l)))
                .unwrap_or_default();
            let v: Vec<SessionView> = c.get(&format!("/v1/sessions{q}")).await?;
            if json {
                print_json(&v)?;
            } else {
                let rows: Vec<Vec<String>> = v
                    .iter()
                    .map(|s| {
                        vec![
                            s.listener.clone(),
                            s.client.to_string(),
                            s.backend.to_string(),
                            format!("{}s", s.idle_secs),
                            format!("{}s", s.expires_in_secs),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(
                        &["LISTENER", "CLIENT", "BACKEND", "LAST-SEEN", "EXPIRES-IN"],
                        &rows
                    )
                );
            }
        }
        Command::Conn(TableCmd::Ls { listener, json }) => {
            let q = listener
                .map(|l| format!("?listener={}", seg(&l)))
                .unwrap_or_default();
            let v: Vec<ConnView> = c.get(&format!("/v1/conns{q}")).await?;
            if json {
                print_json(&v)?;
            } else {
                let rows: Vec<Vec<String>> = v
                    .iter()
                    .map(|x| {
                        vec![
                            x.listener.clone(),
                            x.proto.to_string(),
                            x.client.to_string(),
                            x.vip.to_string(),
                            x.backend.to_string(),
                            x.state.to_string(),
                            format!("{}s", x.idle_secs),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(
                        &[
                            "LISTENER", "PROTO", "CLIENT", "VIP", "BACKEND", "STATE", "IDLE"
                        ],
                        &rows
                    )
                );
            }
        }
        Command::Stats { json } => {
            let s: StatsResponse = c.get("/v1/stats").await?;
            if json {
                print_json(&s)?;
            } else {
                print_stats(&s);
            }
        }
    }
    Ok(())
}

async fn listener(c: &Client<'_>, cmd: ListenerCmd) -> Result<(), ClientError> {
    match cmd {
        ListenerCmd::Add {
            name,
            vip,
            proto,
            opts,
        } => {
            let mut spec = ListenerSpec::new(&name, vip, proto);
            spec.persist = opts.persist.unwrap_or(0);
            spec.idle_timeout = opts.idle_timeout;
            spec.keepalive_timeout = opts.keepalive_timeout;
            spec.cookie_name = opts.cookie_name.clone();
            if let Some(p) = opts.health_patch() {
                p.apply(&mut spec.health_check);
            }
            c.send(Method::POST, "/v1/listeners", &spec).await
        }
        ListenerCmd::Set { name, opts } => {
            let patch = ListenerPatch {
                persist: opts.persist,
                idle_timeout: opts.idle_timeout,
                keepalive_timeout: opts.keepalive_timeout,
                cookie_name: opts.cookie_name.clone(),
                health_check: opts.health_patch(),
            };
            c.send(
                Method::PATCH,
                &format!("/v1/listeners/{}", seg(&name)),
                &patch,
            )
            .await
        }
        ListenerCmd::Rm { name } => {
            c.send_empty(Method::DELETE, &format!("/v1/listeners/{}", seg(&name)))
                .await
        }
        ListenerCmd::Ls { json } => {
            let v: Vec<ListenerView> = c.get("/v1/listeners").await?;
            if json {
                print_json(&v)?;
            } else {
                print!("{}", render_listeners(&v));
            }
            Ok(())
        }
    }
}

/// `ipvsadm -Ln`-like listing: a line per listener, an arrow line per backend.
pub fn render_listeners(v: &[ListenerView]) -> String {
    let mut out = String::new();
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|l| {
            vec![
                l.proto.to_string(),
                l.vip.to_string(),
                l.name.clone(),
                "wrr".into(),
                secs(l.persist),
                match l.proto {
                    Proto::Http => {
                        format!("keepalive {}s", l.keepalive_timeout.unwrap_or_default())
                    }
                    _ => format!("{}s", l.idle_timeout),
                },
                health_summary(&l.health_check),
            ]
        })
        .collect();
    let t = table(
        &[
            "PROTO",
            "VIP",
            "NAME",
            "SCHED",
            "PERSIST",
            "IDLE",
            "HEALTH-CHECK",
        ],
        &rows,
    );
    let mut lines = t.lines();
    if let Some(h) = lines.next() {
        writeln!(out, "{h}").ok();
        writeln!(out, "  -> BACKEND                WEIGHT").ok();
    }
    for (line, l) in lines.zip(v) {
        writeln!(
            out,
            "{line}{}",
            if l.all_backends_unhealthy {
                "  [all backends unhealthy: sending to all]"
            } else {
                ""
            }
        )
        .ok();
        for b in &l.backends {
            writeln!(out, "  -> {:<22} {}", b.addr.to_string(), b.weight).ok();
        }
    }
    out
}

async fn backend(c: &Client<'_>, cmd: BackendCmd) -> Result<(), ClientError> {
    match cmd {
        BackendCmd::Add {
            listener,
            addr,
            weight,
        } => {
            let spec = BackendSpec {
                addr,
                weight: weight.unwrap_or(clb_common::DEFAULT_WEIGHT),
            };
            c.send(
                Method::POST,
                &format!("/v1/listeners/{}/backends", seg(&listener)),
                &spec,
            )
            .await
        }
        BackendCmd::Set {
            listener,
            addr,
            weight,
        } => {
            c.send(
                Method::PATCH,
                &format!(
                    "/v1/listeners/{}/backends/{}",
                    seg(&listener),
                    seg(&addr.to_string())
                ),
                &BackendPatch { weight },
            )
            .await
        }
        BackendCmd::Rm { listener, addr } => {
            c.send_empty(
                Method::DELETE,
                &format!(
                    "/v1/listeners/{}/backends/{}",
                    seg(&listener),
                    seg(&addr.to_string())
                ),
            )
            .await
        }
        BackendCmd::Drain {
            listener,
            addr,
            timeout,
            now,
        } => {
            c.send(
                Method::POST,
                &format!(
                    "/v1/listeners/{}/backends/{}/drain",
                    seg(&listener),
                    seg(&addr.to_string())
                ),
                &DrainRequest { timeout, now },
            )
            .await
        }
        BackendCmd::Ls { listener, json } => {
            let v: Vec<BackendView> = c
                .get(&format!("/v1/listeners/{}/backends", seg(&listener)))
                .await?;
            if json {
                print_json(&v)?;
            } else {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or(Duration::ZERO)
                    .as_secs();
                let rows: Vec<Vec<String>> = v
                    .iter()
                    .map(|b| {
                        vec![
                            b.addr.to_string(),
                            b.weight.to_string(),
                            format!("{:?}", b.health).to_lowercase(),
                            format!("{}s ago", now.saturating_sub(b.health_since)),
                            if b.accepting { "yes" } else { "no" }.into(),
                            match (b.draining, b.drain_remaining_secs) {
                                (false, _) => "-".into(),
                                (true, Some(s)) => format!("draining, cut in {s}s"),
                                (true, None) => "drained".into(),
                            },
                            b.conns.to_string(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(
                        &[
                            "BACKEND",
                            "WEIGHT",
                            "HEALTH",
                            "SINCE",
                            "NEW-CONNS",
                            "DRAIN",
                            "CONNS"
                        ],
                        &rows
                    )
                );
            }
            Ok(())
        }
    }
}

fn print_stats(s: &StatsResponse) {
    let mut rows = Vec::new();
    for l in s.stats.listeners.iter().filter(|l| l.proto != Proto::Http) {
        let c = &l.counters;
        rows.push(vec![
            format!("{} ({})", l.name, l.proto),
            c.fwd_packets.to_string(),
            c.fwd_bytes.to_string(),
            c.rev_packets.to_string(),
            c.rev_bytes.to_string(),
            c.new_conns.to_string(),
            l.current_conns.to_string(),
            l.persisted_clients.to_string(),
            c.session_hits.to_string(),
        ]);
        for b in &l.backends {
            let c = &b.counters;
            rows.push(vec![
                format!("  -> {}", b.addr),
                c.fwd_packets.to_string(),
                c.fwd_bytes.to_string(),
                c.rev_packets.to_string(),
                c.rev_bytes.to_string(),
                c.new_conns.to_string(),
                b.current_conns.to_string(),
                b.persisted_clients.to_string(),
                c.session_hits.to_string(),
            ]);
        }
    }
    print!(
        "{}",
        table(
            &[
                "LISTENER/BACKEND",
                "PKTS-IN",
                "BYTES-IN",
                "PKTS-OUT",
                "BYTES-OUT",
                "NEW-CONNS",
                "CONNS",
                "PERSISTED",
                "SESSION-HITS"
            ],
            &rows
        )
    );
    println!("(CONNS and PERSISTED count live entries of the connection and persistence tables)");
    if !s.http.is_empty() {
        let mut rows = Vec::new();
        for l in &s.http {
            rows.push(vec![
                format!("{} (http)", l.name),
                l.connections.to_string(),
                l.requests.to_string(),
                format!(
                    "{}/{}/{}/{}",
                    l.responses_2xx, l.responses_3xx, l.responses_4xx, l.responses_5xx
                ),
                l.cookies_set.to_string(),
                l.cookie_hits.to_string(),
                l.upstream_errors.to_string(),
            ]);
            for b in &l.backends {
                let blank = String::new;
                rows.push(vec![
                    format!("  -> {}", b.addr),
                    blank(),
                    b.requests.to_string(),
                    blank(),
                    blank(),
                    blank(),
                    blank(),
                ]);
            }
        }
        print!(
            "{}",
            table(
                &[
                    "HTTP LISTENER/BACKEND",
                    "CONNS",
                    "REQUESTS",
                    "2xx/3xx/4xx/5xx",
                    "COOKIES-SET",
                    "COOKIE-HITS",
                    "502s"
                ],
                &rows
            )
        );
    }
    let nonzero: Vec<String> = s
        .stats
        .counters
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "datapath: {}",
        if nonzero.is_empty() {
            "-".into()
        } else {
            nonzero.join(" ")
        }
    );
    println!(
        "sweeper: {} runs, {} connections and {} sessions removed",
        s.sweeper.runs, s.sweeper.conns_removed_total, s.sweeper.sessions_removed_total
    );
    for t in &s.health_transitions {
        println!(
            "health: {} {} -> {:?} x{}",
            t.listener, t.backend, t.to, t.count
        );
    }
}

/// `clb teardown`.
pub fn teardown(bpffs: &std::path::Path) -> anyhow::Result<()> {
    let t = crate::loader::teardown(bpffs)
        .with_context(|| format!("tearing down {}", bpffs.display()))?;
    println!(
        "removed {} link(s) [{}] and {} map pin(s) under {}",
        t.links.len(),
        t.links.join(", "),
        t.maps.len(),
        bpffs.display()
    );
    Ok(())
}
