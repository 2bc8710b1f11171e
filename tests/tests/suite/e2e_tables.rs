//! Table sizes belong to the operator: set under `[tables]`, shown by `clb status`, changed
//! across a restart with the live entries copied, and refused with a clear message — changing
//! nothing — when the kernel will not give the memory.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    time::Duration,
};

use clb_tests::{
    cgroup::MemCgroup,
    daemon::Daemon,
    netns::{Topology, VIP, backend_ip},
    servers::{NameServer, ask, ask_once, connect},
};

const PORT: u16 = 8080;

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, 80)
}

fn config(conns: u32, sessions: u32, half_open: u32) -> String {
    let mut s = format!(
        "[tables]\nconnections = {conns}\nsessions = {sessions}\nhalf_open = {half_open}\n\n[[listener]]\nname = \"web\"\nvip = \"{}\"\nproto = \"tcp\"\npersist = 600\n",
        vip()
    );
    for i in 0..2 {
        s += &format!(
            "[[listener.backend]]\naddr = \"{}:{PORT}\"\n",
            backend_ip(i)
        );
    }
    s
}

fn servers(topo: &Topology) -> Vec<NameServer> {
    topo.backends
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            NameServer::tcp(
                ns,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
                &format!("b{i}"),
            )
            .unwrap()
        })
        .collect()
}

/// (capacity, live) of each table in `clb status`, by name.
fn tables(d: &Daemon) -> HashMap<String, (u64, u64)> {
    let st: serde_json::Value = d.clb_json(&["status"]);
    st["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_owned(),
                (t["capacity"].as_u64().unwrap(), t["live"].as_u64().unwrap()),
            )
        })
        .collect()
}

struct Clients {
    idle: Vec<(TcpStream, String)>,
    persisted: Vec<(Ipv4Addr, String)>,
}

fn clients(topo: &Topology) -> Clients {
    let c = &topo.extra_clients;
    Clients {
        idle: c[..10]
            .iter()
            .map(|ip| {
                let mut s = connect(&topo.client, *ip, vip()).unwrap();
                let b = ask(&mut s).unwrap();
                (s, b)
            })
            .collect(),
        persisted: c[10..20]
            .iter()
            .map(|ip| (*ip, ask_once(&topo.client, *ip, vip()).unwrap()))
            .collect(),
    }
}

fn all_still_there(topo: &Topology, c: &mut Clients, when: &str) {
    for (s, b) in &mut c.idle {
        assert_eq!(
            &ask(s).unwrap(),
            b,
            "{when}: an idle connection moved or broke"
        );
    }
    for (ip, b) in &c.persisted {
        assert_eq!(
            &ask_once(&topo.client, *ip, vip()).unwrap(),
            b,
            "{when}: persisted client {ip} moved"
        );
    }
}

#[test]
fn table_sizes_are_the_operators_and_a_resize_keeps_live_entries() {
    let topo = Topology::new("tr", 2, 20).unwrap();
    let _s = servers(&topo);
    let mut d = Daemon::start(&topo, &config(65_536, 65_536, 4096));
    let t = tables(&d);
    assert_eq!(t["connections"].0, 65_536, "{t:?}");
    assert_eq!(t["sessions"].0, 65_536, "{t:?}");
    assert_eq!(t["half_open"].0, 4096, "{t:?}");
    let mut c = clients(&topo);

    // Stopped, the operator doubles the connection table and halves the persistence table.
    d.stop();
    std::fs::write(&d.config, config(131_072, 32_768, 8192)).unwrap();
    d.spawn();
    let log = d.log();
    assert!(
        log.contains("resizing a pinned table") && log.contains("CLB_CONN_V2"),
        "the resize is not reported:\n{log}"
    );
    let t = tables(&d);
    assert_eq!(t["connections"].0, 131_072, "{t:?}");
    assert_eq!(t["sessions"].0, 32_768, "{t:?}");
    assert_eq!(t["half_open"].0, 8192, "{t:?}");
    // The live entries were copied: established flows and persisted clients stay put.
    all_still_there(&topo, &mut c, "after the resize");
    let conns: Vec<serde_json::Value> = d.clb_json(&["conn", "ls"]);
    assert!(conns.len() >= 10, "connections after the resize: {conns:?}");
    let sessions: Vec<serde_json::Value> = d.clb_json(&["session", "ls"]);
    assert!(
        sessions.len() >= 20,
        "persisted clients after the resize: {sessions:?}"
    );
}

#[test]
fn a_table_the_kernel_refuses_is_reported_and_changes_nothing() {
    let topo = Topology::new("tm", 2, 20).unwrap();
    let _s = servers(&topo);
    let mut d = Daemon::start(&topo, &config(65_536, 65_536, 4096));
    let mut c = clients(&topo);
    d.stop();
    let before = std::fs::read_dir(d.bpffs.join("maps")).unwrap().count();

    // 4 M connection entries (~400 MB) in a cgroup limited to 256 MB: the kernel refuses.
    let cg = MemCgroup::new(256 << 20).unwrap();
    let big = d.dir().join("big.toml");
    std::fs::write(&big, config(1 << 22, 65_536, 4096)).unwrap();
    let api = d.api.clone();
    let refused = d.run_other_wrapped(
        &cg.wrap(),
        &api,
        &[
            "--config",
            big.to_str().unwrap(),
            "--iface",
            d.ifaces(),
            "--bpffs",
            d.bpffs.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert!(!refused.ok, "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("the kernel refused the memory for table CLB_CONN_V2")
            && refused.stderr.contains("[tables] connections")
            && refused.stderr.contains("Nothing was changed"),
        "unclear refusal: {}",
        refused.stderr
    );
    // Nothing changed: the old tables are pinned as they were, traffic flows on them.
    assert_eq!(
        std::fs::read_dir(d.bpffs.join("maps")).unwrap().count(),
        before
    );
    all_still_there(&topo, &mut c, "after the refused resize");
    d.spawn();
    assert_eq!(tables(&d)["connections"].0, 65_536);
    all_still_there(&topo, &mut c, "after restarting with the old sizes");

    // On fresh pins, the refusal leaves no pin and no directory behind.
    let fresh = std::path::PathBuf::from("/sys/fs/bpf").join(clb_tests::netns::unique_name("tm"));
    let other_api = d.dir().join("other.sock");
    let o = d.run_other_wrapped(
        &cg.wrap(),
        &other_api,
        &[
            "--config",
            big.to_str().unwrap(),
            "--iface",
            "lo",
            "--bpffs",
            fresh.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert!(
        !o.ok && o.stderr.contains("the kernel refused the memory"),
        "{o:?}"
    );
    assert!(!fresh.exists(), "{} left behind", fresh.display());
    all_still_there(&topo, &mut c, "after a refused second datapath");
}
