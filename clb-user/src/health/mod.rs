//! Health checks: one task per (listener, backend), TCP connect or HTTP GET, every `interval`
//! seconds with ±10 % jitter (first check at a random point of the first interval), a
//! `timeout` per check, and `healthy_threshold` / `unhealthy_threshold` consecutive results to
//! change state. A change reprograms the listener (the backend leaves or rejoins the schedule;
//! its persisted clients are rescheduled on their next connection; its established flows are
//! left alone) and is logged. Checks read the controller's snapshot and report transitions
//! through it; they never hold a lock while they wait.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, task::JoinHandle};
use tracing::{info, warn};

use crate::control::{
    Controller,
    model::{CheckKind, Forward, HealthCheckSpec},
    state::Health,
};

type Key = (String, SocketAddr);

/// How often [`warm_neighbours`] touches DSR backends.
pub const NEIGHBOUR_EVERY: Duration = Duration::from_secs(5);

/// Keeps the kernel's neighbour (ARP, NDP) entries of DSR backends resolved: the datapath
/// sends a DSR packet to the backend's MAC from the neighbour table, and, unlike a NATed
/// packet, cannot hand it to the stack to resolve (the stack would deliver it locally, to the
/// VIP). An empty datagram to each DSR backend's discard port (9) makes the kernel resolve it:
/// at once after every configuration change (a backend just added is reachable before its
/// first health check) and every few seconds after.
pub async fn warm_neighbours(ctl: Arc<Controller>) -> anyhow::Result<()> {
    let v4 = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
    // A host without IPv6 has no IPv6 backends either.
    let v6 = tokio::net::UdpSocket::bind("[::]:0").await.ok();
    let mut changes = ctl.subscribe();
    loop {
        let snap = ctl.snapshot();
        let mut addrs: Vec<std::net::IpAddr> = snap
            .listeners
            .iter()
            .filter(|l| l.spec.l4().is_some_and(|k| k.forward == Forward::Dsr))
            .flat_map(|l| l.backends.iter().map(|b| b.spec.addr.ip()))
            .collect();
        addrs.sort_unstable();
        addrs.dedup();
        for a in addrs {
            let sock = match a {
                std::net::IpAddr::V4(_) => Some(&v4),
                std::net::IpAddr::V6(_) => v6.as_ref(),
            };
            // A failure (no route yet) shows as the datapath's no-next-hop drops; retried.
            if let Some(sock) = sock
                && let Err(e) = sock.send_to(&[], (a, 9)).await
            {
                tracing::debug!(backend = %a, "neighbour probe: {e}");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(NEIGHBOUR_EVERY) => {}
            r = changes.changed() => {
                if r.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// Runs until the daemon stops: keeps one check task per checked backend, in line with the
/// configuration after every change.
pub async fn run(ctl: Arc<Controller>) {
    let mut rx = ctl.subscribe();
    let mut tasks = Tasks(HashMap::new());
    loop {
        sync(&ctl, &mut tasks.0).await;
        if rx.changed().await.is_err() {
            break;
        }
    }
}

/// The check tasks, aborted when the manager ends (or is restarted by its supervisor).
struct Tasks(HashMap<Key, (HealthCheckSpec, JoinHandle<()>)>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for (_, (_, t)) in self.0.drain() {
            t.abort();
        }
    }
}

async fn sync(ctl: &Arc<Controller>, tasks: &mut HashMap<Key, (HealthCheckSpec, JoinHandle<()>)>) {
    let snap = ctl.snapshot();
    let mut wanted: HashMap<Key, HealthCheckSpec> = HashMap::new();
    let mut unchecked: Vec<Key> = Vec::new();
    for l in &snap.listeners {
        for b in &l.backends {
            let key = (l.spec.name.clone(), b.spec.addr);
            if !b.spec.state.is_ready() {
                // In maintenance: not checked (its task ends; back in service, it starts again).
                continue;
            }
            if l.spec.health_check.kind == CheckKind::None {
                if b.health != Health::Healthy {
                    unchecked.push(key);
                }
            } else {
                wanted.insert(key, l.spec.health_check.clone());
            }
        }
    }
    tasks.retain(|k, (spec, t)| {
        let keep = wanted.get(k) == Some(spec) && !t.is_finished();
        if !keep {
            t.abort();
        }
        keep
    });
    for (k, spec) in wanted {
        if tasks.contains_key(&k) {
            continue;
        }
        let t = tokio::spawn(check_loop(ctl.clone(), k.0.clone(), k.1, spec.clone()));
        tasks.insert(k, (spec, t));
    }
    // Checks turned off: the backend counts as healthy.
    for (listener, addr) in unchecked {
        set(
            ctl,
            &listener,
            addr,
            Health::Healthy,
            "health checks disabled",
        )
        .await;
    }
}

async fn set(ctl: &Arc<Controller>, listener: &str, addr: SocketAddr, h: Health, why: &str) {
    let (c, l) = (ctl.clone(), listener.to_owned());
    let changed = tokio::task::spawn_blocking(move || c.set_health(&l, addr, h)).await;
    match changed {
        Ok(Ok(true)) => match h {
            Health::Healthy => info!(listener, backend = %addr, reason = why, "backend is healthy"),
            Health::Unhealthy => {
                warn!(listener, backend = %addr, reason = why, "backend is unhealthy")
            }
        },
        Ok(Ok(false)) => {}
        // The backend or listener went away meanwhile: the next sync stops this task.
        Ok(Err(e)) => warn!(listener, backend = %addr, "health update skipped: {e}"),
        Err(e) => warn!(listener, backend = %addr, "health update task failed: {e}"),
    }
}

async fn check_loop(
    ctl: Arc<Controller>,
    listener: String,
    addr: SocketAddr,
    spec: HealthCheckSpec,
) {
    let target = SocketAddr::new(addr.ip(), spec.port.unwrap_or(addr.port()));
    let interval = Duration::from_secs(u64::from(spec.interval));
    let timeout = Duration::from_secs(u64::from(spec.timeout));
    // First check at a random point of the first interval, then every interval ± 10 %.
    tokio::time::sleep(interval.mul_f64(fastrand::f64())).await;
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
        let current = ctl
            .snapshot()
            .listener(&listener)
            .and_then(|l| l.backend(addr).map(|b| b.health));
        match (current, &result) {
            (Some(Health::Healthy), Err(e)) if fails >= spec.unhealthy_threshold => {
                let why = format!("{fails} consecutive failed checks, last: {e}");
                set(&ctl, &listener, addr, Health::Unhealthy, &why).await;
            }
            (Some(Health::Unhealthy), Ok(())) if oks >= spec.healthy_threshold => {
                let why = format!("{oks} consecutive successful checks");
                set(&ctl, &listener, addr, Health::Healthy, &why).await;
            }
            _ => {}
        }
        tokio::time::sleep(interval.mul_f64(0.9 + 0.2 * fastrand::f64())).await;
    }
}

/// One check: `Ok` if the backend passed.
pub async fn check(
    spec: &HealthCheckSpec,
    target: SocketAddr,
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
            .header(hyper::header::HOST, host_header(target.ip()))
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

/// The `Host` of a health check to `ip`: an IPv6 address in brackets (RFC 9110 §7.2, RFC 3986
/// §3.2.2), so that a backend parsing it does not take its last group for a port.
fn host_header(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V6(a) => format!("[{a}]"),
        a => a.to_string(),
    }
}

#[cfg(test)]
mod host_tests {
    #[test]
    fn ipv6_hosts_are_bracketed() {
        assert_eq!(super::host_header("10.0.0.1".parse().unwrap()), "10.0.0.1");
        assert_eq!(
            super::host_header("2001:db8::1".parse().unwrap()),
            "[2001:db8::1]"
        );
    }
}
