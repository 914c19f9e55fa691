//! The KVM virtual machine: creation, boot, the vCPU threads and the
//! control loop that waits for the guest to stop.

pub mod boot;
pub mod checkpoint;
pub mod console;
pub mod cpuid;
pub mod device_loop;
mod handle;
pub use handle::{error_chain, RequestError, RunState, VmHandle};
pub mod machine;
pub mod memory;
mod persist;
pub use persist::StateHash;
pub mod regs;
mod running;
pub use running::RunningVm;
pub mod state;
pub mod vcpu;
pub mod virtio;

use std::io::Write;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::legacy::{
    Serial, COM1_IRQ, COM1_PORT, COM_PORT_LEN, I8042, I8042_DATA_PORT, I8042_PORT_LEN,
};
use devices::Bus;
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::layout::KVM_TSS_ADDR;
use crate::config::VmConfig;
use device_loop::{DeviceLoopError, DeviceThreads};
use memory::GuestMemory;
use vcpu::{ExitCounters, Vcpu, VcpuError};
use virtio::AttachedDevice;
pub use virtio::VirtioBackend;

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
    #[error("vCPU {0} ended")]
    VcpuEnded(u8),
    #[error("the vCPUs did not acknowledge {0} in time")]
    NoAck(&'static str),
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
    /// The serial port's irqfd (a second descriptor of the port's), for
    /// [`RunningVm::settle_interrupts`].
    serial_irq: EventFd,
}

/// What the VM's devices talk to, built by the caller (see `crate::role`):
/// the VM opens no file or tap itself.
pub struct Backends {
    /// Where the serial console's output goes.
    pub console: Box<dyn Write + Send>,
    /// The virtio devices, in guest-visible order.
    pub virtio: Vec<VirtioBackend>,
}

impl Vm {
    /// Creates the VM of `config` with `backends`, loads the kernel and
    /// configures the vCPUs.
    pub fn create(config: &VmConfig, backends: Backends) -> Result<Self, VmError> {
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
        let (virtio, extra_cmdline) = virtio::attach(&vm_fd, &mem, backends.virtio, &mut mmio_bus)?;
        // A restored VM gets its memory and registers from the snapshot,
        // a secondary from the primary.
        let entry = if config.boots() {
            let mut boot_config = config.clone();
            boot_config.cmdline.push_str(&extra_cmdline);
            Some(boot::load(&mem, &boot_config)?)
        } else {
            None
        };

        let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(io_err("the reset eventfd"))?;
        let (io_bus, serial_tx_bytes, legacy) =
            legacy_devices(&vm_fd, backends.console, &reset_evt)?;
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
        // One thread per device. Queues may hold work whose notification
        // a snapshot could not carry (it sat in an ioeventfd): each thread
        // serves its device's queues once first.
        let devices = self
            .virtio
            .iter()
            .map(|d| {
                let transport = d.transport.clone();
                let kick: Box<dyn FnOnce() + Send> =
                    Box::new(move || devices::lock(&transport).kick());
                (
                    d.name.clone(),
                    d.transport.clone() as device_loop::Subscriber,
                    kick,
                )
            })
            .collect();
        let device_loop = DeviceThreads::start(devices, paused)?;
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
            vcpu_seq: 0,
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
    out: Box<dyn Write + Send>,
    reset_evt: &EventFd,
) -> Result<(Bus, Arc<AtomicU64>, Legacy), VmError> {
    let out = console::ConsoleSink::spawn(out, console::CONSOLE_BUFFER)
        .map_err(io_err("the console thread"))?;
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("the serial irqfd"))?;
    vm_fd
        .register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(kvm_err("the serial irqfd"))?;
    let irqfd = serial_irq.try_clone().map_err(io_err("the serial irqfd"))?;
    let serial = Serial::new(serial_irq, Box::new(out)).map_err(io_err("the serial port"))?;
    let serial_tx_bytes = serial.tx_bytes();
    let i8042 = I8042::new(reset_evt.try_clone().map_err(io_err("the reset eventfd"))?);

    let legacy = Legacy {
        serial: Arc::new(Mutex::new(serial)),
        i8042: Arc::new(Mutex::new(i8042)),
        serial_irq: irqfd,
    };
    let mut bus = Bus::new();
    bus.insert(legacy.serial.clone(), COM1_PORT, COM_PORT_LEN)?;
    bus.insert(legacy.i8042.clone(), I8042_DATA_PORT, I8042_PORT_LEN)?;
    Ok((bus, serial_tx_bytes, legacy))
}
