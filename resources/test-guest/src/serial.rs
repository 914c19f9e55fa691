//! Console output on the 16550 UART at COM1.

use core::fmt::{self, Write};

use crate::arch::{inb, outb};

const COM1: u16 = 0x3f8;
const LINE_STATUS: u16 = COM1 + 5;
const THR_EMPTY: u8 = 1 << 5;

/// Writes bytes to COM1, waiting for the transmitter before each.
pub struct Serial;

impl Serial {
    fn put(&mut self, byte: u8) {
        while inb(LINE_STATUS) & THR_EMPTY == 0 {
            core::hint::spin_loop();
        }
        outb(COM1, byte);
    }
}

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.put(b'\r');
            }
            self.put(b);
        }
        Ok(())
    }
}

/// Prints one line prefixed with `colo-test-guest: ` (the marker prefix
/// tests look for).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::serial::Serial, "colo-test-guest: ");
        let _ = writeln!($crate::serial::Serial, $($arg)*);
    }};
}
