//! What both engines share: socket set-up, the ordered outgoing queue of
//! the primary's data connection, the bounded queue of the mirror
//! connection (COLO), page batching and a stoppable wait.

use std::collections::VecDeque;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::vm::{PageBatch, PeerFrame};
use crate::wire::{self, Message};
use crate::PAGE_SIZE;

/// Disk blocks are compared and sent in blocks of this size.
pub const SYNC_BLOCK: u32 = 64 << 10;

/// Pages per Pages/SyncPages message (1 MiB of data).
pub const BATCH_PAGES: usize = 256;

/// Most hashes per DiskHashes message (8 MiB).
pub const HASHES_PER_MESSAGE: usize = 1 << 20;

/// Bytes the mirror connection may have queued (or being written) before
/// a frame is dropped.
pub const MIRROR_QUEUE_BYTES: usize = 8 << 20;

/// Every peer socket: no Nagle (nothing may wait on a delayed ACK).
pub fn configure(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)
}

/// Locks `m`, whether or not a thread panicked holding it (the data
/// behind our mutexes stays consistent at every unlock).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Splits `batch` into batches of at most [`BATCH_PAGES`] pages.
pub fn split(batch: &PageBatch) -> impl Iterator<Item = PageBatch> + '_ {
    let page = PAGE_SIZE as usize;
    batch
        .addrs
        .chunks(BATCH_PAGES)
        .zip(batch.data.chunks(BATCH_PAGES * page))
        .map(|(addrs, data)| PageBatch {
            addrs: addrs.to_vec(),
            data: data.to_vec(),
        })
}

/// Sockets of a session, to shut down from any thread (which ends every
/// blocked read and write on them).
#[derive(Default)]
pub struct Conns(Mutex<Vec<TcpStream>>);

impl Conns {
    pub fn add(&self, stream: &TcpStream) {
        if let Ok(clone) = stream.try_clone() {
            lock(&self.0).push(clone);
        }
    }

    pub fn shutdown(&self) {
        for s in lock(&self.0).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Ends the sending side only: the peer reads what was sent, then the
    /// end of the stream (no reset racing the last message).
    pub fn finish(&self) {
        for s in lock(&self.0).iter() {
            let _ = s.shutdown(Shutdown::Write);
        }
    }
}

#[derive(Default)]
struct OutboxInner {
    frames: VecDeque<Vec<u8>>,
    /// Bytes queued or being written.
    bytes: usize,
    /// A socket a push may write to itself, when nothing is queued or
    /// being written (the mirror connection: one thread hop less).
    direct: Option<TcpStream>,
    closed: Option<String>,
}

/// The primary's data connection, in order: every message (checkpoint
/// data and forwarded disk writes alike) is encoded into the queue and a
/// writer thread drains it to the socket.
#[derive(Default)]
pub struct Outbox {
    inner: Mutex<OutboxInner>,
    cv: Condvar,
}

fn closed(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, why.to_string())
}

impl Outbox {
    /// Queues `msg`; returns its size on the wire.
    pub fn push(&self, msg: &Message) -> io::Result<usize> {
        self.push_within(msg, usize::MAX)
    }

    /// Queues `msg` unless that makes more than `bound` bytes queued or
    /// being written (then refuses it: never waits); returns its size on
    /// the wire.
    pub fn push_within(&self, msg: &Message, bound: usize) -> io::Result<usize> {
        let frame = wire::encode(msg).map_err(io::Error::other)?;
        let len = frame.len();
        let mut inner = lock(&self.inner);
        if let Some(why) = &inner.closed {
            return Err(closed(why));
        }
        if inner.bytes.saturating_add(len) > bound {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} bytes already queued", inner.bytes),
            ));
        }
        let mut frame = frame;
        // Nothing queued or being written: this frame is next on the wire.
        if inner.bytes == 0 {
            if let Some(socket) = &inner.direct {
                // A failed send is left to the writer, whose write fails
                // the same way and reports it.
                let sent = send_now(socket, &frame).unwrap_or(0);
                if sent == len {
                    return Ok(len);
                }
                frame.drain(..sent);
            }
        }
        inner.bytes += frame.len();
        inner.frames.push_back(frame);
        self.cv.notify_all();
        Ok(len)
    }

    /// From now on a push writes to `socket` itself when nothing is queued
    /// or being written, and queues what the socket does not take at once.
    pub fn write_directly(&self, socket: TcpStream) {
        lock(&self.inner).direct = Some(socket);
    }

    /// Waits until at most `limit` bytes are queued or being written.
    pub fn wait_below(&self, limit: usize) -> io::Result<()> {
        let mut inner = lock(&self.inner);
        loop {
            if let Some(why) = &inner.closed {
                return Err(closed(why));
            }
            if inner.bytes <= limit {
                return Ok(());
            }
            inner = self.cv.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Refuses every later push and wakes every waiter.
    pub fn close(&self, why: &str) {
        let mut inner = lock(&self.inner);
        if inner.closed.is_none() {
            inner.closed = Some(why.to_string());
        }
        inner.frames.clear();
        inner.direct = None;
        self.cv.notify_all();
    }

    /// Writes the queue to `to` until closed or a write fails (then
    /// returns the failure).
    pub fn drain(&self, to: &mut impl io::Write) -> io::Result<()> {
        loop {
            let frame = {
                let mut inner = lock(&self.inner);
                loop {
                    if let Some(why) = &inner.closed {
                        return Err(closed(why));
                    }
                    if let Some(f) = inner.frames.pop_front() {
                        break f;
                    }
                    inner = self.cv.wait(inner).unwrap_or_else(|e| e.into_inner());
                }
            };
            to.write_all(&frame)?;
            let mut inner = lock(&self.inner);
            inner.bytes = inner.bytes.saturating_sub(frame.len());
            self.cv.notify_all();
        }
    }
}

/// Writes as much of `buf` to `socket` as it takes without waiting.
fn send_now(socket: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: the descriptor is `socket`'s, open for this call; `buf` is
    // valid for `buf.len()` bytes. MSG_DONTWAIT makes this one send
    // non-blocking whatever the socket's mode; MSG_NOSIGNAL turns a closed
    // connection into EPIPE instead of SIGPIPE.
    let n = unsafe {
        libc::send(
            socket.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    match usize::try_from(n) {
        Ok(n) => Ok(n),
        Err(_) => {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            }
        }
    }
}

/// The mirror connection's sending side (COLO): a bounded [`Outbox`] and
/// its counts. Pushing never blocks: a frame beyond the bound, or before
/// the connection is there, or after it ended, is dropped and counted.
pub struct Mirror {
    outbox: Outbox,
    bound: usize,
    /// A writer drains the outbox to the connection.
    connected: AtomicBool,
    mirrored: AtomicU64,
    dropped: AtomicU64,
}

impl Default for Mirror {
    fn default() -> Self {
        Self::new(MIRROR_QUEUE_BYTES)
    }
}

impl Mirror {
    /// A mirror that queues at most `bound` bytes.
    pub fn new(bound: usize) -> Self {
        Self {
            outbox: Outbox::default(),
            bound,
            connected: AtomicBool::new(false),
            mirrored: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues a frame for the peer, or drops and counts it.
    pub fn frame(&self, frame: PeerFrame) -> io::Result<()> {
        let pushed = if self.connected.load(Ordering::SeqCst) {
            self.outbox.push_within(&Message::Frame(frame), self.bound)
        } else {
            Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the mirror connection is not open",
            ))
        };
        let counter = match pushed {
            Ok(_) => &self.mirrored,
            Err(_) => &self.dropped,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        pushed.map(drop)
    }

    /// Queues a message that is not a frame (not counted), within the
    /// bound.
    pub fn message(&self, msg: &Message) -> io::Result<()> {
        self.outbox.push_within(msg, self.bound).map(drop)
    }

    /// The connection is there (a writer is about to drain): frames are
    /// queued from now on.
    pub fn open(&self) {
        self.connected.store(true, Ordering::SeqCst);
    }

    /// As [`Mirror::open`], and a frame is written to `socket` by the
    /// thread that sends it when the queue is empty (the writer thread
    /// only takes what the socket did not take at once).
    pub fn open_direct(&self, socket: &TcpStream) -> io::Result<()> {
        self.outbox.write_directly(socket.try_clone()?);
        self.open();
        Ok(())
    }

    /// Writes the queue to `to` until closed or a write fails.
    pub fn drain(&self, to: &mut impl io::Write) -> io::Result<()> {
        self.outbox.drain(to)
    }

    /// Ends mirroring: every later frame is dropped, the writer returns.
    pub fn close(&self, why: &str) {
        self.connected.store(false, Ordering::SeqCst);
        self.outbox.close(why);
    }

    /// (frames mirrored, frames dropped) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.mirrored.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }
}

/// A flag threads wait on: set once, wakes every waiter.
#[derive(Default)]
pub struct Stop {
    stopped: Mutex<bool>,
    cv: Condvar,
}

impl Stop {
    pub fn set(&self) {
        *lock(&self.stopped) = true;
        self.cv.notify_all();
    }

    pub fn is_set(&self) -> bool {
        *lock(&self.stopped)
    }

    /// Waits `d` (a period, not a synchronisation); true if stopped.
    pub fn wait(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut stopped = lock(&self.stopped);
        while !*stopped {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            stopped = self
                .cv
                .wait_timeout(stopped, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *stopped
    }
}

/// Milliseconds as a float, for logs and status.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8) -> PeerFrame {
        PeerFrame {
            epoch: u64::from(n),
            nic: 0,
            data: vec![n; 1000],
        }
    }

    /// A writer that takes nothing until told: the connection is behind.
    struct Stuck;

    impl io::Write for Stuck {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("stuck"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A frame of `n`, large enough that a socket fills with few.
    fn big(n: u32) -> PeerFrame {
        PeerFrame {
            epoch: u64::from(n),
            nic: 1,
            data: vec![n as u8; 8000],
        }
    }

    #[test]
    fn the_mirror_writes_directly_and_queues_in_order_what_the_socket_does_not_take() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
        let out = TcpStream::connect(listener.local_addr().expect("addr")).expect("connects");
        let (mut peer, _) = listener.accept().expect("accepts");
        // A stream cut or doubled shows as a read error, not a hang.
        peer.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mirror = Mirror::new(256 << 20);
        mirror.open_direct(&out).expect("opens");
        // No writer thread: the frame reaches the peer all the same.
        mirror.frame(big(1)).expect("sent");
        assert_eq!(
            wire::read_message(&mut peer).expect("a frame"),
            Message::Frame(big(1))
        );
        // The peer reads nothing: once the socket is full, what it does
        // not take (a frame cut anywhere) is queued, and so is every
        // later frame, behind it.
        let mut sent = 1;
        while lock(&mirror.outbox.inner).bytes == 0 {
            sent += 1;
            assert!(sent < 100_000, "the socket never filled");
            mirror.frame(big(sent)).expect("sent or queued");
        }
        for _ in 0..20 {
            sent += 1;
            mirror.frame(big(sent)).expect("queued");
        }
        // The writer sends the rest; the peer gets every frame once, in
        // order, whole.
        let mut writer = out.try_clone().expect("clone");
        std::thread::scope(|s| {
            let w = s.spawn(|| mirror.drain(&mut writer));
            for n in 2..=sent {
                assert_eq!(
                    wire::read_message(&mut peer).expect("a frame"),
                    Message::Frame(big(n)),
                    "frame {n}"
                );
            }
            mirror.outbox.wait_below(0).expect("drained");
            mirror.close("done");
            assert!(w.join().expect("writer").is_err(), "closed");
        });
        assert_eq!(mirror.counts(), (u64::from(sent), 0));
    }

    #[test]
    fn the_mirror_drops_beyond_its_bound_and_never_blocks() {
        let one = wire::encode(&Message::Frame(frame(0)))
            .expect("encodes")
            .len();
        let mirror = Mirror::new(3 * one);
        // Before the connection: dropped and counted.
        assert!(mirror.frame(frame(0)).is_err());
        assert_eq!(mirror.counts(), (0, 1));
        // Connected, but nothing drains (the writer is stuck on the
        // socket): three fit, the rest are dropped at once.
        mirror.open();
        for n in 1..=3 {
            mirror.frame(frame(n)).expect("within the bound");
        }
        for n in 4..=10 {
            let err = mirror.frame(frame(n)).expect_err("beyond the bound");
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        }
        assert_eq!(mirror.counts(), (3, 8));
        // What was queued goes out in order once the connection drains.
        let mut out = Vec::new();
        let drained = std::thread::scope(|s| {
            let writer = s.spawn(|| mirror.drain(&mut out));
            mirror.outbox.wait_below(0).expect("drains");
            mirror.close("done");
            writer.join().expect("writer")
        });
        assert!(drained.is_err(), "a closed mirror ends its writer");
        let mut r = out.as_slice();
        for n in 1..=3 {
            assert_eq!(
                wire::read_message(&mut r).expect("a frame"),
                Message::Frame(frame(n))
            );
        }
        assert!(r.is_empty());
        // Closed: dropped again.
        assert!(mirror.frame(frame(11)).is_err());
        assert_eq!(mirror.counts(), (3, 9));
        // A stuck connection fails the writer; nothing else waits.
        let stuck = Mirror::new(one);
        stuck.open();
        stuck.frame(frame(1)).expect("fits");
        assert!(stuck.drain(&mut Stuck).is_err());
    }
}
