//! Every layout version of every pinned table clb has ever released, and what this version
//! does with it when a daemon starts over pins an earlier clb left (an upgrade in place; see
//! `docs/upgrade.md`).
//!
//! A table's pin name is its stem and its layout version (`CLB_CONN` + `_V2`). Changing a
//! table's key, value, map kind or meaning gives it a new version here, with the release that
//! introduced it and, for the version it replaces, its [`Fate`]: converted entry by entry,
//! rebuilt from the configuration, reset, or (tables of unverified flows only) replaced
//! empty. Pins of a version newer than this build's (a downgrade) are refused by name.

/// What a starting daemon does with a pinned table of an earlier layout version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// This build's layout: reused as it is.
    Current,
    /// Every entry is converted into the current table `into` (see [`v0_1`]): before the new
    /// program is attached, and again after it for the entries the old program wrote in
    /// between; then the old pin goes.
    Converted { into: &'static str },
    /// Written again by the daemon from its configuration before the new program is
    /// attached (listener schedules): nothing in it is state.
    Rebuilt { into: &'static str },
    /// Datapath counters: the new table starts from zero (Prometheus counters reset, as on a
    /// reboot; `rate()` and `increase()` handle it).
    Reset { into: &'static str },
    /// A table of unverified flows (half-open handshakes, pending persistence): replaced by an
    /// empty one. A handshake in flight restarts with the client's SYN retransmission;
    /// established connections and persisted clients live in the verified tables.
    Transient { into: &'static str },
}

/// One layout version of one pinned table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Pin name: stem and `_V<n>`.
    pub pin: &'static str,
    /// The release that introduced it (`RELEASES`); the next, unreleased version for layouts
    /// only this tree has.
    pub since: &'static str,
    pub fate: Fate,
}

/// The release this tree will be (the workspace version).
pub const THIS_RELEASE: &str = "v0.4.0";

const fn cur(pin: &'static str, since: &'static str) -> Layout {
    Layout {
        pin,
        since,
        fate: Fate::Current,
    }
}

const fn old(pin: &'static str, since: &'static str, fate: Fate) -> Layout {
    Layout { pin, since, fate }
}

/// Every layout, oldest release first within a table.
pub const LAYOUTS: &[Layout] = &[
    cur(crate::LISTENER_ADDR_MAP, "v0.1.0"),
    old(
        "CLB_LSN_V1",
        "v0.1.0",
        Fate::Converted {
            into: crate::LISTENER_MAP,
        },
    ),
    cur(crate::LISTENER_MAP, "v0.2.0"),
    cur(crate::BACKEND_MAP, "v0.1.0"),
    cur(crate::BACKEND_ADDR_MAP, "v0.1.0"),
    old(
        "CLB_CONN_V1",
        "v0.1.0",
        Fate::Converted {
            into: crate::CONN_MAP,
        },
    ),
    cur(crate::CONN_MAP, "v0.2.0"),
    old(
        "CLB_HALF_V1",
        "v0.2.0",
        Fate::Transient {
            into: crate::HALF_OPEN_MAP,
        },
    ),
    old(
        "CLB_HALF_V2",
        "v0.3.0",
        Fate::Transient {
            into: crate::HALF_OPEN_MAP,
        },
    ),
    cur(crate::HALF_OPEN_MAP, THIS_RELEASE),
    old(
        "CLB_SESS_V1",
        "v0.1.0",
        Fate::Converted {
            into: crate::SESSION_MAP,
        },
    ),
    cur(crate::SESSION_MAP, "v0.2.0"),
    old(
        "CLB_PSESS_V1",
        "v0.2.0",
        Fate::Transient {
            into: crate::PENDING_SESSION_MAP,
        },
    ),
    cur(crate::PENDING_SESSION_MAP, "v0.3.0"),
    old(
        "CLB_SCHED_V1",
        "v0.1.0",
        Fate::Rebuilt {
            into: crate::SCHED_MAP,
        },
    ),
    cur(crate::SCHED_MAP, "v0.2.0"),
    cur(crate::CURSOR_MAP, "v0.1.0"),
    cur(crate::DEVICE_MAP, "v0.1.0"),
    cur(crate::LISTENER_STATS_MAP, "v0.1.0"),
    cur(crate::BACKEND_STATS_MAP, "v0.1.0"),
    old(
        "CLB_COUNT_V1",
        "v0.1.0",
        Fate::Reset {
            into: crate::COUNTER_MAP,
        },
    ),
    cur(crate::COUNTER_MAP, "v0.2.0"),
    cur(crate::NEXTHOP_MAP, "v0.1.0"),
    cur(crate::DENY_SRC_MAP, "v0.2.0"),
    cur(crate::GLOBAL_MAP, "v0.2.0"),
    cur(crate::SHARED_STATE_MAP, "v0.2.0"),
    cur(crate::CPU_STATE_MAP, "v0.2.0"),
    cur(crate::LISTENER_ADDR6_MAP, "v0.2.0"),
    cur(crate::LISTENER6_MAP, "v0.2.0"),
    cur(crate::BACKEND6_MAP, "v0.2.0"),
    cur(crate::BACKEND_ADDR6_MAP, "v0.2.0"),
    cur(crate::CONN6_MAP, "v0.2.0"),
    old(
        "CLB_HALF6_V1",
        "v0.2.0",
        Fate::Transient {
            into: crate::HALF_OPEN6_MAP,
        },
    ),
    old(
        "CLB_HALF6_V2",
        "v0.3.0",
        Fate::Transient {
            into: crate::HALF_OPEN6_MAP,
        },
    ),
    cur(crate::HALF_OPEN6_MAP, THIS_RELEASE),
    cur(crate::SESSION6_MAP, "v0.2.0"),
    old(
        "CLB_PSESS6_V1",
        "v0.2.0",
        Fate::Transient {
            into: crate::PENDING_SESSION6_MAP,
        },
    ),
    cur(crate::PENDING_SESSION6_MAP, "v0.3.0"),
    cur(crate::DENY_SRC6_MAP, "v0.2.0"),
    cur(crate::NEXTHOP6_MAP, "v0.2.0"),
    cur(crate::PROGRAM_MAP, "v0.2.0"),
    cur(crate::FIB_SCRATCH_MAP, "v0.2.0"),
    cur(crate::ICMP6_SCRATCH_MAP, "v0.2.0"),
    cur(crate::LOAD_MAP, THIS_RELEASE),
    cur(crate::FRAG_MAP, THIS_RELEASE),
    cur(crate::FRAG6_MAP, THIS_RELEASE),
    cur(crate::FRAG6_SCRATCH_MAP, THIS_RELEASE),
];

/// The registry's entry for pin `name` (a resize's `RESIZE_` prefix is the caller's to strip).
pub fn layout(name: &str) -> Option<&'static Layout> {
    LAYOUTS.iter().find(|l| l.pin == name)
}

/// Splits a pin name into its stem and layout version (`CLB_CONN_V2` → (`CLB_CONN`, 2)).
pub fn split_version(name: &str) -> Option<(&str, u32)> {
    let (stem, v) = name.rsplit_once("_V")?;
    Some((stem, v.parse().ok()?))
}

/// For a pin this build does not know: the current pin of the same table, if its stem is
/// known and the pin's version is newer (a newer clb's table: a downgrade).
pub fn newer_than_known(name: &str) -> Option<&'static str> {
    let (stem, v) = split_version(name)?;
    LAYOUTS
        .iter()
        .filter(|l| l.fate == Fate::Current)
        .find(|l| split_version(l.pin).is_some_and(|(s, cv)| s == stem && v > cv))
        .map(|l| l.pin)
}

/// The layouts of v0.1.0 that were converted, and their converters to the current layout
/// (and back, for the property test: what the datapath reads survives both ways).
pub mod v0_1 {
    use bytemuck::{Pod, Zeroable};

    /// `CLB_LSN_V1`'s value: the current [`crate::ListenerInfo`] with the active round-robin
    /// schedule (`half << 16 | len`) where `client_mask` is now (v0.1.0 had no prefix mask:
    /// one persistence entry per address).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
    pub struct ListenerInfo {
        pub persist_ns: u64,
        pub idle_timeout_ns: u64,
        pub vip: u32,
        pub port: u16,
        pub proto: u8,
        pub _pad: u8,
        pub flags: u32,
        pub sched: u32,
    }
    const _: () = assert!(core::mem::size_of::<ListenerInfo>() == 32);

    /// v0.1.0's only listener flag.
    pub const LISTENER_F_ACTIVE: u32 = 1;

    /// `CLB_LSN_V1` → `CLB_LSN_V2`: the schedule moved to its own map (rebuilt by the daemon);
    /// every client address was its own persistence key (mask /32).
    pub const fn listener(v: &ListenerInfo) -> crate::ListenerInfo {
        crate::ListenerInfo {
            persist_ns: v.persist_ns,
            idle_timeout_ns: v.idle_timeout_ns,
            vip: v.vip,
            port: v.port,
            proto: v.proto,
            _pad: 0,
            flags: v.flags & LISTENER_F_ACTIVE,
            client_mask: u32::MAX,
        }
    }

    /// `CLB_LSN_V2` → `CLB_LSN_V1` (the property test's way back; schedule length 0).
    pub const fn listener_back(v: &crate::ListenerInfo) -> ListenerInfo {
        ListenerInfo {
            persist_ns: v.persist_ns,
            idle_timeout_ns: v.idle_timeout_ns,
            vip: v.vip,
            port: v.port,
            proto: v.proto,
            _pad: 0,
            flags: v.flags & LISTENER_F_ACTIVE,
            sched: 0,
        }
    }

    /// `CLB_CONN_V1`'s value: the current [`crate::ConnValue`] without its flags byte.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
    pub struct ConnValue {
        pub last_seen_ns: u64,
        pub backend: u32,
        pub state: u8,
        pub _pad: [u8; 3],
    }
    const _: () = assert!(core::mem::size_of::<ConnValue>() == 16);

    /// `CLB_CONN_V1` → `CLB_CONN_V2` (same key, [`crate::ConnKey`]). In v0.1.0 the table also
    /// held flows whose handshake had not completed; they become verified flows, as v0.1.0
    /// treated them, and expire by their idle or close timeouts. No RST-recovery flag is set
    /// (the flags track packets after an RST, which start from none).
    pub const fn conn(v: &ConnValue) -> crate::ConnValue {
        crate::ConnValue {
            last_seen_ns: v.last_seen_ns,
            backend: v.backend,
            state: v.state,
            flags: 0,
            _pad: [0; 2],
        }
    }

    /// `CLB_CONN_V2` → `CLB_CONN_V1`.
    pub const fn conn_back(v: &crate::ConnValue) -> ConnValue {
        ConnValue {
            last_seen_ns: v.last_seen_ns,
            backend: v.backend,
            state: v.state,
            _pad: [0; 3],
        }
    }

    /// `CLB_SESS_V1` → `CLB_SESS_V2`: the same key and value ([`crate::SessionKey`],
    /// [`crate::SessionValue`]); v0.2.0 gave the table a new meaning (clients with a verified
    /// flow only, keyed by the masked address), which a v0.1.0 entry (an exact address, /32)
    /// already meets.
    pub const fn session(v: &crate::SessionValue) -> crate::SessionValue {
        crate::SessionValue {
            last_seen_ns: v.last_seen_ns,
            backend: v.backend,
            _pad: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_of_this_build_is_current_and_every_older_one_has_a_fate() {
        for m in crate::ALL_MAPS {
            assert_eq!(layout(m).map(|l| l.fate), Some(Fate::Current), "{m}");
        }
        for l in LAYOUTS {
            match l.fate {
                Fate::Current => assert!(crate::ALL_MAPS.contains(&l.pin), "{}", l.pin),
                Fate::Converted { into }
                | Fate::Rebuilt { into }
                | Fate::Reset { into }
                | Fate::Transient { into } => {
                    assert!(crate::ALL_MAPS.contains(&into), "{} → {into}", l.pin);
                    let (a, b) = (split_version(l.pin).unwrap(), split_version(into).unwrap());
                    assert_eq!(a.0, b.0, "{} converts into another table", l.pin);
                    assert!(a.1 < b.1, "{} is not older than {into}", l.pin);
                }
            }
        }
        let mut pins: [&str; LAYOUTS.len()] = [""; LAYOUTS.len()];
        for (i, l) in LAYOUTS.iter().enumerate() {
            pins[i] = l.pin;
        }
        pins.sort_unstable();
        for w in pins.windows(2) {
            assert_ne!(w[0], w[1], "{} listed twice", w[0]);
        }
    }

    /// xorshift64*: reproducible random entries without a dependency.
    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed >> 12;
        *seed ^= *seed << 25;
        *seed ^= *seed >> 27;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    #[test]
    fn random_entries_of_every_earlier_layout_convert_and_back_to_what_the_datapath_reads() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let r = rng(&mut seed);
            let l = v0_1::ListenerInfo {
                persist_ns: rng(&mut seed) % (3601 * crate::NS_PER_SEC),
                idle_timeout_ns: rng(&mut seed),
                vip: r as u32,
                port: (r >> 32) as u16,
                proto: [crate::PROTO_TCP, crate::PROTO_UDP][(r >> 48) as usize & 1],
                _pad: 0,
                flags: (r >> 49) as u32 & v0_1::LISTENER_F_ACTIVE,
                sched: (r >> 50) as u32 & 0x1ffff,
            };
            let now = v0_1::listener(&l);
            // What the datapath reads: the listener's address, timeouts and flags, a /32 mask
            // (v0.1.0 keyed persistence by the whole address), no family or scheduler flag.
            assert_eq!(now.client_mask, u32::MAX);
            assert_eq!(now.flags, l.flags);
            assert_eq!(
                (
                    now.vip,
                    now.port,
                    now.proto,
                    now.persist_ns,
                    now.idle_timeout_ns
                ),
                (l.vip, l.port, l.proto, l.persist_ns, l.idle_timeout_ns)
            );
            assert_eq!(
                v0_1::listener_back(&now),
                v0_1::ListenerInfo { sched: 0, ..l }
            );

            let c = v0_1::ConnValue {
                last_seen_ns: rng(&mut seed),
                backend: rng(&mut seed) as u32 % crate::MAX_BACKENDS,
                state: [crate::CONN_OPEN, crate::CONN_FIN, crate::CONN_RST][r as usize % 3],
                _pad: [0; 3],
            };
            let now = v0_1::conn(&c);
            assert_eq!(
                (now.last_seen_ns, now.backend, now.state, now.flags),
                (c.last_seen_ns, c.backend, c.state, 0)
            );
            assert_eq!(v0_1::conn_back(&now), c);
            // Byte for byte the same 16 bytes where v0.1.0 zeroed its padding.
            assert_eq!(bytemuck::bytes_of(&now), bytemuck::bytes_of(&c));

            let sv = crate::SessionValue {
                last_seen_ns: rng(&mut seed),
                backend: rng(&mut seed) as u32,
                _pad: 0,
            };
            assert_eq!(v0_1::session(&sv), sv);
        }
    }

    #[test]
    fn this_release_is_the_workspace_version() {
        assert_eq!(
            THIS_RELEASE.strip_prefix('v'),
            Some(env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn a_newer_version_of_a_known_table_is_named_as_a_downgrade() {
        assert_eq!(newer_than_known("CLB_CONN_V3"), Some(crate::CONN_MAP));
        assert_eq!(newer_than_known("CLB_CONN_V2"), None);
        assert_eq!(newer_than_known("CLB_CONN_V1"), None);
        assert_eq!(newer_than_known("CLB_WHAT_V9"), None);
        assert_eq!(
            split_version("CLB_LSN_ADDR6_V1"),
            Some(("CLB_LSN_ADDR6", 1))
        );
    }
}
