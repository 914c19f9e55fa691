//! The register state a vCPU starts in: long mode on the boot GDT and
//! identity map, the boot MSRs, a clean FPU, and the local APIC wired for
//! virtual-wire mode.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;

use crate::arch::gdt::{self, CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use crate::arch::layout::{
    BOOT_STACK_POINTER, GDT_START, PML4_START, TSS_LIMIT, TSS_START, ZERO_PAGE_START,
};

/// Errors setting up vCPU registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("KVM_SET_MSRS set {set} of {wanted} boot MSRs (first refused: {refused:#x})")]
    PartialMsrs {
        set: usize,
        wanted: usize,
        refused: u32,
    },
    #[error("cannot build the MSR list")]
    MsrList(#[source] vmm_sys_util::fam::Error),
    #[error("KVM refused {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// IA32_MISC_ENABLE: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// The MSRs every vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
}

/// Writes the boot MSRs.
pub fn set_boot_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(RegsError::MsrList)?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("boot MSRs"))?;
    if set != entries.len() {
        return Err(RegsError::PartialMsrs {
            set,
            wanted: entries.len(),
            refused: entries[set].index,
        });
    }
    Ok(())
}

/// x87 control word after FNINIT, MXCSR after reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Long mode with paging on the boot GDT and identity map, starting from
/// the special registers KVM reports (which carry fields we leave alone).
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let table = gdt::boot_gdt(TSS_START as u32, TSS_LIMIT);
    let code = gdt::segment_from_descriptor(CODE_SELECTOR, table[usize::from(CODE_SELECTOR) / 8]);
    let data = gdt::segment_from_descriptor(DATA_SELECTOR, table[usize::from(DATA_SELECTOR) / 8]);
    let tss = gdt::segment_from_descriptor(TSS_SELECTOR, table[usize::from(TSS_SELECTOR) / 8]);

    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    // No IDT: an exception before the kernel installs its own is a triple
    // fault, which the VMM reports.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers at the kernel entry: the 64-bit boot protocol passes
/// the zero page in RSI.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        rflags: 0x2,
        ..Default::default()
    }
}

/// Sets up the boot vCPU's registers for the kernel at `entry`.
pub fn set_boot_regs(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&boot_sregs(sregs))
        .map_err(kvm("boot special registers"))?;
    vcpu.set_regs(&boot_regs(entry))
        .map_err(kvm("boot registers"))?;
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = b as _;
    }
}

/// Routes LINT0 as ExtINT (the 8259's output) and LINT1 as NMI, the
/// virtual-wire setup a PC's firmware leaves behind.
pub fn virtual_wire_lapic(mut lapic: kvm_lapic_state) -> kvm_lapic_state {
    let with_mode = |reg: u32, mode: u32| (reg & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(&lapic, APIC_LVT0);
    let lvt1 = lapic_reg(&lapic, APIC_LVT1);
    set_lapic_reg(&mut lapic, APIC_LVT0, with_mode(lvt0, APIC_MODE_EXTINT));
    set_lapic_reg(&mut lapic, APIC_LVT1, with_mode(lvt1, APIC_MODE_NMI));
    lapic
}

/// Applies [`virtual_wire_lapic`] to a vCPU.
pub fn set_virtual_wire(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    vcpu.set_lapic(&virtual_wire_lapic(lapic))
        .map_err(kvm("LAPIC setup"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sregs_enter_long_mode_on_the_boot_gdt() {
        let s = boot_sregs(kvm_sregs::default());
        assert_eq!((s.cs.selector, s.cs.l, s.cs.db), (0x10, 1, 0));
        assert_eq!((s.ds.selector, s.ss.selector), (0x18, 0x18));
        assert_eq!((s.tr.base, s.tr.type_), (TSS_START, 0xb));
        assert_eq!((s.gdt.base, s.gdt.limit), (GDT_START, 47));
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
    }

    #[test]
    fn regs_follow_the_64bit_boot_protocol() {
        let r = boot_regs(0x100_0000);
        assert_eq!(
            (r.rip, r.rsi, r.rsp, r.rflags),
            (0x100_0000, ZERO_PAGE_START, BOOT_STACK_POINTER, 2)
        );
    }

    #[test]
    fn lapic_lint_modes() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, APIC_LVT0, 0x0001_0000); // masked, fixed
        let lapic = virtual_wire_lapic(lapic);
        assert_eq!(lapic_reg(&lapic, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&lapic, APIC_LVT1), 0x0000_0400);
    }

    #[test]
    fn boot_msrs_are_unique() {
        let msrs = boot_msrs();
        let mut indexes: Vec<_> = msrs.iter().map(|m| m.index).collect();
        indexes.sort();
        indexes.dedup();
        assert_eq!(indexes.len(), msrs.len());
    }
}
