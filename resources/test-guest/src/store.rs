//! The key-value store on the virtio-blk disk, in the log format of
//! `colo_test_guest::kv`. An in-memory index maps each key to its newest
//! record; values are read back from the disk.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;

use colo_test_guest::kv::{self, Header, KvError, SECTOR};
use virtio_drivers::device::blk::VirtIOBlk;

use crate::virtio::{GuestHal, Mmio};

/// Why a value was not stored.
pub enum PutError {
    BadKey,
    TooLong,
    Full,
    /// The device answered the write or flush with an error.
    Disk,
}

/// Where a key's newest record is.
struct Slot {
    sector: u64,
    header: Header,
}

/// The store.
pub struct Store {
    blk: VirtIOBlk<GuestHal, Mmio>,
    index: BTreeMap<Vec<u8>, Slot>,
    next_sector: u64,
    next_seq: u32,
    capacity: u64,
}

impl Store {
    /// Opens the disk and replays its log.
    pub fn open(transport: Mmio) -> Result<Self, virtio_drivers::Error> {
        let blk = VirtIOBlk::new(transport)?;
        let capacity = blk.capacity();
        let mut store = Self {
            blk,
            index: BTreeMap::new(),
            next_sector: kv::LOG_START_SECTOR,
            next_seq: 1,
            capacity,
        };
        store.replay();
        crate::say!(
            "disk {} sectors{}, {} kv records, log ends at sector {}",
            capacity,
            if store.read_only() { " read-only" } else { "" },
            store.index.len(),
            store.next_sector
        );
        Ok(store)
    }

    fn read(&mut self, sector: u64, sectors: u64) -> Option<Vec<u8>> {
        if sector + sectors > self.capacity {
            return None;
        }
        let mut buf = vec![0u8; sectors as usize * SECTOR];
        self.blk.read_blocks(sector as usize, &mut buf).ok()?;
        Some(buf)
    }

    fn replay(&mut self) {
        while let Some(first) = self.read(self.next_sector, 1) {
            let Some(header) = Header::parse(&first) else {
                break;
            };
            let Some(record) = self.read(self.next_sector, header.sectors()) else {
                break;
            };
            let Some((key, _)) = header.verify(&record) else {
                break;
            };
            self.index.insert(
                key.to_vec(),
                Slot {
                    sector: self.next_sector,
                    header,
                },
            );
            self.next_sector += header.sectors();
            self.next_seq = header.seq.wrapping_add(1);
        }
    }

    /// Benchmark: `ops` random 4 KiB reads, then `ops` random 4 KiB
    /// writes (no flush), over the whole disk; prints the time of each.
    /// Destroys the disk's contents: for benchmark disks only.
    pub fn bench(&mut self, ops: u64, now_ns: fn() -> u64) {
        const BLOCK: usize = 4096;
        let blocks = self.capacity / (BLOCK / SECTOR) as u64;
        if blocks == 0 {
            return;
        }
        let mut buf = vec![0u8; BLOCK];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            // xorshift64: a fixed sequence, so runs are comparable.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % blocks) as usize * (BLOCK / SECTOR)
        };
        let start = now_ns();
        let mut errors = 0;
        for _ in 0..ops {
            errors += u64::from(self.blk.read_blocks(next(), &mut buf).is_err());
        }
        let read_ns = now_ns() - start;
        let start = now_ns();
        for _ in 0..ops {
            errors += u64::from(self.blk.write_blocks(next(), &buf).is_err());
        }
        let write_ns = now_ns() - start;
        crate::say!(
            "blk bench 4k ops {ops} randread_us {} randwrite_us {} errors {errors}",
            read_ns / 1000,
            write_ns / 1000
        );
    }

    /// The disk refuses writes.
    pub fn read_only(&self) -> bool {
        self.blk.readonly()
    }

    /// Number of keys stored.
    pub fn records(&self) -> usize {
        self.index.len()
    }

    /// Appends a record for `key` and flushes it.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), PutError> {
        let record = kv::encode(self.next_seq, key, value).map_err(|e| match e {
            KvError::BadKey => PutError::BadKey,
            KvError::ValueTooLong => PutError::TooLong,
        })?;
        let sectors = (record.len() / SECTOR) as u64;
        if self.next_sector + sectors > self.capacity {
            return Err(PutError::Full);
        }
        // A read-only disk is written anyway: the device must refuse it.
        self.blk
            .write_blocks(self.next_sector as usize, &record)
            .map_err(|_| PutError::Disk)?;
        self.blk.flush().map_err(|_| PutError::Disk)?;
        let header = Header::parse(&record).ok_or(PutError::Disk)?;
        self.index.insert(
            key.to_vec(),
            Slot {
                sector: self.next_sector,
                header,
            },
        );
        self.next_sector += sectors;
        self.next_seq = self.next_seq.wrapping_add(1);
        Ok(())
    }

    /// The value of `key`, read back from the disk and verified.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, ()> {
        let Some(slot) = self.index.get(key) else {
            return Ok(None);
        };
        let (sector, header) = (slot.sector, slot.header);
        let record = self.read(sector, header.sectors()).ok_or(())?;
        let (_, value) = header.verify(&record).ok_or(())?;
        Ok(Some(value.to_vec()))
    }
}
