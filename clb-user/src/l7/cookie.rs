//! The persistence cookie: names a backend without exposing its address, and cannot be
//! forged to pick another one.
//!
//! Value: base64url(tag ‖ expiry ‖ mac), 32 bytes → 43 characters, where
//! - `tag` (8 bytes) = HMAC-SHA256(key, "tag" ‖ listener ‖ backend address)[..8]: an opaque,
//!   stable name of the backend within the listener;
//! - `expiry` (8 bytes, big-endian unix seconds): checked by the balancer too, not only by
//!   the browser's `Max-Age`;
//! - `mac` (16 bytes) = HMAC-SHA256(key, "cookie" ‖ listener ‖ tag ‖ expiry)[..16].
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

    /// The cookie value for backend `tag`, valid until `expiry` (unix seconds).
    pub fn encode(&self, listener: &str, tag: [u8; 8], expiry: u64) -> String {
        let mut raw = [0u8; RAW_LEN];
        raw[..8].copy_from_slice(&tag);
        raw[8..16].copy_from_slice(&expiry.to_be_bytes());
        let mac = self
            .mac(&[b"cookie", listener.as_bytes(), &raw[..16]])
            .finalize()
            .into_bytes();
        raw[16..].copy_from_slice(&mac[..16]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The backend tag and expiry of a cookie value, if it is authentic and not expired at
    /// `now` (unix seconds). Anything else is `None`: the request is simply rescheduled.
    pub fn decode(&self, listener: &str, value: &str, now: u64) -> Option<([u8; 8], u64)> {
        let raw = URL_SAFE_NO_PAD.decode(value.trim()).ok()?;
        if raw.len() != RAW_LEN {
            return None;
        }
        // Constant-time comparison of the truncated MAC.
        self.mac(&[b"cookie", listener.as_bytes(), &raw[..16]])
            .verify_truncated_left(&raw[16..])
            .ok()?;
        let expiry = u64::from_be_bytes(raw[8..16].try_into().ok()?);
        if expiry <= now {
            return None;
        }
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&raw[..8]);
        Some((tag, expiry))
    }
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
        assert_eq!(k.decode("shop", &v, 999), Some((tag, 1000)));
        assert_eq!(k.decode("shop", &v, 1000), None, "expired");
        assert_eq!(k.decode("other", &v, 999), None, "bound to its listener");
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
        assert_eq!(k.decode("shop", &URL_SAFE_NO_PAD.encode(&raw), 1), None);
        raw[..8].copy_from_slice(&tag);
        raw[15] ^= 1; // extend the expiry
        assert_eq!(k.decode("shop", &URL_SAFE_NO_PAD.encode(&raw), 1), None);
        assert_eq!(
            CookieKey([8u8; 32]).decode("shop", &v, 1),
            None,
            "another daemon's key"
        );
        assert_eq!(k.decode("shop", "garbage", 1), None);
        assert_eq!(k.decode("shop", "", 1), None);
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
