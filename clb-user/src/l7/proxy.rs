//! One HTTP listener's proxying: connections and requests.
//!
//! - No valid persistence cookie: weighted round robin over the accepting backends, and the
//!   response gets `Set-Cookie: NAME=VALUE; Max-Age=persist; Path=/; HttpOnly` plus
//!   `Cache-Control: no-cache="set-cookie"`. A valid cookie of a present, accepting backend
//!   routes there; an expired, tampered or unknown one is ignored (rescheduled). The cookie
//!   is refreshed once half its lifetime has passed, so an active client stays.
//! - The persistence cookie is removed before the request reaches the backend (`indirect`);
//!   every other cookie passes byte for byte, whatever bytes it holds.
//! - Hop-by-hop headers are dropped both ways; `X-Forwarded-For`, `X-Forwarded-Proto` and
//!   `Forwarded` are added. Bodies stream through.
//! - Limits: request head 16 KiB (431), body [`MAX_BODY`] (413), two `Host` headers (400), a
//!   malformed request body (400, the client's fault, not counted against the backend); headers
//!   must arrive within [`HEADER_TIMEOUT`]; idle kept-alive connections close after the
//!   keep-alive timeout (0: after each response); a client that stops reading a response, or a
//!   backend that stops answering, is cut after the listener's I/O timeout (504 when no answer
//!   began); connections beyond the listener's cap, or beyond the daemon's budget of file
//!   descriptors for HTTP clients ([`ConnBudget`]), get 503 and are closed.
//! - `OPTIONS *` is answered by the proxy itself.
//! - A backend that cannot be reached gives 502 (no retry: the request may not be idempotent).

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use http_body_util::{BodyExt as _, Full, Limited, combinators::BoxBody};
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode,
    body::{Bytes, Frame, Incoming},
    header::{self, HeaderName, HeaderValue},
    service::service_fn,
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{debug, warn};

use super::{L7Config, cookie::CookieKey};
use crate::{
    control::lock,
    sched::wrr::{Weighted, smooth_wrr},
};

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body.
pub const MAX_BODY: usize = 16 * 1024 * 1024;
/// Time a client has to send a request's headers once it started sending them (or once it
/// connected).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Connect timeout towards backends.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Idle kept-alive connections kept per backend.
const POOL_IDLE_PER_BACKEND: usize = 256;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// What a running listener serves from; replaced as a whole on every change.
pub struct Snapshot {
    pub cfg: L7Config,
    /// Smooth-WRR sequence of indices into `cfg.backends` (accepting ones only).
    schedule: Vec<usize>,
    /// Cookie tag of each backend.
    tags: Vec<[u8; 8]>,
}

impl Snapshot {
    pub fn new(cfg: L7Config, key: &CookieKey) -> Self {
        let weighted: Vec<Weighted> = cfg
            .backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.accepting)
            .map(|(i, b)| Weighted {
                id: i as u32,
                weight: b.weight,
            })
            .collect();
        let schedule = smooth_wrr(&weighted, clb_common::WRR_SLOTS as usize)
            .into_iter()
            .map(|i| i as usize)
            .collect();
        let tags = cfg
            .backends
            .iter()
            .map(|b| key.tag(&cfg.name, b.addr))
            .collect();
        Self {
            cfg,
            schedule,
            tags,
        }
    }
}

#[derive(Default)]
pub struct Counters {
    pub connections: AtomicU64,
    pub open: AtomicUsize,
    pub refused: AtomicU64,
    pub requests: AtomicU64,
    pub by_class: [AtomicU64; 4],
    pub cookies_set: AtomicU64,
    pub cookie_hits: AtomicU64,
    pub upstream_errors: AtomicU64,
    pub client_errors: AtomicU64,
    pub timeouts: AtomicU64,
    pub per_backend: Mutex<HashMap<SocketAddr, u64>>,
}

/// The client connections every HTTP listener of the daemon may hold at once, whatever their
/// own caps say: each takes two file descriptors (the client's and its backend's), and the
/// control plane (API, config file, pins, health checks) must always have descriptors left,
/// or a crowd of clients would freeze it. A connection beyond it is answered 503 and closed,
/// before `accept` itself could fail.
#[derive(Debug)]
pub struct ConnBudget {
    open: AtomicUsize,
    max: usize,
}

impl ConnBudget {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            open: AtomicUsize::new(0),
            max,
        })
    }

    /// The connections allowed at once.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Takes one connection's share, if any is left.
    fn take(self: &Arc<Self>) -> Option<BudgetGuard> {
        let mut n = self.open.load(Ordering::Relaxed);
        loop {
            if n >= self.max {
                return None;
            }
            match self
                .open
                .compare_exchange_weak(n, n + 1, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(BudgetGuard(self.clone())),
                Err(now) => n = now,
            }
        }
    }
}

/// A connection's share of the [`ConnBudget`], given back on drop.
struct BudgetGuard(Arc<ConnBudget>);

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Shared state of one running listener.
pub struct ListenerState {
    pub snapshot: ArcSwap<Snapshot>,
    cursor: AtomicU64,
    pub counters: Counters,
    key: CookieKey,
    client: Client<HttpConnector, Body>,
    budget: Arc<ConnBudget>,
}

impl ListenerState {
    pub fn new(snapshot: Snapshot, key: CookieKey, budget: Arc<ConnBudget>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            // Idle backend connections kept per backend: bounded, so that descriptors follow
            // the client connections the budget allows, not the peak of an earlier crowd.
            .pool_max_idle_per_host(POOL_IDLE_PER_BACKEND)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Self {
            snapshot: ArcSwap::from_pointee(snapshot),
            cursor: AtomicU64::new(0),
            counters: Counters::default(),
            key,
            client,
            budget,
        }
    }

    fn next_backend(&self, s: &Snapshot) -> Option<usize> {
        if s.schedule.is_empty() {
            return None;
        }
        let c = self.cursor.fetch_add(1, Ordering::Relaxed);
        Some(s.schedule[(c % s.schedule.len() as u64) as usize])
    }
}

/// Accepts connections until told to stop; beyond the cap a connection gets a 503 and is
/// closed at once.
pub async fn accept_loop(
    listener: TcpListener,
    state: Arc<ListenerState>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let max = state.snapshot.load().cfg.max_conns as usize;
                    let share = if state.counters.open.load(Ordering::Relaxed) >= max {
                        None
                    } else {
                        state.budget.take()
                    };
                    let Some(share) = share else {
                        state.counters.refused.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(refuse(stream));
                        continue;
                    };
                    state.counters.connections.fetch_add(1, Ordering::Relaxed);
                    state.counters.open.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(serve_conn(stream, peer, state.clone(), stop.clone(), share));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => return,
        }
    }
}

/// Answers a connection over the cap: 503, then close (within a second, whatever the client
/// does).
async fn refuse(mut stream: TcpStream) {
    const BODY: &str = "too many connections\n";
    let msg = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n{BODY}",
        BODY.len()
    );
    let write = async {
        stream.write_all(msg.as_bytes()).await?;
        stream.shutdown().await
    };
    if tokio::time::timeout(Duration::from_secs(1), write)
        .await
        .is_err()
    {
        debug!("refused connection did not take its 503 within 1 s");
    }
}

/// Per-connection activity, for the watchdog: idle keep-alive, slow headers, stalled I/O.
struct Activity {
    origin: Instant,
    /// Last byte read or written, ms since `origin`.
    last_io_ms: AtomicU64,
    /// First byte of a request head not yet dispatched, ms since `origin`; 0 = none.
    head_started_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }
    fn touch(&self, read: bool) {
        let now = self.now_ms();
        self.last_io_ms.store(now, Ordering::Relaxed);
        if read && self.in_flight.load(Ordering::Relaxed) == 0 {
            // Bytes while no request is in flight: a request head is arriving.
            let _started =
                self.head_started_ms
                    .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        }
    }
}

/// The connection's socket, recording activity.
struct Tracked {
    inner: TcpStream,
    act: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.act.touch(true);
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.act.touch(false);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Decrements the open-connection count when a connection ends, however it ends.
struct OpenGuard(Arc<ListenerState>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.counters.open.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<ListenerState>,
    mut stop: watch::Receiver<bool>,
    _share: BudgetGuard,
) {
    let _open = OpenGuard(state.clone());
    stream.set_nodelay(true).ok();
    let (keepalive, io_timeout) = {
        let s = state.snapshot.load();
        (
            Duration::from_secs(u64::from(s.cfg.keepalive_secs)),
            Duration::from_secs(u64::from(s.cfg.io_timeout_secs)),
        )
    };
    let act = Arc::new(Activity {
        origin: Instant::now(),
        last_io_ms: AtomicU64::new(1),
        // The connection itself starts the clock for the first request's headers.
        head_started_ms: AtomicU64::new(1),
        in_flight: AtomicUsize::new(0),
    });
    let io = TokioIo::new(Tracked {
        inner: stream,
        act: act.clone(),
    });
    let svc_state = state.clone();
    let svc_act = act.clone();
    let svc = service_fn(move |req| {
        let (st, act) = (svc_state.clone(), svc_act.clone());
        async move {
            // In flight until its response body is sent or dropped, not merely until the
            // head is ready: a client that stops reading a long body is a stalled request.
            let guard = InFlight::new(act.clone());
            act.head_started_ms.store(0, Ordering::Relaxed);
            let resp = proxy(req, peer, &st).await;
            Ok::<_, Infallible>(resp.map(|inner| {
                GuardedBody {
                    inner,
                    _guard: guard,
                }
                .boxed()
            }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // hyper's own header timeout also runs while a kept-alive connection is idle; the
        // watchdog below handles both cases separately.
        .header_read_timeout(None)
        .max_buf_size(MAX_HEAD.max(8192) * 2)
        .max_header_size(MAX_HEAD)
        .keep_alive(!keepalive.is_zero());
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut closing = false;
    // A request in flight may wait `io_timeout` for its backend (then it gets a 504); past
    // that plus a second without a byte moving on the client's socket, the client stopped
    // reading (or the backend stopped sending): the connection, and with it the backend's,
    // is dropped.
    let stalled_ms = io_timeout.as_millis() as u64 + 1000;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(%peer, "connection ended: {e}");
                }
                return;
            }
            _ = tick.tick() => {
                let now = act.now_ms();
                let idle = now.saturating_sub(act.last_io_ms.load(Ordering::Relaxed));
                if act.in_flight.load(Ordering::Relaxed) > 0 {
                    if idle > stalled_ms {
                        debug!(%peer, "no progress for {idle} ms with a request in flight, closing");
                        state.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    continue;
                }
                let head = act.head_started_ms.load(Ordering::Relaxed);
                if head != 0 && now.saturating_sub(head) > HEADER_TIMEOUT.as_millis() as u64 {
                    debug!(%peer, "request headers too slow, closing");
                    state.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                    return; // drops the socket
                }
                if !closing && !keepalive.is_zero() && head == 0 && idle > keepalive.as_millis() as u64 {
                    debug!(%peer, "keep-alive timeout, closing");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
            _ = stop.changed(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

fn text(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{msg}\n")))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the ones `Connection` names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
}

/// Removes the cookie `name` from the request's `Cookie` headers and returns its (first)
/// value. Works on bytes: the other cookies pass byte for byte, whatever they hold (a value
/// outside ASCII included); the headers are rewritten only if they held `name`.
pub fn take_cookie(h: &mut HeaderMap, name: &str) -> Option<String> {
    let mut found: Option<String> = None;
    let mut kept: Vec<Vec<u8>> = Vec::new();
    let mut ours = false;
    for v in h.get_all(header::COOKIE) {
        let mut parts: Vec<&[u8]> = Vec::new();
        for pair in v.as_bytes().split(|b| *b == b';') {
            let pair = pair.trim_ascii();
            if pair.is_empty() {
                continue;
            }
            let (k, val) = match pair.iter().position(|b| *b == b'=') {
                Some(i) => (pair[..i].trim_ascii(), Some(pair[i + 1..].trim_ascii())),
                None => (pair, None),
            };
            if k == name.as_bytes() {
                ours = true;
                if found.is_none()
                    && let Some(val) = val
                {
                    // Ours is plain base64url; anything else simply fails to decode later.
                    found = Some(String::from_utf8_lossy(val).into_owned());
                }
            } else {
                parts.push(pair);
            }
        }
        if !parts.is_empty() {
            kept.push(parts.join(&b"; "[..]));
        }
    }
    if !ours {
        return None;
    }
    h.remove(header::COOKIE);
    for k in kept {
        if let Ok(v) = HeaderValue::from_bytes(&k) {
            h.append(header::COOKIE, v);
        }
    }
    found
}

/// A request counted in flight on its connection, until dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(act: Arc<Activity>) -> Self {
        act.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(act)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request in flight while it is being sent.
struct GuardedBody {
    inner: Body,
    _guard: InFlight,
}

impl hyper::body::Body for GuardedBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that remembers whether reading it from the client failed (bad chunk size,
/// a connection cut mid-body): such a failure is the client's, not the backend's.
struct ClientBody {
    inner: Limited<Incoming>,
    failed: Arc<AtomicBool>,
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &r {
            self.failed.store(true, Ordering::Relaxed);
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Proxies one request.
async fn proxy(req: Request<Incoming>, peer: SocketAddr, st: &ListenerState) -> Response<Body> {
    let c = &st.counters;
    c.requests.fetch_add(1, Ordering::Relaxed);
    let resp = route(req, peer, st).await;
    let class = (resp.status().as_u16() / 100).clamp(2, 5) as usize - 2;
    c.by_class[class].fetch_add(1, Ordering::Relaxed);
    resp
}

fn client_error(st: &ListenerState, status: StatusCode, msg: &str) -> Response<Body> {
    st.counters.client_errors.fetch_add(1, Ordering::Relaxed);
    let mut r = text(status, msg);
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

async fn route(req: Request<Incoming>, peer: SocketAddr, st: &ListenerState) -> Response<Body> {
    let snap = st.snapshot.load_full();
    let cfg = &snap.cfg;
    if req.headers().get_all(header::HOST).iter().count() > 1 {
        return client_error(st, StatusCode::BAD_REQUEST, "more than one Host header");
    }
    // Asterisk-form: only OPTIONS may use it (RFC 9112 §3.2.4); the proxy answers for the
    // whole service.
    if req.uri().path() == "*" {
        if req.method() == Method::OPTIONS {
            let mut r = text(StatusCode::OK, "");
            r.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"),
            );
            return r;
        }
        return client_error(
            st,
            StatusCode::BAD_REQUEST,
            "asterisk-form target is for OPTIONS only",
        );
    }
    if let Some(len) = req.headers().get(header::CONTENT_LENGTH)
        && len
            .to_str()
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > MAX_BODY as u64)
    {
        return client_error(st, StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    }
    let (mut parts, body) = req.into_parts();
    let cookie = take_cookie(&mut parts.headers, &cfg.cookie_name);
    let now = unix_now();
    // A valid cookie of a backend that still takes clients decides; anything else reschedules.
    let mut set_cookie = cfg.persist > 0;
    let mut chosen = None;
    if cfg.persist > 0
        && let Some((tag, expiry)) = cookie.and_then(|v| st.key.decode(&cfg.name, &v, now))
        && let Some(i) = snap.tags.iter().position(|t| *t == tag)
        && cfg.backends[i].accepting
    {
        chosen = Some(i);
        st.counters.cookie_hits.fetch_add(1, Ordering::Relaxed);
        // Refresh once half the lifetime is gone.
        set_cookie = expiry.saturating_sub(now) < u64::from(cfg.persist) / 2;
    }
    let Some(i) = chosen.or_else(|| st.next_backend(&snap)) else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "no backend available");
    };
    let backend = cfg.backends[i].addr;
    *lock(&st.counters.per_backend).entry(backend).or_default() += 1;

    strip_hop_by_hop(&mut parts.headers);
    let client_ip = peer.ip().to_string();
    let xff = match parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => format!("{prev}, {client_ip}"),
        None => client_ip.clone(),
    };
    // RFC 7239: an IPv6 node is bracketed and quoted.
    let for_node = match peer.ip() {
        std::net::IpAddr::V4(a) => a.to_string(),
        std::net::IpAddr::V6(a) => format!("\"[{a}]\""),
    };
    let fwd = format!("for={for_node};proto=http;by=\"{}\"", cfg.vip);
    let fwd = match parts.headers.get("forwarded").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {fwd}"),
        None => fwd,
    };
    for (k, v) in [
        ("x-forwarded-for", xff),
        ("x-forwarded-proto", "http".into()),
        ("forwarded", fwd),
    ] {
        if let Ok(v) = HeaderValue::from_str(&v) {
            parts.headers.insert(k, v);
        }
    }
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = match format!("http://{backend}{path}").parse() {
        Ok(u) => u,
        Err(_) => return client_error(st, StatusCode::BAD_REQUEST, "bad request target"),
    };
    if !parts.headers.contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(&cfg.vip.to_string())
    {
        parts.headers.insert(header::HOST, v);
    }
    let failed = Arc::new(AtomicBool::new(false));
    let body = ClientBody {
        inner: Limited::new(body, MAX_BODY),
        failed: failed.clone(),
    }
    .boxed();
    let upstream = Request::from_parts(parts, body);
    let io_timeout = Duration::from_secs(u64::from(cfg.io_timeout_secs));
    let resp = match tokio::time::timeout(io_timeout, st.client.request(upstream)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e).is_some_and(|s| {
                s.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
            });
            if too_large {
                return client_error(st, StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
            }
            if failed.load(Ordering::Relaxed) {
                return client_error(st, StatusCode::BAD_REQUEST, "malformed request body");
            }
            st.counters.upstream_errors.fetch_add(1, Ordering::Relaxed);
            warn!(listener = cfg.name, %backend, "backend unreachable: {e}");
            return text(StatusCode::BAD_GATEWAY, "backend unavailable");
        }
        Err(_) => {
            if failed.load(Ordering::Relaxed) {
                return client_error(st, StatusCode::BAD_REQUEST, "malformed request body");
            }
            st.counters.upstream_errors.fetch_add(1, Ordering::Relaxed);
            warn!(listener = cfg.name, %backend, "backend did not answer within {}s", io_timeout.as_secs());
            return text(
                StatusCode::GATEWAY_TIMEOUT,
                "backend did not answer in time",
            );
        }
    };
    let (mut rp, rb) = resp.into_parts();
    strip_hop_by_hop(&mut rp.headers);
    if set_cookie {
        let value = st
            .key
            .encode(&cfg.name, snap.tags[i], now + u64::from(cfg.persist));
        let c = format!(
            "{}={value}; Max-Age={}; Path=/; HttpOnly",
            cfg.cookie_name, cfg.persist
        );
        if let Ok(v) = HeaderValue::from_str(&c) {
            rp.headers.append(header::SET_COOKIE, v);
            st.counters.cookies_set.fetch_add(1, Ordering::Relaxed);
        }
        // HAProxy's `nocache`: shared caches must not store a response that sets it.
        let cc = match rp
            .headers
            .get(header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
        {
            Some(prev) => format!("{prev}, no-cache=\"set-cookie\""),
            None => "no-cache=\"set-cookie\"".into(),
        };
        if let Ok(v) = HeaderValue::from_str(&cc) {
            rp.headers.insert(header::CACHE_CONTROL, v);
        }
    }
    Response::from_parts(rp, rb.map_err(|e| Box::new(e) as BoxError).boxed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l7::L7Backend;

    #[test]
    fn cookie_is_taken_out_and_others_kept_byte_for_byte() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; clb_session=XYZ; b=2"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        assert_eq!(take_cookie(&mut h, "clb_session").as_deref(), Some("XYZ"));
        let all: Vec<&[u8]> = h
            .get_all(header::COOKIE)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        assert_eq!(all, vec![&b"a=1; b=2"[..], &b"c=3"[..]]);
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("clb_session=only"));
        assert_eq!(take_cookie(&mut h, "clb_session").as_deref(), Some("only"));
        assert!(h.get(header::COOKIE).is_none());
    }

    #[test]
    fn non_ascii_cookies_pass_untouched() {
        let raw = "app_session=abc123; name=Jos\u{e9}".as_bytes().to_vec();
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_bytes(&raw).unwrap());
        assert_eq!(take_cookie(&mut h, "clb_session"), None);
        assert_eq!(h.get(header::COOKIE).unwrap().as_bytes(), &raw[..]);
        let mut with_ours = raw.clone();
        with_ours.extend_from_slice(b"; clb_session=T");
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_bytes(&with_ours).unwrap());
        assert_eq!(take_cookie(&mut h, "clb_session").as_deref(), Some("T"));
        assert_eq!(h.get(header::COOKIE).unwrap().as_bytes(), &raw[..]);
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn snapshot_schedule_skips_backends_that_do_not_accept() {
        let b = |a: &str, weight, accepting| L7Backend {
            addr: a.parse().unwrap(),
            weight,
            accepting,
        };
        let cfg = L7Config {
            name: "shop".into(),
            vip: "10.0.0.100:80".parse().unwrap(),
            persist: 60,
            keepalive_secs: 75,
            cookie_name: "c".into(),
            max_conns: 10,
            io_timeout_secs: 60,
            backends: vec![
                b("10.0.10.2:80", 10, true),
                b("10.0.11.2:80", 10, false),
                b("10.0.12.2:80", 20, true),
            ],
        };
        let s = Snapshot::new(cfg, &CookieKey([1; 32]));
        assert_eq!(s.schedule.len(), 3);
        assert!(!s.schedule.contains(&1));
        assert_eq!(s.schedule.iter().filter(|&&i| i == 2).count(), 2);
    }
}
