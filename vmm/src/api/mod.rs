//! The REST control socket: HTTP/1.1 + JSON on a Unix socket (mode 0600).
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | `/status` | | 200 [`Status`] |
//! | PUT | `/vm` | `{"state": "paused" \| "running"}` | 204 |
//! | PUT | `/actions` | `{"action": "shutdown"}` | 202 |
//! | PUT | `/actions` | `{"action": "failover"}` (replicated VM) | 204 |
//! | PUT | `/actions` | `{"action": "checkpoint"}` (replicated VM) | 202 |
//! | PATCH | `/colo` | `{"checkpoint_ms": N, "compare_timeout_ms": N}` (replicated VM; either or both; the compare timeout only in COLO mode, else 409) | 204 |
//! | GET | `/metrics` | | 200 Prometheus text |
//! | PUT | `/snapshot` | `{"type": "full" \| "diff", "path": "..."}` (paused VM) | 200 `{"bytes": N}` |
//! | GET | `/state-hash` | (paused VM) | 200 `{"hash": "<16 hex digits>", "parts": {...}}` |
//!
//! Errors carry `{"error": "..."}`: 404 unknown path, 405 wrong method
//! (with `Allow`), 400 malformed JSON, a body that is not an object, wrong
//! types, unknown fields, missing fields or bad values, 413 a body (or a
//! declared `Content-Length`) over 16 KiB, 415 a PUT or PATCH whose `Content-Type`
//! is not `application/json` (a missing `Content-Type` is taken as JSON),
//! and from [`ControlError`] 400 / 409 / 500. The replication routes
//! answer 409 "not replicating" on a standalone VM, and map
//! [`colo::control::CommandError`] to 409 / 400 / 500.
//! `docs/api.yaml` is the OpenAPI description; `vmmctl` the client
//! ([`client`]).
//!
//! The server ([`spawn_server`]) runs on its own thread with a
//! single-threaded tokio runtime; requests reach the VM through
//! [`VmControl`], which `vmm` implements over its `VmHandle`
//! (`crate::control::VmmControl`):
//!
//! ```text
//! let _api = vmm::api::spawn_server(path, Arc::new(VmmControl::new(&config, &running)))?;
//! running.wait()?; // the socket is removed when `_api` is dropped
//! ```

pub mod client;
mod metrics;
mod server;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use metrics::render as render_metrics;
pub use server::{check_socket_path, spawn_server, ApiError, ApiServer, NOT_REPLICATING};

/// Largest request body the API reads.
pub const MAX_BODY: usize = 16 * 1024;

/// What the API needs from the VM. Calls come from the API thread, one
/// at a time.
pub trait VmControl: Send + Sync + 'static {
    /// Current status.
    fn status(&self) -> Status;
    /// Pauses vCPUs and device processing; idempotent.
    fn pause(&self) -> Result<(), ControlError>;
    /// Resumes; idempotent.
    fn resume(&self) -> Result<(), ControlError>;
    /// Asks the VM to shut down; the process exits after it stopped.
    /// [`ControlError::Conflict`] if it is already shutting down.
    fn shutdown(&self) -> Result<(), ControlError>;
    /// Counters.
    fn metrics(&self) -> Metrics;
    /// Writes a snapshot of the paused VM to `path`; returns its size.
    fn snapshot(
        &self,
        kind: crate::snapshot::Kind,
        path: &std::path::Path,
    ) -> Result<u64, ControlError>;
    /// The state hash of the paused VM, as a JSON object
    /// (`{"hash": "<hex>", "parts": {"memory": "<hex>", ...}}`).
    fn state_hash(&self) -> Result<String, ControlError>;
    /// The replication's commands, `None` for a standalone VM. Its calls
    /// run off the API's thread.
    fn colo(&self) -> Option<std::sync::Arc<dyn colo::control::Control>> {
        None
    }
}

/// `PUT /snapshot`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotRequest {
    #[serde(rename = "type")]
    kind: crate::snapshot::Kind,
    path: std::path::PathBuf,
}

/// The VM's run state: `"running"`, `"paused"` or `"shutting_down"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Paused,
    ShuttingDown,
}

/// `GET /status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// `standalone`, `primary` or `secondary`.
    pub role: String,
    pub state: VmState,
    pub uptime_secs: f64,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// Replication status; absent for a standalone VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub colo: Option<colo::control::Status>,
}

/// Counters of one virtio device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceMetrics {
    /// `blk0`, `net0`, ...
    pub name: String,
    /// `virtio-blk` or `virtio-net`.
    pub kind: String,
    pub requests: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub errors: u64,
}

/// `GET /metrics`, before rendering.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    pub uptime_secs: f64,
    /// KVM exits by reason.
    pub exits: BTreeMap<String, u64>,
    pub serial_tx_bytes: u64,
    pub devices: Vec<DeviceMetrics>,
    /// Replication counters; `None` for a standalone VM.
    pub colo: Option<colo::control::Metrics>,
}

/// Why the VM refused a request.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The request is not valid (400).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The VM's state forbids it (409).
    #[error("{0}")]
    Conflict(String),
    /// The VMM failed to carry it out (500).
    #[error("{0}")]
    Internal(String),
}

/// `PUT /vm`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmRequest {
    state: RequestedState,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum RequestedState {
    Paused,
    Running,
}

/// `PUT /actions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionRequest {
    action: Action,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum Action {
    Shutdown,
    Failover,
    Checkpoint,
}

/// `PATCH /colo`: the settings to change; at least one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ColoRequest {
    checkpoint_ms: Option<u64>,
    compare_timeout_ms: Option<u64>,
}
