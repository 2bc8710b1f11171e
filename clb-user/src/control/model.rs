//! What a user configures: listeners (an L4 or an HTTP kind), their backends, persistence,
//! timeouts, health checks, the datapath's table sizes. These are the types the control plane
//! works with; on the wire (API JSON) and in the config file a listener is one flat table with
//! a `proto` field ([`WireListener`]), strictly parsed: a field that does not apply to the
//! listener's kind is refused by name. Validation ([`ListenerSpec::validate`], [`validate_all`])
//! is the one place where ranges and capacities are enforced, with messages that name the field
//! and the allowed range.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use clb_common::{
    DEFAULT_CONNS, DEFAULT_HALF_OPEN, DEFAULT_RST_PER_SEC, DEFAULT_SESSIONS,
    DEFAULT_TCP_IDLE_TIMEOUT_SECS, DEFAULT_UDP_IDLE_TIMEOUT_SECS, DEFAULT_WEIGHT, MAX_BACKENDS,
    MAX_BACKENDS_PER_LISTENER, MAX_IDLE_TIMEOUT_SECS, MAX_LISTENERS,
    MAX_LISTENERS_PER_BACKEND_ADDR, MAX_MAGLEV_SIZE, MAX_PERSIST_SECS, MAX_TABLE, MAX_WEIGHT,
    MIN_IDLE_TIMEOUT_SECS, MIN_TABLE, PROTO_TCP, PROTO_UDP,
};
use serde::{Deserialize, Serialize};

use crate::certs::CertSpec;

/// The protocol field of a listener: L4 TCP or UDP (balanced in XDP), HTTP or HTTPS (proxied).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    Http,
    Https,
}

impl Proto {
    /// The IP protocol the listener receives.
    pub fn ip_proto(self) -> u8 {
        match self {
            Proto::Tcp | Proto::Http | Proto::Https => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }

    /// Whether the daemon proxies it (HTTP or HTTPS) rather than the datapath balancing it.
    pub fn is_http(self) -> bool {
        matches!(self, Proto::Http | Proto::Https)
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Http => "http",
            Proto::Https => "https",
        })
    }
}

impl std::str::FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            "http" => Ok(Proto::Http),
            "https" => Ok(Proto::Https),
            _ => Err(format!("proto must be tcp, udp, http or https, not {s:?}")),
        }
    }
}

/// The `SameSite` attribute of the persistence cookie.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SameSite {
    /// Sent on same-site requests and top-level navigations (the browsers' default).
    #[default]
    Lax,
    Strict,
    /// Sent on cross-site requests too (needs `Secure`: HTTPS listeners only).
    None,
}

impl SameSite {
    /// The attribute's value.
    pub fn as_str(self) -> &'static str {
        match self {
            SameSite::Lax => "Lax",
            SameSite::Strict => "Strict",
            SameSite::None => "None",
        }
    }
}

impl std::fmt::Display for SameSite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.as_str().to_ascii_lowercase())
    }
}

impl std::str::FromStr for SameSite {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "lax" => Ok(SameSite::Lax),
            "strict" => Ok(SameSite::Strict),
            "none" => Ok(SameSite::None),
            _ => Err(format!(
                "cookie_samesite must be lax, strict or none, not {s:?}"
            )),
        }
    }
}

/// Longest slow start a listener may have, seconds.
pub const MAX_SLOW_START_SECS: u32 = 600;

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// How a listener picks a backend for a new client (one without a live persistence entry or
/// cookie).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sched {
    /// Weighted round robin (the cloud service's "polling").
    #[default]
    Wrr,
    /// Maglev consistent hashing: a pure function of the client (or flow) and the backend set,
    /// so every balancer node picks the same backend (L4 listeners).
    Maglev,
    /// Weighted least connections (IPVS `wlc`): the accepting backend with the fewest active
    /// connections per unit of weight (HTTP listeners: requests in flight).
    Lc,
}

impl std::fmt::Display for Sched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Sched::Wrr => "wrr",
            Sched::Maglev => "maglev",
            Sched::Lc => "lc",
        })
    }
}

/// How an L4 listener forwards to its backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forward {
    /// Destination NAT; replies come back through clb.
    #[default]
    Nat,
    /// Direct server return: only the destination MAC is rewritten; backends hold the VIP and
    /// answer clients directly.
    Dsr,
}

impl std::fmt::Display for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Forward::Nat => "nat",
            Forward::Dsr => "dsr",
        })
    }
}

/// An L4 listener's own settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct L4Spec {
    /// TCP or UDP.
    pub udp: bool,
    /// Connection idle timeout, seconds, 1–3600. Default 900 (tcp), 300 (udp).
    pub idle_timeout: Option<u32>,
    pub sched: Sched,
    pub forward: Forward,
    /// Clients in one IPv4 prefix of this length share one persistence entry (IPVS `-M`);
    /// 1–32, default 32.
    pub persist_mask: Option<u8>,
    /// Maglev lookup-table size, a prime; default 65537.
    pub maglev_size: Option<u32>,
}

/// An HTTP or HTTPS listener's own settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpSpec {
    /// Weighted round robin or least outstanding requests (`Sched::Lc`); never Maglev.
    pub sched: Sched,
    /// HTTPS: TLS is terminated here, with these certificates (chosen by the client's SNI; the
    /// first when it sends none). Empty for HTTP.
    pub certs: Vec<CertSpec>,
    /// Whether the listener speaks TLS (`proto = "https"`).
    pub tls: bool,
    /// `SameSite` of the persistence cookie. Default Lax.
    pub cookie_samesite: Option<SameSite>,
    /// HTTP listeners: answer every request with a redirect to `https://` on this port
    /// (443: no port in the URL) instead of proxying it.
    pub redirect_https: Option<u16>,
    /// Request header fields at most (431 beyond). Default 100.
    pub max_headers: Option<u32>,
    /// Keep-alive idle timeout, seconds, 0–900 (0 = close after each response). Default 75.
    pub keepalive_timeout: Option<u32>,
    /// Persistence cookie name. Default `clb_session`.
    pub cookie_name: Option<String>,
    /// Client connections at once; more are answered 503 and closed. Default 10 000.
    pub max_conns: Option<u32>,
    /// Seconds a response may take to be written to a slow client, or a backend to answer a
    /// request, before the connection is closed (2–3600). Default 60.
    pub io_timeout: Option<u32>,
}

/// A listener's kind and the settings only that kind has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// TCP or UDP, balanced in XDP.
    L4(L4Spec),
    /// HTTP/1.1, proxied in user space with cookie persistence.
    Http(HttpSpec),
}

/// Health-check kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connect to the backend (or check port) succeeds.
    #[default]
    Tcp,
    /// An HTTP GET of `path` answers with a status in `status`.
    Http,
    /// No health checks: every backend counts as healthy.
    None,
}

/// Health-check settings of a listener (the cloud LB's ranges and defaults). UDP listeners
/// default to no checks (a UDP service need not accept TCP connections); TCP and HTTP ones to
/// TCP connect checks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSpec {
    pub kind: CheckKind,
    /// Seconds between checks of one backend, 2–300.
    #[serde(default = "d_interval")]
    pub interval: u32,
    /// Seconds a check may take, 2–60.
    #[serde(default = "d_timeout")]
    pub timeout: u32,
    /// Consecutive successes that make an unhealthy backend healthy, 2–10.
    #[serde(default = "d_threshold")]
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy backend unhealthy, 2–10.
    #[serde(default = "d_threshold")]
    pub unhealthy_threshold: u32,
    /// Port to check instead of the backend's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// HTTP check: request path.
    #[serde(default = "d_path")]
    pub path: String,
    /// HTTP check: accepted status range, "200-399".
    #[serde(default = "d_status")]
    pub status: String,
}

fn d_interval() -> u32 {
    5
}
fn d_timeout() -> u32 {
    2
}
fn d_threshold() -> u32 {
    3
}
fn d_path() -> String {
    "/".into()
}
fn d_status() -> String {
    "200-399".into()
}

impl HealthCheckSpec {
    /// The defaults, with checks of `kind`.
    pub fn of(kind: CheckKind) -> Self {
        Self {
            kind,
            interval: d_interval(),
            timeout: d_timeout(),
            healthy_threshold: d_threshold(),
            unhealthy_threshold: d_threshold(),
            port: None,
            path: d_path(),
            status: d_status(),
        }
    }

    /// The accepted HTTP status range.
    pub fn status_range(&self) -> Result<(u16, u16), ConfigError> {
        let bad = || ConfigError::Range {
            field: "health_check.status",
            value: self.status.clone(),
            allowed: "a status or range within 100-599, e.g. \"200-399\"",
        };
        let (lo, hi) = match self.status.split_once('-') {
            Some((a, b)) => (
                a.trim().parse().map_err(|_| bad())?,
                b.trim().parse().map_err(|_| bad())?,
            ),
            None => {
                let v: u16 = self.status.trim().parse().map_err(|_| bad())?;
                (v, v)
            }
        };
        if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
            return Err(bad());
        }
        Ok((lo, hi))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        range(
            "health_check.interval",
            self.interval,
            2,
            300,
            "2-300 seconds",
        )?;
        range("health_check.timeout", self.timeout, 2, 60, "2-60 seconds")?;
        range(
            "health_check.healthy_threshold",
            self.healthy_threshold,
            2,
            10,
            "2-10",
        )?;
        range(
            "health_check.unhealthy_threshold",
            self.unhealthy_threshold,
            2,
            10,
            "2-10",
        )?;
        if self.port == Some(0) {
            return Err(ConfigError::Range {
                field: "health_check.port",
                value: "0".into(),
                allowed: "1-65535",
            });
        }
        if self.kind == CheckKind::Http {
            // The checker requests exactly this path: it must be one an HTTP request can carry
            // (what the URI parser takes), and short enough to show.
            let valid = self.path.len() <= MAX_HC_PATH
                && self.path.starts_with('/')
                && !self.path.chars().any(|c| c.is_control() || c == ' ')
                && format!("http://127.0.0.1{}", self.path)
                    .parse::<hyper::Uri>()
                    .is_ok();
            if !valid {
                let mut shown: String = self.path.chars().take(64).collect();
                if shown.len() < self.path.len() {
                    shown.push_str("...");
                }
                return Err(ConfigError::Range {
                    field: "health_check.path",
                    value: format!("{shown:?} ({} bytes)", self.path.len()),
                    allowed: "an absolute URI path (and query) starting with '/', at most 1024 bytes, of characters a request target may hold (no spaces, '<', '>' or controls)",
                });
            }
            self.status_range()?;
        }
        Ok(())
    }
}

/// One backend of a listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    /// Backend address (IPv4 or IPv6, the VIP's family for L4 listeners) and port.
    pub addr: SocketAddr,
    /// Weight 0–100; 0 = quiescent (no new connections or persisted clients).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// `maint`: out of service until put back — no new connections or persisted clients,
    /// established connections cut, no health checks. Kept in the file, so it holds across
    /// restarts and reloads (a drain is the daemon's, graceful and timed).
    #[serde(default, skip_serializing_if = "AdminState::is_ready")]
    pub state: AdminState,
}

/// A backend's administrative state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// In service.
    #[default]
    Ready,
    /// In maintenance.
    Maint,
}

impl AdminState {
    /// Whether in service.
    pub fn is_ready(&self) -> bool {
        *self == AdminState::Ready
    }
}

impl std::str::FromStr for AdminState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ready" => Ok(AdminState::Ready),
            "maint" => Ok(AdminState::Maint),
            _ => Err(format!("unknown state {s:?}: ready or maint")),
        }
    }
}

impl std::fmt::Display for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AdminState::Ready => "ready",
            AdminState::Maint => "maint",
        })
    }
}

fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

impl BackendSpec {
    /// A backend at `addr` with weight `weight`, in service.
    pub fn new(addr: impl Into<SocketAddr>, weight: u32) -> Self {
        Self {
            addr: addr.into(),
            weight,
            state: AdminState::Ready,
        }
    }
}

/// Default HTTP keep-alive idle timeout, seconds.
pub const DEFAULT_KEEPALIVE_SECS: u32 = 75;
/// Default persistence cookie name.
pub const DEFAULT_COOKIE_NAME: &str = "clb_session";
/// Default cap on an HTTP listener's client connections.
pub const DEFAULT_HTTP_MAX_CONNS: u32 = 10_000;
/// Default HTTP write / backend-answer timeout, seconds.
pub const DEFAULT_HTTP_IO_TIMEOUT: u32 = 60;
/// Default (and largest) number of request header fields.
pub const DEFAULT_HTTP_MAX_HEADERS: u32 = 100;
/// Largest configurable number of request header fields.
pub const MAX_HTTP_MAX_HEADERS: u32 = 1000;
/// Longest HTTP health-check path.
pub const MAX_HC_PATH: usize = 1024;
/// Certificates an HTTPS listener holds at most.
pub const MAX_CERTS: usize = 64;

/// A listener: a VIP:port of some kind, its settings and backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "WireListener", into = "WireListener")]
pub struct ListenerSpec {
    /// Unique name: letters, digits, `-`, `_`, `.`; 1–64 characters.
    pub name: String,
    /// Virtual IP and port.
    pub vip: SocketAddr,
    /// Session persistence, seconds: 0 = off; 1–3600 for tcp/udp, 30–3600 for http.
    pub persist: u32,
    /// Slow start, seconds, 0–600 (0 = off): a backend that joins or comes back healthy has
    /// its weight ramped from a tenth to full over this time, so least connections (or round
    /// robin) does not send it every new client at once.
    pub slow_start: u32,
    pub kind: Kind,
    pub health_check: HealthCheckSpec,
    pub backends: Vec<BackendSpec>,
}

impl ListenerSpec {
    /// A listener with defaults for everything but name, VIP and protocol.
    pub fn new(name: &str, vip: impl Into<SocketAddr>, proto: Proto) -> Self {
        let kind = match proto {
            Proto::Tcp => Kind::L4(L4Spec::default()),
            Proto::Udp => Kind::L4(L4Spec {
                udp: true,
                ..L4Spec::default()
            }),
            Proto::Http => Kind::Http(HttpSpec::default()),
            Proto::Https => Kind::Http(HttpSpec {
                tls: true,
                ..HttpSpec::default()
            }),
        };
        Self {
            name: name.into(),
            vip: vip.into(),
            persist: 0,
            slow_start: 0,
            health_check: HealthCheckSpec::of(default_check(proto)),
            kind,
            backends: Vec::new(),
        }
    }

    /// The protocol field.
    pub fn proto(&self) -> Proto {
        match &self.kind {
            Kind::L4(l) if l.udp => Proto::Udp,
            Kind::L4(_) => Proto::Tcp,
            Kind::Http(h) if h.tls => Proto::Https,
            Kind::Http(_) => Proto::Http,
        }
    }

    /// The L4 settings, for listeners the datapath serves.
    pub fn l4(&self) -> Option<&L4Spec> {
        match &self.kind {
            Kind::L4(l) => Some(l),
            Kind::Http(_) => None,
        }
    }

    /// The HTTP settings, for HTTP listeners.
    pub fn http(&self) -> Option<&HttpSpec> {
        match &self.kind {
            Kind::Http(h) => Some(h),
            Kind::L4(_) => None,
        }
    }

    /// The connection idle timeout in effect, seconds.
    pub fn idle_timeout_secs(&self) -> u32 {
        match &self.kind {
            Kind::L4(l) => l.idle_timeout.unwrap_or(if l.udp {
                DEFAULT_UDP_IDLE_TIMEOUT_SECS
            } else {
                DEFAULT_TCP_IDLE_TIMEOUT_SECS
            }),
            Kind::Http(_) => DEFAULT_TCP_IDLE_TIMEOUT_SECS,
        }
    }

    /// The scheduler in effect.
    pub fn sched(&self) -> Sched {
        match &self.kind {
            Kind::L4(l) => l.sched,
            Kind::Http(h) => h.sched,
        }
    }

    /// Checks this listener on its own (ranges, names, duplicates among its backends).
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_name(&self.name)?;
        if self.vip.port() == 0 {
            return Err(ConfigError::Range {
                field: "vip",
                value: self.vip.to_string(),
                allowed: "a port 1-65535",
            });
        }
        check_unicast("vip", self.vip.ip())?;
        range(
            "slow_start",
            self.slow_start,
            0,
            MAX_SLOW_START_SECS,
            "0-600 seconds (0 = off)",
        )?;
        match &self.kind {
            Kind::L4(l) => {
                range(
                    "persist",
                    self.persist,
                    0,
                    MAX_PERSIST_SECS,
                    "0-3600 seconds (0 = off)",
                )?;
                if let Some(t) = l.idle_timeout {
                    range(
                        "idle_timeout",
                        t,
                        MIN_IDLE_TIMEOUT_SECS,
                        MAX_IDLE_TIMEOUT_SECS,
                        "1-3600 seconds",
                    )?;
                }
                if let Some(m) = l.persist_mask {
                    if self.vip.is_ipv4() {
                        range(
                            "persist_mask",
                            u32::from(m),
                            1,
                            32,
                            "1-32 (IPv4 prefix length)",
                        )?;
                    } else {
                        range(
                            "persist_mask",
                            u32::from(m),
                            1,
                            128,
                            "1-128 (IPv6 prefix length)",
                        )?;
                    }
                }
                if let Some(b) = self
                    .backends
                    .iter()
                    .find(|b| b.addr.is_ipv4() != self.vip.is_ipv4())
                {
                    return Err(ConfigError::Invalid(format!(
                        "backend {} of listener {:?} is not of the VIP's address family ({}): an L4 listener NATs between addresses of one family",
                        b.addr,
                        self.name,
                        if self.vip.is_ipv4() { "IPv4" } else { "IPv6" }
                    )));
                }
                if let Some(m) = l.maglev_size {
                    if l.sched != Sched::Maglev {
                        return Err(ConfigError::Invalid(
                            "maglev_size applies only to listeners with sched = \"maglev\"".into(),
                        ));
                    }
                    if !(7..=MAX_MAGLEV_SIZE).contains(&m) || !is_prime(m) {
                        return Err(ConfigError::Range {
                            field: "maglev_size",
                            value: m.to_string(),
                            allowed: "a prime from 7 to 1000003 (default 65537)",
                        });
                    }
                }
                if l.forward == Forward::Dsr
                    && let Some(b) = self
                        .backends
                        .iter()
                        .find(|b| b.addr.port() != self.vip.port())
                {
                    return Err(ConfigError::Invalid(format!(
                        "backend {} of DSR listener {:?}: with forward = \"dsr\" the backend port must equal the VIP port {} (the packet keeps its destination; only the MAC changes)",
                        b.addr,
                        self.name,
                        self.vip.port()
                    )));
                }
            }
            Kind::Http(h) => {
                if self.persist != 0 {
                    range(
                        "persist",
                        self.persist,
                        30,
                        MAX_PERSIST_SECS,
                        "0 (off) or 30-3600 seconds for http",
                    )?;
                }
                if let Some(k) = h.keepalive_timeout {
                    range("keepalive_timeout", k, 0, 900, "0-900 seconds (0 = close)")?;
                }
                if let Some(c) = h.max_conns {
                    range("max_conns", c, 1, 1_000_000, "1-1000000")?;
                }
                if let Some(t) = h.io_timeout {
                    range("io_timeout", t, 2, 3600, "2-3600 seconds")?;
                }
                if let Some(n) = h.max_headers {
                    range("max_headers", n, 1, MAX_HTTP_MAX_HEADERS, "1-1000")?;
                }
                if h.tls {
                    if h.certs.is_empty() {
                        return Err(ConfigError::Invalid(format!(
                            "https listener {:?} needs a certificate: [[listener.certificate]] cert = FILE, key = FILE (CLI: --cert FILE --key FILE)",
                            self.name
                        )));
                    }
                    if h.certs.len() > MAX_CERTS {
                        return Err(ConfigError::Capacity {
                            what: "certificates per listener",
                            max: MAX_CERTS,
                        });
                    }
                    let mut seen = HashSet::new();
                    for c in &h.certs {
                        if !seen.insert(&c.cert) {
                            return Err(ConfigError::Invalid(format!(
                                "listener {:?} names certificate {} twice",
                                self.name,
                                c.cert.display()
                            )));
                        }
                    }
                    if h.redirect_https.is_some() {
                        return Err(ConfigError::NotFor {
                            field: "redirect_https",
                            proto: Proto::Https,
                        });
                    }
                } else {
                    if h.cookie_samesite == Some(SameSite::None) {
                        return Err(ConfigError::Range {
                            field: "cookie_samesite",
                            value: "none".into(),
                            allowed: "lax or strict on an http listener (browsers drop SameSite=None cookies without Secure, which needs https)",
                        });
                    }
                    if h.redirect_https == Some(0) {
                        return Err(ConfigError::Range {
                            field: "redirect_https",
                            value: "0".into(),
                            allowed: "a port 1-65535 (443: no port in the URL)",
                        });
                    }
                }
                if let Some(c) = &h.cookie_name
                    && (c.is_empty()
                        || c.len() > 64
                        || !c
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
                {
                    return Err(ConfigError::Range {
                        field: "cookie_name",
                        value: c.clone(),
                        allowed: "1-64 characters of letters, digits, '_' and '-'",
                    });
                }
            }
        }
        self.health_check.validate()?;
        if self.backends.len() > MAX_BACKENDS_PER_LISTENER as usize {
            return Err(ConfigError::Capacity {
                what: "backends per listener",
                max: MAX_BACKENDS_PER_LISTENER as usize,
            });
        }
        let mut seen = HashSet::new();
        for b in &self.backends {
            validate_backend(b)?;
            if !seen.insert(b.addr) {
                return Err(ConfigError::DuplicateBackend {
                    listener: self.name.clone(),
                    addr: b.addr,
                });
            }
        }
        Ok(())
    }
}

/// The health check a listener of `proto` gets by default: none for UDP (a UDP service need
/// not accept TCP connections), TCP connect otherwise.
pub fn default_check(proto: Proto) -> CheckKind {
    match proto {
        Proto::Udp => CheckKind::None,
        Proto::Tcp | Proto::Http | Proto::Https => CheckKind::Tcp,
    }
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Checks a backend on its own.
pub fn validate_backend(b: &BackendSpec) -> Result<(), ConfigError> {
    range("weight", b.weight, 0, MAX_WEIGHT, "0-100 (0 = quiescent)")?;
    if b.addr.port() == 0 {
        return Err(ConfigError::Range {
            field: "backend",
            value: b.addr.to_string(),
            allowed: "a port 1-65535",
        });
    }
    check_unicast("backend", b.addr.ip())
}

fn check_unicast(field: &'static str, ip: IpAddr) -> Result<(), ConfigError> {
    match ip {
        IpAddr::V4(v4) => check_unicast4(field, v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xffc0) == 0xfe80
                || v6.to_ipv4_mapped().is_some()
            {
                return Err(ConfigError::Range {
                    field,
                    value: ip.to_string(),
                    allowed: "a unicast IPv6 address (not ::, loopback, multicast, link-local fe80::/10 or IPv4-mapped)",
                });
            }
            Ok(())
        }
    }
}

fn check_unicast4(field: &'static str, ip: Ipv4Addr) -> Result<(), ConfigError> {
    if ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_loopback()
        || ip.octets()[0] == 0
        || ip.octets()[0] >= 240
    {
        return Err(ConfigError::Range {
            field,
            value: ip.to_string(),
            allowed: "a unicast IPv4 address (not loopback, 0.0.0.0/8, multicast or 240.0.0.0/4)",
        });
    }
    Ok(())
}

fn validate_name(name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(ConfigError::Range {
            field: "name",
            value: name.into(),
            allowed: "1-64 characters of letters, digits, '-', '_' and '.'",
        });
    }
    Ok(())
}

pub(crate) fn range(
    field: &'static str,
    v: u32,
    lo: u32,
    hi: u32,
    allowed: &'static str,
) -> Result<(), ConfigError> {
    if v < lo || v > hi {
        return Err(ConfigError::Range {
            field,
            value: v.to_string(),
            allowed,
        });
    }
    Ok(())
}

/// Checks a whole set of listeners: each on its own, then names, addresses and capacities.
pub fn validate_all(listeners: &[ListenerSpec]) -> Result<(), ConfigError> {
    if listeners.len() > MAX_LISTENERS as usize {
        return Err(ConfigError::Capacity {
            what: "listeners",
            max: MAX_LISTENERS as usize,
        });
    }
    let mut names = HashSet::new();
    // Two listeners may share a VIP:port only with different IP protocols (tcp + udp).
    let mut addrs: HashMap<(SocketAddr, u8), &str> = HashMap::new();
    let vips: HashSet<IpAddr> = listeners.iter().map(|l| l.vip.ip()).collect();
    let mut backend_addrs: BTreeMap<(SocketAddr, u8), usize> = BTreeMap::new();
    let mut total_backends = 0usize;
    for l in listeners {
        l.validate()?;
        if !names.insert(l.name.as_str()) {
            return Err(ConfigError::DuplicateListener(l.name.clone()));
        }
        if let Some(other) = addrs.insert((l.vip, l.proto().ip_proto()), &l.name) {
            return Err(ConfigError::DuplicateVip {
                vip: l.vip,
                proto: l.proto(),
                other: other.into(),
            });
        }
        total_backends += l.backends.len();
        for b in &l.backends {
            if vips.contains(&b.addr.ip()) {
                return Err(ConfigError::Invalid(format!(
                    "backend {} of listener {:?} is a VIP address: a backend cannot be a VIP (its packets would loop through the balancer)",
                    b.addr, l.name
                )));
            }
            if l.l4().is_some() {
                let n = backend_addrs
                    .entry((b.addr, l.proto().ip_proto()))
                    .or_default();
                *n += 1;
                if *n > MAX_LISTENERS_PER_BACKEND_ADDR {
                    return Err(ConfigError::Capacity {
                        what: "L4 listeners sharing one backend address",
                        max: MAX_LISTENERS_PER_BACKEND_ADDR,
                    });
                }
            }
        }
    }
    if total_backends > MAX_BACKENDS as usize {
        return Err(ConfigError::Capacity {
            what: "backends in total",
            max: MAX_BACKENDS as usize,
        });
    }
    Ok(())
}

/// Sizes of the datapath's flow tables and the flood settings (the config file's `[tables]`).
/// Applied when the datapath is loaded: a running daemon refuses a change (restart it to
/// resize; live entries are copied, see `datapath::loader`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TablesSpec {
    /// Connection table entries (verified flows).
    pub connections: u32,
    /// Persistence table entries (clients with a verified flow).
    pub sessions: u32,
    /// Half-open table slots (unverified flows; in-place, 8-way sets: rounded down to a
    /// multiple of 8), also the pending-persistence table's size.
    pub half_open: u32,
    /// The IPv6 tables' sizes (IPv6 flows have tables of their own).
    pub connections6: u32,
    pub sessions6: u32,
    pub half_open6: u32,
    /// New unverified flows per second (all CPUs) above which flood mode starts; default: the
    /// half-open table's size (its entries would then live less than a second); 0 = never.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flood_threshold: Option<u32>,
    /// RSTs the datapath may send per second per CPU.
    pub rst_per_sec: u32,
}

impl Default for TablesSpec {
    fn default() -> Self {
        Self {
            connections: DEFAULT_CONNS,
            sessions: DEFAULT_SESSIONS,
            half_open: DEFAULT_HALF_OPEN,
            connections6: clb_common::DEFAULT_CONNS6,
            sessions6: clb_common::DEFAULT_SESSIONS6,
            half_open6: clb_common::DEFAULT_HALF_OPEN6,
            flood_threshold: None,
            rst_per_sec: DEFAULT_RST_PER_SEC,
        }
    }
}

impl TablesSpec {
    pub fn validate(&self) -> Result<(), ConfigError> {
        const ALLOWED: &str = "1024-67108864 entries";
        range(
            "tables.connections",
            self.connections,
            MIN_TABLE,
            MAX_TABLE,
            ALLOWED,
        )?;
        range(
            "tables.sessions",
            self.sessions,
            MIN_TABLE,
            MAX_TABLE,
            ALLOWED,
        )?;
        range(
            "tables.half_open",
            self.half_open,
            MIN_TABLE,
            MAX_TABLE,
            ALLOWED,
        )?;
        for (field, v) in [
            ("tables.connections6", self.connections6),
            ("tables.sessions6", self.sessions6),
            ("tables.half_open6", self.half_open6),
        ] {
            range(field, v, MIN_TABLE, MAX_TABLE, ALLOWED)?;
        }
        range(
            "tables.rst_per_sec",
            self.rst_per_sec,
            1,
            1_000_000,
            "1-1000000",
        )?;
        Ok(())
    }

    /// The flood threshold in effect, new unverified flows per second over all CPUs.
    pub fn flood_per_sec(&self) -> u32 {
        self.flood_threshold.unwrap_or(self.half_open)
    }
}

/// VIP announcement over BGP (the config file's `[bgp]`): clb runs BIRD with these sessions
/// and announces each VIP while this node can serve it (see `bgp`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BgpSpec {
    /// This node's AS number.
    pub local_as: u32,
    /// This node's BGP router id (an address of the node, unique in the fleet). Omitted (so
    /// that every node can run from the same file): the node's source address towards its
    /// first IPv4 peer (needed when every peer is IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_id: Option<Ipv4Addr>,
    /// BFD on every session, so a peer that goes silent is dropped in under a second.
    #[serde(default = "yes")]
    pub bfd: bool,
    /// BFD transmit/receive interval, milliseconds (10-10000).
    #[serde(default = "d_bfd_interval")]
    pub bfd_interval_ms: u32,
    /// Missed BFD packets that declare a peer down (2-50).
    #[serde(default = "d_bfd_multiplier")]
    pub bfd_multiplier: u32,
    /// BGP hold time, seconds (3-65535); the bound on detecting a dead peer without BFD.
    #[serde(default = "d_hold")]
    pub hold_time: u32,
    /// The peers (routers) to announce to.
    #[serde(rename = "peer")]
    pub peers: Vec<BgpPeer>,
}

/// One BGP peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BgpPeer {
    /// The peer's address (directly connected). An IPv4 peer's session carries the IPv4 VIPs,
    /// an IPv6 peer's the IPv6 VIPs (one session per family, next hop this node's own address
    /// on it).
    pub address: IpAddr,
    /// The peer's AS number.
    pub remote_as: u32,
}

fn yes() -> bool {
    true
}
fn d_bfd_interval() -> u32 {
    100
}
fn d_bfd_multiplier() -> u32 {
    3
}
fn d_hold() -> u32 {
    9
}

impl BgpSpec {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let asn = |field: &'static str, v: u32| {
            if v == 0 || v == u32::MAX {
                Err(ConfigError::Range {
                    field,
                    value: v.to_string(),
                    allowed: "1-4294967294",
                })
            } else {
                Ok(())
            }
        };
        asn("bgp.local_as", self.local_as)?;
        if let Some(id) = self.router_id {
            check_unicast4("bgp.router_id", id)?;
        }
        range(
            "bgp.bfd_interval_ms",
            self.bfd_interval_ms,
            10,
            10_000,
            "10-10000 ms",
        )?;
        range("bgp.bfd_multiplier", self.bfd_multiplier, 2, 50, "2-50")?;
        range("bgp.hold_time", self.hold_time, 3, 65535, "3-65535 seconds")?;
        if self.peers.is_empty() {
            return Err(ConfigError::Invalid(
                "bgp: at least one [[bgp.peer]] is needed".into(),
            ));
        }
        if self.router_id.is_none() && !self.peers.iter().any(|p| p.address.is_ipv4()) {
            return Err(ConfigError::Invalid(
                "bgp: router_id is needed when no peer is IPv4 (it defaults to this node's address towards the first IPv4 peer)".into(),
            ));
        }
        let mut seen = HashSet::new();
        for p in &self.peers {
            asn("bgp.peer.remote_as", p.remote_as)?;
            check_unicast("bgp.peer.address", p.address)?;
            if !seen.insert(p.address) {
                return Err(ConfigError::Invalid(format!(
                    "bgp: peer {} is listed twice",
                    p.address
                )));
            }
        }
        Ok(())
    }

    /// How long a silent peer (this node, seen from the router) keeps its routes at most:
    /// BFD's detection time, or the BGP hold time without BFD.
    pub fn withdrawal_bound_ms(&self) -> u64 {
        if self.bfd {
            u64::from(self.bfd_interval_ms) * u64::from(self.bfd_multiplier)
        } else {
            u64::from(self.hold_time) * 1000
        }
    }
}

/// A refused configuration or request. Messages name the field and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{field} {value} is out of range: allowed {allowed}")]
    Range {
        field: &'static str,
        value: String,
        allowed: &'static str,
    },
    #[error("{field} does not apply to {proto} listeners")]
    NotFor { field: &'static str, proto: Proto },
    #[error("listener name {0:?} is already in use")]
    DuplicateListener(String),
    #[error("vip {vip} ({proto}) is already used by listener {other:?}")]
    DuplicateVip {
        vip: SocketAddr,
        proto: Proto,
        other: String,
    },
    #[error("backend {addr} is already in listener {listener:?}")]
    DuplicateBackend { listener: String, addr: SocketAddr },
    #[error("no listener named {0:?}")]
    UnknownListener(String),
    #[error("listener {listener:?} has no backend {addr}")]
    UnknownBackend { listener: String, addr: SocketAddr },
    #[error("capacity exceeded: at most {max} {what}")]
    Capacity { what: &'static str, max: usize },
    /// A certificate or key file of an HTTPS listener cannot be used (the message names it).
    #[error("listener {listener:?}: {why}; nothing was changed")]
    Certificate { listener: String, why: String },
    #[error("{0}")]
    Invalid(String),
}

// ---- wire format ----------------------------------------------------------------------------

/// A listener as the API and the config file spell it: one flat table, `proto` first. Fields
/// that do not apply to the protocol are refused by name when it is turned into a
/// [`ListenerSpec`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireListener {
    pub name: String,
    pub vip: SocketAddr,
    pub proto: Option<Proto>,
    #[serde(default)]
    pub persist: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub slow_start: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sched: Option<Sched>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<Forward>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persist_mask: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maglev_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_timeout: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_conns: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_timeout: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie_samesite: Option<SameSite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_https: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_headers: Option<u32>,
    #[serde(default, rename = "certificate", skip_serializing_if = "Vec::is_empty")]
    pub certs: Vec<CertSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<WireHealthCheck>,
    #[serde(default, rename = "backend", skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendSpec>,
}

/// A health check as the API and config file spell it: every field optional, the kind
/// defaulting by the listener's protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireHealthCheck {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<CheckKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

impl TryFrom<WireListener> for ListenerSpec {
    type Error = ConfigError;
    fn try_from(w: WireListener) -> Result<Self, ConfigError> {
        let proto = w.proto.ok_or_else(|| {
            ConfigError::Invalid(format!(
                "listener {:?}: missing field `proto` (tcp, udp, http or https)",
                w.name
            ))
        })?;
        let not_for = |field: &'static str| ConfigError::NotFor { field, proto };
        let kind = match proto {
            Proto::Tcp | Proto::Udp => {
                for (set, field) in [
                    (w.keepalive_timeout.is_some(), "keepalive_timeout"),
                    (w.cookie_name.is_some(), "cookie_name"),
                    (w.max_conns.is_some(), "max_conns"),
                    (w.io_timeout.is_some(), "io_timeout"),
                    (w.cookie_samesite.is_some(), "cookie_samesite"),
                    (w.redirect_https.is_some(), "redirect_https"),
                    (w.max_headers.is_some(), "max_headers"),
                    (!w.certs.is_empty(), "certificate"),
                ] {
                    if set {
                        return Err(not_for(field));
                    }
                }
                Kind::L4(L4Spec {
                    udp: proto == Proto::Udp,
                    idle_timeout: w.idle_timeout,
                    sched: w.sched.unwrap_or_default(),
                    forward: w.forward.unwrap_or_default(),
                    persist_mask: w.persist_mask,
                    maglev_size: w.maglev_size,
                })
            }
            Proto::Http | Proto::Https => {
                if proto == Proto::Http && !w.certs.is_empty() {
                    return Err(not_for("certificate"));
                }
                if w.sched == Some(Sched::Maglev) {
                    return Err(ConfigError::Invalid(format!(
                        "listener {:?}: sched = \"maglev\" does not apply to {proto} listeners \
                         (wrr or lc)",
                        w.name
                    )));
                }
                for (set, field) in [
                    (w.idle_timeout.is_some(), "idle_timeout"),
                    (w.forward.is_some(), "forward"),
                    (w.persist_mask.is_some(), "persist_mask"),
                    (w.maglev_size.is_some(), "maglev_size"),
                ] {
                    if set {
                        return Err(not_for(field));
                    }
                }
                Kind::Http(HttpSpec {
                    sched: w.sched.unwrap_or_default(),
                    certs: w.certs,
                    tls: proto == Proto::Https,
                    cookie_samesite: w.cookie_samesite,
                    redirect_https: w.redirect_https,
                    max_headers: w.max_headers,
                    keepalive_timeout: w.keepalive_timeout,
                    cookie_name: w.cookie_name,
                    max_conns: w.max_conns,
                    io_timeout: w.io_timeout,
                })
            }
        };
        let hc = w.health_check.unwrap_or_default();
        let mut health_check = HealthCheckSpec::of(hc.kind.unwrap_or(default_check(proto)));
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = hc.$f { health_check.$f = v; } )* };
        }
        set!(
            interval,
            timeout,
            healthy_threshold,
            unhealthy_threshold,
            path,
            status
        );
        health_check.port = hc.port;
        Ok(ListenerSpec {
            name: w.name,
            vip: w.vip,
            persist: w.persist,
            slow_start: w.slow_start,
            kind,
            health_check,
            backends: w.backends,
        })
    }
}

impl From<ListenerSpec> for WireListener {
    fn from(s: ListenerSpec) -> Self {
        let proto = s.proto();
        let h = s.health_check;
        let mut w = WireListener {
            name: s.name,
            vip: s.vip,
            proto: Some(proto),
            persist: s.persist,
            slow_start: s.slow_start,
            health_check: Some(WireHealthCheck {
                kind: Some(h.kind),
                interval: Some(h.interval),
                timeout: Some(h.timeout),
                healthy_threshold: Some(h.healthy_threshold),
                unhealthy_threshold: Some(h.unhealthy_threshold),
                port: h.port,
                path: (h.kind == CheckKind::Http).then_some(h.path),
                status: (h.kind == CheckKind::Http).then_some(h.status),
            }),
            backends: s.backends,
            idle_timeout: None,
            sched: None,
            forward: None,
            persist_mask: None,
            maglev_size: None,
            keepalive_timeout: None,
            cookie_name: None,
            max_conns: None,
            io_timeout: None,
            cookie_samesite: None,
            redirect_https: None,
            max_headers: None,
            certs: Vec::new(),
        };
        match s.kind {
            Kind::L4(l) => {
                w.idle_timeout = l.idle_timeout;
                w.sched = (l.sched != Sched::Wrr).then_some(l.sched);
                w.forward = (l.forward != Forward::Nat).then_some(l.forward);
                w.persist_mask = l.persist_mask;
                w.maglev_size = l.maglev_size;
            }
            Kind::Http(hs) => {
                w.sched = (hs.sched != Sched::Wrr).then_some(hs.sched);
                w.keepalive_timeout = hs.keepalive_timeout;
                w.cookie_name = hs.cookie_name;
                w.max_conns = hs.max_conns;
                w.io_timeout = hs.io_timeout;
                w.cookie_samesite = hs.cookie_samesite;
                w.redirect_https = hs.redirect_https;
                w.max_headers = hs.max_headers;
                w.certs = hs.certs;
            }
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_check_paths_must_be_requestable_and_short() {
        let mut h = HealthCheckSpec::of(CheckKind::Http);
        for good in ["/", "/health", "/health?deep=1", "/a%20b"] {
            h.path = good.into();
            assert!(h.validate().is_ok(), "{good}");
        }
        for bad in ["health", "/<x>", "/a b", "/x\ty"] {
            h.path = bad.into();
            let e = h
                .validate()
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"))
                .to_string();
            assert!(e.contains("health_check.path"), "{bad}: {e}");
        }
        h.path = format!("/{}", "a".repeat(64 * 1024));
        let e = h.validate().unwrap_err().to_string();
        assert!(e.len() < 600 && e.contains("65537 bytes"), "{e}");
    }

    fn l(name: &str, vip: &str) -> ListenerSpec {
        ListenerSpec::new(name, vip.parse::<SocketAddr>().unwrap(), Proto::Tcp)
    }

    fn with_backend(mut x: ListenerSpec, addr: &str) -> ListenerSpec {
        x.backends
            .push(BackendSpec::new(addr.parse::<SocketAddr>().unwrap(), 10));
        x
    }

    #[test]
    fn ipv6_listeners_validate_family_addresses_and_mask() {
        // An IPv6 L4 listener with IPv6 backends is fine, and a mask up to /128.
        let mut ok = with_backend(l("v6", "[fd00::100]:80"), "[fd00:10::2]:8080");
        if let Kind::L4(k) = &mut ok.kind {
            k.persist_mask = Some(64);
        }
        validate_all(&[ok.clone(), l("v4", "10.0.0.100:80")]).unwrap();
        if let Kind::L4(k) = &mut ok.kind {
            k.persist_mask = Some(129);
        }
        let e = ok.validate().unwrap_err().to_string();
        assert!(e.contains("persist_mask"), "{e}");
        // L4 NAT does not cross families.
        let e = with_backend(l("x", "[fd00::100]:80"), "10.1.0.2:80")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("address family"), "{e}");
        let e = with_backend(l("x", "10.0.0.100:80"), "[fd00:10::2]:80")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("address family"), "{e}");
        // An HTTP listener proxies across families.
        let mut h = ListenerSpec::new(
            "h",
            "10.0.0.100:80".parse::<SocketAddr>().unwrap(),
            Proto::Http,
        );
        h.backends.push(BackendSpec::new(
            "[fd00:10::2]:80".parse::<SocketAddr>().unwrap(),
            10,
        ));
        h.validate().unwrap();
        // Not unicast.
        for vip in [
            "[::]:80",
            "[::1]:80",
            "[ff02::1]:80",
            "[fe80::1]:80",
            "[::ffff:10.0.0.1]:80",
        ] {
            assert!(l("x", vip).validate().is_err(), "{vip} accepted");
        }
        // A backend on another listener's IPv6 VIP.
        let e = validate_all(&[
            l("a", "[fd00::100]:80"),
            with_backend(l("b", "[fd00::101]:80"), "[fd00::100]:8080"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("is a VIP address"), "{e}");
    }

    #[test]
    fn ranges_name_field_and_range() {
        let mut x = l("web", "10.0.0.1:80");
        x.persist = 3601;
        let e = x.validate().unwrap_err().to_string();
        assert_eq!(
            e,
            "persist 3601 is out of range: allowed 0-3600 seconds (0 = off)"
        );
        x.persist = 3600;
        if let Kind::L4(k) = &mut x.kind {
            k.idle_timeout = Some(0);
        }
        assert!(
            x.validate()
                .unwrap_err()
                .to_string()
                .starts_with("idle_timeout 0 is out of range")
        );
        if let Kind::L4(k) = &mut x.kind {
            k.idle_timeout = Some(3600);
        }
        x.backends.push(BackendSpec::new(
            "10.1.0.1:80".parse::<SocketAddr>().unwrap(),
            101,
        ));
        assert!(
            x.validate()
                .unwrap_err()
                .to_string()
                .contains("allowed 0-100")
        );
    }

    #[test]
    fn http_persist_range_is_30_to_3600_or_off() {
        let mut x = ListenerSpec::new(
            "h",
            "10.0.0.1:80".parse::<SocketAddr>().unwrap(),
            Proto::Http,
        );
        x.persist = 10;
        assert!(x.validate().unwrap_err().to_string().contains("30-3600"));
        x.persist = 0;
        x.validate().unwrap();
        x.persist = 30;
        x.validate().unwrap();
    }

    #[test]
    fn duplicates_are_refused() {
        let a = l("a", "10.0.0.1:80");
        let mut b = l("a", "10.0.0.2:80");
        assert_eq!(
            validate_all(&[a.clone(), b.clone()]).unwrap_err(),
            ConfigError::DuplicateListener("a".into())
        );
        b.name = "b".into();
        b.vip = a.vip;
        assert!(matches!(
            validate_all(&[a.clone(), b.clone()]),
            Err(ConfigError::DuplicateVip { .. })
        ));
        let mut c = ListenerSpec::new("b", a.vip, Proto::Udp);
        c.backends = b.backends;
        validate_all(&[a, c]).unwrap();
    }

    #[test]
    fn loopback_vips_and_backends_on_a_vip_are_refused() {
        let e = l("a", "127.0.0.1:80").validate().unwrap_err().to_string();
        assert!(e.contains("vip 127.0.0.1 is out of range"), "{e}");
        let a = with_backend(l("a", "10.0.0.1:80"), "10.0.0.2:80");
        let b = l("b", "10.0.0.2:81");
        let e = validate_all(&[a, b]).unwrap_err().to_string();
        assert!(e.contains("is a VIP address"), "{e}");
        let e = with_backend(l("a", "10.0.0.1:80"), "127.0.0.5:80")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("backend 127.0.0.5"), "{e}");
    }

    #[test]
    fn health_check_ranges() {
        let mut x = l("a", "10.0.0.1:80");
        x.health_check.interval = 1;
        assert!(x.validate().unwrap_err().to_string().contains("2-300"));
        x.health_check.interval = 5;
        x.health_check.unhealthy_threshold = 11;
        assert!(x.validate().unwrap_err().to_string().contains("2-10"));
        x.health_check.unhealthy_threshold = 2;
        x.health_check.kind = CheckKind::Http;
        x.health_check.status = "600".into();
        assert!(x.validate().unwrap_err().to_string().contains("100-599"));
    }

    #[test]
    fn wire_format_is_strict_per_kind_and_round_trips() {
        let j = r#"{"name":"w","vip":"10.0.0.1:80","proto":"tcp","keepalive_timeout":5}"#;
        let e = serde_json::from_str::<ListenerSpec>(j)
            .unwrap_err()
            .to_string();
        assert!(e.contains("keepalive_timeout does not apply to tcp"), "{e}");
        let j = r#"{"name":"h","vip":"10.0.0.1:80","proto":"http","sched":"maglev"}"#;
        let e = serde_json::from_str::<ListenerSpec>(j)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"maglev\" does not apply to http"), "{e}");
        let j = r#"{"name":"h","vip":"10.0.0.1:80","proto":"http","sched":"lc"}"#;
        let s: ListenerSpec = serde_json::from_str(j).unwrap();
        assert_eq!(s.sched(), Sched::Lc);
        let j = r#"{"name":"u","vip":"10.0.0.1:53","proto":"udp","sched":"maglev","persist":60,"persist_mask":24}"#;
        let s: ListenerSpec = serde_json::from_str(j).unwrap();
        assert_eq!(
            s.health_check.kind,
            CheckKind::None,
            "UDP: no checks by default"
        );
        assert_eq!(s.sched(), Sched::Maglev);
        let back: ListenerSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn dsr_needs_the_vip_port_and_maglev_size_a_prime() {
        let mut x = with_backend(l("a", "10.0.0.1:80"), "10.1.0.1:8080");
        if let Kind::L4(k) = &mut x.kind {
            k.forward = Forward::Dsr;
        }
        let e = x.validate().unwrap_err().to_string();
        assert!(e.contains("backend port must equal the VIP port 80"), "{e}");
        x.backends[0].addr = "10.1.0.1:80".parse().unwrap();
        x.validate().unwrap();
        if let Kind::L4(k) = &mut x.kind {
            k.sched = Sched::Maglev;
            k.maglev_size = Some(65536);
        }
        assert!(x.validate().unwrap_err().to_string().contains("a prime"));
        if let Kind::L4(k) = &mut x.kind {
            k.maglev_size = Some(65537);
        }
        x.validate().unwrap();
    }

    #[test]
    fn bgp_peers_of_either_family_and_a_router_id_without_an_ipv4_one() {
        let spec = |peers: &str, id: &str| -> BgpSpec {
            toml::from_str(&format!("local_as = 65001\n{id}{peers}")).unwrap()
        };
        let both = "[[peer]]\naddress = \"10.0.20.1\"\nremote_as = 65000\n[[peer]]\naddress = \"fd00:20::1\"\nremote_as = 65000\n";
        spec(both, "").validate().unwrap();
        let six = "[[peer]]\naddress = \"fd00:20::1\"\nremote_as = 65000\n";
        let e = spec(six, "").validate().unwrap_err().to_string();
        assert!(e.contains("router_id is needed"), "{e}");
        spec(six, "router_id = \"10.0.20.2\"\n").validate().unwrap();
        let ll = "[[peer]]\naddress = \"fe80::1\"\nremote_as = 65000\n";
        let e = spec(ll, "router_id = \"10.0.20.2\"\n")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("bgp.peer.address"), "{e}");
    }
}
