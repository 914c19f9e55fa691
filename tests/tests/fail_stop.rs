#![allow(clippy::unwrap_used)] // tests fail loudly by design
//! Fail-stop and the end of a VM: a device thread that dies ends the VM
//! with an error naming why, instead of leaving the guest running without
//! that device; when the VM ends, every caller is answered at once.

use std::time::Duration;

use colo_tests::disk::HookedDisk;
use colo_tests::guest_artifact;
use devices::virtio::Block;
use vmm::config::{SerialOutput, VmConfig};
use vmm::vm::{error_chain, Backends, RequestError, RunState, VirtioBackend, Vm, VmExit};

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
            // A disk whose first read panics, like a device model bug.
            device: Box::new(Block::new(Box::new(HookedDisk::new(|| {
                panic!("disk model bug")
            })))),
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

#[test]
fn a_guest_reset_answers_every_caller_and_refuses_new_ones() {
    let console = tempfile::NamedTempFile::new().unwrap();
    let config = VmConfig {
        cmdline: "halt_after_ms=200".into(),
        mem_mib: 32,
        serial: SerialOutput::File(console.path().to_path_buf()),
        ..VmConfig::new(guest_artifact("test-guest"))
    };
    let backends = vmm::role::standalone::backends(&config).unwrap();
    let vm = Vm::create(&config, backends).unwrap().start().unwrap();
    let handle = vm.handle();
    // A caller pausing and resuming over and over while the guest powers
    // off: every call is answered, the last ones with "shutting down".
    let caller = handle.clone();
    let calls = std::thread::spawn(move || loop {
        let result = caller.pause().and_then(|()| caller.resume());
        if result == Err(RequestError::ShuttingDown) {
            return;
        }
        result.unwrap();
    });
    assert_eq!(vm.wait().unwrap(), VmExit::GuestShutdown);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(calls.join().is_ok()));
    assert!(
        rx.recv_timeout(Duration::from_secs(30))
            .expect("a caller was never answered"),
        "a call failed"
    );
    assert_eq!(handle.state(), RunState::ShuttingDown);
    assert_eq!(handle.state_hash(), Err(RequestError::ShuttingDown));
}
