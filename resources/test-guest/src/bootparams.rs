//! Reading the Linux `boot_params` ("zero page") the VMM hands over in RSI.
//! Offsets are from the kernel's Documentation/arch/x86/zero-page.rst.

const EXT_CMD_LINE_PTR: usize = 0x0c8;
const E820_ENTRIES: usize = 0x1e8;
const CMD_LINE_PTR: usize = 0x228;
const CMDLINE_SIZE: usize = 0x238;
const E820_TABLE: usize = 0x2d0;
const E820_ENTRY_LEN: usize = 20;
const E820_MAX: usize = 128;
/// Size of the zero page.
pub const ZERO_PAGE_LEN: usize = 4096;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;

fn u32_at(page: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&page[off..off + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(page: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&page[off..off + 8]);
    u64::from_le_bytes(b)
}

/// One e820 memory range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The zero page.
pub struct BootParams<'a> {
    page: &'a [u8; ZERO_PAGE_LEN],
}

impl<'a> BootParams<'a> {
    pub fn new(page: &'a [u8; ZERO_PAGE_LEN]) -> Self {
        Self { page }
    }

    /// Guest-physical address and length of the command line.
    pub fn cmdline(&self) -> (u64, usize) {
        let addr = u64::from(u32_at(self.page, CMD_LINE_PTR))
            | (u64::from(u32_at(self.page, EXT_CMD_LINE_PTR)) << 32);
        (addr, u32_at(self.page, CMDLINE_SIZE) as usize)
    }

    /// The e820 map.
    pub fn e820(&self) -> impl Iterator<Item = E820Entry> + 'a {
        let page = self.page;
        let n = usize::from(page[E820_ENTRIES]).min(E820_MAX);
        (0..n).map(move |i| {
            let off = E820_TABLE + i * E820_ENTRY_LEN;
            E820Entry {
                addr: u64_at(page, off),
                size: u64_at(page, off + 8),
                kind: u32_at(page, off + 16),
            }
        })
    }

    /// Bytes of usable RAM.
    pub fn ram_bytes(&self) -> u64 {
        self.e820()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum()
    }

    /// The largest usable range `[start, end)` at or above `floor`.
    pub fn largest_ram_above(&self, floor: u64) -> Option<(u64, u64)> {
        self.e820()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| (e.addr.max(floor), e.addr + e.size))
            .filter(|(s, e)| s < e)
            .max_by_key(|(s, e)| e - s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cmdline_and_e820() {
        let mut page = [0u8; ZERO_PAGE_LEN];
        page[CMD_LINE_PTR..CMD_LINE_PTR + 4].copy_from_slice(&0x20000u32.to_le_bytes());
        page[CMDLINE_SIZE..CMDLINE_SIZE + 4].copy_from_slice(&17u32.to_le_bytes());
        let entries = [
            (0u64, 0x9fc00u64, 1u32),
            (0x9fc00, 0x400, 2),
            (0x100000, 0x3f00000, 1),
        ];
        for (i, (a, s, t)) in entries.iter().enumerate() {
            let off = E820_TABLE + i * E820_ENTRY_LEN;
            page[off..off + 8].copy_from_slice(&a.to_le_bytes());
            page[off + 8..off + 16].copy_from_slice(&s.to_le_bytes());
            page[off + 16..off + 20].copy_from_slice(&t.to_le_bytes());
        }
        page[E820_ENTRIES] = 3;
        let bp = BootParams::new(&page);
        assert_eq!(bp.cmdline(), (0x20000, 17));
        assert_eq!(bp.e820().count(), 3);
        assert_eq!(bp.ram_bytes(), 0x9fc00 + 0x3f00000);
        assert_eq!(bp.largest_ram_above(0x400000), Some((0x400000, 0x4000000)));
        assert_eq!(bp.largest_ram_above(0x5000000), None);
    }
}
