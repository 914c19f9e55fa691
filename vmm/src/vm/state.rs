//! Exact vCPU and VM state through KVM: what a snapshot or a checkpoint
//! carries besides memory and devices.
//!
//! Save order follows what KVM needs to read a consistent vCPU (events and
//! MP state first, then registers); restore order what it needs to accept
//! one: MP state, registers, FPU/XSAVE, LAPIC, then MSRs with
//! `IA32_TSC_DEADLINE` after `IA32_TSC` (a deadline is meaningless before
//! the TSC is set), and pending events last.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// LAPIC register offsets whose contents run with time, not guest actions.
const LAPIC_TIMER_CURRENT_COUNT: usize = 0x390;

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
    #[error("an XSAVE area of {0} words; KVM's is 1024")]
    XsaveSize(usize),
    #[error("the state was saved on a host with XSAVE (it carries XCRs); this host has no XSAVE")]
    NoXsaveHost,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// Everything KVM holds for one vCPU.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The legacy 4 KiB `kvm_xsave` region (kvm_xsave itself is not Clone).
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

/// Captures a paused vCPU.
pub fn save_vcpu(fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, StateError> {
    Ok(VcpuState {
        mp_state: fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
        events: fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
        xsave: fd
            .get_xsave()
            .map_err(kvm("KVM_GET_XSAVE"))?
            .region
            .to_vec(),
        xcrs: host_xcrs(fd)?,
        debugregs: fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
        lapic: fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
        msrs: read_msrs(fd, msr_indices)?,
    })
}

/// Loads `state` into a vCPU that has not run since it was created (or is
/// paused).
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<(), StateError> {
    fd.set_mp_state(state.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    fd.set_sregs(&state.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    fd.set_regs(&state.regs).map_err(kvm("KVM_SET_REGS"))?;
    let mut xsave = kvm_xsave::default();
    if state.xsave.len() != xsave.region.len() {
        return Err(StateError::XsaveSize(state.xsave.len()));
    }
    xsave.region.copy_from_slice(&state.xsave);
    // SAFETY: a whole legacy kvm_xsave, as save_vcpu read it; KVM reads
    // only its 4 KiB region (no extended part is used).
    unsafe { fd.set_xsave(&xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
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
    /// the LAPIC timer's current count) zeroed: what a state hash covers.
    pub fn timeless(&self) -> Self {
        let mut s = self.clone();
        for (index, value) in &mut s.msrs {
            if *index == MSR_IA32_TSC {
                *value = 0;
            }
        }
        for b in &mut s.lapic.regs[LAPIC_TIMER_CURRENT_COUNT..LAPIC_TIMER_CURRENT_COUNT + 4] {
            *b = 0;
        }
        s
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
