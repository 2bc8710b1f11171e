//! Prometheus metrics at `/metrics` on an opt-in TCP address, encoded by `prometheus-client`
//! from a collector that reads, at scrape time, the controller's snapshot, the sweeper's
//! latest counts and the datapath's per-CPU counters — never the flow tables, never the
//! writer's lock, so a scrape costs the same with a million entries as with none.
//!
//! Prometheus asks for OpenMetrics (`Accept: application/openmetrics-text`) and gets it as
//! encoded; any other client (curl, promtool) gets the classic text format 0.0.4, which
//! differs only in naming counter families by their `_total` sample name and having no
//! `# EOF`.

use std::borrow::Cow;

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use clb_common::{TrafficCounters, counter};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
    registry::Registry,
};

use crate::{
    api::server::{Api, ApiResult, blocking, stats_view},
    api::types::StatsResponse,
    control::state::Health,
};

/// Serves `/metrics` on `l` until the daemon stops.
pub async fn serve(l: tokio::net::TcpListener, api: Api) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(handler))
        .with_state(api);
    axum::serve(l, app).await
}

async fn handler(State(api): State<Api>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let a = api.clone();
    match blocking(move || scrape(&a)).await {
        Ok(text) if openmetrics => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            to_prometheus_text(&text),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.1).into_response(),
    }
}

/// The OpenMetrics text of everything clb measures.
pub fn scrape(api: &Api) -> ApiResult<String> {
    let stats = stats_view(api)?;
    let snap = api.ctl.snapshot();
    let health: Vec<(String, String, bool, bool)> = snap
        .listeners
        .iter()
        .flat_map(|l| {
            l.backends.iter().map(|b| {
                (
                    l.spec.name.clone(),
                    b.spec.addr.to_string(),
                    b.health == Health::Healthy,
                    b.accepting,
                )
            })
        })
        .collect();
    let certs = snap
        .listeners
        .iter()
        .flat_map(|l| {
            l.certs.iter().map(|c| {
                (
                    l.spec.name.clone(),
                    c.name().to_owned(),
                    c.spec.cert.display().to_string(),
                    c.not_after,
                )
            })
        })
        .collect();
    let tables = api.ctl.reader().table_info().unwrap_or_default();
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape {
        stats,
        health,
        tables,
        certs,
        access_log: api.l7.access_log_counts(),
        interfaces: api.ctl.interfaces().all(),
    }));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).map_err(|e| {
        crate::api::server::ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    })?;
    Ok(out)
}

/// OpenMetrics text → Prometheus text 0.0.4: counter families are named by their `_total`
/// samples, and the `# EOF` marker goes.
pub fn to_prometheus_text(om: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for l in om.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ")
            && let Some(name) = rest.strip_suffix(" counter")
        {
            counters.insert(name.to_owned());
        }
    }
    let mut out = String::with_capacity(om.len());
    for l in om.lines() {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# TYPE ", "# HELP "].iter().find_map(|p| {
            let rest = l.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(l));
        out.push('\n');
    }
    out
}

/// One scrape's data, encoded on `encode`.
#[derive(Debug)]
struct Scrape {
    stats: StatsResponse,
    /// (listener, backend, healthy, accepting)
    health: Vec<(String, String, bool, bool)>,
    tables: [crate::datapath::TableInfo; 8],
    /// (listener, certificate name, file, not_after unix seconds)
    certs: Vec<(String, String, String, i64)>,
    /// The access log's (written, dropped), when there is one.
    access_log: Option<(u64, u64)>,
    interfaces: Vec<crate::control::status::InterfaceStatus>,
}

type Labels = Vec<(&'static str, Cow<'static, str>)>;

fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in samples {
        let mut f = m.encode_family(&labels)?;
        match kind {
            MetricType::Counter => f.encode_counter::<NoLabelSet, _, u64>(&v, None)?,
            _ => f.encode_gauge(&(v as i64))?,
        }
    }
    Ok(())
}

fn s(v: &str) -> Cow<'static, str> {
    Cow::Owned(v.to_owned())
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let st = &self.stats;
        type Get = fn(&TrafficCounters) -> u64;
        // (scope labels, counters, live counts) per listener, then per backend.
        let listeners: Vec<(Labels, &TrafficCounters, &crate::datapath::sweep::Live)> = st
            .listeners
            .iter()
            .map(|l| (vec![("listener", s(&l.name))], &l.counters, &l.live))
            .collect();
        let backends: Vec<(Labels, &TrafficCounters, &crate::datapath::sweep::Live)> = st
            .listeners
            .iter()
            .flat_map(|l| {
                l.backends.iter().map(|b| {
                    (
                        vec![
                            ("listener", s(&l.name)),
                            ("backend", s(&b.addr.to_string())),
                        ],
                        &b.counters,
                        &b.live,
                    )
                })
            })
            .collect();
        let directional: [(&str, &str, Get, Get); 2] = [
            (
                "packets",
                "Packets balanced, by direction (in: client to backend, out: backend to client).",
                |c| c.fwd_packets,
                |c| c.rev_packets,
            ),
            (
                "bytes",
                "IP bytes balanced, by direction.",
                |c| c.fwd_bytes,
                |c| c.rev_bytes,
            ),
        ];
        let plain: [(&str, &str, Get); 4] = [
            (
                "new_connections",
                "New flows scheduled (SYNs, new UDP flows, adopted mid-stream flows).",
                |c| c.new_conns,
            ),
            (
                "session_hits",
                "New flows decided by a live persistence entry.",
                |c| c.session_hits,
            ),
            (
                "sessions_written",
                "Persistence entries committed (new or rescheduled clients with a verified flow).",
                |c| c.session_new,
            ),
            (
                "resets",
                "TCP RSTs sent for packets of connections the balancer does not know.",
                |c| c.resets,
            ),
        ];
        type Live = fn(&crate::datapath::sweep::Live) -> u64;
        let gauges: [(&str, &str, Live); 3] = [
            (
                "current_connections",
                "Live connection-table entries (verified flows) at the last sweep.",
                |l| l.conns,
            ),
            (
                "half_open_connections",
                "Live half-open entries (unverified flows) at the last sweep.",
                |l| l.half_open,
            ),
            (
                "persisted_clients",
                "Live persistence entries at the last sweep.",
                |l| l.sessions,
            ),
        ];
        for (scope, rows) in [("listener", &listeners), ("backend", &backends)] {
            for (what, help, fwd, rev) in &directional {
                family(
                    &mut enc,
                    &format!("clb_{scope}_{what}"),
                    help,
                    MetricType::Counter,
                    rows.iter().flat_map(|(labels, c, _)| {
                        [("in", fwd), ("out", rev)].map(|(dir, get)| {
                            let mut l = labels.clone();
                            l.push(("direction", Cow::Borrowed(dir)));
                            (l, get(c))
                        })
                    }),
                )?;
            }
            for (what, help, get) in &plain {
                family(
                    &mut enc,
                    &format!("clb_{scope}_{what}"),
                    help,
                    MetricType::Counter,
                    rows.iter().map(|(labels, c, _)| (labels.clone(), get(c))),
                )?;
            }
            for (what, help, get) in &gauges {
                family(
                    &mut enc,
                    &format!("clb_{scope}_{what}"),
                    help,
                    MetricType::Gauge,
                    rows.iter()
                        .map(|(labels, _, live)| (labels.clone(), get(live))),
                )?;
            }
        }
        let hl = |l: &str, b: &str| vec![("listener", s(l)), ("backend", s(b))];
        family(
            &mut enc,
            "clb_backend_up",
            "1 if the backend passes its health checks.",
            MetricType::Gauge,
            self.health
                .iter()
                .map(|(l, b, up, _)| (hl(l, b), u64::from(*up))),
        )?;
        family(
            &mut enc,
            "clb_backend_active_connections",
            "Active connections now: L4, verified flows in the open state (what least connections compares); HTTP, requests in flight.",
            MetricType::Gauge,
            st.listeners.iter().flat_map(|l| {
                l.backends
                    .iter()
                    .map(|b| (hl(&l.name, &b.addr.to_string()), b.active))
            }),
        )?;
        family(
            &mut enc,
            "clb_backend_accepting",
            "1 if the backend takes new connections (weight > 0, not draining, healthy or all unhealthy).",
            MetricType::Gauge,
            self.health
                .iter()
                .map(|(l, b, _, a)| (hl(l, b), u64::from(*a))),
        )?;
        family(
            &mut enc,
            "clb_datapath_verdicts",
            "XDP verdicts of the balancer program.",
            MetricType::Counter,
            st.counters.iter().filter_map(|(name, v)| {
                let verdict = name.strip_prefix("verdict_")?;
                Some((vec![("verdict", s(verdict))], *v))
            }),
        )?;
        family(
            &mut enc,
            "clb_datapath_drops",
            "Packets dropped by the datapath, by reason.",
            MetricType::Counter,
            counter::NAMES.iter().enumerate().filter_map(|(i, name)| {
                let reason = name.strip_prefix("drop_")?;
                counter::is_drop_reason(i as u32).then(|| {
                    (
                        vec![("reason", s(reason))],
                        st.counters.get(*name).copied().unwrap_or(0),
                    )
                })
            }),
        )?;
        family(
            &mut enc,
            "clb_datapath_events",
            "Datapath events: packets handed to the kernel stack and why, RSTs sent, half-open promotions, flood-mode work.",
            MetricType::Counter,
            st.counters
                .iter()
                .filter(|(name, _)| !name.starts_with("verdict_") && !name.starts_with("drop_"))
                .map(|(name, v)| (vec![("event", s(name))], *v)),
        )?;
        family(
            &mut enc,
            "clb_flood_mode",
            "1 while flood mode is on (new TCP flows placed by the stateless hash).",
            MetricType::Gauge,
            [(vec![], u64::from(st.flood.active))],
        )?;
        family(
            &mut enc,
            "clb_flood_mode_entered",
            "Times a CPU switched flood mode on.",
            MetricType::Counter,
            [(vec![], st.flood.entered)],
        )?;
        family(
            &mut enc,
            "clb_flood_mode_transitions",
            "Flood-mode transitions the daemon observed, by direction.",
            MetricType::Counter,
            [
                ("on", st.flood.transitions_on),
                ("off", st.flood.transitions_off),
            ]
            .map(|(to, v)| (vec![("to", Cow::Borrowed(to))], v)),
        )?;
        family(
            &mut enc,
            "clb_half_open_evictions",
            "Live half-open entries pushed out by new flows (each switches flood mode on).",
            MetricType::Counter,
            [(vec![], st.flood.half_open_evictions)],
        )?;
        family(
            &mut enc,
            "clb_pending_evictions",
            "Live pending-persistence entries pushed out by new clients.",
            MetricType::Counter,
            [(vec![], st.flood.pending_evictions)],
        )?;
        let names = crate::datapath::TABLE_NAMES;
        family(
            &mut enc,
            "clb_table_capacity",
            "Entries a flow table holds.",
            MetricType::Gauge,
            names
                .iter()
                .zip(&self.tables)
                .map(|(n, t)| (vec![("table", Cow::Borrowed(*n))], u64::from(t.capacity))),
        )?;
        family(
            &mut enc,
            "clb_table_memory_bytes",
            "Kernel memory charged to a flow table.",
            MetricType::Gauge,
            names
                .iter()
                .zip(&self.tables)
                .map(|(n, t)| (vec![("table", Cow::Borrowed(*n))], t.memory_bytes)),
        )?;
        family(
            &mut enc,
            "clb_http_requests",
            "HTTP requests proxied, by backend.",
            MetricType::Counter,
            st.http.iter().flat_map(|l| {
                l.backends
                    .iter()
                    .map(|b| (hl(&l.name, &b.addr.to_string()), b.requests))
            }),
        )?;
        family(
            &mut enc,
            "clb_http_responses",
            "HTTP responses sent to clients, by status class.",
            MetricType::Counter,
            st.http.iter().flat_map(|l| {
                [
                    ("2xx", l.responses_2xx),
                    ("3xx", l.responses_3xx),
                    ("4xx", l.responses_4xx),
                    ("5xx", l.responses_5xx),
                ]
                .map(|(class, v)| {
                    (
                        vec![("listener", s(&l.name)), ("class", Cow::Borrowed(class))],
                        v,
                    )
                })
            }),
        )?;
        type HttpGet = fn(&crate::l7::L7ListenerStats) -> u64;
        let http: [(&str, &str, HttpGet); 6] = [
            (
                "clb_http_connections",
                "Client connections accepted.",
                |l| l.connections,
            ),
            (
                "clb_http_cookies_set",
                "Responses that set a persistence cookie.",
                |l| l.cookies_set,
            ),
            (
                "clb_http_cookie_hits",
                "Requests routed by a valid persistence cookie.",
                |l| l.cookie_hits,
            ),
            (
                "clb_http_upstream_errors",
                "Requests whose backend could not be reached or did not answer in time (502/504).",
                |l| l.upstream_errors,
            ),
            (
                "clb_http_client_errors",
                "Requests refused for the client's framing or headers (400, 413, 431).",
                |l| l.client_errors,
            ),
            (
                "clb_http_refused_connections",
                "Client connections refused at the connection cap (503).",
                |l| l.refused_connections,
            ),
        ];
        let http_more: [(&str, &str, HttpGet); 4] = [
            (
                "clb_http_upgrades",
                "Upgraded connections (WebSocket and other HTTP/1.1 upgrades) passed through.",
                |l| l.upgrades,
            ),
            (
                "clb_http_h2_connections",
                "Client connections that negotiated HTTP/2 (ALPN h2).",
                |l| l.h2_connections,
            ),
            (
                "clb_tls_handshakes",
                "TLS handshakes completed (full and resumed).",
                |l| l.tls_handshakes,
            ),
            (
                "clb_tls_resumed_handshakes",
                "TLS handshakes that resumed a session (ticket or cache).",
                |l| l.tls_resumed,
            ),
        ];
        for (name, help, get) in http.into_iter().chain(http_more) {
            family(
                &mut enc,
                name,
                help,
                MetricType::Counter,
                st.http
                    .iter()
                    .map(|l| (vec![("listener", s(&l.name))], get(l))),
            )?;
        }
        family(
            &mut enc,
            "clb_tls_handshake_failures",
            "TLS handshakes that failed, by reason: timeout (not finished within 5 s), closed (by the client), protocol (not TLS, or nothing in common).",
            MetricType::Counter,
            st.http.iter().flat_map(|l| {
                l.tls_failures
                    .iter()
                    .map(|(why, n)| (vec![("listener", s(&l.name)), ("reason", s(why))], *n))
            }),
        )?;
        family(
            &mut enc,
            "clb_tls_certificate_expiry_timestamp_seconds",
            "When each loaded certificate of an HTTPS listener expires (its notAfter), unix seconds.",
            MetricType::Gauge,
            self.certs.iter().map(|(l, name, file, until)| {
                (
                    vec![
                        ("listener", s(l)),
                        ("certificate", s(name)),
                        ("file", s(file)),
                    ],
                    (*until).max(0) as u64,
                )
            }),
        )?;
        {
            let mut m = enc.encode_descriptor(
                "clb_http_request_duration_seconds",
                "Time from a request's head to its response's head (backend time included), seconds.",
                None,
                MetricType::Histogram,
            )?;
            for l in &st.http {
                if l.latency_buckets.len() != crate::l7::proxy::LATENCY_BUCKETS.len() + 1 {
                    continue;
                }
                let buckets: Vec<(f64, u64)> = crate::l7::proxy::LATENCY_BUCKETS
                    .iter()
                    .copied()
                    .chain([f64::MAX])
                    .zip(l.latency_buckets.iter().copied())
                    .collect();
                let count = l.latency_buckets.iter().sum();
                let labels: Labels = vec![("listener", s(&l.name))];
                m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                    l.latency_sum_us as f64 / 1e6,
                    count,
                    &buckets,
                    None,
                )?;
            }
        }
        if let Some((written, dropped)) = self.access_log {
            family(
                &mut enc,
                "clb_http_access_log_entries",
                "Access-log entries, by outcome: written, or dropped because the writer fell behind (the request never waits for it).",
                MetricType::Counter,
                [("written", written), ("dropped", dropped)]
                    .map(|(o, v)| (vec![("outcome", Cow::Borrowed(o))], v)),
            )?;
        }
        family(
            &mut enc,
            "clb_interface_attached",
            "1 while the datapath runs on the interface; 0 while it is missing (deleted: attached again when it is re-created) or attaching fails.",
            MetricType::Gauge,
            self.interfaces.iter().map(|i| {
                (
                    vec![("iface", s(&i.name))],
                    u64::from(i.state == crate::control::status::InterfaceState::Attached),
                )
            }),
        )?;
        family(
            &mut enc,
            "clb_interface_reattached",
            "Times the datapath was attached again to a re-created interface.",
            MetricType::Counter,
            self.interfaces
                .iter()
                .map(|i| (vec![("iface", s(&i.name))], i.reattached)),
        )?;
        family(
            &mut enc,
            "clb_build_info",
            "The running clb: its version (and commit) as a label; always 1.",
            MetricType::Gauge,
            [(vec![("version", Cow::Borrowed(crate::version()))], 1)],
        )?;
        family(
            &mut enc,
            "clb_sweeper_runs",
            "Sweeps of the flow tables.",
            MetricType::Counter,
            [(vec![], st.sweeper.runs)],
        )?;
        family(
            &mut enc,
            "clb_sweeper_removed",
            "Expired entries removed by the sweeper.",
            MetricType::Counter,
            [
                ("connections", st.sweeper.conns_removed_total),
                ("half_open", st.sweeper.half_open_removed_total),
                ("sessions", st.sweeper.sessions_removed_total),
                ("pending_sessions", st.sweeper.pending_removed_total),
            ]
            .map(|(t, v)| (vec![("table", Cow::Borrowed(t))], v)),
        )?;
        family(
            &mut enc,
            "clb_health_transitions",
            "Backend health changes.",
            MetricType::Counter,
            st.health_transitions.iter().map(|t| {
                let mut l = hl(&t.listener, &t.backend.to_string());
                l.push((
                    "to",
                    Cow::Borrowed(match t.to {
                        Health::Healthy => "healthy",
                        Health::Unhealthy => "unhealthy",
                    }),
                ));
                (l, t.count)
            }),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_becomes_classic_text() {
        let om = "# HELP a_b A b.\n# TYPE a_b counter\na_b_total{x=\"1\"} 3\n# HELP g G.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_b_total A b.\n# TYPE a_b_total counter\na_b_total{x=\"1\"} 3\n# HELP g G.\n# TYPE g gauge\ng 1\n"
        );
    }
}
