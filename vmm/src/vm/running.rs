//! [`RunningVm`]: the started VM, its pause and resume, and the control
//! loop that waits for it to end.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::checkpoint::CheckpointError;
use super::device_loop::{DeviceLoopError, DeviceThreads};
use super::handle::{error_chain, Request, RequestError, RunState, VmHandle};
use super::memory::GuestMemory;
use super::vcpu::{VcpuCommand, VcpuEvent, VcpuHandle, VcpuStop};
use super::virtio::AttachedDevice;
use super::{io_err, persist, Legacy, VmCounters, VmError, VmExit};

/// How long the vCPUs have to acknowledge a pause or resume: a kick
/// reaches a vCPU at once unless it is stuck in a device.
const VCPU_ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// A VM whose vCPUs run. Dropping it stops them.
pub struct RunningVm {
    pub(super) device_loop: DeviceThreads,
    pub(super) handle: VmHandle,
    pub(super) handles: Vec<VcpuHandle>,
    pub(super) events: Receiver<VcpuEvent>,
    pub(super) wake: EventFd,
    pub(super) reset_evt: EventFd,
    pub(super) counters: VmCounters,
    pub(super) created: Instant,
    /// vCPUs that have ended, with how.
    pub(super) exited: Vec<(u8, VcpuStop)>,
    // Kept alive for the vCPUs; dropped after them (see `Drop`).
    pub(super) vm_fd: VmFd,
    pub(super) mem: GuestMemory,
    pub(super) virtio: Vec<AttachedDevice>,
    pub(super) legacy: Legacy,
    // The checkpoint API's (see `checkpoint`).
    pub(super) vcpu_ctx: super::state::VcpuContext,
    pub(super) layout: super::machine::Layout,
    pub(super) dirty: super::checkpoint::DirtyLog,
    /// A load happened: serve every queue once on resume.
    pub(super) kick_on_resume: bool,
    /// A load failed half-way: the VM must not run again.
    pub(super) broken: bool,
    pub(super) lineage: persist::SnapshotLineage,
    /// Sequence number of the last command sent to all vCPUs.
    pub(super) vcpu_seq: u64,
}

impl RunningVm {
    /// Counters of the VM's devices.
    pub fn counters(&self) -> &VmCounters {
        &self.counters
    }

    /// Time since the VM's creation began.
    pub fn uptime(&self) -> std::time::Duration {
        self.created.elapsed()
    }

    /// Guest memory (a handle on the same mapping): replication's live
    /// pre-copy reads it while the guest runs.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// A handle for other threads.
    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
    }

    /// Pauses every vCPU, then the device thread; returns once no guest
    /// code runs and no device request is in flight. A pause that cannot
    /// complete is rolled back: everything runs again, the VM stays
    /// running and the caller gets the error.
    pub fn pause(&mut self) -> Result<(), VmError> {
        let paused = self
            .command_all(VcpuCommand::Pause, "pause")
            .and_then(|()| Ok(self.device_loop.pause()?));
        if let Err(e) = paused {
            tracing::warn!("pause failed, resuming: {}", error_chain(&e));
            if let Err(r) = self.resume_all() {
                tracing::error!("rolling back a failed pause: {}", error_chain(&r));
            }
            return Err(e);
        }
        self.handle.set_state(RunState::Paused);
        Ok(())
    }

    /// Resumes the device thread, then every vCPU, after [`RunningVm::pause`].
    pub fn resume(&mut self) -> Result<(), VmError> {
        if self.broken {
            return Err(super::checkpoint::CheckpointError::Broken.into());
        }
        if std::mem::take(&mut self.kick_on_resume) {
            // Work whose notification a checkpoint could not carry (it sat
            // in an ioeventfd); the device threads are still parked.
            for d in &self.virtio {
                devices::lock(&d.transport).kick();
            }
        }
        self.resume_all()?;
        self.handle.set_state(RunState::Running);
        Ok(())
    }

    /// Resumes the device thread and every vCPU, whichever are paused: a
    /// resume of something running is a no-op.
    fn resume_all(&mut self) -> Result<(), VmError> {
        let devices = self.device_loop.resume();
        self.command_all(VcpuCommand::Resume, "resume")?;
        Ok(devices?)
    }

    /// Carries out requests from [`VmHandle`]s; returns true on shutdown.
    fn serve_requests(&mut self) -> bool {
        for (request, reply) in self.handle.take_requests() {
            // A job answers through its own channel and logs what it does.
            let request = match request {
                Request::Run(job) => {
                    job(self);
                    let _ = reply.send(Ok(String::new()));
                    continue;
                }
                other => other,
            };
            let state = self.handle.state();
            let failed = |e: VmError| match e {
                VmError::Refused(why) => RequestError::Refused(why),
                VmError::Checkpoint(CheckpointError::NotPaused(what)) => {
                    RequestError::NotPaused(what)
                }
                e => RequestError::Failed(error_chain(&e)),
            };
            let result = match (&request, state) {
                (Request::Pause, RunState::Paused) | (Request::Resume, RunState::Running) => {
                    Ok(String::new())
                }
                (Request::Pause, _) => self.pause().map(|()| String::new()).map_err(failed),
                (Request::Resume, _) => self.resume().map(|()| String::new()).map_err(failed),
                (Request::Snapshot(kind, path), _) => {
                    let started = Instant::now();
                    let r = self
                        .snapshot(*kind, path)
                        .map(|n| n.to_string())
                        .map_err(failed);
                    tracing::info!(
                        "{kind:?} snapshot to {} in {:.1} ms",
                        path.display(),
                        started.elapsed().as_secs_f64() * 1e3
                    );
                    r
                }
                (Request::StateHash, _) => self.state_hash().map(|h| h.to_json()).map_err(failed),
                // Taken out above.
                (Request::Run(_), _) => Ok(String::new()),
                (Request::Shutdown, _) => {
                    self.handle.close();
                    let _ = reply.send(Ok(String::new()));
                    return true;
                }
            };
            tracing::info!("{request:?} requested: {result:?}");
            let _ = reply.send(result);
        }
        false
    }

    /// Sends every vCPU `command` with a new sequence number and waits, up
    /// to [`VCPU_ACK_TIMEOUT`], for each to acknowledge that very command.
    fn command_all(
        &mut self,
        command: fn(u64) -> VcpuCommand,
        what: &'static str,
    ) -> Result<(), VmError> {
        self.vcpu_seq += 1;
        let seq = self.vcpu_seq;
        // A vCPU that has ended answers nothing: nothing to wait for.
        let mut acked: Vec<bool> = self
            .handles
            .iter()
            .map(|h| self.exited.iter().any(|(i, _)| *i == h.index()))
            .collect();
        for (handle, _) in self.handles.iter().zip(&acked).filter(|(_, a)| !**a) {
            handle.send(command(seq));
        }
        let deadline = Instant::now() + VCPU_ACK_TIMEOUT;
        while acked.iter().any(|a| !a) {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = match self.events.recv_timeout(left) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) => return Err(VmError::NoAck(what)),
                Err(RecvTimeoutError::Disconnected) => return Err(VmError::VcpusGone),
            };
            match event {
                VcpuEvent::Paused(index, s) | VcpuEvent::Resumed(index, s) if s == seq => {
                    if let Some(a) = acked.get_mut(usize::from(index)) {
                        *a = true;
                    }
                }
                VcpuEvent::Paused(..) | VcpuEvent::Resumed(..) => {} // a late ack
                VcpuEvent::Exited(index, stop) => {
                    // A vCPU that ended cannot acknowledge; the control
                    // loop reports why it ended (its wake is pending).
                    self.exited.push((index, stop));
                    let _ = self.wake.write(1);
                    return Err(VmError::VcpuEnded(index));
                }
            }
        }
        Ok(())
    }

    /// The first recorded vCPU error, if any.
    fn take_exit_error(&mut self) -> Option<VmError> {
        let pos = self
            .exited
            .iter()
            .position(|(_, stop)| matches!(stop, VcpuStop::Error(_)))?;
        match self.exited.remove(pos).1 {
            VcpuStop::Error(e) => Some(VmError::Vcpu(e)),
            _ => None,
        }
    }

    /// Runs until the guest shuts down, a vCPU fails or the device thread
    /// dies, then stops every vCPU. Requests still queued, or sent from now
    /// on, are answered at once with [`RequestError::ShuttingDown`].
    pub fn wait(mut self) -> Result<VmExit, VmError> {
        let result = self.wait_for_end();
        self.handle.close();
        self.stop_all();
        result
    }

    fn wait_for_end(&mut self) -> Result<VmExit, VmError> {
        const RESET: u64 = 0;
        const VCPU: u64 = 1;
        const CONTROL: u64 = 2;
        const DEVICES: u64 = 3;
        let epoll = Epoll::new().map_err(io_err("epoll"))?;
        let control = self.handle.0.clone();
        let fds = [
            (&self.reset_evt, RESET),
            (&self.wake, VCPU),
            (&control.evt, CONTROL),
        ];
        let died = self.device_loop.died_evts().map(|evt| (evt, DEVICES));
        for (fd, token) in fds.into_iter().chain(died) {
            use std::os::fd::AsRawFd;
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(io_err("epoll"))?;
        }
        let mut ready = [EpollEvent::default(); 4];
        loop {
            let n = match epoll.wait(-1, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("epoll")(e)),
            };
            for event in &ready[..n] {
                match event.data() {
                    RESET => {
                        let _ = self.reset_evt.read();
                        tracing::info!("guest reset: stopping the VM");
                        return Ok(VmExit::GuestShutdown);
                    }
                    DEVICES => {
                        return Err(self
                            .device_loop
                            .failure()
                            .unwrap_or(DeviceLoopError::Died("unknown".into()))
                            .into());
                    }
                    CONTROL => {
                        if self.serve_requests() {
                            tracing::info!("shutdown requested: stopping the VM");
                            return Ok(VmExit::Stopped);
                        }
                    }
                    _ => {
                        let _ = self.wake.read();
                        while let Ok(event) = self.events.try_recv() {
                            if let VcpuEvent::Exited(index, stop) = event {
                                self.exited.push((index, stop));
                            }
                        }
                        if let Some(error) = self.take_exit_error() {
                            return Err(error);
                        }
                        if self
                            .exited
                            .iter()
                            .any(|(_, stop)| matches!(stop, VcpuStop::GuestShutdown))
                        {
                            return Ok(VmExit::GuestShutdown);
                        }
                        if self.exited.len() == self.handles.len() {
                            return Ok(VmExit::Stopped);
                        }
                    }
                }
            }
        }
    }

    /// Stops and joins every vCPU thread.
    fn stop_all(&mut self) {
        for handle in &self.handles {
            handle.send(VcpuCommand::Stop);
        }
        for handle in self.handles.drain(..) {
            handle.join();
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.handle.close();
        self.stop_all();
    }
}
