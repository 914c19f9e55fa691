//! A minimal HTTP/1.1 client for tests: one persistent connection,
//! `Content-Length` bodies, over TCP or a Unix socket.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A response: status code, headers (lower-cased names) and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The first header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One keep-alive connection.
pub struct Client<S: Read + Write> {
    reader: BufReader<S>,
    host: String,
}

impl<S: Read + Write> Client<S> {
    /// Wraps a connected stream; `host` goes in the Host header.
    pub fn new(stream: S, host: &str) -> Self {
        Self {
            reader: BufReader::new(stream),
            host: host.to_string(),
        }
    }

    /// Sends a request and reads its response.
    pub fn request(&mut self, method: &str, path: &str, body: &[u8]) -> io::Result<Response> {
        self.request_with(method, path, &[], body)
    }

    /// Sends a request with extra header lines and reads its response.
    pub fn request_with(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
            self.host,
            body.len()
        );
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        req.push_str("\r\n");
        let stream = self.reader.get_mut();
        stream.write_all(req.as_bytes())?;
        // A server may answer (413, say) and close before taking the whole
        // body: its answer is still what the caller wants.
        match stream.write_all(body).and_then(|()| stream.flush()) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) => {}
            Err(e) => return Err(e),
        }
        self.read_response()
    }

    /// Writes raw bytes (for malformed requests) and reads one response.
    pub fn raw(&mut self, bytes: &[u8]) -> io::Result<Response> {
        let stream = self.reader.get_mut();
        stream.write_all(bytes)?;
        stream.flush()?;
        self.read_response()
    }

    fn read_response(&mut self) -> io::Result<Response> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(&format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (name, value) = l.split_once(':').ok_or_else(|| bad("bad header"))?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
        let len: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map(|(_, v)| v.parse().map_err(|_| bad("bad content-length")))
            .transpose()?
            .unwrap_or(0);
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body)?;
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

/// How long a call on a vmm's API socket may take (a snapshot writes all
/// of guest memory).
pub const API_TIMEOUT: Duration = Duration::from_secs(60);

/// A keep-alive client on a vmm's API socket.
pub fn api_client(sock: &Path) -> io::Result<Client<UnixStream>> {
    let s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(API_TIMEOUT))?;
    Ok(Client::new(s, "localhost"))
}

/// One request on its own connection to a vmm's API socket; a non-empty
/// `json` body goes with `Content-Type: application/json`.
pub fn api_request(sock: &Path, method: &str, path: &str, json: &str) -> io::Result<Response> {
    let headers: &[(&str, &str)] = if json.is_empty() {
        &[]
    } else {
        &[("Content-Type", "application/json")]
    };
    api_client(sock)?.request_with(method, path, headers, json.as_bytes())
}
