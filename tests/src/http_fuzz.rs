//! The HTTP fuzzer: generated and mutated HTTP/1.1 and HTTP/2 inputs (malformed heads,
//! cookies — valid, tampered, repeated —, bodies, upgrade requests, h2 frames) fed to the
//! proxy's connection handler ([`clb::l7::proxy::serve_stream`]) over in-memory pipes, with a
//! real backend on loopback that answers plain requests and accepts upgrades.
//!
//! Invariants per input: no panic anywhere (the connection's task, hyper's, a tunnel's), the
//! connection ends within [`DEADLINE`] once the client has sent everything and closed its
//! side, and what comes back to an HTTP/1.x client is an HTTP/1.x response (the proxy answers
//! HTTP/1.0 requests in HTTP/1.0).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clb::l7::{
    CookieKey, L7Backend, L7Config,
    proxy::{ListenerState, Snapshot, serve_stream},
};
use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// How long a connection may take to end once its client sent its input and closed.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// Inputs in flight at once.
const PARALLEL: usize = 256;
/// How long a client waits for more of an answer before it closes its side.
const ANSWER_WAIT: Duration = Duration::from_millis(50);

#[derive(Debug, Default)]
pub struct HttpFuzzReport {
    pub inputs: u64,
    pub seconds: f64,
    /// Requests the backend answered (inputs that made it through the proxy).
    pub backend_requests: u64,
    pub panics: u64,
    /// Connections still open [`DEADLINE`] after their client closed.
    pub hung: u64,
    /// HTTP/1.x clients that got something other than an HTTP/1.x response back.
    pub garbled: u64,
    /// The seeds (their first bytes) that reached the backend unmutated.
    pub seeds_proxied: Vec<String>,
    /// A few failing inputs, for the report.
    pub examples: Vec<Vec<u8>>,
}

/// xorshift64*: fast, deterministic per seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const COOKIE: &str = "clb_session";

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK literal header field without indexing, new name.
fn hpack_literal(name: &str, value: &str) -> Vec<u8> {
    let mut b = vec![0x00, name.len() as u8];
    b.extend(name.as_bytes());
    b.push(value.len().min(127) as u8);
    b.extend(&value.as_bytes()[..value.len().min(127)]);
    b
}

/// Seed inputs: (bytes, is HTTP/2).
fn seeds(valid_cookie: &str) -> Vec<(Vec<u8>, bool)> {
    let h1 = |s: String| (s.into_bytes(), false);
    let mut v = vec![
        h1("GET / HTTP/1.1\r\nHost: shop\r\n\r\n".into()),
        h1(format!(
            "GET /cart?x=1 HTTP/1.1\r\nHost: shop\r\nCookie: a=1; {COOKIE}={valid_cookie}; b=2\r\n\r\n"
        )),
        h1(format!(
            "GET / HTTP/1.1\r\nHost: shop\r\nCookie: {COOKIE}=AAAA{valid_cookie}\r\nCookie: {COOKIE}=\r\n\r\n"
        )),
        h1("POST /pay HTTP/1.1\r\nHost: shop\r\nContent-Length: 5\r\n\r\nhello".into()),
        h1("POST /pay HTTP/1.1\r\nHost: shop\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into()),
        h1("POST / HTTP/1.1\r\nHost: shop\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nzz\r\n".into()),
        h1(format!(
            "GET /ws HTTP/1.1\r\nHost: shop\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nCookie: {COOKIE}={valid_cookie}\r\n\r\nframes"
        )),
        h1("OPTIONS * HTTP/1.1\r\nHost: shop\r\n\r\n".into()),
        h1("CONNECT shop:443 HTTP/1.1\r\nHost: shop:443\r\n\r\n".into()),
        h1("GET / HTTP/1.0\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into()),
        h1("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".into()),
        h1("GET http://other/abs HTTP/1.1\r\nHost: shop\r\nX-Forwarded-For: 1.2.3.4\r\nForwarded: for=x\r\n\r\n".into()),
    ];
    let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2.extend(h2_frame(4, 0, 0, &[]));
    let mut block = vec![0x82, 0x87, 0x84, 0x41, 4];
    block.extend(b"shop");
    block.extend(hpack_literal("cookie", &format!("{COOKIE}={valid_cookie}")));
    block.extend(hpack_literal("cookie", "a=1"));
    let mut get = h2.clone();
    get.extend(h2_frame(1, 0x5, 1, &block));
    v.push((get.clone(), true));
    let mut post = h2.clone();
    let mut pblock = vec![0x83, 0x87, 0x84, 0x41, 4];
    pblock.extend(b"shop");
    post.extend(h2_frame(1, 0x4, 1, &pblock));
    post.extend(h2_frame(0, 0x1, 1, b"body"));
    v.push((post, true));
    let mut rr = h2.clone();
    for id in [1u32, 3, 5, 7] {
        rr.extend(h2_frame(1, 0x5, id, &block));
        rr.extend(h2_frame(3, 0, id, &8u32.to_be_bytes()));
    }
    v.push((rr, true));
    let mut cont = h2.clone();
    cont.extend(h2_frame(1, 0x1, 1, &block[..3]));
    cont.extend(h2_frame(9, 0x4, 1, &block[3..]));
    v.push((cont, true));
    let mut connect = h2;
    connect.extend(h2_frame(
        1,
        0x5,
        1,
        &[0x02, 0x07, b'C', b'O', b'N', b'N', b'E', b'C', b'T'],
    ));
    v.push((connect, true));
    v
}

const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"\r\n\r\n",
    b": ",
    b";",
    b"=",
    b"\x00",
    b"\xff\xfe",
    b" HTTP/1.1",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 18446744073709551616\r\n",
    b"Content-Length: -1\r\n",
    b"Cookie: clb_session=\r\n",
    b"Connection: upgrade\r\nUpgrade: h2c\r\n",
    b"Connection: keep-alive, x-secret\r\n",
    b"Expect: 100-continue\r\n",
    b"ffffffffffffffff\r\n",
    b"\x00\x00\x04\x08\x00\x00\x00\x00\x00",
    b"\x00\x40\x00\x01\x04\x00\x00\x00\x03",
];

fn mutate(rng: &mut Rng, seeds: &[(Vec<u8>, bool)]) -> (Vec<u8>, bool) {
    let (mut b, h2) = seeds[rng.below(seeds.len())].clone();
    for _ in 0..=rng.below(4) {
        let at = rng.below(b.len() + 1);
        match rng.below(7) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 => b.insert(at, rng.next() as u8),
            2 if at < b.len() => {
                let n = rng.below(b.len() - at).min(64);
                b.drain(at..at + n);
            }
            3 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                b.splice(at..at, t.iter().copied());
            }
            4 if at < b.len() => {
                let n = rng.below(b.len() - at).min(256);
                let dup: Vec<u8> = b[at..at + n].to_vec();
                b.splice(at..at, dup);
            }
            5 => b.truncate(at),
            _ => {
                let other = &seeds[rng.below(seeds.len())].0;
                let from = rng.below(other.len());
                b.extend_from_slice(&other[from..]);
            }
        }
        if b.len() > 64 * 1024 {
            b.truncate(64 * 1024);
        }
    }
    (b, h2)
}

/// A backend on loopback: 200 with a small body, or 101 and an echo for upgrade requests.
async fn backend() -> std::io::Result<(SocketAddr, Arc<AtomicU64>)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let h = h.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |mut req: Request<hyper::body::Incoming>| {
                    h.fetch_add(1, Ordering::Relaxed);
                    async move {
                        if req.headers().contains_key(hyper::header::UPGRADE) {
                            let up = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                if let Ok(u) = up.await {
                                    let mut io = TokioIo::new(u);
                                    let mut buf = [0u8; 1024];
                                    if let Ok(Ok(n)) = tokio::time::timeout(
                                        Duration::from_secs(1),
                                        io.read(&mut buf),
                                    )
                                    .await
                                    {
                                        io.write_all(&buf[..n]).await.ok();
                                    }
                                }
                            });
                            let mut r = Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
                            r.headers_mut().insert(
                                hyper::header::CONNECTION,
                                hyper::header::HeaderValue::from_static("upgrade"),
                            );
                            r.headers_mut().insert(
                                hyper::header::UPGRADE,
                                hyper::header::HeaderValue::from_static("websocket"),
                            );
                            return Ok::<_, Infallible>(r);
                        }
                        Ok(Response::new(Full::new(Bytes::from_static(b"{\"ok\":1}"))))
                    }
                });
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await
                    .ok();
            });
        }
    });
    Ok((addr, hits))
}

/// Feeds `n` inputs (seeded by `seed`) through the proxy.
pub fn run(n: u64, seed: u64) -> HttpFuzzReport {
    let panics = Arc::new(AtomicU64::new(0));
    let prev = std::panic::take_hook();
    let p = panics.clone();
    std::panic::set_hook(Box::new(move |info| {
        p.fetch_add(1, Ordering::Relaxed);
        eprintln!("panic in the proxy: {info}");
    }));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut report = rt.block_on(fuzz(n, seed));
    drop(rt);
    std::panic::set_hook(prev);
    // The hook sees every panic, in any task; the join results only the connections' own.
    report.panics = report.panics.max(panics.load(Ordering::Relaxed));
    report
}

async fn fuzz(n: u64, seed: u64) -> HttpFuzzReport {
    let (addr, hits) = backend().await.expect("a loopback backend");
    let key = CookieKey([7; 32]);
    let cfg = L7Config {
        name: "shop".into(),
        vip: "10.0.0.100:80".parse().unwrap(),
        tls: None,
        cert_error: None,
        samesite: clb::control::model::SameSite::Lax,
        redirect_https: None,
        max_headers: 100,
        persist: 600,
        keepalive_secs: 5,
        cookie_name: COOKIE.into(),
        max_conns: 100_000,
        io_timeout_secs: 5,
        least_requests: false,
        backends: vec![L7Backend {
            addr,
            weight: 10,
            accepting: true,
        }],
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let valid = key.encode("shop", key.tag("shop", addr), now);
    let seeds = seeds(&valid);
    let state = Arc::new(
        ListenerState::new(
            Snapshot::new(cfg, &key),
            key,
            clb::l7::ConnBudget::new(PARALLEL * 4),
            None,
        )
        .expect("a listener"),
    );
    let mut rng = Rng(seed | 1);
    let mut report = HttpFuzzReport::default();
    // Each seed as it is, one at a time: which of them reach the backend (the fuzzer's
    // starting points must exercise the whole request path, HTTP/2 included).
    for (input, h2) in &seeds {
        let before = hits.load(Ordering::Relaxed);
        let o = one(
            input.clone(),
            *h2,
            state.clone(),
            "198.51.100.7:40000".parse().unwrap(),
        )
        .await;
        tally(&mut report, o);
        if hits.load(Ordering::Relaxed) > before {
            report
                .seeds_proxied
                .push(String::from_utf8_lossy(&input[..input.len().min(24)]).into_owned());
        }
    }
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let peer: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    for _ in 0..n {
        while set.len() >= PARALLEL {
            if let Some(Ok(outcome)) = set.join_next().await {
                tally(&mut report, outcome);
            }
        }
        let (input, h2) = mutate(&mut rng, &seeds);
        set.spawn(one(input, h2, state.clone(), peer));
    }
    while let Some(r) = set.join_next().await {
        if let Ok(outcome) = r {
            tally(&mut report, outcome);
        }
    }
    report.inputs = n;
    report.backend_requests = hits.load(Ordering::Relaxed);
    report.seconds = t0.elapsed().as_secs_f64();
    report
}

/// One input on a connection of its own.
async fn one(input: Vec<u8>, h2: bool, st: Arc<ListenerState>, peer: SocketAddr) -> Outcome {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let conn = tokio::spawn(serve_stream(server, peer, st, h2));
    let io = async {
        client.write_all(&input).await.ok();
        // The client reads answers until they pause before it closes its side: a server that
        // sees the end of its input at once may rightly drop a request it did not answer yet.
        let mut out = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(Ok(n)) = tokio::time::timeout(ANSWER_WAIT, client.read(&mut buf)).await {
            if n == 0 || out.len() > 1 << 20 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        client.shutdown().await.ok();
        client.read_to_end(&mut out).await.ok();
        out
    };
    let out = tokio::time::timeout(DEADLINE, io).await.unwrap_or_default();
    let ended = tokio::time::timeout(DEADLINE, conn).await;
    let panicked = matches!(&ended, Ok(Err(e)) if e.is_panic());
    let hung = ended.is_err();
    let garbled =
        !h2 && !out.is_empty() && !out.starts_with(b"HTTP/1.1 ") && !out.starts_with(b"HTTP/1.0 ");
    Outcome {
        input,
        panicked,
        hung,
        garbled,
    }
}

struct Outcome {
    input: Vec<u8>,
    panicked: bool,
    hung: bool,
    garbled: bool,
}

fn tally(r: &mut HttpFuzzReport, o: Outcome) {
    r.hung += u64::from(o.hung);
    r.garbled += u64::from(o.garbled);
    if (o.panicked || o.hung || o.garbled) && r.examples.len() < 5 {
        r.examples.push(o.input);
    }
    if o.panicked {
        r.panics += 1;
    }
}
