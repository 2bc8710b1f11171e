//! End-to-end tests of the L4 datapath with real sockets: a client namespace, the balancer
//! namespace running `clb daemon` with XDP in native mode on its veths, and backend
//! namespaces running name servers.

use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use clb_tests::{
    daemon::{Daemon, one_listener_config},
    netns::{CLIENT_IP, Topology, VIP, backend_ip},
    servers::{NameServer, ask, ask_once, connect, udp_ask, udp_socket},
    wait_for,
};

const PORT: u16 = 8080;

fn vip(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(VIP, port)
}

/// A config with one listener `web` on VIP:80 over `n` backends on port 8080.
fn config(proto: &str, port: u16, n: usize, extra: &str) -> String {
    one_listener_config("web", vip(port), proto, n, PORT, extra)
}

struct Env {
    // Drop order: the daemon (tears the datapath down), the servers, then the namespaces.
    daemon: Daemon,
    servers: Vec<NameServer>,
    topo: Topology,
}

fn env(tag: &str, n: usize, extra_clients: usize, cfg: &str, udp: bool) -> Env {
    env_with(tag, n, extra_clients, cfg, udp, &[])
}

fn env_with(
    tag: &str,
    n: usize,
    extra_clients: usize,
    cfg: &str,
    udp: bool,
    flags: &[&str],
) -> Env {
    let topo = Topology::new(tag, n, extra_clients).expect("topology");
    let servers = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT);
            let name = format!("b{i}");
            if udp {
                NameServer::udp(ns, addr, &name).expect("udp server")
            } else {
                NameServer::tcp(ns, addr, &name).expect("tcp server")
            }
        })
        .collect();
    let daemon = Daemon::start_with(&topo, cfg, flags);
    Env {
        daemon,
        servers,
        topo,
    }
}

fn counter(d: &Daemon, name: &str) -> u64 {
    let v: serde_json::Value = d.clb_json(&["stats"]);
    v["counters"][name].as_u64().unwrap_or(0)
}

#[test]
fn tcp_connection_crosses_native_xdp_veth() {
    let e = env("x", 1, 0, &config("tcp", 80, 1, ""), false);
    // The balancer's interfaces run the program in native (driver) mode.
    for dev in &e.topo.lb_ifaces {
        let link = e.topo.lb.ip(&["-d", "link", "show", "dev", dev]).unwrap();
        assert!(
            link.contains("xdp ") || link.contains("prog/xdp"),
            "{dev}: {link}"
        );
        assert!(
            !link.contains("xdpgeneric"),
            "{dev} is in generic mode: {link}"
        );
    }
    let mut c = connect(&e.topo.client, CLIENT_IP, vip(80)).expect("connect through the VIP");
    for _ in 0..5 {
        assert_eq!(ask(&mut c).unwrap(), "b0");
    }
    // The packets went through XDP (redirected), not the kernel's forwarding.
    assert!(
        counter(&e.daemon, "verdict_redirect") >= 10,
        "{}",
        e.daemon.clb_ok(&["stats"])
    );
    let st: serde_json::Value = e.daemon.clb_json(&["stats"]);
    assert!(st["listeners"][0]["fwd_packets"].as_u64().unwrap() >= 6);
    assert!(st["listeners"][0]["rev_packets"].as_u64().unwrap() >= 6);
    assert_eq!(
        e.servers[0]
            .served
            .load(std::sync::atomic::Ordering::Relaxed),
        5
    );
}

#[test]
fn persistence_off_round_robin_and_keepalive_stays() {
    let e = env("rr", 3, 0, &config("tcp", 80, 3, ""), false);
    let names: Vec<String> = (0..30)
        .map(|_| ask_once(&e.topo.client, CLIENT_IP, vip(80)).expect("short connection"))
        .collect();
    let mut count: HashMap<&str, usize> = HashMap::new();
    for n in &names {
        *count.entry(n).or_default() += 1;
    }
    // A shared cursor: consecutive new connections take consecutive schedule slots, so 30
    // connections over 3 equal backends are exactly 10 each, never twice in a row.
    assert_eq!(count.len(), 3, "{names:?}");
    assert!(count.values().all(|&c| c == 10), "{count:?}");
    assert!(
        names.windows(2).all(|w| w[0] != w[1]),
        "not in turn: {names:?}"
    );
    // One kept-alive connection: 20 requests, one backend.
    let mut c = connect(&e.topo.client, CLIENT_IP, vip(80)).unwrap();
    let first = ask(&mut c).unwrap();
    for _ in 0..19 {
        assert_eq!(ask(&mut c).unwrap(), first);
    }
}

#[test]
fn weighted_round_robin_shares_follow_the_weights() {
    let mut cfg = format!(
        "[[listener]]\nname = \"web\"\nvip = \"{}\"\nproto = \"tcp\"\n",
        vip(80)
    );
    for (i, w) in [1, 2, 3].iter().enumerate() {
        cfg += &format!(
            "[[listener.backend]]\naddr = \"{}:{PORT}\"\nweight = {w}\n",
            backend_ip(i)
        );
    }
    let e = env("wr", 3, 0, &cfg, false);
    let names: Vec<String> = (0..60)
        .map(|_| ask_once(&e.topo.client, CLIENT_IP, vip(80)).unwrap())
        .collect();
    let count = |n: &str| names.iter().filter(|x| *x == n).count();
    // Bound: N·w/Σw exactly when N is a multiple of Σw (6) and nothing else opens
    // connections meanwhile (one shared cursor walks the smooth WRR sequence); within one
    // connection per backend for any other N.
    assert_eq!(
        (count("b0"), count("b1"), count("b2")),
        (10, 20, 30),
        "{names:?}"
    );
    // Smooth: the heaviest backend never gets more than 2 in a row (sequence c b c a c b).
    assert!(
        names.windows(3).all(|w| !(w[0] == w[1] && w[1] == w[2])),
        "{names:?}"
    );
}

#[test]
fn persistence_sticks_per_client_ip_and_expires() {
    let e = env_with(
        "ps",
        3,
        50,
        &config("tcp", 80, 3, "persist = 3"),
        false,
        &["--sweep-interval", "1"],
    );
    let clients = e.topo.extra_clients.clone();
    let mut first: HashMap<Ipv4Addr, String> = HashMap::new();
    for &ip in &clients {
        let mut seen = HashSet::new();
        for _ in 0..5 {
            seen.insert(ask_once(&e.topo.client, ip, vip(80)).unwrap());
        }
        assert_eq!(seen.len(), 1, "client {ip} saw {seen:?}");
        first.insert(ip, seen.into_iter().next().unwrap());
    }
    let used: HashSet<&String> = first.values().collect();
    assert_eq!(used.len(), 3, "all backends used: {first:?}");
    let sessions: Vec<serde_json::Value> = e.daemon.clb_json(&["session", "ls"]);
    assert_eq!(sessions.len(), 50);
    // After 4 s of silence (> 3 s + 0.25 s refresh slack) entries are expired and new
    // connections are scheduled afresh: round robin moves at least some clients.
    std::thread::sleep(Duration::from_secs(4));
    let sessions: Vec<serde_json::Value> = e.daemon.clb_json(&["session", "ls"]);
    assert!(sessions.is_empty(), "{sessions:?}");
    // The sweeper (every second here) frees the expired entries: poll, bounded.
    let freed = wait_for(Duration::from_secs(10), || {
        let status: serde_json::Value = e.daemon.clb_json(&["status"]);
        (status["sweeper"]["sessions_removed_total"].as_u64()? >= 50).then_some(())
    });
    assert!(
        freed.is_some(),
        "the sweeper did not free the 50 expired entries within 10 s"
    );
    let moved = clients
        .iter()
        .filter(|ip| ask_once(&e.topo.client, **ip, vip(80)).unwrap() != first[*ip])
        .count();
    assert!(moved > 0, "no client was rescheduled after expiry");
    println!("{moved} of 50 clients moved after persistence expired");
}

#[test]
fn idle_timeout_expires_a_silent_connection() {
    let e = env("it", 2, 0, &config("tcp", 80, 2, "idle_timeout = 2"), false);
    let mut c = connect(&e.topo.client, CLIENT_IP, vip(80)).unwrap();
    ask(&mut c).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    // The entry expired: the next packet is not forwarded to the old backend; the client
    // is told at once with a RST built in XDP.
    let rst_before = counter(&e.daemon, "rst_sent");
    assert!(
        ask(&mut c).is_err(),
        "an expired connection must not reach its backend"
    );
    assert!(counter(&e.daemon, "rst_sent") > rst_before);
    // A fresh connection works.
    let mut c2 = connect(&e.topo.client, CLIENT_IP, vip(80)).unwrap();
    ask(&mut c2).unwrap();
}

#[test]
fn udp_flows_stay_and_udp_persistence_works() {
    let e = env("ud", 3, 3, &config("udp", 53, 3, ""), true);
    let s = udp_socket(&e.topo.client, CLIENT_IP).unwrap();
    let first = udp_ask(&s, vip(53)).unwrap();
    for _ in 0..19 {
        assert_eq!(
            udp_ask(&s, vip(53)).unwrap(),
            first,
            "one socket, one backend"
        );
    }
    // Persistence off: other sockets of the client spread.
    let others: HashSet<String> = (0..6)
        .map(|_| udp_ask(&udp_socket(&e.topo.client, CLIENT_IP).unwrap(), vip(53)).unwrap())
        .collect();
    assert!(others.len() > 1, "{others:?}");
    e.daemon
        .clb_ok(&["listener", "set", "web", "--persist", "60"]);
    for &ip in &e.topo.extra_clients {
        let names: HashSet<String> = (0..5)
            .map(|_| udp_ask(&udp_socket(&e.topo.client, ip).unwrap(), vip(53)).unwrap())
            .collect();
        assert_eq!(names.len(), 1, "UDP persistence: {ip} saw {names:?}");
    }
}
