//! One-time console sign-in links, issued through the local API (`clb console link`): the
//! path into the console that failed sign-ins from the same address cannot close, because
//! only someone who can use the API socket (mode 0600, the operator who can also read the
//! token file) can ask for one. A code is 32 random bytes, good for one sign-in within
//! [`CODE_TTL`]; at most [`MAX_CODES`] are outstanding.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::control::lock;

/// A code is good for this long.
pub const CODE_TTL: Duration = Duration::from_secs(120);
/// Codes outstanding at once (the oldest is dropped beyond).
pub const MAX_CODES: usize = 16;

/// The codes the daemon has issued and not yet seen used.
pub struct SignInCodes {
    console: Option<SocketAddr>,
    codes: Mutex<HashMap<String, Instant>>,
}

impl SignInCodes {
    /// Codes for the console on `console` (none: the console is off, no code is issued).
    pub fn new(console: Option<SocketAddr>) -> Self {
        Self {
            console,
            codes: Mutex::new(HashMap::new()),
        }
    }

    /// The console's address, if it is on.
    pub fn console(&self) -> Option<SocketAddr> {
        self.console
    }

    /// A new code, or `None` when the console is off or no randomness is available.
    pub fn issue(&self, now: Instant) -> Option<String> {
        self.console?;
        let mut b = [0u8; 32];
        getrandom::fill(&mut b).ok()?;
        let code: String = b.iter().map(|x| format!("{x:02x}")).collect();
        let mut c = lock(&self.codes);
        c.retain(|_, t| now.duration_since(*t) < CODE_TTL);
        while c.len() >= MAX_CODES {
            let Some(oldest) = c.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone()) else {
                break;
            };
            c.remove(&oldest);
        }
        c.insert(code.clone(), now);
        Some(code)
    }

    /// Whether `code` is a live code; it is used up either way.
    pub fn redeem(&self, code: &str, now: Instant) -> bool {
        let mut c = lock(&self.codes);
        c.retain(|_, t| now.duration_since(*t) < CODE_TTL);
        c.remove(code).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_signs_in_once_and_only_while_fresh() {
        let s = SignInCodes::new(Some("127.0.0.1:9902".parse().unwrap()));
        let t = Instant::now();
        let a = s.issue(t).unwrap();
        assert_eq!(a.len(), 64);
        assert!(!s.redeem("nope", t));
        assert!(s.redeem(&a, t));
        assert!(!s.redeem(&a, t), "used up");
        let b = s.issue(t).unwrap();
        assert!(!s.redeem(&b, t + CODE_TTL), "expired");
        for _ in 0..MAX_CODES + 3 {
            s.issue(t);
        }
        assert!(lock(&s.codes).len() <= MAX_CODES);
        assert!(SignInCodes::new(None).issue(t).is_none(), "console off");
    }
}
