//! x86-64 boot structures the VMM writes into guest memory: layout, GDT,
//! identity page tables, the zero page with its e820 map, the MP table and
//! the ACPI tables. Pure data construction, unit-tested without KVM (but
//! for one test that checks the MP table's IRQ pins against KVM's routing).

pub mod acpi;
pub mod bootparams;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod paging;

/// Byte that makes `bytes` sum to zero (mod 256), as MP and ACPI table
/// checksums do.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}
