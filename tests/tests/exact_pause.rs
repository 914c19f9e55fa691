#![allow(clippy::unwrap_used)] // tests fail loudly by design
//! A pause is exact: no port access is half done when the vCPUs stop.
//!
//! KVM completes a port-I/O exit only on the next KVM_RUN, so a vCPU that
//! parks right after the VMM handled an `in` or `out` would leave its state
//! (RIP still at the instruction, AL stale) behind the devices' state. The
//! guest's `pio_loop` writes counter bytes through COM1 in loopback mode and
//! reads them back; many pause → state-hash → snapshot → kill → restore
//! cycles must never make it see a byte twice or lose one, and the restored
//! VM has the state hash of the one that was snapshotted.

use std::path::Path;
use std::time::Duration;

use colo_tests::http::api_request;
use colo_tests::{env_count, guest_artifact, wait_for_socket, Vmm};

const BOOT: Duration = Duration::from_secs(30);
/// Cycles in the suite; `COLO_PIO_CYCLES` asks for more.
const CYCLES: usize = 60;

fn call(sock: &Path, method: &str, path: &str, body: &str) -> String {
    let r = api_request(sock, method, path, body).unwrap();
    assert!(
        r.status / 100 == 2,
        "{method} {path}: {} {}",
        r.status,
        r.text()
    );
    r.text()
}

/// Waits for the guest's next `pio_loop` line, which must not report a
/// mismatch.
fn next_round(vmm: &mut Vmm, cycle: usize) {
    let line = vmm.wait_for_serial("pio_loop ", BOOT);
    assert!(
        !line.contains("MISMATCH"),
        "cycle {cycle}: {line}\n{}",
        vmm.serial()
    );
}

#[test]
fn port_io_is_never_half_done_across_pause_snapshot_and_restore() {
    let cycles = env_count("COLO_PIO_CYCLES", CYCLES);
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest_artifact("test-guest");
    let sock = dir.path().join("0.sock");
    let mut vmm = Vmm::spawn([
        "--kernel",
        kernel.to_str().unwrap(),
        "--mem-mib",
        "32",
        "--cmdline",
        "pio_loop",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    vmm.wait_for_serial("pio_loop started", BOOT);
    next_round(&mut vmm, 0);
    let mut sock = sock;
    for cycle in 1..=cycles {
        call(&sock, "PUT", "/vm", r#"{"state":"paused"}"#);
        let hash = call(&sock, "GET", "/state-hash", "");
        let snap = dir.path().join("vm.snap");
        let body = format!(r#"{{"type":"full","path":"{}"}}"#, snap.display());
        call(&sock, "PUT", "/snapshot", &body);
        vmm.kill();

        sock = dir.path().join(format!("{cycle}.sock"));
        vmm = Vmm::spawn([
            "--restore",
            snap.to_str().unwrap(),
            "--start-paused",
            "--api-sock",
            sock.to_str().unwrap(),
        ]);
        wait_for_socket(&sock, BOOT);
        assert_eq!(
            call(&sock, "GET", "/state-hash", ""),
            hash,
            "cycle {cycle}: the restored VM differs from the snapshotted one"
        );
        call(&sock, "PUT", "/vm", r#"{"state":"running"}"#);
        // The round the pause fell into ends with a check of every access.
        next_round(&mut vmm, cycle);
    }
}
