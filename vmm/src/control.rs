//! The API's view of a running VM: [`VmControl`] over a [`VmHandle`] and
//! the VM's shared counters, and over the replication's
//! [`colo::control::Control`] when the VM is one of a pair.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::api::{ControlError, DeviceMetrics, Metrics, Status, VmControl, VmState};
use crate::config::VmConfig;
use crate::snapshot::Kind;
use crate::vm::{RequestError, RunState, RunningVm, VmCounters, VmHandle};

/// 409 for what the VM's state forbids, 500 for what failed.
fn from_request(e: RequestError) -> ControlError {
    match e {
        RequestError::NotPaused(_) | RequestError::ShuttingDown | RequestError::Refused(_) => {
            ControlError::Conflict(e.to_string())
        }
        RequestError::Failed(text) => ControlError::Internal(text),
    }
}

/// Implements the API for one VM.
pub struct VmmControl {
    handle: VmHandle,
    counters: VmCounters,
    role: String,
    vcpus: u8,
    memory_mib: u64,
    created: Instant,
    colo: Option<Arc<dyn colo::control::Control>>,
}

impl VmmControl {
    /// A standalone VM's control; see [`VmmControl::with_colo`].
    pub fn new(config: &VmConfig, vm: &RunningVm) -> Self {
        Self {
            handle: vm.handle(),
            counters: vm.counters().clone(),
            role: config.role.to_string(),
            vcpus: config.vcpus,
            memory_mib: config.mem_mib,
            created: Instant::now() - vm.uptime(),
            colo: None,
        }
    }

    /// Adds the replication of a primary or secondary: `GET /status` and
    /// `/metrics` then report it, and its commands (failover, checkpoint,
    /// `PATCH /colo`) reach it.
    pub fn with_colo(mut self, colo: Arc<dyn colo::control::Control>) -> Self {
        self.colo = Some(colo);
        self
    }

    fn state(&self) -> VmState {
        match self.handle.state() {
            RunState::Running => VmState::Running,
            RunState::Paused => VmState::Paused,
            RunState::ShuttingDown => VmState::ShuttingDown,
        }
    }

    fn refuse_when_stopping(&self) -> Result<(), ControlError> {
        match self.state() {
            VmState::ShuttingDown => Err(ControlError::Conflict("the VM is shutting down".into())),
            _ => Ok(()),
        }
    }
}

impl VmControl for VmmControl {
    fn status(&self) -> Status {
        Status {
            role: self.role.clone(),
            state: self.state(),
            uptime_secs: self.created.elapsed().as_secs_f64(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            colo: self.colo.as_ref().map(|c| c.status()),
        }
    }

    fn colo(&self) -> Option<Arc<dyn colo::control::Control>> {
        self.colo.clone()
    }

    fn pause(&self) -> Result<(), ControlError> {
        self.refuse_when_stopping()?;
        self.handle.pause().map_err(from_request)
    }

    fn resume(&self) -> Result<(), ControlError> {
        self.refuse_when_stopping()?;
        self.handle.resume().map_err(from_request)
    }

    fn shutdown(&self) -> Result<(), ControlError> {
        self.refuse_when_stopping()?;
        self.handle.shutdown().map_err(from_request)
    }

    // Whether the VM is paused, and has dirty tracking for a diff, is
    // checked where the work runs (a 409 from the VM thread): a check here
    // could be stale by the time the request is served.
    fn snapshot(&self, kind: Kind, path: &Path) -> Result<u64, ControlError> {
        self.handle.snapshot(kind, path).map_err(from_request)
    }

    fn state_hash(&self) -> Result<String, ControlError> {
        self.handle.state_hash().map_err(from_request)
    }

    fn metrics(&self) -> Metrics {
        Metrics {
            uptime_secs: self.created.elapsed().as_secs_f64(),
            exits: self
                .counters
                .exits
                .snapshot()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            serial_tx_bytes: self.counters.serial_tx_bytes.load(Ordering::Relaxed),
            devices: self
                .counters
                .devices
                .iter()
                .map(|(name, kind, c)| DeviceMetrics {
                    name: name.clone(),
                    kind: kind.to_string(),
                    requests: c.requests.load(Ordering::Relaxed),
                    read_bytes: c.read_bytes.load(Ordering::Relaxed),
                    write_bytes: c.write_bytes.load(Ordering::Relaxed),
                    errors: c.errors.load(Ordering::Relaxed),
                })
                .collect(),
            colo: self.colo.as_ref().map(|c| {
                let mut m = c.metrics();
                // The state gauge shows the state even if the engine's
                // metrics leave it out.
                m.state = m.state.or_else(|| Some(c.status().state));
                m
            }),
        }
    }
}
