//! The audit trail: one line per accepted change (what changed, before → after, and where it
//! came from) and per refused change (with its reason), in the daemon's log under the
//! `clb::audit` target and in a ring of the last [`KEPT`] events that `clb status --events`
//! and `GET /v1/events` show.

use std::{
    collections::VecDeque,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::control::lock;

/// How many events the daemon keeps for `clb status --events`.
pub const KEPT: usize = 512;

/// Where a change came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// The local API (the CLI, or any client of the socket).
    Api,
    /// The web console.
    Console,
    /// `clb reload` (or SIGHUP): the config file read again.
    Reload,
    /// A health check's transition.
    Health,
    /// A drain's deadline passed (its connections cut), or a slow start's ramp.
    Timer,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Api => "api",
            Self::Console => "console",
            Self::Reload => "reload",
            Self::Health => "health",
            Self::Timer => "timer",
        })
    }
}

/// One audit event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When, seconds since the Unix epoch.
    pub at: u64,
    pub source: Source,
    /// What changed (`listener web: persist 0 → 600`), or what was asked, when refused.
    pub change: String,
    /// Why the change was refused; `None` when it was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// The ring of the last events.
#[derive(Default)]
pub struct Audit(Mutex<VecDeque<Event>>);

impl Audit {
    fn push(&self, e: Event) {
        let mut q = lock(&self.0);
        if q.len() == KEPT {
            q.pop_front();
        }
        q.push_back(e);
    }

    /// Records the lines of an applied change.
    pub fn applied(&self, source: Source, lines: &[String]) {
        let at = now();
        for line in lines {
            info!(target: "clb::audit", %source, "{line}");
            self.push(Event {
                at,
                source,
                change: line.clone(),
                refused: None,
            });
        }
    }

    /// Records a refused change: what it would have done (or, when that is not known, what
    /// was asked) and why.
    pub fn refused(&self, source: Source, what: &str, reason: &str) {
        warn!(target: "clb::audit", %source, reason, "refused: {what}");
        self.push(Event {
            at: now(),
            source,
            change: what.to_owned(),
            refused: Some(reason.to_owned()),
        });
    }

    /// The last `n` events, oldest first.
    pub fn last(&self, n: usize) -> Vec<Event> {
        let q = lock(&self.0);
        q.iter().skip(q.len().saturating_sub(n)).cloned().collect()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_last_events_in_order() {
        let a = Audit::default();
        for i in 0..KEPT + 3 {
            a.applied(Source::Api, &[format!("change {i}")]);
        }
        a.refused(
            Source::Console,
            "listener web: persist 0 → 9999",
            "out of range",
        );
        let last = a.last(2);
        assert_eq!(last[0].change, format!("change {}", KEPT + 2));
        assert_eq!(last[1].refused.as_deref(), Some("out of range"));
        assert_eq!(a.last(10_000).len(), KEPT);
    }
}
