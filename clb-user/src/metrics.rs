//! Prometheus text exposition (format 0.0.4) of the daemon's counters, served on an opt-in
//! TCP address at `/metrics`.

use std::{fmt::Write as _, sync::Arc};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use clb_common::{TrafficCounters, counter};

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
    // Per listener and per backend families share their shape: a name, a type, a help text
    // and how to read the value from (counters, live connections, live sessions).
    type Get = fn(&TrafficCounters, u64, u64) -> u64;
    let directional: [(&str, &str, Get, Get); 2] = [
        (
            "packets",
            "Packets balanced, by direction (in: client to backend, out: backend to client).",
            |c, _, _| c.fwd_packets,
            |c, _, _| c.rev_packets,
        ),
        (
            "bytes",
            "IP bytes balanced, by direction.",
            |c, _, _| c.fwd_bytes,
            |c, _, _| c.rev_bytes,
        ),
    ];
    let plain: [(&str, &str, &str, Get); 6] = [
        (
            "new_connections_total",
            "counter",
            "Connection-table entries created (new flows).",
            |c, _, _| c.new_conns,
        ),
        (
            "session_hits_total",
            "counter",
            "New connections decided by a live persistence entry.",
            |c, _, _| c.session_hits,
        ),
        (
            "sessions_written_total",
            "counter",
            "Persistence entries written (new or rescheduled clients).",
            |c, _, _| c.session_new,
        ),
        (
            "resets_total",
            "counter",
            "TCP RSTs sent for packets of connections the balancer does not know.",
            |c, _, _| c.resets,
        ),
        (
            "current_connections",
            "gauge",
            "Live connection-table entries.",
            |_, conns, _| conns,
        ),
        (
            "persisted_clients",
            "gauge",
            "Live persistence entries.",
            |_, _, sessions| sessions,
        ),
    ];
    type Row<'a> = (Vec<(&'static str, String)>, &'a TrafficCounters, u64, u64);
    let listeners: Vec<Row> = s
        .stats
        .listeners
        .iter()
        .map(|l| {
            (
                vec![("listener", l.name.clone())],
                &l.counters,
                l.current_conns,
                l.persisted_clients,
            )
        })
        .collect();
    let backends: Vec<Row> = s
        .stats
        .listeners
        .iter()
        .flat_map(|l| {
            l.backends.iter().map(|b| {
                (
                    vec![
                        ("listener", l.name.clone()),
                        ("backend", b.addr.to_string()),
                    ],
                    &b.counters,
                    b.current_conns,
                    b.persisted_clients,
                )
            })
        })
        .collect();
    for (scope, rows) in [("listener", &listeners), ("backend", &backends)] {
        for (what, help, fwd, rev) in &directional {
            let name = format!("clb_{scope}_{what}_total");
            f.head(&name, "counter", help);
            for (labels, c, conns, sess) in rows.iter() {
                for (dir, get) in [("in", fwd), ("out", rev)] {
                    let mut l: Vec<(&str, &str)> =
                        labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                    l.push(("direction", dir));
                    f.sample(&name, &l, get(c, *conns, *sess));
                }
            }
        }
        for (what, kind, help, get) in &plain {
            let name = format!("clb_{scope}_{what}");
            f.head(&name, kind, help);
            for (labels, c, conns, sess) in rows.iter() {
                let l: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                f.sample(&name, &l, get(c, *conns, *sess));
            }
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
        "clb_http_requests_total",
        "counter",
        "HTTP requests proxied, by backend.",
    );
    for l in &s.http {
        for b in &l.backends {
            f.sample(
                "clb_http_requests_total",
                &[("listener", &l.name), ("backend", &b.addr.to_string())],
                b.requests,
            );
        }
    }
    f.head(
        "clb_http_responses_total",
        "counter",
        "HTTP responses sent to clients, by status class.",
    );
    for l in &s.http {
        for (class, v) in [
            ("2xx", l.responses_2xx),
            ("3xx", l.responses_3xx),
            ("4xx", l.responses_4xx),
            ("5xx", l.responses_5xx),
        ] {
            f.sample(
                "clb_http_responses_total",
                &[("listener", &l.name), ("class", class)],
                v,
            );
        }
    }
    type HttpGet = fn(&crate::l7::L7ListenerStats) -> u64;
    let http: [(&str, &str, HttpGet); 4] = [
        (
            "clb_http_connections_total",
            "Client connections accepted.",
            |l| l.connections,
        ),
        (
            "clb_http_cookies_set_total",
            "Responses that set a persistence cookie.",
            |l| l.cookies_set,
        ),
        (
            "clb_http_cookie_hits_total",
            "Requests routed by a valid persistence cookie.",
            |l| l.cookie_hits,
        ),
        (
            "clb_http_upstream_errors_total",
            "Requests whose backend could not be reached (502).",
            |l| l.upstream_errors,
        ),
    ];
    for (name, help, get) in http {
        f.head(name, "counter", help);
        for l in &s.http {
            f.sample(name, &[("listener", &l.name)], get(l));
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
