//! The 16550 UART, backed by vm-superio, placed on the port-I/O bus.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Raises an interrupt by writing to an eventfd that KVM turned into an
/// irqfd for the device's IRQ line.
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `fd`; the caller registers it with KVM as an irqfd.
    pub fn new(fd: EventFd) -> Self {
        Self(fd)
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Output sink of the guest's serial port that counts the bytes it passes on.
struct CountingWriter {
    out: Box<dyn Write + Send>,
    bytes: Arc<AtomicU64>,
}

impl Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// A 16550 UART whose transmitted bytes go to `out`.
pub struct Serial {
    uart: vm_superio::Serial<EventFdTrigger, vm_superio::serial::NoEvents, CountingWriter>,
    tx_bytes: Arc<AtomicU64>,
}

impl Serial {
    /// A UART that raises its interrupt through `irq` and writes what the
    /// guest transmits to `out`.
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        let tx_bytes = Arc::new(AtomicU64::new(0));
        let writer = CountingWriter {
            out,
            bytes: tx_bytes.clone(),
        };
        Self {
            uart: vm_superio::Serial::new(irq, writer),
            tx_bytes,
        }
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
                tracing::warn!("serial: {e}");
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
        let irq = EventFdTrigger::new(EventFd::new(libc_nonblock()).unwrap());
        let mut serial = Serial::new(irq, Box::new(sink.clone()));
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

    fn libc_nonblock() -> i32 {
        vmm_sys_util::eventfd::EFD_NONBLOCK
    }
}
