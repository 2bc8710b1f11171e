//! Weighted round robin, computed in user space: the smooth WRR sequence (nginx's algorithm)
//! of a listener's accepting backends, which the datapath indexes with a shared cursor.
//!
//! Smooth WRR interleaves: weights 5,1,1 give `a a b a c a a`, not `a a a a a b c`. Over any
//! window of consecutive slots each backend's share stays within about one slot of
//! `window * w / Σw`, so consecutive new connections spread evenly.

use super::{Member, Scheduler};

/// One schedule entry: backend id and weight (> 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Weighted {
    pub id: u32,
    pub weight: u32,
}

/// The smooth weighted round-robin scheduler, with sequences of at most `max_len` slots.
pub struct Wrr {
    pub max_len: usize,
}

impl Scheduler for Wrr {
    fn schedule(&self, members: &[Member]) -> Vec<u32> {
        let w: Vec<Weighted> = members
            .iter()
            .map(|m| Weighted {
                id: m.id,
                weight: m.weight,
            })
            .collect();
        smooth_wrr(&w, self.max_len)
    }
}

/// The schedule for `backends` (weights > 0), at most `max_len` slots long.
///
/// Weights are divided by their greatest common divisor; with `max_len` =
/// [`clb_common::WRR_SLOTS`] the sum never exceeds it. Below that (tests) they are scaled down
/// proportionally (each backend keeping at least one slot), so the
/// ratios are exact up to `max_len` slots and within one slot per backend beyond.
/// The caller keeps the number of backends at most `max_len`
/// ([`clb_common::MAX_BACKENDS_PER_LISTENER`]); any beyond that are left out.
pub fn smooth_wrr(backends: &[Weighted], max_len: usize) -> Vec<u32> {
    let live: Vec<Weighted> = backends
        .iter()
        .copied()
        .filter(|b| b.weight > 0)
        .take(max_len)
        .collect();
    if live.is_empty() || max_len == 0 {
        return Vec::new();
    }
    let g = live.iter().fold(0, |g, b| gcd(g, b.weight));
    let mut weights: Vec<u64> = live.iter().map(|b| u64::from(b.weight / g)).collect();
    let total: u64 = weights.iter().sum();
    if total > max_len as u64 {
        let n = live.len() as u64;
        // Keep one slot per backend, share the rest proportionally (largest remainder).
        let spare = (max_len as u64).saturating_sub(n);
        let mut shares: Vec<(u64, u64, usize)> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let exact = w * spare;
                (exact / total, exact % total, i)
            })
            .collect();
        let given: u64 = shares.iter().map(|s| s.0).sum();
        shares.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)));
        for s in shares.iter_mut().take(spare.saturating_sub(given) as usize) {
            s.0 += 1;
        }
        for (whole, _, i) in shares {
            weights[i] = whole + 1;
        }
    }
    let total: u64 = weights.iter().sum();
    let mut current: Vec<i64> = vec![0; live.len()];
    let mut seq = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..live.len() {
            current[i] += weights[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        seq.push(live[best].id);
    }
    seq
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(id: u32, weight: u32) -> Weighted {
        Weighted { id, weight }
    }

    fn count(seq: &[u32], id: u32) -> usize {
        seq.iter().filter(|&&x| x == id).count()
    }

    #[test]
    fn equal_weights_alternate() {
        let s = smooth_wrr(&[w(1, 10), w(2, 10), w(3, 10)], 1024);
        assert_eq!(s, vec![1, 2, 3]);
    }

    #[test]
    fn smooth_interleaving_like_nginx() {
        let s = smooth_wrr(&[w(1, 5), w(2, 1), w(3, 1)], 1024);
        assert_eq!(s, vec![1, 1, 2, 1, 3, 1, 1]);
    }

    #[test]
    fn zero_weight_is_left_out() {
        let s = smooth_wrr(&[w(1, 0), w(2, 3)], 1024);
        assert_eq!(s, vec![2]);
        assert!(smooth_wrr(&[w(1, 0)], 1024).is_empty());
    }

    #[test]
    fn windows_stay_within_one_slot_of_the_ideal_share() {
        let bs = [w(1, 7), w(2, 3), w(3, 5), w(4, 1)];
        let s = smooth_wrr(&bs, 1024);
        let total: u32 = bs.iter().map(|b| b.weight).sum();
        assert_eq!(s.len(), total as usize);
        let cyc: Vec<u32> = s.iter().chain(s.iter()).copied().collect();
        for start in 0..s.len() {
            for len in 1..=s.len() {
                let win = &cyc[start..start + len];
                for b in &bs {
                    let ideal = len as f64 * f64::from(b.weight) / f64::from(total);
                    let got = count(win, b.id) as f64;
                    assert!(
                        (got - ideal).abs() < 2.0,
                        "window {start}+{len} id {}",
                        b.id
                    );
                }
            }
        }
    }

    #[test]
    fn oversized_sums_are_scaled_with_one_slot_minimum() {
        let bs: Vec<Weighted> = (0..256).map(|i| w(i, 100 - i % 7)).collect();
        let s = smooth_wrr(&bs, 256);
        assert_eq!(s.len(), 256);
        assert!((0..256).all(|i| count(&s, i) == 1));
        let s = smooth_wrr(&[w(1, 100), w(2, 1), w(3, 99)], 50);
        assert_eq!(s.len(), 50);
        assert_eq!(count(&s, 2), 1);
        assert!((24..=26).contains(&count(&s, 1)), "{}", count(&s, 1));
    }

    /// Issue 26: with 1 024 backends a weight-100 backend got the share of a weight-1 one
    /// (1 024 slots, one each); the sequence is now long enough for any allowed weights.
    #[test]
    fn weights_hold_with_the_most_backends_a_listener_may_have() {
        let n = clb_common::MAX_BACKENDS_PER_LISTENER;
        let bs: Vec<Weighted> = (0..n)
            .map(|i| w(i, if i % 2 == 0 { 100 } else { 1 }))
            .collect();
        let s = smooth_wrr(&bs, clb_common::WRR_SLOTS as usize);
        assert_eq!(s.len(), (n / 2 * 101) as usize);
        for i in 0..n {
            assert_eq!(
                count(&s, i),
                if i % 2 == 0 { 100 } else { 1 },
                "backend {i}"
            );
        }
        let all: Vec<Weighted> = (0..n).map(|i| w(i, 100 - i % 100)).collect();
        let s = smooth_wrr(&all, clb_common::WRR_SLOTS as usize);
        for b in &all {
            assert_eq!(count(&s, b.id), b.weight as usize);
        }
    }
}
