//! The daemon's local API: JSON over HTTP/1.1 on a Unix socket (documented in `docs/api.md`).
//!
//! Every change is validated as a whole new configuration before anything is touched (see
//! [`crate::balancer::Balancer::apply`]); a refused request answers 4xx with a message naming
//! the field and allowed range and changes neither the maps nor the config file.

use std::{
    net::SocketAddrV4,
    sync::Arc,
    time::{Duration, Instant, UNIX_EPOCH},
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    balancer::{BalancerError, ConnView, Health, SessionView, Stats},
    daemon::Shared,
    model::{BackendSpec, CheckKind, ConfigError, HealthCheckSpec, ListenerSpec, Proto},
};

// ---- wire types (shared with the CLI) -------------------------------------------------------

/// A listener as `GET /v1/listeners` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerView {
    pub name: String,
    pub vip: SocketAddrV4,
    pub proto: Proto,
    /// Persistence, seconds (0 = off).
    pub persist: u32,
    /// Connection idle timeout in effect, seconds.
    pub idle_timeout: u32,
    /// HTTP listeners: keep-alive idle timeout in effect, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_timeout: Option<u32>,
    /// HTTP listeners: persistence cookie name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie_name: Option<String>,
    pub health_check: HealthCheckSpec,
    pub backends: Vec<BackendSpec>,
    /// Every backend that could take traffic is unhealthy, so all of them get it.
    pub all_backends_unhealthy: bool,
}

/// A backend as `GET /v1/listeners/{name}/backends` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendView {
    pub addr: SocketAddrV4,
    pub weight: u32,
    pub health: Health,
    /// Unix time (s) of the last health change (or of the backend's creation).
    pub health_since: u64,
    /// Takes new connections and new persisted clients.
    pub accepting: bool,
    pub draining: bool,
    /// Seconds until a drain cuts the remaining connections; `None` when not draining or
    /// already cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_remaining_secs: Option<u64>,
    /// Live connection-table entries naming this backend (L4 listeners).
    pub conns: u64,
}

/// `POST /v1/listeners` body: a listener, optionally with backends.
pub type NewListener = ListenerSpec;

/// `PATCH /v1/listeners/{name}` body: only the fields to change.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persist: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_timeout: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckPatch>,
}

/// Health-check fields to change.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckPatch {
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

impl ListenerPatch {
    /// Applies the fields that are set.
    pub fn apply(self, l: &mut ListenerSpec) {
        if let Some(v) = self.persist {
            l.persist = v;
        }
        if let Some(v) = self.idle_timeout {
            l.idle_timeout = Some(v);
        }
        if let Some(v) = self.keepalive_timeout {
            l.keepalive_timeout = Some(v);
        }
        if let Some(v) = self.cookie_name {
            l.cookie_name = Some(v);
        }
        if let Some(h) = self.health_check {
            h.apply(&mut l.health_check);
        }
    }
}

impl HealthCheckPatch {
    /// Applies the fields that are set.
    pub fn apply(self, h: &mut HealthCheckSpec) {
        if let Some(v) = self.kind {
            h.kind = v;
        }
        if let Some(v) = self.interval {
            h.interval = v;
        }
        if let Some(v) = self.timeout {
            h.timeout = v;
        }
        if let Some(v) = self.healthy_threshold {
            h.healthy_threshold = v;
        }
        if let Some(v) = self.unhealthy_threshold {
            h.unhealthy_threshold = v;
        }
        if self.port.is_some() {
            h.port = self.port;
        }
        if let Some(v) = self.path {
            h.path = v;
        }
        if let Some(v) = self.status {
            h.status = v;
        }
    }
}

/// `POST /v1/listeners/{name}/backends` body.
pub type NewBackend = BackendSpec;

/// `PATCH /v1/listeners/{name}/backends/{addr}` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendPatch {
    pub weight: u32,
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

/// `GET /v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub ifaces: Vec<String>,
    pub xdp_mode: String,
    pub bpffs: String,
    pub config: String,
    pub uptime_secs: u64,
    pub sweeper: SweeperStatus,
}

/// What the sweeper has done.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SweeperStatus {
    pub runs: u64,
    pub conns_removed_total: u64,
    pub sessions_removed_total: u64,
    pub last: crate::balancer::SweepReport,
}

/// `GET /v1/stats`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatsResponse {
    #[serde(flatten)]
    pub stats: Stats,
    pub sweeper: SweeperStatus,
    /// Health transitions since the daemon started: "listener backend to" → count.
    pub health_transitions: Vec<HealthTransitionCount>,
    /// HTTP listeners' counters.
    #[serde(default)]
    pub http: Vec<crate::l7::L7ListenerStats>,
    /// Where "current_conns" comes from.
    pub current_conns_source: String,
}

/// Count of health transitions of one backend to one state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HealthTransitionCount {
    pub listener: String,
    pub backend: SocketAddrV4,
    pub to: Health,
    pub count: u64,
}

/// An error answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

// ---- server ---------------------------------------------------------------------------------

/// An error with its HTTP status.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<BalancerError> for ApiError {
    fn from(e: BalancerError) -> Self {
        match e {
            BalancerError::Config(c) => c.into(),
            BalancerError::Dataplane(d) => {
                ApiError(StatusCode::INTERNAL_SERVER_ERROR, d.to_string())
            }
        }
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

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// JSON body parsing with a 400 and serde's message (field, line, column) on failure.
fn body<T: DeserializeOwned>(b: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(b).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    })
}

fn parse_addr(s: &str) -> ApiResult<SocketAddrV4> {
    s.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("backend {s:?} is not an IPv4 address and port (IP:PORT)"),
        )
    })
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
fn find_backend(l: &mut ListenerSpec, addr: SocketAddrV4) -> Result<&mut BackendSpec, ConfigError> {
    let listener = l.name.clone();
    l.backends
        .iter_mut()
        .find(|x| x.addr == addr)
        .ok_or(ConfigError::UnknownBackend { listener, addr })
}

fn json<T: Serialize>(v: T) -> Response {
    axum::Json(v).into_response()
}

/// Runs blocking control-plane work off the async threads.
async fn blocking<T: Send + 'static>(
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
pub fn router(shared: Arc<Shared>) -> Router {
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
        .route("/v1/sessions", get(sessions))
        .route("/v1/conns", get(conns))
        .route("/v1/stats", get(stats))
        .route("/v1/reload", post(reload))
        .with_state(shared)
}

async fn status(State(s): State<Arc<Shared>>) -> Response {
    json(s.status())
}

fn listener_view(l: &crate::balancer::Listener) -> ListenerView {
    let spec = l.full_spec();
    ListenerView {
        name: spec.name.clone(),
        vip: spec.vip,
        proto: spec.proto,
        persist: spec.persist,
        idle_timeout: spec.idle_timeout_secs(),
        keepalive_timeout: (spec.proto == Proto::Http).then(|| spec.keepalive_secs()),
        cookie_name: (spec.proto == Proto::Http).then(|| spec.cookie().to_owned()),
        health_check: spec.health_check.clone(),
        backends: spec.backends.clone(),
        all_backends_unhealthy: l.all_unhealthy(),
    }
}

async fn list_listeners(State(s): State<Arc<Shared>>) -> ApiResult<Response> {
    let lb = s.lb.lock().expect("balancer lock");
    Ok(json(
        lb.listeners()
            .values()
            .map(listener_view)
            .collect::<Vec<_>>(),
    ))
}

async fn get_listener(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let lb = s.lb.lock().expect("balancer lock");
    let l = lb
        .listeners()
        .get(&name)
        .ok_or_else(|| ConfigError::UnknownListener(name.clone()))?;
    Ok(json(listener_view(l)))
}

async fn add_listener(State(s): State<Arc<Shared>>, b: Bytes) -> ApiResult<Response> {
    let spec: NewListener = body(&b)?;
    blocking(move || {
        s.change(|specs| {
            if specs.iter().any(|x| x.name == spec.name) {
                return Err(ConfigError::DuplicateListener(spec.name.clone()));
            }
            specs.push(spec);
            Ok(())
        })
    })
    .await?;
    Ok(StatusCode::CREATED.into_response())
}

async fn patch_listener(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    b: Bytes,
) -> ApiResult<Response> {
    let p: ListenerPatch = body(&b)?;
    blocking(move || {
        s.change(|specs| {
            p.apply(find(specs, &name)?);
            Ok(())
        })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_listener(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    blocking(move || {
        s.change(|specs| {
            let before = specs.len();
            specs.retain(|x| x.name != name);
            if specs.len() == before {
                return Err(ConfigError::UnknownListener(name.clone()));
            }
            Ok(())
        })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_backends(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let views = blocking(move || {
        let lb = s.lb.lock().expect("balancer lock");
        let l = lb
            .listeners()
            .get(&name)
            .ok_or_else(|| ConfigError::UnknownListener(name.clone()))?;
        let counts = if l.id.is_some() {
            lb.conn_counts()?
        } else {
            Default::default()
        };
        let accepting = l.accepting();
        let now = Instant::now();
        Ok(l.backends
            .iter()
            .zip(accepting)
            .map(|(b, acc)| BackendView {
                addr: b.spec.addr,
                weight: b.spec.weight,
                health: b.health,
                health_since: b
                    .health_since
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or(Duration::ZERO)
                    .as_secs(),
                accepting: acc,
                draining: b.drain.is_some(),
                drain_remaining_secs: b
                    .drain
                    .and_then(|d| d.deadline)
                    .map(|t| t.saturating_duration_since(now).as_secs()),
                conns: counts.get(&b.id).copied().unwrap_or(0),
            })
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(json(views))
}

async fn add_backend(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    b: Bytes,
) -> ApiResult<Response> {
    let spec: NewBackend = body(&b)?;
    blocking(move || {
        s.change(|specs| {
            let l = find(specs, &name)?;
            if l.backends.iter().any(|x| x.addr == spec.addr) {
                return Err(ConfigError::DuplicateBackend {
                    listener: name.clone(),
                    addr: spec.addr,
                });
            }
            l.backends.push(spec);
            Ok(())
        })
    })
    .await?;
    Ok(StatusCode::CREATED.into_response())
}

async fn patch_backend(
    State(s): State<Arc<Shared>>,
    Path((name, addr)): Path<(String, String)>,
    b: Bytes,
) -> ApiResult<Response> {
    let addr = parse_addr(&addr)?;
    let p: BackendPatch = body(&b)?;
    blocking(move || {
        s.change(|specs| {
            find_backend(find(specs, &name)?, addr)?.weight = p.weight;
            Ok(())
        })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_backend(
    State(s): State<Arc<Shared>>,
    Path((name, addr)): Path<(String, String)>,
) -> ApiResult<Response> {
    let addr = parse_addr(&addr)?;
    blocking(move || {
        s.change(|specs| {
            let l = find(specs, &name)?;
            find_backend(l, addr)?;
            l.backends.retain(|x| x.addr != addr);
            Ok(())
        })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn drain_backend(
    State(s): State<Arc<Shared>>,
    Path((name, addr)): Path<(String, String)>,
    b: Bytes,
) -> ApiResult<Response> {
    let addr = parse_addr(&addr)?;
    let req: DrainRequest = if b.is_empty() {
        DrainRequest::default()
    } else {
        body(&b)?
    };
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
    blocking(move || {
        let mut lb = s.lb.lock().expect("balancer lock");
        lb.drain(&name, addr, deadline)?;
        drop(lb);
        s.changed();
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct ListenerFilter {
    listener: Option<String>,
}

async fn sessions(
    State(s): State<Arc<Shared>>,
    Query(q): Query<ListenerFilter>,
) -> ApiResult<Response> {
    let v: Vec<SessionView> = blocking(move || {
        let lb = s.lb.lock().expect("balancer lock");
        Ok(lb.sessions(q.listener.as_deref())?)
    })
    .await?;
    Ok(json(v))
}

async fn conns(
    State(s): State<Arc<Shared>>,
    Query(q): Query<ListenerFilter>,
) -> ApiResult<Response> {
    let v: Vec<ConnView> = blocking(move || {
        let lb = s.lb.lock().expect("balancer lock");
        Ok(lb.conns(q.listener.as_deref())?)
    })
    .await?;
    Ok(json(v))
}

async fn stats(State(s): State<Arc<Shared>>) -> ApiResult<Response> {
    let sh = s.clone();
    let st = blocking(move || Ok(sh.lb.lock().expect("balancer lock").stats()?)).await?;
    Ok(json(s.stats_response(st).await))
}

async fn reload(State(s): State<Arc<Shared>>) -> ApiResult<Response> {
    blocking(move || s.reload().map_err(ApiError::from)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
