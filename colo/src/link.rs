//! What both engines share: socket set-up, the ordered outgoing queue of
//! the primary's data connection, page batching and a stoppable wait.

use std::collections::VecDeque;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::vm::PageBatch;
use crate::wire::{self, Message};
use crate::PAGE_SIZE;

/// Disk blocks are compared and sent in blocks of this size.
pub const SYNC_BLOCK: u32 = 64 << 10;

/// Pages per Pages/SyncPages message (1 MiB of data).
pub const BATCH_PAGES: usize = 256;

/// Most hashes per DiskHashes message (8 MiB).
pub const HASHES_PER_MESSAGE: usize = 1 << 20;

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
        let frame = wire::encode(msg).map_err(io::Error::other)?;
        let len = frame.len();
        let mut inner = lock(&self.inner);
        if let Some(why) = &inner.closed {
            return Err(closed(why));
        }
        inner.bytes += len;
        inner.frames.push_back(frame);
        self.cv.notify_all();
        Ok(len)
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
