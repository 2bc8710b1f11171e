//! TLS termination of HTTPS listeners (rustls, through tokio-rustls).
//!
//! - TLS 1.3 and 1.2, the *ring* provider's default cipher suites and key exchanges (see
//!   [`crate::certs`] for why *ring*); ALPN offers `h2` and `http/1.1`.
//! - The certificate is chosen by the client's SNI among the listener's certificates: an exact
//!   name first, then a wildcard; a client that sends no SNI, or a name no certificate holds,
//!   gets the first one.
//! - Session resumption: TLS 1.3 tickets and TLS 1.2 tickets sealed with a key the ticketer
//!   rotates every 6 hours (the previous key still opens tickets for another 6), plus a
//!   stateful cache of [`SESSION_CACHE`] sessions for clients without ticket support.
//! - Certificates are swapped in place ([`Tls::set_certs`]): the listener's [`ServerConfig`],
//!   its ticket keys and session cache stay, so connections keep their session and clients
//!   keep resuming after a rotation; only new handshakes see the new certificate.
//! - A handshake must finish within [`HANDSHAKE_TIMEOUT`] (a slow or silent client is cut);
//!   failures are counted by reason, never logged per connection.

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use rustls::{
    ServerConfig,
    server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache},
    sign::CertifiedKey,
};
use tokio_rustls::TlsAcceptor;

use crate::certs::{Loaded, provider};

/// Time a client has to complete the TLS handshake once connected.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// TLS 1.2 sessions kept for stateful resumption (per listener).
pub const SESSION_CACHE: usize = 4096;

/// Picks the certificate for a client's SNI from the listener's current set.
#[derive(Debug)]
pub struct Resolver {
    certs: ArcSwap<Vec<Loaded>>,
}

impl Resolver {
    /// The certificate for `sni` among `certs`: an exact name, then a wildcard, then the first.
    pub fn pick<'a>(certs: &'a [Loaded], sni: Option<&str>) -> Option<&'a Loaded> {
        if let Some(host) = sni {
            let host = host.trim_end_matches('.');
            if let Some(c) = certs
                .iter()
                .find(|c| c.names.iter().any(|n| n.eq_ignore_ascii_case(host)))
            {
                return Some(c);
            }
            if let Some(c) = certs.iter().find(|c| c.serves(host)) {
                return Some(c);
            }
        }
        certs.first()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let certs = self.certs.load();
        Self::pick(&certs, hello.server_name()).map(|c| c.key.clone())
    }
}

/// Why a handshake failed, as counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Not finished within [`HANDSHAKE_TIMEOUT`].
    Timeout,
    /// The client closed or reset the connection during the handshake.
    Closed,
    /// Not TLS, or TLS the listener does not speak (bad record, no shared version or cipher
    /// suite, an alert from the client).
    Protocol,
}

impl Failure {
    pub const ALL: [Failure; 3] = [Failure::Timeout, Failure::Closed, Failure::Protocol];

    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Closed => "closed",
            Failure::Protocol => "protocol",
        }
    }

    /// The reason of a failed `accept`.
    pub fn of(e: &std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        match e.kind() {
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => Failure::Closed,
            _ => Failure::Protocol,
        }
    }
}

/// One HTTPS listener's TLS side.
pub struct Tls {
    resolver: Arc<Resolver>,
    pub acceptor: TlsAcceptor,
}

impl Tls {
    pub fn new(certs: &[Loaded]) -> anyhow::Result<Self> {
        let resolver = Arc::new(Resolver {
            certs: ArcSwap::from_pointee(certs.to_vec()),
        });
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        cfg.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
        cfg.ticketer = rustls::crypto::ring::Ticketer::new()?;
        Ok(Self {
            resolver,
            acceptor: TlsAcceptor::from(Arc::new(cfg)),
        })
    }

    /// Serves `certs` to new handshakes from now on.
    pub fn set_certs(&self, certs: &[Loaded]) {
        let now = self.resolver.certs.load();
        let same = now.len() == certs.len()
            && now
                .iter()
                .zip(certs)
                .all(|(a, b)| a.fingerprint == b.fingerprint && a.spec == b.spec);
        if !same {
            self.resolver.certs.store(Arc::new(certs.to_vec()));
        }
    }
}

/// What a connection negotiated, for the request path and the access log.
#[derive(Clone, Debug, Default)]
pub struct ConnInfo {
    /// TLS was terminated on this connection.
    pub tls: bool,
    /// HTTP/2 (ALPN `h2`).
    pub h2: bool,
    /// The TLS version, "TLSv1.3" or "TLSv1.2".
    pub version: Option<&'static str>,
    /// The name the client asked for.
    pub sni: Option<String>,
}

impl ConnInfo {
    /// What the handshake of `conn` settled.
    pub fn of(conn: &rustls::ServerConnection) -> Self {
        Self {
            tls: true,
            h2: conn.alpn_protocol() == Some(b"h2"),
            version: conn.protocol_version().map(|v| match v {
                rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
                rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
                _ => "TLS",
            }),
            sni: conn.server_name().map(str::to_owned),
        }
    }
}
