//! The web console (`clb daemon --console ADDR`): one page and its script and style, embedded
//! in the binary, over a small JSON API under `/api/` that calls the same operations as the
//! daemon's API (so every change is one control-plane transaction, validated the same way and
//! written to the config file).
//!
//! Security:
//! - A token (32 random bytes, hex) is created at first start in the state directory with mode
//!   0600, or read from `--console-token-file`. `POST /api/login {"token"}` exchanges it for a
//!   session: an `HttpOnly; SameSite=Strict` cookie and a CSRF token the page sends back in
//!   `X-CSRF-Token` with every change. Sessions expire after [`SESSION_IDLE`] without use (and
//!   after [`SESSION_MAX`] in any case); `POST /api/logout` ends one.
//! - Every change needs a live session, the CSRF token, and (when the browser sends one) an
//!   `Origin` equal to the page's; no GET changes anything.
//! - Failed logins are slowed per client address: after [`LOGIN_FAILURES`] in a row each
//!   next attempt waits out a backoff ([`login_backoff`], 1 s doubling to [`LOGIN_WINDOW`])
//!   and is answered 429 without checking the token until then. Whoever can use the API
//!   socket is never locked out: `clb console link` gives a one-time sign-in link
//!   ([`crate::api::signin`]), which no failure count stops.
//! - Every response carries a Content-Security-Policy that allows only the page's own script,
//!   style and API ([`CSP`]), and `X-Frame-Options: DENY`, `X-Content-Type-Options: nosniff`,
//!   `Referrer-Policy: no-referrer`; API answers are `Cache-Control: no-store`.

mod series;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use axum::{
    Router,
    body::Bytes,
    extract::{ConnectInfo, Path as UrlPath, Query, Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize};

pub use self::series::{SERIES_EVERY, Series, run as sample};
use crate::{
    api::{
        server::{
            Api, ApiError, ApiResult, ListQuery, backend_views, backends_body, blocking, body,
            list_conns, list_sessions, listener_views, op_add_backends, op_delete_backend,
            op_drain, op_patch_backend, op_patch_listener, parse_addr, status_view,
        },
        types::{BackendPatch, DrainRequest, ErrorBody},
    },
    control::lock,
};

/// The Content-Security-Policy of every console response.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
/// The session cookie's name.
pub const COOKIE: &str = "clb_console";
/// A session ends after this long without a request.
pub const SESSION_IDLE: Duration = Duration::from_secs(30 * 60);
/// ... and after this long in any case.
pub const SESSION_MAX: Duration = Duration::from_secs(12 * 3600);
/// Failed logins in a row a client address may make before [`login_backoff`] slows it.
pub const LOGIN_FAILURES: u32 = 5;
/// The longest backoff; a client address's failures are forgotten this long after its last.
pub const LOGIN_WINDOW: Duration = Duration::from_secs(60);
/// Client addresses whose failed sign-ins are remembered at once.
pub const MAX_FAILING_CLIENTS: usize = 4096;

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

struct Session {
    csrf: String,
    created: Instant,
    last: Instant,
}

/// The console's state.
pub struct Console {
    api: Api,
    token: String,
    idle: Duration,
    sessions: Mutex<HashMap<String, Session>>,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    series: Arc<Series>,
}

/// Options of the console.
pub struct ConsoleOptions {
    /// Session idle timeout ([`SESSION_IDLE`] by default; tests shorten it).
    pub session_idle: Duration,
}

impl Default for ConsoleOptions {
    fn default() -> Self {
        Self {
            session_idle: SESSION_IDLE,
        }
    }
}

fn random_hex(n: usize) -> anyhow::Result<String> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("getrandom: {e}"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The login token: read from `file` (which must exist), or from `state_dir/console.token`,
/// created there (mode 0600) at first start.
pub fn load_or_create_token(file: Option<&Path>, state_dir: &Path) -> anyhow::Result<String> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    if let Some(f) = file {
        let t = std::fs::read_to_string(f)
            .with_context(|| format!("reading the console token file {}", f.display()))?;
        let t = t.trim().to_owned();
        anyhow::ensure!(
            t.len() >= 16,
            "the console token in {} is shorter than 16 characters",
            f.display()
        );
        return Ok(t);
    }
    let path = state_dir.join("console.token");
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
        Ok(_) => anyhow::bail!("{} is empty; remove it to get a new token", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let token = random_hex(32)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(format!("{token}\n").as_bytes())?;
    f.sync_all()?;
    Ok(token)
}

impl Console {
    pub fn new(api: Api, token: String, series: Arc<Series>, opts: ConsoleOptions) -> Arc<Self> {
        Arc::new(Self {
            api: Api {
                source: crate::control::audit::Source::Console,
                ..api
            },
            token,
            idle: opts.session_idle,
            sessions: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            series,
        })
    }

    /// The session named by the request's cookie, refreshed, if it is live: its CSRF token.
    fn session(&self, headers: &HeaderMap) -> Option<String> {
        let sid = cookie(headers)?;
        let now = Instant::now();
        let mut s = lock(&self.sessions);
        s.retain(|_, v| now - v.last < self.idle && now - v.created < SESSION_MAX);
        let v = s.get_mut(&sid)?;
        v.last = now;
        Some(v.csrf.clone())
    }
}

/// Compares secrets in time independent of where they differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The session id in the request's `Cookie` header.
fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == COOKIE).then(|| v.to_owned())
        })
}

fn err(status: StatusCode, msg: &str) -> Response {
    (
        status,
        axum::Json(ErrorBody {
            error: msg.to_owned(),
        }),
    )
        .into_response()
}

/// The console's routes.
pub fn router(c: Arc<Console>) -> Router {
    let api = Router::new()
        .route("/session", get(session))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/status", get(status))
        .route("/listeners", get(listeners))
        .route("/listeners/{name}", axum::routing::patch(patch_listener))
        .route("/listeners/{name}/backends", post(add_backend))
        .route(
            "/listeners/{name}/backends/{addr}",
            axum::routing::patch(set_weight).delete(delete_backend),
        )
        .route("/listeners/{name}/backends/{addr}/drain", post(drain))
        .route("/sessions", get(sessions))
        .route("/conns", get(conns))
        .route("/series", get(series))
        .fallback(|| async { err(StatusCode::NOT_FOUND, "no such console endpoint") })
        .layer(middleware::from_fn_with_state(c.clone(), guard));
    Router::new()
        .route(
            "/",
            get(|| async { page(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/static/app.js",
            get(|| async { page(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/static/app.css",
            get(|| async { page(APP_CSS, "text/css; charset=utf-8") }),
        )
        .nest("/api", api)
        .layer(middleware::from_fn(headers))
        .with_state(c)
}

fn page(body: &'static str, ctype: &'static str) -> Response {
    ([(header::CONTENT_TYPE, ctype)], body).into_response()
}

/// The security headers of every response.
async fn headers(req: Request, next: Next) -> Response {
    let api = req.uri().path().starts_with("/api/");
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if api {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

/// Authentication and CSRF for `/api/*`: login and the session probe are open; everything
/// else needs a live session, and every method but GET its CSRF token and a same-origin
/// `Origin` (when sent).
async fn guard(State(c): State<Arc<Console>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    if path == "/login" || path == "/session" {
        return next.run(req).await;
    }
    let Some(csrf) = c.session(req.headers()) else {
        return err(
            StatusCode::UNAUTHORIZED,
            "not signed in, or the session expired: sign in again",
        );
    };
    if req.method() != Method::GET {
        let sent = req
            .headers()
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if sent.is_empty() {
            return err(StatusCode::FORBIDDEN, "missing X-CSRF-Token header");
        }
        if !ct_eq(sent.as_bytes(), csrf.as_bytes()) {
            return err(StatusCode::FORBIDDEN, "wrong X-CSRF-Token");
        }
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("");
            let ok = origin
                .to_str()
                .ok()
                .and_then(|o| o.split_once("://"))
                .is_some_and(|(_, rest)| rest == host);
            if !ok {
                return err(StatusCode::FORBIDDEN, "cross-origin request refused");
            }
        }
    }
    next.run(req).await
}

#[derive(Serialize)]
struct CsrfBody {
    csrf: String,
}

async fn session(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    match c.session(&headers) {
        Some(csrf) => axum::Json(CsrfBody { csrf }).into_response(),
        None => err(StatusCode::UNAUTHORIZED, "not signed in"),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    /// The console token.
    #[serde(default)]
    token: Option<String>,
    /// Or a one-time code from `clb console link`.
    #[serde(default)]
    code: Option<String>,
}

/// How long a client address that failed `failures` times in a row waits before its next
/// sign-in is looked at: nothing for the first [`LOGIN_FAILURES`], then 1 s doubling up to
/// [`LOGIN_WINDOW`].
pub fn login_backoff(failures: u32) -> Duration {
    match failures.checked_sub(LOGIN_FAILURES) {
        None => Duration::ZERO,
        Some(n) => Duration::from_secs(1u64 << n.min(6)).min(LOGIN_WINDOW),
    }
}

async fn login(
    State(c): State<Arc<Console>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    b: Bytes,
) -> Response {
    let now = Instant::now();
    let login = match body::<LoginBody>(&b) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    match (login.token, login.code) {
        // A one-time code is never rate limited: only the API socket's user gets one, and
        // 256 random bits are not guessed.
        (None, Some(code)) => {
            if !c.api.sign_in.redeem(code.trim(), now) {
                tracing::warn!(client = %peer.ip(), "console: unknown or used sign-in code");
                return err(
                    StatusCode::UNAUTHORIZED,
                    "unknown, used or expired sign-in code (clb console link makes a new one)",
                );
            }
        }
        (Some(token), None) => {
            {
                let mut f = lock(&c.failures);
                f.retain(|_, (_, last)| now - *last < LOGIN_WINDOW);
                if let Some((n, last)) = f.get(&peer.ip()) {
                    let wait = login_backoff(*n).saturating_sub(now - *last);
                    if !wait.is_zero() {
                        return err(
                            StatusCode::TOO_MANY_REQUESTS,
                            &format!(
                                "too many failed sign-ins from {}: try again in {} s, or sign in \
                                 with a link from `clb console link`",
                                peer.ip(),
                                wait.as_secs() + 1
                            ),
                        );
                    }
                }
            }
            if !ct_eq(token.trim().as_bytes(), c.token.as_bytes()) {
                let mut f = lock(&c.failures);
                // Bounded: many addresses failing at once forget the oldest first.
                while f.len() >= MAX_FAILING_CLIENTS && !f.contains_key(&peer.ip()) {
                    let Some(old) = f.iter().min_by_key(|(_, (_, t))| *t).map(|(ip, _)| *ip) else {
                        break;
                    };
                    f.remove(&old);
                }
                let e = f.entry(peer.ip()).or_insert((0, now));
                e.0 += 1;
                e.1 = now;
                tracing::warn!(client = %peer.ip(), failures = e.0, "console: failed sign-in");
                return err(StatusCode::UNAUTHORIZED, "wrong token");
            }
            lock(&c.failures).remove(&peer.ip());
        }
        _ => {
            return err(StatusCode::BAD_REQUEST, "give either \"token\" or \"code\"");
        }
    }
    let (Ok(sid), Ok(csrf)) = (random_hex(32), random_hex(32)) else {
        return err(StatusCode::INTERNAL_SERVER_ERROR, "no randomness");
    };
    lock(&c.sessions).insert(
        sid.clone(),
        Session {
            csrf: csrf.clone(),
            created: now,
            last: now,
        },
    );
    tracing::info!(client = %peer.ip(), "console: signed in");
    let cookie = format!(
        "{COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_MAX.as_secs()
    );
    let mut r = axum::Json(CsrfBody { csrf }).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn logout(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if let Some(sid) = cookie(&headers) {
        lock(&c.sessions).remove(&sid);
    }
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("clb_console=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

fn json<T: Serialize>(v: T) -> Response {
    axum::Json(v).into_response()
}

async fn status(State(c): State<Arc<Console>>) -> ApiResult<Response> {
    let a = c.api.clone();
    let mut s = blocking(move || status_view(&a)).await?;
    if let Some(b) = &c.api.bgp {
        s.bgp = Some(b.status_live().await);
    }
    Ok(json(s))
}

/// Listeners with their backends' states (health, since when, drain, live entries).
async fn listeners(State(c): State<Arc<Console>>) -> ApiResult<Response> {
    let a = c.api.clone();
    let out = blocking(move || {
        let snap = a.ctl.snapshot();
        let mut v = Vec::new();
        for l in listener_views(&a, &snap) {
            let backends = backend_views(&a, &l.name)?;
            let mut j = serde_json::to_value(&l)
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            j["backends"] = serde_json::to_value(backends)
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            v.push(j);
        }
        Ok(v)
    })
    .await?;
    Ok(json(out))
}

async fn patch_listener(
    State(c): State<Arc<Console>>,
    UrlPath(name): UrlPath<String>,
    b: Bytes,
) -> ApiResult<Response> {
    let p: serde_json::Value = body(&b)?;
    op_patch_listener(&c.api, name, p).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn add_backend(
    State(c): State<Arc<Console>>,
    UrlPath(name): UrlPath<String>,
    b: Bytes,
) -> ApiResult<Response> {
    let specs = backends_body(&b)?;
    op_add_backends(&c.api, name, specs).await?;
    Ok(StatusCode::CREATED.into_response())
}

async fn set_weight(
    State(c): State<Arc<Console>>,
    UrlPath((name, addr)): UrlPath<(String, String)>,
    b: Bytes,
) -> ApiResult<Response> {
    let addr = parse_addr(&addr)?;
    let p: BackendPatch = body(&b)?;
    op_patch_backend(&c.api, name, addr, p).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_backend(
    State(c): State<Arc<Console>>,
    UrlPath((name, addr)): UrlPath<(String, String)>,
) -> ApiResult<Response> {
    let addr = parse_addr(&addr)?;
    op_delete_backend(&c.api, name, addr).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn drain(
    State(c): State<Arc<Console>>,
    UrlPath((name, addr)): UrlPath<(String, String)>,
    b: Bytes,
) -> ApiResult<Response> {
    let addr = parse_addr(&addr)?;
    let req: DrainRequest = if b.is_empty() {
        DrainRequest::default()
    } else {
        body(&b)?
    };
    op_drain(&c.api, name, addr, req).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn sessions(
    State(c): State<Arc<Console>>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Response> {
    let a = c.api.clone();
    Ok(json(blocking(move || list_sessions(&a, &q)).await?))
}

async fn conns(State(c): State<Arc<Console>>, Query(q): Query<ListQuery>) -> ApiResult<Response> {
    let a = c.api.clone();
    Ok(json(blocking(move || list_conns(&a, &q)).await?))
}

async fn series(State(c): State<Arc<Console>>) -> Response {
    json(c.series.view())
}

/// Serves the console on `l` until the daemon stops.
pub async fn serve(l: tokio::net::TcpListener, c: Arc<Console>) -> std::io::Result<()> {
    axum::serve(
        l,
        router(c).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
}
