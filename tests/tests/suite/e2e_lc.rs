//! Least connections with real sockets: held TCP connections and UDP flows placed on the
//! least loaded backend, counts that follow opens and closes, a persisted client that stays,
//! `backend ls` ACTIVE and `/metrics` as the operator sees them.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    time::Duration,
};

use clb_tests::{
    daemon::{Daemon, one_listener_config},
    http::HttpServer,
    netns::{CLIENT_IP, Topology, VIP, backend_ip},
    servers::{NameServer, ask, connect, udp_ask, udp_socket},
    wait_for,
};

const PORT: u16 = 8080;
const METRICS: &str = "127.0.0.1:9911";

fn vip(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(VIP, port)
}

fn be(i: usize) -> String {
    format!("{}:{PORT}", backend_ip(i))
}

struct Env {
    daemon: Daemon,
    _servers: Vec<NameServer>,
    topo: Topology,
}

/// Three backend namespaces with name servers; the listener starts with backend 0 only.
fn env(tag: &str, proto: &str, extra: &str) -> Env {
    let topo = Topology::new(tag, 3, 0).expect("topology");
    let servers = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT);
            if proto == "udp" {
                NameServer::udp(ns, addr, &format!("b{i}")).expect("udp server")
            } else {
                NameServer::tcp(ns, addr, &format!("b{i}")).expect("tcp server")
            }
        })
        .collect();
    let cfg = one_listener_config(
        "web",
        vip(80),
        proto,
        1,
        PORT,
        &format!("sched = \"lc\"\n{extra}"),
    );
    let daemon = Daemon::start_with(&topo, &cfg, &["--metrics", METRICS]);
    Env {
        daemon,
        _servers: servers,
        topo,
    }
}

/// `backend ls`'s ACTIVE of each backend, by name (`b0` … as the servers answer).
fn active(d: &Daemon) -> HashMap<String, u64> {
    let v: serde_json::Value = d.clb_json(&["backend", "ls", "web"]);
    v.as_array()
        .expect("backends")
        .iter()
        .map(|b| {
            let addr = b["addr"].as_str().unwrap().to_owned();
            let i = (0..3).find(|i| be(*i) == addr).expect("a test backend");
            (format!("b{i}"), b["active"].as_u64().unwrap())
        })
        .collect()
}

/// Opens `n` held connections; returns them with the backend each landed on.
fn hold(e: &Env, n: usize) -> Vec<(TcpStream, String)> {
    (0..n)
        .map(|_| {
            let mut c = connect(&e.topo.client, CLIENT_IP, vip(80)).expect("connect");
            let b = ask(&mut c).expect("answer");
            (c, b)
        })
        .collect()
}

fn tally<'a>(names: impl Iterator<Item = &'a str>) -> HashMap<&'a str, usize> {
    let mut m = HashMap::new();
    for n in names {
        *m.entry(n).or_default() += 1;
    }
    m
}

#[test]
fn new_connections_go_to_the_least_loaded_backend_and_counts_follow_closes() {
    let e = env("lc", "tcp", "");
    let d = &e.daemon;
    let first = hold(&e, 12);
    assert!(first.iter().all(|(_, b)| b == "b0"), "b0 is alone");
    assert_eq!(
        active(d)["b0"],
        12,
        "{}",
        d.clb_ok(&["backend", "ls", "web"])
    );
    d.clb_ok(&["backend", "add", "web", &be(1)]);
    d.clb_ok(&["backend", "add", "web", &be(2)]);
    // The next 24 go to the two empty backends.
    let second = hold(&e, 24);
    let t = tally(second.iter().map(|(_, b)| b.as_str()));
    let on_new = t.get("b1").unwrap_or(&0) + t.get("b2").unwrap_or(&0);
    assert!(on_new >= 22, "the 24 after b1, b2 joined: {t:?}");
    // All at 12 now: the next 12 spread evenly.
    let third = hold(&e, 12);
    let t = tally(third.iter().map(|(_, b)| b.as_str()));
    assert!(
        ["b0", "b1", "b2"]
            .iter()
            .all(|b| (3..=5).contains(t.get(b).unwrap_or(&0))),
        "equal backends share: {t:?}"
    );
    let a = active(d);
    for b in ["b0", "b1", "b2"] {
        let held = first
            .iter()
            .chain(&second)
            .chain(&third)
            .filter(|(_, x)| x == b)
            .count() as u64;
        assert_eq!(
            a[b], held,
            "ACTIVE of {b} is the connections held on it: {a:?}"
        );
    }
    let metrics = e
        .topo
        .lb
        .exec(&["curl", "-s", &format!("http://{METRICS}/metrics")])
        .expect("metrics");
    assert!(
        metrics.contains(&format!(
            "clb_backend_active_connections{{listener=\"web\",backend=\"{}\"}} {}",
            be(0),
            a["b0"]
        )),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("active_connections"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The 12 first connections (all on b0) close: within 2 s the next 12 go to b0.
    drop(first);
    let emptied = wait_for(Duration::from_secs(2), || {
        let a = active(d);
        (a["b0"] + 12 <= a["b1"].min(a["b2"])).then_some(a)
    });
    assert!(
        emptied.is_some(),
        "b0's count after its 12 closed: {:?}",
        active(d)
    );
    let fourth = hold(&e, 12);
    let t = tally(fourth.iter().map(|(_, b)| b.as_str()));
    assert!(
        t.get("b0").copied().unwrap_or(0) >= 10,
        "the emptied backend refills: {t:?}"
    );
    // A drained backend takes nothing new and its count falls as its connections end.
    d.clb_ok(&["backend", "drain", "web", &be(1)]);
    let mut rest: Vec<(TcpStream, String)> =
        second.into_iter().chain(third).chain(fourth).collect();
    let before = active(d)["b1"];
    assert!(before > 0);
    rest.retain(|(_, b)| b != "b1");
    let drained = wait_for(Duration::from_secs(2), || {
        (active(d)["b1"] == 0).then_some(())
    });
    assert!(
        drained.is_some(),
        "b1 after its {before} connections closed: {:?}",
        active(d)
    );
    let fifth = hold(&e, 6);
    assert!(
        fifth.iter().all(|(_, b)| b != "b1"),
        "no new connection on a drained backend"
    );
    // `listener ls` names the scheduler.
    assert!(
        d.clb_ok(&["listener", "ls"]).contains("lc"),
        "{}",
        d.clb_ok(&["listener", "ls"])
    );
}

#[test]
fn weights_divide_the_counts_and_persisted_clients_stay() {
    let e = env("lcw", "tcp", "persist = 600\npersist_mask = 24\n");
    let d = &e.daemon;
    // With persistence on a /24, every connection of the one client address is the same
    // client: it follows its entry however loaded b0 gets.
    d.clb_ok(&["backend", "add", "web", &be(1)]);
    let held = hold(&e, 10);
    let b = &held[0].1;
    assert!(
        held.iter().all(|(_, x)| x == b),
        "a persisted client stays: {:?}",
        tally(held.iter().map(|(_, b)| b.as_str()))
    );
    assert_eq!(active(d)[b.as_str()], 10);
}

#[test]
fn udp_flows_are_counted_and_placed_on_the_least_loaded_backend() {
    let e = env("lcu", "udp", "");
    let d = &e.daemon;
    // Two exchanges each: a flow is verified (and counted) by its second datagram.
    let flow = || {
        let s = udp_socket(&e.topo.client, CLIENT_IP).expect("udp socket");
        let b = udp_ask(&s, vip(80)).expect("answer");
        assert_eq!(udp_ask(&s, vip(80)).expect("answer"), b, "a flow stays");
        (s, b)
    };
    let first: Vec<_> = (0..12).map(|_| flow()).collect();
    assert!(first.iter().all(|(_, b)| b == "b0"));
    assert_eq!(active(d)["b0"], 12);
    d.clb_ok(&["backend", "add", "web", &be(1)]);
    d.clb_ok(&["backend", "add", "web", &be(2)]);
    let second: Vec<_> = (0..24).map(|_| flow()).collect();
    let t = tally(second.iter().map(|(_, b)| b.as_str()));
    let on_new = t.get("b1").unwrap_or(&0) + t.get("b2").unwrap_or(&0);
    assert!(on_new >= 22, "{t:?}");
}

#[test]
fn http_least_requests_sends_new_requests_where_fewest_are_in_flight() {
    let topo = Topology::new("lch", 3, 0).expect("topology");
    let _servers: Vec<HttpServer> = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            HttpServer::start(
                ns,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
                &format!("b{i}"),
            )
            .expect("http backend")
        })
        .collect();
    let cfg = one_listener_config("web", vip(80), "http", 1, PORT, "sched = \"lc\"\n");
    let d = Daemon::start(&topo, &cfg);
    // A slow request on a connection of its own; its answer names the backend.
    let send = || {
        let mut c = connect(&topo.client, CLIENT_IP, vip(80)).expect("connect");
        c.write_all(b"GET /slow HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n")
            .expect("request");
        c
    };
    let answer = |mut c: TcpStream| {
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).expect("response");
        (0..3)
            .map(|i| format!("b{i}"))
            .find(|b| out.contains(&format!("\"backend\":\"{b}\"")))
            .unwrap_or_else(|| panic!("no backend in {out}"))
    };
    let first: Vec<TcpStream> = (0..12).map(|_| send()).collect();
    let busy = wait_for(Duration::from_secs(2), || {
        (active(&d)["b0"] == 12).then_some(())
    });
    assert!(
        busy.is_some(),
        "12 requests in flight on b0: {:?}",
        active(&d)
    );
    d.clb_ok(&["backend", "add", "web", &be(1)]);
    d.clb_ok(&["backend", "add", "web", &be(2)]);
    let second: Vec<TcpStream> = (0..24).map(|_| send()).collect();
    let names: Vec<String> = second.into_iter().map(answer).collect();
    let t = tally(names.iter().map(String::as_str));
    let on_new = t.get("b1").unwrap_or(&0) + t.get("b2").unwrap_or(&0);
    assert!(on_new >= 22, "the 24 requests after b1, b2 joined: {t:?}");
    assert!(first.into_iter().map(answer).all(|b| b == "b0"));
    let idle = wait_for(Duration::from_secs(2), || {
        active(&d).values().all(|n| *n == 0).then_some(())
    });
    assert!(
        idle.is_some(),
        "nothing in flight once answered: {:?}",
        active(&d)
    );
}

#[test]
fn a_backend_in_slow_start_takes_a_growing_share() {
    let e = env("lcs", "tcp", "slow_start = 4\n");
    let d = &e.daemon;
    let first = hold(&e, 12);
    assert!(first.iter().all(|(_, b)| b == "b0"));
    d.clb_ok(&["backend", "add", "web", &be(1)]);
    // Weight 1 of 10 at first: least connections compares 12 / 10 with n / 1, so the new
    // backend takes about one new connection in ten instead of all of them.
    let early = hold(&e, 10);
    let on_new = early.iter().filter(|(_, b)| b == "b1").count();
    assert!(
        on_new <= 5,
        "a backend in slow start gets every new connection: {on_new} of 10"
    );
    let ls = d.clb_ok(&["backend", "ls", "web"]);
    assert!(ls.contains("slow start"), "{ls}");
    // Once the ramp is over it is a full member: the next ones go to it until it catches up.
    let full = wait_for(Duration::from_secs(8), || {
        let v: serde_json::Value = d.clb_json(&["backend", "ls", "web"]);
        v.as_array()
            .unwrap()
            .iter()
            .all(|b| b["weight_now"] == b["weight"])
            .then_some(())
    });
    assert!(full.is_some(), "{}", d.clb_ok(&["backend", "ls", "web"]));
    let late = hold(&e, 10);
    let on_new = late.iter().filter(|(_, b)| b == "b1").count();
    assert!(
        on_new >= 9,
        "at full weight the emptier backend takes them: {on_new} of 10"
    );
}

#[test]
fn weights_one_to_two_split_held_connections_one_to_two() {
    let topo = Topology::new("lc12", 2, 0).expect("topology");
    let servers: Vec<NameServer> = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            NameServer::tcp(
                ns,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
                &format!("b{i}"),
            )
            .expect("tcp server")
        })
        .collect();
    let mut cfg = format!(
        "[[listener]]\nname = \"web\"\nvip = \"{}\"\nproto = \"tcp\"\nsched = \"lc\"\n",
        vip(80)
    );
    for (i, w) in [10, 20].iter().enumerate() {
        cfg += &format!("[[listener.backend]]\naddr = \"{}\"\nweight = {w}\n", be(i));
    }
    let daemon = Daemon::start(&topo, &cfg);
    let e = Env {
        daemon,
        _servers: servers,
        topo,
    };
    let held = hold(&e, 30);
    let t = tally(held.iter().map(|(_, b)| b.as_str()));
    let (b0, b1) = (
        t.get("b0").copied().unwrap_or(0),
        t.get("b1").copied().unwrap_or(0),
    );
    assert!(
        (9..=11).contains(&b0) && b0 + b1 == 30,
        "weights 1 : 2 over 30 held: {t:?}"
    );
}
