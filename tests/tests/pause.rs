//! Pause and resume by kick: a paused VM's vCPUs run no guest code (its
//! console stays silent while the workload would print), and a resumed VM
//! carries on where it stopped.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use colo_tests::guest_artifact;
use vmm::config::{SerialOutput, VmConfig};
use vmm::vm::Vm;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Highest workload generation the console shows so far.
fn last_generation(console: &std::path::Path) -> Option<u64> {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix("colo-test-guest: workload generation "))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .max()
}

/// Waits for the console to show a generation above `after`. The console is
/// a file the VMM writes; reading it until the marker appears is the event.
fn wait_generation_after(console: &std::path::Path, after: Option<u64>) -> u64 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(g) = last_generation(console).filter(|&g| Some(g) > after) {
            return g;
        }
        assert!(
            Instant::now() < deadline,
            "no workload generation after {after:?}:\n{}",
            std::fs::read_to_string(console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let console = tempfile::NamedTempFile::new().unwrap();
    let config = VmConfig {
        cmdline: "dirty_mib_per_s=2 workload_mib=4".into(),
        mem_mib: 64,
        vcpus: 2,
        serial: SerialOutput::File(console.path().to_path_buf()),
        track_dirty_pages: true,
        ..VmConfig::new(guest_artifact("test-guest"))
    };
    config.validate().unwrap();
    let backends = vmm::role::standalone::backends(&config).unwrap();
    let mut vm = Vm::create(&config, backends).unwrap().start().unwrap();
    let before = wait_generation_after(console.path(), None);

    vm.pause().unwrap();
    let bytes = vm.counters().serial_tx_bytes.load(Ordering::Relaxed);
    // The workload prints a generation line about every second: a paused
    // guest must print nothing for a couple of those periods.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        vm.counters().serial_tx_bytes.load(Ordering::Relaxed),
        bytes,
        "the guest wrote to its console while paused"
    );
    let paused_at = last_generation(console.path());

    vm.resume().unwrap();
    let after = wait_generation_after(console.path(), paused_at);
    assert!(after > before);
    let text = std::fs::read_to_string(console.path()).unwrap();
    assert!(!text.contains("selfcheck FAILED"), "{text}");
}
