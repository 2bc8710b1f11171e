//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted as Katran's `MaglevHashV2`.
//!
//! Each backend's identity (its address and port, never a node-local id) gives it a
//! permutation of the table's `m` slots (`offset`, `skip` from two stable hashes); backends
//! take turns claiming their next free slot until the table is full, a backend with weight `w`
//! taking `w / max_weight` turns per round. The table is then a pure function of the backend
//! set: every node computes the same one from the same configuration (backends are sorted by
//! identity first, so their order in the config does not matter either), and a change of one
//! backend moves only about `1/n` of the slots.
//!
//! The hashes are FNV-1a 64 with a fixed seed, finished by murmur3's `fmix64`: stable across
//! Rust versions and platforms (std's `DefaultHasher` is not).

use super::{Member, Scheduler};

/// The Maglev scheduler with a table of `size` slots (a prime).
pub struct Maglev {
    pub size: u32,
}

impl Scheduler for Maglev {
    fn schedule(&self, members: &[Member]) -> Vec<u32> {
        table(members, self.size)
    }
}

fn fnv1a64(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The backend's identity bytes: address and port, network byte order (6 bytes for IPv4, as
/// they always were, so IPv4 tables do not change; 18 for IPv6).
fn identity(m: &Member) -> Vec<u8> {
    let mut b = match m.addr.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    b.extend_from_slice(&m.addr.port().to_be_bytes());
    b
}

/// The lookup table of `size` slots (backend ids) for `members`; empty if there are none.
pub fn table(members: &[Member], size: u32) -> Vec<u32> {
    let mut ms: Vec<Member> = members.iter().copied().filter(|m| m.weight > 0).collect();
    if ms.is_empty() || size == 0 {
        return Vec::new();
    }
    ms.sort_by_key(|m| (m.addr.ip(), m.addr.port()));
    let m = u64::from(size);
    let perm: Vec<(u64, u64)> = ms
        .iter()
        .map(|b| {
            let id = identity(b);
            let offset = fmix64(fnv1a64(0x6d61_676c_6576_3031, &id)) % m;
            let skip = fmix64(fnv1a64(0x736b_6970_5f73_6b69, &id)) % (m - 1).max(1) + 1;
            (offset, skip)
        })
        .collect();
    let max_weight = ms.iter().map(|b| b.weight).max().unwrap_or(1);
    let mut next = vec![0u64; ms.len()];
    let mut cum = vec![0u32; ms.len()];
    let mut out = vec![u32::MAX; size as usize];
    let mut filled = 0u32;
    while filled < size {
        for (i, b) in ms.iter().enumerate() {
            cum[i] += b.weight;
            if cum[i] < max_weight {
                continue;
            }
            cum[i] -= max_weight;
            let (offset, skip) = perm[i];
            let mut cur = (offset + next[i] * skip) % m;
            while out[cur as usize] != u32::MAX {
                next[i] += 1;
                cur = (offset + next[i] * skip) % m;
            }
            out[cur as usize] = b.id;
            next[i] += 1;
            filled += 1;
            if filled == size {
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, net::Ipv4Addr};

    use super::*;

    const M: u32 = 65537;

    fn members(n: u32, weight: impl Fn(u32) -> u32) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                id: 100 + i,
                addr: std::net::SocketAddr::from((Ipv4Addr::new(10, 0, 10 + i as u8, 2), 8080)),
                weight: weight(i),
            })
            .collect()
    }

    fn shares(t: &[u32]) -> HashMap<u32, usize> {
        let mut c = HashMap::new();
        for &b in t {
            *c.entry(b).or_default() += 1;
        }
        c
    }

    #[test]
    fn equal_weights_give_equal_shares_within_one_percent() {
        for n in [2u32, 3, 5, 7, 10, 33] {
            let t = table(&members(n, |_| 10), M);
            assert_eq!(t.len(), M as usize);
            let ideal = f64::from(M) / f64::from(n);
            for (b, c) in shares(&t) {
                let dev = (c as f64 - ideal).abs() / ideal;
                assert!(dev < 0.01, "n={n} backend {b}: {c} slots vs {ideal:.0}");
            }
        }
    }

    #[test]
    fn shares_follow_weights() {
        // Weights 1:2:3:4 → 10 %, 20 %, 30 %, 40 % of the slots, each within 1 % of its share.
        let t = table(&members(4, |i| 10 * (i + 1)), M);
        let s = shares(&t);
        for i in 0..4u32 {
            let want = f64::from(M) * f64::from(i + 1) / 10.0;
            let got = s[&(100 + i)] as f64;
            assert!(
                (got - want).abs() / want < 0.01,
                "backend {i}: {got} vs {want:.0}"
            );
        }
    }

    #[test]
    fn the_table_depends_on_identities_not_ids_or_order() {
        let a = members(5, |_| 10);
        let mut b = a.clone();
        b.reverse();
        assert_eq!(table(&a, M), table(&b, M));
        // Other node-local ids, same identities: the same backends in the same slots.
        let c: Vec<Member> = a
            .iter()
            .map(|m| Member {
                id: m.id + 1000,
                ..*m
            })
            .collect();
        let (ta, tc) = (table(&a, M), table(&c, M));
        assert!(ta.iter().zip(&tc).all(|(x, y)| *x + 1000 == *y));
    }

    #[test]
    fn adding_or_removing_one_of_n_moves_about_one_nth() {
        // Bound: a change of one backend among n moves at most 1/n + 2 % of the slots
        // (measured: Maglev's extra disruption is well under 2 % at this table size).
        for n in [3u32, 5, 10] {
            let before = table(&members(n, |_| 10), M);
            let after = table(&members(n + 1, |_| 10), M);
            let moved =
                before.iter().zip(&after).filter(|(a, b)| a != b).count() as f64 / f64::from(M);
            let bound = 1.0 / f64::from(n + 1) + 0.02;
            assert!(moved <= bound, "add to {n}: moved {moved:.4} > {bound:.4}");
            // Removing the last one again restores the table exactly.
            assert_eq!(table(&members(n, |_| 10), M), before);
            let fewer = table(&members(n - 1, |_| 10), M);
            let moved =
                before.iter().zip(&fewer).filter(|(a, b)| a != b).count() as f64 / f64::from(M);
            let bound = 1.0 / f64::from(n) + 0.02;
            assert!(
                moved <= bound,
                "remove from {n}: moved {moved:.4} > {bound:.4}"
            );
        }
    }
}
