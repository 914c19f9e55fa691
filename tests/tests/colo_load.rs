#![allow(clippy::unwrap_used)] // tests fail loudly by design
//! The secondary's COLO load (`vmm::role::secondary::cache`, what the
//! SVM's `ReplicaVm::load` runs on the VM thread) in process on real KVM:
//! the PVM runs the test guest's memory workload; the SVM starts as a copy
//! of it and runs on its own, so its memory diverges. A checkpoint of the
//! PVM (its dirty pages and state) loaded the COLO way (the state cache
//! gives back every page the PVM or the SVM wrote) must bring the running
//! SVM to exactly the PVM's captured state hash; a Remus-style load of the
//! PVM's dirty pages alone must not (the SVM's own writes stay).
//! Then the secondary's replica in COLO mode, driven through the
//! `colo::vm` traits as the engine drives it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use colo::control::Mode;
use colo::vm::{PageBatch, PeerFrame};
use colo_tests::{guest_artifact, wait_for_file};
use vm_memory::{Bytes, GuestAddress};
use vmm::config::{DiskConfig, ReplicationConfig, Role, SerialOutput, VmConfig};
use vmm::role::secondary::cache::{self, StateCache};
use vmm::vm::checkpoint::{self, PageBuffer};
use vmm::vm::machine::MachineState;
use vmm::vm::{RunningVm, StateHash, Vm};

const TIMEOUT: Duration = Duration::from_secs(60);
const CYCLES: usize = 3;

/// The test guest with a memory workload, dirty logging on, started (or
/// created paused: the SVM, filled by the test).
fn start(console: &Path, paused: bool) -> RunningVm {
    let config = config(console, None);
    let backends = vmm::role::standalone::backends(&config).unwrap();
    let vm = Vm::create(&config, backends).unwrap();
    vm.start_with(paused).unwrap()
}

/// The test guest's configuration, with a disk when given.
fn config(console: &Path, disk: Option<&Path>) -> VmConfig {
    let mut config = VmConfig::new(guest_artifact("test-guest"));
    config.cmdline = "dirty_mib_per_s=16 workload_mib=4".into();
    config.mem_mib = 64;
    config.vcpus = 1;
    config.serial = SerialOutput::File(console.to_path_buf());
    config.track_dirty_pages = true;
    config.disks = disk
        .iter()
        .map(|path| DiskConfig {
            path: path.to_path_buf(),
            read_only: false,
        })
        .collect();
    config
}

/// An 8 MiB image filled with `fill`.
fn image(dir: &Path, name: &str, fill: u8) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, vec![fill; 8 << 20]).unwrap();
    path
}

/// A checkpoint of the PVM: its dirty pages (all memory when `all`), its
/// state and the state's hash; the PVM runs on.
fn capture(p: &mut RunningVm, all: bool) -> (PageBuffer, MachineState, StateHash) {
    p.pause().unwrap();
    let state = p.save_state().unwrap();
    let dirty = p.take_dirty().unwrap();
    let mut pages = PageBuffer::new();
    if all {
        p.copy_memory(&mut pages).unwrap();
    } else {
        p.copy_pages(&dirty.pages(), &mut pages).unwrap();
    }
    let hash = p.state_hash_of(&state).unwrap();
    p.resume().unwrap();
    (pages, state, hash)
}

/// The parts of `got` that differ from `want`.
fn differing(want: &StateHash, got: &StateHash) -> Vec<String> {
    want.parts
        .iter()
        .zip(&got.parts)
        .filter(|(w, g)| w != g)
        .map(|(w, _)| w.0.clone())
        .collect()
}

/// Waits until the console file `path` shows one more finished workload
/// generation than it shows now: the guest ran on and wrote its memory.
/// (Polls the file like `wait_for_file`: the VMM writes it.)
fn next_generation(path: &Path) {
    let count = || {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .matches("workload generation")
            .count()
    };
    let target = count() + 1;
    let deadline = std::time::Instant::now() + TIMEOUT;
    while count() < target {
        assert!(
            std::time::Instant::now() < deadline,
            "no new workload generation in {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_colo_load_brings_a_running_diverged_svm_to_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (console_p, console_s) = (dir.path().join("p.log"), dir.path().join("s.log"));
    let mut p = start(&console_p, false);
    let mut s = start(&console_s, true);
    wait_for_file(&console_p, "colo-test-guest: ready", TIMEOUT);
    next_generation(&console_p);

    // The initial sync: all of P's memory into the cache and S, then
    // checkpoint 0 loaded the COLO way; S runs.
    let mut cache = StateCache::default();
    let cache = cache.get(s.memory()).unwrap();
    let (pages, state, hash) = capture(&mut p, true);
    for mem in [&cache, s.memory()] {
        checkpoint::write_pages(mem, pages.addrs(), pages.data()).unwrap();
    }
    cache::load(&mut s, &cache, p.layout(), &state, &PageBuffer::new()).unwrap();
    assert_eq!(
        differing(&hash, &s.state_hash().unwrap()),
        Vec::<String>::new()
    );
    s.resume().unwrap();

    let top = (64 << 20) - 4096;
    for i in 0..CYCLES {
        match i {
            // S's VMM writes a page (as a device would) that P's does not.
            0 => {
                s.memory()
                    .write_slice(&[0x5a; 64], GuestAddress(top))
                    .unwrap();
                next_generation(&console_s);
            }
            // P waits while S's guest writes its memory: S's own pages
            // are all in KVM's dirty log, none in P's.
            1 => {
                p.pause().unwrap();
                next_generation(&console_s);
                p.resume().unwrap();
            }
            // Both run.
            _ => {
                next_generation(&console_s);
                next_generation(&console_p);
            }
        }
        let (pages, state, hash) = capture(&mut p, false);
        if i == 0 {
            // Remus-style: P's dirty pages and state only. S's own
            // writes stay, so the memory differs.
            s.pause().unwrap();
            s.load(p.layout(), &state, &pages).unwrap();
            let remus = s.state_hash().unwrap();
            assert!(
                differing(&hash, &remus).contains(&"memory".to_string()),
                "a load of P's dirty pages alone made S equal to P"
            );
            // S runs on from there (diverged again) before the COLO load.
            s.resume().unwrap();
            next_generation(&console_s);
        }
        if i == 2 {
            // A state that does not fit: refused before the cache or S
            // is touched; S runs on.
            let mut short = state.clone();
            short.vcpus.clear();
            let page = |addr: u64| {
                let mut buf = vec![0; 4096];
                cache.read_slice(&mut buf, GuestAddress(addr)).unwrap();
                buf
            };
            // A page the checkpoint changes.
            let (addr, _) = pages
                .iter()
                .find(|(addr, data)| page(*addr) != *data)
                .expect("the checkpoint changes a page");
            let before = page(addr);
            assert!(cache::load(&mut s, &cache, p.layout(), &short, &pages).is_err());
            assert_eq!(page(addr), before);
            assert_eq!(s.handle().state(), vmm::vm::RunState::Running);
        }
        // The COLO load, S running.
        assert_eq!(s.handle().state(), vmm::vm::RunState::Running);
        let copied = cache::load(&mut s, &cache, p.layout(), &state, &pages).unwrap();
        assert!(copied >= pages.len());
        let got = s.state_hash().unwrap();
        assert_eq!(
            differing(&hash, &got),
            Vec::<String>::new(),
            "cycle {i}: S differs from P's checkpoint ({} PVM pages, {copied} copied)",
            pages.len()
        );
        assert_eq!(got.hash, hash.hash);
        // The load's own writes are not S's: its dirty set is empty.
        assert!(s.take_dirty().unwrap().is_empty());
        s.resume().unwrap();
    }
    for console in [&console_p, &console_s] {
        let text = std::fs::read_to_string(console).unwrap();
        assert!(!text.contains("FAILED"), "{text}");
    }
}

/// The secondary's replica and disks in COLO mode as the engine drives
/// them: the initial sync, loads into the running SVM (each equal to the
/// PVM's checkpoint hash), runs, and the takeover that lets the SVM run
/// on. The secondary runs without `--track-dirty-pages`: connecting the
/// NICs switches the dirty log on.
#[test]
fn the_colo_replica_loads_into_the_running_svm_and_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let (console_p, console_s) = (dir.path().join("p.log"), dir.path().join("s.log"));
    let image_p = image(dir.path(), "p.img", 0);
    let image_s = image(dir.path(), "s.img", 0);
    let config_p = config(&console_p, Some(&image_p));
    let backends = vmm::role::standalone::backends(&config_p).unwrap();
    let mut p = Vm::create(&config_p, backends).unwrap().start().unwrap();

    let mut config_s = config(&console_s, Some(&image_s));
    config_s.role = Role::Secondary;
    config_s.kernel = PathBuf::new();
    config_s.track_dirty_pages = false;
    config_s.replication = Some(ReplicationConfig {
        mode: Mode::Colo,
        ..ReplicationConfig::secondary("127.0.0.1:0")
    });
    let (backends, parts) = vmm::role::secondary::backends(&config_s).unwrap();
    let s = Vm::create(&config_s, backends)
        .unwrap()
        .start_with(true)
        .unwrap();
    let (mut replica, mut disks) = vmm::role::secondary::replica(Mode::Colo, &s, parts);
    let handle = s.handle();
    let vm_thread = std::thread::spawn(move || s.wait());
    assert!(dir.path().join("s.img.colo-journal").exists());

    let sent: Arc<Mutex<Vec<PeerFrame>>> = Arc::default();
    let out = sent.clone();
    replica
        .colo_net(
            Arc::new(move |f| {
                out.lock().unwrap().push(f);
                Ok(())
            }),
            Arc::new(|_| {}),
        )
        .unwrap();
    wait_for_file(&console_p, "colo-test-guest: ready", TIMEOUT);
    next_generation(&console_p);

    // The initial sync: all memory, then checkpoint 0's state.
    let batch = |pages: PageBuffer| {
        let (addrs, data) = pages.into_parts();
        PageBatch { addrs, data }
    };
    let (pages, state, hash) = capture(&mut p, true);
    replica.write_pages(&batch(pages)).unwrap();
    replica
        .load(PageBatch::default(), postcard::to_allocvec(&state).unwrap())
        .unwrap();
    assert_eq!(replica.digest().unwrap().hash, hash.hash);
    disks.commit(0).unwrap();
    replica.run(0).unwrap();
    assert_eq!(handle.state(), vmm::vm::RunState::Running);

    for epoch in 1..=2 {
        next_generation(&console_s);
        next_generation(&console_p);
        let (pages, state, hash) = capture(&mut p, false);
        replica
            .load(batch(pages), postcard::to_allocvec(&state).unwrap())
            .unwrap();
        assert_eq!(handle.state(), vmm::vm::RunState::Paused);
        let digest = replica.digest().unwrap();
        assert_eq!(digest.hash, hash.hash, "epoch {epoch}: {:?}", digest.parts);
        disks.commit(epoch).unwrap();
        replica.run(epoch).unwrap();
    }
    let stats = replica.proxy_stats();
    assert_eq!((stats.queue_depth, stats.dropped_frames), (0, 0));

    // Failover: the SVM runs on from where it is.
    disks.take_over().unwrap();
    replica.take_over().unwrap();
    assert_eq!(handle.state(), vmm::vm::RunState::Running);
    next_generation(&console_s);
    handle.shutdown().unwrap();
    vm_thread.join().unwrap().unwrap();
    for console in [&console_p, &console_s] {
        let text = std::fs::read_to_string(console).unwrap();
        assert!(!text.contains("FAILED"), "{text}");
    }
}
