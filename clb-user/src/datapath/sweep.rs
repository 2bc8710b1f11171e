//! The sweeper's walk: removes expired entries from the flow tables (IPv4 and IPv6, four each)
//! and, in the same
//! walk, counts the live ones per listener and backend. Those counts are what `clb stats`,
//! `backend ls` and `/metrics` show, so no reader ever walks a million-entry table itself.
//!
//! The walk of the connection tables also corrects each backend's active-connection count
//! (least connections, `backend ls` ACTIVE): see [`reconcile`].
//!
//! Expiry: connections by idle timeout or FIN/RST aging; half-open entries by the half-open
//! timeout; persistence entries by the listener's duration (all of a listener's when its
//! persistence is off). Entries of listeners that no longer exist are not the sweeper's
//! business: the control plane purges them when it removes them, so a policy that lags a
//! change can never make the sweeper delete a live entry of a new listener. The policy is read
//! once per batch.
//!
//! Each batch is deleted right after it is read: the only window in which the datapath could
//! re-create an expired key (a returning client) before the sweeper deletes it is that of one
//! batch (about a millisecond); the client's next packet then simply creates it again.

use std::{collections::HashMap, sync::Arc, time::Instant};

use clb_common::{CONN_OPEN, conn_timeout_ns, is_expired};
use serde::{Deserialize, Serialize};

use super::{DpError, FlowKey, SessionTable, Tables};

/// Timeouts per listener id.
#[derive(Clone, Debug, Default)]
pub struct SweepPolicy {
    /// listener id → (idle timeout ns, persistence ns)
    pub listeners: HashMap<u32, (u64, u64)>,
    /// Half-open entry lifetime, ns.
    pub half_open_ns: u64,
}

/// Live entries, per listener id and per backend id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Live {
    pub conns: u64,
    pub half_open: u64,
    pub sessions: u64,
    pub pending: u64,
}

/// What one sweep did and found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepReport {
    pub conns_scanned: u64,
    pub conns_removed: u64,
    pub half_open_scanned: u64,
    pub half_open_removed: u64,
    pub sessions_scanned: u64,
    pub sessions_removed: u64,
    pub pending_scanned: u64,
    pub pending_removed: u64,
    pub micros: u64,
    /// Active connections added to or taken from the backends' counts by
    /// [`reconcile`] (entries that left without a packet the datapath saw).
    pub active_corrected: u64,
    /// Live entries per table, in `TABLE_NAMES` order (IPv4 four, then IPv6 four).
    pub tables_live: [u64; 8],
    /// Live entries per listener id.
    #[serde(skip)]
    pub by_listener: HashMap<u32, Live>,
    /// Live entries per backend id.
    #[serde(skip)]
    pub by_backend: HashMap<u32, Live>,
}

impl SweepReport {
    /// Live entries in each table, all listeners.
    pub fn totals(&self) -> Live {
        let mut t = Live::default();
        for l in self.by_listener.values() {
            t.conns += l.conns;
            t.half_open += l.half_open;
            t.sessions += l.sessions;
            t.pending += l.pending;
        }
        t
    }
}

/// Counts of one sweep in progress.
struct Walk<'a> {
    policy: &'a dyn Fn() -> Arc<SweepPolicy>,
    now_ns: u64,
    by_l: HashMap<u32, Live>,
    by_b: HashMap<u32, Live>,
    /// Live connection entries in `CONN_OPEN`, per backend id: what its active count should be.
    open: HashMap<u32, i64>,
    /// Expired entries in `CONN_OPEN` this walk deletes, per backend id.
    gone_open: HashMap<u32, i64>,
}

impl Walk<'_> {
    fn live(&mut self, l: u32, b: u32, f: fn(&mut Live)) {
        f(self.by_l.entry(l).or_default());
        f(self.by_b.entry(b).or_default());
    }

    /// Connection entries: expired by idle timeout or FIN/RST aging.
    fn conns<K: FlowKey>(&mut self, ks: &[K], vs: &[clb_common::ConnValue], dead: &mut Vec<K>) {
        let p = (self.policy)();
        for (k, v) in ks.iter().zip(vs) {
            let lid = k.listener();
            let open = v.state == CONN_OPEN;
            match p.listeners.get(&lid) {
                Some((idle, _))
                    if is_expired(self.now_ns, v.last_seen_ns, conn_timeout_ns(v.state, *idle)) =>
                {
                    dead.push(*k);
                    if open {
                        *self.gone_open.entry(v.backend).or_default() += 1;
                    }
                    continue;
                }
                Some(_) => self.live(lid, v.backend, |c| c.conns += 1),
                // A removed listener's entry, until the control plane's purge: still counted
                // by the datapath, and the purge subtracts it.
                None => {}
            }
            if open {
                *self.open.entry(v.backend).or_default() += 1;
            }
        }
    }

    /// Half-open entries: expired by the half-open timeout.
    fn half_open<K: FlowKey>(
        &mut self,
        ks: &[K],
        vs: &[clb_common::HalfOpenValue],
        dead: &mut Vec<K>,
    ) {
        let p = (self.policy)();
        for (k, v) in ks.iter().zip(vs) {
            let lid = k.listener();
            if p.listeners.contains_key(&lid) {
                if is_expired(self.now_ns, v.last_seen_ns, p.half_open_ns) {
                    dead.push(*k);
                } else {
                    self.live(lid, u32::from(v.backend), |c| c.half_open += 1);
                }
            }
        }
    }

    /// Persistence entries: expired by the listener's duration (all, with persistence off).
    fn sessions<K: FlowKey>(
        &mut self,
        table: SessionTable,
        ks: &[K],
        vs: &[clb_common::SessionValue],
        dead: &mut Vec<K>,
    ) {
        let p = (self.policy)();
        for (k, v) in ks.iter().zip(vs) {
            let lid = k.listener();
            if let Some((_, persist)) = p.listeners.get(&lid) {
                if *persist == 0 || is_expired(self.now_ns, v.last_seen_ns, *persist) {
                    dead.push(*k);
                } else if table == SessionTable::Verified {
                    self.live(lid, v.backend, |c| c.sessions += 1);
                } else {
                    self.live(lid, v.backend, |c| c.pending += 1);
                }
            }
        }
    }
}

/// Corrects the backends' active counts after a walk of the connection tables: first the
/// open entries the walk deleted (expired), exactly; then, per backend, the difference
/// between the open entries the walk found (`open`) and the count, beyond what the datapath
/// itself changed during the walk (`before` → now, which the walk may or may not have seen).
/// With no opens and closes on a backend during its walk its count becomes exact; under
/// churn it converges over walks, off by at most that walk's churn. Returns the total
/// correction.
fn reconcile(
    t: &dyn Tables,
    before: &[i64],
    open: &HashMap<u32, i64>,
    gone_open: &HashMap<u32, i64>,
) -> u64 {
    for (b, n) in gone_open {
        t.add_active(*b, -n);
    }
    let after = t.actives();
    let mut corrected = 0;
    for (id, (&c0, &c1)) in before.iter().zip(&after).enumerate() {
        let id = id as u32;
        let walk = open.get(&id).copied().unwrap_or(0);
        let gone = gone_open.get(&id).copied().unwrap_or(0);
        let churn = (c1 - c0 + gone).abs();
        let d = walk - c1;
        if d.abs() > churn {
            let fix = d - d.signum() * churn;
            t.add_active(id, fix);
            corrected += fix.unsigned_abs();
        }
    }
    corrected
}

/// Sweeps the tables once at `now_ns`, waiting `pause` after each batch (pacing).
pub fn sweep(
    t: &dyn Tables,
    policy: &dyn Fn() -> Arc<SweepPolicy>,
    now_ns: u64,
    pause: std::time::Duration,
) -> Result<SweepReport, DpError> {
    let started = Instant::now();
    let mut r = SweepReport::default();
    let mut w = Walk {
        policy,
        now_ns,
        by_l: HashMap::new(),
        by_b: HashMap::new(),
        open: HashMap::new(),
        gone_open: HashMap::new(),
    };
    // Per table: (scanned, removed), then the live count is the walk's difference.
    let add = |r: &mut SweepReport, slot: usize, (scanned, removed): (u64, u64)| {
        r.tables_live[slot] = scanned.saturating_sub(removed);
        match slot % 4 {
            0 => {
                r.conns_scanned += scanned;
                r.conns_removed += removed;
            }
            1 => {
                r.half_open_scanned += scanned;
                r.half_open_removed += removed;
            }
            2 => {
                r.sessions_scanned += scanned;
                r.sessions_removed += removed;
            }
            _ => {
                r.pending_scanned += scanned;
                r.pending_removed += removed;
            }
        }
    };
    let before = t.actives();
    let c4 = t.prune_conns(pause, &mut |ks, vs, dead| w.conns(ks, vs, dead))?;
    add(&mut r, 0, c4);
    let c6 = t.prune_conns6(pause, &mut |ks, vs, dead| w.conns(ks, vs, dead))?;
    add(&mut r, 4, c6);
    r.active_corrected = reconcile(t, &before, &w.open, &w.gone_open);
    let h4 = t.prune_half_open(pause, &mut |ks, vs, dead| w.half_open(ks, vs, dead))?;
    add(&mut r, 1, h4);
    let h6 = t.prune_half_open6(pause, &mut |ks, vs, dead| w.half_open(ks, vs, dead))?;
    add(&mut r, 5, h6);
    for (i, table) in [SessionTable::Verified, SessionTable::Pending]
        .into_iter()
        .enumerate()
    {
        let s4 = t.prune_sessions(table, pause, &mut |ks, vs, dead| {
            w.sessions(table, ks, vs, dead)
        })?;
        add(&mut r, 2 + i, s4);
        let s6 = t.prune_sessions6(table, pause, &mut |ks, vs, dead| {
            w.sessions(table, ks, vs, dead)
        })?;
        add(&mut r, 6 + i, s6);
    }
    r.by_listener = w.by_l;
    r.by_backend = w.by_b;
    r.micros = started.elapsed().as_micros() as u64;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use clb_common::{
        CONN_FIN, CONN_OPEN, ConnKey, ConnValue, HalfOpenValue, NS_PER_SEC, SessionKey,
        SessionValue,
    };

    use super::*;
    use crate::datapath::mem::MemDataplane;

    #[test]
    fn removes_expired_entries_only_and_counts_the_rest() {
        let dp = MemDataplane::new();
        let now = 1_000 * NS_PER_SEC;
        let conn = |port, age_s: u64, state, backend| {
            (
                ConnKey {
                    client: 7,
                    client_port: port,
                    listener: 3,
                    proto: 6,
                    _pad: [0; 3],
                },
                ConnValue {
                    last_seen_ns: now - age_s * NS_PER_SEC,
                    backend,
                    state,
                    flags: 0,
                    _pad: [0; 2],
                },
            )
        };
        {
            let mut s = dp.state();
            s.conns.extend([
                conn(1, 5, CONN_OPEN, 9),  // live
                conn(2, 11, CONN_OPEN, 9), // idle too long
                conn(3, 9, CONN_FIN, 9),   // FIN, under 10 s
            ]);
            // An unknown listener: the control plane's to purge, not the sweeper's.
            let (mut k, v) = conn(4, 500, CONN_OPEN, 9);
            k.listener = 99;
            s.conns.insert(k, v);
            s.half_open.insert(
                ConnKey { client: 8, ..k },
                HalfOpenValue {
                    last_seen_ns: now - 31 * NS_PER_SEC,
                    backend: 9,
                    ..Default::default()
                },
            );
            s.half_open.insert(
                ConnKey {
                    client: 8,
                    listener: 3,
                    ..k
                },
                HalfOpenValue {
                    last_seen_ns: now - 31 * NS_PER_SEC,
                    backend: 9,
                    ..Default::default()
                },
            );
            s.sessions.insert(
                SessionKey {
                    client: 7,
                    listener: 3,
                    _pad: 0,
                },
                SessionValue {
                    last_seen_ns: now - 6 * NS_PER_SEC,
                    backend: 9,
                    _pad: 0,
                },
            );
        }
        let policy = Arc::new(SweepPolicy {
            listeners: [(3, (10 * NS_PER_SEC, 5 * NS_PER_SEC))].into(),
            half_open_ns: 30 * NS_PER_SEC,
        });
        let r = sweep(&dp, &|| policy.clone(), now, std::time::Duration::ZERO).unwrap();
        assert_eq!((r.conns_scanned, r.conns_removed), (4, 1));
        assert_eq!((r.half_open_scanned, r.half_open_removed), (2, 1));
        assert_eq!(r.sessions_removed, 1);
        assert_eq!(r.by_backend[&9].conns, 2);
        assert_eq!(r.by_listener[&3].sessions, 0);
        let mut left: Vec<u16> = dp.state().conns.keys().map(|k| k.client_port).collect();
        left.sort_unstable();
        assert_eq!(left, vec![1, 3, 4]);
    }

    #[test]
    fn active_counts_become_the_open_entries_whatever_way_the_others_left() {
        let dp = MemDataplane::new();
        let now = 1_000 * NS_PER_SEC;
        let mut port = 0;
        let mut conn = |age_s: u64, state, backend| {
            port += 1;
            (
                ConnKey {
                    client: 7,
                    client_port: port,
                    listener: 3,
                    proto: 6,
                    _pad: [0; 3],
                },
                ConnValue {
                    last_seen_ns: now - age_s * NS_PER_SEC,
                    backend,
                    state,
                    flags: 0,
                    _pad: [0; 2],
                },
            )
        };
        {
            let mut s = dp.state();
            // Backend 5: four open, one closing, two idle past the timeout (the datapath
            // counted six: the two expired ones never sent a packet that closed them).
            for _ in 0..4 {
                let (k, v) = conn(1, CONN_OPEN, 5);
                s.conns.insert(k, v);
            }
            let (k, v) = conn(1, CONN_FIN, 5);
            s.conns.insert(k, v);
            for _ in 0..2 {
                let (k, v) = conn(20, CONN_OPEN, 5);
                s.conns.insert(k, v);
            }
            s.active.insert(5, 6);
            // Backend 6: three open the count never saw (tables an earlier clb left).
            for _ in 0..3 {
                let (k, v) = conn(1, CONN_OPEN, 6);
                s.conns.insert(k, v);
            }
            // Backend 7: counted five, all evicted by the LRU.
            s.active.insert(7, 5);
        }
        let policy = Arc::new(SweepPolicy {
            listeners: [(3, (10 * NS_PER_SEC, 0))].into(),
            half_open_ns: 30 * NS_PER_SEC,
        });
        let r = sweep(&dp, &|| policy.clone(), now, std::time::Duration::ZERO).unwrap();
        let a = dp.actives();
        assert_eq!((a[5], a[6], a[7]), (4, 3, 0));
        assert_eq!(
            r.active_corrected,
            3 + 5,
            "the expired two are not a correction"
        );
        // A second walk finds nothing to correct.
        let r = sweep(&dp, &|| policy.clone(), now, std::time::Duration::ZERO).unwrap();
        assert_eq!(r.active_corrected, 0);
        // A purge takes its open entries off the count.
        crate::datapath::purge(&dp, &|_, b| b == 6).unwrap();
        assert_eq!(dp.actives()[6], 0);
    }
}
