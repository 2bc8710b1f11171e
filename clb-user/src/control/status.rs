//! What the daemon reports about itself: its settings, the sweeper's work, and the state of
//! each supervised background loop.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Mutex,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use super::lock;
use crate::datapath::sweep::SweepReport;

/// The daemon's settings, for `clb status`.
#[derive(Clone, Debug)]
pub struct DaemonInfo {
    pub ifaces: Vec<String>,
    pub xdp_mode: String,
    pub bpffs: PathBuf,
    pub config: PathBuf,
    pub started: Instant,
    /// What the start upgraded: each table converted from an earlier clb's layout (`CLB_CONN_V1
    /// → CLB_CONN_V2: 1048576 entries`), filled in once the new program is attached.
    pub upgraded: std::sync::Arc<Mutex<Vec<String>>>,
}

/// What the sweeper has done.
#[derive(Clone, Debug, Default)]
pub struct SweepStatus {
    pub runs: u64,
    pub conns_removed_total: u64,
    pub half_open_removed_total: u64,
    pub sessions_removed_total: u64,
    pub pending_removed_total: u64,
    /// The latest sweep, with the live entry counts it found.
    pub last: SweepReport,
    pub at: Option<SystemTime>,
}

/// Flood mode as user space watches it (the datapath switches it; see `flood-watch`).
#[derive(Debug, Default)]
pub struct FloodWatch {
    pub on: std::sync::atomic::AtomicBool,
    /// Transitions seen: on, off.
    pub entered: std::sync::atomic::AtomicU64,
    pub left: std::sync::atomic::AtomicU64,
}

impl FloodWatch {
    /// Records the mode seen now; returns `Some(on)` if it changed.
    pub fn observe(&self, on: bool) -> Option<bool> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.on.swap(on, Relaxed) == on {
            return None;
        }
        if on {
            self.entered.fetch_add(1, Relaxed);
        } else {
            self.left.fetch_add(1, Relaxed);
        }
        Some(on)
    }
}

/// A supervised loop's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoopState {
    Running,
    /// Failed; restarting after a pause.
    Restarting,
    /// Ended on purpose (daemon shutting down, or nothing to do).
    Stopped,
}

/// One loop, for `clb status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoopStatus {
    pub name: String,
    pub state: LoopState,
    /// Restarts after failures since the daemon started.
    pub restarts: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Unix time (s) of the last state change.
    pub since: u64,
}

/// The registry of supervised loops.
#[derive(Default)]
pub struct Loops(Mutex<BTreeMap<String, LoopStatus>>);

impl Loops {
    /// Records that loop `name` is in `state` (with `error` when it failed).
    pub fn set(&self, name: &str, state: LoopState, error: Option<String>) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut m = lock(&self.0);
        let e = m.entry(name.to_owned()).or_insert_with(|| LoopStatus {
            name: name.to_owned(),
            state,
            restarts: 0,
            last_error: None,
            since: now,
        });
        if state == LoopState::Restarting {
            e.restarts += 1;
        }
        if error.is_some() {
            e.last_error = error;
        }
        if e.state != state {
            e.state = state;
            e.since = now;
        }
    }

    /// Every loop's status, by name.
    pub fn all(&self) -> Vec<LoopStatus> {
        lock(&self.0).values().cloned().collect()
    }
}

/// Whether the datapath runs on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InterfaceState {
    /// The program is attached (its link pinned).
    Attached,
    /// No interface of that name exists now; it is attached again when one appears.
    Missing,
    /// The interface exists but attaching failed (`last_error`); tried again every second.
    Failed,
}

/// One `--iface`, for `clb status` and the metrics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub state: InterfaceState,
    /// The ifindex the program is (or was last) attached to; 0 before the first attach.
    pub ifindex: u32,
    /// Times the program was attached again to a re-created interface.
    pub reattached: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Unix time (s) of the last state change.
    pub since: u64,
}

/// The registry of the daemon's interfaces.
#[derive(Default)]
pub struct Interfaces(Mutex<BTreeMap<String, InterfaceStatus>>);

impl Interfaces {
    /// Records `name`'s state; returns the previous one (`None` the first time).
    pub fn set(
        &self,
        name: &str,
        state: InterfaceState,
        ifindex: u32,
        error: Option<String>,
    ) -> Option<InterfaceState> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut m = lock(&self.0);
        let prev = m.get(name).map(|e| e.state);
        let e = m.entry(name.to_owned()).or_insert_with(|| InterfaceStatus {
            name: name.to_owned(),
            state,
            ifindex,
            reattached: 0,
            last_error: None,
            since: now,
        });
        if state == InterfaceState::Attached && prev.is_some() && e.ifindex != ifindex {
            e.reattached += 1;
        }
        if ifindex != 0 {
            e.ifindex = ifindex;
        }
        e.last_error = error;
        if e.state != state {
            e.state = state;
            e.since = now;
        }
        prev
    }

    /// `name`'s status, if it was ever recorded.
    pub fn get(&self, name: &str) -> Option<InterfaceStatus> {
        lock(&self.0).get(name).cloned()
    }

    /// Every interface's status, by name.
    pub fn all(&self) -> Vec<InterfaceStatus> {
        lock(&self.0).values().cloned().collect()
    }
}
