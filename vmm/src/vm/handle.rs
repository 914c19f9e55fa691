//! [`VmHandle`]: how other threads (the API) reach the thread that runs
//! the VM, and the requests they send it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The state of a running VM as its handle reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    ShuttingDown,
}

/// Work run on the VM thread with the VM in hand (see [`VmHandle::run`]).
pub(super) type Job = Box<dyn FnOnce(&mut super::RunningVm) + Send>;

/// What another thread (the API, replication) may ask of the thread that
/// runs the VM.
pub(super) enum Request {
    Pause,
    Resume,
    Shutdown,
    Snapshot(crate::snapshot::Kind, std::path::PathBuf),
    StateHash,
    Run(Job),
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Pause => f.write_str("Pause"),
            Request::Resume => f.write_str("Resume"),
            Request::Shutdown => f.write_str("Shutdown"),
            Request::Snapshot(kind, path) => write!(f, "Snapshot({kind:?}, {})", path.display()),
            Request::StateHash => f.write_str("StateHash"),
            Request::Run(_) => f.write_str("Run"),
        }
    }
}

/// Why a request was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// It needs a paused VM.
    #[error("{0} needs a paused VM: PUT /vm {{\"state\":\"paused\"}} first")]
    NotPaused(&'static str),
    /// The VM is ending (or has ended); nothing more is carried out.
    #[error("the VM is shutting down")]
    ShuttingDown,
    /// The VM's state forbids it now (e.g. a diff snapshot before any
    /// full one); the message says what to do.
    #[error("{0}")]
    Refused(String),
    /// The VMM tried and failed; the message has the causes.
    #[error("{0}")]
    Failed(String),
}

/// A request's answer: a short text (snapshot size, hash) or why not.
pub(super) type Reply = mpsc::Sender<Result<String, RequestError>>;

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

/// Requests waiting for the VM thread; once closed, none is taken.
#[derive(Default)]
struct Queue {
    requests: VecDeque<(Request, Reply)>,
    closed: bool,
}

pub(super) struct HandleInner {
    pub(super) evt: EventFd,
    queue: Mutex<Queue>,
    state: AtomicU8,
}

/// A cloneable, thread-safe handle on a [`super::RunningVm`]: pause,
/// resume and shut down from another thread while
/// [`super::RunningVm::wait`] runs.
///
/// A call waits as long as its work takes (a snapshot scales with guest
/// memory): every request is answered, by the VM thread or, when the VM
/// ends first, with [`RequestError::ShuttingDown`]. The VM thread bounds
/// what can hang (a pause that cannot complete fails and is rolled back).
#[derive(Clone)]
pub struct VmHandle(pub(super) Arc<HandleInner>);

impl VmHandle {
    pub(super) fn new() -> std::io::Result<Self> {
        Ok(Self(Arc::new(HandleInner {
            evt: EventFd::new(EFD_NONBLOCK)?,
            queue: Mutex::new(Queue::default()),
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

    fn call(&self, request: Request) -> Result<String, RequestError> {
        let (tx, rx) = mpsc::channel();
        {
            let mut queue = devices::lock(&self.0.queue);
            if queue.closed || self.state() == RunState::ShuttingDown {
                return Err(RequestError::ShuttingDown);
            }
            queue.requests.push_back((request, tx));
        }
        self.0
            .evt
            .write(1)
            .map_err(|e| RequestError::Failed(format!("cannot reach the VM thread: {e}")))?;
        // A reply dropped unanswered means the VM thread is gone.
        rx.recv().map_err(|_| RequestError::ShuttingDown)?
    }

    /// Pauses vCPUs and device processing; a no-op when paused.
    pub fn pause(&self) -> Result<(), RequestError> {
        self.call(Request::Pause).map(drop)
    }

    /// Writes a snapshot of the paused VM; returns its size in bytes.
    pub fn snapshot(
        &self,
        kind: crate::snapshot::Kind,
        path: &std::path::Path,
    ) -> Result<u64, RequestError> {
        let size = self.call(Request::Snapshot(kind, path.to_path_buf()))?;
        size.parse()
            .map_err(|_| RequestError::Failed(format!("bad snapshot size {size:?}")))
    }

    /// The state hash of the paused VM, as JSON: `{"hash": ..., "parts": {...}}`.
    pub fn state_hash(&self) -> Result<String, RequestError> {
        self.call(Request::StateHash)
    }

    /// Resumes after [`VmHandle::pause`]; a no-op when running.
    pub fn resume(&self) -> Result<(), RequestError> {
        self.call(Request::Resume).map(drop)
    }

    /// Runs `job` on the VM thread, between two requests, with the VM in
    /// hand, and returns its result: how replication pauses, captures and
    /// resumes the guest in one step. [`RequestError::ShuttingDown`] when
    /// the VM ends first.
    pub fn run<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut super::RunningVm) -> R + Send + 'static,
    ) -> Result<R, RequestError> {
        let (tx, rx) = mpsc::channel();
        self.call(Request::Run(Box::new(move |vm| {
            let _ = tx.send(job(vm));
        })))?;
        rx.recv().map_err(|_| RequestError::ShuttingDown)
    }

    /// Stops the VM; [`super::RunningVm::wait`] then returns
    /// [`super::VmExit::Stopped`].
    pub fn shutdown(&self) -> Result<(), RequestError> {
        self.call(Request::Shutdown).map(drop)
    }

    pub(super) fn take_requests(&self) -> Vec<(Request, Reply)> {
        let _ = self.0.evt.read();
        devices::lock(&self.0.queue).requests.drain(..).collect()
    }

    /// Marks the VM as ending: requests queued now or later are answered
    /// with [`RequestError::ShuttingDown`] at once.
    pub(super) fn close(&self) {
        self.set_state(RunState::ShuttingDown);
        let mut queue = devices::lock(&self.0.queue);
        queue.closed = true;
        for (_, reply) in queue.requests.drain(..) {
            let _ = reply.send(Err(RequestError::ShuttingDown));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn callers_are_answered_when_the_vm_ends() {
        let handle = VmHandle::new().unwrap();
        let caller = handle.clone();
        let waiting = std::thread::spawn(move || caller.pause());
        // The request is queued once the VM thread's eventfd is written.
        while devices::lock(&handle.0.queue).requests.is_empty() {
            std::thread::yield_now();
        }
        handle.close();
        assert_eq!(waiting.join().unwrap(), Err(RequestError::ShuttingDown));
        // Later callers do not wait at all.
        assert_eq!(handle.state_hash(), Err(RequestError::ShuttingDown));
        assert_eq!(handle.state(), RunState::ShuttingDown);
    }
}
