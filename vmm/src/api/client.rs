//! A blocking client for the API socket (what `vmmctl` uses): one request
//! per connection, `Connection: close`, the reply read to its end.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Errors talking to the socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to API socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("API request failed")]
    Io(#[from] std::io::Error),
    #[error("malformed API reply: {0}")]
    Reply(String),
}

/// How long a call may take (a pause waits for every vCPU).
const TIMEOUT: Duration = Duration::from_secs(60);

/// Sends `method uri` with an optional JSON body; returns the status code
/// and the body.
pub fn call(
    socket: &Path,
    method: &str,
    uri: &str,
    body: Option<&str>,
) -> Result<(u16, String), ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let body = body.unwrap_or("");
    let mut request =
        format!("{method} {uri} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if !body.is_empty() {
        request.push_str("Content-Type: application/json\r\n");
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(request.as_bytes())?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    let text = String::from_utf8_lossy(&reply);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| ClientError::Reply("no end of headers".into()))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Reply(format!("bad status line in {head:?}")))?;
    Ok((status, body.to_string()))
}
