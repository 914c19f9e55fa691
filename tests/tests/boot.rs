//! Booting the test guest under KVM: it comes up, sees its vCPUs and
//! memory, powers off with exit code 0, and a guest crash makes `vmm` fail
//! with a message naming the exit and the RIP.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::io::Write;
use std::time::Duration;

use colo_tests::{guest_artifact, Vmm};

/// Bound on any single boot; a healthy boot takes milliseconds.
const TIMEOUT: Duration = Duration::from_secs(60);

fn boot(vcpus: u8, cmdline: &str) -> Vmm {
    let kernel = guest_artifact("test-guest");
    Vmm::spawn([
        "--role",
        "standalone",
        "--kernel",
        kernel.to_str().unwrap(),
        "--vcpus",
        &vcpus.to_string(),
        "--mem-mib",
        "64",
        "--cmdline",
        cmdline,
    ])
}

fn boots_to_ready_and_powers_off(vcpus: u8) {
    let mut vmm = boot(vcpus, "halt_after_ms=50");
    vmm.wait_for_serial("colo-test-guest: banner", TIMEOUT);
    let cmdline = vmm.wait_for_serial("colo-test-guest: cmdline", TIMEOUT);
    assert!(cmdline.contains("\"halt_after_ms=50\""), "{cmdline}");
    let memory = vmm.wait_for_serial("colo-test-guest: memory", TIMEOUT);
    // 64 MiB minus the reserved KiB below 640 KiB and the hole up to 1 MiB.
    assert!(memory.ends_with("memory 63 MiB"), "{memory}");
    let cpus = vmm.wait_for_serial("colo-test-guest: cpus", TIMEOUT);
    assert!(cpus.ends_with(&format!("cpus {vcpus}")), "{cpus}");
    // The per-vCPU CPUID topology reaches the guest.
    let features = vmm.wait_for_serial("colo-test-guest: cpu features", TIMEOUT);
    assert!(
        features.ends_with(&format!("logical={vcpus}")),
        "{features}"
    );
    vmm.wait_for_serial("colo-test-guest: ready", TIMEOUT);
    vmm.wait_for_serial("colo-test-guest: poweroff", TIMEOUT);
    let status = vmm.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", vmm.log());
}

#[test]
fn one_vcpu_boots_to_ready_and_powers_off() {
    boots_to_ready_and_powers_off(1);
}

#[test]
fn two_vcpus_boot_to_ready_and_power_off() {
    boots_to_ready_and_powers_off(2);
}

#[test]
fn triple_fault_fails_with_exit_reason_and_rip() {
    let mut vmm = boot(1, "crash=triple_fault");
    vmm.wait_for_serial("colo-test-guest: ready", TIMEOUT);
    let status = vmm.wait_exit(TIMEOUT);
    let log = vmm.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("guest triple fault (KVM_EXIT_SHUTDOWN)"),
        "{log}"
    );
    assert!(log.contains("at RIP 0x"), "{log}");
}

#[test]
fn guest_exception_handler_reports_page_faults() {
    let mut vmm = boot(1, "crash=page_fault halt_after_ms=10000");
    vmm.wait_for_serial("colo-test-guest: ready", TIMEOUT);
    let line = vmm.wait_for_serial("colo-test-guest: exception", TIMEOUT);
    assert!(line.contains("vector 14"), "{line}");
}

#[test]
fn config_file_settings_with_flags_overriding_them() {
    let kernel = guest_artifact("test-guest");
    let serial = tempfile::NamedTempFile::new().unwrap();
    let mut config = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        config,
        "role = \"standalone\"\nkernel = {:?}\nmem-mib = 32\nvcpus = 1\ncmdline = \"halt_after_ms=10\"\nserial = {:?}",
        kernel,
        serial.path()
    )
    .unwrap();
    let mut vmm = Vmm::spawn(["--config", config.path().to_str().unwrap(), "--vcpus", "2"]);
    let status = vmm.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", vmm.log());
    let console = std::fs::read_to_string(serial.path()).unwrap();
    assert!(console.contains("colo-test-guest: ready"), "{console}");
    assert!(console.contains("colo-test-guest: cpus 2"), "{console}");
    assert!(
        console.contains("colo-test-guest: memory 31 MiB"),
        "{console}"
    );
}
