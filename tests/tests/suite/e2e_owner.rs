//! End-to-end tests of the control plane's ownership of its state, each a defect found by
//! restarting, reloading and probing the daemon as an operator would: restarts after the
//! config lost entries, reloads racing API writers, failed config writes, a second daemon on
//! the same datapath, teardown under a running daemon, a mistyped config path, files and
//! pipes the CLI touches.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    os::unix::fs::PermissionsExt as _,
    process::Command,
    time::Duration,
};

use clb_tests::{
    daemon::{Daemon, clb_bin},
    netns::{CLIENT_IP, Topology, VIP, backend_ip, sh},
    servers::{NameServer, ask, ask_once, connect},
};

const PORT: u16 = 8080;

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, 80)
}

fn be(i: usize) -> String {
    format!("{}:{PORT}", backend_ip(i))
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

/// `web` (TCP, backends 0..n) and `dns` (UDP, backend 0).
fn two_listeners(n: usize) -> String {
    let mut s =
        String::from("[[listener]]\nname = \"web\"\nvip = \"10.0.0.100:80\"\nproto = \"tcp\"\n");
    for i in 0..n {
        s += &format!("[[listener.backend]]\naddr = \"{}\"\n", be(i));
    }
    s += &format!(
        "[[listener]]\nname = \"dns\"\nvip = \"10.0.0.100:53\"\nproto = \"udp\"\n[[listener.backend]]\naddr = \"{}:53\"\n",
        backend_ip(0)
    );
    s
}

#[test]
fn restart_after_the_config_lost_a_backend_and_a_listener_while_stopped() {
    let topo = Topology::new("rs", 3, 0).unwrap();
    let _s = servers(&topo);
    let mut d = Daemon::start(&topo, &two_listeners(3));
    let mut kept: Vec<(TcpStream, String)> = Vec::new();
    for _ in 0..6 {
        let mut c = connect(&topo.client, CLIENT_IP, vip()).unwrap();
        let who = ask(&mut c).unwrap();
        kept.push((c, who));
    }
    d.stop();
    // While it is stopped, the operator removes backend 2 and listener dns.
    std::fs::write(
        &d.config,
        two_listeners(2)
            .split("[[listener]]\nname = \"dns\"")
            .next()
            .unwrap(),
    )
    .unwrap();
    d.spawn();
    let ls: Vec<serde_json::Value> = d.clb_json(&["listener", "ls"]);
    assert_eq!(ls.len(), 1, "{ls:?}");
    assert_eq!(ls[0]["backends"].as_array().unwrap().len(), 2);
    // Connections on the kept backends go on; the removed backend's were purged.
    for (c, who) in &mut kept {
        let r = ask(c);
        if who == "b2" {
            assert!(r.is_err(), "a removed backend's connection is cut");
        } else {
            assert_eq!(&r.unwrap(), who, "connection on a kept backend moved");
        }
    }
    let names: HashSet<String> = (0..6)
        .map(|_| ask_once(&topo.client, CLIENT_IP, vip()).unwrap())
        .collect();
    assert_eq!(names, HashSet::from(["b0".into(), "b1".into()]));
}

#[test]
fn reload_racing_twenty_concurrent_writers_loses_nothing() {
    let topo = Topology::new("rr", 1, 0).unwrap();
    let d = Daemon::start(&topo, &two_listeners(1));
    // 10 writers add 30 backends each while 10 others reload, all at once.
    std::thread::scope(|s| {
        for w in 0..10u8 {
            let d = &d;
            s.spawn(move || {
                for i in 0..30u8 {
                    let addr = format!("10.3.{w}.{}:80", i + 1);
                    let o = d.clb(&["backend", "add", "web", &addr]);
                    assert!(o.ok, "adding {addr}: {}", o.stderr);
                }
            });
        }
        for _ in 0..10 {
            let d = &d;
            s.spawn(move || {
                for _ in 0..15 {
                    let o = d.clb(&["reload"]);
                    assert!(o.ok, "reload: {}", o.stderr);
                }
            });
        }
    });
    let ls: Vec<serde_json::Value> = d.clb_json(&["listener", "ls"]);
    let web = ls.iter().find(|l| l["name"] == "web").unwrap();
    assert_eq!(
        web["backends"].as_array().unwrap().len(),
        301,
        "running state lost adds"
    );
    let text = d.config_text();
    assert_eq!(
        text.matches("[[listener.backend]]").count(),
        302,
        "the file lost adds"
    );
}

#[test]
fn a_failed_config_write_leaves_maps_memory_and_file_as_before() {
    let topo = Topology::new("fw", 4, 0).unwrap();
    let _s = servers(&topo);
    let d = Daemon::start(&topo, &two_listeners(3));
    let before_ls: serde_json::Value = d.clb_json(&["listener", "ls"]);
    let before_text = d.config_text();
    // A bind mount over the config file: renaming over it fails (EBUSY).
    let other = d.dir().join("mounted.toml");
    std::fs::write(&other, &before_text).unwrap();
    sh(&[
        "mount",
        "--bind",
        other.to_str().unwrap(),
        d.config.to_str().unwrap(),
    ])
    .unwrap();
    let o = d.clb(&["backend", "add", "web", &be(3)]);
    let o2 = d.clb(&["listener", "set", "web", "--persist", "600"]);
    sh(&["umount", d.config.to_str().unwrap()]).unwrap();
    assert!(!o.ok && o.stderr.contains("config file"), "{o:?}");
    assert!(!o2.ok, "{o2:?}");
    let after_ls: serde_json::Value = d.clb_json(&["listener", "ls"]);
    assert_eq!(before_ls, after_ls, "memory changed");
    assert_eq!(before_text, d.config_text(), "file changed");
    let leftovers: Vec<String> = std::fs::read_dir(d.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    // The maps: backend 3 never gets a connection, persistence stays off (round robin).
    let names: Vec<String> = (0..12)
        .map(|_| ask_once(&topo.client, CLIENT_IP, vip()).unwrap())
        .collect();
    assert!(!names.contains(&"b3".to_string()), "{names:?}");
    assert_eq!(
        names.iter().collect::<HashSet<_>>().len(),
        3,
        "still round robin over 3: {names:?}"
    );
}

#[test]
fn a_second_daemon_on_the_same_pins_socket_or_interfaces_is_refused() {
    let topo = Topology::new("sd", 2, 0).unwrap();
    let _s = servers(&topo);
    let d = Daemon::start(&topo, &two_listeners(2));
    let other_dir = d.dir().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other_cfg = other_dir.join("clb.toml");
    std::fs::write(&other_cfg, "").unwrap();
    let cfg = other_cfg.to_str().unwrap();
    let other_pins = format!(
        "/sys/fs/bpf/{}-other",
        d.bpffs.file_name().unwrap().to_string_lossy()
    );
    let other_api = other_dir.join("api.sock");
    let pins = d.bpffs.to_str().unwrap().to_owned();
    let t = Duration::from_secs(15);
    // Same pins, another socket, another interface set.
    let o = d.run_other(
        &other_api,
        &["--config", cfg, "--iface", "lo", "--bpffs", &pins],
        t,
    );
    assert!(
        !o.ok && o.stderr.contains("in use by another clb daemon"),
        "{o:?}"
    );
    // Same socket, other pins.
    let o = d.run_other(
        &d.api,
        &["--config", cfg, "--iface", "lo", "--bpffs", &other_pins],
        t,
    );
    assert!(!o.ok && o.stderr.contains("API socket"), "{o:?}");
    // Same interfaces, other pins and socket.
    let o = d.run_other(
        &other_api,
        &[
            "--config",
            cfg,
            "--iface",
            d.ifaces(),
            "--bpffs",
            &other_pins,
        ],
        t,
    );
    assert!(!o.ok && o.stderr.contains("interface"), "{o:?}");
    assert!(
        !std::path::Path::new(&other_pins).join("maps").exists(),
        "the refused daemon left pins"
    );
    // The first daemon is untouched: its socket answers, its config is as it was, traffic flows.
    assert!(d.api.exists());
    let st: serde_json::Value = d.clb_json(&["status"]);
    assert_eq!(st["datapath"], "attached");
    let ls: Vec<serde_json::Value> = d.clb_json(&["listener", "ls"]);
    assert_eq!(ls.len(), 2);
    ask_once(&topo.client, CLIENT_IP, vip()).unwrap();
    std::fs::remove_dir(&other_pins).ok();
}

#[test]
fn teardown_under_a_running_daemon_is_refused_unless_forced_and_then_reported() {
    let topo = Topology::new("td", 2, 0).unwrap();
    let _s = servers(&topo);
    let d = Daemon::start(&topo, &two_listeners(2));
    let pins = d.bpffs.to_str().unwrap().to_owned();
    let run = |args: &[&str]| -> clb_tests::daemon::CliOut {
        Command::new(clb_bin()).args(args).output().unwrap().into()
    };
    let o = run(&["teardown", "--bpffs", &pins]);
    assert!(
        !o.ok && o.stderr.contains("a clb daemon is running"),
        "{o:?}"
    );
    assert!(
        d.bpffs.join("maps").exists(),
        "refused teardown removed pins"
    );
    ask_once(&topo.client, CLIENT_IP, vip()).unwrap();
    let o = run(&["teardown", "--force", "--bpffs", &pins]);
    assert!(o.ok, "{o:?}");
    let detached = clb_tests::wait_for(Duration::from_secs(5), || {
        let st: serde_json::Value = d.clb_json(&["status"]);
        st["datapath"]
            .as_str()?
            .starts_with("detached")
            .then_some(())
    });
    assert!(
        detached.is_some(),
        "status does not say the datapath is detached"
    );
    let o = d.clb(&["listener", "set", "web", "--persist", "60"]);
    assert!(
        !o.ok && o.stderr.contains("detached") && o.stderr.contains("503"),
        "{o:?}"
    );
}

#[test]
fn a_missing_config_path_is_refused_and_the_pinned_datapath_keeps_serving() {
    let topo = Topology::new("mc", 2, 0).unwrap();
    let _s = servers(&topo);
    let mut d = Daemon::start(&topo, &two_listeners(2));
    let mut c = connect(&topo.client, CLIENT_IP, vip()).unwrap();
    let who = ask(&mut c).unwrap();
    d.stop();
    let api = d.api.clone();
    let o = d.run_other(
        &api,
        &[
            "--config",
            "/etc/clb/no-such-file.toml",
            "--iface",
            d.ifaces(),
            "--bpffs",
            d.bpffs.to_str().unwrap(),
        ],
        Duration::from_secs(15),
    );
    assert!(!o.ok, "{o:?}");
    assert!(o.stderr.contains("does not exist"), "{o:?}");
    assert!(!std::path::Path::new("/etc/clb/no-such-file.toml").exists());
    // Nothing changed: the established connection and new ones still flow.
    assert_eq!(ask(&mut c).unwrap(), who);
    ask_once(&topo.client, CLIENT_IP, vip()).unwrap();
    // --init-config would create an empty file; over pins that hold listeners it refuses.
    let missing = d.dir().join("missing.toml");
    let o = d.run_other(
        &api,
        &[
            "--config",
            missing.to_str().unwrap(),
            "--init-config",
            "--iface",
            d.ifaces(),
            "--bpffs",
            d.bpffs.to_str().unwrap(),
        ],
        Duration::from_secs(15),
    );
    assert!(!o.ok && o.stderr.contains("holds listeners"), "{o:?}");
    assert!(!missing.exists());
    assert_eq!(ask(&mut c).unwrap(), who);
    d.spawn();
    assert_eq!(ask(&mut c).unwrap(), who);
}

#[test]
fn pins_of_a_newer_clb_version_are_refused_clearly_and_left_serving() {
    // A newer clb's connection table (a layout version this build does not know): made here
    // by renaming this version's pin, as a downgrade over a newer datapath would find.
    // (Earlier layouts are upgraded: e2e_upgrade.)
    let topo = Topology::new("ol", 2, 0).unwrap();
    let _s = servers(&topo);
    let mut d = Daemon::start(&topo, &two_listeners(2));
    let mut c = connect(&topo.client, CLIENT_IP, vip()).unwrap();
    let who = ask(&mut c).unwrap();
    d.stop();
    let maps = d.bpffs.join("maps");
    let newer = {
        let (stem, v) = clb_common::layouts::split_version(clb_common::CONN_MAP).unwrap();
        format!("{stem}_V{}", v + 1)
    };
    let (mine, old) = (maps.join(clb_common::CONN_MAP), maps.join(&newer));
    std::fs::rename(&mine, &old).unwrap();
    let before: Vec<_> = std::fs::read_dir(&maps)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let api = d.api.clone();
    let o = d.run_other(
        &api,
        &[
            "--config",
            d.config.to_str().unwrap(),
            "--iface",
            d.ifaces(),
            "--bpffs",
            d.bpffs.to_str().unwrap(),
        ],
        Duration::from_secs(15),
    );
    assert!(!o.ok, "{o:?}");
    assert!(
        o.stderr.contains("tables of a newer clb than this one")
            && o.stderr
                .contains(&format!("{newer} (this clb has {})", clb_common::CONN_MAP))
            && o.stderr.contains("clb teardown --bpffs"),
        "{o:?}"
    );
    // Nothing was created or removed, and the attached datapath still forwards.
    let after: Vec<_> = std::fs::read_dir(&maps)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before.len(), after.len(), "{after:?}");
    assert!(!mine.exists() && old.exists());
    assert_eq!(ask(&mut c).unwrap(), who);
    // Put back (the version that made it starts again): its flows were never touched.
    std::fs::rename(&old, &mine).unwrap();
    d.spawn();
    assert_eq!(ask(&mut c).unwrap(), who);
}

#[test]
fn the_cli_files_and_pipes_are_handled_with_care() {
    let topo = Topology::new("cf", 1, 0).unwrap();
    let d = Daemon::start(&topo, &two_listeners(1));
    // The API socket is 0600.
    let mode = std::fs::metadata(&d.api).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A closed pipe ends the CLI quietly.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; for i in $(seq 200); do {} --api {} status; done | head -n 1 >/dev/null",
            clb_bin().display(),
            d.api.display()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{err}"
    );
    // A broken config file on reload: 400 with the line and the reason; nothing changes.
    let before: serde_json::Value = d.clb_json(&["listener", "ls"]);
    let good = d.config_text();
    std::fs::write(&d.config, "[[listener]]\nname = \"web\"\nvip = \"10.0.0.100:80\"\nproto = \"tcp\"\npersist = \"long\"\n").unwrap();
    let o = d.clb(&["reload"]);
    assert!(
        !o.ok && o.stderr.contains("line 5") && o.stderr.contains("HTTP 400"),
        "{o:?}"
    );
    std::fs::write(&d.config, &good).unwrap();
    assert_eq!(before, d.clb_json::<serde_json::Value>(&["listener", "ls"]));
    // The background loops are shown running.
    let st: serde_json::Value = d.clb_json(&["status"]);
    let loops: HashSet<&str> = st["loops"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["state"] == "running")
        .filter_map(|l| l["name"].as_str())
        .collect();
    for l in ["sweeper", "drains", "health", "http-listeners", "watchdog"] {
        assert!(loops.contains(l), "{l} not running: {st}");
    }
}

#[test]
fn teardown_refuses_what_is_not_a_clb_pin_directory() {
    let dir = std::env::temp_dir().join(clb_tests::netns::unique_name("notpins"));
    std::fs::create_dir_all(dir.join("maps")).unwrap();
    std::fs::create_dir_all(dir.join("links")).unwrap();
    std::fs::write(dir.join("maps/important.db"), "data").unwrap();
    std::fs::write(dir.join("links/notes.txt"), "data").unwrap();
    let o: clb_tests::daemon::CliOut = Command::new(clb_bin())
        .args(["teardown", "--bpffs", dir.to_str().unwrap()])
        .output()
        .unwrap()
        .into();
    assert!(!o.ok && o.stderr.contains("not on a bpffs"), "{o:?}");
    assert!(dir.join("maps/important.db").exists() && dir.join("links/notes.txt").exists());
    // On bpffs but holding something clb never creates: refused too.
    let bpf =
        std::path::PathBuf::from("/sys/fs/bpf").join(clb_tests::netns::unique_name("foreign"));
    std::fs::create_dir_all(bpf.join("maps/sub")).unwrap();
    let o: clb_tests::daemon::CliOut = Command::new(clb_bin())
        .args(["teardown", "--bpffs", bpf.to_str().unwrap()])
        .output()
        .unwrap()
        .into();
    assert!(
        !o.ok && o.stderr.contains("not a clb pin directory"),
        "{o:?}"
    );
    assert!(bpf.join("maps/sub").exists());
    std::fs::remove_dir_all(&bpf).ok();
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_operator_kit_notify_completions_man_and_version() {
    // systemd's notify protocol: READY=1 once the datapath is attached, WATCHDOG=1 every
    // WATCHDOG_USEC/2 while the control plane answers, STOPPING=1 on stop.
    let topo = Topology::new("sd", 1, 0).unwrap();
    let _s = servers(&topo);
    let dir = std::env::temp_dir().join(clb_tests::netns::unique_name("notify"));
    std::fs::create_dir_all(&dir).unwrap();
    let sock_path = dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut d = Daemon::start_env(
        &topo.lb,
        &topo.iface_list(),
        &two_listeners(1),
        &[],
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    let st: serde_json::Value = d.clb_json(&["status"]);
    assert_eq!(st["datapath"], "attached");
    ask_once(&topo.client, CLIENT_IP, vip()).unwrap();
    // Two pings within a few periods (200 ms each).
    for _ in 0..2 {
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }
    d.stop();
    let mut stopping = false;
    for _ in 0..100 {
        let n = sock.recv(&mut buf).unwrap();
        match &buf[..n] {
            b"WATCHDOG=1" => continue,
            m => {
                assert_eq!(m, b"STOPPING=1");
                stopping = true;
                break;
            }
        }
    }
    assert!(stopping, "no STOPPING=1");
    std::fs::remove_dir_all(&dir).ok();

    // Completions for three shells, a man page, a version naming the commit.
    for shell in ["bash", "zsh", "fish"] {
        let o = Command::new(clb_bin())
            .args(["completions", shell])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && text.contains("listener"),
            "{shell}: {text:.200}"
        );
    }
    let o = Command::new(clb_bin()).arg("man").output().unwrap();
    let man = String::from_utf8_lossy(&o.stdout);
    assert!(
        man.contains(".TH clb 1") && man.contains("daemon"),
        "{man:.300}"
    );
    let o = Command::new(clb_bin()).arg("--version").output().unwrap();
    let v = String::from_utf8_lossy(&o.stdout);
    let commit = v
        .split('(')
        .nth(1)
        .and_then(|r| r.split([')', '-']).next())
        .unwrap_or("");
    assert!(
        commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit()),
        "no commit in {v:?}"
    );
    // The service unit: notify type, the daemon's reload signal.
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../clb-user/dist/clb.service"),
    )
    .unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    assert!(unit.contains("WatchdogSec=") && unit.contains("NoNewPrivileges=yes"));
    // systemd itself finds nothing wrong with it (the binary and man page are not
    // installed here: point ExecStart at the built one and leave the man link out).
    if std::path::Path::new("/usr/bin/systemd-analyze").exists() {
        let copy = std::env::temp_dir()
            .join(clb_tests::netns::unique_name("unit"))
            .with_extension("service");
        let text = unit
            .replace("/usr/local/bin/clb", &clb_bin().to_string_lossy())
            .replace("Documentation=man:clb(1)\n", "");
        std::fs::write(&copy, text).unwrap();
        let o = Command::new("/usr/bin/systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        // And rates its exposure medium at worst (5.4 as shipped).
        let sec = Command::new("/usr/bin/systemd-analyze")
            .args(["security", "--offline=yes"])
            .arg(&copy)
            .output()
            .unwrap();
        std::fs::remove_file(&copy).ok();
        assert!(o.status.success() && err.trim().is_empty(), "{err}");
        let report = String::from_utf8_lossy(&sec.stdout);
        if let Some(level) = report
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|r| r.split(':').nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
        {
            assert!(level < 6.0, "exposure {level}: {report}");
        }
    }
}
