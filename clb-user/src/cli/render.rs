//! Plain-text rendering of API answers: aligned tables, `ipvsadm -Ln`-like listener listings.

use std::fmt::Write as _;

use crate::{
    api::types::{BackendView, ConnView, ListenerView, SessionView, StatsResponse, Status},
    control::{
        model::Proto,
        status::{InterfaceState, LoopState},
    },
};

/// A plain-text table with aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = w[i]))
            .collect();
        writeln!(out, "{}", s.join("  ").trim_end()).ok();
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn secs(s: u32) -> String {
    if s == 0 {
        "off".into()
    } else {
        format!("{s}s")
    }
}

/// A line per listener, an arrow line per backend.
pub fn listeners(v: &[ListenerView]) -> String {
    let mut out = String::new();
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|l| {
            let sched = match (l.sched, l.forward) {
                (Some(s), Some(f)) => format!("{s}/{f}"),
                (Some(s), None) => s.to_string(),
                _ => "wrr".into(),
            };
            let persist = match (l.persist, l.persist_mask) {
                (0, _) => "off".into(),
                (p, Some(m)) if m < 32 => format!("{p}s /{m}"),
                (p, _) => secs(p),
            };
            vec![
                l.proto.to_string(),
                l.vip.to_string(),
                l.name.clone(),
                sched,
                persist,
                match l.proto {
                    Proto::Http | Proto::Https => {
                        format!("keepalive {}s", l.keepalive_timeout.unwrap_or(0))
                    }
                    _ => format!("{}s", l.idle_timeout.unwrap_or(0)),
                },
                l.health_summary(),
            ]
        })
        .collect();
    let t = table(
        &[
            "PROTO",
            "VIP",
            "NAME",
            "SCHED",
            "PERSIST",
            "IDLE",
            "HEALTH-CHECK",
        ],
        &rows,
    );
    let mut lines = t.lines();
    if let Some(h) = lines.next() {
        writeln!(out, "{h}").ok();
        writeln!(out, "  -> BACKEND                WEIGHT").ok();
    }
    for (line, l) in lines.zip(v) {
        let mut notes = Vec::new();
        if l.all_backends_unhealthy {
            notes.push("[all backends unhealthy: sending to all]".to_string());
        }
        if let Some(s) = &l.serving
            && s != "serving"
        {
            notes.push(format!("[not serving: {s}]"));
        }
        writeln!(
            out,
            "{line}{}",
            notes.iter().map(|n| format!("  {n}")).collect::<String>()
        )
        .ok();
        for b in &l.backends {
            writeln!(out, "  -> {:<22} {}", b.addr.to_string(), b.weight).ok();
        }
        for c in &l.certificates {
            match (&c.name, c.not_after) {
                (Some(name), Some(until)) => {
                    let mut names = c.names.join(", ");
                    if names.len() > 60 {
                        names.truncate(57);
                        names.push_str("...");
                    }
                    writeln!(
                        out,
                        "  cert {name}: {names}; expires {} ({})",
                        crate::time::utc(until),
                        c.cert
                    )
                    .ok()
                }
                _ => writeln!(out, "  cert {} (not loaded)", c.cert).ok(),
            };
        }
    }
    out
}

pub fn backends(v: &[BackendView]) -> String {
    let now = crate::api::types::unix(std::time::SystemTime::now());
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|b| {
            vec![
                b.addr.to_string(),
                if b.weight_now != b.weight {
                    format!("{} (slow start, {} of it now)", b.weight, b.weight_now)
                } else {
                    b.weight.to_string()
                },
                format!("{:?}", b.health).to_lowercase(),
                format!("{}s ago", now.saturating_sub(b.health_since)),
                if b.accepting { "yes" } else { "no" }.into(),
                match (b.draining, b.drain_remaining_secs) {
                    _ if !b.state.is_ready() => b.state.to_string(),
                    (false, _) => "-".into(),
                    (true, Some(s)) => format!("draining, cut in {s}s"),
                    (true, None) => "drained".into(),
                },
                b.active.to_string(),
                b.live.conns.to_string(),
                b.live.half_open.to_string(),
                b.live.sessions.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "BACKEND",
            "WEIGHT",
            "HEALTH",
            "SINCE",
            "NEW-CONNS",
            "STATE",
            "ACTIVE",
            "CONNS",
            "HALF-OPEN",
            "PERSISTED",
        ],
        &rows,
    ) + "(ACTIVE: open connections now, HTTP: requests in flight; CONNS, HALF-OPEN and PERSISTED: \
         live table entries at the last sweep)\n"
}

pub fn sessions(v: &[SessionView]) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|s| {
            vec![
                s.listener.clone(),
                if s.prefix < if s.client.is_ipv4() { 32 } else { 128 } {
                    format!("{}/{}", s.client, s.prefix)
                } else {
                    s.client.to_string()
                },
                s.backend.to_string(),
                format!("{}s", s.idle_secs),
                format!("{}s", s.expires_in_secs),
                if s.pending { "pending" } else { "verified" }.into(),
            ]
        })
        .collect();
    table(
        &[
            "LISTENER",
            "CLIENT",
            "BACKEND",
            "LAST-SEEN",
            "EXPIRES-IN",
            "STATE",
        ],
        &rows,
    )
}

pub fn conns(v: &[ConnView]) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|x| {
            vec![
                x.listener.clone(),
                x.proto.to_string(),
                x.client.to_string(),
                x.vip.to_string(),
                x.backend.to_string(),
                x.state.clone(),
                format!("{}s", x.idle_secs),
            ]
        })
        .collect();
    table(
        &[
            "LISTENER", "PROTO", "CLIENT", "VIP", "BACKEND", "STATE", "IDLE",
        ],
        &rows,
    )
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

pub fn status(s: &Status) -> String {
    let mut out = String::new();
    writeln!(
        out,
        "clb {} up {}s, ifaces {} ({}), pins {}, config {} (sha256 {:.12})",
        s.version,
        s.uptime_secs,
        s.ifaces.join(","),
        s.xdp_mode,
        s.bpffs,
        s.config,
        s.config_sha256
    )
    .ok();
    writeln!(out, "datapath: {}", s.datapath).ok();
    if !s.upgraded.is_empty() {
        writeln!(
            out,
            "upgraded from an earlier clb at start: {}",
            s.upgraded.join("; ")
        )
        .ok();
    }
    let f = &s.flood;
    writeln!(
        out,
        "flood mode: {}{} (on {} / off {} times); half-open: {} inserted, {} promoted, {} evicted, {} resolved by hash",
        if f.active { "ON" } else { "off" },
        if f.active {
            format!(", {}s left", f.remaining_secs)
        } else {
            String::new()
        },
        f.transitions_on,
        f.transitions_off,
        f.half_open_inserts,
        f.half_open_promotions,
        f.half_open_evictions,
        f.half_open_misses_hashed
    )
    .ok();
    let rows: Vec<Vec<String>> = s
        .tables
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                t.info.capacity.to_string(),
                t.live.to_string(),
                format!(
                    "{:.1}%",
                    100.0 * t.live as f64 / f64::from(t.info.capacity.max(1))
                ),
                mib(t.info.memory_bytes),
            ]
        })
        .collect();
    out += &table(&["TABLE", "SIZE", "LIVE", "FILL", "MEMORY"], &rows);
    let rows: Vec<Vec<String>> = s
        .loops
        .iter()
        .map(|l| {
            vec![
                l.name.clone(),
                match l.state {
                    LoopState::Running => "running",
                    LoopState::Restarting => "restarting",
                    LoopState::Stopped => "stopped",
                }
                .into(),
                l.restarts.to_string(),
                l.last_error.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out += &table(&["LOOP", "STATE", "RESTARTS", "LAST-ERROR"], &rows);
    let rows: Vec<Vec<String>> = s
        .interfaces
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                match i.state {
                    InterfaceState::Attached => "attached",
                    InterfaceState::Missing => "MISSING",
                    InterfaceState::Failed => "FAILED",
                }
                .into(),
                i.ifindex.to_string(),
                i.reattached.to_string(),
                i.last_error.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    if !rows.is_empty() {
        out += &table(
            &["IFACE", "STATE", "IFINDEX", "REATTACHED", "LAST-ERROR"],
            &rows,
        );
    }
    writeln!(
        out,
        "sweeper: {} runs, removed {} connections, {} half-open, {} sessions, {} pending",
        s.sweeper.runs,
        s.sweeper.conns_removed_total,
        s.sweeper.half_open_removed_total,
        s.sweeper.sessions_removed_total,
        s.sweeper.pending_removed_total
    )
    .ok();
    if let Some(b) = &s.bgp {
        out += &bgp(b);
    }
    out
}

pub fn bgp(b: &crate::bgp::BgpStatus) -> String {
    let mut out = String::new();
    writeln!(
        out,
        "bgp: AS {} router id {}, {}; withdrawal bound {} ms",
        b.local_as,
        b.router_id,
        if b.maintenance {
            "MAINTENANCE (VIPs withdrawn by command)"
        } else {
            "announcing"
        },
        b.withdrawal_bound_ms
    )
    .ok();
    let rows: Vec<Vec<String>> = b
        .peers
        .iter()
        .map(|p| {
            vec![
                p.address.to_string(),
                p.remote_as.to_string(),
                p.state.clone(),
                p.bfd.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out += &table(&["PEER", "AS", "SESSION", "BFD"], &rows);
    writeln!(
        out,
        "announced: {}",
        if b.announced.is_empty() {
            "-".into()
        } else {
            b.announced
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    )
    .ok();
    out
}

pub fn stats(s: &StatsResponse) -> String {
    let mut out = String::new();
    let mut rows = Vec::new();
    for l in s.listeners.iter().filter(|l| !l.proto.is_http()) {
        let c = &l.counters;
        rows.push(vec![
            format!("{} ({})", l.name, l.proto),
            c.fwd_packets.to_string(),
            c.fwd_bytes.to_string(),
            c.rev_packets.to_string(),
            c.rev_bytes.to_string(),
            c.new_conns.to_string(),
            l.live.conns.to_string(),
            l.live.half_open.to_string(),
            l.live.sessions.to_string(),
            c.session_hits.to_string(),
        ]);
        for b in &l.backends {
            let c = &b.counters;
            rows.push(vec![
                format!("  -> {}", b.addr),
                c.fwd_packets.to_string(),
                c.fwd_bytes.to_string(),
                c.rev_packets.to_string(),
                c.rev_bytes.to_string(),
                c.new_conns.to_string(),
                b.live.conns.to_string(),
                b.live.half_open.to_string(),
                b.live.sessions.to_string(),
                c.session_hits.to_string(),
            ]);
        }
    }
    out += &table(
        &[
            "LISTENER/BACKEND",
            "PKTS-IN",
            "BYTES-IN",
            "PKTS-OUT",
            "BYTES-OUT",
            "NEW-FLOWS",
            "CONNS",
            "HALF-OPEN",
            "PERSISTED",
            "SESSION-HITS",
        ],
        &rows,
    );
    writeln!(
        out,
        "(CONNS, HALF-OPEN and PERSISTED: live entries of the tables at the last sweep)"
    )
    .ok();
    if !s.http.is_empty() {
        let mut rows = Vec::new();
        for l in &s.http {
            rows.push(vec![
                format!("{} (http)", l.name),
                l.connections.to_string(),
                l.requests.to_string(),
                format!(
                    "{}/{}/{}/{}",
                    l.responses_2xx, l.responses_3xx, l.responses_4xx, l.responses_5xx
                ),
                l.cookies_set.to_string(),
                l.cookie_hits.to_string(),
                l.upstream_errors.to_string(),
                l.client_errors.to_string(),
                l.refused_connections.to_string(),
            ]);
            for b in &l.backends {
                let blank = String::new;
                rows.push(vec![
                    format!("  -> {}", b.addr),
                    blank(),
                    b.requests.to_string(),
                    blank(),
                    blank(),
                    blank(),
                    blank(),
                    blank(),
                    blank(),
                ]);
            }
        }
        out += &table(
            &[
                "HTTP LISTENER/BACKEND",
                "CONNS",
                "REQUESTS",
                "2xx/3xx/4xx/5xx",
                "COOKIES-SET",
                "COOKIE-HITS",
                "502s",
                "CLIENT-ERRORS",
                "REFUSED",
            ],
            &rows,
        );
    }
    let nonzero: Vec<String> = s
        .counters
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    writeln!(
        out,
        "datapath: {}",
        if nonzero.is_empty() {
            "-".into()
        } else {
            nonzero.join(" ")
        }
    )
    .ok();
    writeln!(
        out,
        "flood mode: {} (entered {} times)",
        if s.flood.active { "ON" } else { "off" },
        s.flood.entered
    )
    .ok();
    writeln!(
        out,
        "sweeper: {} runs, {} connections and {} sessions removed",
        s.sweeper.runs, s.sweeper.conns_removed_total, s.sweeper.sessions_removed_total
    )
    .ok();
    for t in &s.health_transitions {
        writeln!(
            out,
            "health: {} {} -> {:?} x{}",
            t.listener, t.backend, t.to, t.count
        )
        .ok();
    }
    out
}

/// What a reload changed (or, dry, would change), one line each.
pub fn reload(a: &crate::api::types::ReloadAnswer) -> String {
    changes(a, "a reload", "reloaded")
}

/// What `clb apply` applied, or would apply with `--dry-run`.
pub fn apply(a: &crate::api::types::ReloadAnswer) -> String {
    changes(a, "the document", "applied")
}

/// A list of changes: `done` (`reloaded`) when applied, what `what` would apply otherwise.
fn changes(a: &crate::api::types::ReloadAnswer, what: &str, done: &str) -> String {
    let mut s = match (a.applied, a.changes.is_empty()) {
        (true, true) => return format!("{done}: no changes\n"),
        (false, true) => return format!("{what} would change nothing\n"),
        (true, false) => format!("{done}:\n"),
        (false, false) => format!("{what} would apply (nothing was changed):\n"),
    };
    for c in &a.changes {
        s.push_str("  ");
        s.push_str(c);
        s.push('\n');
    }
    s
}

/// The audit events, oldest first.
pub fn events(v: &[crate::control::audit::Event]) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|e| {
            vec![
                crate::time::utc(i64::try_from(e.at).unwrap_or(i64::MAX)),
                e.source.to_string(),
                match &e.refused {
                    Some(why) => format!("refused: {} ({why})", e.change),
                    None => e.change.clone(),
                },
            ]
        })
        .collect();
    format!("\nEvents:\n{}", table(&["TIME", "SOURCE", "CHANGE"], &rows))
}
