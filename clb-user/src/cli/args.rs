//! The command line's definition (clap). Also the source of the man page and the shell
//! completions (`clb man`, `clb completions SHELL`).

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::{
    certs::CertSpec,
    control::model::{AdminState, CheckKind, Forward, Proto, SameSite, Sched},
    datapath::loader::{AttachMode, DEFAULT_BPFFS},
};

/// Default API socket.
pub const DEFAULT_API: &str = "/run/clb/api.sock";

/// clb — an XDP L4 load balancer with source-IP session persistence, and an L7 HTTP listener
/// with cookie persistence.
#[derive(Parser, Debug)]
#[command(name = "clb", version = crate::version(), about, long_about = None)]
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
    Daemon(Box<DaemonArgs>),
    /// Detach the datapath and remove every pin (stops the balancing; established flows break).
    Teardown {
        /// The daemon's pin directory.
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// Tear down even though a daemon is running on these pins (it then reports the
        /// datapath detached and refuses changes).
        #[arg(long)]
        force: bool,
    },
    /// Check a config file exactly as the daemon reads it (syntax, every listener and field,
    /// the HTTPS listeners' certificate files); exits non-zero naming the problem. Touches no
    /// daemon.
    Check {
        /// The config file.
        #[arg(long, default_value = "/etc/clb/clb.toml")]
        config: PathBuf,
    },
    /// Re-read the config file and apply it, printing what changed field by field (the
    /// running state stays if the file is invalid).
    Reload {
        /// Print what a reload would change and apply nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Apply a listener document: `[[listener]]` tables in the config file's spelling (TOML;
    /// JSON `{"listener": [...]}` if the file ends in .json), each with its backends. Every
    /// listener in it replaces the running one of its name, backends included, or is added;
    /// listeners it does not name are left alone. One transaction: a bad entry changes nothing.
    /// Prints what changed, field by field.
    Apply {
        /// The document (`-` for standard input).
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Print what the document would change and apply nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Print the running configuration, as the config file spells it (TOML).
    Config,
    /// Daemon status: datapath, tables, flood mode, background loops, BGP.
    Status {
        /// Also the last N changes (audit events: applied and refused, with their source;
        /// default 20).
        #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "20")]
        events: Option<u64>,
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
    Session(SessionCmd),
    /// Tracked flows.
    #[command(subcommand)]
    Conn(TableCmd),
    /// Counters per listener and backend, drops by reason.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// VIP announcement over BGP: withdraw this node's VIPs (maintenance) or announce them again.
    #[command(subcommand)]
    Bgp(BgpCmd),
    /// The web console.
    #[command(subcommand)]
    Console(ConsoleCmd),
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Man,
}

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Config file (TOML). It must exist (it may be empty) unless --init-config is given.
    #[arg(long, default_value = "/etc/clb/clb.toml")]
    pub config: PathBuf,
    /// Create the config file, empty, if it does not exist (refused when the pin directory
    /// already holds a configured datapath: a mistyped path must not take it down).
    #[arg(long)]
    pub init_config: bool,
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
    /// Serve the web console on this address (e.g. 127.0.0.1:9902; keep it on loopback or
    /// behind a TLS reverse proxy).
    #[arg(long)]
    pub console: Option<SocketAddr>,
    /// File holding the console's login token (default: created at first start in the state
    /// directory, mode 0600).
    #[arg(long)]
    pub console_token_file: Option<PathBuf>,
    /// Write an access log of every HTTP/HTTPS request to FILE (appended), or `-` for
    /// standard output (the journal, under systemd). Off by default.
    #[arg(long, value_name = "FILE|-")]
    pub access_log: Option<PathBuf>,
    /// The access log's format: one JSON object per line, or a plain line.
    #[arg(long, value_enum, default_value = "json")]
    pub access_log_format: crate::l7::access::Format,
    /// The daemon's own log (standard output): plain lines, or one JSON object per line (for a
    /// log collector). Colour only when standard output is a terminal.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: crate::l7::access::Format,
    /// Console sessions end after this many seconds without a request.
    #[arg(long, default_value_t = 1800, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub console_session_idle: u64,
    /// Seconds between sweeps of expired entries.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub sweep_interval: u64,
    /// Where the daemon keeps state that must survive restarts (HTTP cookie key, console token,
    /// BIRD's configuration and socket).
    #[arg(long, default_value = "/var/lib/clb")]
    pub state_dir: PathBuf,
    /// The BIRD binary (for `[bgp]`).
    #[arg(long, default_value = "bird")]
    pub bird: PathBuf,
}

/// Settings shared by `listener add` and `listener set`.
#[derive(Args, Debug, Default)]
pub struct ListenerOpts {
    /// Session persistence, seconds (0 = off; 1-3600, http 30-3600).
    #[arg(long)]
    pub persist: Option<u32>,
    /// L4: connection idle timeout, seconds (1-3600; default 900 tcp, 300 udp).
    #[arg(long)]
    pub idle_timeout: Option<u32>,
    /// Scheduler: wrr (weighted round robin, default), lc (weighted least connections; HTTP:
    /// least requests in flight) or maglev (L4: consistent hash).
    #[arg(long, value_parser = parse_sched)]
    pub sched: Option<Sched>,
    /// Slow start, seconds (0-600, 0 = off): a backend that joins or comes back healthy has
    /// its weight ramped from a tenth to full over this time.
    #[arg(long)]
    pub slow_start: Option<u32>,
    /// L4: forwarding: nat (default) or dsr (direct server return; backend port = VIP port).
    #[arg(long, value_parser = parse_forward)]
    pub forward: Option<Forward>,
    /// L4: clients in one prefix of this length share one persistence entry (1-32 IPv4, 1-128 IPv6; default: the whole address).
    #[arg(long)]
    pub persist_mask: Option<u8>,
    /// L4 maglev: lookup-table size, a prime (default 65537).
    #[arg(long)]
    pub maglev_size: Option<u32>,
    /// HTTP: keep-alive idle timeout, seconds (0-900, default 75).
    #[arg(long)]
    pub keepalive_timeout: Option<u32>,
    /// HTTP: persistence cookie name (default clb_session).
    #[arg(long)]
    pub cookie_name: Option<String>,
    /// HTTP: client connections at once (default 10000); more get 503.
    #[arg(long)]
    pub max_conns: Option<u32>,
    /// HTTP: seconds a response may take to be written to a client, or a backend to answer (2-3600, default 60).
    #[arg(long)]
    pub io_timeout: Option<u32>,
    /// HTTP: request header fields at most (1-1000, default 100); more get 431.
    #[arg(long)]
    pub max_headers: Option<u32>,
    /// HTTP: SameSite of the persistence cookie: lax (default), strict, none (https only).
    #[arg(long, value_parser = |s: &str| s.parse::<SameSite>())]
    pub cookie_samesite: Option<SameSite>,
    /// HTTP: answer every request with a 308 redirect to https:// on PORT (default 443).
    #[arg(long, value_name = "PORT", num_args = 0..=1, default_missing_value = "443")]
    pub redirect_https: Option<u16>,
    /// HTTPS: certificate chain, PEM, leaf first (with --key; repeat the pair for more
    /// certificates, chosen by the client's SNI; the first serves clients without SNI). On
    /// `listener set`, replaces the listener's certificates.
    #[arg(long = "cert", value_name = "FILE")]
    pub cert: Vec<PathBuf>,
    /// HTTPS: the private key of the --cert of the same position, PEM.
    #[arg(long = "key", value_name = "FILE")]
    pub key: Vec<PathBuf>,
    /// HTTPS `listener set`: add a certificate (with --add-key), keeping the others.
    #[arg(long, value_name = "FILE")]
    pub add_cert: Vec<PathBuf>,
    /// HTTPS `listener set`: the private key of the --add-cert of the same position.
    #[arg(long, value_name = "FILE")]
    pub add_key: Vec<PathBuf>,
    /// HTTPS `listener set`: remove the certificate of this name (its first host name, as
    /// `listener ls` shows it) or of this certificate file.
    #[arg(long, value_name = "NAME")]
    pub rm_cert: Vec<String>,
    /// Health check: tcp (connect), http (GET), none (default for udp).
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

fn parse_sched(s: &str) -> Result<Sched, String> {
    match s {
        "wrr" => Ok(Sched::Wrr),
        "maglev" => Ok(Sched::Maglev),
        "lc" => Ok(Sched::Lc),
        _ => Err(format!("scheduler must be wrr, maglev or lc, not {s:?}")),
    }
}

fn parse_forward(s: &str) -> Result<Forward, String> {
    match s {
        "nat" => Ok(Forward::Nat),
        "dsr" => Ok(Forward::Dsr),
        _ => Err(format!("forwarding must be nat or dsr, not {s:?}")),
    }
}

impl ListenerOpts {
    /// Whether the certificate list is edited relative to the current one.
    pub fn edits_certs(&self) -> bool {
        !self.add_cert.is_empty() || !self.add_key.is_empty() || !self.rm_cert.is_empty()
    }

    /// The listener's certificate list after these options, given its `current` one (with
    /// the name each goes by); `None` when the options do not touch it. Relative paths are
    /// made absolute here: the daemon does not run in the caller's directory.
    pub fn cert_list(
        &self,
        current: Vec<(Option<String>, CertSpec)>,
    ) -> Result<Option<Vec<CertSpec>>, String> {
        let pairs = |certs: &[PathBuf], keys: &[PathBuf], c: &str, k: &str| {
            if certs.len() != keys.len() {
                return Err(format!(
                    "give one {k} FILE per {c} FILE ({} {c}, {} {k})",
                    certs.len(),
                    keys.len()
                ));
            }
            certs
                .iter()
                .zip(keys)
                .map(|(c, k)| {
                    let abs = |p: &PathBuf| {
                        std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()))
                    };
                    Ok(CertSpec {
                        cert: abs(c)?,
                        key: abs(k)?,
                    })
                })
                .collect::<Result<Vec<_>, String>>()
        };
        let set = pairs(&self.cert, &self.key, "--cert", "--key")?;
        let add = pairs(&self.add_cert, &self.add_key, "--add-cert", "--add-key")?;
        if set.is_empty() && !self.edits_certs() {
            return Ok(None);
        }
        let mut list: Vec<(Option<String>, CertSpec)> = if set.is_empty() {
            current
        } else {
            set.into_iter().map(|c| (None, c)).collect()
        };
        for r in &self.rm_cert {
            let before = list.len();
            list.retain(|(name, c)| {
                name.as_deref() != Some(r.as_str()) && c.cert.to_string_lossy() != r.as_str()
            });
            if list.len() == before {
                return Err(format!("the listener has no certificate named {r:?}"));
            }
        }
        list.extend(add.into_iter().map(|c| (None, c)));
        Ok(Some(list.into_iter().map(|(_, c)| c).collect()))
    }

    /// The options given, as a listener's wire fields (a JSON merge patch for `listener set`,
    /// the fields of a new listener for `listener add`).
    pub fn fields(&self) -> serde_json::Map<String, serde_json::Value> {
        use serde_json::{Value, json};
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.into(), v);
            }
        };
        put("persist", self.persist.map(|v| json!(v)));
        put("idle_timeout", self.idle_timeout.map(|v| json!(v)));
        put("slow_start", self.slow_start.map(|v| json!(v)));
        put("sched", self.sched.map(|v| json!(v)));
        put("forward", self.forward.map(|v| json!(v)));
        put("persist_mask", self.persist_mask.map(|v| json!(v)));
        put("maglev_size", self.maglev_size.map(|v| json!(v)));
        put(
            "keepalive_timeout",
            self.keepalive_timeout.map(|v| json!(v)),
        );
        put("cookie_name", self.cookie_name.as_ref().map(|v| json!(v)));
        put("max_conns", self.max_conns.map(|v| json!(v)));
        put("io_timeout", self.io_timeout.map(|v| json!(v)));
        put("max_headers", self.max_headers.map(|v| json!(v)));
        put("cookie_samesite", self.cookie_samesite.map(|v| json!(v)));
        put("redirect_https", self.redirect_https.map(|v| json!(v)));
        let mut hc = serde_json::Map::new();
        let mut hput = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                hc.insert(k.into(), v);
            }
        };
        hput("kind", self.hc.map(|v| json!(v)));
        hput("interval", self.hc_interval.map(|v| json!(v)));
        hput("timeout", self.hc_timeout.map(|v| json!(v)));
        hput("healthy_threshold", self.hc_healthy.map(|v| json!(v)));
        hput("unhealthy_threshold", self.hc_unhealthy.map(|v| json!(v)));
        hput("port", self.hc_port.map(|v| json!(v)));
        hput("path", self.hc_path.as_ref().map(|v| json!(v)));
        hput("status", self.hc_status.as_ref().map(|v| json!(v)));
        if !hc.is_empty() {
            m.insert("health_check".into(), Value::Object(hc));
        }
        m
    }
}

#[derive(Subcommand, Debug)]
pub enum ListenerCmd {
    /// Add a listener.
    Add {
        name: String,
        /// Virtual IP and port: 10.0.0.100:80, or [2001:db8::100]:80 for IPv6.
        #[arg(long)]
        vip: SocketAddr,
        #[arg(long, value_parser = |s: &str| s.parse::<Proto>())]
        proto: Proto,
        #[command(flatten)]
        opts: Box<ListenerOpts>,
    },
    /// Change a listener's settings (live; established flows stay).
    Set {
        name: String,
        #[command(flatten)]
        opts: Box<ListenerOpts>,
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
    /// Add backends to a listener, as one transaction: all of them or, on a bad one, none.
    Add {
        listener: String,
        #[arg(required = true, num_args = 1..)]
        addrs: Vec<SocketAddr>,
        /// Weight 0-100 (0 = quiescent), default 10, for each of them.
        #[arg(long)]
        weight: Option<u32>,
    },
    /// Change a backend's weight (ends a drain) or state: `maint` takes it out of service
    /// (no new connections or persisted clients, established ones cut, no health checks,
    /// kept across restarts) until `ready`.
    #[command(group(clap::ArgGroup::new("change").required(true).multiple(true).args(["weight", "state"])))]
    Set {
        listener: String,
        addr: SocketAddr,
        #[arg(long)]
        weight: Option<u32>,
        #[arg(long, value_parser = |s: &str| s.parse::<AdminState>())]
        state: Option<AdminState>,
    },
    /// Remove a backend (its connections are cut: drain it first for a graceful exit).
    Rm { listener: String, addr: SocketAddr },
    /// Drain a backend: no new connections or persisted clients; its connections are cut after the timeout.
    Drain {
        listener: String,
        addr: SocketAddr,
        /// Seconds until remaining connections are cut (0-3600, default 300).
        #[arg(long)]
        timeout: Option<u32>,
        /// Cut remaining connections at once.
        #[arg(long, conflicts_with = "timeout")]
        now: bool,
    },
    /// List a listener's backends with health and live entries.
    Ls {
        listener: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum SessionCmd {
    #[command(flatten)]
    Table(TableCmd),
    /// Forget the persisted clients of LISTENER in CLIENT (an address, or a prefix such as
    /// 10.2.0.0/16): their next connection is scheduled again; their established
    /// connections stay on their backend.
    Rm {
        listener: String,
        client: String,
        #[arg(long)]
        json: bool,
    },
    /// Forget every persisted client of LISTENER.
    Flush {
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
        /// Only this client address, or prefix (10.2.0.0/16, 2001:db8::/64).
        #[arg(long)]
        client: Option<String>,
        /// Only entries on this backend (IP:PORT).
        #[arg(long)]
        backend: Option<SocketAddr>,
        /// At most this many entries.
        #[arg(long)]
        limit: Option<u64>,
        /// Skip this many entries.
        #[arg(long)]
        offset: Option<u64>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConsoleCmd {
    /// Print a one-time sign-in link for the console (good for one sign-in within 120 s;
    /// it works even while failed token sign-ins from the browser's address are held off).
    Link {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum BgpCmd {
    /// Stop announcing this node's VIPs (maintenance): routers send new flows to the other
    /// nodes; established flows keep working.
    Withdraw,
    /// Announce the VIPs again (those with an accepting backend).
    Announce,
    /// Sessions and announcements.
    Status {
        #[arg(long)]
        json: bool,
    },
}
