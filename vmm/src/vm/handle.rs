//! [`VmHandle`]: how other threads (the API) reach the thread that runs
//! the VM, and the requests they send it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The state of a running VM as its handle reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    ShuttingDown,
}

/// What another thread (the API) may ask of the thread that runs the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Request {
    Pause,
    Resume,
    Shutdown,
    Snapshot(crate::snapshot::Kind, std::path::PathBuf),
    StateHash,
}

/// A request's answer: a short text (snapshot size, hash) or an error.
pub(super) type Reply = mpsc::Sender<Result<String, String>>;

/// An error with its sources, "outer: inner: innermost".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

pub(super) struct HandleInner {
    pub(super) evt: EventFd,
    requests: Mutex<VecDeque<(Request, Reply)>>,
    state: AtomicU8,
}

/// A cloneable, thread-safe handle on a [`RunningVm`]: pause, resume and
/// shut down from another thread while [`RunningVm::wait`] runs.
#[derive(Clone)]
pub struct VmHandle(pub(super) Arc<HandleInner>);

/// How long a handle waits for the VM thread to carry out a request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl VmHandle {
    pub(super) fn new() -> std::io::Result<Self> {
        Ok(Self(Arc::new(HandleInner {
            evt: EventFd::new(EFD_NONBLOCK)?,
            requests: Mutex::new(VecDeque::new()),
            state: AtomicU8::new(RunState::Running as u8),
        })))
    }

    /// The VM's state.
    pub fn state(&self) -> RunState {
        match self.0.state.load(Ordering::SeqCst) {
            s if s == RunState::Paused as u8 => RunState::Paused,
            s if s == RunState::ShuttingDown as u8 => RunState::ShuttingDown,
            _ => RunState::Running,
        }
    }

    pub(super) fn set_state(&self, state: RunState) {
        self.0.state.store(state as u8, Ordering::SeqCst);
    }

    fn call(&self, request: Request) -> Result<String, String> {
        if self.state() == RunState::ShuttingDown {
            return Err("the VM is shutting down".into());
        }
        let (tx, rx) = mpsc::channel();
        devices::lock(&self.0.requests).push_back((request, tx));
        self.0
            .evt
            .write(1)
            .map_err(|e| format!("cannot reach the VM thread: {e}"))?;
        rx.recv_timeout(REQUEST_TIMEOUT)
            .map_err(|_| "the VM thread did not answer".to_string())?
    }

    /// Pauses vCPUs and device processing; a no-op when paused.
    pub fn pause(&self) -> Result<(), String> {
        self.call(Request::Pause).map(drop)
    }

    /// Writes a snapshot of the paused VM; returns its size in bytes.
    pub fn snapshot(
        &self,
        kind: crate::snapshot::Kind,
        path: &std::path::Path,
    ) -> Result<u64, String> {
        let size = self.call(Request::Snapshot(kind, path.to_path_buf()))?;
        size.parse()
            .map_err(|_| format!("bad snapshot size {size:?}"))
    }

    /// The state hash of the paused VM, as JSON: `{"hash": ..., "parts": {...}}`.
    pub fn state_hash(&self) -> Result<String, String> {
        self.call(Request::StateHash)
    }

    /// Resumes after [`VmHandle::pause`]; a no-op when running.
    pub fn resume(&self) -> Result<(), String> {
        self.call(Request::Resume).map(drop)
    }

    /// Stops the VM; [`RunningVm::wait`] then returns [`VmExit::Stopped`].
    pub fn shutdown(&self) -> Result<(), String> {
        self.call(Request::Shutdown).map(drop)
    }

    pub(super) fn take_requests(&self) -> Vec<(Request, Reply)> {
        let _ = self.0.evt.read();
        devices::lock(&self.0.requests).drain(..).collect()
    }
}
