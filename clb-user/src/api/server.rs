//! The daemon's local API: JSON over HTTP/1.1 on a Unix socket (documented in `docs/api.md`).
//!
//! Reads are answered from the controller's latest snapshot, the sweeper's latest counts and
//! the datapath reader — never waiting for a change in progress. Every change is one
//! controller transaction: validated as a whole new configuration before anything is touched;
//! a refused request answers 4xx with a message naming the field and allowed range and changes
//! neither the maps nor the config file.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use clb_common::{
    CONN_FIN, CONN_OPEN, CONN_RST, HALF_ADOPTED, HALF_SYN, NS_PER_SEC, conn_timeout_ns, counter,
    ip_from_be, ip6_from_be, is_expired, port_from_be,
};
use serde::{Deserialize, de::DeserializeOwned};

use super::types::{
    ApplyDoc, BackendPatch, BackendStats, BackendView, ConnView, DEFAULT_DRAIN_SECS, DrainRequest,
    ErrorBody, FloodStatus, ForgetAnswer, HealthTransitionCount, ListenerStats, ListenerView, Page,
    ReloadAnswer, SessionView, StatsResponse, Status, SweeperStatus, TableStatus,
};
use crate::{
    control::{
        ChangeError, Controller,
        audit::Source,
        file::{ConfigFile, ConfigFileError},
        model::{BackendSpec, ConfigError, ListenerSpec},
        patch,
        state::Snapshot,
        status::InterfaceState,
    },
    datapath::{DpError, SessionTable, sweep::Live},
    time::monotonic_ns,
};

/// What the API serves from.
#[derive(Clone)]
pub struct Api {
    pub ctl: Arc<Controller>,
    pub l7: Arc<crate::l7::Proxies>,
    pub bgp: Option<Arc<crate::bgp::Speaker>>,
    /// One-time console sign-in codes (`POST /v1/console/link`).
    pub sign_in: Arc<super::signin::SignInCodes>,
    /// Where the changes made through this handle come from, for the audit trail (the
    /// console's handle says `console`).
    pub source: Source,
}

/// An error with its HTTP status.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<ConfigError> for ApiError {
    fn from(c: ConfigError) -> Self {
        let status = match &c {
            ConfigError::UnknownListener(_) | ConfigError::UnknownBackend { .. } => {
                StatusCode::NOT_FOUND
            }
            ConfigError::DuplicateListener(_)
            | ConfigError::DuplicateVip { .. }
            | ConfigError::DuplicateBackend { .. } => StatusCode::CONFLICT,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError(status, c.to_string())
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        match e {
            ChangeError::Refused(c) => c.into(),
            // A config file that cannot be used (on reload) is the caller's input.
            ChangeError::BadFile(f @ ConfigFileError::Missing { .. }) => {
                ApiError(StatusCode::BAD_REQUEST, f.to_string())
            }
            ChangeError::BadFile(
                f @ (ConfigFileError::Parse { .. } | ConfigFileError::Invalid { .. }),
            ) => ApiError(StatusCode::BAD_REQUEST, f.to_string()),
            ChangeError::Detached(_) => ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            e => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

impl From<DpError> for ApiError {
    fn from(e: DpError) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// JSON body parsing with a 400 and serde's message (field, line, column) on failure.
pub fn body<T: DeserializeOwned>(b: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(b).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    })
}

/// A backend address from a URL path segment.
pub fn parse_addr(s: &str) -> ApiResult<SocketAddr> {
    s.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "backend {s:?} is not an address and port (10.0.0.1:80 or [2001:db8::1]:80; in a URL path, percent-encode the brackets)"
            ),
        )
    })
}

fn json<T: serde::Serialize>(v: T) -> Response {
    axum::Json(v).into_response()
}

/// Runs a change (blocking control-plane work) off the async threads, and answers once the
/// HTTP listeners route by it too.
pub async fn applied<T: Send + 'static>(
    api: &Api,
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    let r = blocking(f).await?;
    api.l7
        .caught_up(api.ctl.snapshot().generation, crate::l7::CATCH_UP)
        .await;
    Ok(r)
}

/// Runs blocking control-plane work off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("task failed: {e}"),
        )
    })?
}

/// The API's routes.
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/listeners", get(list_listeners).post(add_listener))
        .route(
            "/v1/listeners/{name}",
            get(get_listener)
                .patch(patch_listener)
                .delete(delete_listener),
        )
        .route(
            "/v1/listeners/{name}/backends",
            get(list_backends).post(add_backend),
        )
        .route(
            "/v1/listeners/{name}/backends/{addr}",
            axum::routing::patch(patch_backend).delete(delete_backend),
        )
        .route(
            "/v1/listeners/{name}/backends/{addr}/drain",
            post(drain_backend),
        )
        .route("/v1/sessions", get(sessions).delete(forget_sessions))
        .route("/v1/conns", get(conns))
        .route("/v1/stats", get(stats))
        .route("/v1/reload", post(reload))
        .route("/v1/config", get(running_config))
        .route("/v1/apply", post(apply))
        .route("/v1/events", get(events))
        .route("/v1/bgp", get(bgp_status))
        .route("/v1/bgp/withdraw", post(bgp_withdraw))
        .route("/v1/bgp/announce", post(bgp_announce))
        .route("/v1/console/link", post(console_link))
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                "no such endpoint (see docs/api.md)".into(),
            )
        })
        .layer(axum::middleware::map_response(json_errors))
        .with_state(api)
}

/// Every error answer is JSON (`{"error": …}`), the router's and the extractors' own (an
/// unknown method, a malformed query or path) included.
async fn json_errors(resp: Response) -> Response {
    let json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if resp.status().as_u16() < 400 || json {
        return resp;
    }
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    let mut msg = String::from_utf8_lossy(&body).trim().to_owned();
    if msg.is_empty() {
        msg = status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase();
    }
    ApiError(status, msg).into_response()
}

// ---- the operations, shared with the console ------------------------------------------------

/// Adds a listener (an HTTP listener's address must be free to bind).
pub async fn op_add_listener(api: &Api, spec: ListenerSpec) -> ApiResult<()> {
    if spec.http().is_some() {
        crate::l7::check_bindable(spec.vip)
            .await
            .map_err(|e| ApiError(StatusCode::CONFLICT, e))?;
    }
    let (ctl, src) = (api.ctl.clone(), api.source);
    let what = format!("add listener {}", spec.name);
    applied(api, move || {
        Ok(ctl
            .change(src, &what, |c| {
                if c.listeners.iter().any(|x| x.name == spec.name) {
                    return Err(ConfigError::DuplicateListener(spec.name.clone()));
                }
                c.listeners.push(spec);
                Ok(())
            })
            .map(drop)?)
    })
    .await
}

/// Applies a listener document ([`ApplyDoc`]) as one transaction: every listener it names is
/// replaced by the document's (backends included) or added; the others are left alone. All or
/// nothing: one bad listener, backend or certificate refuses the whole document. With `dry`,
/// answers what it would change and changes nothing. Returns the changes (see
/// [`crate::control::diff::diff`]).
pub async fn op_apply(api: &Api, doc: ApplyDoc, dry: bool) -> ApiResult<Vec<String>> {
    if doc.listeners.is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "no listener in the document (it holds [[listener]] tables, each with its [[listener.backend]] ones)".into(),
        ));
    }
    let mut names = HashSet::new();
    if let Some(l) = doc.listeners.iter().find(|l| !names.insert(l.name.clone())) {
        return Err(ConfigError::DuplicateListener(l.name.clone()).into());
    }
    let order = doc
        .listeners
        .iter()
        .map(|l| l.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let ctl = api.ctl.clone();
    // An HTTP listener on an address no HTTP listener holds yet must be able to bind it.
    let running = ctl.config();
    let to_bind: Vec<SocketAddr> = doc
        .listeners
        .iter()
        .filter(|l| l.http().is_some())
        .filter(|l| {
            !running
                .listeners
                .iter()
                .any(|x| x.http().is_some() && x.vip == l.vip)
        })
        .map(|l| l.vip)
        .collect();
    let merge = move |c: &mut ConfigFile| {
        for l in doc.listeners {
            match c.listeners.iter_mut().find(|x| x.name == l.name) {
                Some(x) => *x = l,
                None => c.listeners.push(l),
            }
        }
        Ok(())
    };
    if dry {
        return blocking(move || Ok(ctl.preview(merge)?)).await;
    }
    for vip in to_bind {
        crate::l7::check_bindable(vip)
            .await
            .map_err(|e| ApiError(StatusCode::CONFLICT, e))?;
    }
    let src = api.source;
    let what = format!("apply listeners {order}");
    applied(api, move || Ok(ctl.change(src, &what, merge)?)).await
}

/// Applies a JSON merge patch to a listener.
pub async fn op_patch_listener(api: &Api, name: String, p: serde_json::Value) -> ApiResult<()> {
    let (ctl, src) = (api.ctl.clone(), api.source);
    let what = format!("change listener {name}: {p}");
    applied(api, move || {
        Ok(ctl
            .change(src, &what, |c| {
                let l = find(&mut c.listeners, &name)?;
                *l = patch::apply(l, &p)?;
                Ok(())
            })
            .map(drop)?)
    })
    .await
}

pub async fn op_delete_listener(api: &Api, name: String) -> ApiResult<()> {
    let (ctl, src) = (api.ctl.clone(), api.source);
    let what = format!("remove listener {name}");
    applied(api, move || {
        Ok(ctl
            .change(src, &what, |c| {
                let before = c.listeners.len();
                c.listeners.retain(|x| x.name != name);
                if c.listeners.len() == before {
                    return Err(ConfigError::UnknownListener(name.clone()));
                }
                Ok(())
            })
            .map(drop)?)
    })
    .await
}

/// Adds `specs` to listener `name` as one transaction: all of them or, on any bad entry (a
/// duplicate, an address of the wrong family, a weight out of range), none.
pub async fn op_add_backends(api: &Api, name: String, specs: Vec<BackendSpec>) -> ApiResult<()> {
    if specs.is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "no backend to add: an empty array".into(),
        ));
    }
    let (ctl, src) = (api.ctl.clone(), api.source);
    let what = match specs.as_slice() {
        [one] => format!("add backend {} to listener {name}", one.addr),
        many => format!("add {} backends to listener {name}", many.len()),
    };
    applied(api, move || {
        Ok(ctl
            .change(src, &what, |c| {
                let l = find(&mut c.listeners, &name)?;
                for spec in specs {
                    if l.backends.iter().any(|x| x.addr == spec.addr) {
                        return Err(ConfigError::DuplicateBackend {
                            listener: name.clone(),
                            addr: spec.addr,
                        });
                    }
                    l.backends.push(spec);
                }
                Ok(())
            })
            .map(drop)?)
    })
    .await
}

/// Changes a backend's weight and/or administrative state (`maint` cuts its connections).
pub async fn op_patch_backend(
    api: &Api,
    name: String,
    addr: SocketAddr,
    patch: BackendPatch,
) -> ApiResult<()> {
    if patch.weight.is_none() && patch.state.is_none() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "nothing to change: give weight and/or state".into(),
        ));
    }
    let (ctl, src) = (api.ctl.clone(), api.source);
    let mut asked = Vec::new();
    if let Some(w) = patch.weight {
        asked.push(format!("weight {w}"));
    }
    if let Some(st) = patch.state {
        asked.push(format!("state {st}"));
    }
    let what = format!("set {} on listener {name} backend {addr}", asked.join(", "));
    applied(api, move || {
        Ok(ctl
            .change(src, &what, |c| {
                let b = find_backend(find(&mut c.listeners, &name)?, addr)?;
                if let Some(w) = patch.weight {
                    b.weight = w;
                }
                if let Some(st) = patch.state {
                    b.state = st;
                }
                Ok(())
            })
            .map(drop)?)
    })
    .await
}

pub async fn op_delete_backend(api: &Api, name: String, addr: SocketAddr) -> ApiResult<()> {
    let (ctl, src) = (api.ctl.clone(), api.source);
    let what = format!("remove backend {addr} from listener {name}");
    applied(api, move || {
        Ok(ctl
            .change(src, &what, |c| {
                let l = find(&mut c.listeners, &name)?;
                find_backend(l, addr)?;
                l.backends.retain(|x| x.addr != addr);
                Ok(())
            })
            .map(drop)?)
    })
    .await
}

pub async fn op_drain(
    api: &Api,
    name: String,
    addr: SocketAddr,
    req: DrainRequest,
) -> ApiResult<()> {
    let secs = req.timeout.unwrap_or(DEFAULT_DRAIN_SECS);
    if secs > 3600 {
        return Err(ConfigError::Range {
            field: "timeout",
            value: secs.to_string(),
            allowed: "0-3600 seconds",
        }
        .into());
    }
    let deadline = (!req.now).then(|| Instant::now() + Duration::from_secs(u64::from(secs)));
    let (ctl, src) = (api.ctl.clone(), api.source);
    applied(api, move || Ok(ctl.drain(src, &name, addr, deadline)?)).await
}

/// The listener named `name` in `specs`.
fn find<'a>(
    specs: &'a mut [ListenerSpec],
    name: &str,
) -> Result<&'a mut ListenerSpec, ConfigError> {
    specs
        .iter_mut()
        .find(|x| x.name == name)
        .ok_or_else(|| ConfigError::UnknownListener(name.into()))
}

/// The backend `addr` of listener `l`.
fn find_backend(l: &mut ListenerSpec, addr: SocketAddr) -> Result<&mut BackendSpec, ConfigError> {
    let listener = l.name.clone();
    l.backends
        .iter_mut()
        .find(|x| x.addr == addr)
        .ok_or(ConfigError::UnknownBackend { listener, addr })
}

/// The listeners as the API shows them.
pub fn listener_views(api: &Api, snap: &Snapshot) -> Vec<ListenerView> {
    snap.listeners
        .iter()
        .map(|l| {
            let serving = l.spec.http().map(|_| api.l7.serving(&l.spec.name));
            ListenerView::of(l, serving)
        })
        .collect()
}

/// Live counts of backend id `id` at the last sweep.
fn live_of(api: &Api) -> impl Fn(u32) -> Live + '_ {
    let s = api.ctl.sweep_status();
    move |id| s.last.by_backend.get(&id).cloned().unwrap_or_default()
}

/// The backends of listener `name`.
pub fn backend_views(api: &Api, name: &str) -> ApiResult<Vec<BackendView>> {
    let snap = api.ctl.snapshot();
    let l = snap
        .listener(name)
        .ok_or_else(|| ConfigError::UnknownListener(name.into()))?;
    let active = active_of(api, l);
    Ok(BackendView::of(l, &live_of(api), &|i, _| active[i]))
}

/// Active connections now of each backend of `l`, in its order: L4, the datapath's counts of
/// open verified flows; HTTP, the proxy's requests in flight.
fn active_of(api: &Api, l: &crate::control::state::ListenerState) -> Vec<u64> {
    if l.spec.http().is_some() {
        let m = api.l7.in_flight(&l.spec.name);
        return l
            .backends
            .iter()
            .map(|b| m.get(&b.spec.addr).copied().unwrap_or(0))
            .collect();
    }
    let all = api.ctl.reader().actives();
    l.backends
        .iter()
        .map(|b| {
            b.id.and_then(|id| all.get(id as usize))
                .map_or(0, |n| (*n).max(0) as u64)
        })
        .collect()
}

/// The daemon's status.
pub fn status_view(api: &Api) -> ApiResult<Status> {
    let ctl = &api.ctl;
    let info = ctl.info();
    let sweep = ctl.sweep_status();
    let tables = ctl.reader().table_info()?;
    let names = crate::datapath::TABLE_NAMES;
    let live = sweep.last.tables_live;
    Ok(Status {
        version: crate::version().into(),
        ifaces: info.ifaces.clone(),
        xdp_mode: info.xdp_mode.clone(),
        bpffs: info.bpffs.display().to_string(),
        config: info.config.display().to_string(),
        config_sha256: {
            use sha2::Digest as _;
            let d = sha2::Sha256::digest(ctl.snapshot().config.to_toml().as_bytes());
            d.iter().map(|b| format!("{b:02x}")).collect()
        },
        uptime_secs: info.started.elapsed().as_secs(),
        datapath: match ctl.detached() {
            Some(why) => format!("detached: {why}"),
            None => {
                let missing: Vec<String> = ctl
                    .interfaces()
                    .all()
                    .into_iter()
                    .filter(|i| i.state != InterfaceState::Attached)
                    .map(|i| i.name)
                    .collect();
                if missing.is_empty() {
                    "attached".into()
                } else {
                    format!("attached, but not on {}", missing.join(", "))
                }
            }
        },
        upgraded: info.upgraded.lock().map(|u| u.clone()).unwrap_or_default(),
        interfaces: ctl.interfaces().all(),
        tables: names
            .iter()
            .zip(tables)
            .zip(live)
            .map(|((n, info), live)| TableStatus {
                name: (*n).into(),
                info,
                live,
            })
            .collect(),
        flood: flood_view(api)?,
        loops: ctl.loops().all(),
        sweeper: sweeper_view(api),
        bgp: None,
    })
}

fn flood_view(api: &Api) -> ApiResult<FloodStatus> {
    let s = api.ctl.reader().shared_state()?;
    let c = api.ctl.reader().counters()?;
    let now = monotonic_ns();
    let w = api.ctl.flood();
    let get = |i: u32| c[i as usize];
    Ok(FloodStatus {
        active: now < s.flood_until_ns,
        remaining_secs: s.flood_until_ns.saturating_sub(now).div_ceil(NS_PER_SEC),
        entered: get(counter::FLOOD_ENTERED),
        transitions_on: w.entered.load(std::sync::atomic::Ordering::Relaxed),
        transitions_off: w.left.load(std::sync::atomic::Ordering::Relaxed),
        half_open_inserts: get(counter::HALF_OPEN_INSERT),
        half_open_promotions: get(counter::HALF_OPEN_PROMOTE),
        half_open_evictions: get(counter::HALF_OPEN_EVICTED),
        pending_evictions: get(counter::PENDING_EVICTED),
        half_open_misses_hashed: get(counter::HALF_OPEN_MISS_HASHED),
    })
}

fn sweeper_view(api: &Api) -> SweeperStatus {
    let s = api.ctl.sweep_status();
    SweeperStatus {
        runs: s.runs,
        conns_removed_total: s.conns_removed_total,
        half_open_removed_total: s.half_open_removed_total,
        sessions_removed_total: s.sessions_removed_total,
        pending_removed_total: s.pending_removed_total,
        last_secs_ago: s.at.map(|t| {
            SystemTime::now()
                .duration_since(t)
                .unwrap_or(Duration::ZERO)
                .as_secs()
        }),
        last_micros: s.last.micros,
    }
}

/// Counters per listener and backend, live counts, verdicts and drops.
pub fn stats_view(api: &Api) -> ApiResult<StatsResponse> {
    let ctl = &api.ctl;
    let snap = ctl.snapshot();
    let sweep = ctl.sweep_status();
    let r = ctl.reader();
    let mut listeners = Vec::new();
    for l in &snap.listeners {
        let counters = match l.id {
            Some(id) => r.listener_stats(id)?,
            None => Default::default(),
        };
        let mut backends = Vec::new();
        let active = active_of(api, l);
        for (b, active) in l.backends.iter().zip(active) {
            backends.push(BackendStats {
                active,
                addr: b.spec.addr,
                counters: match b.id {
                    Some(id) => r.backend_stats(id)?,
                    None => Default::default(),
                },
                live: b
                    .id
                    .and_then(|id| sweep.last.by_backend.get(&id).cloned())
                    .unwrap_or_default(),
            });
        }
        listeners.push(ListenerStats {
            name: l.spec.name.clone(),
            proto: l.spec.proto(),
            counters,
            live: l
                .id
                .and_then(|id| sweep.last.by_listener.get(&id).cloned())
                .unwrap_or_default(),
            backends,
        });
    }
    let raw = r.counters()?;
    let mut counters = BTreeMap::new();
    for (i, name) in counter::NAMES.iter().enumerate() {
        if !name.is_empty() {
            counters.insert((*name).to_string(), raw[i]);
        }
    }
    Ok(StatsResponse {
        listeners,
        counters,
        sweeper: sweeper_view(api),
        flood: flood_view(api)?,
        health_transitions: snap
            .transitions
            .iter()
            .map(|((l, b, to), n)| HealthTransitionCount {
                listener: l.clone(),
                backend: *b,
                to: *to,
                count: *n,
            })
            .collect(),
        http: api.l7.stats(),
    })
}

/// Filter and page of a table listing.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ListQuery {
    pub listener: Option<String>,
    /// Client address, or a prefix `a.b.c.d/n`.
    pub client: Option<String>,
    /// Backend address and port.
    pub backend: Option<String>,
    pub offset: Option<u64>,
    pub limit: Option<u64>,
}

/// Which clients a query selects: an address or a prefix of either family.
struct ClientFilter {
    net: IpAddr,
    bits: u8,
}

impl ClientFilter {
    fn parse(s: &str) -> ApiResult<Self> {
        let bad = || {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!(
                    "client {s:?} is not an IP address or prefix (a.b.c.d, a.b.c.d/n, 2001:db8::1 or 2001:db8::/n)"
                ),
            )
        };
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let net: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = bits.unwrap_or(max);
        if bits > max {
            return Err(bad());
        }
        Ok(Self { net, bits })
    }
    fn matches(&self, ip: IpAddr) -> bool {
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let m = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(n) & m == u32::from(a) & m
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let m = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(n) & m == u128::from(a) & m
            }
            _ => false,
        }
    }
}

/// A flow-table key as the listings show it.
trait KeyView: Copy {
    fn listener(&self) -> u32;
    /// The client (address and port) of a connection key.
    fn client(&self) -> SocketAddr;
}

impl KeyView for clb_common::ConnKey {
    fn listener(&self) -> u32 {
        u32::from(self.listener)
    }
    fn client(&self) -> SocketAddr {
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(ip_from_be(self.client))),
            port_from_be(self.client_port),
        )
    }
}

impl KeyView for clb_common::ConnKey6 {
    fn listener(&self) -> u32 {
        u32::from(self.listener)
    }
    fn client(&self) -> SocketAddr {
        SocketAddr::new(
            IpAddr::V6(Ipv6Addr::from(ip6_from_be(self.client))),
            port_from_be(self.client_port),
        )
    }
}

impl KeyView for clb_common::SessionKey {
    fn listener(&self) -> u32 {
        u32::from(self.listener)
    }
    fn client(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip_from_be(self.client))), 0)
    }
}

impl KeyView for clb_common::SessionKey6 {
    fn listener(&self) -> u32 {
        u32::from(self.listener)
    }
    fn client(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip6_from_be(self.client))), 0)
    }
}

struct Select {
    listener: Option<u32>,
    client: Option<ClientFilter>,
    backend: Option<SocketAddr>,
    offset: u64,
    limit: u64,
}

impl Select {
    fn new(snap: &Snapshot, q: &ListQuery) -> ApiResult<Self> {
        let listener = match &q.listener {
            None => None,
            Some(n) => Some(
                snap.listener(n)
                    .ok_or_else(|| ConfigError::UnknownListener(n.clone()))?
                    // An HTTP listener has no table entries: an id no entry carries.
                    .id
                    .unwrap_or(u32::MAX),
            ),
        };
        Ok(Self {
            listener,
            client: q.client.as_deref().map(ClientFilter::parse).transpose()?,
            backend: q.backend.as_deref().map(parse_addr).transpose()?,
            offset: q.offset.unwrap_or(0),
            limit: q.limit.unwrap_or(u64::MAX),
        })
    }
}

/// Collects a page of items: counts every match, keeps those in the window.
struct Pager<T> {
    seen: u64,
    offset: u64,
    limit: u64,
    items: Vec<T>,
}

impl<T> Pager<T> {
    fn new(s: &Select) -> Self {
        Self {
            seen: 0,
            offset: s.offset,
            limit: s.limit,
            items: Vec::new(),
        }
    }
    fn push(&mut self, make: impl FnOnce() -> T) {
        if self.seen >= self.offset && (self.items.len() as u64) < self.limit {
            self.items.push(make());
        }
        self.seen += 1;
    }
    fn page(self) -> Page<T> {
        Page {
            total: self.seen,
            offset: self.offset,
            items: self.items,
        }
    }
}

/// What a listing of flows needs while it walks the tables.
struct ConnWalk<'a> {
    snap: &'a Snapshot,
    sel: &'a Select,
    now: u64,
    pager: Pager<ConnView>,
}

impl ConnWalk<'_> {
    fn keep(&self, lid: u32, client: SocketAddr, backend: SocketAddr) -> bool {
        self.sel.listener.is_none_or(|w| w == lid)
            && self
                .sel
                .client
                .as_ref()
                .is_none_or(|c| c.matches(client.ip()))
            && self.sel.backend.is_none_or(|b| b == backend)
    }

    fn verified<K: KeyView>(&mut self, ks: &[K], vs: &[clb_common::ConnValue]) {
        for (k, v) in ks.iter().zip(vs) {
            let lid = k.listener();
            let (Some(l), Some((_, backend))) = (
                self.snap.listener_by_id(lid),
                self.snap.backend_by_id.get(&v.backend),
            ) else {
                continue;
            };
            let idle = u64::from(l.spec.idle_timeout_secs()) * NS_PER_SEC;
            if is_expired(self.now, v.last_seen_ns, conn_timeout_ns(v.state, idle)) {
                continue;
            }
            let client = k.client();
            if self.keep(lid, client, *backend) {
                let now = self.now;
                self.pager.push(|| ConnView {
                    listener: l.spec.name.clone(),
                    proto: l.spec.proto(),
                    client,
                    vip: l.spec.vip,
                    backend: *backend,
                    state: match v.state {
                        CONN_OPEN => "open",
                        CONN_FIN => "fin",
                        CONN_RST => "rst",
                        _ => "unknown",
                    }
                    .into(),
                    idle_secs: now.saturating_sub(v.last_seen_ns) / NS_PER_SEC,
                });
            }
        }
    }

    fn half_open<K: KeyView>(&mut self, ks: &[K], vs: &[clb_common::HalfOpenValue]) {
        for (k, v) in ks.iter().zip(vs) {
            let lid = k.listener();
            let (Some(l), Some((_, backend))) = (
                self.snap.listener_by_id(lid),
                self.snap.backend_by_id.get(&u32::from(v.backend)),
            ) else {
                continue;
            };
            if is_expired(self.now, v.last_seen_ns, self.snap.policy.half_open_ns) {
                continue;
            }
            let client = k.client();
            if self.keep(lid, client, *backend) {
                let now = self.now;
                self.pager.push(|| ConnView {
                    listener: l.spec.name.clone(),
                    proto: l.spec.proto(),
                    client,
                    vip: l.spec.vip,
                    backend: *backend,
                    state: match v.kind {
                        HALF_SYN => "syn",
                        HALF_ADOPTED => "adopted",
                        _ => "udp",
                    }
                    .into(),
                    idle_secs: now.saturating_sub(v.last_seen_ns) / NS_PER_SEC,
                });
            }
        }
    }
}

/// Live flows of both families (verified, then unverified), filtered and paged.
pub fn list_conns(api: &Api, q: &ListQuery) -> ApiResult<Page<ConnView>> {
    let snap = api.ctl.snapshot();
    let sel = Select::new(&snap, q)?;
    let mut w = ConnWalk {
        snap: &snap,
        sel: &sel,
        now: monotonic_ns(),
        pager: Pager::new(&sel),
    };
    let r = api.ctl.reader();
    r.scan_conns(&mut |ks, vs| {
        w.verified(ks, vs);
        true
    })?;
    r.scan_conns6(&mut |ks, vs| {
        w.verified(ks, vs);
        true
    })?;
    r.scan_half_open(&mut |ks, vs| {
        w.half_open(ks, vs);
        true
    })?;
    r.scan_half_open6(&mut |ks, vs| {
        w.half_open(ks, vs);
        true
    })?;
    Ok(w.pager.page())
}

/// What a listing of persistence entries needs while it walks the tables.
struct SessionWalk<'a> {
    snap: &'a Snapshot,
    sel: &'a Select,
    now: u64,
    pager: Pager<SessionView>,
    /// Clients with a verified entry: listed once, as verified.
    verified: HashSet<(u32, IpAddr)>,
}

impl SessionWalk<'_> {
    fn rows<K: KeyView>(&mut self, table: SessionTable, ks: &[K], vs: &[clb_common::SessionValue]) {
        for (k, v) in ks.iter().zip(vs) {
            let lid = k.listener();
            let (Some(l), Some((_, backend))) = (
                self.snap.listener_by_id(lid),
                self.snap.backend_by_id.get(&v.backend),
            ) else {
                continue;
            };
            let persist = u64::from(l.spec.persist) * NS_PER_SEC;
            if persist == 0 || is_expired(self.now, v.last_seen_ns, persist) {
                continue;
            }
            let client = k.client().ip();
            if table == SessionTable::Pending && self.verified.contains(&(lid, client)) {
                continue;
            }
            if table == SessionTable::Verified {
                self.verified.insert((lid, client));
            }
            if self.sel.listener.is_some_and(|w| w != lid)
                || self.sel.client.as_ref().is_some_and(|c| !c.matches(client))
                || self.sel.backend.is_some_and(|b| b != *backend)
            {
                continue;
            }
            let idle = self.now.saturating_sub(v.last_seen_ns);
            let full = if client.is_ipv4() { 32 } else { 128 };
            self.pager.push(|| SessionView {
                listener: l.spec.name.clone(),
                client,
                prefix: l.spec.l4().and_then(|k| k.persist_mask).unwrap_or(full),
                backend: *backend,
                idle_secs: idle / NS_PER_SEC,
                expires_in_secs: persist.saturating_sub(idle).div_ceil(NS_PER_SEC),
                pending: table == SessionTable::Pending,
            });
        }
    }
}

/// Live persistence entries of both families (verified, then pending), filtered and paged.
pub fn list_sessions(api: &Api, q: &ListQuery) -> ApiResult<Page<SessionView>> {
    let snap = api.ctl.snapshot();
    let sel = Select::new(&snap, q)?;
    let mut w = SessionWalk {
        snap: &snap,
        sel: &sel,
        now: monotonic_ns(),
        pager: Pager::new(&sel),
        verified: HashSet::new(),
    };
    let r = api.ctl.reader();
    for table in [SessionTable::Verified, SessionTable::Pending] {
        r.scan_sessions(table, &mut |ks, vs| {
            w.rows(table, ks, vs);
            true
        })?;
        r.scan_sessions6(table, &mut |ks, vs| {
            w.rows(table, ks, vs);
            true
        })?;
    }
    Ok(w.pager.page())
}

// ---- handlers -------------------------------------------------------------------------------

async fn status(State(api): State<Api>) -> ApiResult<Response> {
    let a = api.clone();
    let mut s = blocking(move || status_view(&a)).await?;
    if let Some(b) = &api.bgp {
        s.bgp = Some(b.status_live().await);
    }
    Ok(json(s))
}

fn speaker(api: &Api) -> ApiResult<&Arc<crate::bgp::Speaker>> {
    api.bgp.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "BGP is not configured (add a [bgp] table to the config file and restart the daemon)"
                .into(),
        )
    })
}

async fn bgp_status(State(api): State<Api>) -> ApiResult<Response> {
    Ok(json(speaker(&api)?.status_live().await))
}

async fn bgp_maintenance(api: &Api, on: bool) -> ApiResult<Response> {
    speaker(api)?
        .set_maintenance(&api.ctl, on)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn bgp_withdraw(State(api): State<Api>) -> ApiResult<Response> {
    bgp_maintenance(&api, true).await
}

async fn bgp_announce(State(api): State<Api>) -> ApiResult<Response> {
    bgp_maintenance(&api, false).await
}

async fn console_link(State(api): State<Api>) -> ApiResult<Response> {
    let Some(addr) = api.sign_in.console() else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "the web console is off (start the daemon with --console ADDR)".into(),
        ));
    };
    let code = api.sign_in.issue(Instant::now()).ok_or_else(|| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no randomness for a sign-in code".into(),
        )
    })?;
    // A console bound to every address is reached on loopback from here.
    let host = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    };
    Ok(json(super::types::ConsoleLink {
        url: format!("http://{host}/#sign-in={code}"),
        code,
        expires_in_secs: super::signin::CODE_TTL.as_secs(),
    }))
}

async fn list_listeners(State(api): State<Api>) -> Response {
    json(listener_views(&api, &api.ctl.snapshot()))
}

async fn get_listener(State(api): State<Api>, Path(name): Path<String>) -> ApiResult<Response> {
    let snap = api.ctl.snapshot();
    let l = snap
        .listener(&name)
        .ok_or_else(|| ConfigError::UnknownListener(name.clone()))?;
    let serving = l.spec.http().map(|_| api.l7.serving(&name));
    Ok(json(ListenerView::of(l, serving)))
}

async fn add_listener(State(api): State<Api>, b: Bytes) -> ApiResult<Response> {
    let spec: ListenerSpec = body(&b)?;
    op_add_listener(&api, spec).await?;
    Ok(StatusCode::CREATED.into_response())
}

async fn patch_listener(
    State(api): State<Api>,
    Path(name): Path<String>,
    b: Bytes,
) -> ApiResult<Response> {
    let p: serde_json::Value = body(&b)?;
    op_patch_listener(&api, name, p).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_listener(State(api): State<Api>, Path(name): Path<String>) -> ApiResult<Response> {
    op_delete_listener(&api, name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_backends(State(api): State<Api>, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(json(backend_views(&api, &name)?))
}

/// A `POST .../backends` body: one backend object, or an array of them.
pub fn backends_body(b: &Bytes) -> ApiResult<Vec<BackendSpec>> {
    let v: serde_json::Value = body(b)?;
    let bad = |e: serde_json::Error, at: String| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid request body{at}: {e}"),
        )
    };
    match v {
        serde_json::Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, x)| serde_json::from_value(x).map_err(|e| bad(e, format!(" (entry {i})"))))
            .collect(),
        one => Ok(vec![
            serde_json::from_value(one).map_err(|e| bad(e, String::new()))?,
        ]),
    }
}

async fn add_backend(
    State(api): State<Api>,
    Path(name): Path<String>,
    b: Bytes,
) -> ApiResult<Response> {
    let specs = backends_body(&b)?;
    op_add_backends(&api, name, specs).await?;
    Ok(StatusCode::CREATED.into_response())
}

async fn patch_backend(
    State(api): State<Api>,
    Path((name, addr)): Path<(String, String)>,
    b: Bytes,
) -> ApiResult<Response> {
    let addr = parse_addr(&addr)?;
    let p: BackendPatch = body(&b)?;
    op_patch_backend(&api, name, addr, p).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_backend(
    State(api): State<Api>,
    Path((name, addr)): Path<(String, String)>,
) -> ApiResult<Response> {
    let addr = parse_addr(&addr)?;
    op_delete_backend(&api, name, addr).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn drain_backend(
    State(api): State<Api>,
    Path((name, addr)): Path<(String, String)>,
    b: Bytes,
) -> ApiResult<Response> {
    let addr = parse_addr(&addr)?;
    let req: DrainRequest = if b.is_empty() {
        DrainRequest::default()
    } else {
        body(&b)?
    };
    op_drain(&api, name, addr, req).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn sessions(State(api): State<Api>, Query(q): Query<ListQuery>) -> ApiResult<Response> {
    let a = api.clone();
    Ok(json(blocking(move || list_sessions(&a, &q)).await?))
}

/// `DELETE /v1/sessions?listener=L[&client=ADDR[/PREFIX]]`: forgets persisted clients.
async fn forget_sessions(
    State(api): State<Api>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Response> {
    let Some(listener) = q.listener.clone() else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "DELETE /v1/sessions needs ?listener=NAME (and &client=ADDR or ADDR/PREFIX to \
             forget only those clients)"
                .into(),
        ));
    };
    if q.backend.is_some() || q.offset.is_some() || q.limit.is_some() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "DELETE /v1/sessions takes only listener and client".into(),
        ));
    }
    let clients = match q.client.as_deref() {
        Some(c) => {
            let f = ClientFilter::parse(c)?;
            Some((f.net, f.bits))
        }
        None => None,
    };
    let (ctl, src) = (api.ctl.clone(), api.source);
    let removed = blocking(move || Ok(ctl.forget_sessions(src, &listener, clients)?)).await?;
    Ok(json(ForgetAnswer { removed }))
}

async fn conns(State(api): State<Api>, Query(q): Query<ListQuery>) -> ApiResult<Response> {
    let a = api.clone();
    Ok(json(blocking(move || list_conns(&a, &q)).await?))
}

async fn stats(State(api): State<Api>) -> ApiResult<Response> {
    let a = api.clone();
    Ok(json(blocking(move || stats_view(&a)).await?))
}

/// `POST /v1/reload[?dry_run=true]`: what the reload changed (or, dry, would change).
async fn reload(State(api): State<Api>, Query(q): Query<ReloadQuery>) -> ApiResult<Response> {
    let ctl = api.ctl.clone();
    let dry = q.dry_run.unwrap_or(false);
    let changes = if dry {
        blocking(move || Ok(ctl.reload_dry_run()?)).await?
    } else {
        applied(&api, move || Ok(ctl.reload()?)).await?
    };
    Ok(json(ReloadAnswer {
        applied: !dry,
        changes,
    }))
}

/// `POST /v1/apply[?dry_run=true]`: a listener document (see [`op_apply`]).
async fn apply(
    State(api): State<Api>,
    Query(q): Query<ReloadQuery>,
    b: Bytes,
) -> ApiResult<Response> {
    let doc: ApplyDoc = body(&b)?;
    let dry = q.dry_run.unwrap_or(false);
    let changes = op_apply(&api, doc, dry).await?;
    Ok(json(ReloadAnswer {
        applied: !dry,
        changes,
    }))
}

/// `GET /v1/config`: the running configuration as the config file spells it (TOML).
async fn running_config(State(api): State<Api>) -> ApiResult<Response> {
    let ctl = api.ctl.clone();
    let text = blocking(move || Ok(ctl.config().to_toml())).await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/toml")],
        text,
    )
        .into_response())
}

/// `GET /v1/events[?limit=N]`: the last audit events (default 50, at most
/// [`crate::control::audit::KEPT`]), oldest first.
async fn events(State(api): State<Api>, Query(q): Query<EventsQuery>) -> ApiResult<Response> {
    let kept = crate::control::audit::KEPT as u64;
    let n = q.limit.unwrap_or(50);
    if n == 0 || n > kept {
        return Err(ConfigError::Range {
            field: "limit",
            value: n.to_string(),
            allowed: "1-512",
        }
        .into());
    }
    Ok(json(api.ctl.audit().last(n as usize)))
}

#[derive(Debug, Default, Deserialize)]
struct ReloadQuery {
    dry_run: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
struct EventsQuery {
    limit: Option<u64>,
}
