//! Prometheus text exposition (format 0.0.4) of the daemon's counters, served on an opt-in
//! TCP address at `/metrics`.

use std::{fmt::Write as _, sync::Arc};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use clb_common::counter;

use crate::{api::StatsResponse, balancer::Health, daemon::Shared};

/// Serves `/metrics` until the daemon stops.
pub async fn serve(l: tokio::net::TcpListener, shared: Arc<Shared>) {
    let app = Router::new()
        .route("/metrics", get(handler))
        .with_state(shared);
    if let Err(e) = axum::serve(l, app).await {
        tracing::error!("metrics server stopped: {e}");
    }
}

async fn handler(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let sh = s.clone();
    let res = tokio::task::spawn_blocking(move || {
        let lb = sh.lb.lock().expect("balancer lock");
        let stats = lb.stats()?;
        let health: Vec<(String, String, bool, bool)> = lb
            .listeners()
            .values()
            .flat_map(|l| {
                let acc = l.accepting();
                l.backends
                    .iter()
                    .zip(acc)
                    .map(|(b, a)| {
                        (
                            l.spec.name.clone(),
                            b.spec.addr.to_string(),
                            b.health == Health::Healthy,
                            a,
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        Ok::<_, crate::balancer::BalancerError>((stats, health))
    })
    .await;
    match res {
        Ok(Ok((stats, health))) => {
            let full = s.stats_response(stats).await;
            (
                [(
                    header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                render(&full, &health),
            )
                .into_response()
        }
        Ok(Err(e)) => {
            (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
        Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Escapes a label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        writeln!(self.out, "# HELP {name} {help}").ok();
        writeln!(self.out, "# TYPE {name} {kind}").ok();
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: u64) {
        let l: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", esc(v)))
            .collect();
        if l.is_empty() {
            writeln!(self.out, "{name} {v}").ok();
        } else {
            writeln!(self.out, "{name}{{{}}} {v}", l.join(",")).ok();
        }
    }
}

/// The exposition text. `health`: (listener, backend, healthy, accepting).
pub fn render(s: &StatsResponse, health: &[(String, String, bool, bool)]) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out };

    f.head(
        "clb_listener_packets_total",
        "counter",
        "Packets balanced, by direction (in: client to backend, out: backend to client).",
    );
    for l in &s.stats.listeners {
        f.sample(
            "clb_listener_packets_total",
            &[("listener", &l.name), ("direction", "in")],
            l.counters.fwd_packets,
        );
        f.sample(
            "clb_listener_packets_total",
            &[("listener", &l.name), ("direction", "out")],
            l.counters.rev_packets,
        );
    }
    f.head(
        "clb_listener_bytes_total",
        "counter",
        "IP bytes balanced, by direction.",
    );
    for l in &s.stats.listeners {
        f.sample(
            "clb_listener_bytes_total",
            &[("listener", &l.name), ("direction", "in")],
            l.counters.fwd_bytes,
        );
        f.sample(
            "clb_listener_bytes_total",
            &[("listener", &l.name), ("direction", "out")],
            l.counters.rev_bytes,
        );
    }
    f.head(
        "clb_listener_new_connections_total",
        "counter",
        "Connection-table entries created (new flows).",
    );
    for l in &s.stats.listeners {
        f.sample(
            "clb_listener_new_connections_total",
            &[("listener", &l.name)],
            l.counters.new_conns,
        );
    }
    f.head(
        "clb_listener_resets_total",
        "counter",
        "TCP RSTs sent for packets of connections the balancer does not know.",
    );
    for l in &s.stats.listeners {
        f.sample(
            "clb_listener_resets_total",
            &[("listener", &l.name)],
            l.counters.resets,
        );
    }
    f.head(
        "clb_listener_current_connections",
        "gauge",
        "Live connection-table entries.",
    );
    for l in &s.stats.listeners {
        f.sample(
            "clb_listener_current_connections",
            &[("listener", &l.name)],
            l.current_conns,
        );
    }
    f.head(
        "clb_listener_persisted_clients",
        "gauge",
        "Live persistence entries.",
    );
    for l in &s.stats.listeners {
        f.sample(
            "clb_listener_persisted_clients",
            &[("listener", &l.name)],
            l.persisted_clients,
        );
    }

    f.head(
        "clb_backend_packets_total",
        "counter",
        "Packets to (in) and from (out) a backend.",
    );
    for l in &s.stats.listeners {
        for b in &l.backends {
            let a = b.addr.to_string();
            f.sample(
                "clb_backend_packets_total",
                &[("listener", &l.name), ("backend", &a), ("direction", "in")],
                b.counters.fwd_packets,
            );
            f.sample(
                "clb_backend_packets_total",
                &[("listener", &l.name), ("backend", &a), ("direction", "out")],
                b.counters.rev_packets,
            );
        }
    }
    f.head(
        "clb_backend_bytes_total",
        "counter",
        "IP bytes to (in) and from (out) a backend.",
    );
    for l in &s.stats.listeners {
        for b in &l.backends {
            let a = b.addr.to_string();
            f.sample(
                "clb_backend_bytes_total",
                &[("listener", &l.name), ("backend", &a), ("direction", "in")],
                b.counters.fwd_bytes,
            );
            f.sample(
                "clb_backend_bytes_total",
                &[("listener", &l.name), ("backend", &a), ("direction", "out")],
                b.counters.rev_bytes,
            );
        }
    }
    f.head(
        "clb_backend_new_connections_total",
        "counter",
        "New connections sent to a backend.",
    );
    for l in &s.stats.listeners {
        for b in &l.backends {
            f.sample(
                "clb_backend_new_connections_total",
                &[("listener", &l.name), ("backend", &b.addr.to_string())],
                b.counters.new_conns,
            );
        }
    }
    f.head(
        "clb_backend_session_hits_total",
        "counter",
        "New connections sent to a backend by a live persistence entry.",
    );
    for l in &s.stats.listeners {
        for b in &l.backends {
            f.sample(
                "clb_backend_session_hits_total",
                &[("listener", &l.name), ("backend", &b.addr.to_string())],
                b.counters.session_hits,
            );
        }
    }
    f.head(
        "clb_backend_current_connections",
        "gauge",
        "Live connection-table entries naming a backend.",
    );
    for l in &s.stats.listeners {
        for b in &l.backends {
            f.sample(
                "clb_backend_current_connections",
                &[("listener", &l.name), ("backend", &b.addr.to_string())],
                b.current_conns,
            );
        }
    }
    f.head(
        "clb_backend_persisted_clients",
        "gauge",
        "Live persistence entries naming a backend.",
    );
    for l in &s.stats.listeners {
        for b in &l.backends {
            f.sample(
                "clb_backend_persisted_clients",
                &[("listener", &l.name), ("backend", &b.addr.to_string())],
                b.persisted_clients,
            );
        }
    }
    f.head(
        "clb_backend_up",
        "gauge",
        "1 if the backend passes its health checks.",
    );
    for (l, b, up, _) in health {
        f.sample(
            "clb_backend_up",
            &[("listener", l), ("backend", b)],
            u64::from(*up),
        );
    }
    f.head("clb_backend_accepting", "gauge", "1 if the backend takes new connections (weight > 0, not draining, healthy or all unhealthy).");
    for (l, b, _, acc) in health {
        f.sample(
            "clb_backend_accepting",
            &[("listener", l), ("backend", b)],
            u64::from(*acc),
        );
    }

    f.head(
        "clb_datapath_verdicts_total",
        "counter",
        "XDP verdicts of the balancer program.",
    );
    for (name, v) in &s.stats.counters {
        if let Some(verdict) = name.strip_prefix("verdict_") {
            f.sample("clb_datapath_verdicts_total", &[("verdict", verdict)], *v);
        }
    }
    f.head(
        "clb_datapath_drops_total",
        "counter",
        "Packets dropped by the datapath, by reason.",
    );
    for (i, name) in counter::NAMES.iter().enumerate() {
        if counter::is_drop_reason(i as u32)
            && let Some(reason) = name.strip_prefix("drop_")
        {
            f.sample(
                "clb_datapath_drops_total",
                &[("reason", reason)],
                s.stats.counters.get(*name).copied().unwrap_or(0),
            );
        }
    }
    f.head("clb_datapath_events_total", "counter", "Datapath events: packets handed to the kernel stack and why, RSTs sent, replies without a connection.");
    for (name, v) in &s.stats.counters {
        if !name.starts_with("verdict_") && !name.starts_with("drop_") {
            f.sample("clb_datapath_events_total", &[("event", name)], *v);
        }
    }

    f.head(
        "clb_sweeper_runs_total",
        "counter",
        "Sweeps of the connection and persistence tables.",
    );
    f.sample("clb_sweeper_runs_total", &[], s.sweeper.runs);
    f.head(
        "clb_sweeper_removed_total",
        "counter",
        "Expired entries removed by the sweeper.",
    );
    f.sample(
        "clb_sweeper_removed_total",
        &[("table", "connections")],
        s.sweeper.conns_removed_total,
    );
    f.sample(
        "clb_sweeper_removed_total",
        &[("table", "sessions")],
        s.sweeper.sessions_removed_total,
    );
    f.head(
        "clb_health_transitions_total",
        "counter",
        "Backend health changes.",
    );
    for t in &s.health_transitions {
        let to = match t.to {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        };
        f.sample(
            "clb_health_transitions_total",
            &[
                ("listener", &t.listener),
                ("backend", &t.backend.to_string()),
                ("to", to),
            ],
            t.count,
        );
    }
    out
}
