//! Small HTTP backends (hyper) for the L7 tests and the demo. Each answers every request with
//! a JSON body naming itself and echoing what the proxy sent it:
//! `{"backend": NAME, "cookie": .., "x_forwarded_for": .., "x_forwarded_proto": ..,
//! "forwarded": .., "host": .., "connection": ..}`, except `GET /big`: [`BIG_BODY`] bytes.
//! `/slow` answers the same after [`SLOW`] (requests that stay in flight).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;

use crate::netns::NetNs;

/// How long `/slow` takes to answer.
pub const SLOW: std::time::Duration = std::time::Duration::from_secs(3);

/// Size of the body of `GET /big`.
pub const BIG_BODY: usize = 32 << 20;

/// A running HTTP backend; stops on drop.
pub struct HttpServer {
    pub name: String,
    pub addr: SocketAddr,
    /// Requests answered.
    pub requests: Arc<AtomicU64>,
    rt: Option<tokio::runtime::Runtime>,
}

impl HttpServer {
    /// Starts a backend named `name` on `addr` inside `ns`.
    pub fn start(ns: &NetNs, addr: impl Into<SocketAddr>, name: &str) -> std::io::Result<Self> {
        let addr = addr.into();
        let requests = Arc::new(AtomicU64::new(0));
        let (n, r) = (name.to_owned(), requests.clone());
        let rt = ns.run(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let listener = rt.block_on(tokio::net::TcpListener::bind(addr))?;
            rt.spawn(serve(listener, n, r));
            std::io::Result::Ok(rt)
        })?;
        Ok(Self {
            name: name.into(),
            addr,
            requests,
            rt: Some(rt),
        })
    }

    /// Stops the server (closes its listener and connections).
    pub fn stop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve(listener: tokio::net::TcpListener, name: String, requests: Arc<AtomicU64>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (name, requests) = (name.clone(), requests.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (name, requests) = (name.clone(), requests.clone());
                async move {
                    // Lossy, not `to_str`: a header's bytes need not be ASCII (cookies).
                    let h = |k: &str| {
                        req.headers()
                            .get(k)
                            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    };
                    if req.uri().path() == "/big" {
                        // A response larger than any socket buffer, for clients that do not
                        // read.
                        requests.fetch_add(1, Ordering::Relaxed);
                        return Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                            vec![b'x'; BIG_BODY],
                        ))));
                    }
                    if req.uri().path() == "/slow" {
                        tokio::time::sleep(SLOW).await;
                    }
                    let body = serde_json::json!({
                        "backend": name,
                        "path": req.uri().path(),
                        "cookie": h("cookie"),
                        "x_forwarded_for": h("x-forwarded-for"),
                        "x_forwarded_proto": h("x-forwarded-proto"),
                        "forwarded": h("forwarded"),
                        "host": h("host"),
                        "connection": h("connection"),
                    });
                    // Read (and discard) the request body so uploads complete.
                    let _discarded = req.into_body().collect().await;
                    requests.fetch_add(1, Ordering::Relaxed);
                    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
                    r.headers_mut().insert(
                        "content-type",
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(r)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                eprintln!("http backend: {e}");
            }
        });
    }
}

/// One `GET /` on a new connection from `ns` to `vip`, with an optional `Cookie` header.
/// Returns the answering backend's name and the `Set-Cookie` value (name=value), if any.
/// (A plain HTTP/1.1 exchange with `Connection: close`, for the demo; the tests use reqwest.)
pub fn get_once(
    ns: &NetNs,
    vip: impl Into<SocketAddr>,
    cookie: Option<&str>,
) -> std::io::Result<(String, Option<String>)> {
    use std::io::{Read as _, Write as _};
    let vip: SocketAddr = vip.into();
    let mut s = ns.run(|| std::net::TcpStream::connect(vip))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let cookie = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET / HTTP/1.1\r\nHost: {vip}\r\n{cookie}Connection: close\r\n\r\n").as_bytes(),
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let set_cookie = out
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|v| v.split(';').next())
        .map(str::to_owned);
    let backend = out
        .split("\"backend\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or("?")
        .to_owned();
    Ok((backend, set_cookie))
}
