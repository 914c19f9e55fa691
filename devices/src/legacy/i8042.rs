//! A minimal i8042 keyboard controller.
//!
//! The guest uses it for one thing that matters to the VMM: a reset through
//! command 0xfe (pulse the CPU reset line), which is how Linux with
//! `reboot=k` and our test guest ask to be powered off. The VMM turns that
//! into a clean exit. Enough of the controller protocol is answered (self
//! test, command byte, port tests) for a guest driver to probe it without
//! timeouts; no keyboard or mouse is attached.

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Offset of the data port (0x60) in the device range.
const DATA: u64 = 0;
/// Offset of the status/command port (0x64) in the device range.
const COMMAND: u64 = 4;

/// Status register bits.
const SB_OUT_FULL: u8 = 1 << 0;
const SB_SYSTEM: u8 = 1 << 2;
const SB_LAST_WAS_COMMAND: u8 = 1 << 3;
/// Set while the keyboard is not inhibited (the "keylock" switch is open).
const SB_KEYLOCK_OPEN: u8 = 1 << 4;

/// Every status bit the controller sets.
const SB_KNOWN: u8 = SB_OUT_FULL | SB_SYSTEM | SB_LAST_WAS_COMMAND | SB_KEYLOCK_OPEN;
/// Bytes the output buffer holds at most.
const OUT_MAX: usize = 16;

/// Controller commands we answer.
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_PULSE_RESET: u8 = 0xfe;

/// Command byte bits.
const CTR_KBD_DISABLED: u8 = 1 << 4;
const CTR_AUX_DISABLED: u8 = 1 << 5;

const SELF_TEST_OK: u8 = 0x55;
const PORT_TEST_OK: u8 = 0x00;

/// The controller's registers and output buffer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042Snapshot {
    pub status: u8,
    pub ctr: u8,
    pub out: Vec<u8>,
    pub pending: Option<u8>,
}

impl crate::Persist for I8042 {
    type State = I8042Snapshot;

    fn save(&self) -> I8042Snapshot {
        I8042Snapshot {
            status: self.status,
            ctr: self.ctr,
            out: self.out.iter().copied().collect(),
            pending: self.pending,
        }
    }

    fn validate(&self, s: &I8042Snapshot) -> Result<(), crate::PersistError> {
        use crate::PersistError::Invalid;
        if s.out.len() > OUT_MAX {
            return Err(Invalid(format!(
                "i8042 output buffer of {} bytes",
                s.out.len()
            )));
        }
        if s.status & !SB_KNOWN != 0 {
            return Err(Invalid(format!("i8042 status {:#x}", s.status)));
        }
        if (s.status & SB_OUT_FULL != 0) == s.out.is_empty() {
            return Err(Invalid(format!(
                "i8042 status {:#x} with {} output bytes",
                s.status,
                s.out.len()
            )));
        }
        match s.pending {
            None | Some(CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT) => Ok(()),
            Some(cmd) => Err(Invalid(format!("i8042 waits for data of command {cmd:#x}"))),
        }
    }

    fn restore(&mut self, s: &I8042Snapshot) -> Result<(), crate::PersistError> {
        self.validate(s)?;
        self.status = s.status;
        self.ctr = s.ctr;
        self.out = s.out.iter().copied().collect();
        self.pending = s.pending;
        Ok(())
    }
}

/// The i8042 controller. `reset_evt` is written when the guest resets the CPU.
pub struct I8042 {
    status: u8,
    ctr: u8,
    out: VecDeque<u8>,
    /// A controller command that takes a data byte, waiting for it.
    pending: Option<u8>,
    reset_evt: EventFd,
}

impl I8042 {
    /// A controller that signals guest resets on `reset_evt`.
    pub fn new(reset_evt: EventFd) -> Self {
        Self {
            status: SB_SYSTEM | SB_KEYLOCK_OPEN,
            // Interrupts off, system flag, translation on.
            ctr: 0x44 | CTR_AUX_DISABLED,
            out: VecDeque::new(),
            pending: None,
            reset_evt,
        }
    }

    fn push(&mut self, byte: u8) {
        // A real controller holds one byte; a few suffice for any sequence
        // of commands a driver sends without reading in between.
        if self.out.len() < OUT_MAX {
            self.out.push_back(byte);
        }
        self.status |= SB_OUT_FULL;
    }

    fn reset_cpu(&mut self) {
        tracing::info!("i8042: guest requested a CPU reset");
        if let Err(e) = self.reset_evt.write(1) {
            tracing::error!("i8042: cannot signal reset: {e}");
        }
    }

    fn command(&mut self, cmd: u8) {
        self.status |= SB_LAST_WAS_COMMAND;
        match cmd {
            CMD_READ_CTR => self.push(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT => self.pending = Some(cmd),
            CMD_DISABLE_AUX => self.ctr |= CTR_AUX_DISABLED,
            CMD_ENABLE_AUX => self.ctr &= !CTR_AUX_DISABLED,
            CMD_TEST_AUX | CMD_TEST_KBD => self.push(PORT_TEST_OK),
            CMD_SELF_TEST => {
                self.status |= SB_SYSTEM;
                self.push(SELF_TEST_OK);
            }
            CMD_DISABLE_KBD => self.ctr |= CTR_KBD_DISABLED,
            CMD_ENABLE_KBD => self.ctr &= !CTR_KBD_DISABLED,
            CMD_PULSE_RESET => self.reset_cpu(),
            other => tracing::debug!("i8042: ignoring command {other:#x}"),
        }
    }

    fn data(&mut self, byte: u8) {
        self.status &= !SB_LAST_WAS_COMMAND;
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = byte,
            // Bit 0 of the output port drives the CPU reset line (active low).
            Some(CMD_WRITE_OUTPUT_PORT) if byte & 1 == 0 => self.reset_cpu(),
            // No keyboard is attached: bytes for it go nowhere.
            _ => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(byte) = data.first_mut() else { return };
        match offset {
            DATA => {
                *byte = self.out.pop_front().unwrap_or(0);
                if self.out.is_empty() {
                    self.status &= !SB_OUT_FULL;
                }
            }
            COMMAND => *byte = self.status,
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        match offset {
            DATA => self.data(byte),
            COMMAND => self.command(byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn controller() -> I8042 {
        I8042::new(EventFd::new(EFD_NONBLOCK).unwrap())
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn pulse_reset_signals_the_vmm() {
        let mut dev = controller();
        assert!(dev.reset_evt.read().is_err(), "no reset before the command");
        dev.write(COMMAND, &[CMD_PULSE_RESET]);
        assert_eq!(dev.reset_evt.read().unwrap(), 1);
    }

    #[test]
    fn output_port_reset_line_signals_the_vmm() {
        let mut dev = controller();
        dev.write(COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(DATA, &[0xfe]);
        assert_eq!(dev.reset_evt.read().unwrap(), 1);
    }

    #[test]
    fn self_test_and_command_byte_round_trip() {
        let mut dev = controller();
        assert_eq!(read(&mut dev, COMMAND) & SB_OUT_FULL, 0);
        dev.write(COMMAND, &[CMD_SELF_TEST]);
        assert_ne!(read(&mut dev, COMMAND) & SB_OUT_FULL, 0);
        assert_eq!(read(&mut dev, DATA), SELF_TEST_OK);
        assert_eq!(read(&mut dev, COMMAND) & SB_OUT_FULL, 0);

        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(DATA, &[0x61]);
        dev.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA), 0x61);
        assert!(
            dev.reset_evt.read().is_err(),
            "no reset from ordinary commands"
        );
    }

    #[test]
    fn inconsistent_states_are_refused_and_change_nothing() {
        use crate::Persist;
        let mut dev = controller();
        dev.write(COMMAND, &[CMD_SELF_TEST]);
        let saved = dev.save();
        dev.validate(&saved).unwrap();
        let bad = [
            I8042Snapshot {
                out: vec![0; 17],
                ..saved.clone()
            },
            I8042Snapshot {
                out: vec![],
                ..saved.clone()
            },
            I8042Snapshot {
                status: saved.status | 0x80,
                ..saved.clone()
            },
            I8042Snapshot {
                pending: Some(CMD_SELF_TEST),
                ..saved.clone()
            },
        ];
        let mut other = controller();
        let before = other.save();
        for s in &bad {
            assert!(other.validate(s).is_err(), "{s:?}");
            assert!(other.restore(s).is_err(), "{s:?}");
            assert_eq!(other.save(), before);
        }
        other.restore(&saved).unwrap();
        assert_eq!(read(&mut other, DATA), SELF_TEST_OK);
    }
}
