//! The KVM virtual machine: creation, boot, the vCPU threads and the
//! control loop that waits for the guest to stop.

pub mod boot;
pub mod checkpoint;
pub mod cpuid;
pub mod device_loop;
pub mod machine;
pub mod memory;
mod persist;
pub use persist::StateHash;
pub mod regs;
pub mod state;
pub mod vcpu;
pub mod virtio;

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::{
    Serial, COM1_IRQ, COM1_PORT, COM_PORT_LEN, I8042, I8042_DATA_PORT, I8042_PORT_LEN,
};
use devices::Bus;
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::layout::KVM_TSS_ADDR;
use crate::config::{SerialOutput, VmConfig};
use device_loop::{DeviceLoop, DeviceLoopError};
use memory::GuestMemory;
use vcpu::{ExitCounters, Vcpu, VcpuCommand, VcpuError, VcpuEvent, VcpuHandle, VcpuStop};
use virtio::AttachedDevice;

/// Errors creating or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM lacks {0:?}, which colo-vmm needs")]
    MissingCap(Cap),
    #[error("KVM refused {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    Bus(#[from] devices::BusError),
    #[error("cannot open serial output {path}")]
    SerialFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("all vCPUs stopped")]
    VcpusGone,
    #[error("cannot open disk {path}")]
    Disk {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open tap {name}")]
    Tap {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Virtio(#[from] devices::virtio::mmio::MmioError),
    #[error(transparent)]
    DeviceLoop(#[from] DeviceLoopError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error("cannot restore {what}: {source}")]
    Restore {
        what: String,
        #[source]
        source: devices::PersistError,
    },
    #[error("{0}")]
    Refused(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

/// How a VM ended without error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset or powered off.
    GuestShutdown,
    /// The VMM was asked to stop the VM.
    Stopped,
}

/// Counters shared between the devices and whoever reports on the VM.
#[derive(Debug, Default, Clone)]
pub struct VmCounters {
    /// Bytes the guest wrote to its serial console.
    pub serial_tx_bytes: Arc<AtomicU64>,
    /// KVM exits by reason.
    pub exits: Arc<ExitCounters>,
    /// Per virtio device: name, kind, counters.
    pub devices: Vec<(String, &'static str, Arc<devices::virtio::DeviceCounters>)>,
}

/// A created and booted VM whose vCPUs have not started yet.
pub struct Vm {
    // Field order is drop order: vCPUs and the VM fd before guest memory.
    vcpus: Vec<Vcpu>,
    vm_fd: VmFd,
    mem: GuestMemory,
    reset_evt: EventFd,
    counters: VmCounters,
    created: Instant,
    virtio: Vec<AttachedDevice>,
    legacy: Legacy,
    vcpu_ctx: state::VcpuContext,
    layout: machine::Layout,
    track_dirty: bool,
    lineage: persist::SnapshotLineage,
}

/// The legacy devices, kept for save and restore.
struct Legacy {
    serial: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
}

impl Vm {
    /// Creates the VM of `config`, loads the kernel and configures the vCPUs.
    pub fn create(config: &VmConfig) -> Result<Self, VmError> {
        let created = Instant::now();
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for cap in [
            Cap::Irqchip,
            Cap::UserMemory,
            Cap::Pit2,
            Cap::Irqfd,
            Cap::ImmediateExit,
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(cap));
            }
        }
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDR)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let mem = memory::create(config.mem_size())?;
        memory::register(&vm_fd, &mem, config.track_dirty_pages)?;
        let mut mmio_bus = Bus::new();
        let (virtio, extra_cmdline) = virtio::attach(&vm_fd, &mem, config, &mut mmio_bus)?;
        // A restored VM gets its memory and registers from the snapshot.
        let entry = if config.restore.is_empty() {
            let mut boot_config = config.clone();
            boot_config.cmdline.push_str(&extra_cmdline);
            Some(boot::load(&mem, &boot_config)?)
        } else {
            None
        };

        let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(io_err("the reset eventfd"))?;
        let (io_bus, serial_tx_bytes, legacy) = legacy_devices(&vm_fd, config, &reset_evt)?;
        let io_bus = Arc::new(io_bus);
        let counters = VmCounters {
            serial_tx_bytes,
            exits: Arc::default(),
            devices: virtio
                .iter()
                .map(|d| (d.name.clone(), d.kind, d.counters.clone()))
                .collect(),
        };
        let mmio_bus = Arc::new(mmio_bus);

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let vcpus = (0..config.vcpus)
            .map(|index| {
                let fd = vm_fd
                    .create_vcpu(u64::from(index))
                    .map_err(kvm_err("KVM_CREATE_VCPU"))?;
                let cpuid = cpuid::for_vcpu(&supported, config.cpu_template, index, config.vcpus);
                fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
                regs::set_boot_msrs(&fd)?;
                fd.set_fpu(&regs::boot_fpu())
                    .map_err(kvm_err("KVM_SET_FPU"))?;
                regs::set_virtual_wire(&fd)?;
                if let (0, Some(entry)) = (index, entry) {
                    regs::set_boot_regs(&fd, entry.0)?;
                }
                Ok(Vcpu::new(
                    index,
                    fd,
                    io_bus.clone(),
                    mmio_bus.clone(),
                    counters.exits.clone(),
                ))
            })
            .collect::<Result<Vec<_>, VmError>>()?;

        tracing::info!(
            kernel = %config.kernel.display(),
            mem_mib = config.mem_mib,
            vcpus = config.vcpus,
            entry = format_args!("{:#x}", entry.map_or(0, |e| e.0)),
            "VM created"
        );
        let cpuids = vcpus
            .iter()
            .map(|v| state::vcpu_cpuid(v.fd()))
            .collect::<Result<Vec<_>, _>>()?;
        let layout = machine::Layout {
            mem_size: config.mem_size(),
            vcpus: config.vcpus,
            devices: virtio
                .iter()
                .map(|d| (d.name.clone(), d.kind.to_string()))
                .collect(),
            cpu_template: machine::template_name(config.cpu_template),
            cpuid_hash: machine::cpuid_hash(cpuids.iter().map(Vec::as_slice)),
            tsc_khz: vcpus.first().map_or(0, |v| state::vcpu_tsc_khz(v.fd())),
        };
        Ok(Self {
            vcpus,
            vm_fd,
            mem,
            reset_evt,
            counters,
            created,
            virtio,
            legacy,
            vcpu_ctx: state::VcpuContext::new(&kvm)?,
            layout,
            track_dirty: config.track_dirty_pages,
            lineage: persist::SnapshotLineage::new(
                config.disks.iter().map(|d| d.path.clone()).collect(),
            ),
        })
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// Starts the vCPU threads.
    pub fn start(self) -> Result<RunningVm, VmError> {
        self.start_with(false)
    }

    /// Starts the vCPU and device threads; with `paused`, nothing runs until
    /// the first resume (a restored VM can be inspected first).
    pub fn start_with(self, paused: bool) -> Result<RunningVm, VmError> {
        vcpu::install_kick_handler().map_err(VmError::Signal)?;
        let (events_tx, events) = mpsc::channel();
        let wake = EventFd::new(EFD_NONBLOCK).map_err(io_err("the vCPU eventfd"))?;
        let subscribers = self
            .virtio
            .iter()
            .map(|d| d.transport.clone() as device_loop::Subscriber)
            .collect();
        // Queues may hold work whose notification a snapshot could not
        // carry (it sat in an ioeventfd): serve every queue once first.
        let transports: Vec<_> = self.virtio.iter().map(|d| d.transport.clone()).collect();
        let kick_all = Box::new(move || {
            for t in transports {
                devices::lock(&t).kick();
            }
        });
        let device_loop = DeviceLoop::start(subscribers, paused, kick_all)?;
        let mut running = RunningVm {
            device_loop,
            handle: VmHandle::new().map_err(io_err("the control eventfd"))?,
            handles: Vec::with_capacity(self.vcpus.len()),
            events,
            wake,
            reset_evt: self.reset_evt,
            counters: self.counters,
            created: self.created,
            exited: Vec::new(),
            vm_fd: self.vm_fd,
            mem: self.mem,
            virtio: self.virtio,
            legacy: self.legacy,
            vcpu_ctx: self.vcpu_ctx,
            layout: self.layout,
            dirty: checkpoint::DirtyLog::new(self.track_dirty),
            kick_on_resume: false,
            broken: false,
            lineage: self.lineage,
        };
        for vcpu in self.vcpus {
            let wake = running
                .wake
                .try_clone()
                .map_err(io_err("the vCPU eventfd"))?;
            // On error, dropping `running` stops the vCPUs already started.
            let handle = vcpu
                .start(events_tx.clone(), wake, paused)
                .map_err(io_err("a vCPU thread"))?;
            running.handles.push(handle);
        }
        if paused {
            running.handle.set_state(RunState::Paused);
        }
        tracing::info!(
            paused,
            "VM started {:.1} ms after creation began",
            running.created.elapsed().as_secs_f64() * 1e3
        );
        Ok(running)
    }
}

/// Serial port and i8042 on a new port-I/O bus; also returns the serial
/// port's byte counter and the devices.
fn legacy_devices(
    vm_fd: &VmFd,
    config: &VmConfig,
    reset_evt: &EventFd,
) -> Result<(Bus, Arc<AtomicU64>, Legacy), VmError> {
    let out: Box<dyn Write + Send> = match &config.serial {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::File(path) => {
            Box::new(File::create(path).map_err(|source| VmError::SerialFile {
                path: path.display().to_string(),
                source,
            })?)
        }
    };
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("the serial irqfd"))?;
    vm_fd
        .register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(kvm_err("the serial irqfd"))?;
    let serial = Serial::new(serial_irq, out).map_err(io_err("the serial port"))?;
    let serial_tx_bytes = serial.tx_bytes();
    let i8042 = I8042::new(reset_evt.try_clone().map_err(io_err("the reset eventfd"))?);

    let legacy = Legacy {
        serial: Arc::new(Mutex::new(serial)),
        i8042: Arc::new(Mutex::new(i8042)),
    };
    let mut bus = Bus::new();
    bus.insert(legacy.serial.clone(), COM1_PORT, COM_PORT_LEN)?;
    bus.insert(legacy.i8042.clone(), I8042_DATA_PORT, I8042_PORT_LEN)?;
    Ok((bus, serial_tx_bytes, legacy))
}

/// The state of a running VM as its handle reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    ShuttingDown,
}

/// What another thread (the API) may ask of the thread that runs the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Request {
    Pause,
    Resume,
    Shutdown,
    Snapshot(crate::snapshot::Kind, std::path::PathBuf),
    StateHash,
}

/// A request's answer: a short text (snapshot size, hash) or an error.
type Reply = mpsc::Sender<Result<String, String>>;

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

struct HandleInner {
    evt: EventFd,
    requests: Mutex<VecDeque<(Request, Reply)>>,
    state: AtomicU8,
}

/// A cloneable, thread-safe handle on a [`RunningVm`]: pause, resume and
/// shut down from another thread while [`RunningVm::wait`] runs.
#[derive(Clone)]
pub struct VmHandle(Arc<HandleInner>);

/// How long a handle waits for the VM thread to carry out a request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl VmHandle {
    fn new() -> std::io::Result<Self> {
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

    fn set_state(&self, state: RunState) {
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

    fn take_requests(&self) -> Vec<(Request, Reply)> {
        let _ = self.0.evt.read();
        devices::lock(&self.0.requests).drain(..).collect()
    }
}

/// A VM whose vCPUs run. Dropping it stops them.
pub struct RunningVm {
    device_loop: DeviceLoop,
    handle: VmHandle,
    handles: Vec<VcpuHandle>,
    events: Receiver<VcpuEvent>,
    wake: EventFd,
    reset_evt: EventFd,
    counters: VmCounters,
    created: Instant,
    /// vCPUs that have ended, with how.
    exited: Vec<(u8, VcpuStop)>,
    // Kept alive for the vCPUs; dropped after them (see `Drop`).
    vm_fd: VmFd,
    mem: GuestMemory,
    virtio: Vec<AttachedDevice>,
    legacy: Legacy,
    // The checkpoint API's (see `checkpoint`).
    vcpu_ctx: state::VcpuContext,
    layout: machine::Layout,
    dirty: checkpoint::DirtyLog,
    /// A load happened: serve every queue once on resume.
    kick_on_resume: bool,
    /// A load failed half-way: the VM must not run again.
    broken: bool,
    lineage: persist::SnapshotLineage,
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
        if self.broken {
            return Err(checkpoint::CheckpointError::Broken.into());
        }
        if std::mem::take(&mut self.kick_on_resume) {
            // Work whose notification a checkpoint could not carry (it sat
            // in an ioeventfd); the device thread is still parked.
            for d in &self.virtio {
                devices::lock(&d.transport).kick();
            }
        }
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
