//! Schedulers: how a listener's accepting backends become the schedule the datapath indexes.
//! Each is a pure function of the backends' identities and weights, computed in user space.
//!
//! - [`wrr`]: the smooth weighted round-robin sequence, walked by a shared cursor (the
//!   default, the cloud service's "polling"); also indexed by the stateless hash in flood mode.
//! - [`maglev`]: Maglev's lookup table, indexed by a hash of the client: every node computes
//!   the same table from the same configuration, whatever ids it gave the backends.

pub mod maglev;
pub mod wrr;

use std::net::SocketAddr;

/// One accepting backend as a scheduler sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// The node-local id the schedule holds.
    pub id: u32,
    /// The identity every node agrees on.
    pub addr: SocketAddr,
    /// Weight, > 0.
    pub weight: u32,
}

/// Computes a listener's schedule.
pub trait Scheduler {
    /// The schedule for `members` (all accepting, weight > 0): a sequence of their ids.
    fn schedule(&self, members: &[Member]) -> Vec<u32>;
}
