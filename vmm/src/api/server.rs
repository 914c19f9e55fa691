//! The HTTP server: hyper 1 on a tokio current-thread runtime, on its own
//! OS thread, accepting on a Unix socket.
//!
//! Calls that wait for the VM (pause, resume, shutdown, snapshot, state
//! hash) and the replication's commands run on tokio's blocking pool, never on the runtime's only thread:
//! `GET /status` and `/metrics` answer while a snapshot is being written.
//! The VM thread carries out its requests one at a time, in order.

use std::convert::Infallible;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Buf, Bytes};
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

use colo::control::{CommandError, Control};
use devices::ratelimit::LogLimit;

use super::{
    metrics, Action, ActionRequest, ColoRequest, ControlError, RequestedState, SnapshotRequest,
    VmControl, VmRequest, MAX_BODY,
};
use crate::config::{CHECKPOINT_MS_RANGE, COMPARE_TIMEOUT_MS_RANGE};

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Another process answers on the socket.
    #[error("API socket {path} is in use by another process")]
    InUse { path: PathBuf },
    /// Something that is not a socket is in the way; it is left alone.
    #[error("{path} exists and is not a socket; not replacing it")]
    NotASocket { path: PathBuf },
    /// Binding (or probing, removing, chmod-ing) the socket failed.
    #[error("cannot create API socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The tokio runtime could not be built.
    #[error("cannot start the API runtime")]
    Runtime(#[source] std::io::Error),
    /// The server thread could not be spawned.
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
}

/// The running server; [`ApiServer::shutdown`] or dropping it stops the
/// thread and removes the socket file.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    /// (device, inode) of the socket file we bound.
    inode: (u64, u64),
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, drops open connections, joins the thread and
    /// removes the socket file. The same as dropping it.
    pub fn shutdown(self) {
        drop(self);
    }

    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // The thread may have ended already; then nobody listens.
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("API thread panicked");
            }
            // Only our own socket: somebody may have put another there.
            let ours = std::fs::symlink_metadata(&self.path)
                .is_ok_and(|m| (m.dev(), m.ino()) == self.inode);
            if ours {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), "cannot remove API socket: {e}");
                }
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Makes way for a new socket at `path`: nothing there is fine; a socket
/// nobody listens on (left by a process that died) is removed; a live
/// socket or anything that is not a socket is refused.
fn clear_stale_socket(path: &Path) -> Result<(), ApiError> {
    let bind_err = |source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(bind_err(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ApiError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match StdUnixStream::connect(path) {
        Ok(_) => Err(ApiError::InUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing stale API socket");
            std::fs::remove_file(path).map_err(bind_err)
        }
        // Not ours to judge (permission denied, say): leave it.
        Err(e) => Err(bind_err(e)),
    }
}

/// Checks, before any VM exists, that an API socket can be created at
/// `path`: its directory exists, and nothing but a stale socket is there.
pub fn check_socket_path(path: &Path) -> Result<(), ApiError> {
    let dir = socket_dir(path);
    if !dir.is_dir() {
        return Err(ApiError::Bind {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("directory {} does not exist", dir.display()),
            ),
        });
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ApiError::Bind {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ApiError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    if StdUnixStream::connect(path).is_ok() {
        return Err(ApiError::InUse {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// The directory a socket at `path` goes in.
fn socket_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Binds a listener at `path` that no other user can reach even for a
/// moment: it is bound inside a new private (0700) directory next to
/// `path`, made 0600, and only then renamed into place (never over
/// anything that appeared there meanwhile).
fn bind_private(path: &Path) -> std::io::Result<StdUnixListener> {
    let private = PrivateDir::create(socket_dir(path))?;
    let staged = private.0.join("api.sock");
    let listener = StdUnixListener::bind(&staged)?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
    rename_noreplace(&staged, path)?;
    Ok(listener)
}

/// A new directory only its owner can enter, removed (with what is left
/// in it) when dropped.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn create(parent: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mut last = None;
        for attempt in 0..16u32 {
            let dir = parent.join(format!(
                ".vmm-api-{}-{:x}",
                std::process::id(),
                nanos.wrapping_add(attempt)
            ));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(Self(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no private directory")))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `rename(2)` that fails with EEXIST instead of replacing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: two valid C strings; AT_FDCWD resolves them like rename(2).
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Binds a Unix socket at `path` (mode 0600, see [`bind_private`]) and
/// serves the API on a new thread until the returned [`ApiServer`] is
/// shut down or dropped.
///
/// A stale socket file at `path` (nobody listening) is replaced; a live
/// one, or a file that is not a socket, is an error.
pub fn spawn_server(path: &Path, control: Arc<dyn VmControl>) -> Result<ApiServer, ApiError> {
    let bind_err = |source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    };
    clear_stale_socket(path)?;
    let listener = bind_private(path).map_err(bind_err)?;
    // From here on the file is ours: remove it again on any failure.
    let cleanup = |e: ApiError| {
        let _ = std::fs::remove_file(path);
        e
    };
    let inode = std::fs::symlink_metadata(path)
        .map(|m| (m.dev(), m.ino()))
        .map_err(|e| cleanup(bind_err(e)))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| cleanup(bind_err(e)))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| cleanup(ApiError::Runtime(e)))?;
    let listener = {
        let _context = runtime.enter();
        tokio::net::UnixListener::from_std(listener).map_err(|e| cleanup(bind_err(e)))?
    };
    let (stop_tx, stop_rx) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || runtime.block_on(serve(listener, control, stop_rx)))
        .map_err(|e| cleanup(ApiError::Thread(e)))?;
    tracing::info!(path = %path.display(), "API socket listening");
    Ok(ApiServer {
        path: path.to_path_buf(),
        inode,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// How long the API waits before accepting again after accept failed
/// (out of descriptors, say): long enough not to spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one accept-failure warning per this many milliseconds.
const WARN_PERIOD_MS: u64 = 10_000;

/// How long a client may take to send a request's headers, and how long
/// an idle connection stays open.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

async fn serve(
    listener: tokio::net::UnixListener,
    control: Arc<dyn VmControl>,
    mut stop: oneshot::Receiver<()>,
) {
    let accept_warning = LogLimit::every_ms(WARN_PERIOD_MS);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        if let Some(suppressed) = accept_warning.allow() {
                            tracing::warn!(suppressed, "API: accept failed: {e}");
                        }
                        tokio::select! {
                            _ = &mut stop => break,
                            () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                        }
                    }
                };
                let control = control.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let control = control.clone();
                        async move { Ok::<_, Infallible>(handle(req, control).await) }
                    });
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                    {
                        tracing::debug!("API connection: {e}");
                    }
                });
            }
        }
    }
    tracing::debug!("API server stopped");
}

/// A reply: always a complete, in-memory body.
pub(super) type Reply = Response<Full<Bytes>>;

fn json_reply(status: StatusCode, body: String) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// An error reply: `{"error": message}`.
fn error(status: StatusCode, message: impl std::fmt::Display) -> Reply {
    let body = serde_json::json!({ "error": message.to_string() }).to_string();
    json_reply(status, body)
}

fn empty(status: StatusCode) -> Reply {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

/// 413; `close` when the rest of the body was not read, so the
/// connection cannot be reused.
fn too_large(close: bool) -> Reply {
    let mut r = error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body over {MAX_BODY} bytes"),
    );
    if close {
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

fn control_error(e: ControlError) -> Reply {
    let status = match e {
        ControlError::Invalid(_) => StatusCode::BAD_REQUEST,
        ControlError::Conflict(_) => StatusCode::CONFLICT,
        ControlError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    tracing::debug!(%status, "API request refused: {e}");
    error(status, e)
}

/// Whether a Content-Type header names JSON: `application/json`, any
/// case, with or without parameters (`; charset=utf-8`).
fn is_json(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// A body over [`MAX_BODY`] but at most this long is read and thrown away
/// before the 413 goes out, so that a client still sending it sees the
/// answer rather than a broken pipe; a longer one is refused as soon as
/// it is seen to be longer (up front if its `Content-Length` says so), and
/// the connection closed.
pub const DRAIN_LIMIT: u64 = 4 << 20;

/// How long throwing such a body away may take.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the body: at most [`MAX_BODY`] bytes are kept.
async fn read_body<B>(body: B) -> Result<Vec<u8>, Reply>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut body = std::pin::pin!(body);
    let mut bytes = Vec::new();
    let mut seen = 0u64;
    while let Some(frame) = body.as_mut().frame().await {
        let frame = frame.map_err(|e| {
            let e: Box<dyn std::error::Error + Send + Sync> = e.into();
            error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            )
        })?;
        // Trailers are ignored.
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.remaining() as u64);
        if seen > MAX_BODY as u64 {
            let drained = drain(body.as_mut(), seen).await;
            return Err(too_large(!drained));
        }
        while data.has_remaining() {
            let chunk = data.chunk();
            bytes.extend_from_slice(chunk);
            let n = chunk.len();
            data.advance(n);
        }
    }
    Ok(bytes)
}

/// Reads the rest of a body without keeping it, up to [`DRAIN_LIMIT`]
/// bytes in all and [`DRAIN_TIMEOUT`]; whether it got to its end.
async fn drain<B>(mut body: std::pin::Pin<&mut B>, mut seen: u64) -> bool
where
    B: Body,
{
    let discard = async {
        while let Some(frame) = body.as_mut().frame().await {
            let Ok(frame) = frame else {
                return false;
            };
            if let Ok(data) = frame.into_data() {
                seen = seen.saturating_add(data.remaining() as u64);
                if seen > DRAIN_LIMIT {
                    return false;
                }
            }
        }
        true
    };
    tokio::time::timeout(DRAIN_TIMEOUT, discard)
        .await
        .unwrap_or(false)
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes into `T`.
///
/// A body over the limit is 413: refused up front if its `Content-Length`
/// is over [`DRAIN_LIMIT`], else after it was read (and thrown away). The
/// body is read before the other checks, so that a client sees their
/// answers too. A missing `Content-Type` is taken as JSON; any other type
/// than JSON is 415. Then malformed JSON, anything but an object, wrong
/// types, unknown or missing fields and bad values are 400.
async fn json_body<T, B>(req: Request<B>) -> Result<T, Reply>
where
    T: DeserializeOwned,
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = req.into_parts();
    if let Some(length) = parts.headers.get(CONTENT_LENGTH) {
        // hyper refuses malformed ones before we see them; this is for
        // bodies built in-process, and to say 413 rather than 400.
        let digits = length.as_bytes();
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return Err(error(StatusCode::BAD_REQUEST, "malformed Content-Length"));
        }
        // All digits: a parse failure is an overflow, so too large too.
        let declared = std::str::from_utf8(digits)
            .ok()
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_none_or(|n| n > DRAIN_LIMIT) {
            return Err(too_large(true));
        }
    }
    let bytes = read_body(body).await?;
    if let Some(content_type) = parts.headers.get(CONTENT_TYPE) {
        let text = String::from_utf8_lossy(content_type.as_bytes());
        if !is_json(&text) {
            return Err(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("content type {text:?} is not supported: send application/json"),
            ));
        }
    }
    let invalid =
        |e: serde_json::Error| error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}"));
    // serde would take a struct from an array too (`["paused"]`): only an
    // object is the right type.
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(invalid)?;
    if !value.is_object() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid JSON body: expected an object",
        ));
    }
    // From the bytes again, for errors with line and column.
    serde_json::from_slice(&bytes).map_err(invalid)
}

fn method_not_allowed(method: &Method, path: &str, allow: &'static str) -> Reply {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {path}; use {allow}"),
    );
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

/// Runs `call` on the blocking pool: it may wait for the VM as long as
/// the work takes without holding up the runtime's thread.
async fn off_thread<T: Send + 'static>(
    control: &Arc<dyn VmControl>,
    call: impl FnOnce(&dyn VmControl) -> Result<T, ControlError> + Send + 'static,
) -> Result<T, ControlError> {
    let control = control.clone();
    tokio::task::spawn_blocking(move || call(control.as_ref()))
        .await
        .unwrap_or_else(|e| Err(ControlError::Internal(format!("control call failed: {e}"))))
}

/// What a replication command on a standalone VM is told (409).
pub const NOT_REPLICATING: &str =
    "not replicating: this VM is standalone (start it with --role primary or secondary)";

/// The replication's commands; 409 on a standalone VM.
fn replication(control: &dyn VmControl) -> Result<Arc<dyn Control>, ControlError> {
    control
        .colo()
        .ok_or_else(|| ControlError::Conflict(NOT_REPLICATING.into()))
}

/// 409 / 400 / 500 as the replication says.
fn from_command(e: CommandError) -> ControlError {
    match e {
        CommandError::Conflict(text) => ControlError::Conflict(text),
        CommandError::Invalid(text) => ControlError::Invalid(text),
        CommandError::Failed(text) => ControlError::Internal(text),
    }
}

/// Runs a replication command off the API's thread (a failover is
/// answered while a checkpoint or a snapshot runs); `done` on success.
async fn colo_command(
    control: &Arc<dyn VmControl>,
    done: StatusCode,
    call: impl FnOnce(&dyn Control) -> Result<(), CommandError> + Send + 'static,
) -> Reply {
    off_thread(control, move |c| {
        call(replication(c)?.as_ref()).map_err(from_command)
    })
    .await
    .map_or_else(control_error, |()| empty(done))
}

/// `PATCH /colo`: every value checked before anything changes.
async fn patch_colo(control: &Arc<dyn VmControl>, body: ColoRequest) -> Reply {
    let ColoRequest {
        checkpoint_ms,
        compare_timeout_ms,
    } = body;
    if checkpoint_ms.is_none() && compare_timeout_ms.is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            "nothing to change: give checkpoint_ms or compare_timeout_ms",
        );
    }
    for (name, value, range) in [
        ("checkpoint_ms", checkpoint_ms, CHECKPOINT_MS_RANGE),
        (
            "compare_timeout_ms",
            compare_timeout_ms,
            COMPARE_TIMEOUT_MS_RANGE,
        ),
    ] {
        match value {
            Some(v) if !range.contains(&v) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "{name} {v} is out of range: give {}..={}",
                        range.start(),
                        range.end()
                    ),
                )
            }
            _ => {}
        }
    }
    colo_command(control, StatusCode::NO_CONTENT, move |c| {
        // The setting a mode may refuse (409 outside COLO) goes first:
        // a refused request changes nothing.
        if let Some(ms) = compare_timeout_ms {
            c.set_compare_timeout_ms(ms)?;
        }
        if let Some(ms) = checkpoint_ms {
            c.set_checkpoint_ms(ms)?;
        }
        Ok(())
    })
    .await
}

/// Routes one request to `control` and builds its reply.
pub(super) async fn handle<B>(req: Request<B>, control: Arc<dyn VmControl>) -> Reply
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    tracing::debug!("API {method} {path}");
    let reply = match (path.as_str(), &method) {
        ("/status", &Method::GET) => match serde_json::to_string(&control.status()) {
            Ok(body) => json_reply(StatusCode::OK, body),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        },
        ("/status", _) => method_not_allowed(&method, &path, "GET"),
        ("/metrics", &Method::GET) => {
            let mut r = Response::new(Full::new(Bytes::from(metrics::render(&control.metrics()))));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        ("/metrics", _) => method_not_allowed(&method, &path, "GET"),
        ("/vm", &Method::PUT) => match json_body::<VmRequest, _>(req).await {
            Ok(body) => {
                let result = match body.state {
                    RequestedState::Paused => off_thread(&control, |c| c.pause()).await,
                    RequestedState::Running => off_thread(&control, |c| c.resume()).await,
                };
                result.map_or_else(control_error, |()| empty(StatusCode::NO_CONTENT))
            }
            Err(reply) => reply,
        },
        ("/vm", _) => method_not_allowed(&method, &path, "PUT"),
        ("/actions", &Method::PUT) => match json_body::<ActionRequest, _>(req).await {
            Ok(ActionRequest {
                action: Action::Shutdown,
            }) => off_thread(&control, |c| c.shutdown())
                .await
                .map_or_else(control_error, |()| empty(StatusCode::ACCEPTED)),
            Ok(ActionRequest {
                action: Action::Failover,
            }) => colo_command(&control, StatusCode::NO_CONTENT, |c| c.failover()).await,
            Ok(ActionRequest {
                action: Action::Checkpoint,
            }) => colo_command(&control, StatusCode::ACCEPTED, |c| c.checkpoint()).await,
            Err(reply) => reply,
        },
        ("/actions", _) => method_not_allowed(&method, &path, "PUT"),
        ("/colo", &Method::PATCH) => match json_body::<ColoRequest, _>(req).await {
            Ok(body) => patch_colo(&control, body).await,
            Err(reply) => reply,
        },
        ("/colo", _) => method_not_allowed(&method, &path, "PATCH"),
        ("/snapshot", &Method::PUT) => match json_body::<SnapshotRequest, _>(req).await {
            Ok(body) if body.path.as_os_str().is_empty() => {
                error(StatusCode::BAD_REQUEST, "an empty snapshot path")
            }
            Ok(body) => {
                match off_thread(&control, move |c| c.snapshot(body.kind, &body.path)).await {
                    Ok(bytes) => json_reply(
                        StatusCode::OK,
                        serde_json::json!({ "bytes": bytes }).to_string(),
                    ),
                    Err(e) => control_error(e),
                }
            }
            Err(reply) => reply,
        },
        ("/snapshot", _) => method_not_allowed(&method, &path, "PUT"),
        ("/state-hash", &Method::GET) => match off_thread(&control, |c| c.state_hash()).await {
            Ok(json) => json_reply(StatusCode::OK, json),
            Err(e) => control_error(e),
        },
        ("/state-hash", _) => method_not_allowed(&method, &path, "GET"),
        (other, _) => error(StatusCode::NOT_FOUND, format!("no such endpoint {other}")),
    };
    tracing::debug!(status = %reply.status(), "API {method} {path} answered");
    reply
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use hyper::body::Frame;

    use super::*;
    use crate::api::{DeviceMetrics, Metrics, Status, VmState};
    use crate::snapshot::Kind;

    /// Records the calls; answers from `state`; fails with `fail` if set;
    /// replicates when `colo` is set.
    struct Fake {
        state: Mutex<VmState>,
        calls: Mutex<Vec<String>>,
        fail: Mutex<Option<ControlError>>,
        colo: Option<Arc<FakeColo>>,
        /// The replication runs in COLO mode (else Remus).
        colo_mode: bool,
    }

    impl Fake {
        fn new() -> Arc<Self> {
            Arc::new(Self::standalone())
        }

        fn standalone() -> Self {
            Self {
                state: Mutex::new(VmState::Running),
                calls: Mutex::new(Vec::new()),
                fail: Mutex::new(None),
                colo: None,
                colo_mode: false,
            }
        }

        /// A primary whose replication is `colo`.
        fn replicated() -> (Arc<Self>, Arc<FakeColo>) {
            let colo = Arc::new(FakeColo::default());
            let fake = Self {
                colo: Some(colo.clone()),
                ..Self::standalone()
            };
            (Arc::new(fake), colo)
        }

        /// A primary whose replication is `colo`, in COLO mode.
        fn colo_mode() -> (Arc<Self>, Arc<FakeColo>) {
            let colo = Arc::new(FakeColo::default());
            let fake = Self {
                colo: Some(colo.clone()),
                colo_mode: true,
                ..Self::standalone()
            };
            (Arc::new(fake), colo)
        }

        fn call(&self, name: &str) -> Result<(), ControlError> {
            self.calls.lock().unwrap().push(name.to_string());
            match self.fail.lock().unwrap().take() {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }

        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    /// The replication: records its commands; fails with `fail` if set;
    /// `checkpoint` waits for `hold` (when set) after saying it started.
    #[derive(Default)]
    struct FakeColo {
        calls: Mutex<Vec<String>>,
        fail: Mutex<Option<CommandError>>,
        hold: Mutex<Option<Hold>>,
    }

    /// (tells the test the call started, the test's go-ahead).
    type Hold = (std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>);

    impl FakeColo {
        fn call(&self, name: String) -> Result<(), CommandError> {
            self.calls.lock().unwrap().push(name);
            match self.fail.lock().unwrap().take() {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }

        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    fn colo_status() -> colo::control::Status {
        colo::control::Status {
            role: colo::control::Role::Primary,
            mode: colo::control::Mode::Remus,
            state: colo::control::State::Protected,
            peer: Some("10.0.0.2:7000".into()),
            epoch: 41,
            checkpoints: 40,
            last_checkpoint_ms: Some(1.25),
            checkpoint_ms: 20,
            sync_pages: 32768,
            sync_disk_bytes: 1 << 20,
            error: None,
            compare_timeout_ms: None,
            proxy: None,
        }
    }

    /// [`FakeColo`] in COLO mode: it has a compare timeout.
    struct ColoModeFake(Arc<FakeColo>);

    impl Control for ColoModeFake {
        fn status(&self) -> colo::control::Status {
            colo::control::Status {
                mode: colo::control::Mode::Colo,
                compare_timeout_ms: Some(20),
                ..self.0.status()
            }
        }
        fn metrics(&self) -> colo::control::Metrics {
            self.0.metrics()
        }
        fn failover(&self) -> Result<(), CommandError> {
            self.0.failover()
        }
        fn checkpoint(&self) -> Result<(), CommandError> {
            self.0.checkpoint()
        }
        fn set_checkpoint_ms(&self, ms: u64) -> Result<(), CommandError> {
            self.0.set_checkpoint_ms(ms)
        }
        fn set_compare_timeout_ms(&self, ms: u64) -> Result<(), CommandError> {
            self.0.call(format!("set_compare_timeout_ms {ms}"))
        }
    }

    impl Control for FakeColo {
        fn status(&self) -> colo::control::Status {
            colo_status()
        }
        fn metrics(&self) -> colo::control::Metrics {
            colo::control::Metrics {
                checkpoints: vec![(colo::control::Cause::Periodic, 40)],
                pause: colo::control::Histogram::new(),
                transfer: colo::control::Histogram::new(),
                checkpoint_bytes: 4096,
                held_frames: 2,
                held_bytes: 120,
                failovers: 0,
                state: Some(colo::control::State::Protected),
                proxy: Default::default(),
            }
        }
        fn failover(&self) -> Result<(), CommandError> {
            self.call("failover".into())
        }
        fn checkpoint(&self) -> Result<(), CommandError> {
            let hold = self.hold.lock().unwrap().take();
            if let Some((started, go)) = hold {
                started.send(()).unwrap();
                go.recv().unwrap();
            }
            self.call("checkpoint".into())
        }
        fn set_checkpoint_ms(&self, ms: u64) -> Result<(), CommandError> {
            self.call(format!("set_checkpoint_ms {ms}"))
        }
    }

    impl VmControl for Fake {
        fn status(&self) -> Status {
            Status {
                role: "standalone".into(),
                state: *self.state.lock().unwrap(),
                uptime_secs: 2.5,
                vcpus: 2,
                memory_mib: 128,
                colo: self.colo().map(|c| c.status()),
            }
        }
        fn colo(&self) -> Option<Arc<dyn Control>> {
            let colo = self.colo.clone()?;
            Some(match self.colo_mode {
                true => Arc::new(ColoModeFake(colo)),
                false => colo,
            })
        }
        fn pause(&self) -> Result<(), ControlError> {
            self.call("pause")?;
            *self.state.lock().unwrap() = VmState::Paused;
            Ok(())
        }
        fn resume(&self) -> Result<(), ControlError> {
            self.call("resume")?;
            *self.state.lock().unwrap() = VmState::Running;
            Ok(())
        }
        fn shutdown(&self) -> Result<(), ControlError> {
            self.call("shutdown")?;
            *self.state.lock().unwrap() = VmState::ShuttingDown;
            Ok(())
        }
        fn metrics(&self) -> Metrics {
            Metrics {
                uptime_secs: 2.5,
                exits: BTreeMap::from([("io".to_string(), 3)]),
                serial_tx_bytes: 10,
                devices: vec![DeviceMetrics {
                    name: "blk0".into(),
                    kind: "virtio-blk".into(),
                    requests: 1,
                    ..Default::default()
                }],
                colo: self.colo.as_ref().map(|c| c.metrics()),
            }
        }
        fn snapshot(&self, kind: Kind, path: &Path) -> Result<u64, ControlError> {
            self.call(&format!("snapshot {kind:?} {}", path.display()))?;
            Ok(4096)
        }
        fn state_hash(&self) -> Result<String, ControlError> {
            self.call("state_hash")?;
            Ok(r#"{"hash":"0123456789abcdef","parts":{}}"#.into())
        }
    }

    fn request(
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Request<Full<Bytes>> {
        let mut b = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            b = b.header(*name, *value);
        }
        b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
    }

    const JSON: &[(&str, &str)] = &[("content-type", "application/json")];

    struct Answer {
        status: u16,
        headers: hyper::HeaderMap,
        body: String,
    }

    impl Answer {
        fn json(&self) -> serde_json::Value {
            serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
        }

        /// The `error` message of an error reply (which must have one).
        fn error(&self) -> String {
            assert_eq!(
                self.headers.get(CONTENT_TYPE).unwrap(),
                "application/json",
                "{}",
                self.body
            );
            let message = self.json()["error"].as_str().unwrap().to_string();
            assert!(!message.is_empty());
            message
        }
    }

    async fn send<B>(control: &Arc<Fake>, req: Request<B>) -> Answer
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let reply = handle(req, control.clone()).await;
        let status = reply.status().as_u16();
        let headers = reply.headers().clone();
        let body = reply.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body: String::from_utf8(body.to_vec()).unwrap(),
        }
    }

    async fn put(control: &Arc<Fake>, path: &str, body: &str) -> Answer {
        send(control, request("PUT", path, JSON, body)).await
    }

    #[tokio::test]
    async fn status_is_json() {
        let fake = Fake::new();
        let a = send(&fake, request("GET", "/status", &[], "")).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.headers.get(CONTENT_TYPE).unwrap(), "application/json");
        assert_eq!(
            a.json(),
            serde_json::json!({
                "role": "standalone", "state": "running", "uptime_secs": 2.5,
                "vcpus": 2, "memory_mib": 128
            })
        );
        // A query string does not change the route.
        let a = send(&fake, request("GET", "/status?x=1", &[], "")).await;
        assert_eq!(a.status, 200);
    }

    #[tokio::test]
    async fn pause_resume_shutdown_call_the_vm() {
        let fake = Fake::new();
        assert_eq!(put(&fake, "/vm", r#"{"state":"paused"}"#).await.status, 204);
        assert_eq!(*fake.state.lock().unwrap(), VmState::Paused);
        assert_eq!(
            put(&fake, "/vm", r#"{"state":"running"}"#).await.status,
            204
        );
        assert_eq!(*fake.state.lock().unwrap(), VmState::Running);
        assert_eq!(
            put(&fake, "/actions", r#"{"action":"shutdown"}"#)
                .await
                .status,
            202
        );
        assert_eq!(fake.calls(), ["pause", "resume", "shutdown"]);
        // JSON with parameters and odd case is still JSON.
        let a = send(
            &fake,
            request(
                "PUT",
                "/vm",
                &[("content-type", "Application/JSON; charset=utf-8")],
                r#"{"state":"paused"}"#,
            ),
        )
        .await;
        assert_eq!(a.status, 204, "{}", a.body);
        // No content type at all is taken as JSON.
        let a = send(&fake, request("PUT", "/vm", &[], r#"{"state":"running"}"#)).await;
        assert_eq!(a.status, 204, "{}", a.body);
    }

    #[tokio::test]
    async fn snapshot_and_state_hash() {
        let fake = Fake::new();
        let a = put(&fake, "/snapshot", r#"{"type":"diff","path":"/x/y"}"#).await;
        assert_eq!((a.status, a.json()["bytes"].as_u64()), (200, Some(4096)));
        let a = send(&fake, request("GET", "/state-hash", &[], "")).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.json()["hash"], "0123456789abcdef");
        assert_eq!(fake.calls(), ["snapshot Diff /x/y", "state_hash"]);
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text() {
        let fake = Fake::new();
        let a = send(&fake, request("GET", "/metrics", &[], "")).await;
        assert_eq!(a.status, 200);
        assert_eq!(
            a.headers.get(CONTENT_TYPE).unwrap(),
            "text/plain; version=0.0.4"
        );
        assert!(a.body.contains("colo_vmm_exits_total{reason=\"io\"} 3\n"));
        assert!(a
            .body
            .contains("colo_vmm_virtio_requests_total{device=\"blk0\",kind=\"virtio-blk\"} 1\n"));
    }

    #[tokio::test]
    async fn unknown_paths_and_wrong_methods() {
        let fake = Fake::new();
        for path in ["/", "/nope", "/status/", "/vm/x", "/STATUS"] {
            let a = send(&fake, request("GET", path, &[], "")).await;
            assert_eq!(a.status, 404, "{path}");
            assert!(a.error().contains(path), "{}", a.body);
        }
        for (method, path, allow) in [
            ("PUT", "/status", "GET"),
            ("POST", "/metrics", "GET"),
            ("GET", "/vm", "PUT"),
            ("DELETE", "/actions", "PUT"),
            ("GET", "/snapshot", "PUT"),
            ("PUT", "/state-hash", "GET"),
            ("HEAD", "/status", "GET"),
            ("GET", "/colo", "PATCH"),
            ("PUT", "/colo", "PATCH"),
            ("PATCH", "/actions", "PUT"),
        ] {
            let a = send(&fake, request(method, path, JSON, "{}")).await;
            assert_eq!(a.status, 405, "{method} {path}");
            assert_eq!(a.headers.get(ALLOW).unwrap(), allow, "{method} {path}");
            assert!(a.error().contains(method), "{}", a.body);
        }
        assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    }

    #[tokio::test]
    async fn bad_bodies_are_400_with_a_reason() {
        let fake = Fake::new();
        for (path, body, reason) in [
            ("/vm", "{not json", "key must be a string"),
            ("/vm", "", "EOF"),
            ("/vm", r#"{"state": 5}"#, "expected value"),
            ("/vm", r#"{"state": "sleeping"}"#, "unknown variant"),
            ("/vm", r#"{"state": "Paused"}"#, "unknown variant"),
            ("/vm", r#"{"state": "paused", "extra": 1}"#, "unknown field"),
            ("/vm", r#"{}"#, "missing field"),
            ("/vm", r#"["paused"]"#, "expected an object"),
            ("/vm", "null", "expected an object"),
            ("/vm", r#"{"state": "paused"} trailing"#, "trailing"),
            ("/actions", r#"{"action": "explode"}"#, "unknown variant"),
            ("/actions", r#"{"action": null}"#, "expected value"),
            (
                "/snapshot",
                r#"{"type": "half", "path": "/x"}"#,
                "unknown variant",
            ),
            ("/snapshot", r#"{"type": "full"}"#, "missing field"),
            ("/snapshot", r#"{"type": "full", "path": ""}"#, "empty"),
        ] {
            let a = put(&fake, path, body).await;
            assert_eq!(a.status, 400, "{path} {body}: {}", a.body);
            assert!(a.error().contains(reason), "{path} {body}: {}", a.body);
        }
        assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    }

    #[tokio::test]
    async fn other_content_types_are_415() {
        let fake = Fake::new();
        for ct in [
            "text/plain",
            "application/jsonx",
            "application/x-www-form-urlencoded",
        ] {
            let a = send(
                &fake,
                request(
                    "PUT",
                    "/vm",
                    &[("content-type", ct)],
                    r#"{"state":"paused"}"#,
                ),
            )
            .await;
            assert_eq!(a.status, 415, "{ct}");
            assert!(a.error().contains("application/json"), "{}", a.body);
        }
        assert!(fake.calls().is_empty());
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_413() {
        let fake = Fake::new();
        // Declared too long: refused before reading.
        let a = send(
            &fake,
            request(
                "PUT",
                "/vm",
                &[("content-length", "99999999999999999999999")],
                "",
            ),
        )
        .await;
        assert_eq!(a.status, 413);
        assert_eq!(a.headers.get(CONNECTION).unwrap(), "close");
        a.error();
        let a = send(
            &fake,
            request("PUT", "/vm", &[("content-length", "12x")], ""),
        )
        .await;
        assert_eq!(a.status, 400);
        // Exactly at the limit is accepted, one byte more is not.
        let mut at_limit = String::from(r#"{"state":"paused"}"#);
        at_limit.push_str(&" ".repeat(MAX_BODY - at_limit.len()));
        assert_eq!(put(&fake, "/vm", &at_limit).await.status, 204);
        let a = put(&fake, "/vm", &format!("{at_limit} ")).await;
        assert_eq!(a.status, 413);
        // Read to its end: the connection can go on.
        assert!(a.headers.get(CONNECTION).is_none());
        // A declared length within the drain limit is read, then refused.
        let mib = " ".repeat(1 << 20);
        let a = send(
            &fake,
            request("PUT", "/vm", &[("content-length", "1048576")], &mib),
        )
        .await;
        assert_eq!(a.status, 413);
        assert!(a.headers.get(CONNECTION).is_none());
        // Over the drain limit: refused without touching the body.
        let req = Request::builder()
            .method("PUT")
            .uri("/vm")
            .header("content-length", (DRAIN_LIMIT + 1).to_string())
            .body(Poisoned)
            .unwrap();
        let a = send(&fake, req).await;
        assert_eq!(a.status, 413);
        assert_eq!(a.headers.get(CONNECTION).unwrap(), "close");
        // No length given: an endless body is cut at the drain limit.
        let req = Request::builder()
            .method("PUT")
            .uri("/actions")
            .body(Endless)
            .unwrap();
        let a = send(&fake, req).await;
        assert_eq!(a.status, 413);
        assert_eq!(a.headers.get(CONNECTION).unwrap(), "close");
        // A body that breaks off.
        let req = Request::builder()
            .method("PUT")
            .uri("/vm")
            .body(Broken)
            .unwrap();
        let a = send(&fake, req).await;
        assert_eq!(a.status, 400);
        assert!(
            a.error().contains("cannot read the body: cut off"),
            "{}",
            a.body
        );
        assert_eq!(fake.calls(), ["pause"]);
    }

    /// A body that must not be read.
    struct Poisoned;

    impl Body for Poisoned {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            panic!("the body was read")
        }
    }

    /// A body that fails.
    struct Broken;

    impl Body for Broken {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            std::task::Poll::Ready(Some(Err(std::io::Error::other("cut off"))))
        }
    }

    /// A body of spaces that never ends and has no size hint.
    struct Endless;

    impl Body for Endless {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&[b' '; 1024])))))
        }
    }

    #[tokio::test]
    async fn control_errors_map_to_status_codes() {
        let fake = Fake::new();
        for (e, status) in [
            (ControlError::Invalid("no".into()), 400),
            (ControlError::Conflict("already shutting down".into()), 409),
            (ControlError::Internal("broken".into()), 500),
        ] {
            let message = e.to_string();
            *fake.fail.lock().unwrap() = Some(e);
            let a = put(&fake, "/actions", r#"{"action":"shutdown"}"#).await;
            assert_eq!(a.status, status);
            assert_eq!(a.error(), message);
        }
        *fake.fail.lock().unwrap() = Some(ControlError::Conflict("running".into()));
        let a = send(&fake, request("GET", "/state-hash", &[], "")).await;
        assert_eq!((a.status, a.error()), (409, "running".to_string()));
    }

    async fn patch(control: &Arc<Fake>, path: &str, body: &str) -> Answer {
        send(control, request("PATCH", path, JSON, body)).await
    }

    #[tokio::test]
    async fn status_has_colo_only_when_replicating() {
        let a = send(&Fake::new(), request("GET", "/status", &[], "")).await;
        assert!(a.json().get("colo").is_none(), "{}", a.body);
        let (fake, _) = Fake::replicated();
        let a = send(&fake, request("GET", "/status", &[], "")).await;
        assert_eq!(a.status, 200);
        let colo = &a.json()["colo"];
        assert_eq!(
            colo,
            &serde_json::json!({
                "role": "primary", "mode": "remus", "state": "protected",
                "peer": "10.0.0.2:7000", "epoch": 41, "checkpoints": 40,
                "last_checkpoint_ms": 1.25, "checkpoint_ms": 20,
                "sync_pages": 32768, "sync_disk_bytes": 1048576, "error": null
            })
        );
        // What a client reads back is what the engine said.
        let status: Status = serde_json::from_str(&a.body).unwrap();
        assert_eq!(status.colo, Some(colo_status()));
    }

    #[tokio::test]
    async fn replication_commands_reach_the_engine() {
        let (fake, colo) = Fake::replicated();
        let a = put(&fake, "/actions", r#"{"action":"failover"}"#).await;
        assert_eq!((a.status, a.body.as_str()), (204, ""));
        let a = put(&fake, "/actions", r#"{"action":"checkpoint"}"#).await;
        assert_eq!((a.status, a.body.as_str()), (202, ""));
        let a = patch(&fake, "/colo", r#"{"checkpoint_ms": 50}"#).await;
        assert_eq!((a.status, a.body.as_str()), (204, ""), "{}", a.body);
        for ms in [1, 60_000] {
            let body = format!(r#"{{"checkpoint_ms": {ms}}}"#);
            assert_eq!(patch(&fake, "/colo", &body).await.status, 204);
        }
        assert_eq!(
            colo.calls(),
            [
                "failover",
                "checkpoint",
                "set_checkpoint_ms 50",
                "set_checkpoint_ms 1",
                "set_checkpoint_ms 60000"
            ]
        );
        assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    }

    #[tokio::test]
    async fn the_compare_timeout_is_set_in_colo_mode_only() {
        let (fake, colo) = Fake::colo_mode();
        let a = send(&fake, request("GET", "/status", &[], "")).await;
        let status = &a.json()["colo"];
        assert_eq!(status["mode"], "colo", "{}", a.body);
        assert_eq!(status["compare_timeout_ms"], 20, "{}", a.body);
        for body in [
            r#"{"compare_timeout_ms": 1}"#,
            r#"{"compare_timeout_ms": 60000, "checkpoint_ms": 500}"#,
        ] {
            let a = patch(&fake, "/colo", body).await;
            assert_eq!((a.status, a.body.as_str()), (204, ""), "{body}");
        }
        assert_eq!(
            colo.calls(),
            [
                "set_compare_timeout_ms 1",
                "set_compare_timeout_ms 60000",
                "set_checkpoint_ms 500"
            ]
        );
        // Remus mode: 409, and the interval given with it is not changed.
        let (fake, colo) = Fake::replicated();
        let a = send(&fake, request("GET", "/status", &[], "")).await;
        assert!(a.json()["colo"].get("compare_timeout_ms").is_none());
        let a = patch(
            &fake,
            "/colo",
            r#"{"compare_timeout_ms": 5, "checkpoint_ms": 50}"#,
        )
        .await;
        assert_eq!(a.status, 409, "{}", a.body);
        assert_eq!(a.error(), "not in COLO mode");
        assert!(colo.calls().is_empty(), "{:?}", colo.calls());
    }

    #[tokio::test]
    async fn replication_commands_on_a_standalone_vm_are_409() {
        let fake = Fake::new();
        for (method, path, body) in [
            ("PUT", "/actions", r#"{"action":"failover"}"#),
            ("PUT", "/actions", r#"{"action":"checkpoint"}"#),
            ("PATCH", "/colo", r#"{"checkpoint_ms": 50}"#),
            ("PATCH", "/colo", r#"{"compare_timeout_ms": 50}"#),
        ] {
            let a = send(&fake, request(method, path, JSON, body)).await;
            assert_eq!(a.status, 409, "{body}");
            assert_eq!(a.error(), NOT_REPLICATING);
        }
        assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    }

    #[tokio::test]
    async fn command_errors_map_to_status_codes() {
        let (fake, colo) = Fake::replicated();
        for (e, status) in [
            (CommandError::Conflict("not protected".into()), 409),
            (CommandError::Invalid("too fast".into()), 400),
            (CommandError::Failed("peer gone".into()), 500),
        ] {
            for (method, path, body) in [
                ("PUT", "/actions", r#"{"action":"failover"}"#),
                ("PUT", "/actions", r#"{"action":"checkpoint"}"#),
                ("PATCH", "/colo", r#"{"checkpoint_ms": 50}"#),
            ] {
                *colo.fail.lock().unwrap() = Some(e.clone());
                let a = send(&fake, request(method, path, JSON, body)).await;
                assert_eq!(a.status, status, "{e:?} {body}");
                assert!(a.error().ends_with(&e.to_string()), "{}", a.body);
            }
        }
    }

    #[tokio::test]
    async fn bad_colo_bodies_are_400_before_anything_runs() {
        let (fake, colo) = Fake::replicated();
        for fake in [fake, Fake::new(), Fake::colo_mode().0] {
            for (body, reason) in [
                ("{}", "nothing to change"),
                (r#"{"checkpoint_ms": 0}"#, "out of range: give 1..=60000"),
                (r#"{"checkpoint_ms": 60001}"#, "out of range"),
                (r#"{"checkpoint_ms": -1}"#, "invalid value"),
                (r#"{"checkpoint_ms": 1.5}"#, "invalid type"),
                (r#"{"checkpoint_ms": "20"}"#, "invalid type"),
                (r#"{"checkpoint_ms": 20, "compare_ms": 5}"#, "unknown field"),
                (
                    r#"{"compare_timeout_ms": 0}"#,
                    "compare_timeout_ms 0 is out of range: give 1..=60000",
                ),
                (
                    r#"{"compare_timeout_ms": 60001, "checkpoint_ms": 20}"#,
                    "out of range",
                ),
                (
                    r#"{"compare_timeout_ms": 20, "checkpoint_ms": 0}"#,
                    "checkpoint_ms 0 is out of range",
                ),
                (r#"{"compare_timeout_ms": "20"}"#, "invalid type"),
                (r#"[20]"#, "expected an object"),
                ("{", "EOF"),
            ] {
                let a = patch(&fake, "/colo", body).await;
                assert_eq!(a.status, 400, "{body}: {}", a.body);
                assert!(a.error().contains(reason), "{body}: {}", a.body);
            }
            let a = send(
                &fake,
                request(
                    "PATCH",
                    "/colo",
                    &[("content-type", "text/plain")],
                    r#"{"checkpoint_ms": 20}"#,
                ),
            )
            .await;
            assert_eq!(a.status, 415);
        }
        assert!(colo.calls().is_empty(), "{:?}", colo.calls());
    }

    #[tokio::test]
    async fn a_failover_is_answered_while_a_checkpoint_runs() {
        let (fake, colo) = Fake::replicated();
        let (started_tx, started) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel();
        *colo.hold.lock().unwrap() = Some((started_tx, go_rx));
        let checkpoint = tokio::spawn({
            let fake = fake.clone();
            async move { put(&fake, "/actions", r#"{"action":"checkpoint"}"#).await }
        });
        tokio::task::spawn_blocking(move || started.recv())
            .await
            .unwrap()
            .unwrap();
        // The checkpoint is held inside the engine; the failover gets by.
        let a = put(&fake, "/actions", r#"{"action":"failover"}"#).await;
        assert_eq!(a.status, 204);
        assert_eq!(colo.calls(), ["failover"]);
        assert!(!checkpoint.is_finished());
        go.send(()).unwrap();
        assert_eq!(checkpoint.await.unwrap().status, 202);
        assert_eq!(colo.calls(), ["failover", "checkpoint"]);
    }

    #[tokio::test]
    async fn metrics_have_colo_families_only_when_replicating() {
        let a = send(&Fake::new(), request("GET", "/metrics", &[], "")).await;
        assert!(!a.body.contains("colo_state"), "{}", a.body);
        let (fake, _) = Fake::replicated();
        let a = send(&fake, request("GET", "/metrics", &[], "")).await;
        assert_eq!(a.status, 200);
        let samples = crate::api::metrics::tests::parse(&a.body);
        assert_eq!(samples["colo_checkpoints_total{cause=\"periodic\"}"], 40.0);
        assert_eq!(samples["colo_checkpoints_total{cause=\"timeout\"}"], 0.0);
        assert_eq!(samples["colo_held_frames"], 2.0);
        assert_eq!(samples["colo_held_bytes"], 120.0);
        assert_eq!(samples["colo_checkpoint_bytes_total"], 4096.0);
        assert_eq!(samples["colo_state{state=\"protected\"}"], 1.0);
        assert_eq!(samples["colo_state{state=\"waiting\"}"], 0.0);
        assert_eq!(
            samples["colo_checkpoint_pause_seconds_bucket{le=\"+Inf\"}"],
            0.0
        );
        // The VM's own families are still there.
        assert_eq!(samples["colo_vmm_exits_total{reason=\"io\"}"], 3.0);
    }

    #[test]
    fn json_content_types() {
        assert!(is_json("application/json"));
        assert!(is_json("application/json;charset=utf-8"));
        assert!(is_json(" APPLICATION/Json ; x=y"));
        assert!(!is_json("application/json-patch+json"));
        assert!(!is_json("text/json"));
        assert!(!is_json(""));
    }
}
