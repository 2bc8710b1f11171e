//! End-to-end tests of health checks, draining and metrics.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use clb_tests::{
    daemon::{Daemon, one_listener_config},
    netns::{CLIENT_IP, Topology, VIP, backend_ip},
    servers::{NameServer, ask, ask_once, connect, udp_ask, udp_socket},
    wait_for,
};

const PORT: u16 = 8080;
/// Fast health checks: every 2 s, 2 failures or successes to change state.
const HC: &str = "[listener.health_check]\ninterval = 2\ntimeout = 2\nhealthy_threshold = 2\nunhealthy_threshold = 2\n";

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, 80)
}

fn be(i: usize) -> String {
    format!("{}:{PORT}", backend_ip(i))
}

fn config(proto: &str, port: u16, n: usize, extra: &str) -> String {
    one_listener_config(
        "web",
        SocketAddrV4::new(VIP, port),
        proto,
        n,
        PORT,
        &format!("{extra}\n{HC}"),
    )
}

fn server(topo: &Topology, i: usize) -> NameServer {
    NameServer::tcp(
        &topo.backends[i],
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
        &format!("b{i}"),
    )
    .unwrap()
}

/// `n` connections from the client to the VIP, each with the backend that answered it.
fn open_conns(topo: &Topology, n: usize) -> Vec<(TcpStream, String)> {
    (0..n)
        .map(|_| {
            let mut c = connect(&topo.client, CLIENT_IP, vip()).unwrap();
            let who = ask(&mut c).unwrap();
            (c, who)
        })
        .collect()
}

fn backend_view(d: &Daemon, addr: &str) -> serde_json::Value {
    let v: Vec<serde_json::Value> = d.clb_json(&["backend", "ls", "web"]);
    v.into_iter()
        .find(|b| b["addr"] == addr)
        .expect("backend listed")
}

#[test]
fn dead_backend_loses_new_and_persisted_clients_and_rejoins() {
    // 60 clients to persist, then fresh (never persisted) clients for the checks after.
    let topo = Topology::new("hc", 3, 76).unwrap();
    let (mapped, fresh) = topo.extra_clients.split_at(60);
    let mut servers: Vec<NameServer> = (0..3).map(|i| server(&topo, i)).collect();
    let d = Daemon::start(&topo, &config("tcp", 80, 3, "persist = 600"));
    let mut on: HashMap<Ipv4Addr, String> = HashMap::new();
    for &ip in mapped {
        on.insert(ip, ask_once(&topo.client, ip, vip()).unwrap());
    }
    let victims: Vec<Ipv4Addr> = on
        .iter()
        .filter(|(_, b)| *b == "b1")
        .map(|(ip, _)| *ip)
        .collect();
    assert_eq!(
        victims.len(),
        20,
        "round robin gave b1 a third of 60 clients"
    );
    // An established connection to b1 that must be left alone by the health change.
    let mut est = connect(&topo.client, victims[0], vip()).unwrap();
    assert_eq!(ask(&mut est).unwrap(), "b1");

    // b1's service stops listening (connects are refused); its open connection lives on.
    servers[1].stop_accepting();
    let t0 = Instant::now();
    let detected = wait_for(Duration::from_secs(15), || {
        (backend_view(&d, &be(1))["health"] == "unhealthy").then(|| t0.elapsed())
    })
    .expect("b1 never marked unhealthy");
    // interval × unhealthy threshold + one interval.
    let bound = Duration::from_secs(2 * 2 + 2);
    println!(
        "detection took {:.2} s (configured bound {} s)",
        detected.as_secs_f64(),
        bound.as_secs()
    );
    assert!(
        detected <= bound + Duration::from_millis(500),
        "detection took {detected:?}"
    );
    let b1 = backend_view(&d, &be(1));
    assert_eq!(b1["accepting"], false);
    // Its persisted clients' next connections land on the other two.
    for ip in &victims {
        let now = ask_once(&topo.client, *ip, vip()).expect("persisted client rescheduled");
        assert!(now == "b0" || now == "b2", "{ip} went to {now}");
    }
    // No new connection of a new client reaches it.
    for ip in &fresh[..6] {
        assert_ne!(ask_once(&topo.client, *ip, vip()).unwrap(), "b1");
    }
    // Its established connection is left alone.
    for _ in 0..3 {
        assert_eq!(
            ask(&mut est).unwrap(),
            "b1",
            "established flow on an unhealthy backend"
        );
    }
    drop(est);
    servers[1].stop();
    // Restart the server: it rejoins after the healthy threshold.
    servers[1] = server(&topo, 1);
    let t1 = Instant::now();
    let rejoined = wait_for(Duration::from_secs(15), || {
        (backend_view(&d, &be(1))["health"] == "healthy").then(|| t1.elapsed())
    })
    .expect("b1 never rejoined");
    println!("rejoined after {:.2} s", rejoined.as_secs_f64());
    let got: Vec<String> = fresh[6..]
        .iter()
        .map(|ip| ask_once(&topo.client, *ip, vip()).unwrap())
        .collect();
    assert!(
        got.iter().any(|b| b == "b1"),
        "b1 back in the schedule: {got:?}"
    );
    let stats: serde_json::Value = d.clb_json(&["stats"]);
    let transitions = stats["health_transitions"].as_array().unwrap();
    assert_eq!(transitions.len(), 2, "{transitions:?}");
    drop(d);
    drop(servers);
}

#[test]
fn all_backends_down_still_get_traffic_and_the_state_says_so() {
    let topo = Topology::new("ad", 3, 0).unwrap();
    let mut servers: Vec<NameServer> = (0..3).map(|i| server(&topo, i)).collect();
    let d = Daemon::start(&topo, &config("tcp", 80, 3, ""));
    for s in &mut servers {
        s.stop();
    }
    wait_for(Duration::from_secs(15), || {
        let v: Vec<serde_json::Value> = d.clb_json(&["listener", "ls"]);
        (v[0]["all_backends_unhealthy"] == true).then_some(())
    })
    .expect("listener never reported all backends unhealthy");
    let bs: Vec<serde_json::Value> = d.clb_json(&["backend", "ls", "web"]);
    assert!(
        bs.iter()
            .all(|b| b["health"] == "unhealthy" && b["accepting"] == true),
        "{bs:?}"
    );
    assert!(
        d.clb_ok(&["listener", "ls"])
            .contains("all backends unhealthy")
    );
    // New connections are still sent (to all of them): each is refused by a backend's
    // kernel, not dropped by the balancer.
    let before: serde_json::Value = d.clb_json(&["stats"]);
    for _ in 0..6 {
        let e = connect(&topo.client, CLIENT_IP, vip()).expect_err("backends are down");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    }
    let after: serde_json::Value = d.clb_json(&["stats"]);
    let per_backend: Vec<u64> = (0..3)
        .map(|i| {
            after["listeners"][0]["backends"][i]["new_conns"]
                .as_u64()
                .unwrap()
                - before["listeners"][0]["backends"][i]["new_conns"]
                    .as_u64()
                    .unwrap()
        })
        .collect();
    assert_eq!(per_backend, vec![2, 2, 2], "sent to all backends in turn");
}

#[test]
fn maintenance_cuts_at_once_holds_across_a_restart_and_ends_on_ready() {
    let topo = Topology::new("mt", 2, 0).unwrap();
    let _servers: Vec<NameServer> = (0..2).map(|i| server(&topo, i)).collect();
    let mut d = Daemon::start(&topo, &config("tcp", 80, 2, ""));
    let on_b0 = |d: &Daemon| {
        let conns: Vec<serde_json::Value> = d.clb_json(&["conn", "ls"]);
        conns
            .iter()
            .filter(|c| c["backend"] == be(0).as_str())
            .count()
    };
    let mut conns = open_conns(&topo, 8);
    assert_eq!(conns.iter().filter(|(_, w)| w == "b0").count(), 4);
    // A drain keeps b0's connections (until its timeout, 60 s here)...
    d.clb_ok(&["backend", "drain", "web", &be(0), "--timeout", "60"]);
    assert_eq!(on_b0(&d), 4, "a drain keeps established connections");
    // ...maintenance cuts them at once, and stops b0's health checks.
    d.clb_ok(&["backend", "set", "web", &be(0), "--state", "maint"]);
    assert_eq!(on_b0(&d), 0, "maintenance cuts established connections");
    let view = backend_view(&d, &be(0));
    assert_eq!(view["state"], "maint");
    assert_eq!(view["accepting"], false);
    assert!(d.clb_ok(&["backend", "ls", "web"]).contains("maint"));
    assert!(
        d.config_text().contains("state = \"maint\""),
        "{}",
        d.config_text()
    );
    let ev = d.clb_ok(&["status", "--events", "5"]);
    assert!(ev.contains("maint"), "audited: {ev}");
    for _ in 0..4 {
        assert_eq!(ask_once(&topo.client, CLIENT_IP, vip()).unwrap(), "b1");
    }
    // The connections on b1 never noticed.
    for (c, who) in conns.iter_mut().filter(|(_, w)| w == "b1") {
        assert_eq!(ask(c).unwrap(), *who);
    }
    // It is the file's: a restart keeps b0 out.
    d.stop();
    d.spawn();
    assert_eq!(backend_view(&d, &be(0))["state"], "maint");
    for _ in 0..4 {
        assert_eq!(ask_once(&topo.client, CLIENT_IP, vip()).unwrap(), "b1");
    }
    // Back in service: checked again, and new clients reach it (turns taken in order).
    d.clb_ok(&["backend", "set", "web", &be(0), "--state", "ready"]);
    assert!(!d.config_text().contains("maint"));
    let back = wait_for(Duration::from_secs(10), || {
        (0..4)
            .any(|_| ask_once(&topo.client, CLIENT_IP, vip()).ok().as_deref() == Some("b0"))
            .then_some(())
    });
    assert!(back.is_some(), "b0 back in service takes new clients");
    // Bad input changes nothing.
    let bad = d.clb(&["backend", "set", "web", &be(0), "--state", "off"]);
    assert!(
        !bad.ok && bad.stderr.contains("ready or maint"),
        "{}",
        bad.stderr
    );
    let none = d.clb(&["backend", "set", "web", &be(0)]);
    assert!(!none.ok, "nothing to change is refused");
}

#[test]
fn drained_backend_keeps_its_connections_until_the_timeout() {
    let topo = Topology::new("dr", 2, 0).unwrap();
    let servers: Vec<NameServer> = (0..2).map(|i| server(&topo, i)).collect();
    // Sweeps every second: `backend ls` counts live connections from the sweeper's walk.
    let d = Daemon::start_with(&topo, &config("tcp", 80, 2, ""), &["--sweep-interval", "1"]);
    // 20 connections: 10 on each backend.
    let mut conns = open_conns(&topo, 20);
    let mut on_b0: Vec<TcpStream> = Vec::new();
    conns.retain_mut(|(c, who)| {
        if who == "b0" {
            on_b0.push(c.try_clone().unwrap());
            false
        } else {
            true
        }
    });
    assert_eq!(on_b0.len(), 10);
    d.clb_ok(&["backend", "drain", "web", &be(0), "--timeout", "8"]);
    let view = backend_view(&d, &be(0));
    assert_eq!(view["draining"], true);
    // Live counts come from the sweeper's walk (every 5 s): poll, bounded.
    let conns = wait_for(Duration::from_secs(12), || {
        let n = backend_view(&d, &be(0))["live"]["conns"]
            .as_u64()
            .unwrap_or(0);
        (n == 10).then_some(n)
    });
    assert_eq!(
        conns,
        Some(10),
        "backend ls counts the drained backend's 10 connections"
    );
    assert!(
        d.clb_ok(&["backend", "ls", "web"])
            .contains("draining, cut in")
    );
    for _ in 0..6 {
        assert_eq!(
            ask_once(&topo.client, CLIENT_IP, vip()).unwrap(),
            "b1",
            "no new connection to a draining backend"
        );
    }
    for c in &mut on_b0 {
        assert_eq!(
            ask(c).unwrap(),
            "b0",
            "drained backend's connections keep working"
        );
    }
    // The drain loop cuts them once the 8 s are up: poll, bounded.
    let cut = wait_for(Duration::from_secs(14), || {
        let conns_now: Vec<serde_json::Value> = d.clb_json(&["conn", "ls"]);
        conns_now
            .iter()
            .all(|c| c["backend"] != be(0).as_str())
            .then_some(())
    });
    assert!(
        cut.is_some(),
        "drained connections still in the table 14 s after the drain"
    );
    let gone = wait_for(Duration::from_secs(12), || {
        (backend_view(&d, &be(0))["live"]["conns"].as_u64() == Some(0)).then_some(())
    });
    assert!(
        gone.is_some(),
        "no live connection of the drained backend is counted"
    );
    for c in &mut on_b0 {
        assert!(
            ask(c).is_err(),
            "a cut connection must not reach the backend"
        );
    }
    drop(d);
    drop(servers);
}

fn scrape(topo: &Topology, port: u16) -> String {
    let mut s = topo
        .lb
        .run(|| TcpStream::connect(("127.0.0.1", port)))
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_lowercase().contains("text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_owned()
}

/// The value of the sample `name{labels}` (labels given exactly as exposed).
fn sample(body: &str, series: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
        .parse()
        .unwrap()
}

#[test]
fn metrics_scrape_validates_and_counts_what_was_sent() {
    let topo = Topology::new("mt", 2, 0).unwrap();
    let servers: Vec<NameServer> = (0..2)
        .map(|i| {
            NameServer::udp(
                &topo.backends[i],
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
                &format!("b{i}"),
            )
            .unwrap()
        })
        .collect();
    let cfg = config("udp", 53, 2, "").replace(HC, "[listener.health_check]\nkind = \"none\"\n");
    let d = Daemon::start_with(&topo, &cfg, &["--metrics", "127.0.0.1:9901"]);
    let before = scrape(&topo, 9901);
    // 4 sockets × 10 datagrams: 4 new flows, 40 packets each way.
    for _ in 0..4 {
        let s = udp_socket(&topo.client, CLIENT_IP).unwrap();
        for _ in 0..10 {
            udp_ask(&s, SocketAddrV4::new(VIP, 53)).unwrap();
        }
    }
    let body = scrape(&topo, 9901);
    let check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(body.as_bytes())?;
            c.wait_with_output()
        })
        .expect("running promtool");
    assert!(
        check.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let delta = |series: &str| sample(&body, series) - sample(&before, series);
    assert_eq!(
        delta("clb_listener_packets_total{listener=\"web\",direction=\"in\"}"),
        40
    );
    assert_eq!(
        delta("clb_listener_packets_total{listener=\"web\",direction=\"out\"}"),
        40
    );
    assert_eq!(
        delta("clb_listener_new_connections_total{listener=\"web\"}"),
        4
    );
    let per_backend: u64 = (0..2)
        .map(|i| {
            delta(&format!(
                "clb_backend_new_connections_total{{listener=\"web\",backend=\"{}\"}}",
                be(i)
            ))
        })
        .sum();
    assert_eq!(per_backend, 4);
    assert_eq!(
        sample(
            &body,
            &format!("clb_backend_up{{listener=\"web\",backend=\"{}\"}}", be(0))
        ),
        1
    );
    assert!(body.contains("clb_datapath_drops_total{reason=\"fragment\"} 0"));
    println!(
        "scrape excerpt:\n{}",
        body.lines()
            .filter(|l| l.contains("listener=\"web\""))
            .take(12)
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(d);
    drop(servers);
}
