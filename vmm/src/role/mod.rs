//! Roles: who builds a VM's device backends and wires the VM.
//! - `standalone`: disks and taps straight from the configuration;
//! - `primary`: disks whose writes are forwarded, NICs whose output is
//!   held until the checkpoint that covers it is safe (Remus), and the
//!   `colo` primary engine driving the running VM;
//! - `secondary`: an empty VM that gets everything from the primary, NICs
//!   that stay off their taps until failover, disks that commit the
//!   primary's writes per checkpoint, and the `colo` secondary engine.

pub mod primary;
pub mod secondary;
pub mod standalone;

use std::io::Write;

use devices::virtio::{BackendSwap, FileBackend, Net, NetBackend, Tap};

use crate::config::{DiskConfig, NetConfig, SerialOutput, VmConfig};
use crate::vm::console::open_console_file;
use crate::vm::machine::Layout;
use crate::vm::{VirtioBackend, VmError};

/// The console output `config` names.
fn open_console(config: &VmConfig) -> Result<Box<dyn Write + Send>, VmError> {
    Ok(match &config.serial {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::File(path) => {
            Box::new(
                open_console_file(path).map_err(|source| VmError::SerialFile {
                    path: path.display().to_string(),
                    source,
                })?,
            )
        }
    })
}

/// Opens (and locks) disk `i`'s image.
fn open_disk(i: usize, disk: &DiskConfig) -> Result<FileBackend, VmError> {
    let backend =
        FileBackend::open(&disk.path, disk.read_only).map_err(|source| VmError::Disk {
            path: disk.path.display().to_string(),
            source,
        })?;
    tracing::info!(
        path = %disk.path.display(),
        bytes = devices::virtio::BlockBackend::capacity(&backend),
        read_only = disk.read_only,
        "disk blk{i}"
    );
    Ok(backend)
}

/// Opens NIC `i`'s tap.
fn open_tap(i: usize, net: &NetConfig) -> Result<Tap, VmError> {
    let tap = Tap::open(&net.tap).map_err(|source| VmError::Tap {
        name: net.tap.clone(),
        source,
    })?;
    tracing::info!(tap = %net.tap, mac = ?net.mac_or_default(i), "nic net{i}");
    Ok(tap)
}

/// Disk `i` as the VM sees it.
fn virtio_block(i: usize, block: devices::virtio::Block) -> VirtioBackend {
    VirtioBackend {
        name: format!("blk{i}"),
        kind: "virtio-blk",
        device: Box::new(block),
    }
}

/// NIC `i` over `backend`, and the handle that replaces its backend later.
fn virtio_net(
    i: usize,
    mac: [u8; 6],
    backend: Box<dyn NetBackend>,
) -> Result<(VirtioBackend, BackendSwap), VmError> {
    let net = Net::new(backend, mac).map_err(|source| VmError::Io {
        what: "a virtio-net eventfd",
        source,
    })?;
    let swap = net.backend_swap();
    Ok((
        VirtioBackend {
            name: format!("net{i}"),
            kind: "virtio-net",
            device: Box::new(net),
        },
        swap,
    ))
}

/// What the two sides of a pair compare before replicating.
fn identity(layout: &Layout, disks: Vec<u64>) -> colo::vm::Identity {
    colo::vm::Identity {
        mem_size: layout.mem_size,
        vcpus: layout.vcpus,
        devices: layout.devices.clone(),
        disks,
        cpu_template: layout.cpu_template.clone(),
        cpuid_hash: layout.cpuid_hash,
        tsc_khz: layout.tsc_khz,
    }
}

/// A state hash in `colo`'s terms.
fn digest(hash: crate::vm::StateHash) -> colo::vm::StateDigest {
    colo::vm::StateDigest {
        hash: hash.hash,
        parts: hash.parts,
    }
}

/// Disk `disk` of a role's list, or an error naming it (the engine's
/// index comes from the peer's messages).
fn nth_disk<T>(disks: &[T], disk: usize) -> std::io::Result<&T> {
    disks.get(disk).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("no disk {disk}"))
    })
}

/// A failed VM operation in `colo`'s terms, with its causes.
fn op_err(e: impl std::error::Error) -> colo::vm::VmOpError {
    colo::vm::VmOpError(crate::vm::error_chain(&e))
}
