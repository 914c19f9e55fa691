//! Bad input to `vmm` is refused with a clear message before any VM exists.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::io::Write;
use std::time::Duration;

use colo_tests::{guest_artifact, require_kvm, run_vmm};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `vmm` with `args`, expects failure, returns its stderr.
fn refused(args: &[&str]) -> String {
    require_kvm();
    let (status, vmm) = run_vmm(args, TIMEOUT);
    let log = vmm.log();
    assert!(!status.success(), "vmm {args:?} succeeded\n{log}");
    assert!(
        !log.contains("VM created"),
        "vmm {args:?} created a VM before refusing\n{log}"
    );
    log
}

#[test]
fn missing_kernel_file() {
    let log = refused(&["--kernel", "/nonexistent/vmlinux"]);
    assert!(
        log.contains("cannot open kernel /nonexistent/vmlinux"),
        "{log}"
    );
    assert!(log.contains("No such file"), "{log}");
}

#[test]
fn no_kernel_at_all() {
    let log = refused(&["--mem-mib", "64"]);
    assert!(log.contains("no kernel given"), "{log}");
}

#[test]
fn non_elf_kernel() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(b"this is not a kernel\n").unwrap();
    let path = file.path().to_str().unwrap();
    let log = refused(&["--kernel", path]);
    assert!(
        log.contains(&format!(
            "kernel {path} is neither an ELF vmlinux nor a bzImage"
        )),
        "{log}"
    );
}

#[test]
fn zero_memory() {
    let kernel = guest_artifact("test-guest");
    let log = refused(&["--kernel", kernel.to_str().unwrap(), "--mem-mib", "0"]);
    assert!(log.contains("guest memory must be at least 1 MiB"), "{log}");
}

#[test]
fn zero_vcpus() {
    let kernel = guest_artifact("test-guest");
    let log = refused(&["--kernel", kernel.to_str().unwrap(), "--vcpus", "0"]);
    assert!(log.contains("a VM needs at least one vCPU"), "{log}");
}

#[test]
fn too_many_vcpus() {
    let kernel = guest_artifact("test-guest");
    let log = refused(&["--kernel", kernel.to_str().unwrap(), "--vcpus", "200"]);
    assert!(log.contains("200 vCPUs requested; at most 32"), "{log}");
}

#[test]
fn replication_settings_are_checked_before_any_vm_exists() {
    let kernel = guest_artifact("test-guest");
    let k = kernel.to_str().unwrap();
    for (args, message) in [
        (
            &["--role", "primary", "--kernel", k][..],
            "a primary needs --peer HOST:PORT",
        ),
        (
            &["--role", "secondary", "--mem-mib", "64", "--vcpus", "1"],
            "a secondary needs --listen HOST:PORT",
        ),
        (
            &["--role", "secondary", "--listen", "127.0.0.1:7000"],
            "a secondary needs --mem-mib and --vcpus",
        ),
        (
            &[
                "--role",
                "secondary",
                "--listen",
                "127.0.0.1:7000",
                "--mem-mib",
                "64",
                "--vcpus",
                "1",
                "--kernel",
                k,
            ],
            "--kernel is not for --role secondary: the secondary gets its guest from the primary",
        ),
        (
            &[
                "--role",
                "primary",
                "--peer",
                "127.0.0.1:7000",
                "--kernel",
                k,
                "--mode",
                "colo",
                "--compare-timeout-ms",
                "0",
            ],
            "--compare-timeout-ms 0 is out of range: give 1..=60000",
        ),
        (
            &["--kernel", k, "--peer", "127.0.0.1:7000"],
            "--peer is a replication setting: it needs --role primary or --role secondary",
        ),
    ] {
        let log = refused(args);
        assert!(log.contains(message), "{args:?}: {log}");
    }
}

#[test]
fn malformed_config_file() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(b"mem-mib = \"lots\"\n").unwrap();
    let path = file.path().to_str().unwrap();
    let log = refused(&["--config", path]);
    assert!(
        log.contains(&format!("invalid config file {path}")),
        "{log}"
    );
    assert!(log.contains("mem-mib"), "{log}");
}

#[test]
fn missing_initrd() {
    let kernel = guest_artifact("test-guest");
    let log = refused(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        "/nonexistent/initrd",
    ]);
    assert!(
        log.contains("cannot open initrd /nonexistent/initrd"),
        "{log}"
    );
}

#[test]
fn api_socket_in_a_missing_directory_or_over_a_file() {
    let kernel = guest_artifact("test-guest");
    let kernel = kernel.to_str().unwrap();
    let log = refused(&["--kernel", kernel, "--api-sock", "/nonexistent/api.sock"]);
    assert!(
        log.contains("directory /nonexistent does not exist"),
        "{log}"
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    let path = file.path().to_str().unwrap();
    let log = refused(&["--kernel", kernel, "--api-sock", path]);
    assert!(log.contains("exists and is not a socket"), "{log}");
    assert!(file.path().is_file(), "the file was replaced");
}

#[test]
fn serial_output_that_is_no_regular_file_or_a_symlink() {
    let kernel = guest_artifact("test-guest");
    let kernel = kernel.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    std::fs::write(&target, "keep").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    for bad in [dir.path(), link.as_path()] {
        let log = refused(&["--kernel", kernel, "--serial", bad.to_str().unwrap()]);
        assert!(log.contains("cannot open serial output"), "{log}");
    }
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
}
