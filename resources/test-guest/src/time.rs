//! Time: KVM's paravirtual clock (kvmclock) for nanoseconds since boot, and
//! a periodic local APIC timer so that waiting is `hlt`, not spinning.

use core::ptr::{addr_of, read_volatile};
use core::sync::atomic::{fence, Ordering};

use crate::arch::{cpuid, rdtsc, wrmsr, BootCell, SPURIOUS_VECTOR, TIMER_VECTOR};

const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

/// KVM's per-vCPU time information (`pvclock_vcpu_time_info`).
#[repr(C, align(64))]
struct PvClock {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

static PVCLOCK: BootCell<PvClock> = BootCell::new(PvClock {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
});

/// Why there is no clock.
#[derive(Debug)]
pub enum ClockError {
    NotKvm,
    NoKvmClock,
}

/// Turns on kvmclock for this vCPU.
pub fn init() -> Result<(), ClockError> {
    let (_, b, c, d) = cpuid(KVM_CPUID_SIGNATURE);
    let mut sig = [0u8; 12];
    sig[..4].copy_from_slice(&b.to_le_bytes());
    sig[4..8].copy_from_slice(&c.to_le_bytes());
    sig[8..].copy_from_slice(&d.to_le_bytes());
    if &sig[..9] != b"KVMKVMKVM" {
        return Err(ClockError::NotKvm);
    }
    if cpuid(KVM_CPUID_FEATURES).0 & KVM_FEATURE_CLOCKSOURCE2 == 0 {
        return Err(ClockError::NoKvmClock);
    }
    // Identity-mapped: the virtual address is the physical one. Bit 0 enables.
    wrmsr(MSR_KVM_SYSTEM_TIME_NEW, PVCLOCK.get() as u64 | 1);
    Ok(())
}

/// Nanoseconds since the VM started.
pub fn now_ns() -> u64 {
    let p = PVCLOCK.get();
    loop {
        // SAFETY: KVM updates the structure; reads are volatile and bracketed
        // by the version field (odd while KVM writes it).
        let (version, tsc_timestamp, system_time, mul, shift) = unsafe {
            let version = read_volatile(addr_of!((*p).version));
            fence(Ordering::Acquire);
            (
                version,
                read_volatile(addr_of!((*p).tsc_timestamp)),
                read_volatile(addr_of!((*p).system_time)),
                read_volatile(addr_of!((*p).tsc_to_system_mul)),
                read_volatile(addr_of!((*p).tsc_shift)),
            )
        };
        let tsc = rdtsc();
        fence(Ordering::Acquire);
        // SAFETY: as above.
        let again = unsafe { read_volatile(addr_of!((*p).version)) };
        if version & 1 == 1 || version != again {
            continue;
        }
        let mut delta = tsc.wrapping_sub(tsc_timestamp);
        delta = if shift >= 0 {
            delta << shift
        } else {
            delta >> -shift
        };
        return system_time + ((u128::from(delta) * u128::from(mul)) >> 32) as u64;
    }
}

// ---------------------------------------------------------------- LAPIC timer

const LAPIC_BASE: u64 = 0xfee0_0000;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_TIMER_INITIAL: u64 = 0x380;
const LAPIC_TIMER_CURRENT: u64 = 0x390;
const LAPIC_TIMER_DIVIDE: u64 = 0x3e0;
const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
const DIVIDE_BY_1: u32 = 0xb;

/// Period of the timer tick.
pub const TICK_NS: u64 = 5_000_000;

fn lapic_write(reg: u64, value: u32) {
    // SAFETY: the LAPIC's MMIO page is identity-mapped (uncached).
    unsafe { core::ptr::write_volatile((LAPIC_BASE + reg) as *mut u32, value) }
}

fn lapic_read(reg: u64) -> u32 {
    // SAFETY: as for `lapic_write`.
    unsafe { core::ptr::read_volatile((LAPIC_BASE + reg) as *const u32) }
}

/// Enables the local APIC and starts a periodic tick of [`TICK_NS`],
/// calibrated against kvmclock. Returns the timer's ticks per millisecond.
pub fn start_tick() -> u32 {
    lapic_write(LAPIC_SVR, SVR_ENABLE | SPURIOUS_VECTOR as u32);
    lapic_write(LAPIC_TIMER_DIVIDE, DIVIDE_BY_1);
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | TIMER_VECTOR as u32);
    const CALIBRATION_NS: u64 = 10_000_000;
    let start = now_ns();
    lapic_write(LAPIC_TIMER_INITIAL, u32::MAX);
    while now_ns() - start < CALIBRATION_NS {
        core::hint::spin_loop();
    }
    let elapsed = u32::MAX - lapic_read(LAPIC_TIMER_CURRENT);
    let per_ms = (elapsed / (CALIBRATION_NS / 1_000_000) as u32).max(1);
    lapic_write(LAPIC_LVT_TIMER, LVT_PERIODIC | TIMER_VECTOR as u32);
    lapic_write(
        LAPIC_TIMER_INITIAL,
        per_ms.saturating_mul((TICK_NS / 1_000_000) as u32),
    );
    per_ms
}
