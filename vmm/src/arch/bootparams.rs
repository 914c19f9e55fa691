//! The Linux `boot_params` ("zero page") and its e820 memory map.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use super::layout::{ram_ranges, BASE_MEMORY_END, HIMEM_START, MPTABLE_START};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// `boot_flag` value every valid setup header carries.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// "HdrS": the setup header signature.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` for a boot loader without an assigned ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Alignment Linux asks for when the header does not say.
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x100_0000;

/// The e820 map of a guest with `mem_size` bytes of RAM: base memory minus
/// the MP table's KiB, which is reserved, then RAM from 1 MiB on, split
/// around the MMIO hole.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, MPTABLE_START, E820_RAM),
        entry(
            MPTABLE_START,
            BASE_MEMORY_END - MPTABLE_START,
            E820_RESERVED,
        ),
    ];
    for (start, len) in ram_ranges(mem_size) {
        let start_above_base = start.max(HIMEM_START);
        let end = start + len;
        if end > start_above_base {
            map.push(entry(start_above_base, end - start_above_base, E820_RAM));
        }
    }
    map
}

/// What goes into the zero page.
pub struct BootParamsInput {
    /// The kernel's own setup header (bzImage), or `None` for an ELF vmlinux.
    pub setup_header: Option<setup_header>,
    /// Guest address and length (NUL excluded) of the command line.
    pub cmdline: (u64, usize),
    /// Guest address and size of the initrd.
    pub initrd: Option<(u64, u64)>,
    /// Bytes of guest RAM.
    pub mem_size: u64,
}

/// Builds the zero page.
pub fn build(input: &BootParamsInput) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = input.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = BOOT_FLAG_MAGIC;
        params.hdr.header = HDRS_MAGIC;
        params.hdr.kernel_alignment = DEFAULT_KERNEL_ALIGNMENT;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;

    let (cmdline_addr, cmdline_len) = input.cmdline;
    params.hdr.cmd_line_ptr = cmdline_addr as u32;
    params.ext_cmd_line_ptr = (cmdline_addr >> 32) as u32;
    params.hdr.cmdline_size = cmdline_len as u32;

    if let Some((addr, size)) = input.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }

    let map = e820_map(input.mem_size);
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = *entry;
    }
    params.e820_entries = map.len() as u8;
    params
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::{MMIO_HOLE_END, MMIO_HOLE_START};
    use vm_memory::ByteValued;

    fn entries(map: &[boot_e820_entry]) -> Vec<(u64, u64, u32)> {
        map.iter().map(|e| (e.addr, e.size, e.r#type)).collect()
    }

    #[test]
    fn e820_small_guest() {
        assert_eq!(
            entries(&e820_map(128 << 20)),
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x400, E820_RESERVED),
                (0x10_0000, (128 << 20) - 0x10_0000, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_guest_larger_than_the_hole() {
        let map = e820_map(6 << 30);
        assert_eq!(
            entries(&map)[2..],
            [
                (0x10_0000, MMIO_HOLE_START - 0x10_0000, E820_RAM),
                (MMIO_HOLE_END, (6 << 30) - MMIO_HOLE_START, E820_RAM),
            ]
        );
        let ram: u64 = map
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (6 << 30) - 0x10_0000 + 0x9fc00);
    }

    #[test]
    fn zero_page_fields_land_at_protocol_offsets() {
        let params = build(&BootParamsInput {
            setup_header: None,
            cmdline: (0x20000, 42),
            initrd: Some((0x7f00_0000, 0x12_3456)),
            mem_size: 2 << 30,
        });
        let bytes = params.as_slice();
        let u32_at = |off: usize| u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap());
        let u16_at = |off: usize| u16::from_le_bytes(bytes[off..off + 2].try_into().unwrap());
        // Offsets from Documentation/arch/x86/boot.rst and zero-page.rst.
        assert_eq!(u16_at(0x1fe), 0xaa55);
        assert_eq!(u32_at(0x202), 0x5372_6448);
        assert_eq!(bytes[0x210], 0xff);
        assert_eq!(u32_at(0x218), 0x7f00_0000);
        assert_eq!(u32_at(0x21c), 0x12_3456);
        assert_eq!(u32_at(0x228), 0x20000);
        assert_eq!(u32_at(0x238), 42);
        assert_eq!(bytes[0x1e8], 3);
        // Third e820 entry: RAM from 1 MiB.
        let e = 0x2d0 + 2 * 20;
        assert_eq!(u32_at(e), 0x10_0000);
        assert_eq!(u32_at(e + 16), E820_RAM);
    }

    #[test]
    fn bzimage_header_is_kept() {
        let hdr = setup_header {
            boot_flag: 0xaa55,
            header: 0x5372_6448,
            version: 0x20f,
            kernel_alignment: 0x20_0000,
            ..Default::default()
        };
        let params = build(&BootParamsInput {
            setup_header: Some(hdr),
            cmdline: (0x20000, 1),
            initrd: None,
            mem_size: 64 << 20,
        });
        let version = params.hdr.version;
        let align = params.hdr.kernel_alignment;
        assert_eq!((version, align), (0x20f, 0x20_0000));
        assert_eq!(params.hdr.type_of_loader, 0xff);
        assert_eq!({ params.hdr.ramdisk_image }, 0);
    }
}
