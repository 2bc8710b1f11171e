//! Upgrades in place: an earlier release of clb (built from this repository's history, see
//! `clb_tests::releases`) serves long-lived connections, persisted clients and an HTTP
//! listener's cookies; it is stopped as systemd stops it (SIGTERM) and this build's daemon
//! starts on the same pins, config file and state directory, while a client keeps opening
//! new connections across the switch.
//!
//! `cargo xtask test` upgrades from the last release `RELEASES` names; `cargo xtask test
//! --upgrades` from every one (each release's build is cached under `target/releases/`;
//! `CLB_UPGRADE_FROM=v0.1.0,...` picks some).

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use clb_tests::{
    daemon::{Daemon, one_listener_config},
    http::{HttpServer, get_once},
    netns::{Topology, VIP},
    releases::{Release, clb_of, releases},
    servers::{ask, ask_once, connect, tcp_on_backends},
};

const PORT: u16 = 8080;
const HTTP_PORT: u16 = 8081;
const CLIENTS: usize = 30;

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, 80)
}

fn http_vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, 81)
}

/// A TCP listener with source-IP persistence and an HTTP listener with cookie persistence,
/// each over three backends: settings every release understands.
fn config() -> String {
    one_listener_config("web", vip(), "tcp", 3, PORT, "persist = 600")
        + &one_listener_config("shop", http_vip(), "http", 3, HTTP_PORT, "persist = 600")
}

/// One long-lived connection from each extra client of `topo`, with its backend.
fn open_conns(topo: &Topology) -> Vec<(Ipv4Addr, TcpStream, String)> {
    topo.extra_clients
        .iter()
        .map(|&ip| {
            let mut c = connect(&topo.client, ip, vip()).expect("connect");
            let who = ask(&mut c).expect("first request");
            (ip, c, who)
        })
        .collect()
}

fn upgrade_from(r: &Release) {
    let old = clb_of(r).unwrap_or_else(|e| panic!("{e:#}"));
    let tag = format!("u{}", r.name.replace(['v', '.'], ""));
    let topo = Topology::new(&tag, 3, CLIENTS).expect("topology");
    let _tcp = tcp_on_backends(&topo, PORT);
    let _http: Vec<HttpServer> = (0..3)
        .map(|i| {
            HttpServer::start(
                &topo.backends[i],
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, HTTP_PORT),
                &format!("b{i}"),
            )
            .expect("http server")
        })
        .collect();
    let version = |bin: &std::path::Path| {
        let o = std::process::Command::new(bin)
            .arg("--version")
            .output()
            .expect("clb --version");
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    let (old_version, new_version) = (version(&old), version(&clb_tests::daemon::clb_bin()));
    assert_ne!(old_version, new_version, "{} is this build", r.name);
    let mut d = Daemon::start_bin(&topo, &config(), &old);

    // Long-lived connections, one per client: each also persists its client.
    let mut conns = open_conns(&topo);
    let persisted: HashMap<Ipv4Addr, String> =
        conns.iter().map(|(ip, _, w)| (*ip, w.clone())).collect();
    for (ip, who) in &persisted {
        assert_eq!(
            &ask_once(&topo.client, *ip, vip()).unwrap(),
            who,
            "{} does not persist {ip}",
            r.name
        );
    }
    // An HTTP client's cookie from the old daemon.
    let up = clb_tests::wait_for(Duration::from_secs(10), || {
        get_once(&topo.client, http_vip(), None).ok()
    });
    let (cookie_backend, cookie) = up.expect("the old HTTP listener answers");
    let cookie = cookie.expect("a persistence cookie from the old daemon");

    // The old release's tables this build converts.
    let converted: Vec<(String, &str)> = earlier_pins(&d)
        .into_iter()
        .filter_map(|p| match clb_common::layouts::layout(&p).map(|l| l.fate) {
            Some(clb_common::layouts::Fate::Converted { into }) => Some((p, into)),
            _ => None,
        })
        .collect();

    // The switch, with a client opening new connections all the while (one at a time, each
    // connect + answer; a SYN lost at the switch is the client's own to retransmit).
    let stop = AtomicBool::new(false);
    let (made, failed) = std::thread::scope(|s| {
        let churn = s.spawn(|| {
            let (mut made, mut failed) = (0u32, Vec::new());
            let end = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                match ask_once(&topo.client, topo.extra_clients[0], vip()) {
                    Ok(_) => made += 1,
                    Err(e) => failed.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (made, failed)
        });
        std::thread::sleep(Duration::from_millis(300));
        d.stop();
        d.use_bin(None);
        d.spawn();
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        churn.join().expect("churn thread")
    });
    assert!(made > 10, "only {made} connections across the switch");
    assert!(
        failed.is_empty(),
        "{} of {} new connections failed across the switch: {failed:?}\n{}",
        failed.len(),
        made as usize + failed.len(),
        d.log()
    );

    // Nothing lost: every connection echoes from its backend, every client persists.
    for (i, (ip, c, who)) in conns.iter_mut().enumerate() {
        match ask(c) {
            Ok(now) => assert_eq!(&now, who, "connection {i} from {ip} moved"),
            Err(e) => panic!(
                "connection {i} from {ip} broke in the upgrade: {e}\n{}",
                d.log()
            ),
        }
    }
    for (ip, who) in &persisted {
        assert_eq!(
            &ask_once(&topo.client, *ip, vip()).unwrap(),
            who,
            "persisted client {ip} moved in the upgrade"
        );
    }
    let sessions: Vec<serde_json::Value> = d.clb_json(&["session", "ls"]);
    assert!(
        sessions.len() >= CLIENTS,
        "{} persisted clients after the upgrade",
        sessions.len()
    );
    // The config is kept (both listeners, three backends each), and so is the cookie key.
    let listeners: Vec<serde_json::Value> = d.clb_json(&["listener", "ls"]);
    assert_eq!(listeners.len(), 2, "{listeners:?}");
    let up = clb_tests::wait_for(Duration::from_secs(10), || {
        get_once(&topo.client, http_vip(), Some(&cookie)).ok()
    });
    let (now, _) = up.expect("the new HTTP listener answers");
    assert_eq!(
        now, cookie_backend,
        "the old daemon's cookie lost its backend"
    );
    assert_eq!(version(&d.bin()), new_version);
    // `clb status` says what the start converted.
    let status = d.clb_ok(&["status"]);
    for (from, into) in &converted {
        assert!(
            status.contains(&format!("{from} → {into}: ")),
            "status does not name {from}:\n{status}"
        );
    }
    assert!(
        earlier_pins(&d).is_empty(),
        "earlier layouts left: {:?}",
        earlier_pins(&d)
    );
    for l in d.log().lines().filter(|l| l.contains("migrated ")) {
        eprintln!("{}: {l}", r.name);
    }
}

#[test]
fn an_upgrade_from_the_last_release_loses_no_connection_no_client_and_no_cookie() {
    let all = releases();
    upgrade_from(all.last().expect("a release"));
}

#[test]
fn a_downgrade_to_the_last_release_is_refused_by_name_and_changes_nothing() {
    let r = releases().last().expect("a release").clone();
    let old = clb_of(&r).unwrap_or_else(|e| panic!("{e:#}"));
    let topo = Topology::new("udg", 3, 5).expect("topology");
    let _tcp = tcp_on_backends(&topo, PORT);
    let mut d = Daemon::start(&topo, &config());
    let mut conns = open_conns(&topo);
    d.stop();
    let before = pins(&d);
    d.use_bin(Some(&old));
    let out = d.run_refused(Duration::from_secs(20));
    assert!(!out.ok, "{} started over a newer clb's pins", r.name);
    // The old release names the tables it does not know: this build's newer layouts.
    let newer: Vec<&str> = clb_common::layouts::LAYOUTS
        .iter()
        .filter(|l| l.since == clb_common::layouts::THIS_RELEASE)
        .map(|l| l.pin)
        .collect();
    assert!(!newer.is_empty());
    for n in &newer {
        assert!(out.stderr.contains(n), "{n} not named: {}", out.stderr);
    }
    assert_eq!(pins(&d), before, "the refused downgrade changed the pins");
    for (i, (_, c, who)) in conns.iter_mut().enumerate() {
        assert_eq!(
            &ask(c).expect("alive after the refusal"),
            who,
            "connection {i}"
        );
    }
    d.use_bin(None);
    d.spawn();
    for (i, (_, c, who)) in conns.iter_mut().enumerate() {
        assert_eq!(
            &ask(c).expect("alive after the restart"),
            who,
            "connection {i}"
        );
    }
}

/// `CLOCK_MONOTONIC` now, ns: the datapath's clock.
fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The map pins in `d`'s pin directory, sorted.
fn pins(d: &Daemon) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d.bpffs.join("maps"))
        .expect("pins")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Pins of a layout other than this build's left in `d`'s pin directory.
fn earlier_pins(d: &Daemon) -> Vec<String> {
    pins(d)
        .into_iter()
        .filter(|n| !clb_common::ALL_MAPS.contains(&n.as_str()))
        .collect()
}

#[test]
#[ignore = "builds v0.1.0 (minutes): cargo xtask test --upgrades"]
fn a_migration_killed_before_the_switch_leaves_the_old_datapath_serving_and_a_restart_finishes_it()
{
    use clb::datapath::batch;
    use clb_common::{ConnKey, layouts::v0_1};
    use std::os::fd::AsFd as _;
    const FILLER: usize = 500_000;
    let r = clb_tests::releases::release("v0.1.0");
    let old = clb_of(&r).unwrap_or_else(|e| panic!("{e:#}"));
    let topo = Topology::new("umk", 3, 10).expect("topology");
    let _tcp = tcp_on_backends(&topo, PORT);
    let mut d = Daemon::start_bin(&topo, &config(), &old);
    let mut conns = open_conns(&topo);
    d.stop();
    // Half a million more flows in v0.1.0's connection table (of 2^20), so the conversion
    // takes a while: the listener and backend of a real one, fresh timestamps.
    let pin = d.bpffs.join("maps/CLB_CONN_V1");
    let map = aya::maps::MapData::from_pin(&pin).expect("v0.1.0's connection table");
    let mut real = None;
    batch::for_each_batch_raw(map.fd().as_fd(), 12, 16, 1024, |k, v| {
        real = Some((
            bytemuck::pod_read_unaligned::<ConnKey>(&k[..12]),
            bytemuck::pod_read_unaligned::<v0_1::ConnValue>(&v[..16]),
        ));
        false
    })
    .expect("reading v0.1.0's connections");
    let (rk, rv) = real.expect("a real connection entry");
    let now = monotonic_ns();
    let (mut keys, mut vals) = (Vec::new(), Vec::new());
    for i in 0..FILLER as u32 {
        let k = ConnKey {
            client: (0xc612_0000u32 + i).to_be(),
            client_port: 1000u16.to_be(),
            ..rk
        };
        keys.extend_from_slice(bytemuck::bytes_of(&k));
        vals.extend_from_slice(bytemuck::bytes_of(&v0_1::ConnValue {
            last_seen_ns: now,
            ..rv
        }));
    }
    let n = batch::update_raw(map.fd().as_fd(), &keys, &vals, 12, 16).expect("filling");
    assert_eq!(n, FILLER);
    drop(map);

    // This build starts and is killed once its new tables exist, before it attaches.
    d.use_bin(None);
    let new_conn = d.bpffs.join("maps").join(clb_common::CONN_MAP);
    let killed = d.spawn_and_kill_when(Duration::from_secs(60), |_| new_conn.exists());
    assert!(
        killed,
        "the daemon was not killed mid-migration:\n{}",
        d.log()
    );
    assert!(!d.log().contains("migrated CLB_CONN_V1"), "{}", d.log());
    assert!(pin.exists(), "the old table went before the switch");
    // The old datapath still serves every connection.
    for (i, (ip, c, who)) in conns.iter_mut().enumerate() {
        assert_eq!(
            &ask(c).expect("alive after the kill"),
            who,
            "connection {i} from {ip}"
        );
    }
    // A restart finishes the migration.
    d.spawn();
    for (i, (ip, c, who)) in conns.iter_mut().enumerate() {
        assert_eq!(
            &ask(c).expect("alive after the upgrade"),
            who,
            "connection {i} from {ip}"
        );
    }
    for (ip, _, who) in &conns {
        assert_eq!(
            &ask_once(&topo.client, *ip, vip()).unwrap(),
            who,
            "{ip} moved"
        );
    }
    let log = d.log();
    let line = log
        .lines()
        .rfind(|l| l.contains("migrated CLB_CONN_V1"))
        .unwrap_or_else(|| panic!("no migration line:\n{log}"));
    assert!(line.contains("CLB_CONN_V2"), "{line}");
    for l in log.lines().filter(|l| l.contains("loader")) {
        eprintln!("{l}");
    }
    assert!(
        log.contains("resumed=true"),
        "the restart did not resume:\n{log}"
    );
    assert!(earlier_pins(&d).is_empty(), "{:?}", earlier_pins(&d));
}

#[test]
#[ignore = "builds every earlier release (minutes each): cargo xtask test --upgrades"]
fn an_upgrade_from_every_earlier_release_loses_nothing() {
    let all = releases();
    // CLB_UPGRADE_FROM=v0.1.0,v0.2.0 picks some. Newest first: the nearest upgrade's failure
    // is the first one reported.
    let only = std::env::var("CLB_UPGRADE_FROM").unwrap_or_default();
    for r in all[..all.len() - 1]
        .iter()
        .rev()
        .filter(|r| only.is_empty() || only.split(',').any(|n| n == r.name))
    {
        eprintln!("upgrade from {}", r.name);
        upgrade_from(r);
    }
}
