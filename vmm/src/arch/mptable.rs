//! The Intel MultiProcessor (MP 1.4) table that tells the guest its CPUs,
//! its IOAPIC and how the ISA IRQs are wired.
//!
//! Layout at `base`: the 16-byte floating pointer structure, then the
//! configuration table: header, one processor entry per vCPU, the ISA bus,
//! the IOAPIC, an interrupt entry per ISA IRQ to the IOAPIC pin of the same
//! number (IRQ 0, the PIT, included: see [`isa_irq_pin`]), and the two
//! local interrupt entries (ExtINT on LINT0, NMI on LINT1).

use super::checksum;
use super::layout::{IOAPIC_ADDR, LAPIC_ADDR};

const FLOATING_SIGNATURE: &[u8; 4] = b"_MP_";
const TABLE_SIGNATURE: &[u8; 4] = b"PCMP";
const SPEC_REVISION: u8 = 4;
const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_ENTRY_LEN: usize = 20;
const SHORT_ENTRY_LEN: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
const IOAPIC_ENABLED: u8 = 1;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ISA_IRQS: u8 = 16;
/// The IRQ that cascades the slave PIC into the master.
const PIC_CASCADE_IRQ: u8 = 2;

/// IOAPIC pin of ISA IRQ `irq`: the pin of the same number, as KVM's
/// default GSI routing (which `vmm` keeps) wires them. The in-kernel PIT
/// raises GSI 0, so IRQ 0 is on pin 0, not on pin 2 where QEMU (which
/// installs its own routing) and PC firmware put it.
pub fn isa_irq_pin(irq: u8) -> u8 {
    irq
}

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// CPU signature of the processor entries: family 6 (as our CPUID reports
/// family/model elsewhere, this is informational only).
const CPU_SIGNATURE: u32 = 0x600;
/// Feature flags of the processor entries: FPU and APIC present.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// Errors building the MP table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    #[error("the MP table for {0} vCPUs does not fit in {1} bytes")]
    TooLarge(u8, usize),
    #[error("an MP table needs at least one vCPU")]
    NoCpus,
}

/// Bytes of the table for `vcpus` vCPUs.
pub fn size(vcpus: u8) -> usize {
    FLOATING_LEN
        + HEADER_LEN
        + PROCESSOR_ENTRY_LEN * usize::from(vcpus)
        + SHORT_ENTRY_LEN * (2 + usize::from(ISA_IRQS) - 1 + 2)
}

/// Builds the table for `vcpus` vCPUs, to be written at guest address `base`
/// into an area of `room` bytes. APIC IDs are the vCPU indexes; the IOAPIC
/// takes the next ID.
pub fn build(base: u32, vcpus: u8, room: usize) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 {
        return Err(MpTableError::NoCpus);
    }
    if size(vcpus) > room {
        return Err(MpTableError::TooLarge(vcpus, room));
    }
    let ioapic_id = vcpus;
    let table_addr = base + FLOATING_LEN as u32;

    let mut entries = Vec::new();
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    for irq in (0..ISA_IRQS).filter(|&irq| irq != PIC_CASCADE_IRQ) {
        // type, irq type, flags (bus default polarity/trigger), source bus,
        // source IRQ, destination IOAPIC, destination pin.
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            isa_irq_pin(irq),
        ]);
    }
    // LINT0 of every local APIC (0xff) is ExtINT, LINT1 is NMI.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = u16::from(vcpus) + 2 + u16::from(ISA_IRQS) - 1 + 2;

    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(TABLE_SIGNATURE);
    header.extend_from_slice(&((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    header.push(SPEC_REVISION);
    header.push(0); // checksum, below
    header.extend_from_slice(b"COLO-VMM");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&entry_count.to_le_bytes());
    header.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    header.extend_from_slice(&[0; 4]); // no extended entries
    debug_assert_eq!(header.len(), HEADER_LEN);
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(FLOATING_SIGNATURE);
    floating.extend_from_slice(&table_addr.to_le_bytes());
    floating.extend_from_slice(&[1, SPEC_REVISION, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    Ok(floating)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    /// Parses a table the way a guest does and returns (APIC IDs, BSP flags,
    /// IOAPIC ID, IOAPIC address, number of IO interrupt entries).
    fn parse(base: u32, bytes: &[u8]) -> (Vec<u8>, Vec<bool>, u8, u32, usize) {
        assert_eq!(&bytes[..4], b"_MP_");
        assert_eq!(sum(&bytes[..16]), 0, "floating pointer checksum");
        let table_addr = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
        let table = &bytes[(table_addr - base) as usize..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
        assert_eq!(sum(&table[..len]), 0, "table checksum");
        let count = u16::from_le_bytes(table[34..36].try_into().unwrap());
        assert_eq!(
            u32::from_le_bytes(table[36..40].try_into().unwrap()),
            LAPIC_ADDR
        );
        let (mut ids, mut bsp, mut ioapic, mut irqs) = (vec![], vec![], (0, 0), 0);
        let mut at = HEADER_LEN;
        for _ in 0..count {
            match table[at] {
                ENTRY_PROCESSOR => {
                    ids.push(table[at + 1]);
                    bsp.push(table[at + 3] & CPU_BOOTSTRAP != 0);
                    at += PROCESSOR_ENTRY_LEN;
                }
                ENTRY_IOAPIC => {
                    ioapic = (
                        table[at + 1],
                        u32::from_le_bytes(table[at + 4..at + 8].try_into().unwrap()),
                    );
                    at += SHORT_ENTRY_LEN;
                }
                ENTRY_IO_INTERRUPT => {
                    assert_eq!(isa_irq_pin(table[at + 5]), table[at + 7]);
                    assert_ne!(table[at + 5], 2, "no entry for the cascade");
                    irqs += 1;
                    at += SHORT_ENTRY_LEN;
                }
                ENTRY_BUS | ENTRY_LOCAL_INTERRUPT => at += SHORT_ENTRY_LEN,
                other => panic!("unknown entry type {other}"),
            }
        }
        assert_eq!(at, len);
        (ids, bsp, ioapic.0, ioapic.1, irqs)
    }

    #[test]
    fn one_and_many_cpus() {
        for vcpus in [1u8, 2, 8] {
            let bytes = build(0x9fc00, vcpus, 1024).unwrap();
            assert_eq!(bytes.len(), size(vcpus));
            let (ids, bsp, ioapic_id, ioapic_addr, irqs) = parse(0x9fc00, &bytes);
            assert_eq!(ids, (0..vcpus).collect::<Vec<_>>());
            assert_eq!(bsp.iter().filter(|b| **b).count(), 1);
            assert!(bsp[0]);
            assert_eq!((ioapic_id, ioapic_addr, irqs), (vcpus, IOAPIC_ADDR, 15));
        }
    }

    /// KVM delivers the in-kernel PIT's interrupt on GSI 0 and, with no GSI
    /// routing installed (we install none), routes GSI `n` < 16 to IOAPIC
    /// pin `n`. The table must name the pin where a raised IRQ 0 lands, or
    /// a guest that trusts it (Linux skips its timer check under KVM) never
    /// sees a timer tick.
    #[test]
    fn isa_irqs_are_on_the_pins_kvm_routes_them_to() {
        use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_IOAPIC};
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        for irq in [0u8, 1, 4, 5, 8] {
            vm.set_irq_line(u32::from(irq), true).unwrap();
            let mut chip = kvm_irqchip {
                chip_id: KVM_IRQCHIP_IOAPIC,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip).unwrap();
            // SAFETY: chip_id IOAPIC selects the ioapic member of the union.
            let irr = unsafe { chip.chip.ioapic }.irr;
            vm.set_irq_line(u32::from(irq), false).unwrap();
            assert_eq!(irr, 1 << isa_irq_pin(irq), "ISA IRQ {irq}");
        }
    }

    #[test]
    fn refuses_what_does_not_fit() {
        assert_eq!(build(0, 0, 1024), Err(MpTableError::NoCpus));
        assert_eq!(build(0, 64, 1024), Err(MpTableError::TooLarge(64, 1024)));
        assert!(build(0, 32, 1024).is_ok());
    }
}
