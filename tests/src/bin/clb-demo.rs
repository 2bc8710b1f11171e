//! `cargo xtask run` without a NIC: a client, the balancer and three backends in network
//! namespaces; the clb daemon on the balancer's veths in native XDP mode; everything driven
//! through the `clb` CLI. Shows round robin, then source-IP persistence, the tables, an HTTP
//! listener with cookie persistence, and the counters. Cleans up on exit and on Ctrl-C
//! (`--keep` leaves it running until Ctrl-C).
//!
//! `cargo xtask run --fleet N`: N clb nodes announce the VIP over BGP (BIRD) to a router doing
//! ECMP; backends on one L2 segment answer clients directly (DSR); one client's connections
//! cross several nodes yet reach one backend; a node dies silently and comes back.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use clb_tests::{
    daemon::Daemon,
    fleet::{self, Fleet, RouterBird},
    http::{HttpServer, get_once},
    netns::{CLIENT_IP, CLIENT_IP6, Topology, VIP, VIP6, backend_ip, backend_ip6},
    servers::{NameServer, ask, ask_once, connect},
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

fn cli(d: &Daemon, args: &[&str]) {
    println!("\n$ clb {}", args.join(" "));
    let o = d.clb(args);
    print!("{}", o.stdout);
    if !o.ok {
        print!("{}", o.stderr);
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let keep = args.iter().any(|a| a == "--keep");
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_sigint as *const () as libc::sighandler_t);
    }
    if let Some(i) = args.iter().position(|a| a == "--fleet") {
        let n: usize = args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .filter(|n| (2..=8).contains(n))
            .ok_or_else(|| anyhow::anyhow!("--fleet takes a node count from 2 to 8"))?;
        return fleet_demo(n, keep);
    }
    single_demo(keep)
}

/// The node that carried the last new flow: the one whose new-connection count grew.
fn carrier(nodes: &[Daemon], before: &mut [u64]) -> String {
    let mut who = Vec::new();
    for (i, d) in nodes.iter().enumerate() {
        // A dead node carries nothing (and its API does not answer).
        if d.pid().is_none() {
            continue;
        }
        let st: serde_json::Value = d.clb_json(&["stats"]);
        let n = st["listeners"][0]["new_conns"].as_u64().unwrap_or(0);
        if n > before[i] {
            who.push(format!("node{i}"));
        }
        before[i] = n;
    }
    who.join("+")
}

fn fleet_demo(n: usize, keep: bool) -> anyhow::Result<()> {
    println!(
        "== clb fleet demo: {n} nodes announce the VIP over BGP to a router doing ECMP; 3 backends answer clients directly (DSR) =="
    );
    let f = Fleet::new("fd", n, 3, 4)?;
    println!(
        "namespaces: client {}, router {} (BIRD, ECMP, L4 hash), switch {} (a bridge), nodes {}, backends {}",
        f.client.name(),
        f.router.name(),
        f.switch.name(),
        f.nodes
            .iter()
            .map(|x| x.name().to_owned())
            .collect::<Vec<_>>()
            .join(", "),
        f.backends
            .iter()
            .map(|x| x.name().to_owned())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "backends prepared for DSR: VIP {VIP}/32 on lo, net.ipv4.conf.{{all,eth0}}.arp_ignore=1 and arp_announce=2, default route via the router {}",
        fleet::ROUTER_IP
    );
    let servers: Vec<NameServer> = f
        .backends
        .iter()
        .enumerate()
        .map(|(j, ns)| {
            NameServer::tcp(
                ns,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 80),
                &format!("backend-{j}"),
            )
        })
        .collect::<Result<_, _>>()?;
    let router = RouterBird::start(&f)?;
    let mut listeners = format!(
        "[[listener]]\nname = \"web\"\nvip = \"{VIP}:80\"\nproto = \"tcp\"\nsched = \"maglev\"\nforward = \"dsr\"\npersist = 600\n"
    );
    for j in 0..3 {
        listeners += &format!(
            "[[listener.backend]]\naddr = \"{}:80\"\n",
            fleet::backend_ip(j)
        );
    }
    let cfg = Fleet::node_config(&listeners);
    println!("\nevery node runs from the same config file:\n{cfg}");
    let mut nodes: Vec<Daemon> = f
        .nodes
        .iter()
        .map(|x| Daemon::start_on(x, "eth0", &cfg, &[]))
        .collect();
    let all: Vec<Ipv4Addr> = (0..n).map(fleet::node_ip).collect();
    let ready = clb_tests::wait_for(Duration::from_secs(30), || {
        (f.vip_nexthops() == all).then_some(())
    });
    anyhow::ensure!(
        ready.is_some(),
        "the router never learned every node:\n{}",
        router.log()
    );
    println!("$ ip route show {VIP} (router)\n{}", f.vip_route()?);
    cli(&nodes[0], &["bgp", "status"]);

    let client = f.extra_clients[0];
    let vip = SocketAddrV4::new(VIP, 80);
    let mut counts = vec![0u64; n];
    carrier(&nodes, &mut counts);
    println!("\n-- one client, {client}: 12 new connections --");
    for k in 1..=12 {
        if stopped() {
            break;
        }
        let who = ask_once(&f.client, client, vip)?;
        println!(
            "  connection {k:2} via {:6} -> {who}",
            carrier(&nodes, &mut counts)
        );
    }
    let mut long = connect(&f.client, client, vip)?;
    let long_be = ask(&mut long)?;
    println!("  a long-lived connection of the same client -> {long_be}");
    cli(&nodes[0], &["stats"]);
    println!("(replies never cross the nodes: DSR; the reply-path counters stay 0)");

    if !stopped() {
        println!(
            "\n-- node1 dies without a word: its link goes silent and its daemon is killed --"
        );
        let t0 = std::time::Instant::now();
        f.nodes[1].ip(&["link", "set", "eth0", "down"])?;
        nodes[1].kill9();
        let rest: Vec<Ipv4Addr> = all
            .iter()
            .copied()
            .filter(|a| *a != fleet::node_ip(1))
            .collect();
        let gone = clb_tests::wait_for(Duration::from_secs(10), || {
            (f.vip_nexthops() == rest).then_some(())
        });
        anyhow::ensure!(gone.is_some(), "the router kept the dead node");
        println!(
            "  the router dropped node1 after {} ms (BFD); route now: {}",
            t0.elapsed().as_millis(),
            f.vip_route()?.trim()
        );
        println!("  the long-lived connection -> {}", ask(&mut long)?);
        for k in 1..=6 {
            let who = ask_once(&f.client, client, vip)?;
            println!(
                "  new connection {k} via {:6} -> {who}",
                carrier(&nodes, &mut counts)
            );
        }
        println!("\n-- node1 comes back --");
        f.nodes[1].ip(&["link", "set", "eth0", "up"])?;
        let t1 = std::time::Instant::now();
        nodes[1].spawn();
        let back = clb_tests::wait_for(Duration::from_secs(30), || {
            (f.vip_nexthops() == all).then_some(())
        });
        anyhow::ensure!(back.is_some(), "node1 did not come back");
        println!(
            "  announced again after {:.1} s; route: {}",
            t1.elapsed().as_secs_f64(),
            f.vip_route()?.trim()
        );
        println!("  the long-lived connection -> {}", ask(&mut long)?);
        for k in 1..=6 {
            let who = ask_once(&f.client, client, vip)?;
            println!(
                "  new connection {k} via {:6} -> {who}",
                carrier(&nodes, &mut counts)
            );
        }
    }
    if keep && !stopped() {
        println!(
            "\n--keep: the fleet stays up. Try:\n  CLB_API={} {} bgp status\n  ip netns exec {} ip route\nCtrl-C to clean up.",
            nodes[0].api.display(),
            clb_tests::daemon::clb_bin().display(),
            f.router.name()
        );
        while !stopped() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    println!(
        "\n== cleaning up: daemons (and their BIRDs), datapaths, router, servers, namespaces =="
    );
    drop(long);
    drop(nodes);
    drop(router);
    drop(servers);
    drop(f);
    println!("done");
    Ok(())
}

fn single_demo(keep: bool) -> anyhow::Result<()> {
    println!("== clb demo: a client, a balancer and 3 backends in network namespaces ==");
    let topo = Topology::new("demo", 3, 3)?;
    println!(
        "namespaces: client {} (10.0.1.2 + 10.2.0.1-3), balancer {} (VIP {VIP}), backends {}",
        topo.client.name(),
        topo.lb.name(),
        topo.backends
            .iter()
            .map(|b| b.name().to_owned())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let servers: Vec<NameServer> = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            // [::]:8080 takes IPv4 and IPv6 connections alike.
            NameServer::tcp(
                ns,
                SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 8080),
                &format!("backend-{i}"),
            )
        })
        .collect::<Result<_, _>>()?;
    println!("backends answer with their name on :8080 (IPv4 and IPv6)");
    let d = Daemon::start(&topo, "");
    println!(
        "clb daemon running in the balancer namespace on {} (native XDP)",
        topo.iface_list()
    );

    let vip = SocketAddrV4::new(VIP, 80);
    cli(
        &d,
        &[
            "listener",
            "add",
            "web",
            "--vip",
            "10.0.0.100:80",
            "--proto",
            "tcp",
        ],
    );
    for i in 0..3 {
        cli(
            &d,
            &["backend", "add", "web", &format!("{}:8080", backend_ip(i))],
        );
    }
    cli(&d, &["listener", "ls"]);

    println!("\n-- persistence off: 9 new connections from {CLIENT_IP} (round robin) --");
    for n in 1..=9 {
        if stopped() {
            break;
        }
        let who = ask_once(&topo.client, CLIENT_IP, vip)
            .map_err(|e| anyhow::anyhow!("connection {n}: {e}"))?;
        println!("  connection {n} -> {who}");
    }

    cli(&d, &["listener", "set", "web", "--persist", "30"]);
    println!("\n-- persistence 30 s: 3 clients x 4 new connections each --");
    for &ip in &topo.extra_clients {
        if stopped() {
            break;
        }
        let seen: Vec<String> = (0..4)
            .map(|_| ask_once(&topo.client, ip, vip))
            .collect::<Result<_, _>>()?;
        println!("  {ip}: {}", seen.join(" "));
    }
    cli(&d, &["session", "ls"]);
    cli(&d, &["conn", "ls"]);

    println!(
        "\n-- IPv6: a listener on [{VIP6}]:80 beside the IPv4 one, 6 connections from {CLIENT_IP6} --"
    );
    let vip6 = SocketAddr::new(VIP6.into(), 80);
    let vip6_arg = vip6.to_string();
    cli(
        &d,
        &[
            "listener", "add", "web6", "--vip", &vip6_arg, "--proto", "tcp",
        ],
    );
    for i in 0..3 {
        let b = SocketAddr::new(backend_ip6(i).into(), 8080).to_string();
        cli(&d, &["backend", "add", "web6", &b]);
    }
    for n in 1..=6 {
        if stopped() {
            break;
        }
        let who = ask_once(&topo.client, CLIENT_IP6, vip6)
            .map_err(|e| anyhow::anyhow!("IPv6 connection {n}: {e}"))?;
        println!("  connection {n} -> {who}");
    }
    cli(&d, &["conn", "ls", "--client", "fd00:1::/64"]);

    println!("\n-- HTTP listener with cookie persistence (backends answer on :8081) --");
    let http: Vec<HttpServer> = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            HttpServer::start(
                ns,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8081),
                &format!("backend-{i}"),
            )
        })
        .collect::<Result<_, _>>()?;
    cli(
        &d,
        &[
            "listener",
            "add",
            "shop",
            "--vip",
            "10.0.0.100:8081",
            "--proto",
            "http",
            "--persist",
            "600",
        ],
    );
    for i in 0..3 {
        cli(
            &d,
            &["backend", "add", "shop", &format!("{}:8081", backend_ip(i))],
        );
    }
    let shop = SocketAddrV4::new(VIP, 8081);
    // The listener starts right after the change; give it a moment.
    clb_tests::wait_for(Duration::from_secs(5), || {
        get_once(&topo.client, shop, None).ok()
    });
    let mut jar: Option<String> = None;
    let mut seen = Vec::new();
    for _ in 0..5 {
        let (who, set) = get_once(&topo.client, shop, jar.as_deref())?;
        if set.is_some() {
            jar = set;
        }
        seen.push(who);
    }
    println!(
        "  a browser keeping its cookie, 5 new connections: {}",
        seen.join(" ")
    );
    println!("  its cookie: {}", jar.as_deref().unwrap_or("-"));
    let fresh: Vec<String> = (0..5)
        .map(|_| get_once(&topo.client, shop, None).map(|(w, _)| w))
        .collect::<Result<_, _>>()?;
    println!("  5 browsers without cookies: {}", fresh.join(" "));
    cli(&d, &["stats"]);

    if keep && !stopped() {
        println!(
            "\n--keep: the topology stays up. Try:\n  CLB_API={} {} listener ls\n  ip netns exec {} bash\nCtrl-C to clean up.",
            d.api.display(),
            clb_tests::daemon::clb_bin().display(),
            topo.client.name()
        );
        while !stopped() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    println!("\n== cleaning up: daemon, datapath, servers, namespaces ==");
    drop(d);
    drop(servers);
    drop(http);
    drop(topo);
    println!("done");
    Ok(())
}
