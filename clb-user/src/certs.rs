//! TLS certificates of HTTPS listeners, read from PEM files and checked before they are used:
//! a chain whose leaf names at least one host, a private key that matches it, and a validity
//! period that includes now. Anything else is refused with an error that names the file, so a
//! change or a reload with a bad file changes nothing.
//!
//! The crypto provider is *ring* (rustls' `ring` feature): its assembly covers the
//! handshake's X25519, P-256 and AES-GCM / ChaCha20 on x86-64 and aarch64, it builds with a C
//! compiler alone (aws-lc-rs would add CMake and a much longer first build to every machine's
//! setup), and it is what the TLS benchmark measures.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::{SystemTime, UNIX_EPOCH},
};

use rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    sign::CertifiedKey,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// One certificate of an HTTPS listener: the PEM file of its chain (leaf first) and of its
/// private key (PKCS#8, PKCS#1 or SEC1).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertSpec {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate as loaded: ready to serve, with what operators are shown of it.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub spec: CertSpec,
    pub key: Arc<CertifiedKey>,
    /// Host names and addresses of the leaf (its subject alternative names), lowercase.
    pub names: Vec<String>,
    /// Validity, unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// SHA-256 of the leaf certificate (DER), hex: tells a renewed file from the old one.
    pub fingerprint: String,
}

impl Loaded {
    /// The name the certificate goes by (`clb listener set --rm-cert NAME`): its first name.
    pub fn name(&self) -> &str {
        self.names.first().map_or("", String::as_str)
    }

    /// Whether the certificate is for `host` (a client's SNI), wildcards included.
    pub fn serves(&self, host: &str) -> bool {
        self.names.iter().any(|n| name_matches(n, host))
    }
}

/// Why a certificate or key file was refused.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {}: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{} holds no PEM certificate", file.display())]
    NoCertificate { file: PathBuf },
    #[error("{} holds no usable PEM private key: {why}", file.display())]
    BadKey { file: PathBuf, why: String },
    #[error("{}: not a valid X.509 certificate: {why}", file.display())]
    BadCertificate { file: PathBuf, why: String },
    #[error(
        "the key in {} does not match the certificate in {} ({why})",
        key.display(),
        cert.display()
    )]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        why: String,
    },
    #[error("the certificate in {} expired at {not_after} (unix time)", file.display())]
    Expired { file: PathBuf, not_after: i64 },
    #[error("the certificate in {} is valid only from {not_before} (unix time)", file.display())]
    NotYetValid { file: PathBuf, not_before: i64 },
    #[error(
        "the certificate in {} names no host (no DNS name or address in its subject alternative names): no client could verify it",
        file.display()
    )]
    NoNames { file: PathBuf },
}

/// The crypto provider every TLS listener uses (see the module docs).
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

fn read(file: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(file).map_err(|source| CertError::Read {
        file: file.to_owned(),
        source,
    })
}

fn unix_now(now: SystemTime) -> i64 {
    now.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Loads and checks `spec` at time `now`.
pub fn load(spec: &CertSpec, now: SystemTime) -> Result<Loaded, CertError> {
    let pem = read(&spec.cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::BadCertificate {
            file: spec.cert.clone(),
            why: e.to_string(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCertificate {
            file: spec.cert.clone(),
        });
    };
    let (names, not_before, not_after) = inspect(&spec.cert, leaf)?;
    let key_pem = read(&spec.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| CertError::BadKey {
        file: spec.key.clone(),
        why: e.to_string(),
    })?;
    let fingerprint = hex(&Sha256::digest(leaf.as_ref()));
    let ck = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(k) => CertError::Mismatch {
            cert: spec.cert.clone(),
            key: spec.key.clone(),
            why: format!("{k:?}"),
        },
        e => CertError::BadKey {
            file: spec.key.clone(),
            why: e.to_string(),
        },
    })?;
    let t = unix_now(now);
    if t > not_after {
        return Err(CertError::Expired {
            file: spec.cert.clone(),
            not_after,
        });
    }
    if t < not_before {
        return Err(CertError::NotYetValid {
            file: spec.cert.clone(),
            not_before,
        });
    }
    Ok(Loaded {
        spec: spec.clone(),
        key: Arc::new(ck),
        names,
        not_before,
        not_after,
        fingerprint,
    })
}

/// The leaf's names (subject alternative names: DNS names, IP addresses) and validity.
fn inspect(file: &Path, leaf: &CertificateDer<'_>) -> Result<(Vec<String>, i64, i64), CertError> {
    let bad = |why: String| CertError::BadCertificate {
        file: file.to_owned(),
        why,
    };
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| bad(e.to_string()))?;
    let mut names = Vec::new();
    if let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| bad(e.to_string()))?
    {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => {
                    names.push(d.to_ascii_lowercase())
                }
                x509_parser::extensions::GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        names.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    if names.is_empty() {
        return Err(CertError::NoNames {
            file: file.to_owned(),
        });
    }
    let v = cert.validity();
    Ok((names, v.not_before.timestamp(), v.not_after.timestamp()))
}

/// Whether certificate name `pattern` covers `host` (case-insensitive; a leading `*.` stands
/// for exactly one label, as RFC 6125 has it).
pub fn name_matches(pattern: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.');
    if let Some(rest) = pattern.strip_prefix("*.") {
        return host
            .split_once('.')
            .is_some_and(|(label, tail)| !label.is_empty() && tail.eq_ignore_ascii_case(rest));
    }
    pattern.eq_ignore_ascii_case(host)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_one_label() {
        assert!(name_matches("shop.example", "SHOP.example."));
        assert!(name_matches("*.example", "a.example"));
        assert!(!name_matches("*.example", "example"));
        assert!(!name_matches("*.example", "a.b.example"));
        assert!(!name_matches("*.example", ".example"));
        assert!(!name_matches("shop.example", "shop.example.org"));
    }

    #[test]
    fn missing_and_garbage_files_are_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("clb-certs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spec = |c: &str, k: &str| CertSpec {
            cert: dir.join(c),
            key: dir.join(k),
        };
        let e = load(&spec("none.pem", "none.key"), SystemTime::now()).unwrap_err();
        assert!(e.to_string().contains("none.pem"), "{e}");
        std::fs::write(dir.join("garbage.pem"), "not a certificate\n").unwrap();
        let e = load(&spec("garbage.pem", "none.key"), SystemTime::now()).unwrap_err();
        assert!(matches!(e, CertError::NoCertificate { .. }), "{e}");
        assert!(e.to_string().contains("garbage.pem"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
