//! Linux 6.1 (resources/linux) under `vmm` on the KVM of our machines.
//!
//! Guest kernel code runs partly emulated here and very slowly (see
//! ../shared/KVM-HERE.md and resources/linux/README.md), so this test
//! asserts the milestones Linux reliably reaches, in order, each within a
//! generous bound, and records how long each took.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::{Duration, Instant};

use colo_tests::{guest_artifact, Vmm};

/// The command line: serial console, reset through the i8042, what this
/// KVM needs (no XSAVE; POPCNT, SMAP, SMEP hidden by CPUID bit number), and
/// no LAPIC timer: with it, timer interrupts in the emulated guest kernel
/// slow Linux to a crawl before the initramfs is unpacked (see
/// resources/linux/README.md).
pub const CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 noxsave clearcpuid=151,308,295 nolapic_timer";

/// Serial lines Linux prints on its way up, in order, with a bound on the
/// time from `vmm` start to each (measured here: about 3 s, 3 s, 20 s, 35 s).
const VMLINUX_MILESTONES: &[(&str, Duration)] = &[
    ("Linux version 6.1", Duration::from_secs(60)),
    (
        "found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]",
        Duration::from_secs(60),
    ),
    (
        "serial8250: ttyS0 at I/O 0x3f8 (irq = 4, base_baud = 115200) is a 16550A",
        Duration::from_secs(150),
    ),
    ("Freeing initrd memory", Duration::from_secs(200)),
];

/// The bzImage first decompresses itself, in emulated guest kernel code:
/// about 35 s before the banner here.
const BZIMAGE_MILESTONES: &[(&str, Duration)] = &[
    ("Linux version 6.1", Duration::from_secs(180)),
    (
        "found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]",
        Duration::from_secs(180),
    ),
];

fn boot_and_follow(kernel: &str, milestones: &[(&str, Duration)]) {
    let kernel = guest_artifact(kernel);
    let initrd = guest_artifact("initramfs.cpio.gz");
    let start = Instant::now();
    let mut vmm = Vmm::spawn([
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--mem-mib",
        "256",
        "--cmdline",
        CMDLINE,
    ]);
    for (marker, bound) in milestones {
        let left = bound.saturating_sub(start.elapsed());
        vmm.wait_for_serial(marker, left);
        eprintln!("{:>8.1} s  {marker}", start.elapsed().as_secs_f64());
    }
}

#[test]
fn vmlinux_boots_to_the_furthest_milestone_this_kvm_allows() {
    boot_and_follow("vmlinux", VMLINUX_MILESTONES);
}

#[test]
fn bzimage_boots_through_its_64bit_entry() {
    boot_and_follow("bzImage", BZIMAGE_MILESTONES);
}
