//! [`RunningVm`]: the started VM, its pause and resume, and the control
//! loop that waits for it to end.

use std::sync::mpsc::Receiver;
use std::time::Instant;

use kvm_ioctls::VmFd;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::device_loop::DeviceLoop;
use super::handle::{error_chain, Request, RunState, VmHandle};
use super::memory::GuestMemory;
use super::vcpu::{VcpuCommand, VcpuEvent, VcpuHandle, VcpuStop};
use super::virtio::AttachedDevice;
use super::{io_err, persist, Legacy, VmCounters, VmError, VmExit};

/// A VM whose vCPUs run. Dropping it stops them.
pub struct RunningVm {
    pub(super) device_loop: DeviceLoop,
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
    pub(super) msr_indices: Vec<u32>,
    pub(super) layout: crate::snapshot::Layout,
    pub(super) dirty: persist::DirtyTracker,
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

    /// A handle for other threads.
    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
    }

    /// Pauses every vCPU, then the device thread; returns once no guest
    /// code runs and no device request is in flight.
    pub fn pause(&mut self) -> Result<(), VmError> {
        self.command_all(|| VcpuCommand::Pause, |e| matches!(e, VcpuEvent::Paused(_)))?;
        self.device_loop.pause()?;
        self.handle.set_state(RunState::Paused);
        Ok(())
    }

    /// Resumes the device thread, then every vCPU, after [`RunningVm::pause`].
    pub fn resume(&mut self) -> Result<(), VmError> {
        self.device_loop.resume()?;
        self.command_all(
            || VcpuCommand::Resume,
            |e| matches!(e, VcpuEvent::Resumed(_)),
        )?;
        self.handle.set_state(RunState::Running);
        Ok(())
    }

    /// Carries out requests from [`VmHandle`]s; returns true on shutdown.
    fn serve_requests(&mut self) -> bool {
        for (request, reply) in self.handle.take_requests() {
            let state = self.handle.state();
            let text = |e: VmError| error_chain(&e);
            let result = match (&request, state) {
                (Request::Pause, RunState::Paused) | (Request::Resume, RunState::Running) => {
                    Ok(String::new())
                }
                (Request::Pause, _) => self.pause().map(|()| String::new()).map_err(text),
                (Request::Resume, _) => self.resume().map(|()| String::new()).map_err(text),
                (Request::Snapshot(kind, path), _) => {
                    let started = Instant::now();
                    let r = self
                        .snapshot(*kind, path)
                        .map(|n| n.to_string())
                        .map_err(text);
                    tracing::info!(
                        "{kind:?} snapshot to {} in {:.1} ms",
                        path.display(),
                        started.elapsed().as_secs_f64() * 1e3
                    );
                    r
                }
                (Request::StateHash, _) => self.state_hash().map(|h| h.to_json()).map_err(text),
                (Request::Shutdown, _) => {
                    self.handle.set_state(RunState::ShuttingDown);
                    let _ = reply.send(Ok(String::new()));
                    return true;
                }
            };
            tracing::info!("{request:?} requested: {result:?}");
            let _ = reply.send(result);
        }
        false
    }

    fn command_all(
        &mut self,
        command: impl Fn() -> VcpuCommand,
        is_ack: impl Fn(&VcpuEvent) -> bool,
    ) -> Result<(), VmError> {
        for handle in &self.handles {
            handle.send(command());
        }
        let mut acks = 0;
        while acks < self.handles.len() {
            let event = self.events.recv().map_err(|_| VmError::VcpusGone)?;
            if is_ack(&event) {
                acks += 1;
            } else if let VcpuEvent::Exited(index, stop) = event {
                // A vCPU that ended cannot acknowledge: report why it ended.
                self.exited.push((index, stop));
                return Err(self.take_exit_error().unwrap_or(VmError::VcpusGone));
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

    /// Runs until the guest shuts down or a vCPU fails, then stops every vCPU.
    pub fn wait(mut self) -> Result<VmExit, VmError> {
        let result = self.wait_for_end();
        self.stop_all();
        result
    }

    fn wait_for_end(&mut self) -> Result<VmExit, VmError> {
        const RESET: u64 = 0;
        const VCPU: u64 = 1;
        const CONTROL: u64 = 2;
        let epoll = Epoll::new().map_err(io_err("epoll"))?;
        let control = self.handle.0.clone();
        for (fd, token) in [
            (&self.reset_evt, RESET),
            (&self.wake, VCPU),
            (&control.evt, CONTROL),
        ] {
            use std::os::fd::AsRawFd;
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(io_err("epoll"))?;
        }
        let mut ready = [EpollEvent::default(); 3];
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
        self.stop_all();
    }
}
