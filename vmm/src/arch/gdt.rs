//! The boot GDT and the segment registers that match it.
//!
//! The Linux boot protocol wants `__BOOT_CS` = 0x10 (64-bit code) and
//! `__BOOT_DS` = 0x18 (data). Entry 4 (selector 0x20) is a 64-bit TSS, which
//! takes two slots.

use kvm_bindings::kvm_segment;

/// Selector of the 64-bit code segment.
pub const CODE_SELECTOR: u16 = 0x10;
/// Selector of the data segment.
pub const DATA_SELECTOR: u16 = 0x18;
/// Selector of the TSS.
pub const TSS_SELECTOR: u16 = 0x20;

/// Access byte + flags of a present, ring-0, 64-bit, readable code segment
/// with 4 KiB granularity.
const CODE64_FLAGS: u16 = 0xa09b;
/// Present, ring-0, writable data segment, 32-bit default size, 4 KiB granularity.
const DATA_FLAGS: u16 = 0xc093;
/// Present, busy 64-bit TSS (system descriptor, type 0xb).
const TSS_FLAGS: u16 = 0x008b;

/// Encodes a segment descriptor. `flags` holds the access byte in bits 0-7
/// and the G/DB/L/AVL nibble in bits 12-15, as laid out in bytes 5-6 of a
/// descriptor.
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | ((flags & 0xf0ff) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56)
}

/// The boot GDT as it is written to guest memory.
pub fn boot_gdt(tss_base: u32, tss_limit: u32) -> [u64; 6] {
    [
        0,
        0,
        descriptor(CODE64_FLAGS, 0, 0xfffff),
        descriptor(DATA_FLAGS, 0, 0xfffff),
        descriptor(TSS_FLAGS, tss_base, tss_limit),
        // Upper half of the 16-byte TSS descriptor: base bits 32-63 (zero).
        0,
    ]
}

/// The `kvm_segment` a descriptor loads into a segment register.
pub fn segment_from_descriptor(selector: u16, entry: u64) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
    let raw_limit = (entry & 0xffff) | (((entry >> 48) & 0xf) << 16);
    let granular = (entry >> 55) & 1 == 1;
    let limit = if granular {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    kvm_segment {
        base,
        limit: limit as u32,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_well_known_encodings() {
        let gdt = boot_gdt(0x600, 0x67);
        assert_eq!(gdt[2], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[3], 0x00cf_9300_0000_ffff);
        assert_eq!(gdt[4], 0x0000_8b00_0600_0067);
    }

    #[test]
    fn segments_decode_from_descriptors() {
        let gdt = boot_gdt(0x600, 0x67);
        let cs = segment_from_descriptor(CODE_SELECTOR, gdt[2]);
        assert_eq!((cs.base, cs.limit, cs.type_), (0, 0xffff_ffff, 0xb));
        assert_eq!(
            (cs.l, cs.db, cs.g, cs.s, cs.present, cs.dpl),
            (1, 0, 1, 1, 1, 0)
        );
        let ds = segment_from_descriptor(DATA_SELECTOR, gdt[3]);
        assert_eq!((ds.type_, ds.l, ds.db, ds.unusable), (3, 0, 1, 0));
        let tr = segment_from_descriptor(TSS_SELECTOR, gdt[4]);
        assert_eq!(
            (tr.base, tr.limit, tr.type_, tr.s, tr.g),
            (0x600, 0x67, 0xb, 0, 0)
        );
        let null = segment_from_descriptor(0, 0);
        assert_eq!(null.unusable, 1);
    }
}
