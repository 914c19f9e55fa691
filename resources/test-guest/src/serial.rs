//! Console output on the 16550 UART at COM1.

use core::fmt::{self, Write};

use crate::arch::{inb, outb};

const COM1: u16 = 0x3f8;
const LINE_STATUS: u16 = COM1 + 5;
const THR_EMPTY: u8 = 1 << 5;

/// Writes bytes to COM1 from ring 0, waiting for the transmitter before each.
pub fn write_bytes(bytes: &[u8]) {
    for &b in bytes {
        if b == b'\n' {
            put(b'\r');
        }
        put(b);
    }
}

fn put(byte: u8) {
    while inb(LINE_STATUS) & THR_EMPTY == 0 {
        core::hint::spin_loop();
    }
    outb(COM1, byte);
}

/// The console: port I/O in ring 0, a system call in ring 3 (where `out`
/// faults).
pub struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if crate::arch::in_user_mode() {
            crate::arch::syscall(
                crate::arch::Syscall::Write,
                s.as_ptr() as u64,
                s.len() as u64,
            );
        } else {
            write_bytes(s.as_bytes());
        }
        Ok(())
    }
}

/// A line being formatted, written with one call (one system call in ring 3).
pub struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    pub const fn new() -> Self {
        Self {
            buf: [0; 256],
            len: 0,
        }
    }

    /// Writes the line out (truncated to 256 bytes).
    pub fn flush(&mut self) {
        let s = core::str::from_utf8(&self.buf[..self.len]).unwrap_or("<bad utf-8>\n");
        let _ = Serial.write_str(s);
        self.len = 0;
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Prints one line prefixed with `colo-test-guest: ` (the marker prefix
/// tests look for).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut line = $crate::serial::Line::new();
        let _ = write!(line, "colo-test-guest: ");
        let _ = writeln!(line, $($arg)*);
        line.flush();
    }};
}
