//! Just enough HTTP/1.1 for the test guest's service: request heads with a
//! `Content-Length` body, persistent connections, and small responses.

use alloc::vec::Vec;

/// Longest request head (request line + headers).
pub const MAX_HEAD: usize = 4096;
/// Longest request body.
pub const MAX_BODY: usize = 16 * 1024;

/// A parsed request; `body` borrows from the input.
#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub body: &'a [u8],
    /// The client wants the connection kept open (HTTP/1.1 default).
    pub keep_alive: bool,
}

/// Why a request cannot be parsed; answered with the status given.
#[derive(Debug, PartialEq, Eq)]
pub enum HttpError {
    /// 400
    BadRequest,
    /// 413
    TooLarge,
}

impl HttpError {
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            HttpError::BadRequest => (400, "Bad Request"),
            HttpError::TooLarge => (413, "Payload Too Large"),
        }
    }
}

/// Parses the request at the start of `buf`: `Ok(None)` while incomplete,
/// else the request and how many bytes it used.
pub fn parse(buf: &[u8]) -> Result<Option<(Request<'_>, usize)>, HttpError> {
    let Some(head_len) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD {
            Err(HttpError::TooLarge)
        } else {
            Ok(None)
        };
    };
    if head_len > MAX_HEAD {
        return Err(HttpError::TooLarge);
    }
    let head = core::str::from_utf8(&buf[..head_len]).map_err(|_| HttpError::BadRequest)?;
    let mut lines = head.split("\r\n");
    let mut parts = lines.next().ok_or(HttpError::BadRequest)?.split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::BadRequest);
    };
    let mut keep_alive = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(HttpError::BadRequest),
    };
    if method.is_empty() || !path.starts_with('/') {
        return Err(HttpError::BadRequest);
    }
    let mut content_length = 0usize;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or(HttpError::BadRequest)?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = value.parse().map_err(|_| HttpError::BadRequest)?;
        } else if name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                keep_alive = false;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                keep_alive = true;
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::BadRequest); // chunked bodies are not supported
        }
    }
    if content_length > MAX_BODY {
        return Err(HttpError::TooLarge);
    }
    let start = head_len + 4;
    let Some(body) = buf.get(start..start + content_length) else {
        return Ok(None);
    };
    Ok(Some((
        Request {
            method,
            path,
            body,
            keep_alive,
        },
        start + content_length,
    )))
}

/// Appends a complete response to `out`.
pub fn respond(
    out: &mut Vec<u8>,
    status: u16,
    reason: &str,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
) {
    respond_with(out, status, reason, content_type, &[], body, keep_alive);
}

/// Appends a complete response with extra `headers` (name, value) to `out`.
pub fn respond_with(
    out: &mut Vec<u8>,
    status: u16,
    reason: &str,
    content_type: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    keep_alive: bool,
) {
    use core::fmt::Write;
    let mut head = alloc::string::String::new();
    let _ = write!(
        head,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: {}\r\n",
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    for (name, value) in headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    head.push_str("\r\n");
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pipelined_requests_with_bodies() {
        let buf = b"POST /kv/a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /count HTTP/1.1\r\n\r\n";
        let (r, used) = parse(buf).unwrap().unwrap();
        assert_eq!(
            (r.method, r.path, r.body, r.keep_alive),
            ("POST", "/kv/a", &b"abc"[..], true)
        );
        let (r, used2) = parse(&buf[used..]).unwrap().unwrap();
        assert_eq!((r.method, r.path), ("GET", "/count"));
        assert_eq!(used + used2, buf.len());
    }

    #[test]
    fn incomplete_requests_wait() {
        assert_eq!(parse(b"GET /count HTTP/1.1\r\n"), Ok(None));
        assert_eq!(
            parse(b"POST /kv/a HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"),
            Ok(None)
        );
    }

    #[test]
    fn bad_and_huge_requests_are_refused() {
        assert_eq!(parse(b"GARBAGE\r\n\r\n"), Err(HttpError::BadRequest));
        assert_eq!(parse(b"GET /x HTTP/2\r\n\r\n"), Err(HttpError::BadRequest));
        assert_eq!(
            parse(b"GET /x HTTP/1.1\r\nContent-Length: zz\r\n\r\n"),
            Err(HttpError::BadRequest)
        );
        assert_eq!(
            parse(b"POST /x HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"),
            Err(HttpError::TooLarge)
        );
        assert_eq!(parse(&[b'a'; MAX_HEAD + 1]), Err(HttpError::TooLarge));
        let (r, _) = parse(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!r.keep_alive);
    }

    #[test]
    fn responses_carry_length_and_connection() {
        let mut out = Vec::new();
        respond(&mut out, 200, "OK", "text/plain", b"42", false);
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\n42"
        );
        out.clear();
        respond_with(
            &mut out,
            200,
            "OK",
            "text/plain",
            &[("X-A", "b")],
            b"",
            true,
        );
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 0\r\nConnection: keep-alive\r\nX-A: b\r\n\r\n"
        );
    }
}
