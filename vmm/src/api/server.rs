//! The HTTP server: hyper 1 on a tokio current-thread runtime, on its own
//! OS thread, accepting on a Unix socket.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

use super::{
    metrics, Action, ActionRequest, ControlError, RequestedState, SnapshotRequest, VmControl,
    VmRequest, MAX_BODY,
};

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API socket {path} is in use by another process")]
    InUse { path: PathBuf },
    #[error("cannot create API socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
}

/// The running server; dropping it stops it and removes the socket file.
pub struct ApiServer {
    path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path` (mode 0600) and serves the API on a new thread.
pub fn spawn_server(path: &Path, control: Arc<dyn VmControl>) -> Result<ApiServer, ApiError> {
    let bind_err = |source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() {
        // A socket somebody still listens on is not ours to take.
        if StdUnixStream::connect(path).is_ok() {
            return Err(ApiError::InUse {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    let (stop_tx, stop_rx) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || serve(listener, control, stop_rx))
        .map_err(ApiError::Thread)?;
    tracing::info!(path = %path.display(), "API socket listening");
    Ok(ApiServer {
        path: path.to_path_buf(),
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

fn serve(
    listener: std::os::unix::net::UnixListener,
    control: Arc<dyn VmControl>,
    mut stop: oneshot::Receiver<()>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("API: cannot start its runtime: {e}");
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("API: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = &mut stop => break,
                accepted = listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            tracing::warn!("API: accept failed: {e}");
                            continue;
                        }
                    };
                    let control = control.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req| {
                            let control = control.clone();
                            async move { Ok::<_, Infallible>(handle(req, control.as_ref()).await) }
                        });
                        if let Err(e) = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await
                        {
                            tracing::debug!("API connection: {e}");
                        }
                    });
                }
            }
        }
    });
}

type Reply = Response<Full<Bytes>>;

fn json_reply(status: StatusCode, body: String) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Reply {
    let body = serde_json::json!({ "error": message.to_string() }).to_string();
    json_reply(status, body)
}

fn empty(status: StatusCode) -> Reply {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

fn control_error(e: ControlError) -> Reply {
    let status = match e {
        ControlError::Invalid(_) => StatusCode::BAD_REQUEST,
        ControlError::Conflict(_) => StatusCode::CONFLICT,
        ControlError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e)
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes into `T`.
async fn json_body<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, Reply> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_BODY} bytes"),
        ));
    }
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.is_empty() && !content_type.starts_with("application/json") {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content type {content_type:?}: send application/json"),
        ));
    }
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {MAX_BODY} bytes"),
            ))
        }
        Err(e) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            ))
        }
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

fn method_not_allowed(allow: &'static str) -> Reply {
    let mut r = error(StatusCode::METHOD_NOT_ALLOWED, format!("use {allow}"));
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

async fn handle(req: Request<Incoming>, control: &dyn VmControl) -> Reply {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    tracing::debug!("API {method} {path}");
    match (path.as_str(), method) {
        ("/status", Method::GET) => match serde_json::to_string(&control.status()) {
            Ok(body) => json_reply(StatusCode::OK, body),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        },
        ("/status", _) => method_not_allowed("GET"),
        ("/metrics", Method::GET) => {
            let mut r = Response::new(Full::new(Bytes::from(metrics::render(&control.metrics()))));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        ("/metrics", _) => method_not_allowed("GET"),
        ("/vm", Method::PUT) => match json_body::<VmRequest>(req).await {
            Ok(body) => {
                let result = match body.state {
                    RequestedState::Paused => control.pause(),
                    RequestedState::Running => control.resume(),
                };
                result.map_or_else(control_error, |()| empty(StatusCode::NO_CONTENT))
            }
            Err(reply) => reply,
        },
        ("/vm", _) => method_not_allowed("PUT"),
        ("/actions", Method::PUT) => match json_body::<ActionRequest>(req).await {
            Ok(ActionRequest {
                action: Action::Shutdown,
            }) => control
                .shutdown()
                .map_or_else(control_error, |()| empty(StatusCode::ACCEPTED)),
            Err(reply) => reply,
        },
        ("/actions", _) => method_not_allowed("PUT"),
        ("/snapshot", Method::PUT) => match json_body::<SnapshotRequest>(req).await {
            Ok(body) if body.path.as_os_str().is_empty() => {
                error(StatusCode::BAD_REQUEST, "an empty snapshot path")
            }
            Ok(body) => match control.snapshot(body.kind, &body.path) {
                Ok(bytes) => json_reply(
                    StatusCode::OK,
                    serde_json::json!({ "bytes": bytes }).to_string(),
                ),
                Err(e) => control_error(e),
            },
            Err(reply) => reply,
        },
        ("/snapshot", _) => method_not_allowed("PUT"),
        ("/state-hash", Method::GET) => match control.state_hash() {
            Ok(json) => json_reply(StatusCode::OK, json),
            Err(e) => control_error(e),
        },
        ("/state-hash", _) => method_not_allowed("GET"),
        (other, _) => error(StatusCode::NOT_FOUND, format!("no such endpoint {other}")),
    }
}
