//! The standalone role: device backends straight from the configuration
//! (disk image files, taps, the console), opened before any VM exists.

use std::io::Write;

use devices::virtio::{Block, FileBackend, Net, Tap};

use crate::config::{SerialOutput, VmConfig};
use crate::vm::console::open_console_file;
use crate::vm::{Backends, VirtioBackend, VmError};

/// Opens every backend `config` names: the console output, then the
/// disks and the NICs in that order (their guest-visible order).
pub fn backends(config: &VmConfig) -> Result<Backends, VmError> {
    let console: Box<dyn Write + Send> = match &config.serial {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::File(path) => {
            Box::new(
                open_console_file(path).map_err(|source| VmError::SerialFile {
                    path: path.display().to_string(),
                    source,
                })?,
            )
        }
    };
    let mut virtio = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
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
        virtio.push(VirtioBackend {
            name: format!("blk{i}"),
            kind: "virtio-blk",
            device: Box::new(Block::new(Box::new(backend))),
        });
    }
    for (i, net) in config.nets.iter().enumerate() {
        let tap = Tap::open(&net.tap).map_err(|source| VmError::Tap {
            name: net.tap.clone(),
            source,
        })?;
        let mac = net.mac_or_default(i);
        tracing::info!(tap = %net.tap, mac = ?mac, "nic net{i}");
        virtio.push(VirtioBackend {
            name: format!("net{i}"),
            kind: "virtio-net",
            device: Box::new(Net::new(Box::new(tap), mac).map_err(|source| VmError::Io {
                what: "a virtio-net eventfd",
                source,
            })?),
        });
    }
    Ok(Backends { console, virtio })
}
