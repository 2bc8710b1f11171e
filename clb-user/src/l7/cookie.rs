//! The persistence cookie: names a backend without exposing its address, and cannot be
//! forged to pick another one.
//!
//! Value: base64url(tag ‖ issued ‖ mac), 32 bytes → 43 characters, where
//! - `tag` (8 bytes) = HMAC-SHA256(key, "tag" ‖ listener ‖ backend address)[..8]: an opaque,
//!   stable name of the backend within the listener;
//! - `issued` (8 bytes, big-endian unix seconds): when the balancer set it. The cookie is
//!   valid until `issued + persist` with the listener's *current* `persist`, checked by the
//!   balancer, not only by the browser's `Max-Age`: lowering `persist` applies to cookies
//!   already out there;
//! - `mac` (16 bytes) = HMAC-SHA256(key, "cookie-v2" ‖ listener ‖ tag ‖ issued)[..16].
//!
//! Cookies of earlier releases (v0.3.0 and before) carried their expiry instead of their issue time (MAC domain
//! "cookie"): they are still honoured — until that expiry, and never longer than `persist`
//! from now — and replaced by a current one on their first use, so an upgrade forgets no
//! client.
//!
//! The key is 32 random bytes the daemon keeps across restarts ([`load_or_create_key`]).

use std::{io::Write as _, net::SocketAddr, os::unix::fs::OpenOptionsExt as _, path::Path};

use anyhow::Context as _;
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Length of the decoded cookie value.
const RAW_LEN: usize = 8 + 8 + 16;

/// The 32-byte HMAC key.
#[derive(Clone)]
pub struct CookieKey(pub [u8; 32]);

impl std::fmt::Debug for CookieKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CookieKey(..)")
    }
}

impl CookieKey {
    fn mac(&self, parts: &[&[u8]]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        for p in parts {
            // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
            m.update(&(p.len() as u32).to_be_bytes());
            m.update(p);
        }
        m
    }

    /// The opaque name of `backend` within `listener`.
    pub fn tag(&self, listener: &str, backend: SocketAddr) -> [u8; 8] {
        let out = self
            .mac(&[b"tag", listener.as_bytes(), backend.to_string().as_bytes()])
            .finalize()
            .into_bytes();
        let mut t = [0u8; 8];
        t.copy_from_slice(&out[..8]);
        t
    }

    fn seal(&self, domain: &[u8], listener: &str, tag: [u8; 8], time: u64) -> String {
        let mut raw = [0u8; RAW_LEN];
        raw[..8].copy_from_slice(&tag);
        raw[8..16].copy_from_slice(&time.to_be_bytes());
        let mac = self
            .mac(&[domain, listener.as_bytes(), &raw[..16]])
            .finalize()
            .into_bytes();
        raw[16..].copy_from_slice(&mac[..16]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The cookie value for backend `tag`, issued at `issued` (unix seconds).
    pub fn encode(&self, listener: &str, tag: [u8; 8], issued: u64) -> String {
        self.seal(V2, listener, tag, issued)
    }

    /// A cookie as releases up to v0.3.0 wrote it (valid until `expiry`), for the tests of the
    /// upgrade path.
    pub fn encode_legacy(&self, listener: &str, tag: [u8; 8], expiry: u64) -> String {
        self.seal(V1, listener, tag, expiry)
    }

    /// What a cookie value says, if it is authentic and still valid at `now` (unix seconds)
    /// under persistence `persist` (seconds). Anything else is `None`: the request is simply
    /// rescheduled.
    pub fn decode(&self, listener: &str, value: &str, now: u64, persist: u32) -> Option<Cookie> {
        let raw = URL_SAFE_NO_PAD.decode(value.trim()).ok()?;
        if raw.len() != RAW_LEN {
            return None;
        }
        let time = u64::from_be_bytes(raw[8..16].try_into().ok()?);
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&raw[..8]);
        // Constant-time comparisons of the truncated MAC.
        let authentic = |domain: &[u8]| {
            self.mac(&[domain, listener.as_bytes(), &raw[..16]])
                .verify_truncated_left(&raw[16..])
                .is_ok()
        };
        let limit = now.saturating_add(u64::from(persist));
        let (expiry, legacy) = if authentic(V2) {
            // Issued in the future (beyond clock steps between restarts): not ours to honour.
            if time > now.saturating_add(MAX_CLOCK_SKEW) {
                return None;
            }
            (time.saturating_add(u64::from(persist)).min(limit), false)
        } else if authentic(V1) {
            (time.min(limit), true)
        } else {
            return None;
        };
        (expiry > now).then_some(Cookie {
            tag,
            expiry,
            legacy,
        })
    }
}

/// MAC domains of the two cookie formats.
const V2: &[u8] = b"cookie-v2";
const V1: &[u8] = b"cookie";
/// How far in the future an issue time may lie (the clock stepped back since).
const MAX_CLOCK_SKEW: u64 = 300;

/// A valid persistence cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cookie {
    /// The backend it names.
    pub tag: [u8; 8],
    /// When it stops being honoured (unix seconds), under the current `persist`.
    pub expiry: u64,
    /// Written by a release up to v0.3.0 (it carries its expiry): to be replaced.
    pub legacy: bool,
}

/// Loads the key from `path`, creating it (32 random bytes from the kernel's CSPRNG, mode 0600,
/// written to a temp file and renamed) if it does not exist.
pub fn load_or_create_key(path: &Path) -> anyhow::Result<CookieKey> {
    match std::fs::read(path) {
        Ok(b) if b.len() == 32 => {
            let mut k = [0u8; 32];
            k.copy_from_slice(&b);
            return Ok(CookieKey(k));
        }
        Ok(b) => anyhow::bail!(
            "{} holds {} bytes, not a 32-byte key",
            path.display(),
            b.len()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).map_err(|e| anyhow::anyhow!("getting 32 random bytes: {e}"))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".cookie-key.tmp.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(&k)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(CookieKey(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> CookieKey {
        CookieKey([7u8; 32])
    }

    #[test]
    fn round_trip_and_expiry() {
        let k = key();
        let b: SocketAddr = "10.0.10.2:8080".parse().unwrap();
        let tag = k.tag("shop", b);
        let v = k.encode("shop", tag, 1000);
        assert_eq!(v.len(), 43);
        assert!(!v.contains("10.0.10.2"), "the address is not exposed");
        let ok = |now, persist| {
            k.decode("shop", &v, now, persist)
                .map(|c| (c.tag, c.expiry))
        };
        assert_eq!(ok(1599, 600), Some((tag, 1600)));
        assert_eq!(ok(1600, 600), None, "expired");
        assert_eq!(
            k.decode("other", &v, 1001, 600),
            None,
            "bound to its listener"
        );
        // Lowering persist applies to cookies already issued; raising it extends them.
        assert_eq!(ok(1100, 60), None);
        assert_eq!(ok(1059, 60), Some((tag, 1060)));
        assert_eq!(ok(2000, 3600), Some((tag, 4600)));
        // Issued far in the future: refused.
        assert_eq!(ok(500, 3600), None);
    }

    #[test]
    fn cookies_of_earlier_releases_are_honoured_within_the_current_persist() {
        let k = key();
        let tag = k.tag("shop", "10.0.10.2:8080".parse().unwrap());
        let old = k.encode_legacy("shop", tag, 5000);
        let c = k.decode("shop", &old, 1000, 600).unwrap();
        assert_eq!((c.tag, c.expiry, c.legacy), (tag, 1600, true));
        assert_eq!(k.decode("shop", &old, 4000, 3600).unwrap().expiry, 5000);
        assert_eq!(
            k.decode("shop", &old, 5000, 3600),
            None,
            "its own expiry holds"
        );
        assert!(
            !k.decode("shop", &k.encode("shop", tag, 1000), 1000, 600)
                .unwrap()
                .legacy
        );
    }

    #[test]
    fn tampering_and_other_keys_are_refused() {
        let k = key();
        let tag = k.tag("shop", "10.0.10.2:8080".parse().unwrap());
        let other = k.tag("shop", "10.0.11.2:8080".parse().unwrap());
        assert_ne!(tag, other);
        let v = k.encode("shop", tag, 1000);
        let mut raw = URL_SAFE_NO_PAD.decode(&v).unwrap();
        raw[..8].copy_from_slice(&other); // point it at another backend
        assert_eq!(
            k.decode("shop", &URL_SAFE_NO_PAD.encode(&raw), 1001, 600),
            None
        );
        raw[..8].copy_from_slice(&tag);
        raw[15] ^= 1; // move the issue time
        assert_eq!(
            k.decode("shop", &URL_SAFE_NO_PAD.encode(&raw), 1001, 600),
            None
        );
        assert_eq!(
            CookieKey([8u8; 32]).decode("shop", &v, 1001, 600),
            None,
            "another daemon's key"
        );
        assert_eq!(k.decode("shop", "garbage", 1, 600), None);
        assert_eq!(k.decode("shop", "", 1, 600), None);
    }

    #[test]
    fn key_file_is_created_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("clb-key-test-{}", std::process::id()));
        let p = dir.join("cookie.key");
        let a = load_or_create_key(&p).unwrap();
        let b = load_or_create_key(&p).unwrap();
        assert_eq!(a.0, b.0);
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
