//! vCPU threads: the KVM_RUN loop, exit handling, and pause/resume by kick.
//!
//! Each vCPU runs on its own thread. The VM talks to it through a command
//! channel plus a *kick*: a real-time signal whose handler sets the vCPU's
//! `kvm_run.immediate_exit`. Whether the thread is inside KVM_RUN (which then
//! returns EINTR) or about to enter it (which then returns at once), it sees
//! the command before the guest runs another instruction.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

use devices::Bus;
use kvm_bindings::{
    kvm_run, KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_SIMUL_EX, KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// Work a paused vCPU thread does on its own `VcpuFd` (state save and
/// restore); it reports its result through a channel it captured.
pub type VcpuJob = Box<dyn FnOnce(&VcpuFd) + Send>;

/// What the VM asks of a vCPU thread.
pub enum VcpuCommand {
    /// Stop running guest code and report [`VcpuEvent::Paused`] with this
    /// sequence number.
    Pause(u64),
    /// Continue after a pause and report [`VcpuEvent::Resumed`] with this
    /// sequence number.
    Resume(u64),
    /// End the thread.
    Stop,
    /// Run a job on the vCPU's fd (sent only while paused).
    Job(VcpuJob),
}

/// Why a vCPU stopped running the guest for good.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {index}: guest triple fault (KVM_EXIT_SHUTDOWN) at RIP {rip:#x}")]
    TripleFault { index: u8, rip: u64 },
    #[error(
        "vCPU {index}: KVM internal error, suberror {suberror} ({what}) at RIP {rip:#x}{data}"
    )]
    Internal {
        index: u8,
        suberror: u32,
        what: &'static str,
        rip: u64,
        data: String,
    },
    #[error("vCPU {index}: KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x} at RIP {rip:#x}")]
    FailEntry { index: u8, reason: u64, rip: u64 },
    #[error("vCPU {index}: guest crashed (KVM_SYSTEM_EVENT_CRASH) at RIP {rip:#x}")]
    Crash { index: u8, rip: u64 },
    #[error("vCPU {index}: unexpected exit {exit} at RIP {rip:#x}")]
    Unexpected { index: u8, exit: String, rip: u64 },
    #[error("vCPU {index}: thread panicked: {reason}")]
    Panicked { index: u8, reason: String },
    #[error("vCPU {index}: KVM_RUN failed")]
    Run {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// How a vCPU thread ended.
#[derive(Debug)]
pub enum VcpuStop {
    /// The guest asked for a reset or power-off through KVM (PSCI-style
    /// system events; on x86 the i8042 reset is reported by the device).
    GuestShutdown,
    /// The VM told it to stop.
    Stopped,
    /// The guest did something fatal.
    Error(VcpuError),
}

/// What a vCPU thread reports to the VM: (vCPU index, command sequence
/// number) for acknowledgements, so a late one answers nothing else.
#[derive(Debug)]
pub enum VcpuEvent {
    Paused(u8, u64),
    Resumed(u8, u64),
    Exited(u8, VcpuStop),
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Signal that kicks a vCPU out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is set by this very thread while its VcpuFd (and
        // so the kvm_run mapping) is alive, and reset to null before the
        // VcpuFd is dropped. A volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler; call once per process before starting vCPUs.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), handle_kick)
}

/// KVM exits of all vCPUs, by reason.
#[derive(Debug, Default)]
pub struct ExitCounters {
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    pub hlt: AtomicU64,
    /// KVM_RUN interrupted by a signal (pause/stop kicks).
    pub interrupted: AtomicU64,
    pub other: AtomicU64,
}

impl ExitCounters {
    /// (reason, count) pairs, for reports.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        [
            ("io_in", &self.io_in),
            ("io_out", &self.io_out),
            ("mmio_read", &self.mmio_read),
            ("mmio_write", &self.mmio_write),
            ("hlt", &self.hlt),
            ("interrupted", &self.interrupted),
            ("other", &self.other),
        ]
        .into_iter()
        .map(|(name, c)| (name, c.load(Ordering::Relaxed)))
        .collect()
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A vCPU that is configured but not running yet.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    exits: Arc<ExitCounters>,
    /// The last KVM_RUN ended in an exit KVM completes only on the next
    /// KVM_RUN (port or MMIO access): the vCPU's registers lag behind the
    /// devices until then.
    io_pending: bool,
}

/// What one KVM_RUN came back with, once the exit's borrow of the vCPU ends.
enum Outcome {
    Continue,
    Interrupted,
    Stop(VcpuStop),
    TripleFault,
    Internal,
    FailEntry(u64),
    Crash,
    Unexpected(String),
}

impl Vcpu {
    pub fn new(
        index: u8,
        fd: VcpuFd,
        io_bus: Arc<Bus>,
        mmio_bus: Arc<Bus>,
        exits: Arc<ExitCounters>,
    ) -> Self {
        Self {
            index,
            fd,
            io_bus,
            mmio_bus,
            exits,
            io_pending: false,
        }
    }

    /// The KVM vCPU, for configuration before start.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Starts the vCPU thread. It reports to `events` and writes `wake` after
    /// every report.
    /// With `paused`, the thread waits for a resume before it first enters
    /// the guest.
    pub fn start(
        self,
        events: Sender<VcpuEvent>,
        wake: EventFd,
        paused: bool,
    ) -> std::io::Result<VcpuHandle> {
        let (commands, rx) = mpsc::channel();
        let index = self.index;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.thread_main(&rx, &events, &wake, paused))?;
        Ok(VcpuHandle {
            index,
            thread,
            commands,
        })
    }

    fn thread_main(
        mut self,
        commands: &Receiver<VcpuCommand>,
        events: &Sender<VcpuEvent>,
        wake: &EventFd,
        paused: bool,
    ) {
        let report = |event| {
            // The VM may be gone already when it is tearing down.
            let _ = events.send(event);
            let _ = wake.write(1);
        };
        KVM_RUN.with(|cell| cell.set(self.fd.get_kvm_run()));
        let index = self.index;
        // A panic (a device model bug on an exit, say) ends the VM with an
        // error instead of leaving it without this vCPU (release builds
        // abort on panic anyway).
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            match paused.then(|| self.wait_while_paused(commands, &report)) {
                Some(Some(stop)) => stop,
                _ => self.run_loop(commands, &report),
            }
        }));
        KVM_RUN.with(|cell| cell.set(std::ptr::null_mut()));
        let stop = run.unwrap_or_else(|payload| {
            VcpuStop::Error(VcpuError::Panicked {
                index,
                reason: super::device_loop::panic_text(payload.as_ref()),
            })
        });
        report(VcpuEvent::Exited(index, stop));
    }

    fn run_loop(
        &mut self,
        commands: &Receiver<VcpuCommand>,
        report: &dyn Fn(VcpuEvent),
    ) -> VcpuStop {
        loop {
            let command = commands.try_recv();
            if matches!(command, Ok(VcpuCommand::Pause(_) | VcpuCommand::Job(_))) {
                if let Some(stop) = self.complete_pending_io() {
                    return stop;
                }
            }
            match command {
                Ok(VcpuCommand::Pause(seq)) => {
                    report(VcpuEvent::Paused(self.index, seq));
                    if let Some(stop) = self.wait_while_paused(commands, report) {
                        return stop;
                    }
                }
                Ok(VcpuCommand::Resume(seq)) => report(VcpuEvent::Resumed(self.index, seq)),
                Ok(VcpuCommand::Job(job)) => job(&self.fd),
                Ok(VcpuCommand::Stop) | Err(TryRecvError::Disconnected) => {
                    return VcpuStop::Stopped
                }
                Err(TryRecvError::Empty) => {}
            }
            match self.run_once() {
                Outcome::Continue | Outcome::Interrupted => {}
                outcome => return self.stop_for(outcome),
            }
        }
    }

    /// Lets KVM finish the access of the last exit without running guest
    /// code: one KVM_RUN with `immediate_exit` set completes it and returns
    /// EINTR. A string instruction may exit again first; those exits are
    /// served the same way. Returns how the thread must end, if it must.
    fn complete_pending_io(&mut self) -> Option<VcpuStop> {
        while self.io_pending {
            self.fd.set_kvm_immediate_exit(1);
            match self.run_once() {
                Outcome::Continue | Outcome::Interrupted => {}
                outcome => {
                    self.fd.set_kvm_immediate_exit(0);
                    return Some(self.stop_for(outcome));
                }
            }
        }
        None
    }

    /// Blocks until told to resume (`None`) or stop.
    fn wait_while_paused(
        &self,
        commands: &Receiver<VcpuCommand>,
        report: &dyn Fn(VcpuEvent),
    ) -> Option<VcpuStop> {
        loop {
            match commands.recv() {
                Ok(VcpuCommand::Resume(seq)) => {
                    report(VcpuEvent::Resumed(self.index, seq));
                    return None;
                }
                Ok(VcpuCommand::Pause(seq)) => report(VcpuEvent::Paused(self.index, seq)),
                Ok(VcpuCommand::Job(job)) => job(&self.fd),
                Ok(VcpuCommand::Stop) | Err(_) => return Some(VcpuStop::Stopped),
            }
        }
    }

    fn run_once(&mut self) -> Outcome {
        let Vcpu {
            index,
            fd,
            io_bus,
            mmio_bus,
            exits,
            io_pending,
        } = self;
        let result = fd.run();
        *io_pending = matches!(
            result,
            Ok(VcpuExit::IoIn(..)
                | VcpuExit::IoOut(..)
                | VcpuExit::MmioRead(..)
                | VcpuExit::MmioWrite(..))
        );
        match result {
            Ok(VcpuExit::IoIn(port, data)) => {
                bump(&exits.io_in);
                if !io_bus.read(u64::from(port), data) {
                    // Nothing there: the bus floats high.
                    data.fill(0xff);
                }
                Outcome::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                bump(&exits.io_out);
                io_bus.write(u64::from(port), data);
                Outcome::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                bump(&exits.mmio_read);
                if !mmio_bus.read(addr, data) {
                    data.fill(0xff);
                }
                Outcome::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                bump(&exits.mmio_write);
                mmio_bus.write(addr, data);
                Outcome::Continue
            }
            // With the in-kernel LAPIC, HLT is handled by KVM; an exit here
            // is harmless.
            Ok(VcpuExit::Hlt) => {
                bump(&exits.hlt);
                Outcome::Continue
            }
            Ok(VcpuExit::Intr) => {
                bump(&exits.interrupted);
                Outcome::Continue
            }
            Ok(VcpuExit::Shutdown) => Outcome::TripleFault,
            Ok(VcpuExit::InternalError) => Outcome::Internal,
            Ok(VcpuExit::FailEntry(reason, _)) => Outcome::FailEntry(reason),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => {
                    Outcome::Stop(VcpuStop::GuestShutdown)
                }
                _ => Outcome::Crash,
            },
            Ok(other) => {
                bump(&exits.other);
                Outcome::Unexpected(format!("{other:?}"))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                bump(&exits.interrupted);
                fd.set_kvm_immediate_exit(0);
                Outcome::Interrupted
            }
            Err(source) => Outcome::Stop(VcpuStop::Error(VcpuError::Run {
                index: *index,
                source,
            })),
        }
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(u64::MAX)
    }

    fn stop_for(&mut self, outcome: Outcome) -> VcpuStop {
        let index = self.index;
        let rip = self.rip();
        let error = match outcome {
            Outcome::Continue | Outcome::Interrupted => return VcpuStop::Stopped,
            Outcome::Stop(stop) => return stop,
            Outcome::TripleFault => VcpuError::TripleFault { index, rip },
            Outcome::Internal => {
                let run = self.fd.get_kvm_run();
                // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so
                // `internal` is the union member KVM filled.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                let data = if n == 0 {
                    String::new()
                } else {
                    format!(", data {:x?}", &internal.data[..n])
                };
                VcpuError::Internal {
                    index,
                    suberror: internal.suberror,
                    what: internal_error_name(internal.suberror),
                    rip,
                    data,
                }
            }
            Outcome::FailEntry(reason) => VcpuError::FailEntry { index, reason, rip },
            Outcome::Crash => VcpuError::Crash { index, rip },
            Outcome::Unexpected(exit) => VcpuError::Unexpected { index, exit, rip },
        };
        VcpuStop::Error(error)
    }
}

fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
        KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failure",
        KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
        _ => "unknown",
    }
}

/// The VM's side of a running vCPU thread.
pub struct VcpuHandle {
    index: u8,
    thread: JoinHandle<()>,
    commands: Sender<VcpuCommand>,
}

impl VcpuHandle {
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Sends `command` and kicks the thread so it sees it at once.
    pub fn send(&self, command: VcpuCommand) {
        let kick = !matches!(command, VcpuCommand::Job(_));
        // A thread that has exited has nothing left to pause or stop.
        if self.commands.send(command).is_ok() && kick {
            if let Err(e) = self.thread.kill(kick_signal()) {
                tracing::debug!("kicking vCPU {}: {e}", self.index);
            }
        }
    }

    /// Waits for the thread to end.
    pub fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!("vCPU {} thread panicked", self.index);
        }
    }
}
