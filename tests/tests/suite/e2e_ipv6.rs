//! End-to-end IPv6: real sockets through the daemon's native XDP datapath in namespaces, IPv6
//! and IPv4 listeners side by side (the topology is dual-stack), listeners and backends managed
//! through the CLI, persistence and its expiry, and an HTTP listener on an IPv6 VIP with
//! cookie persistence.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    time::Duration,
};

use clb_tests::{
    daemon::Daemon,
    http::HttpServer,
    netns::{CLIENT_IP, CLIENT_IP6, Topology, VIP, VIP6, backend_ip6},
    servers::{NameServer, ask, ask_once, connect, udp_ask, udp_socket},
    wait_for,
};

const PORT: u16 = 8080;

fn vip6(port: u16) -> SocketAddr {
    SocketAddrV6::new(VIP6, port, 0, 0).into()
}

fn vip4(port: u16) -> SocketAddr {
    SocketAddrV4::new(VIP, port).into()
}

fn be6(i: usize, port: u16) -> String {
    format!("[{}]:{port}", backend_ip6(i))
}

/// A listener table for the config file: `name` on `vip` over IPv6 backends `0..n`.
fn listener(name: &str, vip: SocketAddr, proto: &str, n: usize, port: u16, extra: &str) -> String {
    let mut s =
        format!("[[listener]]\nname = \"{name}\"\nvip = \"{vip}\"\nproto = \"{proto}\"\n{extra}\n");
    for i in 0..n {
        s += &format!("[[listener.backend]]\naddr = \"{}\"\n", be6(i, port));
    }
    s
}

struct Env {
    daemon: Daemon,
    _servers: Vec<NameServer>,
    topo: Topology,
}

/// `n` backends, each with TCP and UDP name servers on `[::]:8080` (both families).
fn env(tag: &str, n: usize, cfg: &str, flags: &[&str]) -> Env {
    let topo = Topology::new(tag, n, 0).expect("topology");
    let any: SocketAddr = SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, PORT, 0, 0).into();
    let mut servers = Vec::new();
    for (i, ns) in topo.backends.iter().enumerate() {
        servers.push(NameServer::tcp(ns, any, &format!("b{i}")).expect("tcp server"));
        servers.push(NameServer::udp(ns, any, &format!("b{i}")).expect("udp server"));
    }
    let daemon = Daemon::start_with(&topo, cfg, flags);
    Env {
        daemon,
        _servers: servers,
        topo,
    }
}

fn counter(d: &Daemon, name: &str) -> u64 {
    let v: serde_json::Value = d.clb_json(&["stats"]);
    v["counters"][name].as_u64().unwrap_or(0)
}

#[test]
fn ipv6_tcp_and_udp_are_balanced_in_xdp_beside_ipv4() {
    let cfg = [
        listener("web6", vip6(80), "tcp", 3, PORT, ""),
        listener("dns6", vip6(53), "udp", 3, PORT, ""),
        // An IPv4 listener on the same backends' IPv4 addresses.
        format!(
            "[[listener]]\nname = \"web4\"\nvip = \"{}\"\nproto = \"tcp\"\n[[listener.backend]]\naddr = \"10.0.10.2:{PORT}\"\n",
            vip4(80)
        ),
    ]
    .concat();
    let e = env("v6", 3, &cfg, &[]);
    // Round robin over IPv6: 30 short connections, 10 per backend.
    let mut count: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let who = ask_once(&e.topo.client, CLIENT_IP6, vip6(80)).expect("IPv6 connection");
        *count.entry(who).or_default() += 1;
    }
    assert_eq!(count.len(), 3, "{count:?}");
    assert!(count.values().all(|n| *n == 10), "{count:?}");
    // A kept-alive connection stays on its backend.
    let mut c = connect(&e.topo.client, CLIENT_IP6, vip6(80)).unwrap();
    let first = ask(&mut c).unwrap();
    for _ in 0..5 {
        assert_eq!(ask(&mut c).unwrap(), first);
    }
    // UDP over IPv6: one socket, one backend; other sockets spread.
    let s = udp_socket(&e.topo.client, CLIENT_IP6).unwrap();
    let one = udp_ask(&s, vip6(53)).unwrap();
    for _ in 0..5 {
        assert_eq!(udp_ask(&s, vip6(53)).unwrap(), one);
    }
    let others: HashSet<String> = (0..6)
        .map(|_| udp_ask(&udp_socket(&e.topo.client, CLIENT_IP6).unwrap(), vip6(53)).unwrap())
        .collect();
    assert!(others.len() > 1, "{others:?}");
    // IPv4 beside it.
    assert_eq!(ask_once(&e.topo.client, CLIENT_IP, vip4(80)).unwrap(), "b0");
    // The packets went through XDP, and the IPv6 flows are listed with their clients.
    assert!(counter(&e.daemon, "verdict_redirect") >= 100);
    assert_eq!(counter(&e.daemon, "tail_call_failed"), 0);
    let conns: Vec<serde_json::Value> = e.daemon.clb_json(&["conn", "ls", "web6"]);
    assert!(!conns.is_empty());
    assert!(
        conns
            .iter()
            .all(|c| c["client"].as_str().unwrap().starts_with("[fd00:1::2]:")),
        "{conns:?}"
    );
    let filtered: Vec<serde_json::Value> =
        e.daemon
            .clb_json(&["conn", "ls", "--client", "fd00:1::/64"]);
    assert_eq!(
        filtered.len(),
        conns.len() + 7,
        "web6 and dns6 flows of the client"
    );
    let status: serde_json::Value = e.daemon.clb_json(&["status"]);
    let tables = status["tables"].as_array().unwrap();
    let conns6 = tables
        .iter()
        .find(|t| t["name"] == "connections6")
        .expect("connections6 in status");
    assert_eq!(
        conns6["capacity"].as_u64(),
        Some(u64::from(clb_common::DEFAULT_CONNS6)),
        "{conns6}"
    );
    let text = e.daemon.clb_ok(&["listener", "ls"]);
    assert!(text.contains("[fd00::100]:80"), "{text}");
}

#[test]
fn ipv6_persistence_sticks_per_client_and_expires() {
    let cfg = listener("web6", vip6(80), "tcp", 3, PORT, "persist = 3");
    let e = env("p6", 3, &cfg, &["--sweep-interval", "1"]);
    // 25 clients: not a multiple of the backends, so round robin after expiry moves them.
    let clients = e.topo.add_clients6(25).unwrap();
    let mut first: HashMap<Ipv6Addr, String> = HashMap::new();
    for &ip in &clients {
        let seen: HashSet<String> = (0..4)
            .map(|_| ask_once(&e.topo.client, ip, vip6(80)).unwrap())
            .collect();
        assert_eq!(seen.len(), 1, "client {ip} saw {seen:?}");
        first.insert(ip, seen.into_iter().next().unwrap());
    }
    let used: HashSet<&String> = first.values().collect();
    assert_eq!(used.len(), 3, "all backends used: {first:?}");
    let sessions: Vec<serde_json::Value> = e.daemon.clb_json(&["session", "ls"]);
    assert_eq!(sessions.len(), 25, "{sessions:?}");
    let one: Vec<serde_json::Value> =
        e.daemon
            .clb_json(&["session", "ls", "--client", &clients[0].to_string()]);
    assert_eq!(one.len(), 1, "{one:?}");
    // After 4 s of silence the entries are expired; the sweeper frees them.
    std::thread::sleep(Duration::from_secs(4));
    let sessions: Vec<serde_json::Value> = e.daemon.clb_json(&["session", "ls"]);
    assert!(sessions.is_empty(), "{sessions:?}");
    let freed = wait_for(Duration::from_secs(10), || {
        let status: serde_json::Value = e.daemon.clb_json(&["status"]);
        (status["sweeper"]["sessions_removed_total"].as_u64()? >= 25).then_some(())
    });
    assert!(
        freed.is_some(),
        "the sweeper did not free the expired IPv6 entries"
    );
    let moved = clients
        .iter()
        .filter(|ip| ask_once(&e.topo.client, **ip, vip6(80)).unwrap() != first[*ip])
        .count();
    assert!(moved > 0, "no client rescheduled after expiry");

    // Without a mask each address is one client, and the listing says so (/128, not /32).
    let ls: serde_json::Value = e.daemon.clb_json(&["listener", "ls"]);
    let web6 = ls
        .as_array()
        .and_then(|a| a.iter().find(|l| l["name"] == "web6"))
        .unwrap_or_else(|| panic!("web6 not listed: {ls}"));
    assert_eq!(web6["persist_mask"], 128, "{web6}");
    // A /64 persistence mask, set live through the CLI: the whole prefix is one client.
    e.daemon.clb_ok(&[
        "listener",
        "set",
        "web6",
        "--persist",
        "600",
        "--persist-mask",
        "64",
    ]);
    let names: HashSet<String> = clients
        .iter()
        .map(|ip| ask_once(&e.topo.client, *ip, vip6(80)).unwrap())
        .collect();
    assert_eq!(names.len(), 1, "one /64, one backend: {names:?}");
    // An out-of-range mask is refused and changes nothing.
    let out = e
        .daemon
        .clb(&["listener", "set", "web6", "--persist-mask", "129"]);
    assert!(!out.ok, "mask 129 accepted");
    assert!(out.stderr.contains("persist_mask"), "{}", out.stderr);
    assert!(e.daemon.config_text().contains("persist_mask = 64"));
}

#[test]
fn ipv6_backends_are_managed_through_the_cli_without_breaking_flows() {
    let cfg = listener("web6", vip6(80), "tcp", 1, PORT, "");
    let e = env("c6", 3, &cfg, &[]);
    let mut kept = connect(&e.topo.client, CLIENT_IP6, vip6(80)).unwrap();
    assert_eq!(ask(&mut kept).unwrap(), "b0");
    for i in 1..3 {
        e.daemon
            .clb_ok(&["backend", "add", "web6", &be6(i, PORT), "--weight", "10"]);
    }
    let ls = e.daemon.clb_ok(&["backend", "ls", "web6"]);
    assert!(ls.contains(&be6(2, PORT)), "{ls}");
    let names: HashSet<String> = (0..9)
        .map(|_| ask_once(&e.topo.client, CLIENT_IP6, vip6(80)).unwrap())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    // Wrong family, a bad address, a VIP as backend: refused with the reason, nothing changes.
    let before = e.daemon.config_text();
    for (addr, why) in [
        ("10.0.12.2:8080", "address family"),
        ("[fd00::100]:8080", "VIP"),
        ("fd00:12::2:8080", "invalid"),
    ] {
        let out = e.daemon.clb(&["backend", "add", "web6", addr]);
        assert!(!out.ok, "{addr} accepted");
        assert!(
            out.stderr.to_lowercase().contains(&why.to_lowercase()),
            "{addr}: {}",
            out.stderr
        );
    }
    assert_eq!(e.daemon.config_text(), before);
    // Drain and remove backend 2; the kept connection (on b0) never notices.
    e.daemon
        .clb_ok(&["backend", "set", "web6", &be6(2, PORT), "--weight", "0"]);
    let names: HashSet<String> = (0..6)
        .map(|_| ask_once(&e.topo.client, CLIENT_IP6, vip6(80)).unwrap())
        .collect();
    assert!(!names.contains("b2"), "{names:?}");
    e.daemon.clb_ok(&["backend", "rm", "web6", &be6(2, PORT)]);
    assert!(!e.daemon.config_text().contains(&be6(2, PORT)));
    assert_eq!(ask(&mut kept).unwrap(), "b0", "the established flow stayed");
    // Listeners on IPv6 VIPs come and go through the CLI too.
    e.daemon.clb_ok(&[
        "listener",
        "add",
        "extra6",
        "--vip",
        "[fd00::100]:81",
        "--proto",
        "tcp",
        "--hc",
        "none",
    ]);
    e.daemon
        .clb_ok(&["backend", "add", "extra6", &be6(1, PORT)]);
    assert_eq!(
        ask_once(&e.topo.client, CLIENT_IP6, vip6(81)).unwrap(),
        "b1"
    );
    let bad = e.daemon.clb(&[
        "listener",
        "add",
        "ll",
        "--vip",
        "[fe80::1]:80",
        "--proto",
        "tcp",
    ]);
    assert!(
        !bad.ok && bad.stderr.contains("link-local"),
        "{}",
        bad.stderr
    );
    e.daemon.clb_ok(&["listener", "rm", "extra6"]);
    assert_eq!(ask(&mut kept).unwrap(), "b0");
}

#[test]
fn http_on_an_ipv6_vip_keeps_a_client_on_its_backend_by_cookie() {
    const HPORT: u16 = 8081;
    let topo = Topology::new("h6", 3, 0).unwrap();
    let any: SocketAddr = SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, HPORT, 0, 0).into();
    let _servers: Vec<HttpServer> = (0..3)
        .map(|i| HttpServer::start(&topo.backends[i], any, &format!("b{i}")).unwrap())
        .collect();
    let cfg = listener("shop6", vip6(80), "http", 3, HPORT, "persist = 600");
    let daemon = Daemon::start(&topo, &cfg);
    let client = |fresh: bool| {
        topo.client.run(move || {
            let mut b = reqwest::blocking::Client::builder()
                .cookie_store(true)
                .local_address(IpAddr::V6(CLIENT_IP6))
                .timeout(Duration::from_secs(5));
            if fresh {
                b = b.pool_max_idle_per_host(0);
            }
            b.build().unwrap()
        })
    };
    let url = format!("http://{}/cart", vip6(80));
    let get = |c: &reqwest::blocking::Client| -> Option<serde_json::Value> {
        let r = c.get(&url).send().ok()?;
        if r.status() != 200 {
            return None;
        }
        serde_json::from_str(&r.text().ok()?).ok()
    };
    let c = client(true);
    let first = wait_for(Duration::from_secs(10), || get(&c))
        .unwrap_or_else(|| panic!("the IPv6 HTTP listener never answered:\n{}", daemon.log()));
    let backend = first["backend"].as_str().unwrap().to_owned();
    // Every new connection with the cookie: the same backend.
    for _ in 0..10 {
        assert_eq!(get(&c).unwrap()["backend"], backend.as_str());
    }
    // The backend sees the IPv6 client (RFC 7239: bracketed and quoted).
    let body = get(&c).unwrap();
    assert_eq!(body["x_forwarded_for"], "fd00:1::2");
    assert_eq!(
        body["forwarded"].as_str().unwrap(),
        format!("for=\"[fd00:1::2]\";proto=http;by=\"{}\"", vip6(80))
    );
    // Clients without the cookie spread.
    let spread: HashSet<String> = (0..9)
        .map(|_| {
            get(&client(true)).unwrap()["backend"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(spread.len(), 3, "{spread:?}");
}

#[test]
fn ipv6_health_checks_take_a_dead_backend_out_and_back() {
    let hc = "[listener.health_check]\ninterval = 2\ntimeout = 2\nhealthy_threshold = 2\nunhealthy_threshold = 2\n";
    let cfg = listener("web6", vip6(80), "tcp", 2, PORT, hc);
    let topo = Topology::new("hc6", 2, 0).unwrap();
    let any: SocketAddr = SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, PORT, 0, 0).into();
    let b0 = NameServer::tcp(&topo.backends[0], any, "b0").unwrap();
    let mut b1 = Some(NameServer::tcp(&topo.backends[1], any, "b1").unwrap());
    let d = Daemon::start(&topo, &cfg);
    let health = |i: usize| -> String {
        let v: serde_json::Value = d.clb_json(&["backend", "ls", "web6"]);
        v.as_array()
            .unwrap()
            .iter()
            .find(|b| b["addr"] == be6(i, PORT))
            .map(|b| b["health"].as_str().unwrap_or("").to_owned())
            .unwrap_or_default()
    };
    wait_for(Duration::from_secs(15), || {
        (health(0) == "healthy" && health(1) == "healthy").then_some(())
    })
    .expect("IPv6 backends never became healthy");
    let mut kept = connect(&topo.client, CLIENT_IP6, vip6(80)).unwrap();
    let first = ask(&mut kept).unwrap();
    // b1's service dies: its IPv6 connect checks fail, and new connections avoid it.
    drop(b1.take());
    wait_for(Duration::from_secs(15), || {
        (health(1) == "unhealthy").then_some(())
    })
    .expect("b1 never marked unhealthy over IPv6");
    for _ in 0..6 {
        assert_eq!(ask_once(&topo.client, CLIENT_IP6, vip6(80)).unwrap(), "b0");
    }
    if first == "b0" {
        assert_eq!(ask(&mut kept).unwrap(), "b0");
    }
    // It comes back and takes new connections again.
    let _b1 = NameServer::tcp(&topo.backends[1], any, "b1").unwrap();
    wait_for(Duration::from_secs(15), || {
        (health(1) == "healthy").then_some(())
    })
    .expect("b1 never healthy again");
    let names: HashSet<String> = (0..6)
        .map(|_| ask_once(&topo.client, CLIENT_IP6, vip6(80)).unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    drop(b0);
}
