//! One HTTP or HTTPS listener's proxying: connections and requests.
//!
//! - Connections: HTTP/1.1 on HTTP listeners; on HTTPS ones TLS first ([`super::tls`]), then
//!   HTTP/2 or HTTP/1.1 as ALPN chose. Backends always get HTTP/1.1 (pooled, kept alive).
//! - No valid persistence cookie: weighted round robin over the accepting backends, and the
//!   response gets `Set-Cookie: NAME=VALUE; Max-Age=persist; Path=/; HttpOnly; SameSite=Lax`
//!   (`Secure` too on HTTPS; SameSite as configured) plus `Cache-Control:
//!   no-cache="set-cookie"`. A valid cookie of a present, accepting backend routes there; an
//!   expired, tampered or unknown one is ignored (rescheduled). The cookie is refreshed once
//!   half its lifetime has passed, so an active client stays.
//! - The persistence cookie is removed before the request reaches the backend (`indirect`);
//!   every other cookie passes byte for byte, whatever bytes it holds (HTTP/2's split cookie
//!   fields are joined into one).
//! - Hop-by-hop headers are dropped both ways; `X-Forwarded-For`, `X-Forwarded-Proto` and
//!   `Forwarded` (with the listener's scheme) are added. Bodies stream through.
//! - HTTP/1.1 upgrades (WebSocket): routed like a request, `Upgrade`/`Connection: upgrade`
//!   kept; on the backend's 101 the two connections are joined byte for byte until either
//!   closes or [`TUNNEL_IDLE`] passes without a byte. A 101 nobody asked for gives 502.
//! - Limits: request head 16 KiB (431) and `max_headers` fields (431), body [`MAX_BODY`] (413),
//!   two `Host` headers or an HTTP/1.1 request without one (400), a malformed request body
//!   (400, the client's fault, not counted against the backend), `CONNECT` (405); HTTP/1.1
//!   headers must arrive within [`HEADER_TIMEOUT`]; idle kept-alive connections close after the
//!   keep-alive timeout (0: after each response); a client that stops reading a response, or a
//!   backend that stops answering, is cut after the listener's I/O timeout (504 when no answer
//!   began); connections beyond the listener's cap, or beyond the daemon's budget of file
//!   descriptors for HTTP clients ([`ConnBudget`]), get 503 and are closed. HTTP/2 limits: see
//!   [`H2_MAX_STREAMS`] and the constants beside it.
//! - `OPTIONS *` is answered by the proxy itself; `redirect_https` answers everything with 308.
//! - A backend that cannot be reached gives 502 (no retry: the request may not be idempotent).

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
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
    HeaderMap, Method, Request, Response, StatusCode, Version,
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

use super::{
    L7Config,
    access::{self, AccessLog},
    cookie::CookieKey,
    tls::{ConnInfo, Failure, HANDSHAKE_TIMEOUT, Tls},
};
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
    /// What follows `NAME=VALUE` in the `Set-Cookie` of a new cookie.
    cookie_attrs: String,
    /// Requests in flight on each backend (by `cfg.backends` index), carried over by address
    /// from the snapshot this one replaces.
    loads: Vec<Arc<AtomicU64>>,
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
        let mut cookie_attrs = format!(
            "; Max-Age={}; Path=/; HttpOnly; SameSite={}",
            cfg.persist,
            cfg.samesite.as_str()
        );
        if cfg.tls.is_some() {
            cookie_attrs.push_str("; Secure");
        }
        let loads = cfg.backends.iter().map(|_| Arc::default()).collect();
        Self {
            cfg,
            schedule,
            tags,
            cookie_attrs,
            loads,
        }
    }

    /// The scheme clients reached the listener by.
    fn scheme(&self) -> &'static str {
        if self.cfg.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// Request durations, seconds: upper bounds of the histogram's buckets (the last is +Inf).
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A histogram of request durations (from the request head to the response head).
#[derive(Default)]
pub struct Latency {
    /// Per bucket, not cumulative; the last is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Latency {
    fn record(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// (counts per bucket, not cumulative, +Inf last; sum in microseconds).
    pub fn read(&self) -> (Vec<u64>, u64) {
        (
            self.buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            self.sum_us.load(Ordering::Relaxed),
        )
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
    /// Upgraded connections (WebSocket and other HTTP/1.1 upgrades) passed through.
    pub upgrades: AtomicU64,
    /// Client connections that negotiated HTTP/2.
    pub h2_connections: AtomicU64,
    /// TLS handshakes completed, and of those resumed (ticket or session cache).
    pub tls_handshakes: AtomicU64,
    pub tls_resumed: AtomicU64,
    /// Failed handshakes by [`Failure`] (in [`Failure::ALL`] order).
    pub tls_failures: [AtomicU64; 3],
    pub latency: Latency,
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
    /// HTTPS: the TLS side (fixed for the listener's life; its certificates are swapped).
    pub tls: Option<Tls>,
    access: Option<Arc<AccessLog>>,
}

impl ListenerState {
    pub fn new(
        snapshot: Snapshot,
        key: CookieKey,
        budget: Arc<ConnBudget>,
        access: Option<Arc<AccessLog>>,
    ) -> anyhow::Result<Self> {
        let tls = match &snapshot.cfg.tls {
            Some(certs) if certs.is_empty() => {
                anyhow::bail!("no certificate loaded")
            }
            Some(certs) => Some(Tls::new(certs)?),
            None => None,
        };
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
        Ok(Self {
            snapshot: ArcSwap::from_pointee(snapshot),
            cursor: AtomicU64::new(0),
            counters: Counters::default(),
            key,
            client,
            budget,
            tls,
            access,
        })
    }

    /// Routes by `snap` from now on (and serves its certificates to new handshakes).
    pub fn update(&self, mut snap: Snapshot) {
        if let (Some(tls), Some(certs)) = (&self.tls, &snap.cfg.tls) {
            tls.set_certs(certs);
        }
        let old = self.snapshot.load();
        for (b, load) in snap.cfg.backends.iter().zip(&mut snap.loads) {
            if let Some(i) = old.cfg.backends.iter().position(|o| o.addr == b.addr) {
                *load = old.loads[i].clone();
            }
        }
        self.snapshot.store(Arc::new(snap));
    }

    /// Requests in flight now, per backend.
    pub fn in_flight(&self) -> HashMap<SocketAddr, u64> {
        let s = self.snapshot.load();
        s.cfg
            .backends
            .iter()
            .zip(&s.loads)
            .map(|(b, l)| (b.addr, l.load(Ordering::Relaxed)))
            .collect()
    }

    fn next_backend(&self, s: &Snapshot) -> Option<usize> {
        if s.schedule.is_empty() {
            return None;
        }
        let c = self.cursor.fetch_add(1, Ordering::Relaxed);
        if s.cfg.least_requests {
            return least_loaded(&s.cfg.backends, &s.loads, c);
        }
        Some(s.schedule[(c % s.schedule.len() as u64) as usize])
    }
}

/// The accepting backend with the fewest requests in flight per unit of weight, comparing
/// from index `start` on (ties go to the first, so equal backends take turns).
fn least_loaded(
    backends: &[super::L7Backend],
    loads: &[Arc<AtomicU64>],
    start: u64,
) -> Option<usize> {
    let n = backends.len();
    let mut best: Option<(usize, u64, u64)> = None;
    for k in 0..n {
        let i = (start as usize).wrapping_add(k) % n;
        let b = &backends[i];
        if !b.accepting || b.weight == 0 {
            continue;
        }
        let (a, w) = (loads[i].load(Ordering::Relaxed), u64::from(b.weight));
        if best.is_none_or(|(_, ba, bw)| a * bw < ba * w) {
            best = Some((i, a, w));
        }
    }
    best.map(|(i, _, _)| i)
}

/// A request counted in flight on its backend until dropped (with its response body, or with
/// the tunnel of an upgraded connection).
struct BackendLoad(Arc<AtomicU64>);

impl BackendLoad {
    fn new(c: &Arc<AtomicU64>) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        Self(c.clone())
    }
}

impl Drop for BackendLoad {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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
struct Tracked<S> {
    inner: S,
    act: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
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

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
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

/// What keeps a connection counted: its place under the listener's cap and its share of the
/// daemon's budget. Held by the connection and, after an upgrade, by its tunnel.
struct Hold {
    _open: OpenGuard,
    _share: BudgetGuard,
}

/// Per-request context: who the client is and what its connection negotiated.
struct ReqCx {
    peer: SocketAddr,
    info: ConnInfo,
    act: Arc<Activity>,
    hold: Arc<Hold>,
}

/// An admitted connection's stream, tracked, with its activity record (the connection itself
/// starts the clock for the first request's headers) and what keeps it counted.
fn admitted<S>(
    stream: S,
    state: &Arc<ListenerState>,
    share: BudgetGuard,
) -> (Tracked<S>, Arc<Activity>, Arc<Hold>) {
    let hold = Arc::new(Hold {
        _open: OpenGuard(state.clone()),
        _share: share,
    });
    let act = Arc::new(Activity {
        origin: Instant::now(),
        last_io_ms: AtomicU64::new(1),
        head_started_ms: AtomicU64::new(1),
        in_flight: AtomicUsize::new(0),
    });
    let io = Tracked {
        inner: stream,
        act: act.clone(),
    };
    (io, act, hold)
}

async fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<ListenerState>,
    stop: watch::Receiver<bool>,
    share: BudgetGuard,
) {
    stream.set_nodelay(true).ok();
    let (io, act, hold) = admitted(stream, &state, share);
    let Some(acceptor) = state.tls.as_ref().map(|t| t.acceptor.clone()) else {
        let cx = ReqCx {
            peer,
            info: ConnInfo::default(),
            act,
            hold,
        };
        return serve_http(io, cx, state, stop).await;
    };
    let c = &state.counters;
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
        Err(_) => {
            c.tls_failures[0].fetch_add(1, Ordering::Relaxed);
        }
        Ok(Err(e)) => {
            let why = Failure::of(&e);
            c.tls_failures[why as usize].fetch_add(1, Ordering::Relaxed);
            debug!(%peer, "TLS handshake failed ({}): {e}", why.as_str());
        }
        Ok(Ok(tls)) => {
            c.tls_handshakes.fetch_add(1, Ordering::Relaxed);
            let conn = tls.get_ref().1;
            if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                c.tls_resumed.fetch_add(1, Ordering::Relaxed);
            }
            let info = ConnInfo::of(conn);
            // The first request's headers are timed from the end of the handshake.
            act.head_started_ms.store(act.now_ms(), Ordering::Relaxed);
            let cx = ReqCx {
                peer,
                info,
                act,
                hold,
            };
            serve_http(tls, cx, state, stop).await;
        }
    }
}

/// Serves one client connection given as any byte stream, as if accepted on the listener:
/// HTTP/1.1, or HTTP/2 with `h2` (as ALPN would have chosen). For the HTTP fuzzer and tests
/// that feed the proxy from memory. Returns once the connection is over (at once when the
/// daemon's connection budget is used up).
pub async fn serve_stream<S>(io: S, peer: SocketAddr, state: Arc<ListenerState>, h2: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(share) = state.budget.take() else {
        return;
    };
    state.counters.connections.fetch_add(1, Ordering::Relaxed);
    state.counters.open.fetch_add(1, Ordering::Relaxed);
    let (io, act, hold) = admitted(io, &state, share);
    let cx = ReqCx {
        peer,
        info: ConnInfo {
            h2,
            ..ConnInfo::default()
        },
        act,
        hold,
    };
    // Never told to stop: the sender lives as long as the connection.
    let (keep, stop) = watch::channel(false);
    serve_http(io, cx, state, stop).await;
    drop(keep);
}

/// Largest number of concurrent streams of an HTTP/2 connection.
pub const H2_MAX_STREAMS: u32 = 100;
/// Streams a client may reset before the proxy has seen them (the "rapid reset" bound): more
/// and the connection is closed with `ENHANCE_YOUR_CALM`.
pub const H2_MAX_PENDING_RESETS: usize = 20;
/// Streams the proxy may reset for a client's errors on one connection before closing it.
pub const H2_MAX_LOCAL_RESETS: usize = 256;

/// Serves HTTP/1.1 (with upgrades) or HTTP/2 on `io` until the connection ends.
async fn serve_http<I>(io: I, cx: ReqCx, state: Arc<ListenerState>, stop: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (keepalive, io_timeout, max_headers) = {
        let s = state.snapshot.load();
        (
            Duration::from_secs(u64::from(s.cfg.keepalive_secs)),
            Duration::from_secs(u64::from(s.cfg.io_timeout_secs)),
            s.cfg.max_headers,
        )
    };
    let h2 = cx.info.h2;
    if h2 {
        state
            .counters
            .h2_connections
            .fetch_add(1, Ordering::Relaxed);
    }
    let cx = Arc::new(cx);
    let act = cx.act.clone();
    let peer = cx.peer;
    let svc_state = state.clone();
    let svc = service_fn(move |req| {
        let (st, cx) = (svc_state.clone(), cx.clone());
        async move {
            // In flight until its response body is sent or dropped, not merely until the
            // head is ready: a client that stops reading a long body is a stalled request.
            let guard = InFlight::new(cx.act.clone());
            cx.act.head_started_ms.store(0, Ordering::Relaxed);
            let (resp, log, load) = proxy(req, &cx, &st).await;
            let status = resp.status().as_u16();
            Ok::<_, Infallible>(resp.map(|inner| {
                GuardedBody {
                    inner,
                    _guard: guard,
                    _load: load,
                    log: log.map(|(entry, to)| {
                        Box::new(Logged {
                            entry,
                            status,
                            t0: Instant::now(),
                            to,
                        })
                    }),
                }
                .boxed()
            }))
        }
    });
    let w = Watch {
        act,
        peer,
        state,
        keepalive,
        io_timeout,
        h2,
    };
    if h2 {
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_STREAMS)
            // Header blocks, CONTINUATION frames included, are bounded as HTTP/1.1 heads are.
            .max_header_list_size(MAX_HEAD as u32)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
            .max_local_error_reset_streams(H2_MAX_LOCAL_RESETS)
            .max_send_buf_size(256 * 1024);
        let conn = b.serve_connection(TokioIo::new(io), svc);
        tokio::pin!(conn);
        w.run(conn, |c| c.graceful_shutdown(), stop).await;
    } else {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            // hyper's own header timeout also runs while a kept-alive connection is idle;
            // the watchdog handles both cases separately.
            .header_read_timeout(None)
            .max_buf_size(MAX_HEAD.max(8192) * 2)
            .max_header_size(MAX_HEAD)
            .max_headers(max_headers)
            .keep_alive(!keepalive.is_zero());
        let conn = b.serve_connection(TokioIo::new(io), svc).with_upgrades();
        tokio::pin!(conn);
        w.run(conn, |c| c.graceful_shutdown(), stop).await;
    }
}

/// A connection's watchdog: idle keep-alive, slow headers, stalled I/O.
struct Watch {
    act: Arc<Activity>,
    peer: SocketAddr,
    state: Arc<ListenerState>,
    keepalive: Duration,
    io_timeout: Duration,
    h2: bool,
}

impl Watch {
    async fn run<F, E>(
        self,
        mut conn: Pin<&mut F>,
        graceful: impl Fn(Pin<&mut F>),
        mut stop: watch::Receiver<bool>,
    ) where
        F: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let (act, peer, keepalive) = (&self.act, self.peer, self.keepalive);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut closing = false;
        // A request in flight may wait `io_timeout` for its backend (then it gets a 504); past
        // that plus a second without a byte moving on the client's socket, the client stopped
        // reading (or the backend stopped sending): the connection, and with it the
        // backend's, is dropped.
        let stalled_ms = self.io_timeout.as_millis() as u64 + 1000;
        // HTTP/1.1: a request head must arrive within HEADER_TIMEOUT once begun. HTTP/2 sends
        // control frames between requests (settings, pings, window updates): a connection
        // that carries bytes but no request is closed after the keep-alive timeout instead.
        let head_ms = if self.h2 {
            keepalive.max(HEADER_TIMEOUT).as_millis() as u64
        } else {
            HEADER_TIMEOUT.as_millis() as u64
        };
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
                            self.state.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        continue;
                    }
                    let head = act.head_started_ms.load(Ordering::Relaxed);
                    if head != 0 && now.saturating_sub(head) > head_ms {
                        debug!(%peer, "request headers too slow, closing");
                        self.state.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                        return; // drops the socket
                    }
                    if !closing && !keepalive.is_zero() && (head == 0 || self.h2) && idle > keepalive.as_millis() as u64 {
                        debug!(%peer, "keep-alive timeout, closing");
                        graceful(conn.as_mut());
                        closing = true;
                    }
                }
                _ = stop.changed(), if !closing => {
                    graceful(conn.as_mut());
                    closing = true;
                }
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

/// A response body that keeps its request in flight while it is being sent, and writes its
/// access-log entry once sent (or dropped).
struct GuardedBody {
    inner: Body,
    _guard: InFlight,
    _load: Option<BackendLoad>,
    log: Option<Box<Logged>>,
}

/// A request's access-log entry, waiting for its response body to be sent.
struct Logged {
    entry: access::Entry,
    status: u16,
    /// When the response head was ready (the entry's duration so far is in `entry`).
    t0: Instant,
    to: Arc<AccessLog>,
}

impl Drop for GuardedBody {
    fn drop(&mut self) {
        if let Some(l) = self.log.take() {
            let Logged {
                mut entry,
                status,
                t0,
                to,
            } = *l;
            entry.status = status;
            entry.duration_ms += t0.elapsed().as_secs_f64() * 1000.0;
            to.log(entry);
        }
    }
}

impl hyper::body::Body for GuardedBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let (Some(l), Poll::Ready(Some(Ok(f)))) = (&mut self.log, &r)
            && let Some(d) = f.data_ref()
        {
            l.entry.bytes += d.len() as u64;
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

/// Where a request went, for the access log.
#[derive(Default)]
struct Routed {
    backend: Option<SocketAddr>,
    persistence: &'static str,
    /// The request counted on its backend (absent once a tunnel took it over).
    load: Option<BackendLoad>,
}

/// Proxies one request; with an access log, also returns its entry so far.
async fn proxy(
    req: Request<Incoming>,
    cx: &ReqCx,
    st: &ListenerState,
) -> (
    Response<Body>,
    Option<(access::Entry, Arc<AccessLog>)>,
    Option<BackendLoad>,
) {
    let c = &st.counters;
    let t0 = Instant::now();
    c.requests.fetch_add(1, Ordering::Relaxed);
    let head = st.access.as_ref().map(|_| {
        (
            req.method().to_string(),
            access::path(req.uri().path_and_query().map_or("/", |p| p.as_str())),
        )
    });
    let mut routed = Routed {
        persistence: "off",
        ..Routed::default()
    };
    let resp = route(req, cx, st, &mut routed).await;
    let took = t0.elapsed();
    c.latency.record(took);
    let class = (resp.status().as_u16() / 100).clamp(2, 5) as usize - 2;
    c.by_class[class].fetch_add(1, Ordering::Relaxed);
    let log = match (&st.access, head) {
        (Some(to), Some((method, path))) => Some((
            access::Entry {
                time: access::now_rfc3339(),
                listener: st.snapshot.load().cfg.name.clone(),
                client: cx.peer,
                method,
                path,
                proto: if cx.info.h2 { "h2" } else { "h1" },
                status: resp.status().as_u16(),
                bytes: 0,
                backend: routed.backend,
                duration_ms: took.as_secs_f64() * 1000.0,
                persistence: routed.persistence,
                tls: cx.info.version,
                sni: cx.info.sni.clone(),
            },
            to.clone(),
        )),
        _ => None,
    };
    (resp, log, routed.load.take())
}

fn client_error(st: &ListenerState, status: StatusCode, msg: &str) -> Response<Body> {
    st.counters.client_errors.fetch_add(1, Ordering::Relaxed);
    let mut r = text(status, msg);
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// The protocol an HTTP/1.1 request asks to upgrade to (`Connection: upgrade` plus
/// `Upgrade: PROTOCOL`), if any.
fn upgrade_of(req: &Request<Incoming>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    req.headers().get(header::UPGRADE).cloned()
}

/// The host a request was addressed to (its `Host`, or HTTP/2's `:authority`), without port.
fn request_host(req: &Request<Incoming>) -> Option<String> {
    let auth: Option<hyper::http::uri::Authority> = match req.headers().get(header::HOST) {
        Some(h) => h.to_str().ok()?.parse().ok(),
        None => req.uri().authority().cloned(),
    };
    auth.map(|a| a.host().to_owned())
}

/// `308` to the same URL over HTTPS on `port`.
fn redirect(req: &Request<Incoming>, vip: SocketAddr, port: u16) -> Response<Body> {
    let host = request_host(req).unwrap_or_else(|| match vip.ip() {
        std::net::IpAddr::V4(a) => a.to_string(),
        std::net::IpAddr::V6(a) => format!("[{a}]"),
    });
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let loc = if port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{port}{path}")
    };
    let mut r = text(StatusCode::PERMANENT_REDIRECT, "moved to https");
    if let Ok(v) = HeaderValue::from_str(&loc) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

async fn route(
    mut req: Request<Incoming>,
    cx: &ReqCx,
    st: &ListenerState,
    routed: &mut Routed,
) -> Response<Body> {
    let snap = st.snapshot.load_full();
    let cfg = &snap.cfg;
    if req.headers().get_all(header::HOST).iter().count() > 1 {
        return client_error(st, StatusCode::BAD_REQUEST, "more than one Host header");
    }
    if req.version() == Version::HTTP_11 && !req.headers().contains_key(header::HOST) {
        return client_error(st, StatusCode::BAD_REQUEST, "HTTP/1.1 request without Host");
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
    // A reverse proxy is no tunnel to anywhere: CONNECT (HTTP/1.1, and HTTP/2 without the
    // extended-CONNECT protocol, which is not offered) is refused.
    if req.method() == Method::CONNECT {
        let mut r = client_error(st, StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not served");
        r.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"),
        );
        return r;
    }
    if let Some(port) = cfg.redirect_https {
        return redirect(&req, cfg.vip, port);
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
    let upgrade = upgrade_of(&req);
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let authority = req.uri().authority().cloned();
    let (mut parts, body) = req.into_parts();
    let cookie = take_cookie(&mut parts.headers, &cfg.cookie_name);
    let had_cookie = cookie.is_some();
    let now = unix_now();
    // A valid cookie of a backend that still takes clients decides; anything else reschedules.
    let mut set_cookie = cfg.persist > 0;
    let mut chosen = None;
    if cfg.persist > 0
        && let Some(c) = cookie.and_then(|v| st.key.decode(&cfg.name, &v, now, cfg.persist))
        && let Some(i) = snap.tags.iter().position(|t| *t == c.tag)
        && cfg.backends[i].accepting
    {
        chosen = Some(i);
        st.counters.cookie_hits.fetch_add(1, Ordering::Relaxed);
        // Refresh once half the lifetime is gone; replace a cookie of an earlier release.
        set_cookie = c.legacy || c.expiry.saturating_sub(now) < u64::from(cfg.persist) / 2;
    }
    if cfg.persist > 0 {
        routed.persistence = match (chosen, had_cookie) {
            (Some(_), _) => "hit",
            (None, true) => "rescheduled",
            (None, false) => "new",
        };
    }
    let Some(i) = chosen.or_else(|| st.next_backend(&snap)) else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "no backend available");
    };
    let backend = cfg.backends[i].addr;
    routed.backend = Some(backend);
    routed.load = Some(BackendLoad::new(&snap.loads[i]));
    *lock(&st.counters.per_backend).entry(backend).or_default() += 1;

    strip_hop_by_hop(&mut parts.headers);
    if let Some(u) = &upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, u.clone());
    }
    if parts.version == Version::HTTP_2 {
        // HTTP/2 may split cookies into several fields; HTTP/1.1 has one (RFC 9113 §8.2.3).
        join_cookies(&mut parts.headers);
        if !parts.headers.contains_key(header::HOST)
            && let Some(a) = &authority
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            parts.headers.insert(header::HOST, v);
        }
    }
    // Backends speak HTTP/1.1 whatever the client spoke.
    parts.version = Version::HTTP_11;
    let peer = cx.peer;
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
    let scheme = snap.scheme();
    let fwd = format!("for={for_node};proto={scheme};by=\"{}\"", cfg.vip);
    let fwd = match parts.headers.get("forwarded").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {fwd}"),
        None => fwd,
    };
    for (k, v) in [
        ("x-forwarded-for", xff),
        ("x-forwarded-proto", scheme.into()),
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
    let mut resp = match tokio::time::timeout(io_timeout, st.client.request(upstream)).await {
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
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    let backend_upgrade = match (&client_upgrade, switching) {
        (Some(_), true) => Some(hyper::upgrade::on(&mut resp)),
        (None, true) => {
            // A 101 the client did not ask for would leave both sides speaking different
            // protocols over a connection hyper still frames as HTTP.
            st.counters.upstream_errors.fetch_add(1, Ordering::Relaxed);
            return text(
                StatusCode::BAD_GATEWAY,
                "backend switched protocols unasked",
            );
        }
        _ => None,
    };
    let (mut rp, rb) = resp.into_parts();
    // A response framed by Transfer-Encoding is re-framed here: a Content-Length beside it
    // (which the backend should not have sent) must not reach the client.
    if rp.headers.contains_key(header::TRANSFER_ENCODING) {
        rp.headers.remove(header::CONTENT_LENGTH);
    }
    let their_upgrade = rp.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut rp.headers);
    if set_cookie {
        let value = st.key.encode(&cfg.name, snap.tags[i], now);
        let c = format!("{}={value}{}", cfg.cookie_name, snap.cookie_attrs);
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
    if let (Some(client_up), Some(backend_up)) = (client_upgrade, backend_upgrade) {
        rp.headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(u) = their_upgrade.or(upgrade) {
            rp.headers.insert(header::UPGRADE, u);
        }
        st.counters.upgrades.fetch_add(1, Ordering::Relaxed);
        // The tunnel stays counted on its backend while it lasts (least requests sees
        // WebSockets).
        let load = routed.load.take();
        let t = tunnel(client_up, backend_up, cx.act.clone(), cx.hold.clone(), peer);
        tokio::spawn(async move {
            t.await;
            drop(load);
        });
    }
    Response::from_parts(rp, rb.map_err(|e| Box::new(e) as BoxError).boxed())
}

/// Idle time after which an upgraded connection (a WebSocket) is closed: the TCP idle timeout
/// of L4 listeners, not the HTTP keep-alive.
pub const TUNNEL_IDLE: Duration =
    Duration::from_secs(clb_common::DEFAULT_TCP_IDLE_TIMEOUT_SECS as u64);

/// Once both sides switched protocols: bytes flow both ways until either closes, or until
/// nothing moved for [`TUNNEL_IDLE`]. The connection stays counted (`hold`) meanwhile.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    backend: hyper::upgrade::OnUpgrade,
    act: Arc<Activity>,
    hold: Arc<Hold>,
    peer: SocketAddr,
) {
    let _hold = hold;
    let (c, b) = tokio::join!(client, backend);
    let (Ok(c), Ok(b)) = (c, b) else {
        debug!(%peer, "upgrade did not complete");
        return;
    };
    let (mut c, mut b) = (TokioIo::new(c), TokioIo::new(b));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let copy = tokio::io::copy_bidirectional(&mut c, &mut b);
    tokio::pin!(copy);
    loop {
        tokio::select! {
            r = copy.as_mut() => {
                if let Err(e) = r {
                    debug!(%peer, "upgraded connection ended: {e}");
                }
                return;
            }
            _ = tick.tick() => {
                let idle = act.now_ms().saturating_sub(act.last_io_ms.load(Ordering::Relaxed));
                if idle > TUNNEL_IDLE.as_millis() as u64 {
                    debug!(%peer, "upgraded connection idle, closing");
                    return;
                }
            }
        }
    }
}

/// Joins several `Cookie` fields into one (`; `-separated), as HTTP/1.1 wants it.
fn join_cookies(h: &mut HeaderMap) {
    if h.get_all(header::COOKIE).iter().count() < 2 {
        return;
    }
    let joined: Vec<u8> = h
        .get_all(header::COOKIE)
        .iter()
        .map(|v| v.as_bytes())
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        h.insert(header::COOKIE, v);
    }
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
            tls: None,
            cert_error: None,
            samesite: crate::control::model::SameSite::Lax,
            redirect_https: None,
            max_headers: 100,
            persist: 60,
            keepalive_secs: 75,
            cookie_name: "c".into(),
            max_conns: 10,
            io_timeout_secs: 60,
            least_requests: false,
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

    #[test]
    fn least_requests_divides_in_flight_by_weight_among_accepting_backends() {
        let b = |weight, accepting| L7Backend {
            addr: "10.0.10.2:80".parse().unwrap(),
            weight,
            accepting,
        };
        let backends = [b(10, true), b(20, true), b(10, false), b(0, true)];
        let loads: Vec<Arc<AtomicU64>> = [3, 5, 0, 0]
            .into_iter()
            .map(|n| Arc::new(AtomicU64::new(n)))
            .collect();
        // 3/10 > 5/20: the heavier backend; not accepting and weight 0 never.
        assert_eq!(least_loaded(&backends, &loads, 0), Some(1));
        loads[1].store(6, Ordering::Relaxed);
        // 3/10 = 6/20: a tie goes to the first from the rotating start.
        assert_eq!(least_loaded(&backends, &loads, 0), Some(0));
        assert_eq!(least_loaded(&backends, &loads, 1), Some(1));
        assert_eq!(least_loaded(&[b(10, false)], &loads[..1], 0), None);
        // Counted while the guard lives.
        let g = BackendLoad::new(&loads[0]);
        assert_eq!(loads[0].load(Ordering::Relaxed), 4);
        drop(g);
        assert_eq!(loads[0].load(Ordering::Relaxed), 3);
    }
}
