//! virtio-net: a receive and a transmit queue over a [`NetBackend`].
//!
//! The backend deals in plain Ethernet frames; the device adds the 12-byte
//! `virtio_net_hdr_v1` (no offloads: all zero, `num_buffers` 1) on receive
//! and strips it on transmit. That keeps the frames the COLO proxy sees
//! free of virtio details.
//!
//! Receive is edge-triggered: the device reads the backend until it would
//! block or the guest has no buffer left; a frame that found no buffer
//! waits in the device until the driver adds one and notifies.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{DeviceCounters, GuestMemoryMmap, Processed, VirtioDevice};
use crate::ratelimit::warn_limited;

/// Length of `struct virtio_net_hdr_v1`.
pub const NET_HDR_LEN: usize = 12;
/// Largest frame the device moves (no offloads are offered, so frames are
/// bounded by the tap's MTU; this leaves room for jumbo frames).
pub const MAX_FRAME_LEN: usize = 65536;
const MIN_FRAME_LEN: usize = 14;
const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZES: &[u16] = &[256, 256];

/// Where a virtio-net device's frames come from and go to. `vmm` puts the
/// COLO proxy here; [`super::Tap`] is the plain one.
pub trait NetBackend: Send {
    /// A file descriptor that becomes readable (edge-triggered) when frames
    /// arrive, if the backend has one.
    fn fd(&self) -> Option<RawFd>;
    /// Receives one frame into `buf` and returns its length.
    ///
    /// `Ok(0)` and `ErrorKind::WouldBlock` both mean "no frame now" (a
    /// socket at end of file, or nothing waiting): the device stops reading
    /// until the backend's fd becomes readable again or the driver adds rx
    /// buffers. A frame shorter than an Ethernet header is counted as an
    /// error and dropped. `ErrorKind::Interrupted` is retried; any other
    /// error ends this round of receiving.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one frame.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
}

/// A backend handed over by another thread, waiting for the device
/// thread.
struct SwapSlot {
    next: std::sync::Mutex<Option<Box<dyn NetBackend>>>,
    evt: EventFd,
}

/// A handle through which any thread replaces a [`Net`] device's backend
/// at run time (failover switches a NIC from the replication path to its
/// tap). The device thread makes the switch: it stops watching the old
/// backend's fd, watches the new one, drops the old backend, and reads the
/// new one at once. A received frame still waiting for a guest buffer is
/// kept. Cheap to clone; get one with [`Net::backend_swap`] before the
/// device goes behind its transport.
#[derive(Clone)]
pub struct BackendSwap(Arc<SwapSlot>);

impl BackendSwap {
    /// Hands `backend` to the device thread; returns at once. When called
    /// again before the device thread took the previous one, the latest
    /// backend wins and the earlier one is dropped.
    pub fn swap(&self, backend: Box<dyn NetBackend>) -> io::Result<()> {
        *crate::lock(&self.0.next) = Some(backend);
        self.0.evt.write(1)
    }
}

/// A virtio-net device.
pub struct Net {
    backend: Box<dyn NetBackend>,
    swap: Arc<SwapSlot>,
    mac: [u8; 6],
    counters: Arc<DeviceCounters>,
    /// Header + frame of a received frame still waiting for a guest buffer
    /// (`rx_len` bytes; 0 when none waits).
    rx_buf: Vec<u8>,
    rx_len: usize,
    tx_buf: Vec<u8>,
}

impl Net {
    /// A device with MAC address `mac` over `backend`; fails only when no
    /// eventfd can be made for backend swaps.
    pub fn new(backend: Box<dyn NetBackend>, mac: [u8; 6]) -> io::Result<Self> {
        let mut rx_buf = vec![0u8; NET_HDR_LEN + MAX_FRAME_LEN];
        // num_buffers = 1; every other header field stays zero.
        rx_buf[10] = 1;
        let swap = Arc::new(SwapSlot {
            next: std::sync::Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK)?,
        });
        Ok(Self {
            backend,
            swap,
            mac,
            counters: Arc::default(),
            rx_buf,
            rx_len: 0,
            tx_buf: Vec::with_capacity(NET_HDR_LEN + MAX_FRAME_LEN),
        })
    }

    /// The handle that replaces this device's backend from another thread.
    pub fn backend_swap(&self) -> BackendSwap {
        BackendSwap(self.swap.clone())
    }

    /// Moves frames from the backend into guest buffers.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Processed {
        let mut done = Processed::NOTHING;
        loop {
            if self.rx_len == 0 {
                match self.backend.recv(&mut self.rx_buf[NET_HDR_LEN..]) {
                    Ok(0) => break,
                    Ok(n) if n >= MIN_FRAME_LEN => self.rx_len = NET_HDR_LEN + n,
                    Ok(n) => {
                        warn_limited!("virtio-net: dropped a {n}-byte runt frame");
                        DeviceCounters::add(&self.counters.errors, 1);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::error!("virtio-net: receive failed: {e}");
                        break;
                    }
                }
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break; // the frame waits for the driver's next buffers
            };
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            let frame = &self.rx_buf[..self.rx_len];
            match write_chain(&descs, frame, mem) {
                Ok(()) => {
                    if let Err(e) = queue.add_used(mem, head, frame.len() as u32) {
                        tracing::error!("virtio-net: cannot return rx buffer {head}: {e}");
                    }
                    DeviceCounters::add(&self.counters.requests, 1);
                    DeviceCounters::add(
                        &self.counters.read_bytes,
                        (frame.len() - NET_HDR_LEN) as u64,
                    );
                    done = Processed::USED;
                }
                Err(why) => {
                    warn_limited!("virtio-net: rx buffer {head} unusable ({why}); frame dropped");
                    DeviceCounters::add(&self.counters.errors, 1);
                    if let Err(e) = queue.add_used(mem, head, 0) {
                        tracing::error!("virtio-net: cannot return rx buffer {head}: {e}");
                    }
                    done = Processed::USED;
                }
            }
            self.rx_len = 0;
        }
        done
    }

    /// Sends every frame the driver queued.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Processed {
        let mut done = Processed::NOTHING;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            match gather_chain(&descs, mem, &mut self.tx_buf) {
                Ok(()) => {
                    let frame = &self.tx_buf[NET_HDR_LEN..];
                    match self.backend.send(frame) {
                        Ok(()) => {
                            DeviceCounters::add(&self.counters.requests, 1);
                            DeviceCounters::add(&self.counters.write_bytes, frame.len() as u64);
                        }
                        Err(e) => {
                            tracing::debug!("virtio-net: send failed: {e}; frame dropped");
                            DeviceCounters::add(&self.counters.errors, 1);
                        }
                    }
                }
                Err(why) => {
                    warn_limited!("virtio-net: tx chain {head} malformed ({why}); dropped");
                    DeviceCounters::add(&self.counters.errors, 1);
                }
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                tracing::error!("virtio-net: cannot return tx buffer {head}: {e}");
            }
            done = Processed::USED;
        }
        done
    }
}

/// Writes `bytes` across the device-writable buffers of a chain.
fn write_chain(
    descs: &[Descriptor],
    bytes: &[u8],
    mem: &GuestMemoryMmap,
) -> Result<(), &'static str> {
    let room: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    if room < bytes.len() as u64 {
        return Err("too small for the frame");
    }
    if descs
        .iter()
        .any(|d| !d.is_write_only() || !super::in_memory(mem, d.addr(), d.len() as usize))
    {
        return Err("not device-writable guest memory");
    }
    let mut rest = bytes;
    for d in descs {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(d.len() as usize);
        mem.write_slice(&rest[..n], d.addr())
            .map_err(|_| "not in guest memory")?;
        rest = &rest[n..];
    }
    Ok(())
}

/// Gathers the driver-readable buffers of a chain (header + frame) into
/// `out`.
fn gather_chain(
    descs: &[Descriptor],
    mem: &GuestMemoryMmap,
    out: &mut Vec<u8>,
) -> Result<(), &'static str> {
    let total: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    if total < (NET_HDR_LEN + MIN_FRAME_LEN) as u64 || total > (NET_HDR_LEN + MAX_FRAME_LEN) as u64
    {
        return Err("bad length");
    }
    if descs
        .iter()
        .any(|d| d.is_write_only() || !super::in_memory(mem, d.addr(), d.len() as usize))
    {
        return Err("not driver-readable guest memory");
    }
    out.clear();
    for d in descs {
        let start = out.len();
        out.resize(start + d.len() as usize, 0);
        mem.read_slice(&mut out[start..], d.addr())
            .map_err(|_| "not in guest memory")?;
    }
    Ok(())
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6], status (link always up).
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        config[6..].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        super::read_config_bytes(&config, offset, data);
    }

    fn reset(&mut self) {
        self.rx_len = 0;
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Processed {
        match (index, queues) {
            (RX, [rx, ..]) => self.receive(rx, mem),
            (TX, [_, tx, ..]) => self.transmit(tx, mem),
            _ => Processed::NOTHING,
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        self.backend.fd()
    }

    fn control_fd(&self) -> Option<RawFd> {
        Some(self.swap.evt.as_raw_fd())
    }

    fn process_control(&mut self) -> Option<Box<dyn Send>> {
        // Clears the counter; "nothing pending" is no error here.
        let _ = self.swap.evt.read();
        let next = crate::lock(&self.swap.next).take()?;
        tracing::info!("virtio-net: backend replaced");
        Some(Box::new(std::mem::replace(&mut self.backend, next)))
    }

    fn process_backend(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Processed {
        match queues.first_mut() {
            Some(rx) => self.receive(rx, mem),
            None => Processed::NOTHING,
        }
    }

    fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }

    fn save_state(&self) -> super::DeviceState {
        super::DeviceState::Net {
            pending_rx: self.rx_buf[..self.rx_len].to_vec(),
        }
    }

    fn validate_state(&self, state: &super::DeviceState) -> Result<(), crate::PersistError> {
        let super::DeviceState::Net { pending_rx } = state else {
            return Err(crate::PersistError::Mismatch(format!(
                "{state:?} for a virtio-net device"
            )));
        };
        let len = pending_rx.len();
        if len != 0 && !(NET_HDR_LEN + MIN_FRAME_LEN..=self.rx_buf.len()).contains(&len) {
            return Err(crate::PersistError::Invalid(format!(
                "pending frame of {len} bytes"
            )));
        }
        // The device offers no offloads: the header is always the same.
        if len != 0 && pending_rx[..NET_HDR_LEN] != self.rx_buf[..NET_HDR_LEN] {
            return Err(crate::PersistError::Invalid(
                "pending frame with a virtio-net header this device never writes".into(),
            ));
        }
        Ok(())
    }

    fn restore_state(&mut self, state: &super::DeviceState) {
        if let super::DeviceState::Net { pending_rx } = state {
            let len = pending_rx.len().min(self.rx_buf.len());
            self.rx_buf[..len].copy_from_slice(&pending_rx[..len]);
            self.rx_len = len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mmio::MmioTransport;
    use crate::virtio::testing::{guest_memory, live_transport, DriverSim};
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    /// A backend whose inbound frames and sent frames the test sees.
    #[derive(Clone, Default)]
    struct Loop {
        inbound: Arc<Mutex<VecDeque<Vec<u8>>>>,
        sent: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    impl NetBackend for Loop {
        fn fd(&self) -> Option<RawFd> {
            None
        }
        fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let frame = self.inbound.lock().unwrap().pop_front();
            match frame {
                Some(f) => {
                    buf[..f.len()].copy_from_slice(&f);
                    Ok(f.len())
                }
                None => Err(io::ErrorKind::WouldBlock.into()),
            }
        }
        fn send(&mut self, frame: &[u8]) -> io::Result<()> {
            self.sent.lock().unwrap().push(frame.to_vec());
            Ok(())
        }
    }

    fn net() -> (MmioTransport, Loop) {
        let backend = Loop::default();
        let dev = Net::new(Box::new(backend.clone()), [2, 0, 0, 0, 0, 1]).unwrap();
        let t = live_transport(Box::new(dev), guest_memory(), dev_features(), 2);
        (t, backend)
    }

    fn dev_features() -> u64 {
        (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC)
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn received_frame_lands_after_header_and_is_dirty() {
        let (mut t, backend) = net();
        let f = frame(1500, 3);
        backend.inbound.lock().unwrap().push_back(f.clone());
        let mut sim = DriverSim::new(&mut t);
        // Header and frame split over two buffers.
        sim.add_buffer(0, &[(0x1000, 100, true), (0x4000, 2000, true)]);
        t.process_backend();
        let sim = DriverSim::new(&mut t);
        assert_eq!(sim.used(0), vec![(0, (NET_HDR_LEN + 1500) as u32)]);
        let mut got = vec![0u8; NET_HDR_LEN + 1500];
        sim.mem()
            .read_slice(&mut got[..100], GuestAddress(0x1000))
            .unwrap();
        sim.mem()
            .read_slice(&mut got[100..], GuestAddress(0x4000))
            .unwrap();
        assert_eq!(&got[..NET_HDR_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(&got[NET_HDR_LEN..], &f[..]);
        use vm_memory::bitmap::Bitmap;
        use vm_memory::GuestMemoryBackend;
        let region = sim.mem().find_region(GuestAddress(0x4000)).unwrap();
        assert!(region.bitmap().dirty_at(0x4000));
        assert!(region.bitmap().dirty_at(0x4000 + 1000));
    }

    #[test]
    fn frame_waits_for_a_buffer() {
        let (mut t, backend) = net();
        backend.inbound.lock().unwrap().push_back(frame(60, 1));
        backend.inbound.lock().unwrap().push_back(frame(70, 2));
        t.process_backend();
        assert!(t.irq_pending().is_none());
        let mut sim = DriverSim::new(&mut t);
        sim.add_buffer(0, &[(0x1000, 2048, true)]);
        t.process_queue(0);
        let mut sim = DriverSim::new(&mut t);
        assert_eq!(sim.used(0), vec![(0, (NET_HDR_LEN + 60) as u32)]);
        sim.add_buffer(0, &[(0x2000, 2048, true)]);
        t.process_queue(0);
        let sim = DriverSim::new(&mut t);
        assert_eq!(sim.used(0)[1].1, (NET_HDR_LEN + 70) as u32);
        let mut got = vec![0u8; 70];
        sim.mem()
            .read_slice(&mut got, GuestAddress(0x2000 + NET_HDR_LEN as u64))
            .unwrap();
        assert_eq!(got, frame(70, 2));
    }

    #[test]
    fn too_small_or_read_only_buffers_drop_the_frame() {
        let (mut t, backend) = net();
        backend.inbound.lock().unwrap().push_back(frame(1000, 1));
        backend.inbound.lock().unwrap().push_back(frame(60, 2));
        let mut sim = DriverSim::new(&mut t);
        sim.add_buffer(0, &[(0x1000, 500, true)]);
        sim.add_buffer(0, &[(0x2000, 500, false)]);
        t.process_backend();
        let sim = DriverSim::new(&mut t);
        assert_eq!(sim.used(0), vec![(0, 0), (4, 0)]);
        assert_eq!(
            t.device()
                .counters()
                .errors
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
    }

    #[test]
    fn transmit_strips_the_header() {
        let (mut t, backend) = net();
        let f = frame(200, 9);
        let mut sim = DriverSim::new(&mut t);
        sim.mem()
            .write_slice(&[0u8; NET_HDR_LEN], GuestAddress(0x1000))
            .unwrap();
        sim.mem().write_slice(&f, GuestAddress(0x3000)).unwrap();
        sim.add_buffer(
            1,
            &[(0x1000, NET_HDR_LEN as u32, false), (0x3000, 200, false)],
        );
        // A runt and a device-writable chain are dropped.
        sim.add_buffer(1, &[(0x1000, 20, false)]);
        sim.add_buffer(1, &[(0x1000, 100, true)]);
        t.process_queue(1);
        assert_eq!(*backend.sent.lock().unwrap(), vec![f]);
        let sim = DriverSim::new(&mut t);
        assert_eq!(sim.used(1).len(), 3);
        let c = t.device().counters();
        assert_eq!(
            c.write_bytes.load(std::sync::atomic::Ordering::Relaxed),
            200
        );
        assert_eq!(c.errors.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[test]
    fn config_holds_mac_and_link() {
        let (t, _) = net();
        let mut cfg = [0u8; 8];
        t.device().read_config(0, &mut cfg);
        assert_eq!(cfg, [2, 0, 0, 0, 0, 1, 1, 0]);
    }

    #[test]
    fn short_or_foreign_pending_frames_are_refused() {
        use crate::Persist;
        let (mut t, _) = net();
        let saved = t.save();
        let before = saved.clone();
        let mut header = vec![0u8; NET_HDR_LEN];
        header[10] = 1;
        let with = |pending_rx: Vec<u8>| {
            let mut s = saved.clone();
            s.device = crate::virtio::DeviceState::Net { pending_rx };
            s
        };
        let mut foreign = header.clone();
        foreign[0] = 1; // NEEDS_CSUM: never written by this device
        foreign.extend(frame(60, 1));
        for bad in [
            vec![1, 2, 3, 4, 5],
            [header.clone(), frame(13, 1)].concat(),
            [header.clone(), frame(MAX_FRAME_LEN + 1, 1)].concat(),
            foreign,
        ] {
            let len = bad.len();
            assert!(t.restore(&with(bad)).is_err(), "{len} bytes accepted");
            assert_eq!(t.save(), before);
        }
        // A real pending frame restores and reaches the guest.
        let good = [header, frame(60, 4)].concat();
        t.restore(&with(good.clone())).unwrap();
        let mut sim = DriverSim::new(&mut t);
        sim.add_buffer(0, &[(0x1000, 2048, true)]);
        t.process_queue(0);
        let sim = DriverSim::new(&mut t);
        assert_eq!(sim.used(0), vec![(0, good.len() as u32)]);
    }

    /// A backend at end of file: every recv returns Ok(0) (it gives up
    /// after many calls, so a spinning device fails the test, not hangs it).
    struct Eof {
        calls: Arc<std::sync::atomic::AtomicUsize>,
        runt: bool,
    }

    impl NetBackend for Eof {
        fn fd(&self) -> Option<RawFd> {
            None
        }
        fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self
                .calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n > 1000 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            if self.runt && n == 0 {
                buf[..5].copy_from_slice(&[1, 2, 3, 4, 5]);
                return Ok(5);
            }
            Ok(0)
        }
        fn send(&mut self, _: &[u8]) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_backend_at_eof_ends_the_receive_loop_and_runts_are_errors() {
        for runt in [false, true] {
            let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let dev = Net::new(
                Box::new(Eof {
                    calls: calls.clone(),
                    runt,
                }),
                [2, 0, 0, 0, 0, 1],
            )
            .unwrap();
            let mut t = live_transport(Box::new(dev), guest_memory(), dev_features(), 2);
            DriverSim::new(&mut t).add_buffer(0, &[(0x1000, 2048, true)]);
            let counters = t.device().counters();
            let errors = || counters.errors.load(std::sync::atomic::Ordering::Relaxed);
            let errors_before = errors();
            calls.store(0, std::sync::atomic::Ordering::Relaxed);
            t.process_backend();
            let expected = if runt { 2 } else { 1 };
            assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), expected);
            assert_eq!(errors() - errors_before, u64::from(runt));
            assert!(DriverSim::new(&mut t).used(0).is_empty());
        }
    }

    /// A backend over one end of a datagram socketpair.
    struct Socket(std::os::unix::net::UnixDatagram);

    impl NetBackend for Socket {
        fn fd(&self) -> Option<RawFd> {
            Some(self.0.as_raw_fd())
        }
        fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.recv(buf)
        }
        fn send(&mut self, frame: &[u8]) -> io::Result<()> {
            self.0.send(frame).map(drop)
        }
    }

    /// A socketpair: the device's backend and the far end.
    fn socket_pair() -> (Socket, std::os::unix::net::UnixDatagram) {
        let (dev, peer) = std::os::unix::net::UnixDatagram::pair().unwrap();
        dev.set_nonblocking(true).unwrap();
        (Socket(dev), peer)
    }

    /// Waits until the transport's irqfd fires or `deadline` passes.
    fn wait_irq(irq: &EventFd, deadline: std::time::Instant) -> bool {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut pfd = libc::pollfd {
            fd: irq.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
        n == 1 && irq.read().is_ok()
    }

    #[test]
    fn a_backend_swapped_on_the_device_thread_keeps_the_pending_frame() {
        use event_manager::{EventManager, SubscriberOps};
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::{Duration, Instant};

        let (old, old_peer) = socket_pair();
        let (new, new_peer) = socket_pair();
        let dev = Net::new(Box::new(old), [2, 0, 0, 0, 0, 1]).unwrap();
        let swap = dev.backend_swap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut t =
            MmioTransport::new(Box::new(dev), guest_memory(), irq.try_clone().unwrap()).unwrap();
        let mut sim = DriverSim::new(&mut t);
        sim.negotiate(dev_features());
        sim.setup_queue(0, 16);
        sim.setup_queue(1, 16);
        sim.driver_ok();
        // A frame read from the old backend waits: the guest has no buffer.
        let (f0, f1, f2) = (frame(60, 0), frame(70, 1), frame(80, 2));
        old_peer.send(&f0).unwrap();
        t.process_backend();
        let mut header = [0u8; NET_HDR_LEN];
        header[10] = 1;
        assert_eq!(
            crate::Persist::save(&t).device,
            crate::virtio::DeviceState::Net {
                pending_rx: [&header[..], &f0].concat()
            }
        );
        // Buffers, but no notification: only the swap makes the device
        // look at its rx queue again.
        let mut sim = DriverSim::new(&mut t);
        for i in 0..3u64 {
            sim.add_buffer(0, &[(0x1000 + i * 0x1000, 2048, true)]);
        }

        let t = Arc::new(Mutex::new(t));
        let mut manager: EventManager<Arc<Mutex<MmioTransport>>> = EventManager::new().unwrap();
        manager.add_subscriber(t.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    manager.run_with_timeout(20).unwrap();
                }
            })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let used = || DriverSim::new(&mut t.lock().unwrap()).used(0).len();

        // The swap delivers the kept frame.
        swap.swap(Box::new(new)).unwrap();
        assert!(wait_irq(&irq, deadline), "no interrupt after the swap");
        assert_eq!(used(), 1);
        // The old backend is gone (its socket closed); the new one is
        // watched: its frames arrive as they come.
        assert!(
            old_peer.send(&f2).is_err(),
            "the old backend was not dropped"
        );
        new_peer.send(&f1).unwrap();
        assert!(wait_irq(&irq, deadline), "the new backend is not watched");
        assert_eq!(used(), 2);
        new_peer.send(&f2).unwrap();
        assert!(wait_irq(&irq, deadline));
        stop.store(true, Ordering::Relaxed);
        thread.join().unwrap();

        let mut t = t.lock().unwrap();
        let sim = DriverSim::new(&mut t);
        let used = sim.used(0);
        assert_eq!(used.len(), 3, "{used:?}");
        for (i, f) in [f0, f1, f2].iter().enumerate() {
            let mut got = vec![0u8; f.len()];
            let at = 0x1000 + i as u64 * 0x1000 + NET_HDR_LEN as u64;
            sim.mem().read_slice(&mut got, GuestAddress(at)).unwrap();
            assert_eq!(&got, f, "frame {i}");
        }
    }
}
