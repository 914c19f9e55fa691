//! x86-64 plumbing: port I/O, MSRs, our own GDT and identity map, the IDT
//! with exception handlers, and interrupt control.
//!
//! The guest does not rely on the VMM's boot GDT or page tables beyond the
//! first instructions: it loads its own, all inside the image (`.bss`), so
//! low memory stays the VMM's.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port I/O has no memory effects on the guest; the ports we use
    // belong to devices this kernel drives.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Writes a byte to an I/O port.
pub fn outb(port: u16, v: u8) {
    // SAFETY: as for `inb`.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    };
}

/// Writes a model-specific register.
pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: only called for MSRs the CPUID checks say exist, with values
    // that follow their definitions.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack))
    };
}

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC only reads the counter.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// CPUID leaf `leaf`, subleaf 0: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    // SAFETY: CPUID has no side effects. LLVM reserves rbx, so it is saved
    // around the instruction by hand.
    let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, 0) };
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Halts with interrupts off, for good.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: stopping the CPU has no memory effects.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Waits for the next interrupt with interrupts enabled just for the wait.
/// `sti` delays interrupts by one instruction, so none is lost between it
/// and `hlt`.
pub fn wait_for_interrupt() {
    // SAFETY: interrupts are handled by our IDT; they are off again after.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}

/// A static the kernel mutates only during single-threaded set-up.
#[repr(transparent)]
pub struct BootCell<T>(UnsafeCell<T>);

// SAFETY: only the boot CPU runs this kernel, and it touches these cells
// during set-up with interrupts off.
unsafe impl<T> Sync for BootCell<T> {}

impl<T> BootCell<T> {
    pub const fn new(value: T) -> Self {
        Self(UnsafeCell::new(value))
    }
    pub fn get(&self) -> *mut T {
        self.0.get()
    }
}

// ---------------------------------------------------------------- GDT

const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;

/// Null, 64-bit ring-0 code, ring-0 data.
static GDT: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

#[repr(C, packed)]
struct TablePointer {
    limit: u16,
    base: u64,
}

fn load_gdt() {
    let ptr = TablePointer {
        limit: (core::mem::size_of_val(&GDT) - 1) as u16,
        base: GDT.as_ptr() as u64,
    };
    // SAFETY: the GDT is static and holds valid descriptors; CS is reloaded
    // with a far return to the next instruction and the data segments with
    // the data selector.
    unsafe {
        asm!(
            "lgdt [{ptr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {ds:e}",
            "mov es, {ds:e}",
            "mov ss, {ds:e}",
            "mov fs, {ds:e}",
            "mov gs, {ds:e}",
            ptr = in(reg) &ptr,
            cs = in(reg) u64::from(CODE_SELECTOR),
            ds = in(reg) u32::from(DATA_SELECTOR),
            tmp = lateout(reg) _,
        )
    };
}

// ---------------------------------------------------------------- paging

#[repr(C, align(4096))]
struct Table([u64; 512]);

const GIB_MAPPED: usize = 4;
const PRESENT: u64 = 1;
const WRITABLE: u64 = 2;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;
const MMIO_HOLE_START: u64 = 0xc000_0000;

static PML4: BootCell<Table> = BootCell::new(Table([0; 512]));
static PDPT: BootCell<Table> = BootCell::new(Table([0; 512]));
static PDS: BootCell<[Table; GIB_MAPPED]> = BootCell::new([const { Table([0; 512]) }; GIB_MAPPED]);

/// Identity-maps the first 4 GiB with 2 MiB pages (never 1 GiB: the
/// shadow-paging KVM we test on breaks LAPIC access under a 1 GiB page),
/// the MMIO hole uncached, and switches to it. Everything above 4 GiB is
/// unmapped, so an access there page-faults.
fn load_page_tables() {
    // SAFETY: single-threaded set-up; the tables are static and aligned, and
    // the new map keeps every address the kernel uses identity-mapped.
    unsafe {
        let pml4 = &mut (*PML4.get()).0;
        let pdpt = &mut (*PDPT.get()).0;
        let pds = &mut *PDS.get();
        pml4[0] = pdpt.as_ptr() as u64 | PRESENT | WRITABLE;
        for (gib, pd) in pds.iter_mut().enumerate() {
            pdpt[gib] = pd.0.as_ptr() as u64 | PRESENT | WRITABLE;
            for (i, entry) in pd.0.iter_mut().enumerate() {
                let addr = ((gib as u64) << 30) | ((i as u64) << 21);
                let cache = if addr >= MMIO_HOLE_START {
                    CACHE_DISABLE | WRITE_THROUGH
                } else {
                    0
                };
                *entry = addr | PRESENT | WRITABLE | HUGE | cache;
            }
        }
        asm!("mov cr3, {}", in(reg) pml4.as_ptr() as u64, options(nostack));
    }
}

// ---------------------------------------------------------------- IDT

#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    flags: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    const EMPTY: Gate = Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        flags: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    };

    fn interrupt(handler: u64) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector: CODE_SELECTOR,
            ist: 0,
            flags: 0x8e, // present, ring 0, 64-bit interrupt gate
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

static IDT: BootCell<[Gate; 256]> = BootCell::new([Gate::EMPTY; 256]);

/// Vector of the local APIC timer.
pub const TIMER_VECTOR: usize = 0x20;
/// Vector of spurious local APIC interrupts.
pub const SPURIOUS_VECTOR: usize = 0xff;

/// What an exception stub leaves on the stack for [`exception`].
#[repr(C)]
pub struct ExceptionFrame {
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

// One stub per exception vector 0-31. Where the CPU pushes no error code
// the stub pushes a zero, so every frame has the same shape. A table of the
// stubs' addresses follows them.
macro_rules! exception_stubs {
    ($($vector:literal $kind:ident),* $(,)?) => {
        global_asm!(
            $(
                concat!("exception_stub_", stringify!($vector), ":"),
                exception_stubs!(@push $kind),
                concat!("push ", stringify!($vector)),
                "jmp exception_common",
            )*
            "exception_common:",
            "mov rdi, rsp",
            "and rsp, -16",
            "call {handler}",
            "ud2",
            ".pushsection .rodata",
            ".balign 8",
            ".global exception_stub_table",
            "exception_stub_table:",
            $( concat!(".quad exception_stub_", stringify!($vector)), )*
            ".popsection",
            handler = sym exception,
        );
    };
    (@push err) => { "" };
    (@push noerr) => { "push 0" };
}

exception_stubs!(
    0 noerr, 1 noerr, 2 noerr, 3 noerr, 4 noerr, 5 noerr, 6 noerr, 7 noerr,
    8 err, 9 noerr, 10 err, 11 err, 12 err, 13 err, 14 err, 15 noerr,
    16 noerr, 17 err, 18 noerr, 19 noerr, 20 noerr, 21 err, 22 noerr, 23 noerr,
    24 noerr, 25 noerr, 26 noerr, 27 noerr, 28 noerr, 29 err, 30 err, 31 noerr,
);

extern "C" {
    /// Addresses of the exception stubs, by vector.
    static exception_stub_table: [u64; 32];
}

/// Reports an exception and stops this CPU. There is no recovering from
/// an exception in this kernel: each one is a bug or a deliberate test.
extern "C" fn exception(frame: &ExceptionFrame) -> ! {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    crate::say!(
        "exception vector {} error {:#x} rip {:#x} cr2 {:#x}",
        frame.vector,
        frame.error_code,
        frame.rip,
        cr2
    );
    halt_forever()
}

// Interrupt stubs: the timer acknowledges the LAPIC; spurious ones need no EOI.
global_asm!(
    ".global timer_interrupt_stub",
    "timer_interrupt_stub:",
    "push rax",
    "mov eax, 0xfee000b0",
    "mov dword ptr [rax], 0",
    "pop rax",
    "iretq",
    ".global spurious_interrupt_stub",
    "spurious_interrupt_stub:",
    "iretq",
);

extern "C" {
    fn timer_interrupt_stub();
    fn spurious_interrupt_stub();
}

fn load_idt() {
    // SAFETY: single-threaded set-up with interrupts off; the IDT is static.
    unsafe {
        let idt = &mut *IDT.get();
        for (vector, stub) in exception_stub_table.iter().enumerate() {
            idt[vector] = Gate::interrupt(*stub);
        }
        idt[TIMER_VECTOR] = Gate::interrupt(timer_interrupt_stub as usize as u64);
        idt[SPURIOUS_VECTOR] = Gate::interrupt(spurious_interrupt_stub as usize as u64);
        let ptr = TablePointer {
            limit: (core::mem::size_of::<[Gate; 256]>() - 1) as u16,
            base: idt.as_ptr() as u64,
        };
        asm!("lidt [{}]", in(reg) &ptr, options(nostack));
    }
}

/// Masks every line of both 8259 PICs: this kernel uses the local APIC only.
fn mask_pic() {
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}

/// Takes over the CPU from the boot loader: GDT, page tables, IDT, PIC.
pub fn init() {
    load_gdt();
    load_page_tables();
    load_idt();
    mask_pic();
}

/// Makes the next exception a triple fault: an empty IDT, then an invalid
/// opcode. Used to test that the VMM reports triple faults.
pub fn triple_fault() -> ! {
    let ptr = TablePointer { limit: 0, base: 0 };
    // SAFETY: deliberately fatal.
    unsafe { asm!("lidt [{}]", "ud2", in(reg) &ptr, options(noreturn)) }
}

/// Reads an address outside the identity map, raising a page fault.
pub fn page_fault() -> u64 {
    const UNMAPPED: u64 = 0x80_0000_0000; // 512 GiB: PML4 entry 1 is empty
                                          // SAFETY: deliberately faulting; the handler reports and halts.
    unsafe { core::ptr::read_volatile(UNMAPPED as *const u64) }
}
