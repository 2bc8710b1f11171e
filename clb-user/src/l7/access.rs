//! The HTTP access log: one line per request, written by a task of its own so that the
//! request path never waits for it. Requests hand their entry to a bounded queue
//! ([`QUEUE`] entries); when it is full the entry is dropped and counted
//! (`clb_http_access_log_dropped_total`), never waited for.
//!
//! Formats (`clb daemon --access-log FILE|- --access-log-format json|text`): one JSON object
//! per line, or a plain line
//! `TIME LISTENER CLIENT "METHOD PATH" PROTO STATUS BYTES BACKEND DURATION_MS PERSISTENCE TLS SNI`
//! (`-` for an absent field). An entry is written once its response body has been sent (or
//! the client went away), so `bytes` and `duration_ms` cover the whole response.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::{io::AsyncWriteExt as _, sync::mpsc};
use tracing::warn;

/// Entries waiting to be written at most.
pub const QUEUE: usize = 8192;
/// Longest path written (longer ones are cut, marked with `...`).
pub const MAX_PATH: usize = 2048;

/// The format of the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Json,
    Text,
}

/// One request as logged.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub listener: String,
    pub client: SocketAddr,
    pub method: String,
    pub path: String,
    /// `h1` or `h2`.
    pub proto: &'static str,
    pub status: u16,
    /// Response body bytes sent.
    pub bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<SocketAddr>,
    /// From the request head to the end of the response.
    pub duration_ms: f64,
    /// `new` (no cookie, one was set), `hit` (routed by its cookie), `rescheduled` (a cookie
    /// that could not be used: expired, tampered, of a backend gone or not accepting), `off`.
    pub persistence: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
}

impl Entry {
    fn text(&self) -> String {
        let o = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        format!(
            "{} {} {} \"{} {}\" {} {} {} {} {:.3} {} {} {}\n",
            self.time,
            self.listener,
            self.client,
            self.method,
            self.path.replace('"', "%22"),
            self.proto,
            self.status,
            self.bytes,
            o(self.backend.map(|b| b.to_string())),
            self.duration_ms,
            self.persistence,
            self.tls.unwrap_or("-"),
            o(self.sni.clone()),
        )
    }
}

/// A path as logged: cut at [`MAX_PATH`] bytes (on a character boundary).
pub fn path(p: &str) -> String {
    if p.len() <= MAX_PATH {
        return p.to_owned();
    }
    let mut end = MAX_PATH;
    while !p.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &p[..end])
}

/// The log's sending side, shared by every listener.
pub struct AccessLog {
    tx: mpsc::Sender<Entry>,
    dropped: AtomicU64,
    written: Arc<AtomicU64>,
}

impl AccessLog {
    /// Opens `dest` (`-`: standard output; a file is appended to, created mode 0640) and
    /// starts the writer task.
    pub async fn open(dest: PathBuf, format: Format) -> anyhow::Result<Arc<Self>> {
        let out: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = if dest.as_os_str() == "-" {
            Box::new(tokio::io::stdout())
        } else {
            use std::os::unix::fs::OpenOptionsExt as _;
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(&dest)
                .map_err(|e| anyhow::anyhow!("opening the access log {}: {e}", dest.display()))?;
            Box::new(tokio::fs::File::from_std(f))
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        let written = Arc::new(AtomicU64::new(0));
        tokio::spawn(write_loop(rx, out, format, written.clone()));
        Ok(Arc::new(Self {
            tx,
            dropped: AtomicU64::new(0),
            written,
        }))
    }

    /// Queues `e`, or counts it dropped if the queue is full.
    pub fn log(&self, e: Entry) {
        if self.tx.try_send(e).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (entries written, entries dropped).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.written.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }
}

async fn write_loop(
    mut rx: mpsc::Receiver<Entry>,
    out: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    format: Format,
    written: Arc<AtomicU64>,
) {
    let mut out = tokio::io::BufWriter::with_capacity(64 * 1024, out);
    let mut failed = false;
    while let Some(e) = rx.recv().await {
        let mut batch = vec![e];
        while batch.len() < 1024
            && let Ok(e) = rx.try_recv()
        {
            batch.push(e);
        }
        let mut buf = String::new();
        for e in &batch {
            match format {
                Format::Json => {
                    buf.push_str(&serde_json::to_string(e).unwrap_or_default());
                    buf.push('\n');
                }
                Format::Text => buf.push_str(&e.text()),
            }
        }
        let r = async {
            out.write_all(buf.as_bytes()).await?;
            out.flush().await
        };
        match tokio::time::timeout(Duration::from_secs(5), r).await {
            Ok(Ok(())) => {
                written.fetch_add(batch.len() as u64, Ordering::Relaxed);
                failed = false;
            }
            Ok(Err(e)) if !failed => {
                warn!("writing the access log: {e} (entries are dropped until it works again)");
                failed = true;
            }
            Err(_) if !failed => {
                warn!("the access log did not take a write within 5 s");
                failed = true;
            }
            _ => {}
        }
    }
}

/// RFC 3339 UTC with milliseconds of the current time.
pub fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    crate::time::rfc3339_ms(d.as_millis() as i64)
}
