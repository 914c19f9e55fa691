//! The KVM virtual machine: creation, boot, the vCPU threads and the
//! control loop that waits for the guest to stop.

pub mod boot;
pub mod cpuid;
pub mod memory;
pub mod regs;
pub mod vcpu;

use std::fs::File;
use std::io::Write;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::legacy::{
    EventFdTrigger, Serial, COM1_IRQ, COM1_PORT, COM_PORT_LEN, I8042, I8042_DATA_PORT,
    I8042_PORT_LEN,
};
use devices::Bus;
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::layout::KVM_TSS_ADDR;
use crate::config::{SerialOutput, VmConfig};
use memory::GuestMemory;
use vcpu::{Vcpu, VcpuCommand, VcpuError, VcpuEvent, VcpuHandle, VcpuStop};

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
#[derive(Debug, Default)]
pub struct VmCounters {
    /// Bytes the guest wrote to its serial console.
    pub serial_tx_bytes: Arc<AtomicU64>,
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
        let entry = boot::load(&mem, config)?;

        let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(io_err("the reset eventfd"))?;
        let (io_bus, serial_tx_bytes) = legacy_devices(&vm_fd, config, &reset_evt)?;
        let io_bus = Arc::new(io_bus);
        let counters = VmCounters { serial_tx_bytes };
        let mmio_bus = Arc::new(Bus::new());

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
                if index == 0 {
                    regs::set_boot_regs(&fd, entry.0)?;
                }
                Ok(Vcpu::new(index, fd, io_bus.clone(), mmio_bus.clone()))
            })
            .collect::<Result<Vec<_>, VmError>>()?;

        tracing::info!(
            kernel = %config.kernel.display(),
            mem_mib = config.mem_mib,
            vcpus = config.vcpus,
            entry = format_args!("{:#x}", entry.0),
            "VM created"
        );
        Ok(Self {
            vcpus,
            vm_fd,
            mem,
            reset_evt,
            counters,
            created,
        })
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// Starts the vCPU threads.
    pub fn start(self) -> Result<RunningVm, VmError> {
        vcpu::install_kick_handler().map_err(VmError::Signal)?;
        let (events_tx, events) = mpsc::channel();
        let wake = EventFd::new(EFD_NONBLOCK).map_err(io_err("the vCPU eventfd"))?;
        let mut running = RunningVm {
            handles: Vec::with_capacity(self.vcpus.len()),
            events,
            wake,
            reset_evt: self.reset_evt,
            counters: self.counters,
            created: self.created,
            exited: Vec::new(),
            _vm_fd: self.vm_fd,
            _mem: self.mem,
        };
        for vcpu in self.vcpus {
            let wake = running
                .wake
                .try_clone()
                .map_err(io_err("the vCPU eventfd"))?;
            // On error, dropping `running` stops the vCPUs already started.
            let handle = vcpu
                .start(events_tx.clone(), wake)
                .map_err(io_err("a vCPU thread"))?;
            running.handles.push(handle);
        }
        tracing::info!(
            "VM started {:.1} ms after creation began",
            running.created.elapsed().as_secs_f64() * 1e3
        );
        Ok(running)
    }
}

/// Serial port and i8042 on a new port-I/O bus; also returns the serial
/// port's byte counter.
fn legacy_devices(
    vm_fd: &VmFd,
    config: &VmConfig,
    reset_evt: &EventFd,
) -> Result<(Bus, Arc<AtomicU64>), VmError> {
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
    let serial = Serial::new(EventFdTrigger::new(serial_irq), out);
    let serial_tx_bytes = serial.tx_bytes();
    let i8042 = I8042::new(reset_evt.try_clone().map_err(io_err("the reset eventfd"))?);

    let mut bus = Bus::new();
    bus.insert(Arc::new(Mutex::new(serial)), COM1_PORT, COM_PORT_LEN)?;
    bus.insert(Arc::new(Mutex::new(i8042)), I8042_DATA_PORT, I8042_PORT_LEN)?;
    Ok((bus, serial_tx_bytes))
}

/// A VM whose vCPUs run. Dropping it stops them.
pub struct RunningVm {
    handles: Vec<VcpuHandle>,
    events: Receiver<VcpuEvent>,
    wake: EventFd,
    reset_evt: EventFd,
    counters: VmCounters,
    created: Instant,
    /// vCPUs that have ended, with how.
    exited: Vec<(u8, VcpuStop)>,
    // Kept alive for the vCPUs; dropped after them (see `Drop`).
    _vm_fd: VmFd,
    _mem: GuestMemory,
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

    /// Pauses every vCPU; returns once all of them stopped running guest code.
    pub fn pause(&mut self) -> Result<(), VmError> {
        self.command_all(VcpuCommand::Pause, |e| matches!(e, VcpuEvent::Paused(_)))
    }

    /// Resumes every vCPU after [`RunningVm::pause`].
    pub fn resume(&mut self) -> Result<(), VmError> {
        self.command_all(VcpuCommand::Resume, |e| matches!(e, VcpuEvent::Resumed(_)))
    }

    fn command_all(
        &mut self,
        command: VcpuCommand,
        is_ack: impl Fn(&VcpuEvent) -> bool,
    ) -> Result<(), VmError> {
        for handle in &self.handles {
            handle.send(command);
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
        let epoll = Epoll::new().map_err(io_err("epoll"))?;
        for (fd, token) in [(&self.reset_evt, RESET), (&self.wake, VCPU)] {
            use std::os::fd::AsRawFd;
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(io_err("epoll"))?;
        }
        let mut ready = [EpollEvent::default(); 2];
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
