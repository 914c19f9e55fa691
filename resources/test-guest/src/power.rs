//! Powering off: the i8042's "pulse reset line" command, which the VMM
//! (and Linux's `reboot=k`) treat as the end of the VM.

use crate::arch::{halt_forever, in_user_mode, outb, syscall, Syscall};

const I8042_COMMAND: u16 = 0x64;
const PULSE_RESET: u8 = 0xfe;

pub fn off() -> ! {
    if in_user_mode() {
        syscall(Syscall::PowerOff, 0, 0);
    }
    crate::say!("poweroff");
    outb(I8042_COMMAND, PULSE_RESET);
    halt_forever()
}
