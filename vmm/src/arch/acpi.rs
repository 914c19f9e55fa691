//! ACPI tables for distribution kernels, which find CPUs and interrupt
//! wiring through ACPI and ignore the MP table (Debian's cloud kernel has
//! no `CONFIG_X86_MPPARSE`).
//!
//! A hardware-reduced machine (ACPI 6.0): the RSDP at the start of the
//! BIOS area (where Linux scans for it), then an XSDT listing the FADT and
//! the MADT, and a DSDT the FADT points at that describes COM1. The MADT
//! says what the
//! MP table says ([`super::mptable`]): one local APIC per vCPU with the
//! vCPU index as APIC ID, the IOAPIC with the next ID, ISA IRQ `n` on GSI
//! `n` (IRQ 0, the PIT, included), and NMI on LINT1.
//!
//! ```text
//! base + 0x00  RSDP (36 bytes)      base + 0x40  XSDT
//! then, 16-byte aligned: FADT, MADT, DSDT
//! ```

use devices::legacy::{COM1_IRQ, COM1_PORT, COM_PORT_LEN};

use super::checksum;
use super::layout::{IOAPIC_ADDR, LAPIC_ADDR};
use super::mptable::isa_irq_pin;

const OEM_ID: &[u8; 6] = b"COLOVM";
const OEM_TABLE_ID: &[u8; 8] = b"MICROVM ";
const OEM_REVISION: u32 = 1;
const CREATOR_ID: &[u8; 4] = b"COLO";
const CREATOR_REVISION: u32 = 1;
const HEADER_LEN: usize = 36;
const RSDP_LEN: usize = 36;
/// Where the XSDT starts, from `base`.
const XSDT_OFFSET: usize = 0x40;

/// FADT: ACPI 6.0 layout, 276 bytes.
const FADT_LEN: usize = 276;
const FADT_REVISION: u8 = 6;
const FADT_MINOR_REVISION: u8 = 0;
const FADT_IAPC_BOOT_ARCH: usize = 109;
const FADT_FLAGS: usize = 112;
const FADT_RESET_REG: usize = 116;
const FADT_RESET_VALUE: usize = 128;
const FADT_MINOR_VERSION: usize = 131;
const FADT_X_DSDT: usize = 140;
const FADT_HYPERVISOR_VENDOR: usize = 268;
/// IAPC_BOOT_ARCH: an 8042 is there (our i8042, which resets the machine);
/// no VGA, no MSI, no PCIe ASPM, no CMOS RTC.
const BOOT_ARCH_8042: u16 = 1 << 1;
const BOOT_ARCH_NO_VGA: u16 = 1 << 2;
const BOOT_ARCH_NO_MSI: u16 = 1 << 3;
const BOOT_ARCH_NO_ASPM: u16 = 1 << 4;
const BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;
/// FADT flags: the reset register is valid; hardware-reduced ACPI (no PM
/// timer, no SCI, no fixed hardware).
const FADT_RESET_REG_SUP: u32 = 1 << 10;
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
/// The reset register: write 0xfe to the i8042's command port (I/O 0x64),
/// what `vmm` takes as a machine reset.
const GAS_SYSTEM_IO: u8 = 1;
const GAS_ACCESS_BYTE: u8 = 1;
const I8042_COMMAND_PORT: u64 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// MADT entry types and flags.
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IOAPIC: u8 = 1;
const MADT_INTERRUPT_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// MADT revision of ACPI 6.0.
const MADT_REVISION: u8 = 4;
const MADT_PCAT_COMPAT: u32 = 1;
const LOCAL_APIC_ENABLED: u32 = 1;
/// MPS INTI flags: conforming polarity and trigger (the bus default).
const MPS_INTI_CONFORMING: u16 = 0;
/// MPS INTI flags: active high, edge triggered (what the ISA default is).
const MPS_INTI_HIGH_EDGE: u16 = 0b01 | (0b01 << 2);
/// LINT1 of every processor (UID 0xff) takes NMI.
const ALL_PROCESSORS: u8 = 0xff;
const LINT1: u8 = 1;
/// The ISA IRQ the PIT raises.
const PIT_IRQ: u8 = 0;

/// Errors building the ACPI tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    #[error("the ACPI tables for {0} vCPUs do not fit in {1} bytes")]
    TooLarge(u8, usize),
    #[error("ACPI tables need at least one vCPU")]
    NoCpus,
}

/// A system description table: the 36-byte header around `body`, with its
/// length and checksum filled in.
fn table(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(HEADER_LEN + body.len());
    t.extend_from_slice(signature);
    t.extend_from_slice(&((HEADER_LEN + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&OEM_REVISION.to_le_bytes());
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&CREATOR_REVISION.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// The root pointer, ACPI 2.0 form (revision 2), naming only the XSDT.
fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(RSDP_LEN);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes, below
    r.extend_from_slice(OEM_ID);
    r.push(2);
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    r.extend_from_slice(&xsdt_addr.to_le_bytes());
    r.extend_from_slice(&[0; 4]); // extended checksum, reserved
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// A hardware-reduced FADT pointing at the DSDT.
fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut body = vec![0u8; FADT_LEN - HEADER_LEN];
    let at = |offset: usize| offset - HEADER_LEN;
    let boot_arch = BOOT_ARCH_8042
        | BOOT_ARCH_NO_VGA
        | BOOT_ARCH_NO_MSI
        | BOOT_ARCH_NO_ASPM
        | BOOT_ARCH_NO_CMOS_RTC;
    body[at(FADT_IAPC_BOOT_ARCH)..][..2].copy_from_slice(&boot_arch.to_le_bytes());
    body[at(FADT_FLAGS)..][..4]
        .copy_from_slice(&(FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP).to_le_bytes());
    // Generic address structure: space, bit width, bit offset, access size,
    // address.
    let reset_reg = at(FADT_RESET_REG);
    body[reset_reg..][..4].copy_from_slice(&[GAS_SYSTEM_IO, 8, 0, GAS_ACCESS_BYTE]);
    body[reset_reg + 4..][..8].copy_from_slice(&I8042_COMMAND_PORT.to_le_bytes());
    body[at(FADT_RESET_VALUE)] = I8042_RESET;
    body[at(FADT_MINOR_VERSION)] = FADT_MINOR_REVISION;
    body[at(FADT_X_DSDT)..][..8].copy_from_slice(&dsdt_addr.to_le_bytes());
    body[at(FADT_HYPERVISOR_VENDOR)..][..8].copy_from_slice(b"COLO-VMM");
    table(b"FACP", FADT_REVISION, &body)
}

/// The MADT: LAPICs, the IOAPIC, ISA interrupt overrides, LINT1 NMI.
fn madt(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus;
    let mut body = Vec::new();
    body.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for cpu in 0..vcpus {
        // type, length, processor UID, APIC ID, flags
        body.extend_from_slice(&[MADT_LOCAL_APIC, 8, cpu, cpu]);
        body.extend_from_slice(&LOCAL_APIC_ENABLED.to_le_bytes());
    }
    // type, length, IOAPIC ID, reserved, address, first GSI
    body.extend_from_slice(&[MADT_IOAPIC, 12, ioapic_id, 0]);
    body.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    // The PIT's IRQ 0 stated explicitly: guests built for PC firmware
    // expect it on GSI 2 unless told otherwise. Explicit flags, not
    // "conforming": a hardware-reduced FADT's SCI_INT is 0, and Linux
    // takes an override of IRQ 0 for the SCI's, which it would otherwise
    // make level-triggered and active low.
    // type, length, bus (ISA), source IRQ, GSI, MPS INTI flags
    body.extend_from_slice(&[MADT_INTERRUPT_OVERRIDE, 10, 0, PIT_IRQ]);
    body.extend_from_slice(&u32::from(isa_irq_pin(PIT_IRQ)).to_le_bytes());
    body.extend_from_slice(&MPS_INTI_HIGH_EDGE.to_le_bytes());
    // type, length, processor UID, MPS INTI flags, LINT#
    body.extend_from_slice(&[MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS]);
    body.extend_from_slice(&MPS_INTI_CONFORMING.to_le_bytes());
    body.push(LINT1);
    table(b"APIC", MADT_REVISION, &body)
}

/// AML opcodes and resource descriptors the DSDT uses.
const AML_SCOPE: u8 = 0x10;
const AML_EXT_PREFIX: u8 = 0x5b;
const AML_DEVICE: u8 = 0x82;
const AML_NAME: u8 = 0x08;
const AML_BUFFER: u8 = 0x11;
const AML_BYTE: u8 = 0x0a;
const AML_DWORD: u8 = 0x0c;
const AML_ONE: u8 = 0x01;
const AML_ROOT: u8 = b'\\';
/// Small resource descriptors: I/O ports (16-bit decode), IRQ without
/// flags (edge, active high), end tag.
const RES_IO: u8 = 0x47;
const RES_IO_DECODE16: u8 = 1;
const RES_IRQ_NO_FLAGS: u8 = 0x22;
const RES_END: u8 = 0x79;
/// EISA ID "PNP0501", a 16550A-compatible UART, compressed as AML wants.
const EISA_PNP0501: [u8; 4] = [0x41, 0xd0, 0x05, 0x01];

/// An AML package: its opcode(s), PkgLength (which counts itself), `body`.
fn aml_package(op: &[u8], body: &[u8]) -> Vec<u8> {
    let len = body.len() + 1;
    let pkg_len = if len < 0x40 {
        vec![len as u8]
    } else {
        // Two bytes hold up to 4095: the low nibble in the lead byte.
        let len = len + 1;
        debug_assert!(len < 0x1000, "AML package too long");
        vec![0x40 | (len & 0xf) as u8, (len >> 4) as u8]
    };
    [op, &pkg_len, body].concat()
}

/// `Name(name, value)`.
fn aml_name(name: &[u8; 4], value: &[u8]) -> Vec<u8> {
    [&[AML_NAME][..], name, value].concat()
}

/// The DSDT's AML: COM1 as a PNP0501 device with its ports and IRQ. In a
/// hardware-reduced machine Linux has no legacy PIC and numbers IRQs
/// dynamically, so the ISA serial port's fixed IRQ 4 reaches no handler
/// (userspace output on ttyS0 stalls) unless ACPI names the device and
/// its interrupt.
fn dsdt_aml() -> Vec<u8> {
    let port = (COM1_PORT as u16).to_le_bytes();
    let irq_mask = (1u16 << COM1_IRQ).to_le_bytes();
    let resources = [
        &[
            RES_IO,
            RES_IO_DECODE16,
            port[0],
            port[1],
            port[0],
            port[1],
            1,
        ][..],
        &[COM_PORT_LEN as u8],
        &[RES_IRQ_NO_FLAGS, irq_mask[0], irq_mask[1]],
        &[RES_END, 0],
    ]
    .concat();
    let buffer = aml_package(
        &[AML_BUFFER],
        &[&[AML_BYTE, resources.len() as u8][..], &resources].concat(),
    );
    let device = [
        &b"COM1"[..],
        &aml_name(b"_HID", &[&[AML_DWORD][..], &EISA_PNP0501].concat()),
        &aml_name(b"_UID", &[AML_ONE]),
        &aml_name(b"_CRS", &buffer),
    ]
    .concat();
    let device = aml_package(&[AML_EXT_PREFIX, AML_DEVICE], &device);
    aml_package(&[AML_SCOPE], &[&[AML_ROOT][..], b"_SB_", &device].concat())
}

/// Rounds `n` up to a multiple of 16.
fn align16(n: usize) -> usize {
    (n + 15) & !15
}

/// Bytes the tables take for `vcpus` vCPUs.
pub fn size(vcpus: u8) -> usize {
    layout(vcpus).3
}

/// Offsets from `base` of the FADT, MADT and DSDT, and the end.
fn layout(vcpus: u8) -> (usize, usize, usize, usize) {
    const XSDT_ENTRIES: usize = 2;
    let fadt = align16(XSDT_OFFSET + HEADER_LEN + 8 * XSDT_ENTRIES);
    let madt = align16(fadt + FADT_LEN);
    let madt_len = HEADER_LEN + 8 + 8 * usize::from(vcpus) + 12 + 10 + 6;
    let dsdt = align16(madt + madt_len);
    (fadt, madt, dsdt, dsdt + HEADER_LEN + dsdt_aml().len())
}

/// Builds the tables for `vcpus` vCPUs, to be written at guest address
/// `base` (16-byte aligned, where the guest looks for the RSDP) into an
/// area of `room` bytes.
pub fn build(base: u64, vcpus: u8, room: usize) -> Result<Vec<u8>, AcpiError> {
    if vcpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    let (fadt_at, madt_at, dsdt_at, end) = layout(vcpus);
    if end > room {
        return Err(AcpiError::TooLarge(vcpus, room));
    }
    let addr = |offset: usize| base + offset as u64;
    let xsdt_body: Vec<u8> = [fadt_at, madt_at]
        .iter()
        .flat_map(|&at| addr(at).to_le_bytes())
        .collect();
    let parts = [
        (0, rsdp(addr(XSDT_OFFSET))),
        (XSDT_OFFSET, table(b"XSDT", 1, &xsdt_body)),
        (fadt_at, fadt(addr(dsdt_at))),
        (madt_at, madt(vcpus)),
        (dsdt_at, table(b"DSDT", 2, &dsdt_aml())),
    ];
    let mut bytes = vec![0u8; end];
    for (at, part) in parts {
        bytes[at..at + part.len()].copy_from_slice(&part);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0xe0000;

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }
    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    /// The table at guest address `addr`, checked the way a guest checks it.
    fn table_at<'a>(bytes: &'a [u8], addr: u64, signature: &[u8; 4]) -> &'a [u8] {
        let at = (addr - BASE) as usize;
        assert_eq!(&bytes[at..at + 4], signature);
        let len = u32_at(bytes, at + 4) as usize;
        let t = &bytes[at..at + len];
        assert_eq!(
            checksum(t),
            0,
            "{} checksum",
            String::from_utf8_lossy(signature)
        );
        t
    }

    /// Follows RSDP → XSDT → FADT/MADT → DSDT and returns the MADT and FADT.
    fn walk(bytes: &[u8]) -> (Vec<u8>, Vec<u8>) {
        assert_eq!(&bytes[..8], b"RSD PTR ");
        assert_eq!(checksum(&bytes[..20]), 0, "RSDP checksum");
        assert_eq!(checksum(&bytes[..RSDP_LEN]), 0, "RSDP extended checksum");
        assert_eq!(bytes[15], 2, "ACPI 2.0+ RSDP");
        assert_eq!(u32_at(bytes, 20) as usize, RSDP_LEN);
        let xsdt = table_at(bytes, u64_at(bytes, 24), b"XSDT");
        let entries: Vec<u64> = (HEADER_LEN..xsdt.len())
            .step_by(8)
            .map(|at| u64_at(xsdt, at))
            .collect();
        assert_eq!(entries.len(), 2);
        let fadt = table_at(bytes, entries[0], b"FACP");
        assert_eq!(fadt.len(), FADT_LEN);
        table_at(bytes, u64_at(fadt, FADT_X_DSDT), b"DSDT");
        let madt = table_at(bytes, entries[1], b"APIC");
        (madt.to_vec(), fadt.to_vec())
    }

    #[test]
    fn the_madt_has_every_vcpu_the_ioapic_and_the_pit_on_its_pin() {
        for vcpus in [1u8, 2, 8] {
            let bytes = build(BASE, vcpus, 4096).unwrap();
            assert_eq!(bytes.len(), size(vcpus));
            let (madt, _) = walk(&bytes);
            assert_eq!(u32_at(&madt, HEADER_LEN), LAPIC_ADDR);
            let (mut apic_ids, mut ioapics, mut overrides, mut nmis) = (vec![], vec![], vec![], 0);
            let mut at = HEADER_LEN + 8;
            while at < madt.len() {
                let (kind, len) = (madt[at], usize::from(madt[at + 1]));
                let e = &madt[at..at + len];
                match kind {
                    MADT_LOCAL_APIC => {
                        assert_eq!(u32_at(e, 4), LOCAL_APIC_ENABLED);
                        apic_ids.push(e[3]);
                    }
                    MADT_IOAPIC => ioapics.push((e[2], u32_at(e, 4), u32_at(e, 8))),
                    MADT_INTERRUPT_OVERRIDE => {
                        assert_eq!(u16::from_le_bytes([e[8], e[9]]), MPS_INTI_HIGH_EDGE);
                        overrides.push((e[3], u32_at(e, 4)));
                    }
                    MADT_LOCAL_APIC_NMI => {
                        assert_eq!((e[2], e[5]), (0xff, 1));
                        nmis += 1;
                    }
                    other => panic!("unexpected MADT entry {other}"),
                }
                at += len;
            }
            assert_eq!(at, madt.len());
            assert_eq!(apic_ids, (0..vcpus).collect::<Vec<_>>());
            assert_eq!(ioapics, vec![(vcpus, IOAPIC_ADDR, 0)]);
            // IRQ 0 on the pin the MP table names (KVM's routing: pin 0).
            assert_eq!(overrides, vec![(0, u32::from(isa_irq_pin(0)))]);
            assert_eq!(overrides, vec![(0, 0)]);
            assert_eq!(nmis, 1);
        }
    }

    #[test]
    fn the_fadt_is_hardware_reduced_and_resets_through_the_i8042() {
        let bytes = build(BASE, 2, 4096).unwrap();
        let (_, fadt) = walk(&bytes);
        let flags = u32_at(&fadt, FADT_FLAGS);
        assert_eq!(
            flags & (FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP),
            FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP
        );
        assert_eq!(fadt[FADT_RESET_REG], GAS_SYSTEM_IO);
        assert_eq!(u64_at(&fadt, FADT_RESET_REG + 4), 0x64);
        assert_eq!(fadt[FADT_RESET_VALUE], 0xfe);
        assert_eq!(fadt[8], FADT_REVISION);
    }

    /// The DSDT's AML, encoded by hand from the ACPI 6.0 grammar for
    /// `Scope (\_SB) { Device (COM1) { Name (_HID, EisaId ("PNP0501"))
    /// Name (_UID, One) Name (_CRS, ResourceTemplate () { IO (Decode16,
    /// 0x03F8, 0x03F8, 0x01, 0x08) IRQNoFlags () {4} }) } }`.
    #[test]
    fn the_dsdt_describes_com1_with_its_ports_and_irq() {
        let expected: &[u8] = &[
            0x10, 0x33, b'\\', b'_', b'S', b'B', b'_', // Scope (\_SB)
            0x5b, 0x82, 0x2b, b'C', b'O', b'M', b'1', // Device (COM1)
            0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x05, 0x01, 0x08, b'_', b'U', b'I',
            b'D', 0x01, // Name (_UID, One)
            0x08, b'_', b'C', b'R', b'S', 0x11, 0x10, 0x0a, 0x0d, // Buffer (13)
            0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08, // IO
            0x22, 0x10, 0x00, // IRQNoFlags {4}
            0x79, 0x00, // end tag
        ];
        assert_eq!(dsdt_aml(), expected);
        let bytes = build(BASE, 1, 4096).unwrap();
        let (_, fadt) = walk(&bytes);
        let dsdt = table_at(&bytes, u64_at(&fadt, FADT_X_DSDT), b"DSDT");
        assert_eq!(&dsdt[HEADER_LEN..], expected);
    }

    #[test]
    fn aml_package_lengths_count_themselves() {
        assert_eq!(aml_package(&[0x10], &[0; 62])[..2], [0x10, 63]);
        // 64 and more: two bytes, low nibble in the lead byte.
        assert_eq!(aml_package(&[0x10], &[0; 100])[..3], [0x10, 0x46, 0x06]);
        assert_eq!(aml_package(&[0x10], &[0; 100]).len(), 103);
    }

    #[test]
    fn tables_are_16_byte_aligned_and_refuse_what_does_not_fit() {
        let (fadt, madt, dsdt, _) = layout(3);
        assert!([fadt, madt, dsdt].iter().all(|at| at % 16 == 0));
        assert_eq!(build(BASE, 0, 4096), Err(AcpiError::NoCpus));
        assert_eq!(build(BASE, 255, 1024), Err(AcpiError::TooLarge(255, 1024)));
        assert!(build(BASE, 255, 4096).is_ok());
    }
}
