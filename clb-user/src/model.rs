//! What a user configures: listeners, their backends, persistence, timeouts, health checks.
//! These are the config file's and the API's types; [`validate_all`] is the one place where
//! ranges and capacities are enforced, with messages that name the field and the allowed range.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use clb_common::{
    DEFAULT_TCP_IDLE_TIMEOUT_SECS, DEFAULT_UDP_IDLE_TIMEOUT_SECS, DEFAULT_WEIGHT, MAX_BACKENDS,
    MAX_BACKENDS_PER_LISTENER, MAX_IDLE_TIMEOUT_SECS, MAX_LISTENERS,
    MAX_LISTENERS_PER_BACKEND_ADDR, MAX_PERSIST_SECS, MAX_WEIGHT, MIN_IDLE_TIMEOUT_SECS, PROTO_TCP,
    PROTO_UDP,
};
use serde::{Deserialize, Serialize};

/// Listener protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// L4 TCP, balanced in XDP.
    Tcp,
    /// L4 UDP, balanced in XDP.
    Udp,
    /// L7 HTTP/1.1, proxied in user space with cookie persistence.
    Http,
}

impl Proto {
    /// The IP protocol the listener receives.
    pub fn ip_proto(self) -> u8 {
        match self {
            Proto::Tcp | Proto::Http => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }
    /// Whether the XDP datapath serves this listener.
    pub fn is_l4(self) -> bool {
        matches!(self, Proto::Tcp | Proto::Udp)
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Http => "http",
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
            _ => Err(format!("proto must be tcp, udp or http, not {s:?}")),
        }
    }
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

/// Health-check settings of a listener (the cloud LB's ranges and defaults).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckSpec {
    pub kind: CheckKind,
    /// Seconds between checks of one backend, 2–300.
    pub interval: u32,
    /// Seconds a check may take, 2–60.
    pub timeout: u32,
    /// Consecutive successes that make an unhealthy backend healthy, 2–10.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy backend unhealthy, 2–10.
    pub unhealthy_threshold: u32,
    /// Port to check instead of the backend's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// HTTP check: request path.
    pub path: String,
    /// HTTP check: accepted status range, "200-399".
    pub status: String,
}

impl Default for HealthCheckSpec {
    fn default() -> Self {
        Self {
            kind: CheckKind::Tcp,
            interval: 5,
            timeout: 2,
            healthy_threshold: 3,
            unhealthy_threshold: 3,
            port: None,
            path: "/".into(),
            status: "200-399".into(),
        }
    }
}

impl HealthCheckSpec {
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
            if !self.path.starts_with('/') || self.path.chars().any(|c| c.is_control() || c == ' ')
            {
                return Err(ConfigError::Range {
                    field: "health_check.path",
                    value: self.path.clone(),
                    allowed: "an absolute path starting with '/' without spaces",
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
    /// Backend IPv4 address and port.
    pub addr: SocketAddrV4,
    /// Weight 0–100; 0 = quiescent (no new connections or persisted clients).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

/// Default HTTP keep-alive idle timeout, seconds.
pub const DEFAULT_KEEPALIVE_SECS: u32 = 75;
/// Default persistence cookie name.
pub const DEFAULT_COOKIE_NAME: &str = "clb_session";

/// A listener: a VIP:port and protocol, its settings and backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSpec {
    /// Unique name: letters, digits, `-`, `_`, `.`; 1–64 characters.
    pub name: String,
    /// Virtual IP and port.
    pub vip: SocketAddrV4,
    pub proto: Proto,
    /// Session persistence, seconds: 0 = off; 1–3600 for tcp/udp, 30–3600 for http.
    #[serde(default)]
    pub persist: u32,
    /// Connection idle timeout, seconds, 1–3600 (tcp/udp). Default 900 (tcp), 300 (udp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<u32>,
    /// HTTP keep-alive idle timeout, seconds, 0–900 (http; 0 = close after each response).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_timeout: Option<u32>,
    /// HTTP persistence cookie name (http).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie_name: Option<String>,
    #[serde(default)]
    pub health_check: HealthCheckSpec,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendSpec>,
}

impl ListenerSpec {
    /// A listener with defaults for everything but name, VIP and protocol.
    pub fn new(name: &str, vip: SocketAddrV4, proto: Proto) -> Self {
        Self {
            name: name.into(),
            vip,
            proto,
            persist: 0,
            idle_timeout: None,
            keepalive_timeout: None,
            cookie_name: None,
            health_check: HealthCheckSpec::default(),
            backends: Vec::new(),
        }
    }

    /// The connection idle timeout in effect, seconds.
    pub fn idle_timeout_secs(&self) -> u32 {
        self.idle_timeout.unwrap_or(match self.proto {
            Proto::Udp => DEFAULT_UDP_IDLE_TIMEOUT_SECS,
            Proto::Tcp | Proto::Http => DEFAULT_TCP_IDLE_TIMEOUT_SECS,
        })
    }

    /// The HTTP keep-alive timeout in effect, seconds.
    pub fn keepalive_secs(&self) -> u32 {
        self.keepalive_timeout.unwrap_or(DEFAULT_KEEPALIVE_SECS)
    }

    /// The persistence cookie name in effect.
    pub fn cookie(&self) -> &str {
        self.cookie_name.as_deref().unwrap_or(DEFAULT_COOKIE_NAME)
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
        check_unicast("vip", *self.vip.ip())?;
        match self.proto {
            Proto::Tcp | Proto::Udp => {
                range(
                    "persist",
                    self.persist,
                    0,
                    MAX_PERSIST_SECS,
                    "0-3600 seconds (0 = off)",
                )?;
                if self.keepalive_timeout.is_some() || self.cookie_name.is_some() {
                    return Err(ConfigError::NotFor {
                        field: if self.keepalive_timeout.is_some() {
                            "keepalive_timeout"
                        } else {
                            "cookie_name"
                        },
                        proto: self.proto,
                    });
                }
            }
            Proto::Http => {
                if self.persist != 0 {
                    range(
                        "persist",
                        self.persist,
                        30,
                        MAX_PERSIST_SECS,
                        "0 (off) or 30-3600 seconds for http",
                    )?;
                }
                if let Some(k) = self.keepalive_timeout {
                    range("keepalive_timeout", k, 0, 900, "0-900 seconds (0 = close)")?;
                }
                if let Some(c) = &self.cookie_name
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
        if let Some(t) = self.idle_timeout {
            range(
                "idle_timeout",
                t,
                MIN_IDLE_TIMEOUT_SECS,
                MAX_IDLE_TIMEOUT_SECS,
                "1-3600 seconds",
            )?;
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
    check_unicast("backend", *b.addr.ip())
}

fn check_unicast(field: &'static str, ip: Ipv4Addr) -> Result<(), ConfigError> {
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        return Err(ConfigError::Range {
            field,
            value: ip.to_string(),
            allowed: "a unicast IPv4 address",
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

fn range(
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
    let mut addrs: HashMap<(SocketAddrV4, u8), &str> = HashMap::new();
    let mut backend_addrs: BTreeMap<(SocketAddrV4, u8), usize> = BTreeMap::new();
    let mut total_backends = 0usize;
    for l in listeners {
        l.validate()?;
        if !names.insert(l.name.as_str()) {
            return Err(ConfigError::DuplicateListener(l.name.clone()));
        }
        if let Some(other) = addrs.insert((l.vip, l.proto.ip_proto()), &l.name) {
            return Err(ConfigError::DuplicateVip {
                vip: l.vip,
                proto: l.proto,
                other: other.into(),
            });
        }
        total_backends += l.backends.len();
        if l.proto.is_l4() {
            for b in &l.backends {
                let n = backend_addrs
                    .entry((b.addr, l.proto.ip_proto()))
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
        vip: SocketAddrV4,
        proto: Proto,
        other: String,
    },
    #[error("backend {addr} is already in listener {listener:?}")]
    DuplicateBackend {
        listener: String,
        addr: SocketAddrV4,
    },
    #[error("no listener named {0:?}")]
    UnknownListener(String),
    #[error("listener {listener:?} has no backend {addr}")]
    UnknownBackend {
        listener: String,
        addr: SocketAddrV4,
    },
    #[error("capacity exceeded: at most {max} {what}")]
    Capacity { what: &'static str, max: usize },
    #[error("{0}")]
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(name: &str, vip: &str) -> ListenerSpec {
        ListenerSpec::new(name, vip.parse().unwrap(), Proto::Tcp)
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
        x.idle_timeout = Some(0);
        assert!(
            x.validate()
                .unwrap_err()
                .to_string()
                .starts_with("idle_timeout 0 is out of range")
        );
        x.idle_timeout = Some(3600);
        x.backends.push(BackendSpec {
            addr: "10.1.0.1:80".parse().unwrap(),
            weight: 101,
        });
        assert!(
            x.validate()
                .unwrap_err()
                .to_string()
                .contains("allowed 0-100")
        );
    }

    #[test]
    fn http_persist_range_is_30_to_3600_or_off() {
        let mut x = ListenerSpec::new("h", "10.0.0.1:80".parse().unwrap(), Proto::Http);
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
        b.proto = Proto::Udp;
        validate_all(&[a, b]).unwrap();
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
}
