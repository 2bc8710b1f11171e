//! The API's wire types, shared by the server, the CLI and the console (documented in
//! `docs/api.md`). Requests that create or change configuration use the configuration's own
//! types ([`ListenerSpec`], [`BackendSpec`]; a listener patch is a JSON merge patch of a
//! listener's fields).

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clb_common::TrafficCounters;
use serde::{Deserialize, Serialize};

use crate::{
    control::{
        model::{
            AdminState, BackendSpec, CheckKind, Forward, HealthCheckSpec, Kind, Proto, SameSite,
            Sched,
        },
        state::{Health, ListenerState},
        status::LoopStatus,
    },
    datapath::{TableInfo, sweep::Live},
};

/// A listener as `GET /v1/listeners` shows it: its settings with defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerView {
    pub name: String,
    pub vip: SocketAddr,
    pub proto: Proto,
    /// Persistence, seconds (0 = off).
    pub persist: u32,
    /// Slow start, seconds (0 = off).
    #[serde(default)]
    pub slow_start: u32,
    /// L4: connection idle timeout in effect, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<u32>,
    /// Scheduler in effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sched: Option<Sched>,
    /// L4: forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<Forward>,
    /// L4: persistence prefix length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persist_mask: Option<u8>,
    /// L4 Maglev: table size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maglev_size: Option<u32>,
    /// HTTP: keep-alive idle timeout in effect, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_timeout: Option<u32>,
    /// HTTP: persistence cookie name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie_name: Option<String>,
    /// HTTP: connection cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_conns: Option<u32>,
    /// HTTP: write / backend-answer timeout, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_timeout: Option<u32>,
    /// HTTP: `SameSite` of the persistence cookie in effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie_samesite: Option<SameSite>,
    /// HTTP: requests are redirected to `https://` on this port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_https: Option<u16>,
    /// HTTP: request header fields at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_headers: Option<u32>,
    /// HTTPS: the certificates, as configured and as loaded (the first is served to clients
    /// that send no SNI).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertView>,
    pub health_check: HealthCheckSpec,
    pub backends: Vec<BackendSpec>,
    /// Every backend that could take traffic is unhealthy, so all of them get it.
    pub all_backends_unhealthy: bool,
    /// HTTP: "serving", or why the proxy is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<String>,
}

/// One certificate of an HTTPS listener as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertView {
    /// Its first name (`clb listener set --rm-cert NAME`); absent when not loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Every host name and address it serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    pub cert: String,
    pub key: String,
    /// Validity, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<i64>,
    /// SHA-256 of the leaf certificate, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

impl ListenerView {
    /// The view of a listener's state.
    pub fn of(l: &ListenerState, serving: Option<String>) -> Self {
        let s = &l.spec;
        let mut v = ListenerView {
            name: s.name.clone(),
            vip: s.vip,
            proto: s.proto(),
            persist: s.persist,
            slow_start: s.slow_start,
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
            certificates: Vec::new(),
            health_check: s.health_check.clone(),
            backends: s.backends.clone(),
            all_backends_unhealthy: l.all_unhealthy,
            serving,
        };
        match &s.kind {
            Kind::L4(k) => {
                v.idle_timeout = Some(s.idle_timeout_secs());
                v.sched = Some(k.sched);
                v.forward = Some(k.forward);
                // The datapath's default: the whole address (IPv4 /32, IPv6 /128).
                v.persist_mask =
                    Some(
                        k.persist_mask
                            .unwrap_or(if s.vip.is_ipv4() { 32 } else { 128 }),
                    );
                v.maglev_size = (k.sched == Sched::Maglev)
                    .then(|| k.maglev_size.unwrap_or(clb_common::DEFAULT_MAGLEV_SIZE));
            }
            Kind::Http(h) => {
                v.sched = Some(h.sched);
                v.keepalive_timeout = Some(
                    h.keepalive_timeout
                        .unwrap_or(crate::control::model::DEFAULT_KEEPALIVE_SECS),
                );
                v.cookie_name = Some(
                    h.cookie_name
                        .clone()
                        .unwrap_or_else(|| crate::control::model::DEFAULT_COOKIE_NAME.into()),
                );
                v.max_conns = Some(
                    h.max_conns
                        .unwrap_or(crate::control::model::DEFAULT_HTTP_MAX_CONNS),
                );
                v.io_timeout = Some(
                    h.io_timeout
                        .unwrap_or(crate::control::model::DEFAULT_HTTP_IO_TIMEOUT),
                );
                v.cookie_samesite = Some(h.cookie_samesite.unwrap_or_default());
                v.redirect_https = h.redirect_https;
                v.max_headers = Some(
                    h.max_headers
                        .unwrap_or(crate::control::model::DEFAULT_HTTP_MAX_HEADERS),
                );
                v.certificates = h
                    .certs
                    .iter()
                    .map(|c| {
                        let loaded = l.certs.iter().find(|x| x.spec == *c);
                        CertView {
                            name: loaded.map(|x| x.name().to_owned()),
                            names: loaded.map(|x| x.names.clone()).unwrap_or_default(),
                            cert: c.cert.display().to_string(),
                            key: c.key.display().to_string(),
                            not_before: loaded.map(|x| x.not_before),
                            not_after: loaded.map(|x| x.not_after),
                            fingerprint: loaded.map(|x| x.fingerprint.clone()),
                        }
                    })
                    .collect();
            }
        }
        v
    }

    /// A one-line summary of the health check.
    pub fn health_summary(&self) -> String {
        let h = &self.health_check;
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
}

/// Seconds since the epoch of `t`.
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// A backend as `GET /v1/listeners/{name}/backends` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendView {
    pub addr: SocketAddr,
    pub weight: u32,
    /// The weight in effect now (lower during a slow start).
    #[serde(default)]
    pub weight_now: u32,
    pub health: Health,
    /// Unix time (s) of the last health change (or of the backend's creation).
    pub health_since: u64,
    /// Takes new connections and new persisted clients.
    pub accepting: bool,
    /// `ready`, or `maint` (out of service until put back).
    #[serde(default)]
    pub state: AdminState,
    pub draining: bool,
    /// Seconds until a drain cuts the remaining connections; `None` when not draining or
    /// already cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_remaining_secs: Option<u64>,
    /// Live entries naming this backend, as of the last sweep (L4 listeners).
    pub live: Live,
    /// Active connections now (L4: verified flows in the open state, the count least
    /// connections compares; HTTP: requests in flight).
    #[serde(default)]
    pub active: u64,
}

impl BackendView {
    /// `live(id)`: a backend's live entries at the last sweep; `active(i, id)`: the active
    /// count of the listener's `i`-th backend (datapath id `id`, if it has one).
    pub fn of(
        l: &ListenerState,
        live: &dyn Fn(u32) -> Live,
        active: &dyn Fn(usize, Option<u32>) -> u64,
    ) -> Vec<Self> {
        let now = Instant::now();
        l.backends
            .iter()
            .enumerate()
            .map(|(i, b)| BackendView {
                addr: b.spec.addr,
                weight: b.spec.weight,
                weight_now: b.weight_now,
                health: b.health,
                health_since: unix(b.health_since),
                accepting: b.accepting,
                state: b.spec.state,
                draining: b.drain.is_some(),
                drain_remaining_secs: b
                    .drain
                    .and_then(|d| d.deadline)
                    .map(|t| t.saturating_duration_since(now).as_secs()),
                live: b.id.map(live).unwrap_or_default(),
                active: active(i, b.id),
            })
            .collect()
    }
}

/// `PATCH /v1/listeners/{name}/backends/{addr}` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// `maint` takes the backend out of service (established connections cut), `ready`
    /// puts it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<AdminState>,
}

/// `POST /v1/listeners/{name}/backends/{addr}/drain` body.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// Seconds before remaining connections are cut (default 300, at most 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u32>,
    /// Cut remaining connections at once.
    #[serde(default)]
    pub now: bool,
}

/// Default drain timeout, seconds.
pub const DEFAULT_DRAIN_SECS: u32 = 300;

/// One flow table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableStatus {
    pub name: String,
    #[serde(flatten)]
    pub info: TableInfo,
    /// Live entries at the last sweep.
    pub live: u64,
}

/// Flood mode and the half-open table's churn.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FloodStatus {
    /// On now.
    pub active: bool,
    /// Seconds it stays on (if no new flood window).
    pub remaining_secs: u64,
    /// Times a CPU switched it on (datapath counter).
    pub entered: u64,
    /// Transitions on and off the daemon observed (it polls every 200 ms).
    pub transitions_on: u64,
    pub transitions_off: u64,
    /// Unverified flows written to the half-open table.
    pub half_open_inserts: u64,
    /// Unverified flows promoted to the connection table.
    pub half_open_promotions: u64,
    /// Live half-open entries pushed out by new flows (the table churns; each one switches
    /// flood mode on). Exact: the datapath counts them.
    pub half_open_evictions: u64,
    /// Live pending-persistence entries pushed out by new clients.
    pub pending_evictions: u64,
    /// Packets whose half-open entry was gone, resolved by the stateless hash.
    pub half_open_misses_hashed: u64,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub ifaces: Vec<String>,
    pub xdp_mode: String,
    pub bpffs: String,
    pub config: String,
    /// SHA-256 of the running configuration in canonical form (the config file as the daemon
    /// writes it): equal on two nodes exactly when they run the same configuration.
    pub config_sha256: String,
    pub uptime_secs: u64,
    /// "attached", or "detached: why".
    pub datapath: String,
    /// Tables this start converted from an earlier clb's layout (an upgrade in place).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upgraded: Vec<String>,
    /// Each `--iface`: attached, missing (deleted; attached again when it comes back) or
    /// failed.
    #[serde(default)]
    pub interfaces: Vec<crate::control::status::InterfaceStatus>,
    pub tables: Vec<TableStatus>,
    pub flood: FloodStatus,
    pub loops: Vec<LoopStatus>,
    pub sweeper: SweeperStatus,
    /// VIP announcement (when `[bgp]` is configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<crate::bgp::BgpStatus>,
}

/// What the sweeper has done.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SweeperStatus {
    pub runs: u64,
    pub conns_removed_total: u64,
    pub half_open_removed_total: u64,
    pub sessions_removed_total: u64,
    pub pending_removed_total: u64,
    /// Seconds since the last sweep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_secs_ago: Option<u64>,
    pub last_micros: u64,
}

/// Counters of a backend.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackendStats {
    pub addr: SocketAddr,
    #[serde(flatten)]
    pub counters: TrafficCounters,
    pub live: Live,
    /// Active connections now (see [`BackendView::active`]).
    #[serde(default)]
    pub active: u64,
}

/// Counters of a listener.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListenerStats {
    pub name: String,
    pub proto: Proto,
    #[serde(flatten)]
    pub counters: TrafficCounters,
    pub live: Live,
    pub backends: Vec<BackendStats>,
}

/// Count of health transitions of one backend to one state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HealthTransitionCount {
    pub listener: String,
    pub backend: SocketAddr,
    pub to: Health,
    pub count: u64,
}

/// `GET /v1/stats`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatsResponse {
    pub listeners: Vec<ListenerStats>,
    /// Verdicts, events and drops by reason, summed over CPUs.
    pub counters: std::collections::BTreeMap<String, u64>,
    pub sweeper: SweeperStatus,
    pub flood: FloodStatus,
    /// Health transitions since the daemon started.
    pub health_transitions: Vec<HealthTransitionCount>,
    /// HTTP listeners' counters.
    #[serde(default)]
    pub http: Vec<crate::l7::L7ListenerStats>,
}

/// One flow, for `clb conn ls`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnView {
    pub listener: String,
    pub proto: Proto,
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub backend: SocketAddr,
    /// Verified: "open", "fin", "rst"; unverified (half-open table): "syn", "udp", "adopted".
    pub state: String,
    pub idle_secs: u64,
}

/// One persistence entry, for `clb session ls`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionView {
    pub listener: String,
    /// The client address (masked by the listener's persistence prefix).
    pub client: IpAddr,
    /// The persistence prefix length (32: one address).
    pub prefix: u8,
    pub backend: SocketAddr,
    /// Seconds since the client's last packet.
    pub idle_secs: u64,
    /// Seconds until the entry expires without a new packet.
    pub expires_in_secs: u64,
    /// Not yet verified (the client has no completed handshake or two-way exchange yet).
    pub pending: bool,
}

/// A page of a listing.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Page<T> {
    /// Matching entries in all.
    pub total: u64,
    pub offset: u64,
    pub items: Vec<T>,
}

/// An error answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// `POST /v1/console/link`: a one-time console sign-in link.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConsoleLink {
    /// Open this in a browser (it signs in once, within `expires_in_secs`).
    pub url: String,
    /// The code alone (`POST /api/login {"code": …}` on the console; its sign-in form also
    /// takes the whole link).
    pub code: String,
    pub expires_in_secs: u64,
}

/// The answer to `POST /v1/reload`: what the reload changed, one line per field, listener or
/// backend (`listener web: persist 0 → 600`); with `dry_run`, what it would change
/// (`applied` false, nothing changed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadAnswer {
    pub applied: bool,
    pub changes: Vec<String>,
}

/// A `POST /v1/apply` body: listeners in the config file's spelling, each with its backends
/// (`{"listener": [{"name": "web", "vip": …, "backend": [{"addr": …}]}]}`). Each replaces the
/// listener of its name, or is added; listeners the document does not name are left alone.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyDoc {
    #[serde(rename = "listener")]
    pub listeners: Vec<crate::control::model::ListenerSpec>,
}

/// The answer to `DELETE /v1/sessions?listener=L[&client=C]`: how many persisted clients were
/// forgotten (a client counts once, whether it had a verified entry, a pending one or both).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetAnswer {
    pub removed: u64,
}
