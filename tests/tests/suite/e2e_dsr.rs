//! Direct server return in namespaces: one balancer node and three backends on one L2
//! segment (a bridge), the VIP on every backend's loopback, a router between the segment and
//! the client. The balancer changes only the destination MAC; the backends answer the client
//! through the router, so the balancer's reply-path counters stay at 0 while clients get their
//! answers. Round robin, persistence (TCP and UDP), drain, idle timeout and health checks
//! behave as in NAT mode.

use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    time::Duration,
};

use clb_tests::{
    daemon::Daemon,
    fleet::{CLIENT_IP, Fleet, backend_ip},
    netns::VIP,
    servers::{NameServer, ask, ask_once, connect, udp_ask, udp_socket},
    wait_for,
};

fn vip(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(VIP, port)
}

fn config() -> String {
    let mut s = String::new();
    for (name, port, proto, extra) in [
        (
            "web",
            80,
            "tcp",
            "[listener.health_check]\ninterval = 2\ntimeout = 2\nhealthy_threshold = 2\nunhealthy_threshold = 2\n",
        ),
        ("sticky", 81, "tcp", "persist = 600\n"),
        ("short", 82, "tcp", "idle_timeout = 2\n"),
        ("dns", 53, "udp", "persist = 600\n"),
    ] {
        // Settings before the health-check table.
        let (settings, table) = match extra.find('[') {
            Some(i) => extra.split_at(i),
            None => (extra, ""),
        };
        s += &format!(
            "[[listener]]\nname = \"{name}\"\nvip = \"{VIP}:{port}\"\nproto = \"{proto}\"\nforward = \"dsr\"\n{settings}{table}"
        );
        for j in 0..3 {
            s += &format!(
                "[[listener.backend]]\naddr = \"{}:{port}\"\n",
                backend_ip(j)
            );
        }
    }
    s
}

struct Env {
    daemon: Daemon,
    servers: Vec<Vec<NameServer>>,
    f: Fleet,
}

fn env() -> Env {
    let f = Fleet::new("ds", 1, 3, 40).unwrap();
    f.route_vip_via(0).unwrap();
    let servers = f
        .backends
        .iter()
        .enumerate()
        .map(|(j, ns)| {
            let name = format!("b{j}");
            let mut v: Vec<NameServer> = [80, 81, 82]
                .into_iter()
                .map(|p| {
                    NameServer::tcp(ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, p), &name).unwrap()
                })
                .collect();
            // Bound to the VIP, so that answers leave with the VIP as their source.
            v.push(NameServer::udp(ns, vip(53), &name).unwrap());
            v
        })
        .collect();
    let daemon = Daemon::start_on(&f.nodes[0], "eth0", &config(), &[]);
    let up = wait_for(Duration::from_secs(10), || {
        ask_once(&f.client, CLIENT_IP, vip(80)).ok()
    });
    assert!(up.is_some(), "no answer through the VIP:\n{}", daemon.log());
    Env { daemon, servers, f }
}

/// (forwarded, reply-path) packets over every listener.
fn directions(d: &Daemon) -> (u64, u64) {
    let st: serde_json::Value = d.clb_json(&["stats"]);
    st["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .fold((0, 0), |(f, r), l| {
            (
                f + l["fwd_packets"].as_u64().unwrap(),
                r + l["rev_packets"].as_u64().unwrap(),
            )
        })
}

fn health(d: &Daemon, listener: &str) -> HashMap<String, String> {
    let ls: Vec<serde_json::Value> = d.clb_json(&["backend", "ls", listener]);
    ls.iter()
        .map(|b| {
            (
                b["addr"].as_str().unwrap().to_owned(),
                b["health"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn dsr_replies_bypass_the_balancer_and_scheduling_behaves_as_with_nat() {
    let mut e = env();
    let (d, f) = (&e.daemon, &e.f);
    let c = &f.extra_clients;

    // A long-lived connection, checked at the end.
    let mut long = connect(&f.client, CLIENT_IP, vip(81)).unwrap();
    let long_be = ask(&mut long).unwrap();

    // Round robin: 30 new connections, 10 per backend (weights equal, exact over a cycle).
    let mut counts: HashMap<String, u32> = HashMap::new();
    for _ in 0..30 {
        *counts
            .entry(ask_once(&f.client, CLIENT_IP, vip(80)).unwrap())
            .or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|n| *n == 10), "{counts:?}");

    // TCP persistence: every client's connections on one backend; clients spread.
    let mut homes = HashSet::new();
    for ip in &c[..10] {
        let first = ask_once(&f.client, *ip, vip(81)).unwrap();
        for _ in 0..2 {
            assert_eq!(ask_once(&f.client, *ip, vip(81)).unwrap(), first, "{ip}");
        }
        homes.insert(first);
    }
    assert!(homes.len() >= 2, "persisted clients all on {homes:?}");

    // UDP persistence, answers from the VIP straight from the backends.
    let mut udp_homes = HashSet::new();
    for ip in &c[10..20] {
        let first = udp_ask(&udp_socket(&f.client, *ip).unwrap(), vip(53)).unwrap();
        for _ in 0..2 {
            let s = udp_socket(&f.client, *ip).unwrap();
            assert_eq!(udp_ask(&s, vip(53)).unwrap(), first, "udp {ip}");
        }
        udp_homes.insert(first);
    }
    assert!(udp_homes.len() >= 2, "{udp_homes:?}");

    // Replies never crossed the balancer.
    let (fwd, rev) = directions(d);
    assert!(fwd > 200, "forwarded {fwd}");
    assert_eq!(rev, 0, "reply-path packets through the balancer");
    let st: serde_json::Value = d.clb_json(&["stats"]);
    assert!(st["counters"]["dsr_forwarded"].as_u64().unwrap() >= fwd);

    // Idle timeout (2 s): a silent connection's entry expires; its next packet gets an RST.
    let mut short = connect(&f.client, CLIENT_IP, vip(82)).unwrap();
    ask(&mut short).unwrap();
    let mut kept = connect(&f.client, CLIENT_IP, vip(82)).unwrap();
    let kept_be = ask(&mut kept).unwrap();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            ask(&mut kept).unwrap(),
            kept_be,
            "an active connection expired"
        );
    }
    assert!(
        ask(&mut short).is_err(),
        "a connection idle past its timeout still went through"
    );

    // Drain: no new connections for b0; its open connection lasts until the drain timeout.
    let mut on_b0: Option<TcpStream> = None;
    for _ in 0..6 {
        let mut s = connect(&f.client, CLIENT_IP, vip(80)).unwrap();
        if ask(&mut s).unwrap() == "b0" {
            on_b0 = Some(s);
            break;
        }
    }
    let mut on_b0 = on_b0.expect("a connection on b0");
    let b0 = format!("{}:80", backend_ip(0));
    d.clb_ok(&["backend", "drain", "web", &b0, "--timeout", "2"]);
    for _ in 0..12 {
        assert_ne!(ask_once(&f.client, CLIENT_IP, vip(80)).unwrap(), "b0");
    }
    assert_eq!(
        ask(&mut on_b0).unwrap(),
        "b0",
        "cut before the drain timeout"
    );
    let cut = wait_for(Duration::from_secs(10), || {
        ask(&mut on_b0).is_err().then_some(())
    });
    assert!(cut.is_some(), "the drained connection outlived the timeout");
    d.clb_ok(&["backend", "set", "web", &b0, "--weight", "10"]);

    // Health: b2's service port dies; it turns unhealthy and gets no new connections.
    e.servers[2][0].stop();
    let b2 = format!("{}:80", backend_ip(2));
    let down = wait_for(Duration::from_secs(15), || {
        (health(d, "web")[&b2] == "unhealthy").then_some(())
    });
    assert!(
        down.is_some(),
        "b2 never turned unhealthy: {:?}",
        health(d, "web")
    );
    for _ in 0..12 {
        assert_ne!(ask_once(&f.client, CLIENT_IP, vip(80)).unwrap(), "b2");
    }

    // The long-lived connection stayed where it began; still no reply through the balancer.
    assert_eq!(ask(&mut long).unwrap(), long_be);
    assert_eq!(directions(d).1, 0);
}
