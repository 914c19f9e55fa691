//! Fuzz target bodies, shared by the cargo-fuzz targets in `fuzz/` (feature
//! `fuzzing`) and by a short deterministic run in the unit tests.
//!
//! Each target takes arbitrary bytes and drives a device the way a hostile
//! guest or a hostile snapshot would:
//! - [`virtio_blk`]: virtio-blk request chains through [`DriverSim`], with
//!   raw pokes into the rings;
//! - [`mmio`]: register reads and writes of any width and offset on a
//!   virtio-mmio transport (block or net), rings in fuzzed memory;
//! - [`restore`]: `postcard` bytes decoded into each device's saved state,
//!   validated, restored, and the device run.
//!
//! Besides "no panic", they check the invariants the rest of the VMM relies
//! on: the disk is only touched within its capacity and through the bounded
//! buffer, `validate` and `restore` agree, a refused state changes nothing,
//! and every state a device reaches validates (a snapshot taken at any
//! moment restores).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed check is a finding

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::legacy::{Serial, I8042};
use crate::virtio::block::{BlockBackend, BOUNCE_LEN, SECTOR_SIZE};
use crate::virtio::mmio::{MmioTransport, TransportSnapshot};
use crate::virtio::testing::{guest_memory, live_transport, DriverSim, MEM_SIZE, QUEUE_BASE};
use crate::virtio::{Block, Net, NetBackend, VirtioDevice};
use crate::{BusDevice, Persist};

/// Reads fuzz input as numbers; zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }
    fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | u16::from(self.u8()) << 8
    }
    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
}

/// A disk in memory that fails the run when the device reads or writes
/// outside it, more than the bounce buffer at once, or writes a read-only
/// disk.
struct MemDisk {
    bytes: Vec<u8>,
    read_only: bool,
}

impl MemDisk {
    fn new(sectors: u64, read_only: bool) -> Self {
        Self {
            bytes: vec![0x5a; (sectors * SECTOR_SIZE) as usize],
            read_only,
        }
    }
    fn range(&self, offset: u64, len: usize) -> std::ops::Range<usize> {
        assert!(len <= BOUNCE_LEN, "{len} bytes at once");
        let start = usize::try_from(offset).unwrap();
        let end = start.checked_add(len).unwrap();
        assert!(end <= self.bytes.len(), "{start}..{end} past the disk");
        start..end
    }
}

impl BlockBackend for MemDisk {
    fn capacity(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = self.range(offset, buf.len());
        buf.copy_from_slice(&self.bytes[r]);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        assert!(!self.read_only, "write to a read-only disk");
        let r = self.range(offset, buf.len());
        self.bytes[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn id(&self) -> &[u8] {
        b"fuzz"
    }
}

/// A network backend with frames the input chose; sends go nowhere.
#[derive(Default)]
struct Frames(VecDeque<Vec<u8>>);

impl NetBackend for Frames {
    fn fd(&self) -> Option<RawFd> {
        None
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.pop_front() {
            Some(f) => {
                let n = f.len().min(buf.len());
                buf[..n].copy_from_slice(&f[..n]);
                Ok(n)
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
    fn send(&mut self, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
}

fn block_device(input: &mut Input<'_>) -> Box<dyn VirtioDevice> {
    let read_only = input.u8() & 1 != 0;
    Box::new(Block::new(Box::new(MemDisk::new(64, read_only))))
}

fn net_device(input: &mut Input<'_>) -> Box<dyn VirtioDevice> {
    let mut frames = Frames::default();
    for _ in 0..input.u8() % 4 {
        let len = usize::from(input.u16() % 2048);
        frames.0.push_back(input.bytes(len).to_vec());
    }
    Box::new(Net::new(Box::new(frames), [2, 0, 0, 0, 0, 1]).unwrap())
}

/// An address in or just past the 1 MiB test memory.
fn addr(input: &mut Input<'_>) -> u64 {
    match input.u8() % 4 {
        0 => u64::from(input.u32()) % (MEM_SIZE as u64 + 0x2000),
        1 => input.u64(),
        _ => u64::from(input.u16()) << 4,
    }
}

/// Checks that a state the device is in would restore.
fn assert_state_restores(t: &MmioTransport) {
    let s = t.save();
    if let Err(e) = t.validate(&s) {
        panic!("the device's own state is refused: {e}\n{s:?}");
    }
}

/// virtio-blk requests, well-formed or not, with pokes into the rings.
pub fn virtio_blk(data: &[u8]) {
    let mut input = Input(data);
    let device = block_device(&mut input);
    let mut t = live_transport(device, guest_memory(), 1 << VIRTIO_F_VERSION_1, 1);
    for _ in 0..64 {
        if input.is_empty() {
            break;
        }
        let mem = DriverSim::new(&mut t).mem().clone();
        match input.u8() % 4 {
            0 | 1 => {
                let kind = match input.u8() % 5 {
                    0 => VIRTIO_BLK_T_IN,
                    1 => VIRTIO_BLK_T_OUT,
                    2 => VIRTIO_BLK_T_FLUSH,
                    3 => VIRTIO_BLK_T_GET_ID,
                    _ => input.u32(),
                };
                let sector = match input.u8() % 2 {
                    0 => u64::from(input.u8()),
                    _ => input.u64(),
                };
                let header = addr(&mut input);
                let mut h = [0u8; 16];
                h[..4].copy_from_slice(&kind.to_le_bytes());
                h[8..].copy_from_slice(&sector.to_le_bytes());
                let _ = mem.write_slice(&h, GuestAddress(header));
                let mut chain = vec![(header, 16, input.u8() % 8 == 0)];
                for _ in 0..input.u8() % 3 {
                    let len = match input.u8() % 3 {
                        0 => u32::from(input.u16()),
                        1 => input.u32(),
                        _ => 512 * u32::from(input.u8() % 8),
                    };
                    chain.push((addr(&mut input), len, input.u8() & 1 != 0));
                }
                chain.push((addr(&mut input), 1, input.u8() % 8 != 0));
                DriverSim::new(&mut t).add_buffer(0, &chain);
                t.process_queue(0);
            }
            2 => {
                let at = QUEUE_BASE + u64::from(input.u16() % 0x3000);
                let len = usize::from(input.u8() % 16);
                let _ = mem.write_slice(input.bytes(len), GuestAddress(at));
                t.process_queue(0);
            }
            _ => t.kick(),
        }
        assert_state_restores(&t);
    }
}

/// Register accesses of any width at any offset of a virtio-mmio window.
pub fn mmio(data: &[u8]) {
    let mut input = Input(data);
    let device = if input.u8() & 1 == 0 {
        block_device(&mut input)
    } else {
        net_device(&mut input)
    };
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(device, guest_memory(), irq).unwrap();
    let mem = DriverSim::new(&mut t).mem().clone();
    for _ in 0..256 {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        let offset = match op >> 6 {
            0 => u64::from(input.u8() & 0x3f) * 4,
            1 => 0x100 + u64::from(input.u8()),
            _ => u64::from(input.u16() % 0x1100),
        };
        match op % 8 {
            0..=3 => t.write(offset, &input.u32().to_le_bytes()),
            4 => {
                let len = usize::from(input.u8() % 9);
                let bytes = input.bytes(len).to_vec();
                t.write(offset, &bytes);
            }
            5 => {
                let mut buf = vec![0u8; usize::from(input.u8() % 9)];
                t.read(offset, &mut buf);
            }
            6 => {
                let at = addr(&mut input);
                let len = usize::from(input.u8() % 32);
                let _ = mem.write_slice(input.bytes(len), GuestAddress(at));
            }
            _ => {
                t.kick();
                t.process_backend();
            }
        }
        assert_state_restores(&t);
    }
}

/// Decodes `bytes` as a `T` (postcard), or, when `base` is given, decodes
/// `base`'s encoding with a few bytes changed: `bytes` are (position,
/// XOR) pairs. Most such inputs still decode, so the fuzzer reaches the
/// checks behind decoding.
fn decode<T: serde::Serialize + serde::de::DeserializeOwned>(
    base: Option<&T>,
    bytes: &[u8],
) -> Option<T> {
    match base {
        None => postcard::from_bytes(bytes).ok(),
        Some(b) => {
            let mut enc = postcard::to_stdvec(b).ok()?;
            let len = enc.len();
            for pair in bytes.chunks_exact(2).take(8) {
                enc[usize::from(pair[0]) % len] ^= pair[1];
            }
            postcard::from_bytes(&enc).ok()
        }
    }
}

/// `validate` and `restore` agree; a refused state changes nothing.
fn check_restore<D: Persist>(dev: &mut D, state: &D::State)
where
    D::State: PartialEq,
{
    let before = dev.save();
    let valid = dev.validate(state);
    let restored = dev.restore(state);
    assert_eq!(valid.is_ok(), restored.is_ok(), "{valid:?} vs {restored:?}");
    if restored.is_err() {
        assert!(dev.save() == before, "a refused state changed the device");
    }
}

/// Queue `q` is laid out as [`DriverSim`] does it, in guest memory.
fn sim_layout(q: &virtio_queue::Queue, mem: &crate::virtio::GuestMemoryMmap) -> bool {
    let base = q.desc_table();
    q.ready()
        && q.avail_ring() == base.wrapping_add(0x1000)
        && q.used_ring() == base.wrapping_add(0x2000)
        && crate::virtio::in_memory(mem, GuestAddress(base), 0x3000)
}

/// A live transport over `device` that has served some requests.
fn used_transport(device: Box<dyn VirtioDevice>, features: u64, queues: u16) -> MmioTransport {
    let mut t = live_transport(device, guest_memory(), features, queues);
    let mut sim = DriverSim::new(&mut t);
    sim.add_buffer(0, &[(0x1000, 2048, true)]);
    t.kick();
    t
}

/// Saved device states from arbitrary bytes: validated, restored, run.
pub fn restore(data: &[u8]) {
    let mut input = Input(data);
    let kind = input.u8();
    let mutate = kind & 0x80 != 0;
    match kind % 4 {
        0 | 1 => {
            let (device, features, queues) = if kind % 4 == 0 {
                (block_device(&mut input), 1 << VIRTIO_F_VERSION_1, 1)
            } else {
                let f = (1 << VIRTIO_F_VERSION_1)
                    | (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MAC);
                (net_device(&mut input), f, 2)
            };
            let mut t = used_transport(device, features, queues);
            let base = t.save();
            let Some(state) = decode::<TransportSnapshot>(mutate.then_some(&base), input.0) else {
                return;
            };
            check_restore(&mut t, &state);
            // Run what was restored: the driver adds a buffer where the
            // restored rings are where DriverSim lays them out (a restored
            // state may keep them anywhere, even outside memory when the
            // device is not live or needs a reset).
            let mem = DriverSim::new(&mut t).mem().clone();
            if sim_layout(&t.queues[0], &mem) {
                DriverSim::new(&mut t).add_buffer(0, &[(0x2000, 2048, true)]);
            }
            t.kick();
            for q in 0..queues {
                t.process_queue(usize::from(q));
            }
            let mut reg = [0u8; 4];
            for offset in (0..0x100).step_by(4) {
                t.read(offset, &mut reg);
            }
            assert_state_restores(&t);
        }
        2 => {
            let irq = EventFd::new(EFD_NONBLOCK).unwrap();
            let mut s = Serial::new(irq, Box::new(io::sink())).unwrap();
            let base = s.save();
            let Some(state) = decode(mutate.then_some(&base), input.0) else {
                return;
            };
            check_restore(&mut s, &state);
            let mut b = [0u8];
            for offset in 0..8 {
                s.read(offset, &mut b);
                s.write(offset, &[0x41]);
            }
            s.validate(&s.save()).expect("the UART's own state");
        }
        _ => {
            let mut dev = I8042::new(EventFd::new(EFD_NONBLOCK).unwrap());
            let base = dev.save();
            let Some(state) = decode(mutate.then_some(&base), input.0) else {
                return;
            };
            check_restore(&mut dev, &state);
            let mut b = [0u8];
            for offset in [0, 4] {
                dev.read(offset, &mut b);
                dev.write(4, &[0x20]);
            }
            dev.validate(&dev.save()).expect("the i8042's own state");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// xorshift64*: reproducible inputs without a dependency.
    fn inputs(seed: u64, count: usize) -> impl Iterator<Item = Vec<u8>> {
        let mut x = seed;
        let mut next = move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        (0..count).map(move |_| {
            let len = (next() % 512) as usize;
            (0..len).map(|_| next() as u8).collect()
        })
    }

    /// Inputs that once failed a target, kept under fuzz/regressions/.
    fn regressions(target: &str) -> Vec<Vec<u8>> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/regressions")
            .join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        entries
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect()
    }

    fn run(target: &str, f: fn(&[u8]), seed: u64) {
        for input in regressions(target) {
            f(&input);
        }
        for input in inputs(seed, 1500) {
            f(&input);
        }
    }

    #[test]
    fn virtio_blk_short_run() {
        run("virtio_blk", virtio_blk, 1);
    }

    #[test]
    fn mmio_short_run() {
        run("mmio", mmio, 2);
    }

    #[test]
    fn restore_short_run() {
        run("restore", restore, 3);
        // Half the inputs mutate a real state (high bit of the first byte).
        for mut input in inputs(4, 1500) {
            if let Some(b) = input.first_mut() {
                *b |= 0x80;
            }
            restore(&input);
        }
    }
}
