//! The standalone role: device backends straight from the configuration
//! (disk image files, taps, the console), opened before any VM exists.

use devices::virtio::Block;

use crate::config::VmConfig;
use crate::vm::{Backends, VmError};

use super::{open_console, open_disk, open_tap, virtio_block, virtio_net};

/// Opens every backend `config` names: the console output, then the
/// disks and the NICs in that order (their guest-visible order).
pub fn backends(config: &VmConfig) -> Result<Backends, VmError> {
    let mut virtio = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let backend = open_disk(i, disk)?;
        virtio.push(virtio_block(i, Block::new(Box::new(backend))));
    }
    for (i, net) in config.nets.iter().enumerate() {
        let tap = open_tap(i, net)?;
        virtio.push(virtio_net(i, net.mac_or_default(i), Box::new(tap))?.0);
    }
    Ok(Backends {
        console: open_console(config)?,
        virtio,
    })
}
