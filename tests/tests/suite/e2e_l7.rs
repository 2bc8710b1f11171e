//! End-to-end tests of the HTTP listener with cookie persistence: the daemon in the balancer
//! namespace, HTTP backends in backend namespaces, a real HTTP client with a cookie store
//! (reqwest) and raw sockets in the client namespace.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use clb_tests::{
    daemon::{Daemon, one_listener_config},
    http::HttpServer,
    netns::{CLIENT_IP, NetNs, Topology, VIP, backend_ip},
};

const PORT: u16 = 8081;

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, 80)
}

fn be(i: usize) -> String {
    format!("{}:{PORT}", backend_ip(i))
}

fn config(n: usize, extra: &str) -> String {
    one_listener_config("shop", vip(), "http", n, PORT, extra)
}

struct Env {
    daemon: Daemon,
    servers: Vec<HttpServer>,
    topo: Topology,
}

fn env(tag: &str, n: usize, clients: usize, extra: &str) -> Env {
    let topo = Topology::new(tag, n, clients).unwrap();
    let servers = (0..n)
        .map(|i| {
            HttpServer::start(
                &topo.backends[i],
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
                &format!("b{i}"),
            )
            .unwrap()
        })
        .collect();
    let daemon = Daemon::start(&topo, &config(n, extra));
    // The listener is up once it answers.
    let up = clb_tests::wait_for(Duration::from_secs(10), || {
        raw_request(
            &topo.client,
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .ok()
    });
    assert!(
        up.is_some(),
        "HTTP listener never answered:\n{}",
        daemon.log()
    );
    Env {
        daemon,
        servers,
        topo,
    }
}

/// A reqwest client living in `ns`, from `src`, with a cookie store; `fresh_conns` makes
/// every request open a new TCP connection.
fn client(ns: &NetNs, src: Ipv4Addr, fresh_conns: bool) -> reqwest::blocking::Client {
    ns.run(move || {
        let mut b = reqwest::blocking::Client::builder()
            .cookie_store(true)
            .local_address(std::net::IpAddr::V4(src))
            .timeout(Duration::from_secs(5));
        if fresh_conns {
            b = b.pool_max_idle_per_host(0);
        }
        b.build().unwrap()
    })
}

struct Answer {
    status: u16,
    set_cookie: Option<String>,
    cache_control: Option<String>,
    body: serde_json::Value,
}

fn get(c: &reqwest::blocking::Client) -> Answer {
    let r = c
        .get(format!("http://{}/cart", vip()))
        .send()
        .expect("request");
    let h = |k: &str| {
        r.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (set_cookie, cache_control) = (h("set-cookie"), h("cache-control"));
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    Answer {
        status,
        set_cookie,
        cache_control,
        body: serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    }
}

fn backend_of(a: &Answer) -> String {
    a.body["backend"].as_str().unwrap_or_default().to_owned()
}

/// Sends raw bytes on a new connection from the client namespace; returns the whole answer.
fn raw_request(ns: &NetNs, req: &str) -> std::io::Result<String> {
    let mut s = ns.run(|| TcpStream::connect(vip()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(req.as_bytes())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn cookie_value(set_cookie: &str) -> &str {
    set_cookie
        .split(';')
        .next()
        .unwrap()
        .split_once('=')
        .unwrap()
        .1
}

#[test]
fn cookie_persistence_sticks_one_client_and_spreads_many() {
    let e = env("hp", 3, 30, "persist = 30");
    let c = client(&e.topo.client, CLIENT_IP, true);
    let first = get(&c);
    assert_eq!(first.status, 200);
    let sc = first.set_cookie.clone().expect("a cookie is set");
    assert!(sc.starts_with("clb_session="), "{sc}");
    assert!(
        sc.contains("Max-Age=30") && sc.contains("Path=/") && sc.contains("HttpOnly"),
        "{sc}"
    );
    assert!(
        !sc.contains(&backend_ip(0).to_string()),
        "the cookie does not expose addresses: {sc}"
    );
    assert_eq!(
        first.cache_control.as_deref(),
        Some("no-cache=\"set-cookie\"")
    );
    let home = backend_of(&first);
    // 20 requests over 20 new connections: one backend.
    for i in 0..20 {
        let a = get(&c);
        assert_eq!(backend_of(&a), home, "request {i}");
        // The backend never sees the persistence cookie; it sees the client's address.
        assert!(a.body["cookie"].is_null(), "{}", a.body);
        assert_eq!(a.body["x_forwarded_for"], CLIENT_IP.to_string());
        assert_eq!(a.body["x_forwarded_proto"], "http");
        assert!(
            a.body["forwarded"]
                .as_str()
                .unwrap()
                .starts_with(&format!("for={CLIENT_IP};proto=http"))
        );
    }
    let st: serde_json::Value = e.daemon.clb_json(&["stats"]);
    assert!(
        st["http"][0]["connections"].as_u64().unwrap() >= 21,
        "{}",
        st["http"]
    );
    assert_eq!(st["http"][0]["cookie_hits"], 20);
    // 30 clients: spread over all three.
    let mut spread: HashMap<String, usize> = HashMap::new();
    for &ip in &e.topo.extra_clients {
        *spread
            .entry(backend_of(&get(&client(&e.topo.client, ip, false))))
            .or_default() += 1;
    }
    assert_eq!(spread.len(), 3, "{spread:?}");
    assert!(spread.values().all(|&n| n == 10), "{spread:?}");
    drop(e.servers);
}

#[test]
fn persistence_off_is_round_robin_per_request_on_one_connection() {
    let e = env("hr", 3, 0, "");
    let c = client(&e.topo.client, CLIENT_IP, false);
    let before: serde_json::Value = e.daemon.clb_json(&["stats"]);
    let mut count: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let a = get(&c);
        assert!(a.set_cookie.is_none(), "no cookie with persistence off");
        *count.entry(backend_of(&a)).or_default() += 1;
    }
    let after: serde_json::Value = e.daemon.clb_json(&["stats"]);
    let conns = after["http"][0]["connections"].as_u64().unwrap()
        - before["http"][0]["connections"].as_u64().unwrap();
    assert_eq!(conns, 1, "the 30 requests shared one kept-alive connection");
    assert_eq!(count.len(), 3, "{count:?}");
    assert!(count.values().all(|&n| n == 10), "{count:?}");
}

#[test]
fn keepalive_timeout_closes_idle_connections_and_the_cookie_outlives_them() {
    let e = env("hk", 3, 0, "persist = 600\nkeepalive_timeout = 2");
    let mut s = e.topo.client.run(|| TcpStream::connect(vip())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n")
        .unwrap();
    let mut buf = vec![0u8; 8192];
    let n = s.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let sc = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .expect("cookie set")
        .to_owned();
    let home = head
        .split("\"backend\":\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    // Idle: the balancer closes the connection after ~2 s.
    let t0 = Instant::now();
    let n = s.read(&mut buf).unwrap_or(0);
    let closed_after = t0.elapsed();
    assert_eq!(n, 0, "expected a close, got data");
    assert!(
        closed_after >= Duration::from_millis(1500) && closed_after <= Duration::from_secs(4),
        "closed after {closed_after:?}"
    );
    println!(
        "idle connection closed after {:.2} s (keepalive_timeout 2 s)",
        closed_after.as_secs_f64()
    );
    // A new connection with the cookie reaches the same backend.
    let cookie = format!("clb_session={}", cookie_value(&sc));
    for _ in 0..5 {
        let r = raw_request(
            &e.topo.client,
            &format!(
                "GET / HTTP/1.1\r\nHost: shop\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n"
            ),
        )
        .unwrap();
        assert!(r.contains(&format!("\"backend\":\"{home}\"")), "{r}");
    }
}

#[test]
fn cookie_of_a_removed_or_quiescent_backend_is_rescheduled() {
    let e = env("hq", 3, 0, "persist = 600");
    let c = client(&e.topo.client, CLIENT_IP, false);
    let a = get(&c);
    let home = backend_of(&a);
    let i: usize = home[1..].parse().unwrap();
    // Quiescent: weight 0.
    e.daemon
        .clb_ok(&["backend", "set", "shop", &be(i), "--weight", "0"]);
    let b = get(&c);
    assert_ne!(backend_of(&b), home, "weight 0: rescheduled");
    assert!(b.set_cookie.is_some(), "a new cookie is set");
    let second = backend_of(&b);
    for _ in 0..5 {
        assert_eq!(backend_of(&get(&c)), second, "the new cookie sticks");
    }
    // Removed.
    let j: usize = second[1..].parse().unwrap();
    e.daemon.clb_ok(&["backend", "rm", "shop", &be(j)]);
    let d = get(&c);
    assert_eq!(d.status, 200);
    assert!(d.set_cookie.is_some());
    let third = backend_of(&d);
    assert!(third != second && third != home, "{third}");
}

#[test]
fn bad_requests_get_4xx_or_a_close_and_others_are_served() {
    let e = env("hb", 2, 0, "persist = 600");
    let ns = &e.topo.client;
    // Tampered cookie: ignored, rescheduled, never an error.
    let r = raw_request(ns, "GET / HTTP/1.1\r\nHost: x\r\nCookie: clb_session=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\r\nConnection: close\r\n\r\n").unwrap();
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("set-cookie: clb_session="),
        "{r}"
    );
    // Oversized headers.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let r = raw_request(ns, &big).unwrap_or_default();
    assert!(
        r.starts_with("HTTP/1.1 431") || r.starts_with("HTTP/1.1 400"),
        "{r:.80}"
    );
    // Malformed request line.
    let r = raw_request(ns, "GARBAGE\r\n\r\n").unwrap_or_default();
    assert!(r.is_empty() || r.starts_with("HTTP/1.1 400"), "{r:.80}");
    // Too large a body (declared).
    let r = raw_request(
        ns,
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert!(r.starts_with("HTTP/1.1 413"), "{r:.80}");
    // Slow loris: headers dribbled for longer than the 5 s header timeout.
    let mut slow = ns.run(|| TcpStream::connect(vip())).unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    let t0 = Instant::now();
    let mut closed = None;
    let mut served_meanwhile = 0;
    while t0.elapsed() < Duration::from_secs(10) {
        if slow.write_all(b"X-Drip: 1\r\n").is_err() {
            closed = Some(t0.elapsed());
            break;
        }
        let mut b = [0u8; 64];
        match slow.read(&mut b) {
            Ok(0) => {
                closed = Some(t0.elapsed());
                break;
            }
            Ok(_) => panic!("a slow client got an answer"),
            Err(_) => {}
        }
        // Others are served while it drips.
        let r = raw_request(ns, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        assert!(r.starts_with("HTTP/1.1 200"));
        served_meanwhile += 1;
        std::thread::sleep(Duration::from_millis(600));
    }
    let closed = closed.expect("the slow client was never disconnected");
    assert!(
        closed >= Duration::from_secs(4),
        "closed too early: {closed:?}"
    );
    assert!(served_meanwhile >= 3, "{served_meanwhile}");
    println!(
        "slow-loris client closed after {:.1} s, {served_meanwhile} other requests served meanwhile",
        closed.as_secs_f64()
    );
    // The daemon is unaffected.
    let st: serde_json::Value = e.daemon.clb_json(&["stats"]);
    assert!(
        st["http"][0]["responses_4xx"].as_u64().unwrap() >= 1,
        "{}",
        st["http"]
    );
    assert_eq!(st["http"][0]["upstream_errors"], 0);
}

/// The listener's HTTP counters from `clb stats`.
fn http_stats(d: &Daemon) -> serde_json::Value {
    let st: serde_json::Value = d.clb_json(&["stats"]);
    st["http"][0].clone()
}

#[test]
fn probed_defects_cookies_hosts_framing_and_options() {
    let e = env("hd", 2, 0, "persist = 600");
    let ns = &e.topo.client;
    // A non-ASCII application cookie passes byte for byte, with or without clb's own.
    let r = raw_request(
        ns,
        "GET / HTTP/1.1\r\nHost: x\r\nCookie: app_session=abc123; name=José\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(
        r.contains(r#""cookie":"app_session=abc123; name=José""#),
        "the backend did not get the cookies as sent: {r}"
    );
    let ours = r
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|v| v.split(';').next())
        .expect("clb's cookie")
        .to_owned();
    let home = r.split(r#""backend":""#).nth(1).unwrap()[..2].to_owned();
    for _ in 0..4 {
        let r = raw_request(
            ns,
            &format!("GET / HTTP/1.1\r\nHost: x\r\nCookie: app_session=abc123; {ours}; name=José\r\nConnection: close\r\n\r\n"),
        )
        .unwrap();
        assert!(
            r.contains(r#""cookie":"app_session=abc123; name=José""#),
            "clb's cookie not taken out, or the others changed: {r}"
        );
        assert!(r.contains(&format!(r#""backend":"{home}""#)), "moved: {r}");
    }
    // Two Host headers: 400, never forwarded.
    let served = e
        .servers
        .iter()
        .map(|s| s.requests.load(std::sync::atomic::Ordering::Relaxed))
        .sum::<u64>();
    let r = raw_request(
        ns,
        "GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    // A malformed chunked body: the client's fault, 400, not an upstream error.
    let r = raw_request(
        ns,
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nZZ\r\nhello\r\n0\r\n\r\n",
    )
    .unwrap();
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    // OPTIONS * is answered by the proxy.
    let r = raw_request(
        ns,
        "OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert!(
        r.starts_with("HTTP/1.1 200") && r.to_ascii_lowercase().contains("allow: "),
        "{r}"
    );
    let now_served = e
        .servers
        .iter()
        .map(|s| s.requests.load(std::sync::atomic::Ordering::Relaxed))
        .sum::<u64>();
    assert_eq!(now_served, served, "a refused request reached a backend");
    let h = http_stats(&e.daemon);
    assert_eq!(h["upstream_errors"], 0, "{h}");
    assert!(h["client_errors"].as_u64().unwrap() >= 2, "{h}");
}

#[test]
fn connection_cap_and_io_timeouts_free_both_sides() {
    let e = env(
        "hc",
        1,
        0,
        "persist = 600\nmax_conns = 4\nio_timeout = 2\nkeepalive_timeout = 3",
    );
    let ns = &e.topo.client;
    let d = &e.daemon;
    // Settle (the readiness probe's connection closes), then take the baseline.
    let idle = clb_tests::wait_for(Duration::from_secs(10), || {
        (http_stats(d)["open_connections"] == 0).then_some(())
    });
    assert!(idle.is_some(), "{}", http_stats(d));
    let fds = d.open_fds();
    // The cap: four open connections, the fifth gets 503 and is closed.
    let held: Vec<TcpStream> = (0..4)
        .map(|_| ns.run(|| TcpStream::connect(vip())).unwrap())
        .collect();
    let full = clb_tests::wait_for(Duration::from_secs(3), || {
        (http_stats(d)["open_connections"] == 4).then_some(())
    });
    assert!(full.is_some(), "{}", http_stats(d));
    let r = raw_request(ns, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert!(http_stats(d)["refused_connections"].as_u64().unwrap() >= 1);
    drop(held);
    let back = clb_tests::wait_for(Duration::from_secs(5), || {
        raw_request(ns, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()
            .filter(|r| r.starts_with("HTTP/1.1 200"))
    });
    assert!(back.is_some(), "the cap did not free up");
    // Clients that ask for a large response and never read it: cut after the I/O timeout,
    // with their backend connections, instead of being held forever.
    let before_stuck = d.open_fds();
    let stuck: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = ns.run(|| TcpStream::connect(vip())).unwrap();
            s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    let busy = clb_tests::wait_for(Duration::from_secs(5), || {
        (http_stats(d)["open_connections"] == 3).then_some(())
    });
    assert!(busy.is_some(), "{}", http_stats(d));
    let stuck_fds = d.open_fds();
    println!("daemon fds: {fds} idle, {before_stuck} before, {stuck_fds} with 3 stuck readers");
    // Three client sockets, and a backend connection each: up to two of them may be pooled
    // ones the requests before left idle (counted in `before_stuck`).
    assert!(
        stuck_fds >= before_stuck + 4,
        "client and backend sockets while stuck: {stuck_fds} vs {before_stuck}"
    );
    let t0 = Instant::now();
    let freed = clb_tests::wait_for(Duration::from_secs(15), || {
        (http_stats(d)["open_connections"] == 0 && d.open_fds() <= fds).then_some(())
    });
    assert!(
        freed.is_some(),
        "stuck readers still held: {} (fds {} vs {fds})",
        http_stats(d),
        d.open_fds()
    );
    println!(
        "3 non-reading clients cut {:.1} s after the check began (io_timeout 2 s)",
        t0.elapsed().as_secs_f64()
    );
    drop(stuck);
    // And the listener serves on.
    let r = raw_request(ns, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[test]
fn an_http_listener_that_cannot_bind_is_refused_or_shown_failed() {
    let e = env("hn", 1, 0, "");
    let d = &e.daemon;
    // Another process holds VIP:8088 in the balancer's namespace.
    let taken = SocketAddrV4::new(VIP, 8088);
    let holder = e
        .topo
        .lb
        .run(|| std::net::TcpListener::bind(taken))
        .unwrap();
    let o = d.clb(&[
        "listener",
        "add",
        "blocked",
        "--vip",
        &taken.to_string(),
        "--proto",
        "http",
    ]);
    assert!(!o.ok, "{o:?}");
    assert!(o.stderr.contains("cannot bind"), "{o:?}");
    let ls: Vec<serde_json::Value> = d.clb_json(&["listener", "ls"]);
    assert!(ls.iter().all(|l| l["name"] != "blocked"), "{ls:?}");
    // Configured while the daemon was stopped: started, but shown as not serving.
    let mut d = e.daemon;
    d.stop();
    let mut cfg = d.config_text();
    cfg += &format!(
        "[[listener]]\nname = \"blocked\"\nvip = \"{taken}\"\nproto = \"http\"\n[[listener.backend]]\naddr = \"{}:{PORT}\"\n",
        backend_ip(0)
    );
    std::fs::write(&d.config, cfg).unwrap();
    d.spawn();
    let shown = clb_tests::wait_for(Duration::from_secs(10), || {
        let ls: Vec<serde_json::Value> = d.clb_json(&["listener", "ls"]);
        ls.into_iter()
            .find(|l| l["name"] == "blocked")
            .filter(|l| l["serving"].as_str().is_some_and(|s| s != "serving"))
    });
    let l = shown.expect("a listener that cannot bind is shown as not serving");
    assert!(l["serving"].as_str().unwrap().contains("8088"), "{l}");
    let table = d.clb_ok(&["listener", "ls"]);
    assert!(table.contains("blocked"), "{table}");
    drop(holder);
    // Once the address is free, the listener starts (the loop retries).
    let up = clb_tests::wait_for(Duration::from_secs(20), || {
        let ls: Vec<serde_json::Value> = d.clb_json(&["listener", "ls"]);
        ls.into_iter()
            .find(|l| l["name"] == "blocked" && l["serving"] == "serving")
    });
    assert!(
        up.is_some(),
        "the listener never started once its address was free"
    );
}
