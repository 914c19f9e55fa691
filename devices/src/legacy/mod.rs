//! Legacy PC devices: the 16550 UART and the i8042 keyboard controller.

mod i8042;
mod serial;

pub use i8042::{I8042Snapshot, I8042};
pub use serial::{EventFdTrigger, Serial, SerialSnapshot};

/// Port of the first serial port (COM1).
pub const COM1_PORT: u64 = 0x3f8;
/// Number of ports a 16550 UART decodes.
pub const COM_PORT_LEN: u64 = 8;
/// IRQ line of COM1.
pub const COM1_IRQ: u32 = 4;
/// Data port of the i8042; the command/status port is 4 above it.
pub const I8042_DATA_PORT: u64 = 0x60;
/// Ports 0x60..=0x64 (0x61-0x63 belong to other devices; the bus range
/// covers them, the device ignores them).
pub const I8042_PORT_LEN: u64 = 5;
