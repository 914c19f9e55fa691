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
    #[allow(unused_unsafe)] // safe since Rust 1.94; unsafe before
    let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, 0) };
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// The `rdrand rax` instruction's bytes, as [`rdrand`] emits it: #UD
/// recognises them (see `invalid_opcode`).
const RDRAND_RAX: [u8; 4] = [0x48, 0x0f, 0xc7, 0xf0];

/// A random number from the CPU's RDRAND, `None` when it has none to give.
/// Call it only from ring 3 where CPUID reports RDRAND: there it runs
/// natively, and should it raise #UD anyway, the kernel makes it fail
/// (carry clear) instead of stopping the guest.
pub fn rdrand() -> Option<u64> {
    let value: u64;
    let ok: u8;
    // SAFETY: RDRAND only writes rax and the flags; the bytes are spelt out
    // so that the #UD handler can recognise exactly this instruction.
    unsafe {
        asm!(
            ".byte 0x48, 0x0f, 0xc7, 0xf0",
            "setc {ok}",
            ok = out(reg_byte) ok,
            out("rax") value,
            options(nomem, nostack),
        )
    };
    (ok == 1).then_some(value)
}

/// Halts with interrupts off, for good (from ring 3, by asking the kernel).
pub fn halt_forever() -> ! {
    if in_user_mode() {
        syscall(Syscall::Halt, 0, 0);
    }
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
/// Ring-3 data and code selectors (RPL 3).
const USER_DATA_SELECTOR: u16 = 0x18 | 3;
const USER_CODE_SELECTOR: u16 = 0x20 | 3;

const TSS_SELECTOR: u16 = 0x28;

/// Null, 64-bit ring-0 code, ring-0 data, ring-3 data, 64-bit ring-3 code,
/// and the two words of the TSS descriptor (filled in by `load_gdt`).
static GDT: BootCell<[u64; 7]> = BootCell::new([
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x00cf_f300_0000_ffff,
    0x00af_fb00_0000_ffff,
    0,
    0,
]);

/// The 64-bit task-state segment: only `rsp0` matters, the stack the CPU
/// switches to when an interrupt or system call leaves ring 3.
#[repr(C, packed)]
struct Tss {
    reserved0: u32,
    rsp0: u64,
    rsp1: u64,
    rsp2: u64,
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

static TSS: BootCell<Tss> = BootCell::new(Tss {
    reserved0: 0,
    rsp0: 0,
    rsp1: 0,
    rsp2: 0,
    reserved1: 0,
    ist: [0; 7],
    reserved2: 0,
    reserved3: 0,
    iomap_base: core::mem::size_of::<Tss>() as u16,
});

const KERNEL_STACK_SIZE: usize = 32 * 1024;

#[repr(C, align(16))]
struct KernelStack([u8; KERNEL_STACK_SIZE]);

/// The stack interrupts and system calls from ring 3 run on.
static KERNEL_STACK: BootCell<KernelStack> = BootCell::new(KernelStack([0; KERNEL_STACK_SIZE]));

#[repr(C, packed)]
struct TablePointer {
    limit: u16,
    base: u64,
}

fn load_gdt() {
    // SAFETY: single-threaded set-up; nothing else uses the GDT or TSS yet.
    let gdt = unsafe {
        let tss = &mut *TSS.get();
        tss.rsp0 = KERNEL_STACK.get() as u64 + KERNEL_STACK_SIZE as u64;
        let base = TSS.get() as u64;
        let limit = (core::mem::size_of::<Tss>() - 1) as u64;
        let gdt = &mut *GDT.get();
        // Present, DPL 0, type 9 (available 64-bit TSS).
        gdt[5] = limit | ((base & 0xff_ffff) << 16) | (0x89 << 40) | (((base >> 24) & 0xff) << 56);
        gdt[6] = base >> 32;
        gdt
    };
    let ptr = TablePointer {
        limit: (core::mem::size_of_val(gdt) - 1) as u16,
        base: gdt.as_ptr() as u64,
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
            "ltr {tss:x}",
            ptr = in(reg) &ptr,
            tss = in(reg) TSS_SELECTOR,
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
/// Ring 3 may use the page: the services run there (see `enter_user`).
const USER: u64 = 4;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;
const MMIO_HOLE_START: u64 = 0xc000_0000;

static PML4: BootCell<Table> = BootCell::new(Table([0; 512]));
static PDPT: BootCell<Table> = BootCell::new(Table([0; 512]));
static PDS: BootCell<[Table; GIB_MAPPED]> = BootCell::new([const { Table([0; 512]) }; GIB_MAPPED]);

/// Identity-maps the first 4 GiB with 2 MiB pages (never 1 GiB: the
/// shadow-paging KVM we test on breaks LAPIC access under a 1 GiB page),
/// the MMIO hole uncached, and switches to it. Every page is user-accessible:
/// this kernel protects nothing from its own services, it only runs them in
/// ring 3 because the KVM we test on runs ring 3 natively and emulates
/// ring 0. Everything above 4 GiB is
/// unmapped, so an access there page-faults.
fn load_page_tables() {
    // SAFETY: single-threaded set-up; the tables are static and aligned, and
    // the new map keeps every address the kernel uses identity-mapped.
    unsafe {
        let pml4 = &mut (*PML4.get()).0;
        let pdpt = &mut (*PDPT.get()).0;
        let pds = &mut *PDS.get();
        pml4[0] = pdpt.as_ptr() as u64 | PRESENT | WRITABLE | USER;
        for (gib, pd) in pds.iter_mut().enumerate() {
            pdpt[gib] = pd.0.as_ptr() as u64 | PRESENT | WRITABLE | USER;
            for (i, entry) in pd.0.iter_mut().enumerate() {
                let addr = ((gib as u64) << 30) | ((i as u64) << 21);
                let cache = if addr >= MMIO_HOLE_START {
                    CACHE_DISABLE | WRITE_THROUGH
                } else {
                    0
                };
                *entry = addr | PRESENT | WRITABLE | USER | HUGE | cache;
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
        Self::with_flags(handler, 0x8e) // present, DPL 0, 64-bit interrupt gate
    }

    fn with_flags(handler: u64, flags: u8) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector: CODE_SELECTOR,
            ist: 0,
            flags,
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
/// Vector of IOAPIC pin 0; pin `p` raises `IRQ_VECTOR_BASE + p`.
pub const IRQ_VECTOR_BASE: usize = 0x30;
/// IOAPIC pins this kernel routes (the VMM gives virtio devices 5 and up).
const IRQ_PINS: core::ops::Range<u32> = 5..16;

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
        "exception vector {} error {:#x} rip {:#x} cr2 {:#x} cs {:#x} rflags {:#x} rsp {:#x}",
        frame.vector,
        frame.error_code,
        frame.rip,
        cr2,
        frame.cs,
        frame.rflags,
        frame.rsp
    );
    halt_forever()
}

/// Device interrupts taken so far (any IOAPIC pin). Ring 3 reads it before
/// it decides to wait, and [`Syscall::Wait`] sleeps only if it is unchanged,
/// so no interrupt is lost between the check and the `hlt`.
#[no_mangle]
pub static IRQ_COUNT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

// Interrupt stubs: the timer acknowledges the LAPIC; device interrupts count
// themselves and acknowledge it; spurious ones need no EOI. The system-call
// stub saves the registers the C ABI lets a callee clobber, passes
// (rax, rdi, rsi, rdx) as arguments and returns rax.
global_asm!(
    ".global timer_interrupt_stub",
    "timer_interrupt_stub:",
    "push rax",
    "mov eax, 0xfee000b0",
    "mov dword ptr [rax], 0",
    "pop rax",
    "iretq",
    ".global device_interrupt_stub",
    "device_interrupt_stub:",
    "lock inc qword ptr [rip + IRQ_COUNT]",
    "push rax",
    "mov eax, 0xfee000b0",
    "mov dword ptr [rax], 0",
    "pop rax",
    "iretq",
    ".global spurious_interrupt_stub",
    "spurious_interrupt_stub:",
    "iretq",
    // #UD: a `ud2` from ring 3 is a system call (see `Syscall`). Saves
    // every register the C ABI lets a callee clobber, plus rbx, hands the
    // dispatcher a pointer to them and the CPU's frame, and returns with
    // whatever the dispatcher left in them.
    ".global invalid_opcode_stub",
    "invalid_opcode_stub:",
    "push rax",
    "push rbx",
    "push rcx",
    "push rdx",
    "push rsi",
    "push rdi",
    "push r8",
    "push r9",
    "push r10",
    "push r11",
    "mov rdi, rsp",
    "mov rbx, rsp",
    "and rsp, -16",
    "call {dispatch}",
    "mov rsp, rbx",
    "pop r11",
    "pop r10",
    "pop r9",
    "pop r8",
    "pop rdi",
    "pop rsi",
    "pop rdx",
    "pop rcx",
    "pop rbx",
    "pop rax",
    "iretq",
    dispatch = sym invalid_opcode,
);

extern "C" {
    fn timer_interrupt_stub();
    fn device_interrupt_stub();
    fn spurious_interrupt_stub();
    fn invalid_opcode_stub();
}

/// What `invalid_opcode_stub` saved, then the CPU's interrupt frame.
#[repr(C)]
struct TrapFrame {
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

const UD2: [u8; 2] = [0x0f, 0x0b];
const INVALID_OPCODE: u64 = 6;

const RFLAGS_CF: u64 = 1;

/// #UD: a system call when ring 3 executed `ud2`, a failed [`rdrand`] when
/// it was that, else a fatal exception.
extern "C" fn invalid_opcode(frame: &mut TrapFrame) {
    // SAFETY: the faulting instruction's bytes are identity-mapped memory.
    let bytes = unsafe { core::ptr::read_unaligned(frame.rip as *const [u8; 4]) };
    if frame.cs & 3 == 3 && bytes[..2] == UD2 {
        frame.rax = syscall_dispatch(frame.rax, frame.rdi, frame.rsi, frame.rdx);
        frame.rip += UD2.len() as u64;
        return;
    }
    if frame.cs & 3 == 3 && bytes == RDRAND_RAX {
        frame.rax = 0;
        frame.rflags &= !RFLAGS_CF;
        frame.rip += RDRAND_RAX.len() as u64;
        return;
    }
    exception(&ExceptionFrame {
        vector: INVALID_OPCODE,
        error_code: 0,
        rip: frame.rip,
        cs: frame.cs,
        rflags: frame.rflags,
        rsp: frame.rsp,
        ss: frame.ss,
    })
}

/// What ring 3 asks of the kernel (number in rax, arguments in rdi, rsi,
/// rdx). The call is a `ud2`: on the KVM we test on, `int 0x80` from ring 3
/// raises #UD and SYSCALL does not leave ring 3, but exceptions reach the
/// kernel properly, so the #UD handler is the system-call gate.
#[repr(u64)]
#[derive(Clone, Copy)]
pub enum Syscall {
    /// Write bytes (rdi = address, rsi = length) to the serial console.
    Write = 0,
    /// Sleep until the next interrupt unless [`IRQ_COUNT`] moved past rdi.
    Wait = 1,
    /// Power the VM off.
    PowerOff = 2,
    /// Stop for good (a fatal error was reported).
    Halt = 3,
}

fn syscall_dispatch(number: u64, a0: u64, a1: u64, _a2: u64) -> u64 {
    use core::sync::atomic::Ordering;
    match number {
        n if n == Syscall::Write as u64 => {
            // SAFETY: ring 3 passes a buffer of its own; all memory is
            // identity-mapped and readable.
            let bytes = unsafe { core::slice::from_raw_parts(a0 as *const u8, a1 as usize) };
            crate::serial::write_bytes(bytes);
            0
        }
        n if n == Syscall::Wait as u64 => {
            // Interrupts are off here (interrupt gate): the check and the
            // `sti; hlt` pair cannot miss an interrupt.
            if IRQ_COUNT.load(Ordering::SeqCst) == a0 {
                wait_for_interrupt();
            }
            0
        }
        n if n == Syscall::PowerOff as u64 => crate::power::off(),
        _ => halt_forever(),
    }
}

/// Makes a system call from ring 3.
pub fn syscall(number: Syscall, a0: u64, a1: u64) -> u64 {
    let ret: u64;
    // SAFETY: the kernel's #UD handler preserves every register but rax
    // and reads only the memory the call names.
    unsafe {
        asm!(
            "ud2",
            inlateout("rax") number as u64 => ret,
            in("rdi") a0,
            in("rsi") a1,
        )
    };
    ret
}

/// True when running in ring 3.
pub fn in_user_mode() -> bool {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    cs & 3 == 3
}

const USER_STACK_SIZE: usize = 256 * 1024;

#[repr(C, align(16))]
struct UserStack([u8; USER_STACK_SIZE]);

static USER_STACK: BootCell<UserStack> = BootCell::new(UserStack([0; USER_STACK_SIZE]));

/// Leaves the kernel for good: continues in ring 3 at `entry`, on a stack of
/// its own, with interrupts enabled.
pub fn enter_user(entry: extern "C" fn() -> !) -> ! {
    let stack_top = USER_STACK.get() as u64 + USER_STACK_SIZE as u64;
    // SAFETY: builds an interrupt-return frame to ring 3: user data and code
    // selectors of our GDT, a fresh stack, IF set, IOPL 0.
    unsafe {
        asm!(
            "push {ss}",
            "push {rsp}",
            "push 0x202",
            "push {cs}",
            "push {rip}",
            "iretq",
            ss = in(reg) u64::from(USER_DATA_SELECTOR),
            rsp = in(reg) stack_top,
            cs = in(reg) u64::from(USER_CODE_SELECTOR),
            rip = in(reg) entry as *const () as u64,
            options(noreturn)
        )
    }
}

const IOAPIC_BASE: u64 = 0xfec0_0000;

fn ioapic_write(reg: u32, value: u32) {
    // SAFETY: the IOAPIC's MMIO page is identity-mapped (uncached); IOREGSEL
    // at +0 selects the register IOWIN at +0x10 accesses.
    unsafe {
        core::ptr::write_volatile(IOAPIC_BASE as *mut u32, reg);
        core::ptr::write_volatile((IOAPIC_BASE + 0x10) as *mut u32, value);
    }
}

/// Routes the device IOAPIC pins to this CPU (APIC ID 0): edge-triggered,
/// active high, fixed delivery, vector `IRQ_VECTOR_BASE + pin`.
fn route_device_irqs() {
    for pin in IRQ_PINS {
        ioapic_write(0x10 + 2 * pin + 1, 0);
        ioapic_write(0x10 + 2 * pin, IRQ_VECTOR_BASE as u32 + pin);
    }
}

fn load_idt() {
    // SAFETY: single-threaded set-up with interrupts off; the IDT is static.
    unsafe {
        let idt = &mut *IDT.get();
        for (vector, stub) in exception_stub_table.iter().enumerate() {
            idt[vector] = Gate::interrupt(*stub);
        }
        idt[INVALID_OPCODE as usize] = Gate::interrupt(invalid_opcode_stub as *const () as u64);
        idt[TIMER_VECTOR] = Gate::interrupt(timer_interrupt_stub as *const () as u64);
        idt[SPURIOUS_VECTOR] = Gate::interrupt(spurious_interrupt_stub as *const () as u64);
        for pin in IRQ_PINS {
            idt[IRQ_VECTOR_BASE + pin as usize] =
                Gate::interrupt(device_interrupt_stub as *const () as u64);
        }
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
    route_device_irqs();
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
