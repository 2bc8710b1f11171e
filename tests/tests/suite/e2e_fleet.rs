//! A fleet: three clb nodes, each its own daemon, pins and BIRD, running from the same config
//! file, announce the VIP over BGP to a router (BIRD, BFD, ECMP with an L4 hash); backends on
//! one L2 segment answer clients directly (DSR); the listener is Maglev with persistence.
//! Clients stay on one backend whichever node their connections cross; a node that dies
//! without a word is dropped by the router within the BFD bound and breaks no connection and
//! moves no persisted client; so does its return; a node in maintenance gets no new flows and
//! its established ones go on through the others.

use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream},
    time::{Duration, Instant},
};

use clb_tests::{
    daemon::Daemon,
    fleet::{Fleet, RouterBird, backend_ip, backend_ip6, node_ip, node_ip6},
    netns::{VIP, VIP6},
    servers::{NameServer, ask, ask_once, connect},
};

const PORT: u16 = 80;

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, PORT)
}

fn config() -> String {
    let mut l = format!(
        "[[listener]]\nname = \"web\"\nvip = \"{}\"\nproto = \"tcp\"\nsched = \"maglev\"\nforward = \"dsr\"\npersist = 600\n[listener.health_check]\ninterval = 2\ntimeout = 2\nhealthy_threshold = 2\nunhealthy_threshold = 2\n",
        vip()
    );
    for j in 0..3 {
        l += &format!(
            "[[listener.backend]]\naddr = \"{}:{PORT}\"\n",
            backend_ip(j)
        );
    }
    Fleet::node_config(&l)
}

/// Waits until the router's next hops for the VIP are exactly `nodes`; returns how long it
/// took (polling every 10 ms).
fn await_nexthops(f: &Fleet, nodes: &[usize], within: Duration) -> Option<Duration> {
    let want: Vec<Ipv4Addr> = {
        let mut v: Vec<Ipv4Addr> = nodes.iter().map(|i| node_ip(*i)).collect();
        v.sort();
        v
    };
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if f.vip_nexthops() == want {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

struct Long {
    conn: TcpStream,
    backend: String,
}

/// Every long-lived connection answers from its backend; returns the broken ones.
fn check_long(conns: &mut [Long]) -> Vec<String> {
    conns
        .iter_mut()
        .enumerate()
        .filter_map(|(i, l)| match ask(&mut l.conn) {
            Ok(b) if b == l.backend => None,
            other => Some(format!("#{i} ({}): {other:?}", l.backend)),
        })
        .collect()
}

/// Persisted clients whose new connection reaches another backend than before.
fn moved(f: &Fleet, homes: &HashMap<Ipv4Addr, String>) -> Vec<String> {
    homes
        .iter()
        .filter_map(|(ip, b)| {
            let now = ask_once(&f.client, *ip, vip());
            (now.as_ref().ok() != Some(b)).then(|| format!("{ip}: {b} → {now:?}"))
        })
        .collect()
}

fn new_conns(d: &Daemon) -> u64 {
    let st: serde_json::Value = d.clb_json(&["stats"]);
    st["listeners"][0]["new_conns"].as_u64().unwrap()
}

#[test]
fn a_fleet_keeps_every_client_on_its_backend_through_node_death_return_and_maintenance() {
    let f = Fleet::new("fl", 3, 3, 200).unwrap();
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
    let router = RouterBird::start(&f).unwrap();
    let cfg = config();
    let mut nodes: Vec<Daemon> = f
        .nodes
        .iter()
        .map(|n| Daemon::start_on(n, "eth0", &cfg, &[]))
        .collect();
    let up = await_nexthops(&f, &[0, 1, 2], Duration::from_secs(30));
    assert!(
        up.is_some(),
        "the router never had all three nodes: {}\n{}\n{}",
        f.vip_route().unwrap_or_default(),
        router.birdc(&["show", "protocols"]),
        router.log()
    );
    let st: serde_json::Value = nodes[0].clb_json(&["status"]);
    let bgp = &st["bgp"];
    assert_eq!(bgp["announced"][0], VIP.to_string(), "{bgp}");
    assert!(
        bgp["peers"][0]["state"]
            .as_str()
            .unwrap()
            .contains("Established"),
        "{bgp}"
    );
    assert_eq!(bgp["router_id"], node_ip(0).to_string(), "{bgp}");
    // One configuration everywhere: the nodes report the same digest of it.
    let digests: HashSet<String> = nodes
        .iter()
        .map(|d| {
            let st: serde_json::Value = d.clb_json(&["status"]);
            st["config_sha256"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(digests.len(), 1, "{digests:?}");

    // 100 clients × 4 connections, spread over the nodes by the router's L4 hash: every
    // client on one backend.
    let (first, second) = f.extra_clients.split_at(100);
    let mut homes: HashMap<Ipv4Addr, String> = HashMap::new();
    for ip in first {
        let b = ask_once(&f.client, *ip, vip()).unwrap();
        for _ in 0..3 {
            assert_eq!(
                ask_once(&f.client, *ip, vip()).unwrap(),
                b,
                "client {ip} moved"
            );
        }
        homes.insert(*ip, b);
    }
    let mut via: HashMap<String, HashSet<usize>> = HashMap::new();
    for (i, d) in nodes.iter().enumerate() {
        let conns: Vec<serde_json::Value> = d.clb_json(&["conn", "ls"]);
        assert!(!conns.is_empty(), "node {i} carried nothing");
        for c in conns {
            let client = c["client"]
                .as_str()
                .unwrap()
                .split(':')
                .next()
                .unwrap()
                .to_owned();
            via.entry(client).or_default().insert(i);
        }
    }
    let spread = via.values().filter(|n| n.len() > 1).count();
    println!("{spread} of 100 clients had connections through more than one node");
    assert!(
        spread >= 50,
        "connections were not spread over the nodes: {spread}"
    );
    let backends: HashSet<&String> = homes.values().collect();
    assert_eq!(backends.len(), 3, "{backends:?}");

    // 200 long-lived connections.
    let mut long: Vec<Long> = second
        .iter()
        .flat_map(|ip| [*ip, *ip])
        .map(|ip| {
            let mut conn = connect(&f.client, ip, vip()).unwrap();
            let backend = ask(&mut conn).unwrap();
            Long { conn, backend }
        })
        .collect();
    assert!(check_long(&mut long).is_empty());

    // Node 1 dies without a word: its link goes silent, then its daemon (and with it its
    // BIRD) is killed. The pinned datapath stays, unreachable.
    let t0 = Instant::now();
    f.nodes[1].ip(&["link", "set", "eth0", "down"]).unwrap();
    nodes[1].kill9();
    let gone = await_nexthops(&f, &[0, 2], Duration::from_secs(15));
    let withdrawal = gone.map(|_| t0.elapsed());
    println!("silent node withdrawn by the router after {withdrawal:?} (BFD 100 ms × 3)");
    let withdrawal = withdrawal.expect("the router kept the dead node");
    assert!(
        withdrawal < Duration::from_millis(1500),
        "withdrawal took {withdrawal:?}"
    );
    let broken = check_long(&mut long);
    assert!(
        broken.is_empty(),
        "connections broken by the death: {broken:?}"
    );
    let m = moved(&f, &homes);
    assert!(m.is_empty(), "persisted clients moved by the death: {m:?}");

    // The node comes back.
    f.nodes[1].ip(&["link", "set", "eth0", "up"]).unwrap();
    let t1 = Instant::now();
    nodes[1].spawn();
    let back = await_nexthops(&f, &[0, 1, 2], Duration::from_secs(30));
    println!(
        "returning node announced again after {:?}",
        back.map(|_| t1.elapsed())
    );
    assert!(
        back.is_some(),
        "the node never came back: {}",
        f.vip_route().unwrap()
    );
    let broken = check_long(&mut long);
    assert!(
        broken.is_empty(),
        "connections broken by the return: {broken:?}"
    );
    let m = moved(&f, &homes);
    assert!(m.is_empty(), "persisted clients moved by the return: {m:?}");

    // Maintenance on node 0: withdrawn by command; no new flows there, established ones go on.
    let t2 = Instant::now();
    nodes[0].clb_ok(&["bgp", "withdraw"]);
    let out = await_nexthops(&f, &[1, 2], Duration::from_secs(10));
    println!(
        "maintenance withdrawal seen by the router after {:?}",
        out.map(|_| t2.elapsed())
    );
    assert!(out.is_some(), "{}", f.vip_route().unwrap());
    let before = new_conns(&nodes[0]);
    for ip in first.iter().take(60) {
        assert_eq!(&ask_once(&f.client, *ip, vip()).unwrap(), &homes[ip]);
    }
    assert_eq!(
        new_conns(&nodes[0]),
        before,
        "new flows reached the node in maintenance"
    );
    let broken = check_long(&mut long);
    assert!(
        broken.is_empty(),
        "connections broken by maintenance: {broken:?}"
    );
    nodes[0].clb_ok(&["bgp", "announce"]);
    assert!(await_nexthops(&f, &[0, 1, 2], Duration::from_secs(10)).is_some());
    let broken = check_long(&mut long);
    assert!(
        broken.is_empty(),
        "connections broken by the announcement: {broken:?}"
    );
    drop(nodes);
    drop(router);
}

/// Node `i`'s addresses on the segment: its global IPv6 and its link-local one (the router's
/// kernel may hold either as the next hop BGP gave it).
fn node_addrs6(f: &Fleet, i: usize) -> Vec<Ipv6Addr> {
    let ll = f.nodes[i]
        .ip(&["-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"])
        .unwrap_or_default();
    let mut v = vec![node_ip6(i)];
    v.extend(
        ll.split("inet6 ")
            .skip(1)
            .filter_map(|t| t.split('/').next()?.parse::<Ipv6Addr>().ok()),
    );
    v
}

/// Waits until the router's IPv6 VIP route goes through exactly `nodes` (by either of each
/// node's addresses).
fn await_nexthops6(f: &Fleet, nodes: &[usize], within: Duration) -> bool {
    let addrs: Vec<Vec<Ipv6Addr>> = (0..f.nodes.len()).map(|i| node_addrs6(f, i)).collect();
    let t0 = Instant::now();
    while t0.elapsed() < within {
        let hops = f.vip6_nexthops();
        let on: Vec<usize> = (0..f.nodes.len())
            .filter(|i| hops.iter().any(|h| addrs[*i].contains(h)))
            .collect();
        if on == nodes && hops.len() == nodes.len() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// An IPv6 VIP is announced over the nodes' IPv6 sessions (beside the IPv4 VIP on the IPv4
/// ones), the router's ECMP route carries clients to its DSR backends, and a withdrawal takes
/// the node out of the route.
#[test]
fn an_ipv6_vip_is_announced_and_withdrawn_over_bgp() {
    let f = Fleet::new("f6", 2, 2, 0).unwrap();
    let _servers: Vec<NameServer> = f
        .backends
        .iter()
        .enumerate()
        .map(|(j, ns)| {
            NameServer::tcp(
                ns,
                SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, PORT, 0, 0),
                &format!("b{j}"),
            )
            .unwrap()
        })
        .collect();
    let router = RouterBird::start_dual(&f).unwrap();
    let mut l = format!(
        "[[listener]]\nname = \"web\"\nvip = \"{}\"\nproto = \"tcp\"\nsched = \"maglev\"\nforward = \"dsr\"\n[[listener.backend]]\naddr = \"{}:{PORT}\"\n",
        vip(),
        backend_ip(0)
    );
    l += &format!(
        "[[listener]]\nname = \"web6\"\nvip = \"[{VIP6}]:{PORT}\"\nproto = \"tcp\"\nsched = \"maglev\"\nforward = \"dsr\"\n"
    );
    for j in 0..2 {
        l += &format!(
            "[[listener.backend]]\naddr = \"[{}]:{PORT}\"\n",
            backend_ip6(j)
        );
    }
    let cfg = Fleet::node_config_dual(&l);
    let nodes: Vec<Daemon> = f
        .nodes
        .iter()
        .map(|n| Daemon::start_on(n, "eth0", &cfg, &[]))
        .collect();
    let up = await_nexthops6(&f, &[0, 1], Duration::from_secs(30));
    assert!(
        up,
        "the router never had both nodes for the IPv6 VIP: {:?}\n{}\n{}",
        f.vip6_nexthops(),
        router.birdc(&["show", "protocols"]),
        router.log()
    );
    assert!(
        await_nexthops(&f, &[0, 1], Duration::from_secs(10)).is_some(),
        "{}",
        f.vip_route().unwrap_or_default()
    );
    let st: serde_json::Value = nodes[0].clb_json(&["status"]);
    let bgp = &st["bgp"];
    let announced: HashSet<String> = bgp["announced"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        announced,
        HashSet::from([VIP.to_string(), VIP6.to_string()]),
        "{bgp}"
    );
    for p in bgp["peers"].as_array().unwrap() {
        assert!(
            p["state"].as_str().unwrap().contains("Established"),
            "{bgp}"
        );
    }
    // Clients reach the IPv6 VIP through the announced route.
    let dst = SocketAddr::new(VIP6.into(), PORT);
    let src: std::net::IpAddr = "fd00:1::2".parse().unwrap();
    let names: HashSet<String> = (0..8)
        .map(|_| {
            ask_once(&f.client, src, dst).unwrap_or_else(|e| {
                panic!(
                    "a client through the IPv6 VIP: {e}\nroute: {:?}\nstats 0: {}\nstats 1: {}\nneigh: {}",
                    f.vip6_nexthops(),
                    nodes[0].clb(&["stats"]).stdout,
                    nodes[1].clb(&["stats"]).stdout,
                    f.nodes[0].ip(&["-6", "neigh"]).unwrap_or_default()
                )
            })
        })
        .collect();
    assert!(names.iter().all(|n| n == "b0" || n == "b1"), "{names:?}");

    // Withdrawn on node 0: the router's IPv6 route goes through node 1 alone; announced again.
    nodes[0].clb_ok(&["bgp", "withdraw"]);
    assert!(
        await_nexthops6(&f, &[1], Duration::from_secs(10)),
        "{:?}",
        f.vip6_nexthops()
    );
    assert!(ask_once(&f.client, src, dst).is_ok());
    nodes[0].clb_ok(&["bgp", "announce"]);
    assert!(
        await_nexthops6(&f, &[0, 1], Duration::from_secs(10)),
        "{:?}",
        f.vip6_nexthops()
    );
    // A node that stops withdraws both families first.
    let mut nodes = nodes;
    nodes.remove(1);
    assert!(
        await_nexthops6(&f, &[0], Duration::from_secs(10)),
        "{:?}",
        f.vip6_nexthops()
    );
    drop(nodes);
    drop(router);
}
