//! Property tests of the control plane through its HTTP API: random sequences of changes
//! (valid and invalid) against a model of the state. After every step the daemon's state (as
//! `GET /v1/listeners` shows it) and its config file equal the model; a refused request
//! answers a 4xx the model expects and writes nothing — not the maps, not the file. At the
//! end, a controller restarted from the file over the same datapath writes nothing at all.
//! With a map write made to fail part way through a valid change, the change is answered 500
//! and undone: maps, state and file stay as they were.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use axum::{
    Router,
    body::Body,
    http::{Method, Request, StatusCode},
};
use clb::{
    api::{server::Api, types::ListenerView},
    control::{ControlOptions, Controller, file::ConfigFile, status::DaemonInfo},
    datapath::mem::MemDataplane,
    l7::{Proxies, load_or_create_key},
};
use proptest::prelude::*;
use tower::ServiceExt as _;

const NAMES: [&str; 3] = ["a", "b", "c"];
/// Every VIP is on 10.0.0.1 or fd00::1, so that backends 10.0.0.1:8080 and [fd00::1]:8080
/// are always refused (a VIP's address, or of the other family than the listener's VIP).
const PORTS: [u16; 3] = [80, 81, 82];
const VIP_IPS: [&str; 2] = ["10.0.0.1", "fd00::1"];
const BACKENDS: [&str; 6] = [
    "10.1.0.1:8080",
    "10.1.0.2:8080",
    "10.1.0.2:9090",
    "10.0.0.1:8080",
    "[fd00:10::1]:8080",
    "[fd00::1]:8080",
];
const PERSISTS: [u32; 4] = [0, 600, 3600, 3601];
const WEIGHTS: [u32; 4] = [0, 10, 100, 101];
const IDLE: [u32; 3] = [0, 5, 3601];

#[derive(Clone, Debug)]
enum Op {
    AddListener {
        name: usize,
        port: usize,
        udp: bool,
        v6: bool,
        persist: usize,
    },
    DeleteListener(usize),
    PatchPersist(usize, usize),
    PatchIdle(usize, usize),
    AddBackend(usize, usize, usize),
    SetWeight(usize, usize, usize),
    DeleteBackend(usize, usize),
    Reload,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..3usize, 0..3usize, any::<bool>(), any::<bool>(), 0..4usize).prop_map(
            |(name, port, udp, v6, persist)| Op::AddListener { name, port, udp, v6, persist }
        ),
        1 => (0..3usize).prop_map(Op::DeleteListener),
        2 => (0..3usize, 0..4usize).prop_map(|(l, p)| Op::PatchPersist(l, p)),
        1 => (0..3usize, 0..3usize).prop_map(|(l, i)| Op::PatchIdle(l, i)),
        4 => (0..3usize, 0..6usize, 0..4usize).prop_map(|(l, b, w)| Op::AddBackend(l, b, w)),
        2 => (0..3usize, 0..6usize, 0..4usize).prop_map(|(l, b, w)| Op::SetWeight(l, b, w)),
        1 => (0..3usize, 0..6usize).prop_map(|(l, b)| Op::DeleteBackend(l, b)),
        1 => Just(Op::Reload),
    ]
}

/// The model: what each listener holds.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Model {
    listeners: Vec<ML>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ML {
    name: String,
    vip: SocketAddr,
    udp: bool,
    persist: u32,
    idle: Option<u32>,
    backends: Vec<(SocketAddr, u32)>,
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

/// `addr` as a URL path segment (an IPv6 address's brackets percent-encoded).
fn seg(addr: SocketAddr) -> String {
    addr.to_string().replace('[', "%5B").replace(']', "%5D")
}

impl Model {
    fn find(&self, name: &str) -> Option<usize> {
        self.listeners.iter().position(|l| l.name == name)
    }

    /// The request for `op`, and what it must do: the new model, or the statuses a refusal
    /// may answer (several when more than one rule is broken).
    fn step(&self, op: &Op) -> (Method, String, Option<String>, Result<Model, Vec<u16>>) {
        let mut m = self.clone();
        match *op {
            Op::AddListener {
                name,
                port,
                udp,
                v6,
                persist,
            } => {
                let ip: IpAddr = VIP_IPS[usize::from(v6)].parse().expect("VIP");
                let (name, vip, persist) = (
                    NAMES[name],
                    SocketAddr::new(ip, PORTS[port]),
                    PERSISTS[persist],
                );
                let body = format!(
                    r#"{{"name":"{name}","vip":"{vip}","proto":"{}","persist":{persist}}}"#,
                    if udp { "udp" } else { "tcp" }
                );
                let mut refused = Vec::new();
                if persist > 3600 {
                    refused.push(400);
                }
                if self.find(name).is_some()
                    || self.listeners.iter().any(|l| l.vip == vip && l.udp == udp)
                {
                    refused.push(409);
                }
                let outcome = if refused.is_empty() {
                    m.listeners.push(ML {
                        name: name.into(),
                        vip,
                        udp,
                        persist,
                        idle: None,
                        backends: vec![],
                    });
                    Ok(m)
                } else {
                    Err(refused)
                };
                (Method::POST, "/v1/listeners".into(), Some(body), outcome)
            }
            Op::DeleteListener(l) => {
                let name = NAMES[l];
                let outcome = match self.find(name) {
                    Some(i) => {
                        m.listeners.remove(i);
                        Ok(m)
                    }
                    None => Err(vec![404]),
                };
                (
                    Method::DELETE,
                    format!("/v1/listeners/{name}"),
                    None,
                    outcome,
                )
            }
            Op::PatchPersist(l, p) => {
                let (name, persist) = (NAMES[l], PERSISTS[p]);
                let outcome = match self.find(name) {
                    None => Err(vec![404]),
                    Some(_) if persist > 3600 => Err(vec![400]),
                    Some(i) => {
                        m.listeners[i].persist = persist;
                        Ok(m)
                    }
                };
                let body = format!(r#"{{"persist":{persist}}}"#);
                (
                    Method::PATCH,
                    format!("/v1/listeners/{name}"),
                    Some(body),
                    outcome,
                )
            }
            Op::PatchIdle(l, t) => {
                let (name, idle) = (NAMES[l], IDLE[t]);
                let outcome = match self.find(name) {
                    None => Err(vec![404]),
                    Some(_) if !(1..=3600).contains(&idle) => Err(vec![400]),
                    Some(i) => {
                        m.listeners[i].idle = Some(idle);
                        Ok(m)
                    }
                };
                let body = format!(r#"{{"idle_timeout":{idle}}}"#);
                (
                    Method::PATCH,
                    format!("/v1/listeners/{name}"),
                    Some(body),
                    outcome,
                )
            }
            Op::AddBackend(l, b, w) => {
                let (name, addr, weight) = (NAMES[l], sa(BACKENDS[b]), WEIGHTS[w]);
                let body = format!(r#"{{"addr":"{addr}","weight":{weight}}}"#);
                let outcome = match self.find(name) {
                    None => Err(vec![404]),
                    Some(i) => {
                        let mut refused = Vec::new();
                        let is_vip = VIP_IPS.iter().any(|v| addr.ip().to_string() == *v);
                        let other_family = addr.is_ipv6() != self.listeners[i].vip.is_ipv6();
                        if weight > 100 || is_vip || other_family {
                            refused.push(400);
                        }
                        if self.listeners[i].backends.iter().any(|(a, _)| *a == addr) {
                            refused.push(409);
                        }
                        if refused.is_empty() {
                            m.listeners[i].backends.push((addr, weight));
                            Ok(m)
                        } else {
                            Err(refused)
                        }
                    }
                };
                (
                    Method::POST,
                    format!("/v1/listeners/{name}/backends"),
                    Some(body),
                    outcome,
                )
            }
            Op::SetWeight(l, b, w) => {
                let (name, addr, weight) = (NAMES[l], sa(BACKENDS[b]), WEIGHTS[w]);
                let outcome = match self.find(name).and_then(|i| {
                    let j = self.listeners[i]
                        .backends
                        .iter()
                        .position(|(a, _)| *a == addr)?;
                    Some((i, j))
                }) {
                    None if weight > 100 => Err(vec![400, 404]),
                    None => Err(vec![404]),
                    Some(_) if weight > 100 => Err(vec![400]),
                    Some((i, j)) => {
                        m.listeners[i].backends[j].1 = weight;
                        Ok(m)
                    }
                };
                let body = format!(r#"{{"weight":{weight}}}"#);
                (
                    Method::PATCH,
                    format!("/v1/listeners/{name}/backends/{}", seg(addr)),
                    Some(body),
                    outcome,
                )
            }
            Op::DeleteBackend(l, b) => {
                let (name, addr) = (NAMES[l], sa(BACKENDS[b]));
                let outcome = match self.find(name).and_then(|i| {
                    let j = self.listeners[i]
                        .backends
                        .iter()
                        .position(|(a, _)| *a == addr)?;
                    Some((i, j))
                }) {
                    None => Err(vec![404]),
                    Some((i, j)) => {
                        m.listeners[i].backends.remove(j);
                        Ok(m)
                    }
                };
                (
                    Method::DELETE,
                    format!("/v1/listeners/{name}/backends/{}", seg(addr)),
                    None,
                    outcome,
                )
            }
            Op::Reload => (Method::POST, "/v1/reload".into(), None, Ok(m)),
        }
    }

    fn sorted(&self) -> Vec<ML> {
        let mut v = self.listeners.clone();
        for l in &mut v {
            l.backends.sort();
        }
        v.sort();
        v
    }
}

fn of_specs(specs: &[clb::control::model::ListenerSpec]) -> Vec<ML> {
    let mut v: Vec<ML> = specs
        .iter()
        .map(|s| {
            let mut backends: Vec<(SocketAddr, u32)> =
                s.backends.iter().map(|b| (b.addr, b.weight)).collect();
            backends.sort();
            ML {
                name: s.name.clone(),
                vip: s.vip,
                udp: s.proto() == clb::control::model::Proto::Udp,
                persist: s.persist,
                idle: s.l4().and_then(|k| k.idle_timeout),
                backends,
            }
        })
        .collect();
    v.sort();
    v
}

fn of_views(views: &[ListenerView], idle_of: &dyn Fn(&str) -> Option<u32>) -> Vec<ML> {
    let mut v: Vec<ML> = views
        .iter()
        .map(|l| {
            let mut backends: Vec<(SocketAddr, u32)> =
                l.backends.iter().map(|b| (b.addr, b.weight)).collect();
            backends.sort();
            ML {
                name: l.name.clone(),
                vip: l.vip,
                udp: l.proto == clb::control::model::Proto::Udp,
                persist: l.persist,
                idle: idle_of(&l.name),
                backends,
            }
        })
        .collect();
    v.sort();
    v
}

fn options(path: &Path) -> ControlOptions {
    ControlOptions {
        config_path: path.to_owned(),
        local_addrs: vec![],
        cpus: 2,
        info: DaemonInfo {
            ifaces: vec![],
            xdp_mode: "test".into(),
            bpffs: PathBuf::new(),
            config: path.to_owned(),
            started: Instant::now(),
            upgraded: Default::default(),
        },
    }
}

struct Harness {
    dir: PathBuf,
    config: PathBuf,
    dp: MemDataplane,
    ctl: Arc<Controller>,
    app: Router,
}

impl Drop for Harness {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

fn harness(case: u64) -> Harness {
    let dir = std::env::temp_dir().join(format!("clb-props-{}-{case}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("clb.toml");
    ConfigFile::default().save(&config).expect("empty config");
    let dp = MemDataplane::new();
    let ctl = Controller::start(
        Box::new(dp.clone()),
        Arc::new(dp.clone()),
        ConfigFile::load(&config).expect("config"),
        options(&config),
    )
    .expect("controller");
    let key = load_or_create_key(&dir.join("cookie.key")).expect("key");
    let api = Api {
        ctl: ctl.clone(),
        l7: Arc::new(Proxies::new(key, clb::l7::ConnBudget::new(1000))),
        bgp: None,
        sign_in: Arc::new(clb::api::signin::SignInCodes::new(None)),
        source: clb::control::audit::Source::Api,
    };
    let app = clb::api::server::router(api);
    Harness {
        dir,
        config,
        dp,
        ctl,
        app,
    }
}

async fn call(app: &Router, method: Method, uri: &str, body: Option<String>) -> (u16, String) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(body.map_or_else(Body::empty, Body::from))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("body");
    (
        status.as_u16(),
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

async fn run(case: u64, ops: Vec<(Op, Option<u32>)>) -> Result<(), TestCaseError> {
    let h = harness(case);
    let mut model = Model { listeners: vec![] };
    for (i, (op, fail)) in ops.iter().enumerate() {
        let (method, uri, body, mut expect) = model.step(op);
        h.dp.fail_after(*fail);
        let before = {
            let s = h.dp.state();
            (s.config.clone(), s.writes)
        };
        let file_before = std::fs::read_to_string(&h.config).expect("config file");
        let (status, text) = call(&h.app, method.clone(), &uri, body.clone()).await;
        h.dp.fail_after(None);
        let ctx =
            format!("step {i}: {method} {uri} {body:?} (fail after {fail:?}) → {status} {text}");
        if status == 500 && fail.is_some() && expect.is_ok() {
            // The injected failure hit this change: it must be undone (the maps may have been
            // written and restored, so only their contents are compared).
            prop_assert_eq!(
                &h.dp.state().config,
                &before.0,
                "{}: maps not restored",
                ctx
            );
            prop_assert_eq!(
                std::fs::read_to_string(&h.config).expect("config file"),
                file_before.clone(),
                "{}: file changed",
                ctx
            );
            expect = Err(vec![500]);
        }
        match expect {
            Ok(next) => {
                prop_assert!(
                    StatusCode::from_u16(status).is_ok_and(|s| s.is_success()),
                    "{ctx}: expected success"
                );
                model = next;
            }
            Err(codes) => {
                prop_assert!(codes.contains(&status), "{ctx}: expected one of {codes:?}");
                prop_assert!(text.contains("error"), "{ctx}: no error body");
                // Nothing written: maps, memory (checked below with the model), file.
                let s = h.dp.state();
                prop_assert_eq!(&s.config, &before.0, "{}: maps changed", ctx);
                if status != 500 {
                    prop_assert_eq!(s.writes, before.1, "{}: writes on a refusal", ctx);
                }
                drop(s);
                prop_assert_eq!(
                    std::fs::read_to_string(&h.config).expect("config file"),
                    file_before,
                    "{}: file changed",
                    ctx
                );
            }
        }
        // The running state equals the model…
        let (st, text) = call(&h.app, Method::GET, "/v1/listeners", None).await;
        prop_assert_eq!(st, 200);
        let views: Vec<ListenerView> = serde_json::from_str(&text).expect("listeners");
        let snap = h.ctl.snapshot();
        let idle_of = |n: &str| {
            snap.listener(n)
                .and_then(|l| l.spec.l4())
                .and_then(|k| k.idle_timeout)
        };
        prop_assert_eq!(of_views(&views, &idle_of), model.sorted(), "{}: state", ctx);
        // …and so does the config file, which parses back to the same listeners.
        let file = ConfigFile::load(&h.config).expect("the file parses");
        prop_assert_eq!(of_specs(&file.listeners), model.sorted(), "{}: file", ctx);
    }
    // A controller started from the file over the same maps has nothing to write.
    let writes = h.dp.state().writes;
    let config = h.dp.state().config.clone();
    let again = Controller::start(
        Box::new(h.dp.clone()),
        Arc::new(h.dp.clone()),
        ConfigFile::load(&h.config).expect("config"),
        options(&h.config),
    );
    prop_assert!(again.is_ok(), "restart refused: {:?}", again.err());
    prop_assert_eq!(
        h.dp.state().writes,
        writes,
        "a restart from the file wrote maps"
    );
    prop_assert_eq!(&h.dp.state().config, &config);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_api_changes_keep_state_file_and_model_equal(
        ops in prop::collection::vec((op(), prop::option::weighted(0.2, 0..6u32)), 1..40)
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let case = fastrand::u64(..);
        rt.block_on(run(case, ops))?;
    }
}

/// The router's own refusals (unknown endpoint, method, malformed query) are JSON like every
/// other error.
#[test]
fn every_error_answer_is_json() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let h = harness(4242);
        for (m, uri) in [
            (Method::GET, "/v1/nothing-here"),
            (Method::PUT, "/v1/listeners"),
            (Method::GET, "/v1/sessions?limit=many"),
            (Method::DELETE, "/v1/listeners/none"),
        ] {
            let (status, text) = call(&h.app, m.clone(), uri, None).await;
            assert!(status >= 400, "{m} {uri}: {status}");
            let v: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{m} {uri} → {status} not JSON ({e}): {text:?}"));
            assert!(
                v["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{m} {uri}: {text}"
            );
        }
    });
}
