//! The 16550 UART, backed by vm-superio, placed on the port-I/O bus.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::persist::{Persist, PersistError};

/// Raises an interrupt by writing to an eventfd that KVM turned into an
/// irqfd for the device's IRQ line. Clones share the eventfd.
#[derive(Clone)]
pub struct EventFdTrigger(Arc<EventFd>);

impl EventFdTrigger {
    /// Wraps `fd`; the caller registers it with KVM as an irqfd.
    pub fn new(fd: EventFd) -> Self {
        Self(Arc::new(fd))
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Output sink of the guest's serial port that counts the bytes it passes
/// on. Shared, so that a restored UART writes where the old one did.
#[derive(Clone)]
struct CountingWriter {
    out: Arc<Mutex<Box<dyn Write + Send>>>,
    bytes: Arc<AtomicU64>,
}

impl Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = crate::lock(&self.out).write(buf)?;
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        crate::lock(&self.out).flush()
    }
}

/// A 16550 UART whose transmitted bytes go to `out`.
pub struct Serial {
    uart: vm_superio::Serial<EventFdTrigger, vm_superio::serial::NoEvents, CountingWriter>,
    tx_bytes: Arc<AtomicU64>,
    irq: EventFdTrigger,
    writer: CountingWriter,
}

/// The UART's registers and receive FIFO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// The 16550's receive FIFO depth.
const FIFO_SIZE: usize = 64;

impl From<vm_superio::serial::SerialState> for SerialSnapshot {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for vm_superio::serial::SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// Interrupt identification bits vm-superio keeps: "none pending", or any
/// of "transmitter empty" and "data available".
const IIR_NONE: u8 = 0b001;
const IIR_PENDING: u8 = 0b110;

impl Persist for Serial {
    type State = SerialSnapshot;

    fn save(&self) -> SerialSnapshot {
        self.uart.state().into()
    }

    fn validate(&self, s: &SerialSnapshot) -> Result<(), PersistError> {
        if s.in_buffer.len() > FIFO_SIZE {
            return Err(PersistError::Invalid(format!(
                "serial FIFO holds {} bytes, more than {FIFO_SIZE}",
                s.in_buffer.len()
            )));
        }
        let iir = s.interrupt_identification;
        if iir != IIR_NONE && (iir == 0 || iir & !IIR_PENDING != 0) {
            return Err(PersistError::Invalid(format!(
                "serial interrupt identification {iir:#x}"
            )));
        }
        Ok(())
    }

    fn restore(&mut self, s: &SerialSnapshot) -> Result<(), PersistError> {
        self.validate(s)?;
        self.uart = vm_superio::Serial::from_state(
            &s.into(),
            self.irq.clone(),
            vm_superio::serial::NoEvents,
            self.writer.clone(),
        )
        .map_err(|e| PersistError::Invalid(format!("serial: {e}")))?;
        Ok(())
    }
}

impl Serial {
    /// A UART that raises its interrupt through `irq` and writes what the
    /// guest transmits to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> io::Result<Self> {
        let tx_bytes = Arc::new(AtomicU64::new(0));
        let writer = CountingWriter {
            out: Arc::new(Mutex::new(out)),
            bytes: tx_bytes.clone(),
        };
        let irq = EventFdTrigger::new(irq);
        Ok(Self {
            uart: vm_superio::Serial::new(irq.clone(), writer.clone()),
            tx_bytes,
            // Kept for restores, which build a new UART on the same line.
            irq,
            writer,
        })
    }

    /// A shared counter of the bytes the guest has transmitted.
    pub fn tx_bytes(&self) -> Arc<AtomicU64> {
        self.tx_bytes.clone()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(offset), [byte, ..]) = (u8::try_from(offset), data) {
            *byte = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte, ..]) = (u8::try_from(offset), data) {
            if let Err(e) = self.uart.write(offset, *byte) {
                // Losing console output must not stop the guest.
                crate::ratelimit::warn_limited!("serial: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_sink_and_are_counted() {
        let sink = Shared::default();
        let irq = EventFd::new(libc_nonblock()).unwrap();
        let mut serial = Serial::new(irq, Box::new(sink.clone())).unwrap();
        for b in b"hi\n" {
            serial.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        assert_eq!(serial.tx_bytes().load(Ordering::Relaxed), 3);
        // Line status register: transmitter empty and holding register empty.
        let mut lsr = [0u8];
        serial.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }

    #[test]
    fn state_round_trips_and_a_restored_uart_writes_to_the_same_sink() {
        let sink = Shared::default();
        let mut a = Serial::new(
            EventFd::new(libc_nonblock()).unwrap(),
            Box::new(sink.clone()),
        )
        .unwrap();
        a.write(7, &[0x5a]); // scratch register
        a.write(3, &[0x83]); // line control: DLAB
        a.write(0, &[0x01]); // divisor low
        a.write(3, &[0x03]);
        let saved = a.save();
        assert_eq!(
            (saved.scratch, saved.baud_divisor_low, saved.line_control),
            (0x5a, 1, 3)
        );
        let mut b = Serial::new(
            EventFd::new(libc_nonblock()).unwrap(),
            Box::new(sink.clone()),
        )
        .unwrap();
        b.restore(&saved).unwrap();
        assert_eq!(b.save(), saved);
        b.write(0, b"x");
        assert_eq!(&*sink.0.lock().unwrap(), b"x");
        let mut bad = saved.clone();
        bad.in_buffer = vec![0; 65];
        assert!(b.restore(&bad).is_err());
        assert_eq!(b.save(), saved, "a refused state changed the UART");
    }

    #[test]
    fn unknown_interrupt_identification_is_refused() {
        let mut s =
            Serial::new(EventFd::new(libc_nonblock()).unwrap(), Box::new(io::sink())).unwrap();
        let saved = s.save();
        for iir in [0u8, 0x08, 0x03, 0xc1] {
            let mut bad = saved.clone();
            bad.interrupt_identification = iir;
            assert!(s.validate(&bad).is_err(), "{iir:#x}");
            assert!(s.restore(&bad).is_err(), "{iir:#x}");
        }
        for iir in [1u8, 2, 4, 6] {
            let mut good = saved.clone();
            good.interrupt_identification = iir;
            s.validate(&good).unwrap();
        }
        assert_eq!(s.save(), saved);
    }

    fn libc_nonblock() -> i32 {
        vmm_sys_util::eventfd::EFD_NONBLOCK
    }
}
