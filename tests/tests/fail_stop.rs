#![allow(clippy::unwrap_used)] // tests fail loudly by design
//! Fail-stop: a device thread that dies ends the VM with an error naming
//! why, instead of leaving the guest running without that device.

use std::io;
use std::time::Duration;

use colo_tests::guest_artifact;
use devices::virtio::{Block, BlockBackend};
use vmm::config::{SerialOutput, VmConfig};
use vmm::vm::{error_chain, Backends, VirtioBackend, Vm};

/// A disk whose first read panics, like a device model bug.
struct PanickingDisk;

impl BlockBackend for PanickingDisk {
    fn capacity(&self) -> u64 {
        1 << 20
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&mut self, _offset: u64, _buf: &mut [u8]) -> io::Result<()> {
        panic!("disk model bug");
    }
    fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn id(&self) -> &[u8] {
        b"panicking"
    }
}

#[test]
fn a_device_thread_that_panics_ends_the_vm_with_an_error() {
    let console = tempfile::NamedTempFile::new().unwrap();
    let config = VmConfig {
        cmdline: String::new(),
        mem_mib: 32,
        serial: SerialOutput::File(console.path().to_path_buf()),
        ..VmConfig::new(guest_artifact("test-guest"))
    };
    config.validate().unwrap();
    let backends = Backends {
        console: Box::new(console.reopen().unwrap()),
        virtio: vec![VirtioBackend {
            name: "blk0".into(),
            kind: "virtio-blk",
            device: Box::new(Block::new(Box::new(PanickingDisk))),
        }],
    };
    // The guest reads its disk right after boot; the VM must then end.
    let vm = Vm::create(&config, backends).unwrap().start().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(vm.wait()));
    let result = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the VM ran on without its disk");
    let e = result.expect_err("the VM ended without an error");
    let text = error_chain(&e);
    assert!(text.contains("device thread died"), "{text}");
    assert!(text.contains("disk model bug"), "{text}");
}
