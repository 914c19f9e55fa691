//! colo-test-guest: the small `no_std` kernel colo-vmm's tests boot.
//!
//! Booted by the Linux x86-64 boot protocol (64-bit entry, zero page in
//! RSI), it takes over the CPU with its own GDT, identity map and IDT,
//! reports what it was given (command line, memory, CPUs) on COM1 as
//! `colo-test-guest: ...` marker lines, prints `colo-test-guest: ready`, and
//! then does what its command line asks:
//!
//! | word | effect |
//! |---|---|
//! | `halt_after_ms=N` | power off (i8042 reset) N ms after ready |
//! | `dirty_mib_per_s=N` | memory workload dirtying N MiB/s, self-checked every second |
//! | `workload_mib=M` | size of the workload's buffer (default 4) |
//! | `crash=triple_fault` | triple-fault right after ready |
//! | `crash=page_fault` | take a page fault (reported by the handler) |
//! | `ip=A.B.C.D/N`, `gw=A.B.C.D` | address of the first NIC, default route |
//! | `dial=A.B.C.D:PORT` | connect out to that address and echo on the connection (see `net`) |
//! | `rand_source=rdtsc` | random numbers from the TSC alone, even where RDRAND works (default `auto`: RDRAND if it works) |
//! | `deterministic_isn=1` | TCP sequence numbers and dialled ports follow from the guest's state, not from the TSC (see `net`) |
//! | `blk_bench_ops=N` | time N random 4 KiB reads and writes on the first disk (destroys it) |
//! | `pio_loop` | stay in ring 0 checking port I/O with side effects (see `pio_loop`) |
//! | `stall_probe` | after ready, submit one read to the second disk and never wait for it (a disk the VMM cannot serve must not stop the network) |
//!
//! Devices come from `virtio_mmio.device=` words. The first disk holds a
//! key-value log, the first NIC serves echo, HTTP and ping (see `net`).
//! After set-up the kernel drops to ring 3 for good: the KVM our tests run
//! on emulates guest kernel mode instruction by instruction but runs ring 3
//! natively, about a thousand times faster. Ring 3 asks the kernel for the
//! few privileged things it needs (console output, waiting for an
//! interrupt, power-off) with `ud2` system calls (see `arch::Syscall`).
//!
//! It runs on the boot CPU only and must contain no SSE instruction: the
//! KVM our tests run on cannot execute SSE in guest kernel mode
//! (resources/scripts/test-guest.sh checks the binary).

#![no_std]
#![no_main]

extern crate alloc;

mod arch;
mod heap;
mod net;
mod pio_loop;
mod power;
mod random;
mod serial;
mod store;
mod time;
mod virtio;
mod workload;

use colo_test_guest::bootparams::{BootParams, ZERO_PAGE_LEN};
use colo_test_guest::cmdline::Cmdline;
use colo_test_guest::{mptable, netconf};
use core::arch::global_asm;
use virtio::Mmio;

// Entry: a stack of our own, then Rust. RSI holds the zero page's address.
global_asm!(
    ".section .text._start, \"ax\"",
    ".global _start",
    "_start:",
    "cli",
    "lea rsp, [rip + {stack} + {stack_size}]",
    "mov rdi, rsi",
    "call {main}",
    "ud2",
    stack = sym BOOT_STACK,
    stack_size = const STACK_SIZE,
    main = sym kernel_main,
);

const STACK_SIZE: usize = 64 * 1024;

#[repr(C, align(16))]
struct Stack([u8; STACK_SIZE]);

static BOOT_STACK: arch::BootCell<Stack> = arch::BootCell::new(Stack([0; STACK_SIZE]));

extern "C" {
    static __image_end: u8;
}

const NS_PER_MS: u64 = 1_000_000;
const CHECK_PERIOD_NS: u64 = 1_000_000_000;
const STEP_BUDGET_NS: u64 = 2_000_000;
const DEFAULT_WORKLOAD_MIB: u64 = 4;

/// The number in `key=N`, reporting (and ignoring) one that is not a number.
fn number(cmdline: &Cmdline, key: &str) -> Option<u64> {
    match cmdline.get_u64(key)? {
        Ok(n) => Some(n),
        Err(text) => {
            say!("ignoring {key}={text}: not a number");
            None
        }
    }
}

/// Enabled CPUs in the MP table; 1 when there is none.
fn count_cpus() -> usize {
    const AREAS: [(u64, usize); 2] = [(0x9_fc00, 0x400), (0xf_0000, 0x1_0000)];
    for (base, len) in AREAS {
        // SAFETY: low memory is identity-mapped guest RAM, only read here.
        let area = unsafe { core::slice::from_raw_parts(base as *const u8, len) };
        let Some((_, table_addr)) = mptable::find_floating(area) else {
            continue;
        };
        // SAFETY: as above; the header gives the table's length.
        let header = unsafe { core::slice::from_raw_parts(table_addr as *const u8, 6) };
        let Some(len) = mptable::table_len(header) else {
            continue;
        };
        // SAFETY: as above.
        let table = unsafe { core::slice::from_raw_parts(table_addr as *const u8, len) };
        if let Some(cpus) = mptable::count_processors(table) {
            return cpus;
        }
    }
    1
}

/// Prints CPUID features a CPU template may hide and the logical CPU count
/// the VMM's topology gives, so tests can see what reaches the guest.
fn report_cpu_features() {
    let bit = |reg: u32, n: u32| (reg >> n) & 1;
    let (_, _, ecx1, _) = arch::cpuid(1);
    let (_, ebx7, _, _) = arch::cpuid(7);
    say!(
        "cpu features xsave={} avx={} popcnt={} smep={} smap={} logical={}",
        bit(ecx1, 26),
        bit(ecx1, 28),
        bit(ecx1, 23),
        bit(ebx7, 7),
        bit(ebx7, 20),
        (arch::cpuid(1).1 >> 16) & 0xff
    );
}

/// What the kernel hands to ring 3.
struct Boot {
    cmdline: Cmdline<'static>,
    /// Start of RAM free for the workload (above the image and the heap).
    free_ram: Option<(u64, u64)>,
}

static BOOT: arch::BootCell<Option<Boot>> = arch::BootCell::new(None);

extern "C" fn kernel_main(zero_page: u64) -> ! {
    arch::init();
    say!("banner v{}", env!("CARGO_PKG_VERSION"));

    // SAFETY: the boot protocol puts the zero page at RSI, identity-mapped;
    // it is only read.
    let params = BootParams::new(unsafe { &*(zero_page as *const [u8; ZERO_PAGE_LEN]) });
    let (cmdline_addr, cmdline_len) = params.cmdline();
    // SAFETY: the boot loader put `cmdline_len` bytes there, and nothing
    // writes them afterwards.
    let cmdline_bytes =
        unsafe { core::slice::from_raw_parts(cmdline_addr as *const u8, cmdline_len) };
    let cmdline = Cmdline::from_boot_bytes(cmdline_bytes);
    say!("cmdline \"{}\"", cmdline.as_str());
    say!("memory {} MiB", params.ram_bytes() >> 20);
    say!("cpus {}", count_cpus());
    report_cpu_features();

    if let Err(e) = time::init() {
        say!("no clock: {e:?}");
        arch::halt_forever();
    }
    time::start_tick();

    match cmdline.get("crash") {
        Some("triple_fault") => {
            say!("ready");
            arch::triple_fault()
        }
        Some("page_fault") => {
            say!("ready");
            let value = arch::page_fault();
            say!("read {value:#x} from unmapped memory: no page fault");
        }
        Some(other) => say!("ignoring crash={other}: unknown"),
        None => {}
    }
    if cmdline.words().any(|(word, _)| word == "pio_loop") {
        say!("ready");
        pio_loop::run();
    }

    // The heap sits right above the image, the workload above the heap.
    // Only the address of the linker symbol is taken.
    let image_end = core::ptr::addr_of!(__image_end) as u64;
    let heap_start = (image_end + 0x1f_ffff) & !0x1f_ffff;
    match params.largest_ram_above(heap_start) {
        Some((start, end)) if start == heap_start && end - start > heap::HEAP_BYTES => {}
        _ => {
            say!("not enough memory for the heap");
            arch::halt_forever();
        }
    }
    // SAFETY: RAM above the image is ours alone and identity-mapped; nothing
    // has allocated yet.
    unsafe { heap::init(heap_start) };
    let free_ram = params.largest_ram_above(heap_start + heap::HEAP_BYTES);
    // SAFETY: single-threaded set-up; ring 3 reads it only after the switch.
    unsafe { *BOOT.get() = Some(Boot { cmdline, free_ram }) };
    arch::enter_user(user_main)
}

/// Opens the devices the VMM declared: the first disk holds the key-value
/// store, the first NIC the network.
fn open_devices(cmdline: &Cmdline<'_>) -> (Option<Mmio>, Option<store::Store>, Option<Mmio>) {
    use virtio_drivers::transport::DeviceType;
    let mut nic = None;
    let mut store = None;
    let mut second_disk = None;
    for dev in netconf::mmio_devices(cmdline) {
        match virtio::open(dev) {
            Some((DeviceType::Network, t)) if nic.is_none() => nic = Some(t),
            Some((DeviceType::Block, t)) if store.is_none() => match store::Store::open(t) {
                Ok(s) => store = Some(s),
                Err(e) => say!("disk at {:#x}: {e:?}", dev.base),
            },
            Some((DeviceType::Block, t)) if second_disk.is_none() => second_disk = Some(t),
            Some((kind, _)) => say!("virtio device {kind:?} at {:#x} unused", dev.base),
            None => {}
        }
    }
    (nic, store, second_disk)
}

/// `stall_probe`: one read submitted to the second disk, never waited for
/// (its buffers are leaked, so they outlive the request).
fn stall_probe(transport: Mmio) {
    use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk};
    let mut blk = match VirtIOBlk::<virtio::GuestHal, Mmio>::new(transport) {
        Ok(blk) => blk,
        Err(e) => {
            say!("stall probe: {e:?}");
            return;
        }
    };
    let req = alloc::boxed::Box::leak(alloc::boxed::Box::new(BlkReq::default()));
    let resp = alloc::boxed::Box::leak(alloc::boxed::Box::new(BlkResp::default()));
    let buf = alloc::boxed::Box::leak(alloc::vec![0u8; 512].into_boxed_slice());
    // SAFETY: the request's buffers are leaked: nothing else ever touches
    // them, whenever (if ever) the device completes the read.
    match unsafe { blk.read_blocks_nb(0, req, buf, resp) } {
        Ok(_) => say!("stall probe: a read on the second disk submitted"),
        Err(e) => say!("stall probe: {e:?}"),
    }
    core::mem::forget(blk);
}

/// Ring 3: the services and the workload, until power-off.
extern "C" fn user_main() -> ! {
    // SAFETY: written once by the kernel before the switch to ring 3.
    let Some(boot) = (unsafe { (*BOOT.get()).take() }) else {
        arch::halt_forever()
    };
    let cmdline = boot.cmdline;
    let (nic, mut store, second_disk) = open_devices(&cmdline);
    if let (Some(ops), Some(s)) = (number(&cmdline, "blk_bench_ops"), store.as_mut()) {
        s.bench(ops, time::now_ns);
    }
    let mut net = nic.and_then(|t| {
        let Some(ip) = cmdline.get("ip").and_then(netconf::parse_cidr) else {
            say!("a NIC but no usable ip=ADDR/LEN: network off");
            return None;
        };
        let gw = cmdline.get("gw").and_then(netconf::parse_ipv4);
        let options = net::Options {
            deterministic_isn: match cmdline.get_bool("deterministic_isn") {
                Some(Ok(on)) => on,
                Some(Err(text)) => {
                    say!("ignoring deterministic_isn={text}: not 0 or 1");
                    false
                }
                None => false,
            },
            dial: cmdline.get("dial").and_then(|text| {
                let target = netconf::parse_endpoint(text);
                if target.is_none() {
                    say!("ignoring dial={text}: not IP:PORT");
                }
                target
            }),
            rdtsc_only: match cmdline.get("rand_source") {
                None | Some("auto") => false,
                Some("rdtsc") => true,
                Some(other) => {
                    say!("ignoring rand_source={other}: not auto or rdtsc");
                    false
                }
            },
        };
        match net::Net::new(t, ip, gw, store, &options, time::now_ns()) {
            Ok(n) => Some(n),
            Err(e) => {
                say!("net: {e:?}");
                None
            }
        }
    });

    let halt_at = number(&cmdline, "halt_after_ms");
    let mut workload = number(&cmdline, "dirty_mib_per_s")
        .filter(|&n| n > 0)
        .and_then(|rate| {
            let (start, end) = boot.free_ram?;
            let want = number(&cmdline, "workload_mib").unwrap_or(DEFAULT_WORKLOAD_MIB) << 20;
            let bytes = want.min(end - start);
            // SAFETY: RAM above the heap is ours alone and identity-mapped.
            let w = unsafe { workload::Workload::new(start, bytes, rate, time::now_ns()) };
            say!(
                "workload {} MiB at {:#x}, {} MiB/s",
                w.pages() * 4096 >> 20,
                start,
                rate
            );
            Some(w)
        });

    // Open the listening sockets before telling anyone we are ready.
    if let Some(n) = net.as_mut() {
        n.poll(time::now_ns());
    }
    let ready_ns = time::now_ns();
    say!("ready");
    if let Some(t) = second_disk.filter(|_| cmdline.words().any(|(w, _)| w == "stall_probe")) {
        stall_probe(t);
    }

    let halt_at = halt_at.map(|ms| ready_ns + ms * NS_PER_MS);
    let mut next_check = ready_ns + CHECK_PERIOD_NS;
    loop {
        let irq_seen = arch::IRQ_COUNT.load(core::sync::atomic::Ordering::SeqCst);
        let now = time::now_ns();
        if halt_at.is_some_and(|t| now >= t) {
            power::off();
        }
        let mut busy = net.as_mut().is_some_and(|n| n.poll(now));
        if let Some(w) = workload.as_mut() {
            // Bounded work per round keeps the network and checks on time.
            w.step(time::now_ns, now + STEP_BUDGET_NS);
            busy = true;
            if now >= next_check {
                next_check += CHECK_PERIOD_NS;
                match w.self_check() {
                    Ok(generation) => say!(
                        "workload generation {generation} ok, {} MiB written",
                        w.written_mib()
                    ),
                    Err(m) => {
                        say!(
                            "selfcheck FAILED page {} word {} expected {:#x} found {:#x}",
                            m.page,
                            m.index,
                            m.expected,
                            m.found
                        );
                        arch::halt_forever();
                    }
                }
            }
        }
        if !busy {
            // Sleeps until a device interrupt or the next timer tick.
            arch::syscall(arch::Syscall::Wait, irq_seen, 0);
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say!("panic: {info}");
    arch::halt_forever()
}
