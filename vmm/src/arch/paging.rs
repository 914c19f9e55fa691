//! The boot identity map: virtual = physical for the first
//! [`IDENTITY_MAP_GIB`] GiB, in 2 MiB pages.
//!
//! Why 2 MiB and not 1 GiB pages: on the shadow-paging KVM our machines run,
//! a 1 GiB page over the LAPIC at 0xfee00000 makes the guest triple-fault on
//! its first LAPIC access. 2 MiB pages work everywhere. Pages in the MMIO
//! hole are mapped uncached.

use super::layout::{IDENTITY_MAP_GIB, MMIO_HOLE_END, MMIO_HOLE_START, PDPT_START, PD_START};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;
const PAGE_2M: u64 = 2 << 20;

/// Entries of one 4 KiB page-table page.
pub type TablePage = [u64; 512];

/// The page-table pages of the identity map, with their guest addresses.
pub struct IdentityMap {
    pub pml4: TablePage,
    pub pdpt: TablePage,
    /// One page directory per GiB, the first at `PD_START`.
    pub pds: Vec<TablePage>,
}

impl IdentityMap {
    /// Builds the tables for the layout in [`super::layout`].
    pub fn new() -> Self {
        let mut pml4 = [0; 512];
        let mut pdpt = [0; 512];
        pml4[0] = PDPT_START | PRESENT | WRITABLE;
        let pds = (0..IDENTITY_MAP_GIB)
            .map(|gib| {
                pdpt[gib as usize] = (PD_START + gib * 0x1000) | PRESENT | WRITABLE;
                let mut pd = [0; 512];
                for (i, entry) in pd.iter_mut().enumerate() {
                    let addr = (gib << 30) + i as u64 * PAGE_2M;
                    let mut flags = PRESENT | WRITABLE | HUGE;
                    if (MMIO_HOLE_START..MMIO_HOLE_END).contains(&addr) {
                        flags |= CACHE_DISABLE | WRITE_THROUGH;
                    }
                    *entry = addr | flags;
                }
                pd
            })
            .collect();
        Self { pml4, pdpt, pds }
    }

    /// Walks the tables like the MMU does; `None` for an unmapped address.
    pub fn translate(&self, vaddr: u64) -> Option<u64> {
        let pml4e = self.pml4[((vaddr >> 39) & 0x1ff) as usize];
        if pml4e & PRESENT == 0 {
            return None;
        }
        let pdpte = self.pdpt[((vaddr >> 30) & 0x1ff) as usize];
        if pdpte & PRESENT == 0 {
            return None;
        }
        let pd_index = ((pdpte & !0xfff) - PD_START) / 0x1000;
        let pde = self.pds.get(pd_index as usize)?[((vaddr >> 21) & 0x1ff) as usize];
        if pde & PRESENT == 0 || pde & HUGE == 0 {
            return None;
        }
        Some((pde & !(PAGE_2M - 1) & 0x000f_ffff_ffff_f000) | (vaddr & (PAGE_2M - 1)))
    }
}

impl Default for IdentityMap {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_the_first_gibs_one_to_one() {
        let map = IdentityMap::new();
        for addr in [0, 0x7000, 0x20_0000, 0x1234_5678, 0xfee0_0000, 0xffff_ffff] {
            assert_eq!(map.translate(addr), Some(addr), "{addr:#x}");
        }
        assert_eq!(map.translate(IDENTITY_MAP_GIB << 30), None);
    }

    #[test]
    fn uses_2mib_pages_only_and_uncached_mmio() {
        let map = IdentityMap::new();
        // No 1 GiB pages: every PDPT entry points to a page directory.
        assert!(map.pdpt[..4]
            .iter()
            .all(|e| e & HUGE == 0 && e & PRESENT != 0));
        assert!(map.pdpt[4..].iter().all(|&e| e == 0));
        let lapic_pde = map.pds[3][(0xfee0_0000u64 >> 21 & 0x1ff) as usize];
        assert_eq!(lapic_pde & (HUGE | CACHE_DISABLE), HUGE | CACHE_DISABLE);
        let ram_pde = map.pds[0][1];
        assert_eq!(ram_pde, PAGE_2M | PRESENT | WRITABLE | HUGE);
    }
}
