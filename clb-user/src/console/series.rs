//! The console's charts: every [`SERIES_EVERY`] the daemon samples each L4 backend's counters
//! (packets both ways, new connections) and live connections, keeping the last ten minutes in
//! a ring. The page gets per-interval deltas of the counters and the live counts.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::{
    api::{
        server::{Api, blocking, stats_view},
        types::StatsResponse,
    },
    control::lock,
};

/// Sampling interval.
pub const SERIES_EVERY: Duration = Duration::from_secs(5);
/// Samples kept: ten minutes of intervals, plus the one the first delta needs.
pub const SERIES_SAMPLES: usize = 121;

/// One backend's counters at a sample.
#[derive(Clone, Copy, Debug, Default)]
struct Point {
    packets: u64,
    new_conns: u64,
    live: u64,
}

#[derive(Clone, Debug)]
struct Sample {
    unix: u64,
    /// (listener, backend address) → point, in configuration order.
    points: Vec<((String, String), Point)>,
}

/// The ring of samples.
#[derive(Default)]
pub struct Series {
    samples: Mutex<VecDeque<Sample>>,
}

/// One backend's lines.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BackendSeries {
    pub addr: String,
    /// Packets (both ways) per interval.
    pub packets: Vec<Option<u64>>,
    /// New connections per interval.
    pub new_conns: Vec<Option<u64>>,
    /// Live connections at each sample.
    pub live_conns: Vec<Option<u64>>,
}

/// One listener's lines.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ListenerSeries {
    pub name: String,
    pub backends: Vec<BackendSeries>,
}

/// `GET /api/series`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SeriesView {
    pub interval_secs: u64,
    /// Unix time (s) of each point.
    pub times: Vec<u64>,
    pub listeners: Vec<ListenerSeries>,
}

impl Series {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Adds a sample taken from `stats` at `unix`.
    pub fn record(&self, unix: u64, stats: &StatsResponse) {
        let mut points = Vec::new();
        for l in stats.listeners.iter().filter(|l| !l.proto.is_http()) {
            for b in &l.backends {
                points.push((
                    (l.name.clone(), b.addr.to_string()),
                    Point {
                        packets: b.counters.fwd_packets + b.counters.rev_packets,
                        new_conns: b.counters.new_conns,
                        live: b.live.conns,
                    },
                ));
            }
        }
        let mut s = lock(&self.samples);
        s.push_back(Sample { unix, points });
        while s.len() > SERIES_SAMPLES {
            s.pop_front();
        }
    }

    /// Deltas and live counts per backend, for the listeners of the latest sample.
    pub fn view(&self) -> SeriesView {
        let s = lock(&self.samples);
        let mut v = SeriesView {
            interval_secs: SERIES_EVERY.as_secs(),
            ..SeriesView::default()
        };
        let Some(last) = s.back() else {
            return v;
        };
        let maps: Vec<HashMap<&(String, String), Point>> = s
            .iter()
            .map(|x| x.points.iter().map(|(k, p)| (k, *p)).collect())
            .collect();
        v.times = s.iter().skip(1).map(|x| x.unix).collect();
        for (key, _) in &last.points {
            let mut b = BackendSeries {
                addr: key.1.clone(),
                ..BackendSeries::default()
            };
            for w in maps.windows(2) {
                let (prev, now) = (w[0].get(key), w[1].get(key));
                let delta = |f: fn(&Point) -> u64| match (prev, now) {
                    // A counter that went down belongs to a backend re-added meanwhile.
                    (Some(p), Some(n)) => f(n).checked_sub(f(p)),
                    _ => None,
                };
                b.packets.push(delta(|p| p.packets));
                b.new_conns.push(delta(|p| p.new_conns));
                b.live_conns.push(now.map(|p| p.live));
            }
            match v.listeners.last_mut() {
                Some(l) if l.name == key.0 => l.backends.push(b),
                _ => v.listeners.push(ListenerSeries {
                    name: key.0.clone(),
                    backends: vec![b],
                }),
            }
        }
        v
    }
}

/// Samples every [`SERIES_EVERY`] until the daemon stops.
pub async fn run(api: Api, series: Arc<Series>) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(SERIES_EVERY);
    loop {
        tick.tick().await;
        let a = api.clone();
        let stats = blocking(move || stats_view(&a))
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.1))?;
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        series.record(unix, &stats);
    }
}
