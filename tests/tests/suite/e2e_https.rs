//! End-to-end tests of HTTPS listeners with clients no one here wrote: curl (HTTP/1.1 and
//! HTTP/2, with a cookie jar), `openssl s_client` (SNI, a kept-alive connection across a
//! certificate rotation, raw HTTP/2 frames for the hostile cases), h2load, and Debian's
//! `python3-websockets` as WebSocket client and backend. Certificates come from a test CA made
//! with `openssl req`.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use clb_tests::{
    daemon::Daemon,
    http::HttpServer,
    netns::{NetNs, Topology, VIP, backend_ip, sh, unique_name},
};

const PORT: u16 = 8081;
const WS_PORT: u16 = 8082;
/// Debian's interpreter, which has Debian's `python3-websockets` (the `python3` on PATH may
/// be another one).
const PYTHON: &str = "/usr/bin/python3";

/// A directory removed on drop.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

impl Dir {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(unique_name(tag));
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
    fn file(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

fn make_ca(d: &Dir) {
    clb_tests::pki::make_ca(&d.0).unwrap();
}

/// Issues (or re-issues: a rotation) `stem.pem` / `stem.key` for `name`.
fn issue(d: &Dir, stem: &str, name: &str) {
    clb_tests::pki::issue(&d.0, stem, name).unwrap();
}

/// The first PEM certificate in `text`.
fn first_pem(text: &str) -> Option<String> {
    let a = text.find("-----BEGIN CERTIFICATE-----")?;
    let end = "-----END CERTIFICATE-----";
    let b = text[a..].find(end)? + a + end.len();
    Some(text[a..b].to_owned())
}

/// The certificate the listener on `vip` serves for `sni` (none: no SNI sent).
fn served_cert(ns: &NetNs, vip: &str, sni: Option<&str>) -> String {
    let mut args = vec!["openssl", "s_client", "-connect", vip];
    match sni {
        Some(n) => args.extend(["-servername", n]),
        None => args.push("-noservername"),
    }
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name()])
        .args(&args)
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    let out = cmd.output().expect("openssl s_client");
    first_pem(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|| panic!("no certificate from {vip} for {sni:?}"))
}

/// Whether a second `openssl s_client` (TLS `version` flag) resumes the session of a first.
fn resumes(ns: &NetNs, vip: &str, version: &str, sess: &str) -> bool {
    let run = |extra: [&str; 2]| {
        let mut p = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.name(),
                "openssl",
                "s_client",
                "-connect",
                vip,
            ])
            .args(["-servername", "shop.example", version])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_client");
        // Open for a moment: TLS 1.3 tickets come after the handshake.
        std::thread::sleep(Duration::from_millis(500));
        drop(p.stdin.take());
        let out = p.wait_with_output().expect("openssl s_client");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(["-sess_out", sess]);
    run(["-sess_in", sess]).contains("Reused, TLSv1")
}

struct Curl {
    status: u16,
    version: String,
    headers: String,
    body: serde_json::Value,
}

/// One curl run from `ns` (one new TLS connection per URL list), with cookie jar `jar`.
fn curl(ns: &NetNs, ca: &str, jar: &str, args: &[&str], url: &str) -> Curl {
    let hdr = format!("{jar}.headers");
    let mut a = vec![
        "curl",
        "-sS",
        "--max-time",
        "10",
        "--cacert",
        ca,
        "--resolve",
        "shop.example:443:10.0.0.100",
        "-c",
        jar,
        "-b",
        jar,
        "-D",
        &hdr,
        "-w",
        "\n%{http_code} %{http_version}",
    ];
    a.extend_from_slice(args);
    a.push(url);
    let out = ns
        .exec(&a)
        .unwrap_or_else(|e| panic!("curl {args:?}: {e:#}"));
    let (body, tail) = out.rsplit_once('\n').unwrap();
    let (code, version) = tail.split_once(' ').unwrap();
    Curl {
        status: code.parse().unwrap(),
        version: version.to_owned(),
        headers: std::fs::read_to_string(&hdr).unwrap_or_default(),
        body: serde_json::from_str(body).unwrap_or(serde_json::Value::String(body.into())),
    }
}

fn set_cookie(headers: &str) -> Option<String> {
    headers
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .map(|l| l["set-cookie:".len()..].trim().to_owned())
}

/// A config with listener `shop` (https on VIP:443, HTTP backends) and `chat` (https on
/// VIP:8443, WebSocket backends), both with cookie persistence.
fn config(d: &Dir, n: usize) -> String {
    // One HTTPS listener on VIP:`port` with certificates `stems`, over backends on `be_port`.
    let listener = |name: &str, port: u16, stems: &[&str], be_port: u16| {
        let mut s = format!(
            "[[listener]]\nname = \"{name}\"\nvip = \"{VIP}:{port}\"\nproto = \"https\"\npersist = 600\n"
        );
        for st in stems {
            s += &format!(
                "[[listener.certificate]]\ncert = \"{}\"\nkey = \"{}\"\n",
                d.file(&format!("{st}.pem")),
                d.file(&format!("{st}.key"))
            );
        }
        for i in 0..n {
            s += &format!(
                "[[listener.backend]]\naddr = \"{}:{be_port}\"\n",
                backend_ip(i)
            );
        }
        s
    };
    listener("shop", 443, &["shop", "api"], PORT) + &listener("chat", 8443, &["shop"], WS_PORT)
}

const WS_SERVER: &str = r#"
import asyncio, sys, websockets
name, port = sys.argv[1], int(sys.argv[2])
async def echo(ws, path=None):
    async for m in ws:
        await ws.send(f"{name}:{m}")
async def main():
    async with websockets.serve(echo, "0.0.0.0", port):
        await asyncio.Future()
asyncio.run(main())
"#;

const WS_CLIENT: &str = r#"
import asyncio, json, ssl, sys, websockets
vip, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
kw = dict(host=vip, port=port, ssl=ctx, server_hostname="shop.example")
uri = f"wss://shop.example:{port}/live"
async def main():
    async with websockets.connect(uri, **kw) as ws:
        await ws.send("hello")
        first = await ws.recv()
        cookie = ws.response_headers.get("Set-Cookie", "")
    replies = []
    async with websockets.connect(uri, extra_headers={"Cookie": cookie.split(";")[0]}, **kw) as ws:
        for i in range(20):
            await ws.send(f"m{i}")
            replies.append(await ws.recv())
    print(json.dumps({"first": first, "set_cookie": cookie, "replies": replies}))
asyncio.run(asyncio.wait_for(main(), 30))
"#;

/// A process started in a namespace; killed (by pid) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

fn spawn_in(ns: &NetNs, args: &[&str], stdin: bool) -> Proc {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns.name()]).args(args);
    c.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    Proc(c.spawn().expect("spawn"))
}

/// Reads a child's stdout on a thread; chunks arrive on the channel.
fn reader(p: &mut Proc) -> mpsc::Receiver<Vec<u8>> {
    let mut out = p.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Collects from `rx` until `done` holds for what arrived, or `timeout`; returns it.
fn collect_until(
    rx: &mpsc::Receiver<Vec<u8>>,
    timeout: Duration,
    done: impl Fn(&str) -> bool,
) -> String {
    let end = Instant::now() + timeout;
    let mut got = Vec::new();
    while Instant::now() < end {
        if let Ok(c) = rx.recv_timeout(Duration::from_millis(100)) {
            got.extend(c);
            if done(&String::from_utf8_lossy(&got)) {
                break;
            }
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn start(tag: &str, d: &Dir, n: usize) -> (Topology, Vec<HttpServer>, Daemon) {
    make_ca(d);
    issue(d, "shop", "shop.example");
    issue(d, "api", "api.example");
    let topo = Topology::new(tag, n, 0).unwrap();
    let servers: Vec<HttpServer> = (0..n)
        .map(|i| {
            HttpServer::start(
                &topo.backends[i],
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
                &format!("b{i}"),
            )
            .unwrap()
        })
        .collect();
    let log = d.file("access.log");
    let daemon = Daemon::start_with(
        &topo,
        &config(d, n),
        &["--metrics", "127.0.0.1:9902", "--access-log", &log],
    );
    let ca = d.file("ca.pem");
    let jar = d.file("probe.jar");
    let up = clb_tests::wait_for(Duration::from_secs(10), || {
        let mut a = vec![
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            "2",
            "--cacert",
            &ca,
            "--resolve",
            "shop.example:443:10.0.0.100",
            "-c",
            &jar,
        ];
        a.push("https://shop.example/");
        topo.client.exec(&a).ok()
    });
    assert!(
        up.is_some(),
        "HTTPS listener never answered:\n{}",
        daemon.log()
    );
    (topo, servers, daemon)
}

#[test]
fn https_keeps_a_client_on_one_backend_over_http1_http2_and_websocket_and_rotates_certificates() {
    let d = Dir::new("https");
    let (topo, servers, daemon) = start("https", &d, 3);
    let ca = d.file("ca.pem");
    let jar = d.file("shop.jar");
    let url = "https://shop.example/cart";

    // 10 new TLS connections with the cookie: one backend; the cookie is Secure.
    let first = curl(&topo.client, &ca, &jar, &["--http1.1"], url);
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.version, "1.1");
    let sc = set_cookie(&first.headers).expect("a persistence cookie");
    for attr in [
        "Secure",
        "HttpOnly",
        "SameSite=Lax",
        "Max-Age=600",
        "Path=/",
    ] {
        assert!(sc.contains(attr), "cookie without {attr}: {sc}");
    }
    let owner = first.body["backend"].as_str().unwrap().to_owned();
    assert_eq!(first.body["x_forwarded_proto"], "https");
    assert!(
        first.body["forwarded"]
            .as_str()
            .is_some_and(|f| f.contains("proto=https")),
        "{:?}",
        first.body
    );
    assert_eq!(
        first.body["cookie"],
        serde_json::Value::Null,
        "cookie not taken out"
    );
    for _ in 0..10 {
        let r = curl(&topo.client, &ca, &jar, &["--http1.1"], url);
        assert_eq!(r.body["backend"], owner.as_str(), "{:?}", r.body);
    }
    // HTTP/2 with the cookie: that backend, for several streams of one connection too.
    for _ in 0..3 {
        let r = curl(&topo.client, &ca, &jar, &["--http2"], url);
        assert_eq!(r.version, "2");
        assert_eq!(r.body["backend"], owner.as_str(), "{:?}", r.body);
    }
    // Without the cookie, h2 streams are spread by round robin.
    let fresh = d.file("fresh.jar");
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        std::fs::remove_file(&fresh).ok();
        let r = curl(&topo.client, &ca, &fresh, &["--http2"], url);
        seen.insert(r.body["backend"].as_str().unwrap_or_default().to_owned());
    }
    assert!(seen.len() >= 2, "new clients all went to {seen:?}");

    // h2load: 200 requests on 4 connections, 10 streams each at once, all with the cookie:
    // every one answered, all by the cookie's backend.
    let cookie_pair = sc.split(';').next().unwrap().to_owned();
    let before: Vec<u64> = servers
        .iter()
        .map(|s| s.requests.load(std::sync::atomic::Ordering::Relaxed))
        .collect();
    let h2 = topo
        .client
        .exec(&[
            "h2load",
            "-n",
            "200",
            "-c",
            "4",
            "-m",
            "10",
            "-H",
            &format!("cookie: {cookie_pair}"),
            "https://10.0.0.100/cart",
        ])
        .expect("h2load");
    assert!(h2.contains("200 succeeded"), "{h2}");
    assert!(h2.contains("Application protocol: h2"), "{h2}");
    let delta: Vec<u64> = servers
        .iter()
        .zip(&before)
        .map(|(s, b)| s.requests.load(std::sync::atomic::Ordering::Relaxed) - b)
        .collect();
    let idx: usize = owner[1..].parse().unwrap();
    assert_eq!(delta[idx], 200, "h2load requests per backend: {delta:?}");

    // SNI picks the right certificate of two; no SNI gets the first.
    let vip = format!("{VIP}:443");
    let shop_pem = first_pem(&std::fs::read_to_string(d.file("shop.pem")).unwrap()).unwrap();
    let api_pem = first_pem(&std::fs::read_to_string(d.file("api.pem")).unwrap()).unwrap();
    assert_eq!(
        served_cert(&topo.client, &vip, Some("api.example")),
        api_pem
    );
    assert_eq!(
        served_cert(&topo.client, &vip, Some("shop.example")),
        shop_pem
    );
    assert_eq!(served_cert(&topo.client, &vip, None), shop_pem);
    // Sessions resume, with TLS 1.3 tickets and with TLS 1.2.
    assert!(
        resumes(&topo.client, &vip, "-tls1_3", &d.file("s13")),
        "TLS 1.3 did not resume"
    );
    assert!(
        resumes(&topo.client, &vip, "-tls1_2", &d.file("s12")),
        "TLS 1.2 did not resume"
    );

    // A key that does not match its certificate is refused, naming the file; nothing changes.
    issue(&d, "other", "other.example");
    let bad = daemon.clb(&[
        "listener",
        "set",
        "shop",
        "--add-cert",
        &d.file("other.pem"),
        "--add-key",
        &d.file("shop.key"),
    ]);
    assert!(!bad.ok, "a mismatched key was accepted");
    assert!(
        bad.stderr.contains("other.pem") && bad.stderr.contains("does not match"),
        "{}",
        bad.stderr
    );
    let garbage = d.file("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let bad = daemon.clb(&[
        "listener",
        "set",
        "shop",
        "--add-cert",
        &garbage,
        "--add-key",
        &d.file("api.key"),
    ]);
    assert!(
        !bad.ok && bad.stderr.contains("garbage.pem"),
        "{}",
        bad.stderr
    );
    let ls = daemon.clb_ok(&["listener", "ls"]);
    assert!(
        ls.contains("cert shop.example") && ls.contains("cert api.example"),
        "{ls}"
    );
    assert!(ls.contains("expires 20"), "{ls}");
    assert_eq!(
        served_cert(&topo.client, &vip, Some("api.example")),
        api_pem
    );

    // Rotation: a kept-alive TLS connection stays open and answering across new files and a
    // reload; new handshakes get the new certificate.
    let mut old = spawn_in(
        &topo.client,
        &[
            "openssl",
            "s_client",
            "-connect",
            &vip,
            "-servername",
            "shop.example",
            "-quiet",
        ],
        true,
    );
    let rx = reader(&mut old);
    let request =
        format!("GET /cart HTTP/1.1\r\nHost: shop.example\r\nCookie: {cookie_pair}\r\n\r\n");
    let stdin = old.0.stdin.as_mut().unwrap();
    stdin.write_all(request.as_bytes()).unwrap();
    stdin.flush().unwrap();
    let a = collect_until(&rx, Duration::from_secs(5), |s| s.contains('}'));
    assert!(a.starts_with("HTTP/1.1 200") && a.contains(&owner), "{a}");
    issue(&d, "shop", "shop.example");
    daemon.clb_ok(&["reload"]);
    let new_pem = first_pem(&std::fs::read_to_string(d.file("shop.pem")).unwrap()).unwrap();
    assert_ne!(new_pem, shop_pem);
    assert_eq!(
        served_cert(&topo.client, &vip, Some("shop.example")),
        new_pem
    );
    let stdin = old.0.stdin.as_mut().unwrap();
    stdin.write_all(request.as_bytes()).unwrap();
    stdin.flush().unwrap();
    let b = collect_until(&rx, Duration::from_secs(5), |s| s.contains('}'));
    assert!(
        b.starts_with("HTTP/1.1 200") && b.contains(&owner),
        "the kept-alive connection stopped answering after the rotation: {b:?}"
    );
    drop(old);
    // And the cookie still holds.
    let r = curl(&topo.client, &ca, &jar, &["--http2"], url);
    assert_eq!(r.body["backend"], owner.as_str());

    // WebSocket: opened with the cookie, it lands on the cookie's backend and echoes.
    let script = d.file("ws_server.py");
    std::fs::write(&script, WS_SERVER).unwrap();
    let _ws_servers: Vec<Proc> = (0..3)
        .map(|i| {
            spawn_in(
                &topo.backends[i],
                &[PYTHON, &script, &format!("b{i}"), &WS_PORT.to_string()],
                false,
            )
        })
        .collect();
    let client_script = d.file("ws_client.py");
    std::fs::write(&client_script, WS_CLIENT).unwrap();
    let out = clb_tests::wait_for(Duration::from_secs(15), || {
        topo.client
            .exec(&[PYTHON, &client_script, "10.0.0.100", "8443", &ca])
            .ok()
    })
    .unwrap_or_else(|| panic!("the WebSocket client never succeeded:\n{}", daemon.log()));
    let ws: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let first = ws["first"].as_str().unwrap();
    let (ws_owner, hello) = first.split_once(':').unwrap();
    assert_eq!(hello, "hello");
    let ws_cookie = ws["set_cookie"].as_str().unwrap();
    assert!(ws_cookie.contains("Secure"), "{ws_cookie}");
    let replies: Vec<&str> = ws["replies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(replies.len(), 20);
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(*r, format!("{ws_owner}:m{i}"), "{replies:?}");
    }

    // Chromium, trusting the test certificate: two loads over h2, one backend.
    let spki = sh(&[
        "sh",
        "-c",
        &format!(
            "openssl x509 -in {} -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64",
            d.file("shop.pem")
        ),
    ])
    .unwrap();
    let driver = clb_tests::browser::Driver::start(&topo.client).unwrap();
    let extra = vec![
        format!("--ignore-certificate-errors-spki-list={}", spki.trim()),
        "--host-resolver-rules=MAP shop.example 10.0.0.100".to_owned(),
    ];
    let loads: Vec<(String, String)> = topo.client.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let c = driver.browser_with(&extra).await.expect("a browser");
            let mut loads = Vec::new();
            for _ in 0..2 {
                c.goto("https://shop.example/cart")
                    .await
                    .expect("page load");
                let body = c
                    .execute("return document.body.innerText", vec![])
                    .await
                    .unwrap();
                let proto = c
                    .execute(
                        "return performance.getEntriesByType('navigation')[0].nextHopProtocol",
                        vec![],
                    )
                    .await
                    .unwrap();
                let v: serde_json::Value =
                    serde_json::from_str(body.as_str().unwrap_or_default()).unwrap_or_default();
                loads.push((
                    v["backend"].as_str().unwrap_or_default().to_owned(),
                    proto.as_str().unwrap_or_default().to_owned(),
                ));
            }
            c.close().await.ok();
            loads
        })
    });
    assert_eq!(loads.len(), 2);
    assert!(
        !loads[0].0.is_empty(),
        "Chromium got no backend: {loads:?}\n{}",
        driver.log()
    );
    assert_eq!(loads[0].0, loads[1].0, "Chromium's two loads: {loads:?}");
    assert!(
        loads.iter().all(|(_, p)| p == "h2"),
        "Chromium's protocol: {loads:?}"
    );
    drop(driver);

    // Counted where operators look.
    let m = topo
        .lb
        .exec(&["curl", "-s", "http://127.0.0.1:9902/metrics"])
        .unwrap();
    for want in [
        "clb_http_upgrades_total{listener=\"chat\"} 2",
        "clb_http_request_duration_seconds_bucket{le=\"+Inf\",listener=\"shop\"}",
        "clb_tls_certificate_expiry_timestamp_seconds{",
        "clb_build_info{version=",
    ] {
        assert!(m.contains(want), "no {want} in /metrics:\n{m}");
    }
    // The two resumptions this test makes, at least: Chromium's second load may resume too.
    let resumed = m
        .lines()
        .find(|l| l.starts_with("clb_tls_resumed_handshakes_total{listener=\"shop\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(resumed >= 2, "resumed handshakes counted: {resumed}\n{m}");
    let h2_conns = m
        .lines()
        .find(|l| l.starts_with("clb_http_h2_connections_total{listener=\"shop\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(h2_conns >= 4 + 9, "h2 connections counted: {h2_conns}");
    assert!(
        m.contains("clb_http_access_log_entries_total{outcome=\"dropped\"} 0"),
        "{m}"
    );

    // The access log: one JSON object per request, with what it negotiated and where it went.
    let entries: Vec<serde_json::Value> = clb_tests::wait_for(Duration::from_secs(5), || {
        let text = std::fs::read_to_string(d.file("access.log")).ok()?;
        let v: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
            .collect();
        (v.len() > 200).then_some(v)
    })
    .expect("access log entries");
    let hit = entries
        .iter()
        .find(|e| e["proto"] == "h2" && e["persistence"] == "hit" && e["listener"] == "shop")
        .expect("an h2 request routed by its cookie");
    assert_eq!(hit["status"], 200);
    assert_eq!(hit["tls"], "TLSv1.3");
    assert_eq!(hit["method"], "GET");
    assert_eq!(hit["path"], "/cart");
    assert!(hit["bytes"].as_u64().unwrap() > 0, "{hit}");
    assert!(
        hit["backend"]
            .as_str()
            .is_some_and(|b| b.starts_with(&backend_ip(idx).to_string())),
        "{hit}"
    );
    assert!(
        entries
            .iter()
            .any(|e| e["persistence"] == "new" && e["proto"] == "h1" && e["sni"] == "shop.example")
    );
    assert!(
        entries
            .iter()
            .any(|e| e["listener"] == "chat" && e["status"] == 101)
    );
    drop(daemon);
}

/// Frames of HTTP/2 (RFC 9113 §4.1).
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// HPACK: `:method GET`, `:scheme https`, `:path /` (static table), `:authority shop.example`.
fn get_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x87, 0x84, 0x41, 12];
    b.extend_from_slice(b"shop.example");
    b
}

/// Raw bytes over TLS with ALPN h2 (`openssl s_client -quiet`); returns the process and
/// how long until the server closed the connection, at most `wait`.
fn h2_raw(ns: &NetNs, bytes: &[u8], wait: Duration) -> Option<Duration> {
    let vip = format!("{VIP}:443");
    let mut p = spawn_in(
        ns,
        &[
            "openssl",
            "s_client",
            "-connect",
            &vip,
            "-servername",
            "shop.example",
            "-alpn",
            "h2",
            "-quiet",
        ],
        true,
    );
    let t0 = Instant::now();
    let rx = reader(&mut p);
    // Give the handshake a moment; s_client buffers stdin until then anyway.
    if let Some(stdin) = p.0.stdin.as_mut() {
        for chunk in bytes.chunks(16 * 1024) {
            if stdin.write_all(chunk).is_err() {
                break;
            }
        }
        stdin.flush().ok();
    }
    let end = t0 + wait;
    while Instant::now() < end {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Some(t0.elapsed()),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    None
}

fn served(topo: &Topology, ca: &str, jar: &str) -> bool {
    curl(
        &topo.client,
        ca,
        jar,
        &["--http2"],
        "https://shop.example/cart",
    )
    .status
        == 200
}

#[test]
fn hostile_tls_and_http2_clients_leave_the_listener_serving_others() {
    let d = Dir::new("https-hostile");
    let (topo, _servers, daemon) = start("httpsx", &d, 2);
    let ca = d.file("ca.pem");
    let jar = d.file("j.jar");
    let vip = SocketAddrV4::new(VIP, 443);

    // Slow handshakes (slowloris over TLS): connections that never send a byte, and one
    // ClientHello cut mid-way. TLS garbage: a connection that sends no TLS at all.
    let (silent, cut, garbage) = topo.client.run(|| {
        let silent: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(vip).unwrap()).collect();
        let mut cut = TcpStream::connect(vip).unwrap();
        // A handshake record announcing 512 bytes, of which 60 come.
        let mut hello = vec![
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ];
        hello.extend([0x42; 49]);
        cut.write_all(&hello).unwrap();
        let mut garbage = TcpStream::connect(vip).unwrap();
        garbage
            .write_all(b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n\x00\xff\x13garbage")
            .unwrap();
        (silent, cut, garbage)
    });
    // Others are served meanwhile.
    assert!(served(&topo, &ca, &jar), "{}", daemon.log());
    let closed_within = |mut s: &TcpStream, limit: Duration| {
        s.set_read_timeout(Some(limit)).unwrap();
        let mut b = [0u8; 4096];
        let t0 = Instant::now();
        loop {
            match s.read(&mut b) {
                Ok(0) => return Some(t0.elapsed()),
                Ok(_) => continue,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return None;
                }
                Err(_) => return Some(t0.elapsed()),
            }
        }
    };
    assert!(
        closed_within(&garbage, Duration::from_secs(3)).is_some(),
        "a non-TLS client was kept open"
    );
    assert!(
        closed_within(&cut, Duration::from_secs(8)).is_some(),
        "a cut ClientHello was kept open past the handshake timeout"
    );
    for s in &silent {
        assert!(
            closed_within(s, Duration::from_secs(8)).is_some(),
            "a silent TLS client was kept open past the handshake timeout"
        );
    }

    // HTTP/2 rapid reset: 2000 streams opened and reset at once on one connection.
    let mut rr = PREFACE.to_vec();
    rr.extend(frame(4, 0, 0, &[]));
    for i in 0..2000u32 {
        let id = 2 * i + 1;
        rr.extend(frame(1, 0x5, id, &get_block()));
        rr.extend(frame(3, 0, id, &8u32.to_be_bytes()));
    }
    let closed = h2_raw(&topo.client, &rr, Duration::from_secs(10));
    assert!(served(&topo, &ca, &jar), "{}", daemon.log());
    // CONTINUATION flood: one header block that never ends, far past the header list limit.
    let mut cf = PREFACE.to_vec();
    cf.extend(frame(4, 0, 0, &[]));
    cf.extend(frame(1, 0x1, 1, &get_block()));
    let field = [0x00, 0x03, b'a', b'b', b'c', 0x03, b'x', b'y', b'z'];
    let chunk: Vec<u8> = field.iter().copied().cycle().take(9 * 113).collect();
    for _ in 0..400 {
        cf.extend(frame(9, 0, 1, &chunk));
    }
    let cont = h2_raw(&topo.client, &cf, Duration::from_secs(10));
    assert!(
        cont.is_some(),
        "a CONTINUATION flood past the header limit kept its connection"
    );
    assert!(served(&topo, &ca, &jar), "{}", daemon.log());
    eprintln!("rapid-reset connection closed after {closed:?}, CONTINUATION flood after {cont:?}");

    // Memory stays bounded; failures are counted, not logged per connection.
    let rss_kb: u64 = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid().unwrap()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(rss_kb < 256 * 1024, "daemon RSS {rss_kb} kB");
    let stats = daemon.clb_ok(&["stats", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let shop = v["http"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "shop")
        .unwrap()
        .clone();
    let fails = &shop["tls_failures"];
    assert!(fails["timeout"].as_u64().unwrap() >= 20, "{shop}");
    assert!(fails["protocol"].as_u64().unwrap() >= 1, "{shop}");
    let log = daemon.log();
    let noisy = log.lines().filter(|l| l.contains("TLS")).count();
    assert!(noisy < 5, "per-connection TLS lines in the log:\n{log}");
    drop(silent);
}
