//! README.md's "Deploying on real NICs", as written there: each topology built from links and
//! addresses alone ([`clb_tests::deploy::Site`]), the README's command blocks read from the
//! file and run line by line on the router, every backend and clb, and traffic from clients
//! behind the router: both families through the two-armed NAT. (The one-armed DSR block is parsed but not yet
//! run here: see the README.)

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use clb_tests::{
    daemon::Daemon,
    deploy::{CLIENT, CLIENT6, Site, readme_blocks},
    servers::{NameServer, ask_once},
    wait_for,
};

const VIP: &str = "10.0.0.100";
const VIP6: &str = "2001:db8::100";

fn vip(port: u16) -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), port)
}

/// Waits for the VIP to answer the client, then checks that every client address keeps one
/// backend (persistence is on in both README blocks) and that the clients spread over all of
/// them.
fn passes_traffic(site: &Site, d: &Daemon, to: SocketAddr, backends: usize) {
    let first = wait_for(Duration::from_secs(15), || {
        ask_once(&site.client, CLIENT, to).ok()
    });
    assert!(first.is_some(), "no answer through {to}:\n{}", d.log());
    let mut seen = HashSet::new();
    for ip in site.clients() {
        let a = ask_once(&site.client, ip, to).expect("a request");
        let b = ask_once(&site.client, ip, to).expect("a second request");
        assert_eq!(a, b, "client {ip} moved between backends");
        seen.insert(a);
    }
    assert_eq!(seen.len(), backends, "clients reached only {seen:?}");
}

#[test]
fn the_readme_two_armed_nat_topology_passes_both_families_as_written() {
    let steps = readme_blocks().expect("README blocks");
    let site = Site::two_armed("dn", 2, 6).expect("topology");
    let _servers: Vec<NameServer> = site
        .backends
        .iter()
        .enumerate()
        .map(|(j, b)| {
            NameServer::tcp(
                b,
                SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 8080),
                &format!("b{j}"),
            )
            .unwrap()
        })
        .collect();
    let d = site.run(&steps[0]).expect("the README's NAT block");
    passes_traffic(&site, &d, vip(80), 2);
    // IPv6: one client address, kept on its backend.
    let to = SocketAddr::new(VIP6.parse().unwrap(), 80);
    let c6: IpAddr = CLIENT6.parse().unwrap();
    let first = wait_for(Duration::from_secs(15), || {
        ask_once(&site.client, c6, to).ok()
    })
    .unwrap_or_else(|| panic!("no IPv6 answer through {to}:\n{}", d.log()));
    for _ in 0..3 {
        assert_eq!(ask_once(&site.client, c6, to).unwrap(), first);
    }
}
