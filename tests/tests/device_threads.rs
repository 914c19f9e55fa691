#![allow(clippy::unwrap_used)] // tests fail loudly by design
//! One device thread per virtio device: a disk that never answers holds up
//! its own thread only, and the NIC's thread keeps serving the network
//! (with one shared device thread, the stuck read stopped every device).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use colo_tests::disk::HookedDisk;
use colo_tests::net::{guest_ip, Host, Topology};
use colo_tests::{guest_artifact, wait_for_file};
use devices::virtio::{Block, BlockBackend, FileBackend, Net, Tap};
use vmm::config::{SerialOutput, VmConfig};
use vmm::vm::{Backends, VirtioBackend, Vm};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Closed until the test opens it.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    fn wait(&self) {
        let (open, changed) = &*self.0;
        let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
        while !*open {
            open = changed.wait(open).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn open(&self) {
        let (open, changed) = &*self.0;
        *open.lock().unwrap_or_else(|e| e.into_inner()) = true;
        changed.notify_all();
    }
}

/// Opens the gate when dropped: declared after the VM, it is dropped
/// before it, so the stuck device thread can end (on success and on a
/// failed assertion alike).
struct OpenOnDrop(Gate);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

#[test]
fn a_disk_that_never_answers_does_not_stop_the_network() {
    let topo = Topology::builder().host_b(false).build();
    topo.add_tap(Host::A, "tap0");
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.log");
    let store = dir.path().join("store.img");
    std::fs::File::create(&store)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    // The guest keeps its kv store on the first disk and, with
    // `stall_probe`, submits one read to the second after `ready`.
    let config = VmConfig {
        cmdline: format!("ip={}/24 stall_probe", guest_ip(0)),
        mem_mib: 64,
        serial: SerialOutput::File(console.clone()),
        ..VmConfig::new(guest_artifact("test-guest"))
    };
    config.validate().unwrap();
    let gate = Gate::default();
    let stuck = gate.clone();
    let _vm = topo.host(Host::A).enter(|| {
        let block = |backend: Box<dyn BlockBackend>, name: &str| VirtioBackend {
            name: name.into(),
            kind: "virtio-blk",
            device: Box::new(Block::new(backend)),
        };
        let tap = Tap::open("tap0").unwrap();
        let backends = Backends {
            console: Box::new(std::fs::File::create(&console).unwrap()),
            virtio: vec![
                block(Box::new(FileBackend::open(&store, false).unwrap()), "blk0"),
                // Every read waits for the gate: a backend stuck in I/O.
                block(Box::new(HookedDisk::new(move || stuck.wait())), "blk1"),
                VirtioBackend {
                    name: "net0".into(),
                    kind: "virtio-net",
                    device: Box::new(
                        Net::new(Box::new(tap), [0x52, 0x54, 0, 0xc0, 0x10, 0]).unwrap(),
                    ),
                },
            ],
        };
        Vm::create(&config, backends).unwrap().start().unwrap()
    });
    let _release = OpenOnDrop(gate.clone());
    wait_for_file(
        &console,
        "stall probe: a read on the second disk submitted",
        TIMEOUT,
    );

    // blk1's thread now waits in the read for good; the NIC still serves.
    let mut echo = topo
        .client()
        .wait_tcp(SocketAddr::from((guest_ip(0), 7)), TIMEOUT)
        .expect("the network stopped with the disk");
    echo.set_read_timeout(Some(TIMEOUT)).unwrap();
    for i in 0..20 {
        let msg = format!("while the disk is stuck {i:02}");
        echo.write_all(msg.as_bytes()).unwrap();
        let mut got = vec![0u8; msg.len()];
        echo.read_exact(&mut got).unwrap();
        assert_eq!(got, msg.as_bytes());
    }
    // `_release` opens the gate before `vm` is dropped (reverse order of
    // declaration), so the stuck thread can end.
    drop(echo);
}
