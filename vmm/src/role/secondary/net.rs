//! The SVM's NICs in COLO mode: client frames come from the primary's
//! mirror (through the epoch queue, [`net_proxy::mirror`]), the SVM's
//! frames go back to the primary's compare; both through the NIC's TCP
//! rewriter. After failover the NIC is its tap, still through the rewriter.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use colo::vm::{FrameSink, PeerFrame};
use devices::ratelimit::LogLimit;
use devices::virtio::{NetBackend, Tap};
use net_proxy::mirror::{MirrorQueue, Pushed};
use net_proxy::rewrite::Rewriter;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A NIC's rewriter, shared by its backend before and after failover and
/// by the load that resets it.
pub type SharedRewriter = Arc<Mutex<Rewriter>>;

/// The mirrored client frames waiting for the SVM, and one eventfd per NIC
/// that the NIC's backend offers as its fd.
pub struct Mirror {
    queue: Mutex<MirrorQueue>,
    wakes: Vec<EventFd>,
}

impl Mirror {
    /// A queue for `nics` NICs holding at most `max_bytes`.
    pub fn new(nics: usize, max_bytes: u64) -> io::Result<Self> {
        Ok(Self {
            queue: Mutex::new(MirrorQueue::new(nics, max_bytes)),
            wakes: (0..nics)
                .map(|_| EventFd::new(EFD_NONBLOCK))
                .collect::<io::Result<_>>()?,
        })
    }

    fn wake(&self, nic: usize) {
        if let Some(evt) = self.wakes.get(nic) {
            // Only fails when the counter would overflow: it is readable.
            let _ = evt.write(1);
        }
    }

    /// A mirrored frame from the primary: queued, and its NIC woken when
    /// the SVM can have it now.
    pub fn push(&self, frame: PeerFrame) -> io::Result<()> {
        let nic = usize::from(frame.nic);
        let pushed = devices::lock(&self.queue).push(frame.epoch, nic, frame.data);
        match pushed {
            Pushed::Deliverable => {
                self.wake(nic);
                Ok(())
            }
            Pushed::Waiting | Pushed::Stale => Ok(()),
            Pushed::Dropped => Err(io::Error::other("the mirror queue is full")),
        }
    }

    /// The SVM runs in `epoch` from now on: older frames go, this epoch's
    /// are deliverable (the NICs are woken by [`Mirror::wake_all`]).
    pub fn set_epoch(&self, epoch: u64) {
        devices::lock(&self.queue).set_epoch(epoch);
    }

    /// Wakes every NIC (after the SVM resumed).
    pub fn wake_all(&self) {
        (0..self.wakes.len()).for_each(|nic| self.wake(nic));
    }

    /// The SVM's epoch (0 before its first run).
    pub fn epoch(&self) -> u64 {
        devices::lock(&self.queue).epoch().unwrap_or(0)
    }

    /// (frames queued, frames dropped: beyond the bound or stale).
    pub fn counts(&self) -> (u64, u64) {
        let q = devices::lock(&self.queue);
        (q.depth(), q.dropped() + q.stale())
    }

    /// Failover: forgets every queued frame.
    pub fn clear(&self) {
        devices::lock(&self.queue).clear();
    }
}

static SEND_FAILED: LogLimit = LogLimit::new();

/// The SVM's NIC `nic` before failover.
pub struct SvmNic {
    pub nic: u16,
    pub mirror: Arc<Mirror>,
    pub rewriter: SharedRewriter,
    pub out: FrameSink,
    /// Frames handed to `out` (counter, shared with the replica's stats).
    pub sent: Arc<std::sync::atomic::AtomicU64>,
    /// Its TCP output of the current epoch, sent again at takeover.
    pub replay: Arc<std::sync::Mutex<net_proxy::mirror::Replay>>,
}

impl SvmNic {
    /// The next deliverable frame, rewritten into the SVM's sequence
    /// space, copied into `buf` (a frame longer than `buf` is dropped).
    fn next(&mut self, buf: &mut [u8]) -> Option<usize> {
        loop {
            let frame = devices::lock(&self.mirror.queue).pop(usize::from(self.nic))?;
            let Some(dst) = buf.get_mut(..frame.len()) else {
                continue;
            };
            dst.copy_from_slice(&frame);
            devices::lock(&self.rewriter).inbound(dst);
            return Some(frame.len());
        }
    }
}

impl NetBackend for SvmNic {
    fn fd(&self) -> Option<RawFd> {
        self.mirror
            .wakes
            .get(usize::from(self.nic))
            .map(|e| e.as_raw_fd())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(n) = self.next(buf) {
            return Ok(n);
        }
        // Clear the eventfd, then look again: a frame pushed after the
        // look above wrote the eventfd after this read, so the device
        // is woken for it (edge-triggered).
        if let Some(evt) = self.mirror.wakes.get(usize::from(self.nic)) {
            let _ = evt.read();
        }
        self.next(buf)
            .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let mut data = frame.to_vec();
        devices::lock(&self.rewriter).outbound(&mut data);
        let epoch = self.mirror.epoch();
        devices::lock(&self.replay).record(epoch, &data);
        let frame = PeerFrame {
            epoch,
            nic: self.nic,
            data,
        };
        match (self.out)(frame) {
            Ok(()) => {
                self.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            // The compare sees the difference and asks for a checkpoint;
            // the guest's send does not fail.
            Err(e) => {
                if let Some(suppressed) = SEND_FAILED.allow() {
                    tracing::warn!(suppressed, "an SVM frame was not mirrored: {e}");
                }
            }
        }
        Ok(())
    }
}

/// The SVM's NIC after failover: its tap, through the same rewriter.
pub struct RewrittenTap {
    pub tap: Tap,
    pub rewriter: SharedRewriter,
}

impl NetBackend for RewrittenTap {
    fn fd(&self) -> Option<RawFd> {
        self.tap.fd()
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.tap.recv(buf)?;
        if let Some(frame) = buf.get_mut(..n) {
            devices::lock(&self.rewriter).inbound(frame);
        }
        Ok(n)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let mut data = frame.to_vec();
        devices::lock(&self.rewriter).outbound(&mut data);
        self.tap.send(&data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    const CLIENT: [u8; 4] = [10, 0, 0, 1];
    const GUEST: [u8; 4] = [10, 0, 0, 2];

    /// A TCP frame between the client (port 40000) and the guest (port
    /// 80): `to_guest` says which way.
    fn tcp(to_guest: bool, seq: u32, ack: Option<u32>, syn: bool) -> Vec<u8> {
        let (src, dst, sport, dport) = match to_guest {
            true => (CLIENT, GUEST, 40000, 80),
            false => (GUEST, CLIENT, 80, 40000),
        };
        let mut b = PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4(src, dst, 64)
            .tcp(sport, dport, seq, 64240);
        if syn {
            b = b.syn();
        }
        if let Some(ack) = ack {
            b = b.ack(ack);
        }
        let mut frame = Vec::new();
        b.write(&mut frame, &[]).unwrap();
        frame
    }

    /// (seq, ack) of a TCP frame.
    fn seq_ack(frame: &[u8]) -> (u32, u32) {
        match SlicedPacket::from_ethernet(frame).unwrap().transport {
            Some(TransportSlice::Tcp(t)) => (t.sequence_number(), t.acknowledgment_number()),
            other => panic!("not TCP: {other:?}"),
        }
    }

    fn readable(fd: RawFd) -> bool {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    fn recv(nic: &mut SvmNic) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; 2048];
        let n = nic.recv(&mut buf)?;
        Ok(buf[..n].to_vec())
    }

    #[test]
    fn the_svm_gets_its_epochs_frames_rewritten_and_its_frames_go_out_tagged() {
        let mirror = Arc::new(Mirror::new(1, 1 << 20).unwrap());
        let sent: Arc<Mutex<Vec<PeerFrame>>> = Arc::default();
        let sink = sent.clone();
        let mut nic = SvmNic {
            nic: 0,
            mirror: mirror.clone(),
            rewriter: Arc::new(Mutex::new(Rewriter::new(16))),
            out: Arc::new(move |f| {
                sink.lock().unwrap().push(f);
                Ok(())
            }),
            sent: Arc::default(),
            replay: Arc::new(Mutex::new(net_proxy::mirror::Replay::new(1 << 20))),
        };
        let fd = nic.fd().unwrap();
        let push = |epoch, frame: Vec<u8>| {
            mirror
                .push(PeerFrame {
                    epoch,
                    nic: 0,
                    data: frame,
                })
                .unwrap()
        };
        // Before the first run nothing is delivered, nothing wakes.
        push(1, tcp(true, 5, None, false));
        push(2, tcp(true, 7000, None, true)); // the client's SYN
        assert!(!readable(fd));
        assert_eq!(
            recv(&mut nic).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        // Checkpoint 1 loaded, the SVM runs in epoch 2.
        mirror.set_epoch(2);
        mirror.wake_all();
        assert!(readable(fd));
        assert_eq!(seq_ack(&recv(&mut nic).unwrap()), (7000, 0));
        assert_eq!(
            recv(&mut nic).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert!(!readable(fd), "an empty recv clears the eventfd");
        // The SVM accepts with ISN 1000 (the PVM chose 5000): its SYN-ACK
        // goes out as is, tagged with its epoch.
        nic.send(&tcp(false, 1000, Some(7001), true)).unwrap();
        // The client acknowledges the PVM's SYN-ACK: the SVM sees its own.
        push(3, tcp(true, 7001, Some(5001), false));
        assert!(!readable(fd), "epoch 3 waits");
        push(2, tcp(true, 7001, Some(5001), false));
        assert!(readable(fd));
        assert_eq!(seq_ack(&recv(&mut nic).unwrap()), (7001, 1001));
        // The SVM's data goes out in the PVM's sequence space.
        nic.send(&tcp(false, 1001, Some(7001), false)).unwrap();
        mirror.set_epoch(3);
        assert_eq!(seq_ack(&recv(&mut nic).unwrap()), (7001, 1001));
        nic.send(&tcp(false, 1001, Some(7001), false)).unwrap();
        let sent = sent.lock().unwrap();
        let got: Vec<(u64, u16, (u32, u32))> = sent
            .iter()
            .map(|f| (f.epoch, f.nic, seq_ack(&f.data)))
            .collect();
        assert_eq!(
            got,
            vec![
                (2, 0, (1000, 7001)),
                (2, 0, (5001, 7001)),
                (3, 0, (5001, 7001))
            ]
        );
        assert_eq!(mirror.counts(), (0, 1), "epoch 1's frame was stale");
        assert_eq!(nic.sent.load(std::sync::atomic::Ordering::Relaxed), 3);
        // What a takeover now would send again: this epoch's frames, as
        // they went to the primary (in the PVM's sequence space).
        let replayed = nic.replay.lock().unwrap().take();
        assert_eq!(replayed, [sent[2].data.clone()]);
    }
}
