//! A client for the API socket (what `vmmctl` uses): hyper 1 over a tokio
//! `UnixStream`, one request per connection.
//!
//! [`request`] is the async call; [`call`] wraps it in a current-thread
//! runtime for blocking callers.

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

/// Errors talking to the socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody answers at the socket (or it does not exist).
    #[error("cannot connect to API socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The method or URI cannot be sent.
    #[error("invalid request: {0}")]
    Request(String),
    /// The HTTP exchange failed.
    #[error("API request failed")]
    Http(#[from] hyper::Error),
    /// The reply is not something we take.
    #[error("malformed API reply: {0}")]
    Reply(String),
    /// No complete reply within [`TIMEOUT`].
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The runtime for [`call`] could not be built.
    #[error("cannot start the client runtime")]
    Runtime(#[source] std::io::Error),
}

/// How long a call may take (a pause waits for every vCPU, a snapshot
/// writes all of guest memory).
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// Largest reply body read.
pub const MAX_REPLY: usize = 64 << 20;

/// Sends `method uri` (an origin-form URI such as `/status`) with an
/// optional JSON body (sent as `application/json`) and returns the status
/// code and the body (lossily decoded as UTF-8). Any status is a success
/// here; judging it is the caller's business.
pub async fn request(
    socket: &Path,
    method: &str,
    uri: &str,
    body: Option<&str>,
) -> Result<(u16, String), ClientError> {
    let method =
        Method::from_bytes(method.as_bytes()).map_err(|e| ClientError::Request(e.to_string()))?;
    if !uri.starts_with('/') {
        return Err(ClientError::Request(format!(
            "URI {uri:?} must start with /"
        )));
    }
    let mut builder = Request::builder()
        .method(method)
        .uri(uri)
        .header(HOST, "localhost");
    if body.is_some() {
        builder = builder.header(CONTENT_TYPE, "application/json");
    }
    let req = builder
        .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
        .map_err(|e| ClientError::Request(e.to_string()))?;

    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection is driven next to the request; it ends when the
    // reply is read and `sender` dropped.
    let exchange = async move {
        let reply = sender.send_request(req).await?;
        let status = reply.status().as_u16();
        let bytes = Limited::new(reply.into_body(), MAX_REPLY)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => ClientError::Http(*e),
                Err(e) => ClientError::Reply(e.to_string()),
            })?
            .to_bytes();
        Ok::<_, ClientError>((status, String::from_utf8_lossy(&bytes).into_owned()))
    };
    let (result, _) = tokio::join!(exchange, async {
        if let Err(e) = connection.await {
            tracing::debug!("API client connection: {e}");
        }
    });
    result
}

/// [`request`] for blocking callers, within [`TIMEOUT`].
pub fn call(
    socket: &Path,
    method: &str,
    uri: &str,
    body: Option<&str>,
) -> Result<(u16, String), ClientError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(ClientError::Runtime)?;
    runtime.block_on(async {
        tokio::time::timeout(TIMEOUT, request(socket, method, uri, body))
            .await
            .map_err(|_| ClientError::Timeout(TIMEOUT))?
    })
}
