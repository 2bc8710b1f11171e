//! State-exhaustion floods in namespaces, with real sockets and tables sized small through the
//! config (65 536 connections, sessions and half-open entries): 100 idle established TCP
//! connections (half on a persistence-off listener, half on a persistence-on one) and 50 idle
//! persisted clients survive a spoofed SYN flood of 10× the connection table and a spoofed UDP
//! flood of the same size at a UDP listener; real clients connecting during each flood
//! succeed.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use clb_tests::{
    daemon::Daemon,
    flood::{Flood, FloodSpec},
    netns::{Topology, VIP, backend_ip},
    servers::{NameServer, ask, ask_once, connect, udp_ask, udp_socket},
};

const TABLE: u32 = 65_536;
/// Frames sent: 10× the connection table, and some for what a full veth ring drops.
const FLOOD: u64 = 11 * TABLE as u64;

fn config() -> String {
    let mut s =
        format!("[tables]\nconnections = {TABLE}\nsessions = {TABLE}\nhalf_open = {TABLE}\n\n");
    for (name, port, proto, extra) in [
        ("off", 80, "tcp", ""),
        ("on", 81, "tcp", "persist = 600\n"),
        ("dns", 53, "udp", ""),
    ] {
        let bport = if proto == "udp" { 5353 } else { 8080 };
        s += &format!(
            "[[listener]]\nname = \"{name}\"\nvip = \"{VIP}:{port}\"\nproto = \"{proto}\"\n{extra}"
        );
        for i in 0..2 {
            s += &format!(
                "[[listener.backend]]\naddr = \"{}:{bport}\"\n",
                backend_ip(i)
            );
        }
    }
    s
}

struct Idle {
    ip: Ipv4Addr,
    port: u16,
    conn: TcpStream,
    backend: String,
}

/// Everything the floods must not disturb.
struct Victims {
    idle: Vec<Idle>,
    /// Persisted clients of listener `on` and their backend.
    persisted: HashMap<Ipv4Addr, String>,
}

fn victims(topo: &Topology) -> Victims {
    let c = &topo.extra_clients;
    let mut idle = Vec::new();
    for (i, ip) in c[..100].iter().enumerate() {
        let port = if i < 50 { 80 } else { 81 };
        let mut conn = connect(&topo.client, *ip, SocketAddrV4::new(VIP, port)).unwrap();
        let backend = ask(&mut conn).unwrap();
        idle.push(Idle {
            ip: *ip,
            port,
            conn,
            backend,
        });
    }
    let persisted = c[100..150]
        .iter()
        .map(|ip| {
            (
                *ip,
                ask_once(&topo.client, *ip, SocketAddrV4::new(VIP, 81)).unwrap(),
            )
        })
        .collect();
    Victims { idle, persisted }
}

/// Every idle connection still echoes, from its backend; every persisted client's new
/// connection reaches its backend.
fn check_survivors(topo: &Topology, v: &mut Victims, what: &str) {
    let mut broken = Vec::new();
    for i in &mut v.idle {
        match ask(&mut i.conn) {
            Ok(b) if b == i.backend => {}
            other => broken.push(format!("{}→:{} {other:?}", i.ip, i.port)),
        }
    }
    assert!(
        broken.is_empty(),
        "{what}: {} of 100 idle connections broke: {broken:?}",
        broken.len()
    );
    let moved: Vec<String> = v
        .persisted
        .iter()
        .filter_map(|(ip, b)| {
            let now = ask_once(&topo.client, *ip, SocketAddrV4::new(VIP, 81));
            (now.as_ref().ok() != Some(b)).then(|| format!("{ip}: {b} → {now:?}"))
        })
        .collect();
    assert!(
        moved.is_empty(),
        "{what}: {} of 50 persisted clients moved: {moved:?}",
        moved.len()
    );
}

/// Real clients open connections (TCP to both listeners; UDP to `dns` with `udp`) while
/// `running`; returns (attempts, successes).
fn real_clients(topo: &Topology, ips: &[Ipv4Addr], running: &AtomicBool, udp: bool) -> (u32, u32) {
    let (mut tries, mut ok) = (0u32, 0u32);
    let mut i = 0usize;
    while running.load(Ordering::Relaxed) && tries < 400 {
        let ip = ips[i % ips.len()];
        i += 1;
        tries += 1;
        let r = if udp && i.is_multiple_of(2) {
            udp_socket(&topo.client, ip)
                .and_then(|s| udp_ask(&s, SocketAddrV4::new(VIP, 53)))
                .map(drop)
        } else {
            match connect(
                &topo.client,
                ip,
                SocketAddrV4::new(VIP, 80 + (i % 2) as u16),
            ) {
                Ok(mut c) => ask(&mut c)
                    .map(drop)
                    .map_err(|e| std::io::Error::other(format!("ask: {e}"))),
                Err(e) => Err(std::io::Error::other(format!("connect: {e}"))),
            }
        };
        match r {
            Ok(()) => ok += 1,
            Err(e) => eprintln!("real client {ip} attempt {tries}: {e}"),
        }
    }
    (tries, ok)
}

fn flood(topo: &Topology, proto: u8, port: u16) -> Flood {
    let a = topo.attacker.as_ref().unwrap();
    Flood::new(
        a,
        FloodSpec {
            dst_mac: topo.lb.mac("a0").unwrap(),
            src_mac: a.mac("eth0").unwrap(),
            // 100.64.0.0/10: a million distinct spoofed sources.
            src_base: Ipv4Addr::new(100, 64, 0, 0),
            sources: 1 << 20,
            dst: SocketAddrV4::new(VIP, port),
            proto,
            tcp_flags: 0,
            ifindex: a.ifindex("eth0").unwrap(),
        },
    )
    .unwrap()
}

/// Packets the balancer took in on listener `name` (client → backend).
fn fwd_packets(d: &Daemon, name: &str) -> u64 {
    let st: serde_json::Value = d.clb_json(&["stats"]);
    st["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .and_then(|l| l["fwd_packets"].as_u64())
        .unwrap_or(0)
}

/// Runs flood `f` while real clients connect; returns (frames the balancer forwarded for the
/// flooded listener, real attempts, real successes).
fn run_flood(topo: &Topology, d: &Daemon, f: &Flood, udp: bool) -> (u64, u32, u32) {
    let target = if udp { "dns" } else { "off" };
    let before = fwd_packets(d, target);
    let running = AtomicBool::new(true);
    let (sent, (tries, ok)) = std::thread::scope(|s| {
        let clients = s.spawn(|| real_clients(topo, &topo.extra_clients[150..], &running, udp));
        // Offered at 1 Mpps on the attacker's own link (what the balancer cannot take, the
        // link's ring drops, as a NIC's would).
        let sent = f
            .send(
                topo.attacker.as_ref().unwrap(),
                FLOOD,
                200_000,
                Duration::from_secs(30),
            )
            .unwrap();
        running.store(false, Ordering::Relaxed);
        (sent, clients.join().unwrap())
    });
    let reached = fwd_packets(d, target) - before;
    let st: serde_json::Value = d.clb_json(&["status"]);
    println!(
        "flood ({}): sent {sent}, reached the balancer's listener {reached}, real clients {ok}/{tries}; flood mode {}; tables {}",
        if udp { "udp" } else { "syn" },
        st["flood"],
        st["tables"]
    );
    (reached, tries, ok)
}

#[test]
fn established_flows_and_persisted_clients_survive_syn_and_udp_floods() {
    let topo = Topology::with_attacker("fl", 2, 250).unwrap();
    let _servers: Vec<NameServer> = topo
        .backends
        .iter()
        .enumerate()
        .flat_map(|(i, ns)| {
            [
                NameServer::tcp(
                    ns,
                    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8080),
                    &format!("b{i}"),
                )
                .unwrap(),
                NameServer::udp(
                    ns,
                    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 5353),
                    &format!("b{i}"),
                )
                .unwrap(),
            ]
        })
        .collect();
    for ns in &topo.backends {
        // The backends face the flood too: SYN cookies keep their own SYN queues usable.
        ns.sysctl("net.ipv4.tcp_syncookies=1").unwrap();
    }
    let d = Daemon::start(&topo, &config());
    let mut v = victims(&topo);

    // A spoofed SYN flood at the persistence-off listener.
    let syn = flood(&topo, 6, 80);
    let (reached, tries, ok) = run_flood(&topo, &d, &syn, false);
    assert!(
        reached >= 10 * u64::from(TABLE),
        "only {reached} SYNs reached the listener"
    );
    assert!(
        tries >= 20,
        "only {tries} real connection attempts during the flood"
    );
    assert!(
        f64::from(ok) >= 0.99 * f64::from(tries),
        "real clients during the SYN flood: {ok}/{tries}"
    );
    let st: serde_json::Value = d.clb_json(&["status"]);
    assert!(
        st["flood"]["entered"].as_u64().unwrap() >= 1,
        "flood mode never started: {st}"
    );
    check_survivors(&topo, &mut v, "after the SYN flood");

    // A spoofed UDP flood of the same size at the UDP listener, TCP connections idle.
    let udp = flood(&topo, 17, 53);
    let (reached, tries, ok) = run_flood(&topo, &d, &udp, true);
    assert!(
        reached >= 10 * u64::from(TABLE),
        "only {reached} datagrams reached the listener"
    );
    assert!(
        f64::from(ok) >= 0.99 * f64::from(tries),
        "real clients during the UDP flood: {ok}/{tries}"
    );
    check_survivors(&topo, &mut v, "after the UDP flood");
}
