//! An address bus that dispatches guest port-I/O or MMIO accesses to devices.
//!
//! A device claims a range `[base, base + len)`; an access at `addr` reaches
//! the device whose range holds it, with `addr - base` as offset. Ranges never
//! overlap. Two buses exist per VM: one for port I/O, one for MMIO.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers guest reads and writes within its bus range.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` into the device range.
    /// The device fills `data`; bytes it leaves alone read as zero.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` into the device range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared, lockable device as the bus holds it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors from placing devices on a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range has length zero or wraps around the address space.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange { base: u64, len: u64 },
    /// The range overlaps a range that another device already holds.
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// Address bus: non-overlapping ranges, each owned by one device.
#[derive(Clone, Default)]
pub struct Bus {
    /// Keyed by range base.
    entries: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        // The nearest range starting below `end` is the only one that can overlap.
        if let Some((&other, entry)) = self.entries.range(..end).next_back() {
            if other + entry.len > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        self.entries.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device holding `addr` and the offset of `addr` inside its range.
    fn resolve(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (&base, entry) = self.entries.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < entry.len).then_some((offset, &entry.device))
    }

    /// Dispatches a guest read. Returns false when no device holds `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                data.fill(0);
                lock(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest write. Returns false when no device holds `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device (or any state shared with one), recovering it if a
/// thread panicked while holding it: the device state is still the best we
/// have, and a panic is reported elsewhere.
pub fn lock<T: ?Sized>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last write and answers reads with its offset.
    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data[0] = offset as u8;
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let a = Arc::new(Mutex::new(Probe::default()));
        let b = Arc::new(Mutex::new(Probe::default()));
        let mut bus = Bus::new();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x60, 1).unwrap();

        let mut data = [0xaa; 2];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5, 0]);
        assert!(bus.write(0x60, &[7]));
        assert_eq!(b.lock().unwrap().last_write, Some((0, vec![7])));
        assert!(a.lock().unwrap().last_write.is_none());

        assert!(!bus.read(0x400, &mut data));
        assert!(!bus.write(0x3f7, &[1]));
        assert!(!bus.write(0x61, &[1]));
    }

    #[test]
    fn refuses_overlaps_and_empty_ranges() {
        let dev = || -> SharedDevice { Arc::new(Mutex::new(Probe::default())) };
        let mut bus = Bus::new();
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1,
                other: 0x100
            })
        );
        assert_eq!(
            bus.insert(dev(), 0xf8, 0x9),
            Err(BusError::Overlap {
                base: 0xf8,
                len: 9,
                other: 0x100
            })
        );
        assert_eq!(
            bus.insert(dev(), 0x200, 0),
            Err(BusError::InvalidRange {
                base: 0x200,
                len: 0
            })
        );
        assert_eq!(
            bus.insert(dev(), u64::MAX, 2),
            Err(BusError::InvalidRange {
                base: u64::MAX,
                len: 2
            })
        );
        // Adjacent ranges are fine.
        bus.insert(dev(), 0xf0, 0x10).unwrap();
        bus.insert(dev(), 0x110, 0x10).unwrap();
    }
}
