#![allow(clippy::unwrap_used)] // tests fail loudly by design
//! The checkpoint API end to end, in process, on real KVM: VM A runs the
//! test guest's memory workload; VM B, of the same
//! configuration, waits paused. Each cycle pauses A, saves its state and
//! the pages dirtied since the last cycle into memory, hashes A, resumes
//! A and loads the checkpoint into B: B's state hash must equal A's, part
//! by part. `COLO_STRESS_CYCLES=N` runs N cycles instead of the default.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm::config::{Role, SerialOutput, VmConfig};
use vmm::vm::checkpoint::{CheckpointError, PageBuffer};
use vmm::vm::{RunningVm, Vm};

const CYCLES: usize = 100;
const TIMEOUT: Duration = Duration::from_secs(60);

fn test_guest() -> PathBuf {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: these tests need KVM"
    );
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest/test-guest");
    assert!(
        path.exists(),
        "{} is missing: run resources/build.sh test-guest",
        path.display()
    );
    path
}

fn config(console: &Path) -> VmConfig {
    VmConfig {
        role: Role::Standalone,
        kernel: test_guest(),
        initrd: None,
        cmdline: "dirty_mib_per_s=8 workload_mib=4".into(),
        mem_mib: 32,
        vcpus: 1,
        serial: SerialOutput::File(console.to_path_buf()),
        cpu_template: Default::default(),
        track_dirty_pages: true,
        disks: Vec::new(),
        nets: Vec::new(),
        api_sock: None,
        restore: Vec::new(),
        start_paused: false,
    }
}

/// Waits until the console file shows `marker` (the VMM writes it: reading
/// it until the marker appears is the event).
fn wait_for(console: &Path, marker: &str) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if text.contains(marker) {
            return;
        }
        assert!(Instant::now() < deadline, "no {marker:?} in:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Pair {
    a: RunningVm,
    b: RunningVm,
    _dir: tempfile::TempDir,
    console_a: PathBuf,
}

fn pair() -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let (console_a, console_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let config_a = config(&console_a);
    let config_b = config(&console_b);
    config_a.validate().unwrap();
    let a = Vm::create(&config_a).unwrap().start().unwrap();
    let b = Vm::create(&config_b).unwrap().start_with(true).unwrap();
    assert_eq!(a.layout(), b.layout());
    Pair {
        a,
        b,
        _dir: dir,
        console_a,
    }
}

/// One checkpoint of A into B; panics with the differing parts if B's
/// state hash is not A's.
fn cycle(p: &mut Pair, pages: &mut PageBuffer, i: usize) {
    p.a.pause().unwrap();
    let state = p.a.save_state().unwrap();
    let dirty = p.a.take_dirty().unwrap();
    pages.clear();
    p.a.copy_pages(&dirty.pages(), pages).unwrap();
    let hash_a = p.a.state_hash().unwrap();
    p.a.resume().unwrap();
    p.b.load(p.a.layout(), &state, pages).unwrap();
    let hash_b = p.b.state_hash().unwrap();
    if hash_a != hash_b {
        let differ: Vec<_> = hash_a
            .parts
            .iter()
            .zip(&hash_b.parts)
            .filter(|(x, y)| x != y)
            .map(|(x, _)| &x.0)
            .collect();
        panic!(
            "cycle {i}: B's state hash differs from A's in {differ:?} ({} pages sent)",
            pages.len()
        );
    }
}

#[test]
fn checkpoints_into_a_live_paused_vm_reproduce_the_state_exactly() {
    let mut p = pair();
    wait_for(&p.console_a, "colo-test-guest: ready");
    let cycles = std::env::var("COLO_STRESS_CYCLES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(CYCLES);
    let mut pages = PageBuffer::new();
    let mut sent = 0;
    for i in 0..cycles {
        cycle(&mut p, &mut pages, i);
        sent += pages.len();
    }
    assert!(sent > cycles, "the workload dirtied only {sent} pages");
    // A still runs its self-checking workload.
    let text = std::fs::read_to_string(&p.console_a).unwrap();
    assert!(!text.contains("FAILED"), "{text}");
}

#[test]
fn a_load_that_does_not_fit_changes_nothing() {
    let mut p = pair();
    p.a.pause().unwrap();
    let state = p.a.save_state().unwrap();
    let before = p.b.state_hash().unwrap();

    // Another layout (a CPU template by name).
    let mut layout = p.a.layout().clone();
    layout.cpu_template = "baseline".into();
    let e = p.b.load(&layout, &state, &PageBuffer::new()).unwrap_err();
    assert!(
        e.to_string()
            .contains("the checkpoint's CPU template is baseline, this VM's is host"),
        "{e}"
    );
    // A page outside guest memory.
    let outside = PageBuffer::from_parts(vec![1 << 40], vec![0; 4096]).unwrap();
    let e = p.b.load(p.a.layout(), &state, &outside).unwrap_err();
    assert!(matches!(e, CheckpointError::Pages(_)), "{e}");
    // A state whose vCPU count does not match.
    let mut short = state.clone();
    short.vcpus.clear();
    let e =
        p.b.load(p.a.layout(), &short, &PageBuffer::new())
            .unwrap_err();
    assert!(matches!(e, CheckpointError::Mismatch(_)), "{e}");

    assert_eq!(p.b.state_hash().unwrap(), before);
    // A running VM refuses.
    p.a.resume().unwrap();
    assert!(matches!(
        p.a.load(p.b.layout(), &state, &PageBuffer::new()),
        Err(CheckpointError::NotPaused(_))
    ));
}
