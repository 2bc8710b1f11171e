//! Hostile clients, backends and hosts (issue 26), with real sockets in namespaces.
//!
//! - Blind SYN + ACK pairs from spoofed sources, paced below the flood threshold, against
//!   connection and persistence tables of 1 024 entries: on NAT listeners the ACKs do not
//!   acknowledge the backends' SYN-ACKs (which went to the spoofed addresses), on DSR ones
//!   nothing follows the ACK; neither enters the verified tables, so a real idle connection
//!   keeps echoing and real persisted clients keep their backend.
//! - 1 100 kept-alive HTTP clients against a daemon whose open-files limit is 1 024 (soft and
//!   hard, as `ulimit -n 1024` leaves it): the HTTP listeners turn away what their descriptor
//!   budget cannot hold (503) instead of running out, and the control plane goes on — `clb
//!   status` says attached, changes are accepted, health checks are applied — during the
//!   crowd and after it.
//! - A backend's interface deleted and re-created under the running daemon: `clb status` and
//!   the metrics say it is missing, then it is attached again and flows through it work; a
//!   restart after it was re-created while the daemon was down (its link pin severed) starts.
//! - A 20 KB upload through a listener whose backend-side link has MTU 1000 (the client's and
//!   the backend's own links 1500, as behind a router with a smaller MTU): clb answers the
//!   client's too-big segments with "fragmentation needed" quoting the VIP, the client lowers
//!   its path MTU and the upload completes.
//! - A backend's UDP answers of 1 473 and 4 000 bytes (more than its link's MTU: its stack
//!   fragments them), over IPv4 and IPv6, reach a connected client socket — which accepts
//!   only datagrams from the VIP — whole.

use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    time::Duration,
};

use clb_tests::{
    daemon::{Daemon, one_listener_config},
    fleet::{self, Fleet},
    flood::{Flood, FloodSpec},
    http::HttpServer,
    netns::{CLIENT_IP, CLIENT_IP6, NetNs, Topology, VIP, VIP6, backend_ip, backend_ip6},
    servers::{NameServer, ask, ask_once, connect, tcp_on_backends, udp_socket},
    wait_for,
};

/// Spoofed pairs per listener: twice the tables.
const PAIRS: u64 = 2000;

fn vip(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(VIP, port)
}

/// `[tables]` of 1 024 verified entries, and listeners `off` (80) and `on` (81, persist
/// 600) with `forward`, over `backends`.
fn small_tables_config(forward: &str, backends: &[Ipv4Addr], port: impl Fn(u16) -> u16) -> String {
    let mut s = String::from("[tables]\nconnections = 1024\nsessions = 1024\n\n");
    for (name, p, extra) in [("off", 80u16, ""), ("on", 81, "persist = 600\n")] {
        s += &format!(
            "[[listener]]\nname = \"{name}\"\nvip = \"{VIP}:{p}\"\nproto = \"tcp\"\nforward = \"{forward}\"\n{extra}[listener.health_check]\nkind = \"none\"\n"
        );
        for b in backends {
            s += &format!("[[listener.backend]]\naddr = \"{b}:{}\"\n", port(p));
        }
    }
    s
}

/// What the spoofed pairs must leave alone: idle connections (with their backend) and
/// persisted clients of listener `on` (with theirs).
struct Victims {
    idle: Vec<(TcpStream, String)>,
    persisted: HashMap<Ipv4Addr, String>,
}

fn victims(ns: &NetNs, clients: &[Ipv4Addr]) -> Victims {
    let idle = clients[..10]
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            let mut c = connect(ns, *ip, vip(80 + (i % 2) as u16)).unwrap();
            let b = ask(&mut c).unwrap();
            (c, b)
        })
        .collect();
    let persisted = clients[10..20]
        .iter()
        .map(|ip| (*ip, ask_once(ns, *ip, vip(81)).unwrap()))
        .collect();
    Victims { idle, persisted }
}

fn check(ns: &NetNs, v: &mut Victims, what: &str) {
    let broken: Vec<String> = v
        .idle
        .iter_mut()
        .enumerate()
        .filter_map(|(i, (c, b))| match ask(c) {
            Ok(now) if now == *b => None,
            other => Some(format!("idle connection {i}: {other:?}")),
        })
        .collect();
    assert!(broken.is_empty(), "{what}: {broken:?}");
    let moved: Vec<String> = v
        .persisted
        .iter()
        .filter_map(|(ip, b)| {
            let now = ask_once(ns, *ip, vip(81));
            (now.as_ref().ok() != Some(b)).then(|| format!("{ip}: {b} → {now:?}"))
        })
        .collect();
    assert!(
        moved.is_empty(),
        "{what}: persisted clients moved: {moved:?}"
    );
}

/// Sends `PAIRS` spoofed SYNs, then the matching bare ACKs (same sources and ports, ack
/// number 0), from `ns` out of `dev` to `dst_mac`, at 4 000 frames/s (far below the flood
/// threshold, so every SYN writes state).
fn blind_pairs(ns: &NetNs, dev: &str, dst_mac: [u8; 6], to: SocketAddrV4) {
    for flags in [0x02, 0x10] {
        let f = Flood::new(
            ns,
            FloodSpec {
                dst_mac,
                src_mac: ns.mac(dev).unwrap(),
                src_base: Ipv4Addr::new(100, 64, 0, 0),
                sources: PAIRS as u32,
                dst: to,
                proto: 6,
                tcp_flags: flags,
                ifindex: ns.ifindex(dev).unwrap(),
            },
        )
        .unwrap();
        let sent = f.send(ns, PAIRS, 4000, Duration::from_secs(10)).unwrap();
        assert_eq!(sent, PAIRS);
    }
}

fn counter(d: &Daemon, name: &str) -> u64 {
    let st: serde_json::Value = d.clb_json(&["stats"]);
    st["counters"][name].as_u64().unwrap_or(0)
}

#[test]
fn blind_syn_ack_pairs_on_nat_listeners_evict_no_real_connection_or_persisted_client() {
    let topo = Topology::with_attacker("bn", 2, 20).unwrap();
    let _servers = tcp_on_backends(&topo, 8080);
    let d = Daemon::start(
        &topo,
        &small_tables_config("nat", &[backend_ip(0), backend_ip(1)], |_| 8080),
    );
    let mut v = victims(&topo.client, &topo.extra_clients);
    let a = topo.attacker.as_ref().unwrap();
    let lb_mac = topo.lb.mac("a0").unwrap();
    let unproven = counter(&d, "half_open_unproven");
    for port in [80, 81] {
        blind_pairs(a, "eth0", lb_mac, vip(port));
    }
    // Every ACK reached the balancer and proved nothing.
    let got = wait_for(Duration::from_secs(5), || {
        let n = counter(&d, "half_open_unproven") - unproven;
        (n >= 2 * PAIRS * 99 / 100).then_some(n)
    });
    assert!(
        got.is_some(),
        "blind ACKs counted: {}",
        counter(&d, "half_open_unproven") - unproven
    );
    let st: serde_json::Value = d.clb_json(&["status"]);
    println!(
        "after {PAIRS} blind pairs per listener: tables {}",
        st["tables"]
    );
    check(&topo.client, &mut v, "after blind SYN + ACK pairs (NAT)");
    // Real clients still complete handshakes and are verified.
    let before = counter(&d, "half_open_promote");
    for ip in &topo.extra_clients[..4] {
        ask_once(&topo.client, *ip, vip(80)).unwrap();
    }
    assert!(counter(&d, "half_open_promote") >= before + 4);
}

#[test]
fn blind_syn_ack_pairs_on_dsr_listeners_evict_no_real_connection_or_persisted_client() {
    let f = Fleet::new("bd", 1, 2, 20).unwrap();
    f.route_vip_via(0).unwrap();
    let _servers: Vec<NameServer> = f
        .backends
        .iter()
        .enumerate()
        .flat_map(|(j, ns)| {
            [80, 81].map(|p| {
                NameServer::tcp(
                    ns,
                    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, p),
                    &format!("b{j}"),
                )
                .unwrap()
            })
        })
        .collect();
    let d = Daemon::start_on(
        &f.nodes[0],
        "eth0",
        &small_tables_config("dsr", &[fleet::backend_ip(0), fleet::backend_ip(1)], |p| p),
        &[],
    );
    let up = wait_for(Duration::from_secs(10), || {
        ask_once(&f.client, fleet::CLIENT_IP, vip(80)).ok()
    });
    assert!(up.is_some(), "no answer through the VIP:\n{}", d.log());
    let mut v = victims(&f.client, &f.extra_clients);
    // The spoofed packets come in through the router, as a router forwards them.
    f.switch.exec(&["ethtool", "-K", "r", "gro", "on"]).unwrap();
    let node_mac = f.nodes[0].mac("eth0").unwrap();
    let fwd = counter(&d, "dsr_forwarded");
    for port in [80, 81] {
        blind_pairs(&f.router, "eth1", node_mac, vip(port));
    }
    let got = wait_for(Duration::from_secs(5), || {
        let n = counter(&d, "dsr_forwarded") - fwd;
        (n >= 4 * PAIRS * 99 / 100).then_some(n)
    });
    assert!(
        got.is_some(),
        "spoofed frames forwarded: {}",
        counter(&d, "dsr_forwarded") - fwd
    );
    let st: serde_json::Value = d.clb_json(&["status"]);
    println!(
        "after {PAIRS} blind pairs per listener: tables {}",
        st["tables"]
    );
    check(&f.client, &mut v, "after blind SYN + ACK pairs (DSR)");
}

/// Raises this process's soft open-files limit to its hard limit (the test holds 1 100
/// sockets of its own).
fn raise_own_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        r.rlim_cur = r.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &r), 0);
    }
    assert!(
        r.rlim_cur >= 4096,
        "the test needs 4096 descriptors, the hard limit is {}",
        r.rlim_cur
    );
}

fn backend_health(d: &Daemon, addr: &str) -> String {
    let ls: Vec<serde_json::Value> = d.clb_json(&["backend", "ls", "shop"]);
    ls.iter()
        .find(|b| b["addr"] == addr)
        .and_then(|b| b["health"].as_str())
        .unwrap_or("")
        .to_owned()
}

/// The control plane answers and works: attached, a change accepted, a dead backend's health
/// applied (and a revived one's).
fn control_plane_works(d: &Daemon, backend: &mut HttpServer, ns: &NetNs, weight: u32, what: &str) {
    let st: serde_json::Value = d.clb_json(&["status"]);
    assert_eq!(st["datapath"], "attached", "{what}: {st}");
    let be0 = format!("{}:8081", backend_ip(0));
    let out = d.clb(&[
        "backend",
        "set",
        "shop",
        &be0,
        "--weight",
        &weight.to_string(),
    ]);
    assert!(out.ok, "{what}: a change was refused: {}", out.stderr);
    let be1 = format!("{}:8081", backend_ip(1));
    backend.stop();
    let down = wait_for(Duration::from_secs(15), || {
        (backend_health(d, &be1) == "unhealthy").then_some(())
    });
    assert!(
        down.is_some(),
        "{what}: the dead backend's health was not applied:\n{}",
        d.log()
    );
    *backend = HttpServer::start(ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8081), "b1").unwrap();
    let up = wait_for(Duration::from_secs(15), || {
        (backend_health(d, &be1) == "healthy").then_some(())
    });
    assert!(
        up.is_some(),
        "{what}: the revived backend's health was not applied"
    );
}

#[test]
fn a_crowd_of_http_clients_past_the_descriptor_limit_freezes_nothing() {
    raise_own_nofile();
    let topo = Topology::new("fd", 2, 0).unwrap();
    let mut servers: Vec<HttpServer> = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            HttpServer::start(
                ns,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8081),
                &format!("b{i}"),
            )
            .unwrap()
        })
        .collect();
    let hc = "[listener.health_check]\ninterval = 2\ntimeout = 2\nhealthy_threshold = 2\nunhealthy_threshold = 2\n";
    let d = Daemon::start_nofile(
        &topo,
        &one_listener_config("shop", vip(80), "http", 2, 8081, hc),
        1024,
    );
    // 1 100 clients open kept-alive connections and send a request each.
    let mut crowd = Vec::new();
    let (mut served, mut refused) = (0u32, 0u32);
    for _ in 0..1100 {
        let mut c = connect(&topo.client, clb_tests::netns::CLIENT_IP, vip(80)).unwrap();
        use std::io::{Read as _, Write as _};
        c.write_all(b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 12];
        match c.read_exact(&mut buf) {
            Ok(()) if &buf == b"HTTP/1.1 200" => served += 1,
            Ok(()) if &buf == b"HTTP/1.1 503" => refused += 1,
            other => panic!("client {}: {other:?} {buf:?}", crowd.len()),
        }
        crowd.push(c);
    }
    println!("1100 kept-alive clients: {served} served, {refused} answered 503 (over the budget)");
    assert!(served >= 300, "only {served} clients served");
    assert!(
        refused > 0,
        "every client was served: the limit did not bind"
    );
    assert!(
        !d.log().contains("were removed"),
        "the datapath was taken as removed:\n{}",
        d.log()
    );
    control_plane_works(
        &d,
        &mut servers[1],
        &topo.backends[1],
        20,
        "with 1100 clients",
    );
    drop(crowd);
    std::thread::sleep(Duration::from_secs(1));
    control_plane_works(
        &d,
        &mut servers[1],
        &topo.backends[1],
        10,
        "after the clients left",
    );
    let st: serde_json::Value = d.clb_json(&["stats"]);
    println!("HTTP stats: {}", st["http"]);
}

/// Both backends answer new connections through the VIP (round robin over two).
fn both_backends_answer(topo: &Topology, to: SocketAddrV4, what: &str) {
    let mut seen = HashSet::new();
    for _ in 0..6 {
        let b = ask_once(&topo.client, CLIENT_IP, to).unwrap_or_else(|e| panic!("{what}: {e}"));
        seen.insert(b);
    }
    assert_eq!(seen.len(), 2, "{what}: answered by {seen:?}");
}

/// The state and reattach count `clb status` reports for `iface`.
fn iface_state(d: &Daemon, iface: &str) -> (String, u64) {
    let st: serde_json::Value = d.clb_json(&["status"]);
    let i = st["interfaces"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == iface))
        .unwrap_or_else(|| panic!("{iface} not in status: {st}"));
    (
        i["state"].as_str().unwrap_or_default().to_owned(),
        i["reattached"].as_u64().unwrap_or_default(),
    )
}

#[test]
fn an_interface_deleted_and_recreated_is_attached_again_and_a_restart_after_it_starts() {
    let mut topo = Topology::new("hif", 2, 0).expect("topology");
    let _servers = tcp_on_backends(&topo, 8080);
    let to = vip(80);
    let mut d = Daemon::start(&topo, &one_listener_config("web", to, "tcp", 2, 8080, ""));
    both_backends_answer(&topo, to, "before");
    assert_eq!(iface_state(&d, "b1"), ("attached".into(), 0));

    topo.delete_backend_link(1).expect("deleting b1");
    let missing = wait_for(Duration::from_secs(10), || {
        (iface_state(&d, "b1").0 == "missing").then_some(())
    });
    assert!(missing.is_some(), "b1 not reported missing:\n{}", d.log());
    let text = d.clb_ok(&["status"]);
    assert!(
        text.contains("not on b1") && text.contains("MISSING"),
        "status text: {text}"
    );
    topo.recreate_backend_link(1).expect("re-creating b1");
    let back = wait_for(Duration::from_secs(10), || {
        (iface_state(&d, "b1") == ("attached".into(), 1)).then_some(())
    });
    assert!(back.is_some(), "b1 not attached again:\n{}", d.log());
    both_backends_answer(&topo, to, "after b1 was re-created");
    assert!(d.clb_ok(&["status"]).contains("datapath: attached\n"));

    // Re-created while the daemon is down: its pinned link is severed; the restart replaces it.
    d.stop();
    topo.delete_backend_link(1).expect("deleting b1");
    topo.recreate_backend_link(1).expect("re-creating b1");
    d.spawn();
    assert_eq!(iface_state(&d, "b1").0, "attached");
    both_backends_answer(&topo, to, "after a restart over the severed link");
    let log = d.log();
    assert!(
        log.contains("interface was deleted; attaching anew"),
        "the restart did not replace the severed pin:\n{log}"
    );
}

#[test]
fn an_upload_through_a_smaller_mtu_on_the_backend_side_completes() {
    let topo = Topology::new("hmtu", 1, 0).expect("topology");
    topo.lb
        .ip(&["link", "set", "b0", "mtu", "1000"])
        .expect("mtu 1000 on b0");
    let _servers = tcp_on_backends(&topo, 8080);
    let to = vip(80);
    let d = Daemon::start(&topo, &one_listener_config("web", to, "tcp", 1, 8080, ""));
    let mut c = connect(&topo.client, CLIENT_IP, to).expect("connect");
    // One 20 000-byte line: the name server answers once it has read all of it.
    let mut line = vec![b'x'; 20_000];
    line.push(b'\n');
    std::io::Write::write_all(&mut c, &line).expect("upload");
    let mut r = std::io::BufReader::new(c.try_clone().expect("clone"));
    let mut answer = String::new();
    let n = std::io::BufRead::read_line(&mut r, &mut answer)
        .unwrap_or_else(|e| panic!("no answer to the upload ({e}):\n{}", d.log()));
    assert!(n > 0 && answer.starts_with("b0 "), "answer {answer:?}");
    let sent = counter(&d, "frag_needed_sent");
    assert!(sent > 0, "no fragmentation-needed sent");
    // The next upload on a new connection needs none (the client's path MTU is known).
    assert_eq!(
        ask(&mut connect(&topo.client, CLIENT_IP, to).expect("connect"))
            .ok()
            .as_deref(),
        Some("b0")
    );
}

#[test]
fn a_fragmented_udp_reply_reaches_a_connected_client_from_the_vip() {
    let topo = Topology::new("hfrag", 1, 0).expect("topology");
    let any: std::net::SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, 5353).into();
    let _server = NameServer::udp(&topo.backends[0], any, "b0").expect("udp server");
    let vip6 = std::net::SocketAddr::from((VIP6, 53));
    let cfg = format!(
        "{}[[listener]]\nname = \"dns6\"\nvip = \"{vip6}\"\nproto = \"udp\"\n\
         [[listener.backend]]\naddr = \"[{}]:5353\"\n",
        one_listener_config("dns", vip(53), "udp", 1, 5353, ""),
        backend_ip6(0)
    );
    let d = Daemon::start(&topo, &cfg);
    let cases: [(std::net::IpAddr, std::net::SocketAddr, usize); 3] = [
        (CLIENT_IP.into(), vip(53).into(), 1473),
        (CLIENT_IP.into(), vip(53).into(), 4000),
        (CLIENT_IP6.into(), vip6, 4000),
    ];
    for (src, to, size) in cases {
        let s = udp_socket(&topo.client, src).expect("client socket");
        // Connected: the kernel hands it only datagrams from the VIP (a stub resolver's way).
        s.connect(to).expect("connect");
        s.send(format!("big {size}").as_bytes()).expect("send");
        let mut buf = vec![0u8; 65536];
        let n = s.recv(&mut buf).unwrap_or_else(|e| {
            panic!(
                "no {size}-byte answer from {to} ({e}); counters: rewritten {}, not noted {}\n{}",
                counter(&d, "reply_frag_rewritten"),
                counter(&d, "frag_not_noted"),
                d.log()
            )
        });
        assert_eq!(n, size, "the whole answer from {to}");
        assert!(buf.starts_with(b"b0 "), "from backend b0: {:?}", &buf[..8]);
    }
    assert!(counter(&d, "reply_frag_first") >= 3);
    assert!(counter(&d, "reply_frag_rewritten") >= 1 + 2 + 2);
}
