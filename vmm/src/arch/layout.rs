//! Where things live in guest-physical memory at boot.
//!
//! ```text
//! 0x0000_0500  GDT                    0x0000_9000  PML4
//! 0x0000_0600  TSS (zeroed)           0x0000_a000  PDPT
//! 0x0000_7000  boot_params (zero page) 0x0000_b000  4 page directories (4 GiB)
//! 0x0000_8ff0  initial stack pointer  0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (last KiB of base memory, reserved in e820)
//! 0x000e_0000  ACPI tables, RSDP first (BIOS area, outside e820's RAM)
//! 0x0010_0000  RAM for the kernel, initrd at the top of low RAM
//! 0xc000_0000  MMIO hole up to 4 GiB: devices, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above the hole when the guest has more than 3 GiB
//! ```

/// Global descriptor table.
pub const GDT_START: u64 = 0x500;
/// A zeroed 64-bit TSS, so the task register points at something valid.
pub const TSS_START: u64 = 0x600;
/// Size of the TSS minus one.
pub const TSS_LIMIT: u32 = 0x67;
/// The Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level page table of the boot identity map.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity map.
pub const PDPT_START: u64 = 0xa000;
/// First of the page directories (one per GiB) of the boot identity map.
pub const PD_START: u64 = 0xb000;
/// GiB of address space the boot identity map covers (RAM and the MMIO hole).
pub const IDENTITY_MAP_GIB: u64 = 4;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line, terminating NUL included (Linux x86's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the MP table: the last KiB of the 640 KiB of base memory.
pub const MPTABLE_START: u64 = 0x9fc00;
/// Start of the ACPI tables: the RSDP, where Linux scans the BIOS area.
pub const ACPI_START: u64 = 0xe_0000;
/// End of base memory (640 KiB).
pub const BASE_MEMORY_END: u64 = 0xa0000;
/// Where high memory, and the kernel, starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// First virtio-mmio window; device `i` is at `VIRTIO_MMIO_BASE + i * 4 KiB`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// IRQ line (= IOAPIC pin) of the first virtio device; device `i` uses
/// `VIRTIO_IRQ_BASE + i`.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Start of the MMIO hole below 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the MMIO hole (4 GiB).
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// The IOAPIC's registers.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APIC's registers.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Address KVM uses for the (VMX-only) real-mode TSS: three pages just
/// below the identity-map page at the top of the MMIO hole.
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// Guest RAM ranges for `mem_size` bytes: one below the MMIO hole, and one
/// above 4 GiB for what does not fit below it.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, mem_size - MMIO_HOLE_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_ranges_split_around_the_mmio_hole() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_ranges(MMIO_HOLE_START), vec![(0, MMIO_HOLE_START)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MMIO_HOLE_START), (MMIO_HOLE_END, 1 << 30)]
        );
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut areas = [
            (GDT_START, 6 * 8),
            (TSS_START, u64::from(TSS_LIMIT) + 1),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPT_START, 0x1000),
            (PD_START, IDENTITY_MAP_GIB * 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (MPTABLE_START, BASE_MEMORY_END - MPTABLE_START),
            (ACPI_START, HIMEM_START - ACPI_START),
        ];
        areas.sort();
        for pair in areas.windows(2) {
            assert!(
                pair[0].0 + pair[0].1 <= pair[1].0,
                "{:x?} overlaps {:x?}",
                pair[0],
                pair[1]
            );
        }
        assert!(areas.last().map(|a| a.0 + a.1).unwrap() <= HIMEM_START);
        // The stack grows down from below the page tables, above the zero page.
        const {
            assert!(
                BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000
            )
        };
    }
}
