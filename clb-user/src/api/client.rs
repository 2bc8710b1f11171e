//! The CLI's side of the API: one HTTP/1.1 request per call over the daemon's Unix socket.

use std::path::Path;

use anyhow::{Context as _, anyhow};
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, StatusCode, body::Bytes};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};
use tokio::net::UnixStream;

use super::types::ErrorBody;

/// A refused or failed API call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon refused the request (4xx/5xx) with this message.
    #[error("{message}")]
    Refused { status: u16, message: String },
    #[error(transparent)]
    Transport(#[from] anyhow::Error),
}

/// A client of the daemon at `socket`.
pub struct Client<'a> {
    socket: &'a Path,
}

impl<'a> Client<'a> {
    pub fn new(socket: &'a Path) -> Self {
        Self { socket }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        let stream = UnixStream::connect(self.socket).await.with_context(|| {
            format!(
                "connecting to the clb daemon at {} (is it running? set --api or CLB_API)",
                self.socket.display()
            )
        })?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("API handshake")?;
        let conn = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "clb");
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| anyhow!("building the request: {e}"))?;
        let resp = send.send_request(req).await.context("API request")?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .context("reading the API answer")?
            .to_bytes();
        conn.abort();
        if status.is_success() {
            return Ok(bytes);
        }
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        Err(ClientError::Refused {
            status: status.as_u16(),
            message,
        })
    }

    /// GET and decode.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let b = self.call(Method::GET, path, None).await?;
        serde_json::from_slice(&b)
            .with_context(|| format!("decoding the answer to GET {path}"))
            .map_err(ClientError::Transport)
    }

    /// GET a text answer (`/v1/config`).
    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let b = self.call(Method::GET, path, None).await?;
        String::from_utf8(b.to_vec())
            .with_context(|| format!("decoding the answer to GET {path}"))
            .map_err(ClientError::Transport)
    }

    /// DELETE and decode the answer.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let b = self.call(Method::DELETE, path, None).await?;
        serde_json::from_slice(&b)
            .with_context(|| format!("decoding the answer to DELETE {path}"))
            .map_err(ClientError::Transport)
    }

    /// POST without a body and decode the answer.
    pub async fn post<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let b = self.call(Method::POST, path, None).await?;
        serde_json::from_slice(&b)
            .with_context(|| format!("decoding the answer to POST {path}"))
            .map_err(ClientError::Transport)
    }

    /// A request with a JSON body, answer ignored.
    pub async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<(), ClientError> {
        let b = serde_json::to_vec(body).context("encoding the request")?;
        self.call(method, path, Some(b)).await.map(drop)
    }

    /// A request with a JSON body, answer decoded.
    pub async fn exchange<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let b = serde_json::to_vec(body).context("encoding the request")?;
        let what = format!("{method} {path}");
        let a = self.call(method, path, Some(b)).await?;
        serde_json::from_slice(&a)
            .with_context(|| format!("decoding the answer to {what}"))
            .map_err(ClientError::Transport)
    }

    /// A request without a body, answer ignored.
    pub async fn send_empty(&self, method: Method, path: &str) -> Result<(), ClientError> {
        self.call(method, path, None).await.map(drop)
    }
}

/// Percent-encodes a path segment or query value (names are restricted, but addresses carry
/// ':' and '/').
pub fn seg(s: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~')
        .remove(b':');
    percent_encoding::utf8_percent_encode(s, SET).to_string()
}

/// Whether a refusal is a "not found".
pub fn is_not_found(e: &ClientError) -> bool {
    matches!(e, ClientError::Refused { status, .. } if *status == StatusCode::NOT_FOUND.as_u16())
}
