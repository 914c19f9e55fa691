//! x86-64 boot structures the VMM writes into guest memory: layout, GDT,
//! identity page tables, the zero page with its e820 map, the MP table.
//! Pure data construction, unit-tested without KVM.

pub mod bootparams;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod paging;
