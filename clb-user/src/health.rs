//! Health checks: one task per (listener, backend), TCP connect or HTTP GET, every `interval`
//! seconds with ±10 % jitter (first check at a random point of the first interval), a
//! `timeout` per check, and `healthy_threshold` / `unhealthy_threshold` consecutive results to
//! change state. A change reprograms the listener (the backend leaves or rejoins the schedule;
//! its persisted clients are rescheduled on their next connection; its established flows are
//! left alone) and is logged. Checks never hold the control-plane lock while they wait.

use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    balancer::Health,
    daemon::Shared,
    model::{CheckKind, HealthCheckSpec},
};

type Key = (String, SocketAddrV4);

/// Keeps one check task per backend in line with the configuration.
pub struct HealthManager;

impl HealthManager {
    /// Runs until the daemon stops: resyncs the check tasks after every change.
    pub async fn run(shared: Arc<Shared>) {
        let mut rx = shared.generation.subscribe();
        let mut tasks: HashMap<Key, (HealthCheckSpec, JoinHandle<()>)> = HashMap::new();
        loop {
            sync(&shared, &mut tasks);
            if rx.changed().await.is_err() {
                break;
            }
        }
        for (_, (_, t)) in tasks {
            t.abort();
        }
    }
}

fn sync(shared: &Arc<Shared>, tasks: &mut HashMap<Key, (HealthCheckSpec, JoinHandle<()>)>) {
    let specs = shared.lb.lock().expect("balancer lock").specs();
    let mut wanted: HashMap<Key, HealthCheckSpec> = HashMap::new();
    let mut unchecked: Vec<Key> = Vec::new();
    for l in &specs {
        for b in &l.backends {
            let key = (l.name.clone(), b.addr);
            if l.health_check.kind == CheckKind::None {
                unchecked.push(key);
            } else {
                wanted.insert(key, l.health_check.clone());
            }
        }
    }
    tasks.retain(|k, (spec, t)| {
        let keep = wanted.get(k) == Some(spec);
        if !keep {
            t.abort();
        }
        keep
    });
    for (k, spec) in wanted {
        if tasks.contains_key(&k) {
            continue;
        }
        let t = tokio::spawn(check_loop(shared.clone(), k.0.clone(), k.1, spec.clone()));
        tasks.insert(k, (spec, t));
    }
    // Checks turned off: the backend counts as healthy.
    for (listener, addr) in unchecked {
        set(
            shared,
            &listener,
            addr,
            Health::Healthy,
            "health checks disabled",
        );
    }
}

fn set(shared: &Shared, listener: &str, addr: SocketAddrV4, h: Health, why: &str) {
    let changed = shared
        .lb
        .lock()
        .expect("balancer lock")
        .set_health(listener, addr, h);
    match changed {
        Ok(true) => {
            match h {
                Health::Healthy => {
                    info!(listener, backend = %addr, reason = why, "backend is healthy")
                }
                Health::Unhealthy => {
                    warn!(listener, backend = %addr, reason = why, "backend is unhealthy")
                }
            }
            shared.record_transition(listener, addr, h);
            shared.changed();
        }
        Ok(false) => {}
        // The backend or listener went away meanwhile: the next sync stops this task.
        Err(e) => warn!(listener, backend = %addr, "health update skipped: {e}"),
    }
}

/// A small xorshift generator for jitter (no need for cryptographic randomness).
struct Jitter(u64);

impl Jitter {
    fn new(seed: &str) -> Self {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let h = seed.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        Self((t ^ h) | 1)
    }
    /// Uniform in [0, 1).
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

async fn check_loop(
    shared: Arc<Shared>,
    listener: String,
    addr: SocketAddrV4,
    spec: HealthCheckSpec,
) {
    let target = SocketAddrV4::new(*addr.ip(), spec.port.unwrap_or(addr.port()));
    let interval = Duration::from_secs(u64::from(spec.interval));
    let timeout = Duration::from_secs(u64::from(spec.timeout));
    let mut jitter = Jitter::new(&format!("{listener}{addr}"));
    tokio::time::sleep(interval.mul_f64(jitter.next())).await;
    let (mut oks, mut fails) = (0u32, 0u32);
    loop {
        let result = check(&spec, target, timeout).await;
        match &result {
            Ok(()) => {
                oks += 1;
                fails = 0;
            }
            Err(_) => {
                fails += 1;
                oks = 0;
            }
        }
        let current = shared
            .lb
            .lock()
            .expect("balancer lock")
            .listeners()
            .get(&listener)
            .and_then(|l| l.backend(addr).map(|b| b.health));
        match (current, &result) {
            (Some(Health::Healthy), Err(e)) if fails >= spec.unhealthy_threshold => {
                let why = format!("{fails} consecutive failed checks, last: {e}");
                set(&shared, &listener, addr, Health::Unhealthy, &why);
            }
            (Some(Health::Unhealthy), Ok(())) if oks >= spec.healthy_threshold => {
                let why = format!("{oks} consecutive successful checks");
                set(&shared, &listener, addr, Health::Healthy, &why);
            }
            _ => {}
        }
        tokio::time::sleep(interval.mul_f64(0.9 + 0.2 * jitter.next())).await;
    }
}

/// One check: `Ok` if the backend passed.
pub async fn check(
    spec: &HealthCheckSpec,
    target: SocketAddrV4,
    timeout: Duration,
) -> Result<(), String> {
    let fut = async {
        let stream = TcpStream::connect(target)
            .await
            .map_err(|e| format!("connect {target}: {e}"))?;
        if spec.kind != CheckKind::Http {
            return Ok(());
        }
        let (lo, hi) = spec.status_range().map_err(|e| e.to_string())?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("http handshake: {e}"))?;
        let conn = tokio::spawn(conn);
        let req = hyper::Request::get(spec.path.as_str())
            .header(hyper::header::HOST, target.ip().to_string())
            .header(hyper::header::USER_AGENT, "clb-health-check")
            .header(hyper::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("GET {}: {e}", spec.path));
        conn.abort();
        let status = resp?.status().as_u16();
        if (lo..=hi).contains(&status) {
            Ok(())
        } else {
            Err(format!(
                "GET {} answered {status}, expected {lo}-{hi}",
                spec.path
            ))
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {}s", timeout.as_secs())),
    }
}
