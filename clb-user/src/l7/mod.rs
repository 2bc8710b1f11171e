//! The L7 HTTP listener: an HTTP/1.1 reverse proxy (tokio + hyper) with cookie-insertion
//! session persistence, the equivalent of HAProxy's `cookie NAME insert indirect nocache
//! httponly`.
//!
//! - No valid persistence cookie: weighted round robin over the accepting backends, and the
//!   response gets `Set-Cookie: NAME=VALUE; Max-Age=persist; Path=/; HttpOnly` plus
//!   `Cache-Control: no-cache="set-cookie"`. A valid cookie of a present, accepting backend
//!   routes there; an expired, tampered or unknown one is ignored (rescheduled). The cookie
//!   is refreshed once half its lifetime has passed, so an active client stays.
//! - The persistence cookie is stripped before the request reaches the backend (`indirect`).
//! - Hop-by-hop headers are dropped both ways; `X-Forwarded-For`, `X-Forwarded-Proto` and
//!   `Forwarded` are added. Bodies stream through.
//! - Limits: request head 16 KiB (431), body [`MAX_BODY`] (413), headers of a request must
//!   arrive within [`HEADER_TIMEOUT`] (slow clients are disconnected), idle kept-alive
//!   connections close after the listener's keep-alive timeout (0: close after each response).
//! - A backend that cannot be reached gives 502 (no retry: the request may not be idempotent).
//!
//! [`L7Manager::sync`] makes the running proxies match the configuration; backends and
//! settings of a running listener change through an atomically swapped snapshot, so no
//! client connection is dropped for it.

pub mod cookie;

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{SocketAddr, SocketAddrV4},
    pin::Pin,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use http_body_util::{BodyExt as _, Full, Limited, combinators::BoxBody};
use hyper::{
    HeaderMap, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{self, HeaderName, HeaderValue},
    service::service_fn,
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};
use tracing::{debug, info, warn};

pub use cookie::{CookieKey, load_or_create_key};

use crate::sched::{Weighted, smooth_wrr};

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body.
pub const MAX_BODY: usize = 16 * 1024 * 1024;
/// Time a client has to send a request's headers once it started sending them (or once it
/// connected).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Connect timeout towards backends.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// One backend of an HTTP listener, as the control plane sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L7Backend {
    pub addr: SocketAddrV4,
    pub weight: u32,
    /// Takes new clients (weight > 0, not draining, healthy or all unhealthy).
    pub accepting: bool,
}

/// An HTTP listener's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L7Config {
    pub name: String,
    pub vip: SocketAddrV4,
    /// Cookie persistence, seconds; 0 = off.
    pub persist: u32,
    /// Keep-alive idle timeout, seconds; 0 = close after each response.
    pub keepalive_secs: u32,
    pub cookie_name: String,
    pub backends: Vec<L7Backend>,
}

/// Counters of one backend of an HTTP listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct L7BackendStats {
    pub addr: SocketAddrV4,
    pub requests: u64,
}

/// Counters of an HTTP listener.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct L7ListenerStats {
    pub name: String,
    pub connections: u64,
    pub requests: u64,
    pub responses_2xx: u64,
    pub responses_3xx: u64,
    pub responses_4xx: u64,
    pub responses_5xx: u64,
    /// Responses that set a persistence cookie (new or rescheduled client, or a refresh).
    pub cookies_set: u64,
    /// Requests routed by a valid persistence cookie.
    pub cookie_hits: u64,
    /// Requests whose backend could not be reached (answered 502).
    pub upstream_errors: u64,
    pub backends: Vec<L7BackendStats>,
}

/// What a running listener serves from; replaced as a whole on every change.
struct Snapshot {
    cfg: L7Config,
    /// Smooth-WRR sequence of indices into `cfg.backends` (accepting ones only).
    schedule: Vec<usize>,
    /// Cookie tag of each backend.
    tags: Vec<[u8; 8]>,
}

impl Snapshot {
    fn new(cfg: L7Config, key: &CookieKey) -> Self {
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
        let schedule = smooth_wrr(&weighted, clb_common::SCHED_SLOTS as usize)
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
struct Counters {
    connections: AtomicU64,
    requests: AtomicU64,
    by_class: [AtomicU64; 4],
    cookies_set: AtomicU64,
    cookie_hits: AtomicU64,
    upstream_errors: AtomicU64,
    per_backend: Mutex<HashMap<SocketAddrV4, u64>>,
}

/// Shared state of one running listener.
struct ListenerState {
    snapshot: RwLock<Arc<Snapshot>>,
    cursor: AtomicU64,
    counters: Counters,
    key: CookieKey,
    client: Client<HttpConnector, Body>,
}

impl ListenerState {
    fn current(&self) -> Arc<Snapshot> {
        self.snapshot.read().expect("snapshot lock").clone()
    }

    fn next_backend(&self, s: &Snapshot) -> Option<usize> {
        if s.schedule.is_empty() {
            return None;
        }
        let c = self.cursor.fetch_add(1, Ordering::Relaxed);
        Some(s.schedule[(c % s.schedule.len() as u64) as usize])
    }

    fn stats(&self) -> L7ListenerStats {
        let s = self.current();
        let c = &self.counters;
        let per = c.per_backend.lock().expect("stats lock");
        L7ListenerStats {
            name: s.cfg.name.clone(),
            connections: c.connections.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            responses_2xx: c.by_class[0].load(Ordering::Relaxed),
            responses_3xx: c.by_class[1].load(Ordering::Relaxed),
            responses_4xx: c.by_class[2].load(Ordering::Relaxed),
            responses_5xx: c.by_class[3].load(Ordering::Relaxed),
            cookies_set: c.cookies_set.load(Ordering::Relaxed),
            cookie_hits: c.cookie_hits.load(Ordering::Relaxed),
            upstream_errors: c.upstream_errors.load(Ordering::Relaxed),
            backends: s
                .cfg
                .backends
                .iter()
                .map(|b| L7BackendStats {
                    addr: b.addr,
                    requests: per.get(&b.addr).copied().unwrap_or(0),
                })
                .collect(),
        }
    }
}

struct Running {
    vip: SocketAddrV4,
    state: Arc<ListenerState>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The HTTP listeners of the daemon.
pub struct L7Manager {
    key: CookieKey,
    running: HashMap<String, Running>,
}

impl L7Manager {
    pub fn new(key: CookieKey) -> Self {
        Self {
            key,
            running: HashMap::new(),
        }
    }

    /// Makes the running listeners match `configs`: starts new ones, swaps the snapshot of
    /// running ones (their connections stay), stops removed ones (or ones whose VIP changed).
    pub async fn sync(&mut self, configs: Vec<L7Config>) -> anyhow::Result<()> {
        let wanted: HashMap<String, L7Config> =
            configs.into_iter().map(|c| (c.name.clone(), c)).collect();
        let stale: Vec<String> = self
            .running
            .iter()
            .filter(|(n, r)| wanted.get(*n).is_none_or(|c| c.vip != r.vip))
            .map(|(n, _)| n.clone())
            .collect();
        for n in stale {
            if let Some(r) = self.running.remove(&n) {
                r.stop.send_replace(true);
                r.task.abort();
                info!(listener = n, vip = %r.vip, "HTTP listener stopped");
            }
        }
        let mut first_err = None;
        for (name, cfg) in wanted {
            match self.running.get(&name) {
                Some(r) => {
                    let snap = Arc::new(Snapshot::new(cfg, &self.key));
                    *r.state.snapshot.write().expect("snapshot lock") = snap;
                }
                None => match self.start(cfg).await {
                    Ok(r) => {
                        self.running.insert(name, r);
                    }
                    Err(e) => {
                        warn!(listener = name, "HTTP listener not started: {e:#}");
                        first_err.get_or_insert(e);
                    }
                },
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn start(&self, cfg: L7Config) -> anyhow::Result<Running> {
        let vip = cfg.vip;
        let listener =
            bind(vip).with_context(|| format!("binding HTTP listener {} on {vip}", cfg.name))?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .build(connector);
        let name = cfg.name.clone();
        let state = Arc::new(ListenerState {
            snapshot: RwLock::new(Arc::new(Snapshot::new(cfg, &self.key))),
            cursor: AtomicU64::new(0),
            counters: Counters::default(),
            key: self.key.clone(),
            client,
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, state.clone(), stop_rx));
        info!(listener = name, %vip, "HTTP listener started");
        Ok(Running {
            vip,
            state,
            stop,
            task,
        })
    }

    /// Counters of every running listener.
    pub fn stats(&self) -> Vec<L7ListenerStats> {
        let mut v: Vec<L7ListenerStats> = self.running.values().map(|r| r.state.stats()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

impl Drop for L7Manager {
    fn drop(&mut self) {
        for r in self.running.values() {
            r.stop.send_replace(true);
            r.task.abort();
        }
    }
}

/// A listening socket on the VIP, with `IP_FREEBIND` so the VIP need not be configured on an
/// interface yet (it usually sits on `lo` of the balancer).
fn bind(vip: SocketAddrV4) -> anyhow::Result<TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    s.set_freebind_v4(true)?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::V4(vip).into())?;
    s.listen(1024)?;
    Ok(TcpListener::from_std(s.into())?)
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<ListenerState>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    state.counters.connections.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(serve_conn(stream, peer, state.clone(), stop.clone()));
                }
                Err(e) => {
                    warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => return,
        }
    }
}

/// Per-connection activity, for the idle (keep-alive) and slow-header watchdog.
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
            let _prev =
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

async fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<ListenerState>,
    mut stop: watch::Receiver<bool>,
) {
    stream.set_nodelay(true).ok();
    let keepalive = Duration::from_secs(u64::from(state.current().cfg.keepalive_secs));
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
            act.in_flight.fetch_add(1, Ordering::Relaxed);
            act.head_started_ms.store(0, Ordering::Relaxed);
            let resp = proxy(req, peer, &st).await;
            act.in_flight.fetch_sub(1, Ordering::Relaxed);
            Ok::<_, Infallible>(resp)
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
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(%peer, "connection ended: {e}");
                }
                return;
            }
            _ = tick.tick() => {
                if act.in_flight.load(Ordering::Relaxed) > 0 {
                    continue;
                }
                let now = act.now_ms();
                let head = act.head_started_ms.load(Ordering::Relaxed);
                if head != 0 && now.saturating_sub(head) > HEADER_TIMEOUT.as_millis() as u64 {
                    debug!(%peer, "request headers too slow, closing");
                    return; // drops the socket
                }
                let idle = now.saturating_sub(act.last_io_ms.load(Ordering::Relaxed));
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
fn strip_hop_by_hop(h: &mut HeaderMap) {
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

/// Removes the cookie `name` from the request's `Cookie` headers; returns its value.
fn take_cookie(h: &mut HeaderMap, name: &str) -> Option<String> {
    let mut found = None;
    let mut kept: Vec<String> = Vec::new();
    for v in h.get_all(header::COOKIE) {
        let Ok(s) = v.to_str() else {
            continue;
        };
        for pair in s.split(';') {
            let pair = pair.trim();
            if pair.is_empty() {
                continue;
            }
            match pair.split_once('=') {
                Some((k, val)) if k.trim() == name => {
                    found.get_or_insert_with(|| val.trim().to_owned());
                }
                _ => kept.push(pair.to_owned()),
            }
        }
    }
    h.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join("; "))
    {
        h.insert(header::COOKIE, v);
    }
    found
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

async fn route(req: Request<Incoming>, peer: SocketAddr, st: &ListenerState) -> Response<Body> {
    let snap = st.current();
    let cfg = &snap.cfg;
    if let Some(len) = req.headers().get(header::CONTENT_LENGTH)
        && len
            .to_str()
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > MAX_BODY as u64)
    {
        return text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
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
    *st.counters
        .per_backend
        .lock()
        .expect("stats lock")
        .entry(backend)
        .or_default() += 1;

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
    let fwd = format!("for={client_ip};proto=http;by=\"{}\"", cfg.vip);
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
        Err(_) => return text(StatusCode::BAD_REQUEST, "bad request target"),
    };
    if !parts.headers.contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(&cfg.vip.to_string())
    {
        parts.headers.insert(header::HOST, v);
    }
    let body = Limited::new(body, MAX_BODY).boxed();
    let upstream = Request::from_parts(parts, body);
    let resp = match st.client.request(upstream).await {
        Ok(r) => r,
        Err(e) => {
            let too_large = std::error::Error::source(&e).is_some_and(|s| {
                s.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
            });
            if too_large {
                return text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
            }
            st.counters.upstream_errors.fetch_add(1, Ordering::Relaxed);
            warn!(listener = cfg.name, %backend, "backend unreachable: {e}");
            return text(StatusCode::BAD_GATEWAY, "backend unavailable");
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

    #[test]
    fn cookie_is_taken_out_and_others_kept() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; clb_session=XYZ; b=2"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        assert_eq!(take_cookie(&mut h, "clb_session").as_deref(), Some("XYZ"));
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h.get(header::COOKIE).unwrap(), "a=1; b=2; c=3");
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("clb_session=only"));
        assert_eq!(take_cookie(&mut h, "clb_session").as_deref(), Some("only"));
        assert!(h.get(header::COOKIE).is_none());
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
        let cfg = L7Config {
            name: "shop".into(),
            vip: "10.0.0.100:80".parse().unwrap(),
            persist: 60,
            keepalive_secs: 75,
            cookie_name: "c".into(),
            backends: vec![
                L7Backend {
                    addr: "10.0.10.2:80".parse().unwrap(),
                    weight: 10,
                    accepting: true,
                },
                L7Backend {
                    addr: "10.0.11.2:80".parse().unwrap(),
                    weight: 10,
                    accepting: false,
                },
                L7Backend {
                    addr: "10.0.12.2:80".parse().unwrap(),
                    weight: 20,
                    accepting: true,
                },
            ],
        };
        let s = Snapshot::new(cfg, &CookieKey([1; 32]));
        assert_eq!(s.schedule.len(), 3);
        assert!(!s.schedule.contains(&1));
        assert_eq!(s.schedule.iter().filter(|&&i| i == 2).count(), 2);
    }
}
