//! One writer per disk image: a second `vmm` on an image another one
//! holds, or the same image twice in one VM, is refused by name.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::Duration;

use colo_tests::{guest_artifact, require_kvm, run_vmm, Vmm};

const TIMEOUT: Duration = Duration::from_secs(30);

fn image() -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(64 * 512).unwrap();
    f
}

/// `vmm` with the test guest and `disks`.
fn args(disks: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--kernel".to_string(),
        guest_artifact("test-guest").display().to_string(),
    ];
    for d in disks {
        args.push("--disk".into());
        args.push(d.to_string());
    }
    args
}

/// Runs `vmm` on `disks`, expects exit 1 naming `path` as in use.
fn refused(disks: &[&str], path: &str) {
    let (status, vmm) = run_vmm(args(disks), TIMEOUT);
    let log = vmm.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!("cannot open disk {path}")) && log.contains("in use by another VM"),
        "{log}"
    );
}

#[test]
fn a_second_vmm_on_an_image_in_use_is_refused() {
    require_kvm();
    let img = image();
    let path = img.path().to_str().unwrap();
    // A guest with a disk and no NIC boots to the end (it used to spin when
    // its unused disk driver reset the queue).
    let mut first = Vmm::spawn(args(&[path]));
    first.wait_for_serial("colo-test-guest: ready", TIMEOUT);
    refused(&[path], path);
    refused(&[&format!("{path},readonly")], path);
    first.kill();
}

#[test]
fn the_same_image_twice_in_one_vm_is_refused() {
    require_kvm();
    let img = image();
    let path = img.path().to_str().unwrap();
    refused(&[path, path], path);
}
