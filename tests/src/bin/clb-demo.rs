//! `cargo xtask run` without a NIC: a client, the balancer and three backends in network
//! namespaces; the clb daemon on the balancer's veths in native XDP mode; everything driven
//! through the `clb` CLI. Shows round robin, then source-IP persistence, the tables, an HTTP
//! listener with cookie persistence, and the counters. Cleans up on exit and on Ctrl-C (`--keep` leaves it running until Ctrl-C).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use clb_tests::{
    daemon::Daemon,
    http::{HttpServer, get_once},
    netns::{CLIENT_IP, Topology, VIP, backend_ip},
    servers::{NameServer, ask_once},
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
    let keep = std::env::args().any(|a| a == "--keep");
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_sigint as *const () as libc::sighandler_t);
    }
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
            NameServer::tcp(
                ns,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8080),
                &format!("backend-{i}"),
            )
        })
        .collect::<Result<_, _>>()?;
    println!("backends answer with their name on :8080");
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
