//! Two balancer nodes, each its own daemon and pins, started from the same config, a Maglev
//! listener with persistence (DSR, on one L2 segment with the backends): clients whose
//! connections alternate between the nodes stay on one backend on both. After a backend is
//! added on both nodes, clients with a live persistence entry move not at all, and clients
//! without one move in about 1/N of cases (N backends after the change).

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use clb_tests::{
    daemon::Daemon,
    fleet::{Fleet, backend_ip},
    netns::VIP,
    servers::{NameServer, ask_once},
    wait_for,
};

const PORT: u16 = 80;
/// Short persistence, so that the second group's entries expire while the first keeps its own.
const PERSIST: u64 = 8;

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, PORT)
}

fn config() -> String {
    let mut s = format!(
        "[[listener]]\nname = \"web\"\nvip = \"{}\"\nproto = \"tcp\"\nsched = \"maglev\"\nforward = \"dsr\"\npersist = {PERSIST}\n",
        vip()
    );
    for j in 0..3 {
        s += &format!(
            "[[listener.backend]]\naddr = \"{}:{PORT}\"\n",
            backend_ip(j)
        );
    }
    s
}

/// One connection of `ip` through node `node`; the answering backend.
fn via(f: &Fleet, node: usize, ip: Ipv4Addr) -> String {
    f.route_vip_via(node).unwrap();
    ask_once(&f.client, ip, vip()).unwrap_or_else(|e| panic!("{ip} via node {node}: {e}"))
}

/// `conns` connections of each client, alternating nodes; every client's answers must agree.
fn homes(f: &Fleet, clients: &[Ipv4Addr], conns: usize) -> HashMap<Ipv4Addr, String> {
    let mut out = HashMap::new();
    for (k, ip) in clients.iter().enumerate() {
        let first = via(f, k % 2, *ip);
        for n in 1..conns {
            let again = via(f, (k + n) % 2, *ip);
            assert_eq!(again, first, "client {ip} moved between nodes");
        }
        out.insert(*ip, first);
    }
    out
}

fn forwarded(d: &Daemon) -> u64 {
    let st: serde_json::Value = d.clb_json(&["stats"]);
    st["listeners"][0]["fwd_packets"].as_u64().unwrap()
}

#[test]
fn two_nodes_agree_and_a_new_backend_moves_only_unpersisted_clients() {
    let f = Fleet::new("mg", 2, 4, 400).unwrap();
    let _servers: Vec<NameServer> = f
        .backends
        .iter()
        .enumerate()
        .map(|(j, ns)| {
            NameServer::tcp(
                ns,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
                &format!("b{j}"),
            )
            .unwrap()
        })
        .collect();
    let nodes: Vec<Daemon> = f
        .nodes
        .iter()
        .map(|n| Daemon::start_on(n, "eth0", &config(), &[]))
        .collect();
    for (i, d) in nodes.iter().enumerate() {
        let up = wait_for(Duration::from_secs(10), || {
            f.route_vip_via(i).ok()?;
            ask_once(&f.client, f.extra_clients[0], vip()).ok()
        });
        assert!(up.is_some(), "node {i} does not answer:\n{}", d.log());
    }
    let (a, b) = f.extra_clients.split_at(100);

    // 100 clients (A), three connections each, and 300 others (B), two each (enough for a
    // share measured to a few percent), alternating nodes.
    let home_a = homes(&f, a, 3);
    let home_b = homes(&f, b, 2);
    let mut spread: HashMap<&String, u32> = HashMap::new();
    for h in home_a.values().chain(home_b.values()) {
        *spread.entry(h).or_default() += 1;
    }
    assert_eq!(spread.len(), 3, "clients not spread: {spread:?}");
    for (i, d) in nodes.iter().enumerate() {
        assert!(forwarded(d) > 200, "node {i} carried too little");
    }

    // A keeps its entries alive on both nodes (a connection each per round, rounds
    // alternating nodes) until B's have expired. (Persistence entries are per node: one a
    // client stops reaching expires like any other.)
    let b_done = Instant::now();
    let mut round = 0;
    while b_done.elapsed() < Duration::from_secs(PERSIST + 2) {
        for (k, ip) in a.iter().enumerate() {
            assert_eq!(
                &via(&f, (k + round) % 2, *ip),
                &home_a[ip],
                "A client {ip} moved"
            );
        }
        round += 1;
    }

    // A fourth backend, added on both nodes.
    let added = format!("{}:{PORT}", backend_ip(3));
    for d in &nodes {
        d.clb_ok(&["backend", "add", "web", &added]);
    }

    // A, persisted: nobody moves, on either node.
    let after_a = homes(&f, a, 2);
    let moved_a: Vec<_> = a.iter().filter(|ip| after_a[ip] != home_a[ip]).collect();
    assert!(moved_a.is_empty(), "persisted clients moved: {moved_a:?}");

    // B, no live entry: rescheduled by the new table; still one backend on both nodes.
    let after_b = homes(&f, b, 2);
    let moved_b = b.iter().filter(|ip| after_b[ip] != home_b[ip]).count();
    let to_new = b.iter().filter(|ip| after_b[ip] == "b3").count();
    let frac = moved_b as f64 / b.len() as f64;
    println!(
        "after adding a 4th backend: persisted clients moved 0/100, others moved {moved_b}/{} ({to_new} to the new backend)",
        b.len()
    );
    assert!(
        frac <= 1.0 / 4.0 + 0.05,
        "{moved_b} of {} unpersisted clients moved",
        b.len()
    );
    assert!(to_new > 0, "the new backend got no client");
}
