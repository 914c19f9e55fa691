//! Exact vCPU and VM state through KVM: what a snapshot or a checkpoint
//! carries besides memory and devices.
//!
//! Save order: CPUID and TSC frequency (the vCPU's identity), MP state,
//! registers, XSAVE, LAPIC, MSRs, and the pending events LAST: reading
//! other state (the LAPIC, MSRs) can make KVM move an event from one place
//! to another, so the events read last are the ones that match the rest.
//! Restore order is what KVM needs to accept a state: MP state, registers,
//! XSAVE, LAPIC, then MSRs with `IA32_TSC_DEADLINE` after `IA32_TSC` (a
//! deadline is meaningless before the TSC is set), and pending events last.
//! The CPUID and TSC frequency are not restored: they are the VM's
//! identity, set at creation and compared (see `machine::Layout`).
//!
//! The XSAVE area is sized by `KVM_CAP_XSAVE2` (larger than the legacy
//! 4 KiB when the host enabled dynamic features such as AMX), with the
//! legacy call when KVM reports no more than 4 KiB.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    Xsave, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_VCPUEVENT_VALID_PAYLOAD,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// LAPIC register offsets whose contents run with time, not guest actions.
const LAPIC_TIMER_CURRENT_COUNT: usize = 0x390;
/// The processor priority register: derived from the TPR and the ISR, and
/// recomputed by KVM lazily (on a read, an injection, a state load), so two
/// equal vCPUs can report different stale values.
const LAPIC_PPR: usize = 0xa0;

/// Errors reading or writing KVM state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{what} failed")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted {done} of {total} MSRs; it refused MSR {index:#x}")]
    Msr {
        done: usize,
        total: usize,
        index: u32,
    },
    #[error("too many MSRs for one KVM call: {0}")]
    MsrCount(usize),
    #[error("an XSAVE area of {found} bytes; this host's KVM takes {host}")]
    XsaveSize { found: usize, host: usize },
    #[error("the state was saved on a host with XSAVE (it carries XCRs); this host has no XSAVE")]
    NoXsaveHost,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// Everything KVM holds for one vCPU.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the vCPU was created with (identity: compared, not set).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The guest TSC's frequency; 0 when KVM cannot tell (identity).
    pub tsc_khz: u32,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The XSAVE area as 32-bit words: the legacy 4 KiB region, followed
    /// by the extended part when KVM's area is larger (`KVM_CAP_XSAVE2`).
    pub xsave: Vec<u32>,
    /// The extended control registers; `None` when saved on a host without
    /// XSAVE, where KVM has none (and refuses to set any).
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// (index, value), in restore order.
    pub msrs: Vec<(u32, u64)>,
}

/// The VM-wide interrupt controllers, PIT and clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// Hyper-V's synthetic MSRs. A KVM built with Hyper-V emulation lists them
/// for save/restore, and two of them (0x40000010 VP runtime, 0x40000020
/// reference counter) run with time even while the VM is paused. `vmm`
/// never offers Hyper-V to a guest (its CPUID leaf 0x40000000 is KVM's), so
/// a guest never enables them: they are left out of what is saved.
const HYPERV_MSRS: std::ops::RangeInclusive<u32> = 0x4000_0000..=0x4000_01ff;

/// The MSRs KVM reports for save/restore, without Hyper-V's.
pub fn msr_index_list(kvm_fd: &Kvm) -> Result<Vec<u32>, StateError> {
    let list = kvm_fd
        .get_msr_index_list()
        .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(list
        .as_slice()
        .iter()
        .copied()
        .filter(|index| !HYPERV_MSRS.contains(index))
        .collect())
}

/// Reads every MSR of `indices` that this vCPU can read; those KVM refuses
/// to read (features the host lacks) are left out.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| StateError::MsrCount(entries.len()))?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // KVM stops at the first MSR it cannot read: skip that one.
        rest = rest.get(n + 1..).unwrap_or(&[]);
    }
    // TSC first, the TSC deadline last.
    out.sort_by_key(|&(index, _)| match index {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
    Ok(out)
}

/// The vCPU's XCRs, or `None` on a host without XSAVE: there KVM reports
/// none and fails `KVM_SET_XCRS` with EINVAL.
fn host_xcrs(fd: &VcpuFd) -> Result<Option<kvm_xcrs>, StateError> {
    let xcrs = fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
    Ok((xcrs.nr_xcrs > 0).then_some(xcrs))
}

/// What saving and restoring a vCPU needs to know about the host's KVM.
#[derive(Debug, Clone)]
pub struct VcpuContext {
    /// The MSRs to save ([`msr_index_list`]).
    pub msr_indices: Vec<u32>,
    /// Bytes of KVM's XSAVE area: `KVM_CAP_XSAVE2`, at least the legacy
    /// 4 KiB.
    pub xsave_size: usize,
}

impl VcpuContext {
    /// Asks KVM.
    pub fn new(kvm_fd: &Kvm) -> Result<Self, StateError> {
        let legacy = std::mem::size_of::<kvm_xsave>();
        let xsave2 = usize::try_from(kvm_fd.check_extension_int(Cap::Xsave2)).unwrap_or(0);
        Ok(Self {
            msr_indices: msr_index_list(kvm_fd)?,
            xsave_size: xsave2.max(legacy),
        })
    }
}

/// The extended words an XSAVE area of `size` bytes has beyond the legacy
/// 4 KiB `kvm_xsave`, in `kvm_xsave2`'s flexible array's entries.
fn xsave_extra_words(size: usize) -> usize {
    size.saturating_sub(std::mem::size_of::<kvm_xsave>())
        .div_ceil(std::mem::size_of::<u32>())
}

fn read_xsave(fd: &VcpuFd, size: usize) -> Result<Vec<u32>, StateError> {
    let extra = xsave_extra_words(size);
    if extra == 0 {
        return Ok(fd
            .get_xsave()
            .map_err(kvm("KVM_GET_XSAVE"))?
            .region
            .to_vec());
    }
    let mut xsave = Xsave::new(extra).map_err(|_| StateError::XsaveSize {
        found: size,
        host: size,
    })?;
    // SAFETY: `xsave` holds the legacy area plus `extra` words, the
    // KVM_CAP_XSAVE2 size KVM reported for this host.
    unsafe { fd.get_xsave2(&mut xsave) }.map_err(kvm("KVM_GET_XSAVE2"))?;
    let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(xsave.as_slice());
    Ok(words)
}

fn write_xsave(fd: &VcpuFd, words: &[u32], size: usize) -> Result<(), StateError> {
    let legacy = std::mem::size_of::<kvm_xsave>() / 4;
    let extra = xsave_extra_words(size);
    if words.len() != legacy + extra {
        return Err(StateError::XsaveSize {
            found: words.len() * 4,
            host: size,
        });
    }
    if extra == 0 {
        let mut xsave = kvm_xsave::default();
        xsave.region.copy_from_slice(words);
        // SAFETY: a whole legacy kvm_xsave, and KVM's area is no larger.
        return unsafe { fd.set_xsave(&xsave) }.map_err(kvm("KVM_SET_XSAVE"));
    }
    let mut xsave = Xsave::new(extra).map_err(|_| StateError::XsaveSize {
        found: words.len() * 4,
        host: size,
    })?;
    // SAFETY: the length and capacity were set by `Xsave::new(extra)`.
    unsafe { xsave.as_mut_fam_struct() }
        .xsave
        .region
        .copy_from_slice(&words[..legacy]);
    xsave.as_mut_slice().copy_from_slice(&words[legacy..]);
    // SAFETY: `xsave` holds the whole KVM_CAP_XSAVE2 area KVM reads.
    unsafe { fd.set_xsave2(&xsave) }.map_err(kvm("KVM_SET_XSAVE2"))
}

/// The CPUID a vCPU runs with.
pub fn vcpu_cpuid(fd: &VcpuFd) -> Result<Vec<kvm_cpuid_entry2>, StateError> {
    Ok(fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec())
}

/// The guest TSC's frequency in kHz; 0 when KVM cannot tell.
pub fn vcpu_tsc_khz(fd: &VcpuFd) -> u32 {
    fd.get_tsc_khz().unwrap_or(0)
}

/// Captures a paused vCPU; its pending events last (see the module doc).
pub fn save_vcpu(fd: &VcpuFd, ctx: &VcpuContext) -> Result<VcpuState, StateError> {
    let cpuid = vcpu_cpuid(fd)?;
    let tsc_khz = vcpu_tsc_khz(fd);
    let mp_state = fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let xsave = read_xsave(fd, ctx.xsave_size)?;
    let xcrs = host_xcrs(fd)?;
    let debugregs = fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let msrs = read_msrs(fd, &ctx.msr_indices)?;
    let events = canonical_events(fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?);
    Ok(VcpuState {
        cpuid,
        tsc_khz,
        mp_state,
        events,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
    })
}

/// The vCPU events as KVM_SET_VCPU_EVENTS keeps them. Without
/// KVM_CAP_EXCEPTION_PAYLOAD (not enabled here) KVM reports an exception
/// it queued but has not delivered yet as both pending and injected, and a
/// set drops `pending` (and the payload flag) and keeps `injected`: the
/// same exception, delivered at the next entry either way. Saved in this
/// form, a state is what a load of it reads back, which state hashes
/// compare.
fn canonical_events(mut e: kvm_vcpu_events) -> kvm_vcpu_events {
    if e.flags & KVM_VCPUEVENT_VALID_PAYLOAD == 0 {
        e.exception.injected |= e.exception.pending;
        e.exception.pending = 0;
        e.exception_has_payload = 0;
    }
    e
}

/// Checks what [`restore_vcpu`] would otherwise find out half-way: that
/// the XSAVE area has this host's size.
pub fn check_vcpu(state: &VcpuState, ctx: &VcpuContext) -> Result<(), StateError> {
    let want = std::mem::size_of::<kvm_xsave>() / 4 + xsave_extra_words(ctx.xsave_size);
    if state.xsave.len() != want {
        return Err(StateError::XsaveSize {
            found: state.xsave.len() * 4,
            host: ctx.xsave_size,
        });
    }
    Ok(())
}

/// Loads `state` into a vCPU that has not run since it was created (or is
/// paused).
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState, ctx: &VcpuContext) -> Result<(), StateError> {
    check_vcpu(state, ctx)?;
    fd.set_mp_state(state.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    fd.set_sregs(&state.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    fd.set_regs(&state.regs).map_err(kvm("KVM_SET_REGS"))?;
    write_xsave(fd, &state.xsave, ctx.xsave_size)?;
    if let Some(xcrs) = &state.xcrs {
        if host_xcrs(fd)?.is_none() {
            return Err(StateError::NoXsaveHost);
        }
        fd.set_xcrs(xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&state.debugregs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = state
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| StateError::MsrCount(entries.len()))?;
    let done = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if done != entries.len() {
        return Err(StateError::Msr {
            done,
            total: entries.len(),
            index: entries[done].index,
        });
    }
    fd.set_vcpu_events(&state.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// Captures the VM-wide state.
pub fn save_vm(vm: &VmFd) -> Result<VmState, StateError> {
    Ok(VmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
    })
}

/// Loads the VM-wide state.
pub fn restore_vm(vm: &VmFd, state: &VmState) -> Result<(), StateError> {
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&state.pit).map_err(kvm("KVM_SET_PIT2"))?;
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    Ok(())
}

/// kvmclock MSRs (new and legacy numbering) and the size of the
/// `pvclock_vcpu_time_info` they point KVM at.
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
const MSR_KVM_STEAL_TIME: u32 = 0x4b56_4d03;
const PVCLOCK_LEN: u64 = 32;
const STEAL_TIME_LEN: u64 = 64;

/// The guest memory KVM itself writes with the time for MSR `index` set to
/// `value` (an enabled kvmclock or steal-time area): (address, length).
pub fn kvm_time_area(index: u32, value: u64) -> Option<(u64, u64)> {
    // Bit 0 enables; steal time keeps flags in the low 6 bits (its area is
    // 64-byte aligned).
    let (len, flags) = match index {
        MSR_KVM_SYSTEM_TIME_NEW | MSR_KVM_SYSTEM_TIME => (PVCLOCK_LEN, 1),
        MSR_KVM_STEAL_TIME => (STEAL_TIME_LEN, 0x3f),
        _ => return None,
    };
    (value & 1 == 1).then_some((value & !flags, len))
}

impl VcpuState {
    /// The state with what runs on its own while the VM is paused (the TSC,
    /// the LAPIC timer's current count) and what KVM derives lazily (the
    /// LAPIC's PPR) zeroed: what a state hash covers.
    pub fn timeless(&self) -> Self {
        let mut s = self.clone();
        for (index, value) in &mut s.msrs {
            if *index == MSR_IA32_TSC {
                *value = 0;
            }
        }
        for at in [LAPIC_TIMER_CURRENT_COUNT, LAPIC_PPR] {
            s.lapic.regs[at..at + 4].fill(0);
        }
        s
    }

    /// What differs between the hashed views ([`VcpuState::timeless`]) of
    /// two states: field names (with both values for the small ones), LAPIC
    /// registers by offset and both values, MSRs by index.
    /// A diagnosis for a state hash that differs after a load.
    pub fn differences(&self, other: &VcpuState) -> Vec<String> {
        fn same<T: Serialize>(a: &T, b: &T) -> bool {
            postcard::to_allocvec(a).ok() == postcard::to_allocvec(b).ok()
        }
        /// The field's name, and both values where they are short enough
        /// to log.
        fn named<T: Serialize + std::fmt::Debug>(name: &str, a: &T, b: &T) -> Option<String> {
            (!same(a, b)).then(|| format!("{name} ({a:?} vs {b:?})"))
        }
        let (a, b) = (self.timeless(), other.timeless());
        let mut out = Vec::new();
        let plain: [(&str, bool); 4] = [
            ("cpuid", same(&a.cpuid, &b.cpuid)),
            ("tsc_khz", a.tsc_khz == b.tsc_khz),
            ("xsave", a.xsave == b.xsave),
            ("msrs", a.msrs.len() == b.msrs.len()),
        ];
        out.extend(
            plain
                .iter()
                .filter(|(_, eq)| !eq)
                .map(|(f, _)| f.to_string()),
        );
        out.extend(
            [
                named("mp_state", &a.mp_state, &b.mp_state),
                named("events", &a.events, &b.events),
                named("regs", &a.regs, &b.regs),
                named("sregs", &a.sregs, &b.sregs),
                named("xcrs", &a.xcrs, &b.xcrs),
                named("debugregs", &a.debugregs, &b.debugregs),
            ]
            .into_iter()
            .flatten(),
        );
        for (reg, (x, y)) in a
            .lapic
            .regs
            .chunks(16)
            .zip(b.lapic.regs.chunks(16))
            .enumerate()
        {
            if x != y {
                let word = |r: &[std::os::raw::c_char]| {
                    u32::from_le_bytes([r[0] as u8, r[1] as u8, r[2] as u8, r[3] as u8])
                };
                out.push(format!(
                    "lapic {:#05x} ({:#010x} vs {:#010x})",
                    reg * 16,
                    word(x),
                    word(y)
                ));
            }
        }
        for ((i, x), (_, y)) in a.msrs.iter().zip(&b.msrs) {
            if x != y {
                out.push(format!("msr {i:#x}: {x:#x} vs {y:#x}"));
            }
        }
        out
    }
}

impl VmState {
    /// The state without the clock and the PIT's load times, which run on
    /// their own while the VM is paused.
    pub fn timeless(&self) -> Self {
        let mut s = self.clone();
        s.clock = kvm_clock_data::default();
        for ch in &mut s.pit.channels {
            ch.count_load_time = 0;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM with an in-kernel irqchip and one vCPU (the VM must outlive it).
    fn one_vcpu() -> (VmFd, VcpuFd, VcpuContext) {
        let kvm_fd = Kvm::new().unwrap();
        let vm = kvm_fd.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let fd = vm.create_vcpu(0).unwrap();
        let ctx = VcpuContext::new(&kvm_fd).unwrap();
        (vm, fd, ctx)
    }

    #[test]
    fn differences_name_the_fields() {
        let (_vm, fd, ctx) = one_vcpu();
        let a = save_vcpu(&fd, &ctx).unwrap();
        assert_eq!(a.differences(&a.clone()), Vec::<String>::new());
        let mut b = a.clone();
        b.regs.rip ^= 1;
        b.lapic.regs[0x200] ^= 1; // IRR
        if let Some(m) = b.msrs.iter_mut().find(|m| m.0 != MSR_IA32_TSC) {
            m.1 ^= 1;
        }
        let d = a.differences(&b);
        assert!(d.iter().any(|f| f.starts_with("regs (")), "{d:?}");
        assert!(d.iter().any(|f| f.starts_with("lapic 0x200 (0x")), "{d:?}");
        assert!(
            d.iter().any(|f| f.starts_with("msr ")) || a.msrs.is_empty(),
            "{d:?}"
        );
        // What the hash leaves out is no difference.
        let mut c = a.clone();
        c.lapic.regs[LAPIC_PPR] ^= 1;
        assert_eq!(a.differences(&c), Vec::<String>::new());
    }

    /// A guest's exception that KVM queued but had not delivered when the
    /// vCPU stopped (a ring-3 `ud2` caught at a pause) is reported as both
    /// pending and injected; a load keeps it as injected only. Saved as
    /// reported, a verified checkpoint's hash differed in `events` after
    /// the load (seen under load); saved in canonical form, it does not.
    #[test]
    fn a_queued_exception_is_saved_as_a_load_reads_it_back() {
        let (_vm, fd, ctx) = one_vcpu();
        let mut reported = save_vcpu(&fd, &ctx).unwrap();
        reported.events.exception.injected = 1;
        reported.events.exception.pending = 1;
        reported.events.exception.nr = 6; // #UD
        restore_vcpu(&fd, &reported, &ctx).unwrap();
        let back = save_vcpu(&fd, &ctx).unwrap();
        let d = reported.differences(&back);
        assert!(d.iter().any(|f| f.starts_with("events (")), "{d:?}");
        let canonical = VcpuState {
            events: canonical_events(reported.events),
            ..reported.clone()
        };
        assert_eq!(canonical.differences(&back), Vec::<String>::new());
        assert_eq!(
            (
                back.events.exception.injected,
                back.events.exception.pending
            ),
            (1, 0)
        );
        assert_eq!(canonical_events(canonical.events), canonical.events);
    }

    /// On a KVM with Hyper-V emulation (Debian's, the nested tier) the raw
    /// list holds Hyper-V MSRs that tick while the VM is paused.
    #[test]
    fn no_hyperv_msr_is_saved() {
        let kvm_fd = Kvm::new().unwrap();
        let list = msr_index_list(&kvm_fd).unwrap();
        assert!(list.contains(&MSR_IA32_TSC));
        assert!(!list.iter().any(|index| HYPERV_MSRS.contains(index)));
    }
}
