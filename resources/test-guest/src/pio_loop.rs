//! `pio_loop`: port I/O with side effects in a tight ring-0 loop, to show
//! that a pause (and a snapshot, and a restore) never falls between a port
//! access and its completion.
//!
//! COM1 in loopback mode (MCR bit 4) puts every byte written to THR into
//! the receive FIFO, and reading RBR takes it out again. The loop writes a
//! counter byte and reads it straight back: an `out` carried out twice (a
//! state saved with the access done by the VMM but not yet by KVM, then
//! replayed after a restore) leaves an extra byte in the FIFO, an `in`
//! whose result was lost reads the next byte or an empty FIFO. Either shows
//! as a mismatch, reported on the console; every round of checks ends with
//! a progress line. Runs in ring 0 with interrupts off, for good: port I/O
//! from ring 3 is not reliable on the KVM our tests run on.

use crate::arch::{inb, outb};
use crate::say;

const COM1: u16 = 0x3f8;
const MCR: u16 = COM1 + 4;
const LSR: u16 = COM1 + 5;
const MCR_LOOP: u8 = 1 << 4;
const LSR_DATA_READY: u8 = 1;
/// Checks per progress line.
const ROUND: u32 = 100;
/// More than the FIFO holds: draining stops there whatever the UART says.
const DRAIN_MAX: u32 = 256;

/// Runs the loop forever.
pub fn run() -> ! {
    let console_mcr = inb(MCR) & !MCR_LOOP;
    let mut byte: u8 = 0;
    let mut round: u64 = 0;
    say!("pio_loop started");
    loop {
        round += 1;
        outb(MCR, console_mcr | MCR_LOOP);
        let mut bad = None;
        for _ in 0..ROUND {
            byte = byte.wrapping_add(1);
            outb(COM1, byte);
            let got = inb(COM1);
            if got != byte {
                bad = Some(got);
                break;
            }
        }
        // Whatever is left in the FIFO is a byte written twice.
        let mut extra = 0;
        while extra < DRAIN_MAX && inb(LSR) & LSR_DATA_READY != 0 {
            inb(COM1);
            extra += 1;
        }
        outb(MCR, console_mcr);
        match bad {
            None if extra == 0 => say!("pio_loop round {round} ok"),
            _ => say!(
                "pio_loop MISMATCH in round {round}: wrote {byte:#04x}, read {:?}, {extra} bytes left over",
                bad
            ),
        }
    }
}
