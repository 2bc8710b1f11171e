//! End-to-end tests of the control plane: live changes under load, daemon crash and restart,
//! restart from the config file, and refusal of bad input — all through the `clb` CLI against
//! a daemon in the balancer namespace, with real TCP connections.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
};

use clb_tests::{
    daemon::{Daemon, one_listener_config},
    netns::{Topology, VIP, backend_ip},
    servers::{NameServer, ask, ask_once, connect},
};

const PORT: u16 = 8080;

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, 80)
}

fn be(i: usize) -> String {
    format!("{}:{PORT}", backend_ip(i))
}

fn config(n: usize, extra: &str) -> String {
    one_listener_config("web", vip(), "tcp", n, PORT, extra)
}

struct Env {
    daemon: Daemon,
    _servers: Vec<NameServer>,
    topo: Topology,
}

fn env(tag: &str, backends: usize, configured: usize, clients: usize, extra: &str) -> Env {
    let topo = Topology::new(tag, backends, clients).expect("topology");
    let servers = clb_tests::servers::tcp_on_backends(&topo, PORT);
    let daemon = Daemon::start(&topo, &config(configured, extra));
    Env {
        daemon,
        _servers: servers,
        topo,
    }
}

/// Opens `per_client` connections from each extra client; returns them with their backend.
fn open_conns(topo: &Topology, per_client: usize) -> Vec<(Ipv4Addr, TcpStream, String)> {
    let mut out = Vec::new();
    for &ip in &topo.extra_clients {
        for _ in 0..per_client {
            let mut c = connect(&topo.client, ip, vip()).expect("connect");
            let who = ask(&mut c).expect("first request");
            out.push((ip, c, who));
        }
    }
    out
}

/// Every connection still answers, from the backend it started on.
fn all_alive(conns: &mut [(Ipv4Addr, TcpStream, String)], when: &str) {
    for (i, (ip, c, who)) in conns.iter_mut().enumerate() {
        match ask(c) {
            Ok(now) => assert_eq!(&now, who, "{when}: connection {i} from {ip} moved"),
            Err(err) => panic!("{when}: connection {i} from {ip} broke: {err}"),
        }
    }
}

#[test]
fn live_changes_under_load_break_no_connection() {
    // Four backend hosts, three configured: the fourth is added live.
    let e = env("lv", 4, 3, 20, "");
    let mut conns = open_conns(&e.topo, 10);
    assert_eq!(conns.len(), 200);
    all_alive(&mut conns, "before any change");
    let steps: Vec<(&str, Vec<String>)> = vec![
        (
            "add a backend",
            vec!["backend".into(), "add".into(), "web".into(), be(3)],
        ),
        (
            "change weights",
            vec![
                "backend".into(),
                "set".into(),
                "web".into(),
                be(0),
                "--weight".into(),
                "30".into(),
            ],
        ),
        (
            "weight 0 (quiescent)",
            vec![
                "backend".into(),
                "set".into(),
                "web".into(),
                be(1),
                "--weight".into(),
                "0".into(),
            ],
        ),
        (
            "persistence 0 -> 600",
            vec![
                "listener".into(),
                "set".into(),
                "web".into(),
                "--persist".into(),
                "600".into(),
            ],
        ),
        (
            "persistence 600 -> 0",
            vec![
                "listener".into(),
                "set".into(),
                "web".into(),
                "--persist".into(),
                "0".into(),
            ],
        ),
        (
            "idle timeout 900 -> 600",
            vec![
                "listener".into(),
                "set".into(),
                "web".into(),
                "--idle-timeout".into(),
                "600".into(),
            ],
        ),
        // The added backend got no connection (none was opened since): removing it is safe.
        (
            "remove a backend without connections",
            vec!["backend".into(), "rm".into(), "web".into(), be(3)],
        ),
    ];
    for (what, args) in steps {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        e.daemon.clb_ok(&a);
        all_alive(&mut conns, what);
    }
    // New connections follow the new settings: b1 is quiescent.
    for _ in 0..9 {
        assert_ne!(
            ask_once(&e.topo.client, e.topo.extra_clients[0], vip()).unwrap(),
            "b1"
        );
    }
}

#[test]
fn daemon_crash_and_restart_lose_no_flow_and_no_persisted_client() {
    let mut e = env("cr", 3, 3, 50, "persist = 600");
    let mut conns = open_conns(&e.topo, 4);
    assert_eq!(conns.len(), 200);
    let mut persisted: HashMap<Ipv4Addr, String> = HashMap::new();
    for (ip, _, who) in &conns {
        let prev = persisted.insert(*ip, who.clone());
        assert!(prev.is_none_or(|p| &p == who), "{ip} not persisted");
    }
    let sessions: Vec<serde_json::Value> = e.daemon.clb_json(&["session", "ls"]);
    assert_eq!(sessions.len(), 50);

    e.daemon.kill9();
    // The datapath goes on without its daemon: flows and persistence.
    all_alive(&mut conns, "daemon killed");
    for ip in e.topo.extra_clients.iter().take(10) {
        assert_eq!(
            ask_once(&e.topo.client, *ip, vip()).unwrap(),
            persisted[ip],
            "new connection while down"
        );
    }

    e.daemon.spawn();
    all_alive(&mut conns, "daemon restarted");
    let sessions: Vec<serde_json::Value> = e.daemon.clb_json(&["session", "ls"]);
    assert_eq!(sessions.len(), 50, "persisted clients after restart");
    let ip_to_backend: HashMap<String, String> = (0..3).map(|i| (be(i), format!("b{i}"))).collect();
    for s in &sessions {
        let ip: Ipv4Addr = s["client"].as_str().unwrap().parse().unwrap();
        let backend = &ip_to_backend[s["backend"].as_str().unwrap()];
        assert_eq!(backend, &persisted[&ip], "session of {ip} after restart");
    }
    for &ip in &e.topo.extra_clients {
        assert_eq!(
            ask_once(&e.topo.client, ip, vip()).unwrap(),
            persisted[&ip],
            "new connection after restart"
        );
    }
    assert!(
        e.daemon.log().contains("reused pinned XDP link"),
        "{}",
        e.daemon.log()
    );
}

#[test]
fn restart_from_config_comes_back_identical() {
    let mut e = env("rs", 3, 2, 0, "");
    let d = &e.daemon;
    d.clb_ok(&[
        "listener",
        "set",
        "web",
        "--persist",
        "120",
        "--idle-timeout",
        "300",
        "--hc-interval",
        "10",
    ]);
    d.clb_ok(&["backend", "add", "web", &be(2), "--weight", "25"]);
    d.clb_ok(&["backend", "set", "web", &be(0), "--weight", "0"]);
    d.clb_ok(&[
        "listener",
        "add",
        "dns",
        "--vip",
        "10.0.0.100:53",
        "--proto",
        "udp",
        "--persist",
        "30",
    ]);
    d.clb_ok(&["backend", "add", "dns", &format!("{}:53", backend_ip(1))]);
    let before: serde_json::Value = d.clb_json(&["listener", "ls"]);
    let text = d.config_text();
    assert!(
        text.contains("persist = 120") && text.contains("name = \"dns\""),
        "{text}"
    );
    e.daemon.stop();
    assert!(
        e.daemon.bpffs.join("maps/CLB_CONN_V2").exists(),
        "pins stay when the daemon stops"
    );
    e.daemon.spawn();
    let after: serde_json::Value = e.daemon.clb_json(&["listener", "ls"]);
    assert_eq!(before, after);
    assert_eq!(text, e.daemon.config_text());
    // And it balances as configured: b0 is quiescent.
    for _ in 0..6 {
        assert_ne!(
            ask_once(&e.topo.client, clb_tests::netns::CLIENT_IP, vip()).unwrap(),
            "b0"
        );
    }
}

/// Every validation rule: the CLI exits non-zero with a message naming the field and range,
/// and neither the listener list nor the config file changes.
#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let e = env("bi", 2, 2, 0, "persist = 60");
    let d = &e.daemon;
    d.clb_ok(&[
        "listener",
        "add",
        "other",
        "--vip",
        "10.0.0.101:80",
        "--proto",
        "tcp",
    ]);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["listener", "set", "web", "--persist", "3601"],
            "persist 3601 is out of range: allowed 0-3600 seconds",
        ),
        (
            vec![
                "listener",
                "add",
                "x",
                "--vip",
                "10.0.0.102:80",
                "--proto",
                "tcp",
                "--persist",
                "5000",
            ],
            "persist 5000 is out of range",
        ),
        (
            vec![
                "listener",
                "add",
                "h",
                "--vip",
                "10.0.0.102:80",
                "--proto",
                "http",
                "--persist",
                "10",
            ],
            "0 (off) or 30-3600 seconds for http",
        ),
        (
            vec!["listener", "set", "web", "--idle-timeout", "0"],
            "idle_timeout 0 is out of range: allowed 1-3600 seconds",
        ),
        (
            vec!["listener", "set", "web", "--idle-timeout", "3601"],
            "idle_timeout 3601 is out of range",
        ),
        (
            vec!["listener", "set", "web", "--hc-interval", "1"],
            "health_check.interval 1 is out of range: allowed 2-300 seconds",
        ),
        (
            vec!["listener", "set", "web", "--hc-timeout", "61"],
            "health_check.timeout 61 is out of range: allowed 2-60 seconds",
        ),
        (
            vec!["listener", "set", "web", "--hc-unhealthy", "11"],
            "health_check.unhealthy_threshold 11 is out of range: allowed 2-10",
        ),
        (
            vec!["listener", "set", "web", "--hc-healthy", "1"],
            "health_check.healthy_threshold 1 is out of range: allowed 2-10",
        ),
        (
            vec!["listener", "set", "web", "--keepalive-timeout", "5"],
            "keepalive_timeout does not apply to tcp listeners",
        ),
        (
            vec!["backend", "add", "web", "10.0.12.2:8080", "--weight", "101"],
            "weight 101 is out of range: allowed 0-100",
        ),
        (
            vec!["backend", "set", "web", &be(0), "--weight", "1000"],
            "weight 1000 is out of range",
        ),
        (
            vec!["backend", "add", "web", &be(0)],
            "is already in listener \"web\"",
        ),
        (
            vec!["backend", "add", "web", "10.0.12.2:0"],
            "a port 1-65535",
        ),
        (
            vec!["backend", "add", "web", "0.0.0.0:80"],
            "a unicast IPv4 address",
        ),
        (
            vec!["backend", "add", "nope", "10.0.12.2:80"],
            "no listener named \"nope\"",
        ),
        (
            vec!["backend", "rm", "web", "10.9.9.9:80"],
            "has no backend 10.9.9.9:80",
        ),
        (
            vec!["backend", "drain", "web", &be(0), "--timeout", "4000"],
            "timeout 4000 is out of range: allowed 0-3600",
        ),
        (
            vec![
                "listener",
                "add",
                "web",
                "--vip",
                "10.0.0.103:80",
                "--proto",
                "tcp",
            ],
            "listener name \"web\" is already in use",
        ),
        (
            vec![
                "listener",
                "add",
                "dup",
                "--vip",
                "10.0.0.100:80",
                "--proto",
                "tcp",
            ],
            "vip 10.0.0.100:80 (tcp) is already used by listener",
        ),
        (
            vec![
                "listener",
                "add",
                "bad name",
                "--vip",
                "10.0.0.104:80",
                "--proto",
                "tcp",
            ],
            "name bad name is out of range",
        ),
        (
            vec![
                "listener",
                "add",
                "p0",
                "--vip",
                "10.0.0.104:0",
                "--proto",
                "tcp",
            ],
            "vip 10.0.0.104:0 is out of range: allowed a port 1-65535",
        ),
        (vec!["listener", "rm", "nope"], "no listener named"),
        // Malformed arguments never reach the daemon: clap refuses them (exit 2).
        (
            vec!["backend", "add", "web", "10.0.0.300:80"],
            "invalid value",
        ),
        (
            vec!["listener", "set", "web", "--persist", "-1"],
            "unexpected argument",
        ),
        (
            vec![
                "listener",
                "add",
                "q",
                "--vip",
                "10.0.0.105:80",
                "--proto",
                "sctp",
            ],
            "proto must be tcp, udp, http or https",
        ),
    ]
    .into_iter()
    .map(|(a, m)| (a.into_iter().map(String::from).collect(), m))
    .collect();
    // Capacity: one backend address may serve at most 4 L4 listeners.
    let shared = "10.0.12.2:9000";
    for i in 0..4 {
        let name = format!("cap{i}");
        d.clb_ok(&[
            "listener",
            "add",
            &name,
            "--vip",
            &format!("10.0.1.{}:80", 100 + i),
            "--proto",
            "tcp",
        ]);
        d.clb_ok(&["backend", "add", &name, shared]);
    }
    d.clb_ok(&[
        "listener",
        "add",
        "cap4",
        "--vip",
        "10.0.1.104:80",
        "--proto",
        "tcp",
    ]);
    let mut cases = cases;
    cases.push((
        vec!["backend".into(), "add".into(), "cap4".into(), shared.into()],
        "capacity exceeded: at most 4 L4 listeners sharing one backend address",
    ));

    let listed = |d: &Daemon| d.clb_ok(&["listener", "ls", "--json"]);
    let ls0 = listed(d);
    let cfg0 = d.config_text();
    for (args, msg) in &cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = d.clb(&a);
        assert!(!o.ok, "clb {a:?} was accepted");
        assert!(
            o.stderr.contains(msg),
            "clb {a:?}: expected {msg:?} in {:?}",
            o.stderr
        );
        assert_eq!(listed(d), ls0, "clb {a:?} changed the listeners");
        assert_eq!(d.config_text(), cfg0, "clb {a:?} changed the config file");
        println!(
            "refused as expected: clb {} -> {}",
            a.join(" "),
            o.stderr.trim()
        );
    }

    // A broken config file: reload refuses it and the running state stays.
    std::fs::write(&d.config, "[[listener]]\nname = \"web\"\nvip = 10.0.0.1\n").unwrap();
    let o = d.clb(&["reload"]);
    assert!(!o.ok && o.stderr.contains("line 3"), "{o:?}");
    assert_eq!(listed(d), ls0);
    assert!(ask_once(&e.topo.client, clb_tests::netns::CLIENT_IP, vip()).is_ok());
}

#[test]
fn daemon_refuses_a_broken_config_file_with_line_and_reason() {
    let topo = Topology::new("bc", 1, 0).unwrap();
    let dir = std::env::temp_dir().join(clb_tests::netns::unique_name("bcfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("clb.toml");
    for (text, msg) in [
        (
            "[[listener]]\nname = \"web\"\nvip = \"10.0.0.1:80\"\nproto = \"tcp\"\npersist = \"long\"\n",
            "line 5",
        ),
        (
            "[[listener]]\nname = \"web\"\nvip = \"10.0.0.1:80\"\nproto = \"tcp\"\npersist = 9000\n",
            "persist 9000 is out of range",
        ),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", topo.lb.path()))
            .arg(clb_tests::daemon::clb_bin())
            .arg("--api")
            .arg(dir.join("api.sock"))
            .args(["daemon", "--iface", "c0", "--bpffs"])
            .arg(dir.join("nopins"))
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "daemon started with a broken file");
        assert!(err.contains(msg), "expected {msg:?} in {err}");
        assert!(!dir.join("nopins").exists(), "nothing was loaded");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn clb_check_names_the_problem_of_a_bad_file_and_passes_a_good_one() {
    let dir = std::env::temp_dir().join(clb_tests::netns::unique_name("chk"));
    std::fs::create_dir_all(&dir).unwrap();
    let check = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        let o = std::process::Command::new(clb_tests::daemon::clb_bin())
            .arg("check")
            .arg("--config")
            .arg(&p)
            .output()
            .expect("clb check");
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (ok, out, _) = check("good.toml", &config(3, "persist = 600"));
    assert!(ok, "{out}");
    assert!(out.contains("ok (1 listener(s), 3 backend(s))"), "{out}");
    // A value out of range: named once, with its field.
    let (ok, _, err) = check("range.toml", &config(3, "persist = 9000"));
    assert!(!ok);
    assert_eq!(
        err.matches("persist 9000 is out of range").count(),
        1,
        "{err}"
    );
    // A syntax error: its line.
    let (ok, _, err) = check("syntax.toml", "[[listener]]\nname = \"web\"\nproto = tcp\n");
    assert!(!ok);
    assert!(err.contains("line 3"), "{err}");
    // A certificate file that is not there.
    let https = "[[listener]]\nname = \"s\"\nvip = \"10.0.0.100:443\"\nproto = \"https\"\n\
                 [[listener.certificate]]\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"\n\
                 [[listener.backend]]\naddr = \"10.0.10.2:8080\"\n";
    let (ok, _, err) = check("cert.toml", https);
    assert!(!ok);
    assert!(
        err.contains("listener \"s\": certificate") && err.contains("/nonexistent/c.pem"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// The config file is the operator's: ten changes of different kinds through the CLI and a
/// hand edit taken in by `clb reload` keep every comment, the order and the spelling of what
/// they did not touch, and write only what they changed.
#[test]
fn comments_in_the_config_file_survive_ten_changes_through_the_cli() {
    let text = format!(
        "# Production balancer, reviewed 2026-11-30 (ticket OPS-41).\n\n\
         # The shop. Cart state lives on the backend: keep persistence on.\n\
         [[listener]]\n\
         name = \"web\"\n\
         vip = \"{vip}\"\n\
         proto = \"tcp\"\n\
         persist = 600          # seconds, 0 = off\n\
         sched = \"wrr\"          # explicit default\n\n\
         # rack A\n\
         [[listener.backend]]\n\
         addr = \"{b0}\"\n\n\
         # rack B, smaller box\n\
         [[listener.backend]]\n\
         addr = \"{b1}\"\n\
         weight = 5             # half of rack A\n",
        vip = vip(),
        b0 = be(0),
        b1 = be(1),
    );
    let topo = Topology::new("cm", 3, 0).expect("topology");
    let _servers = clb_tests::servers::tcp_on_backends(&topo, PORT);
    let d = Daemon::start(&topo, &text);
    let dns_be = format!("{}:53", backend_ip(1));
    let comments = [
        "# Production balancer, reviewed 2026-11-30 (ticket OPS-41).",
        "# The shop. Cart state lives on the backend: keep persistence on.",
        "# seconds, 0 = off",
        "# rack A",
        "# rack B, smaller box",
        "# half of rack A",
    ];
    let changes: [&[&str]; 10] = [
        &["listener", "set", "web", "--persist", "300"],
        &["backend", "set", "web", &be(1), "--weight", "7"],
        &["backend", "add", "web", &be(2)],
        &["listener", "set", "web", "--hc-interval", "3"],
        &[
            "listener",
            "add",
            "dns",
            "--vip",
            "10.0.0.100:53",
            "--proto",
            "udp",
        ],
        &["backend", "add", "dns", &dns_be],
        &["listener", "set", "web", "--sched", "lc"],
        &["backend", "rm", "web", &be(2)],
        &["listener", "rm", "dns"],
        &["listener", "set", "web", "--persist", "0"],
    ];
    for (i, change) in changes.iter().enumerate() {
        d.clb_ok(change);
        let now = d.config_text();
        for c in comments {
            assert!(
                now.contains(c),
                "change {i} ({change:?}) lost {c:?}:\n{now}"
            );
        }
        if i == 4 {
            // A hand edit between changes: a new comment and a value, taken in by reload.
            let edited = now.replace("# rack A\n", "# rack A (moved to row 3 on 2026-12-01)\n");
            assert_ne!(edited, now);
            std::fs::write(&d.config, &edited).unwrap();
            d.clb_ok(&["reload"]);
        }
    }
    let end = d.config_text();
    assert!(
        end.contains("# rack A (moved to row 3 on 2026-12-01)"),
        "{end}"
    );
    // Each value changed where it stands, its comment kept in its column.
    assert!(
        end.contains("persist = 0            # seconds, 0 = off"),
        "{end}"
    );
    assert!(
        end.contains("sched = \"lc\"           # explicit default"),
        "{end}"
    );
    assert!(
        end.contains("weight = 7             # half of rack A"),
        "{end}"
    );
    // Only what a change needed was written: the one health-check field set, no listener or
    // backend that was removed again, no weight for the backend that never had one.
    assert!(
        end.contains("[listener.health_check]\ninterval = 3"),
        "{end}"
    );
    assert!(!end.contains("dns") && !end.contains(&be(2)), "{end}");
    assert_eq!(end.matches("weight").count(), 1, "{end}");
    assert!(end.starts_with("# Production balancer"), "{end}");
    // And the file says what runs: a restart from it is the same listener.
    let l: serde_json::Value = d.clb_json(&["listener", "ls"]);
    assert_eq!(l[0]["persist"], 0, "{l}");
    assert_eq!(l[0]["sched"], "lc", "{l}");
    let who = ask_once(&topo.client, clb_tests::netns::CLIENT_IP, vip()).expect("a request");
    assert!(who == "b0" || who == "b1", "{who}");
}

/// The events `clb status --events` shows.
fn events(d: &Daemon) -> Vec<serde_json::Value> {
    let v: serde_json::Value = d.clb_json(&["status", "--events", "100"]);
    v["events"].as_array().expect("events").clone()
}

#[test]
fn reload_dry_run_shows_a_pending_edit_and_every_change_is_audited() {
    let topo = Topology::new("dr", 3, 0).expect("topology");
    let _servers = clb_tests::servers::tcp_on_backends(&topo, PORT);
    let d = Daemon::start(&topo, &config(2, "persist = 600"));
    // A CLI change.
    d.clb_ok(&["backend", "set", "web", &be(1), "--weight", "5"]);
    // A hand edit: a field and a backend.
    let edited = d.config_text().replace("persist = 600", "persist = 300")
        + &format!("\n[[listener.backend]]\naddr = \"{}\"\n", be(2));
    std::fs::write(&d.config, &edited).unwrap();
    let dry = d.clb_ok(&["reload", "--dry-run"]);
    assert!(
        dry.contains("nothing was changed")
            && dry.contains("listener web: persist 600 → 300")
            && dry.contains(&format!("listener web backend {} added (weight 10)", be(2))),
        "{dry}"
    );
    let l: serde_json::Value = d.clb_json(&["listener", "ls"]);
    assert_eq!(l[0]["persist"], 600, "a dry run applied: {l}");
    let b: Vec<serde_json::Value> = d.clb_json(&["backend", "ls", "web"]);
    assert_eq!(b.len(), 2, "a dry run added a backend: {b:?}");
    assert_eq!(d.config_text(), edited, "a dry run wrote the file");
    // The reload applies and prints the same difference; a second one has nothing to do.
    let done = d.clb_ok(&["reload"]);
    assert!(
        done.starts_with("reloaded:") && done.contains("listener web: persist 600 → 300"),
        "{done}"
    );
    let l: serde_json::Value = d.clb_json(&["listener", "ls"]);
    assert_eq!(l[0]["persist"], 300, "{l}");
    assert!(d.clb_ok(&["reload"]).contains("no changes"));
    // The running configuration, as the file spells it.
    let running = d.clb_ok(&["config"]);
    assert!(
        running.contains("persist = 300") && running.contains(&be(2)),
        "{running}"
    );
    // A bad edit: the dry run and the reload name the field; nothing changes.
    std::fs::write(&d.config, edited.replace("persist = 300", "persist = 9000")).unwrap();
    for args in [&["reload", "--dry-run"][..], &["reload"][..]] {
        let out = d.clb(args);
        assert!(!out.ok, "{args:?} accepted persist 9000");
        assert!(
            out.stderr.contains("persist 9000 is out of range"),
            "{}",
            out.stderr
        );
    }
    let l: serde_json::Value = d.clb_json(&["listener", "ls"]);
    assert_eq!(l[0]["persist"], 300, "{l}");
    // The audit trail: the CLI change, the reload's lines, the refused reload, in order.
    let ev = events(&d);
    let find = |source: &str, change: &str| {
        ev.iter()
            .position(|x| x["source"] == source && x["change"] == change)
            .unwrap_or_else(|| panic!("no {source} event {change:?}: {ev:#?}"))
    };
    let cli = find(
        "api",
        &format!("listener web backend {}: weight 10 → 5", be(1)),
    );
    let rel = find("reload", "listener web: persist 600 → 300");
    let refused = ev
        .iter()
        .rposition(|x| {
            x["source"] == "reload"
                && x["refused"]
                    .as_str()
                    .is_some_and(|r| r.contains("persist 9000"))
        })
        .unwrap_or_else(|| panic!("no refused reload: {ev:#?}"));
    assert!(cli < rel && rel < refused, "{ev:#?}");
    let table = d.clb_ok(&["status", "--events"]);
    assert!(
        table.contains("SOURCE") && table.contains("persist 600 → 300"),
        "{table}"
    );
    let log = d.log();
    assert!(
        log.contains("weight 10 → 5") && log.contains("persist 600 → 300"),
        "no audit lines in the log:\n{log}"
    );
    // Written to a file, not a terminal: no colour codes.
    assert!(!log.contains('\x1b'), "ANSI escapes in a log file:\n{log}");
}

#[test]
fn log_format_json_writes_one_object_per_line_with_the_audit_fields() {
    let topo = Topology::new("lj", 2, 0).expect("topology");
    let _servers = clb_tests::servers::tcp_on_backends(&topo, PORT);
    let d = Daemon::start_with(
        &topo,
        &config(1, "persist = 600"),
        &["--log-format", "json"],
    );
    d.clb_ok(&["listener", "set", "web", "--persist", "300"]);
    let log = d.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.starts_with("--- run") && !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["target"] == "clb::daemon" && l["level"] == "INFO"),
        "{log}"
    );
    assert!(
        lines.iter().any(|l| l["target"] == "clb::audit"
            && l["message"] == "listener web: persist 600 → 300"
            && l["source"] == "api"),
        "no JSON audit line:\n{log}"
    );
}

#[test]
fn session_rm_reschedules_that_client_and_the_others_keep_theirs() {
    let e = env("sr", 3, 3, 6, "persist = 600");
    let first = |ip: Ipv4Addr| ask_once(&e.topo.client, ip, vip()).expect("a request");
    let placed: Vec<(Ipv4Addr, String)> = e
        .topo
        .extra_clients
        .iter()
        .map(|&ip| (ip, first(ip)))
        .collect();
    let sessions: Vec<serde_json::Value> = e.daemon.clb_json(&["session", "ls"]);
    assert_eq!(sessions.len(), 6, "{sessions:?}");
    let (gone, _) = placed[0];
    // Bad input changes nothing.
    for bad in ["10.0.0.300", "10.0.0.0/33", "fd00::1"] {
        let out = e.daemon.clb(&["session", "rm", "web", bad]);
        assert!(!out.ok, "session rm {bad} accepted");
    }
    assert!(
        !e.daemon
            .clb(&["session", "rm", "nosuch", &gone.to_string()])
            .ok
    );
    let sessions: Vec<serde_json::Value> = e.daemon.clb_json(&["session", "ls"]);
    assert_eq!(sessions.len(), 6, "refused removals removed: {sessions:?}");
    // Forgotten three times, that client is scheduled again each time (round robin moves it);
    // the others keep their backend throughout.
    let mut seen = std::collections::HashSet::from([placed[0].1.clone()]);
    for round in 0..3 {
        let out = e
            .daemon
            .clb_ok(&["session", "rm", "web", &gone.to_string()]);
        assert!(out.contains("forgot 1 "), "round {round}: {out}");
        let sessions: Vec<serde_json::Value> = e.daemon.clb_json(&["session", "ls"]);
        assert_eq!(sessions.len(), 5, "round {round}: {sessions:?}");
        assert!(
            sessions.iter().all(|s| s["client"] != gone.to_string()),
            "round {round}: {sessions:?}"
        );
        seen.insert(first(gone));
        for (ip, who) in &placed[1..] {
            assert_eq!(&first(*ip), who, "round {round}: {ip} moved");
        }
    }
    assert!(
        seen.len() >= 2,
        "the forgotten client never moved: {seen:?}"
    );
    // A flush forgets every client of the listener.
    let out = e.daemon.clb_ok(&["session", "flush", "web"]);
    assert!(out.contains("forgot 6 "), "{out}");
    let sessions: Vec<serde_json::Value> = e.daemon.clb_json(&["session", "ls"]);
    assert!(sessions.is_empty(), "{sessions:?}");
    let ev = events(&e.daemon);
    assert!(
        ev.iter().any(|x| x["change"]
            == format!("listener web: forget persisted clients in {gone}/32: 1 removed")),
        "{ev:#?}"
    );
}

#[test]
fn a_batch_of_fifty_backends_is_one_transaction() {
    let e = env("bt", 2, 2, 0, "");
    let d = &e.daemon;
    // 50 addresses nobody answers on (weight 0: no client is sent there), then one bad
    // entry: an IPv6 address on an IPv4 listener.
    let fifty: Vec<String> = (0..50).map(|i| format!("10.0.77.{}:80", i + 1)).collect();
    let mut args: Vec<&str> = vec!["backend", "add", "web"];
    args.extend(fifty.iter().map(String::as_str));
    args.extend(["[fd00::9]:80", "--weight", "0"]);
    let before = d.config_text();
    let out = d.clb(&args);
    assert!(!out.ok, "a bad entry refuses the batch");
    assert!(out.stderr.contains("fd00::9"), "{}", out.stderr);
    assert_eq!(d.config_text(), before, "nothing written");
    let ls: Vec<serde_json::Value> = d.clb_json(&["backend", "ls", "web"]);
    assert_eq!(ls.len(), 2, "nothing added");
    // A duplicate inside the batch refuses it too.
    let mut dup = args[..args.len() - 3].to_vec();
    dup.extend([fifty[7].as_str(), "--weight", "0"]);
    assert!(!d.clb(&dup).ok);
    assert_eq!(
        d.clb_json::<Vec<serde_json::Value>>(&["backend", "ls", "web"])
            .len(),
        2
    );
    // Both refusals audited with what was asked.
    let ev = events(d);
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert!(
        ev.iter()
            .all(|e| e["change"] == "add 51 backends to listener web")
    );
    // The good 50: one change, audited as 50 additions.
    let mut good = args[..args.len() - 3].to_vec();
    good.extend(["--weight", "0"]);
    d.clb_ok(&good);
    let ls: Vec<serde_json::Value> = d.clb_json(&["backend", "ls", "web"]);
    assert_eq!(ls.len(), 52);
    let ev = events(d);
    let added = ev[2..]
        .iter()
        .filter(|e| {
            e["change"]
                .as_str()
                .is_some_and(|c| c.ends_with("added (weight 0)"))
        })
        .count();
    assert_eq!(added, 50, "{ev:?}");
    // Traffic still goes only to the two weighted backends.
    for _ in 0..4 {
        let who = ask_once(&e.topo.client, clb_tests::netns::CLIENT_IP, vip()).unwrap();
        assert!(who == "b0" || who == "b1", "{who}");
    }
}

#[test]
fn apply_replaces_and_adds_listeners_as_one_transaction() {
    let e = env("ap", 3, 2, 3, "");
    let d = &e.daemon;
    let mut open = connect(&e.topo.client, clb_tests::netns::CLIENT_IP, vip()).expect("connect");
    let on = ask(&mut open).expect("first request");
    // The document: `web` with persistence and a third backend, and a new UDP listener.
    let doc = format!(
        "# the shop's listeners, reviewed\n{}{}",
        config(3, "persist = 600 # carts"),
        one_listener_config("dns", SocketAddrV4::new(VIP, 53), "udp", 1, 5353, "")
    );
    let path = d.dir().join("shop.toml");
    std::fs::write(&path, &doc).unwrap();
    let file = path.to_str().unwrap();
    let before = d.config_text();
    // A dry run lists every change and applies none.
    let out = d.clb_ok(&["apply", "-f", file, "--dry-run"]);
    assert!(out.contains("would apply (nothing was changed)"), "{out}");
    assert!(out.contains("persist 0 → 600"), "{out}");
    assert!(out.contains(&be(2)), "{out}");
    assert!(out.contains("dns"), "{out}");
    assert_eq!(d.config_text(), before, "a dry run wrote the file");
    let ls: Vec<serde_json::Value> = d.clb_json(&["listener", "ls"]);
    assert_eq!(ls.len(), 1, "a dry run added a listener: {ls:?}");
    // One bad entry refuses the whole document: a weight out of range on the new listener.
    let bad = path.with_file_name("bad.toml");
    let dns = format!("{}:5353", backend_ip(0));
    std::fs::write(
        &bad,
        doc.replace(
            &format!("addr = \"{dns}\""),
            &format!("addr = \"{dns}\"\nweight = 100000"),
        ),
    )
    .unwrap();
    assert_ne!(std::fs::read_to_string(&bad).unwrap(), doc);
    let out = d.clb(&["apply", "-f", bad.to_str().unwrap()]);
    assert!(!out.ok, "a bad document was applied");
    assert!(out.stderr.contains("weight"), "{}", out.stderr);
    assert_eq!(d.config_text(), before, "a refused document wrote the file");
    let ls: Vec<serde_json::Value> = d.clb_json(&["listener", "ls"]);
    assert_eq!(ls.len(), 1, "{ls:?}");
    assert_eq!(ls[0]["persist"], 0, "{ls:?}");
    // Broken TOML is named with its place, before the daemon sees it.
    std::fs::write(&bad, "[[listener]\nname = \"x\"\n").unwrap();
    let out = d.clb(&["apply", "-f", bad.to_str().unwrap()]);
    assert!(!out.ok);
    assert!(out.stderr.contains("line 1"), "{}", out.stderr);
    // The document applied: both listeners as written, the open connection untouched.
    let out = d.clb_ok(&["apply", "-f", file]);
    assert!(out.starts_with("applied:"), "{out}");
    let ls: Vec<serde_json::Value> = d.clb_json(&["listener", "ls"]);
    assert_eq!(ls.len(), 2, "{ls:?}");
    let web = ls.iter().find(|l| l["name"] == "web").expect("web");
    assert_eq!(web["persist"], 600, "{web}");
    let bs: Vec<serde_json::Value> = d.clb_json(&["backend", "ls", "web"]);
    assert_eq!(bs.len(), 3, "{bs:?}");
    assert!(ls.iter().any(|l| l["name"] == "dns" && l["proto"] == "udp"));
    assert_eq!(ask(&mut open).expect("the open connection"), on);
    // The config file keeps the operator's comments and holds the new listener.
    let text = d.config_text();
    assert!(text.contains("name = \"dns\""), "{text}");
    let seen: std::collections::HashSet<String> = e
        .topo
        .extra_clients
        .iter()
        .map(|&ip| ask_once(&e.topo.client, ip, vip()).expect("a request"))
        .collect();
    assert!(seen.contains("b2") || seen.len() == 3, "{seen:?}");
    // Applying it again changes nothing; the audit trail has the one application.
    assert_eq!(d.clb_ok(&["apply", "-f", file]), "applied: no changes\n");
    let ev = events(d);
    assert!(
        ev.iter().any(|x| x["change"] == "apply listeners web, dns"
            && x["refused"].as_str().is_some_and(|r| r.contains("weight"))),
        "{ev:#?}"
    );
}
