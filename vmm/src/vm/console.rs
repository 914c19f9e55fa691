//! The serial console's output: a bounded buffer drained by a thread of
//! its own, so a vCPU never blocks on a full stdout pipe or a console
//! nobody reads. What does not fit is dropped and counted, with a
//! rate-limited warning.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

use devices::ratelimit::LogLimit;

/// Bytes the console holds for a slow reader before it drops output.
pub const CONSOLE_BUFFER: usize = 1 << 20;

/// How long the VMM waits, when the VM ends, for buffered output to go out.
const FLUSH_ON_CLOSE: Duration = Duration::from_secs(2);

struct Buffer {
    bytes: VecDeque<u8>,
    closed: bool,
    warn: LogLimit,
}

struct Shared {
    buffer: Mutex<Buffer>,
    ready: Condvar,
    capacity: usize,
    dropped: AtomicU64,
}

/// The console sink the UART writes to; it never blocks.
pub struct ConsoleSink {
    shared: Arc<Shared>,
    /// Ends when the writer thread has written everything out.
    done: Option<mpsc::Receiver<()>>,
}

impl ConsoleSink {
    /// Starts the thread that writes to `out`, holding up to `capacity`
    /// bytes for it.
    pub fn spawn(out: Box<dyn Write + Send>, capacity: usize) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            buffer: Mutex::new(Buffer {
                bytes: VecDeque::new(),
                closed: false,
                warn: LogLimit::every_ms(10_000),
            }),
            ready: Condvar::new(),
            capacity,
            dropped: AtomicU64::new(0),
        });
        let (done_tx, done) = mpsc::channel();
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("console".into())
            .spawn(move || {
                drain(&writer, out);
                let _ = done_tx.send(());
            })?;
        Ok(Self {
            shared,
            done: Some(done),
        })
    }

    /// Bytes dropped because the reader did not keep up.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

/// Writes out what the sink buffers until it is closed and empty.
fn drain(shared: &Shared, mut out: Box<dyn Write + Send>) {
    let mut chunk = Vec::new();
    loop {
        {
            let mut buffer = devices::lock(&shared.buffer);
            while buffer.bytes.is_empty() && !buffer.closed {
                buffer = shared.ready.wait(buffer).unwrap_or_else(|p| p.into_inner());
            }
            if buffer.bytes.is_empty() {
                return;
            }
            chunk.clear();
            chunk.extend(buffer.bytes.drain(..));
        }
        if let Err(e) = out.write_all(&chunk).and_then(|()| out.flush()) {
            tracing::warn!("serial console output failed, dropping it from now on: {e}");
            let mut buffer = devices::lock(&shared.buffer);
            buffer.closed = true;
            buffer.bytes.clear();
            buffer.bytes.shrink_to_fit();
            return;
        }
    }
}

impl Write for ConsoleSink {
    /// Takes what fits; the rest is dropped and counted. Never blocks on
    /// the reader.
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let shared = &self.shared;
        let mut buffer = devices::lock(&shared.buffer);
        if buffer.closed {
            return Ok(data.len());
        }
        // The writer waits only on an empty buffer: wake it only then.
        let wake = buffer.bytes.is_empty();
        let room = shared.capacity.saturating_sub(buffer.bytes.len());
        let take = room.min(data.len());
        buffer.bytes.extend(&data[..take]);
        let lost = (data.len() - take) as u64;
        if lost > 0 {
            let total = shared.dropped.fetch_add(lost, Ordering::Relaxed) + lost;
            if buffer.warn.allow().is_some() {
                tracing::warn!(
                    dropped_bytes = total,
                    "serial console reader is not keeping up: dropping guest output"
                );
            }
        }
        drop(buffer);
        if wake {
            shared.ready.notify_one();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleSink {
    /// Lets the writer finish what is buffered, waiting a bounded time.
    fn drop(&mut self) {
        devices::lock(&self.shared.buffer).closed = true;
        self.shared.ready.notify_one();
        if let Some(done) = self.done.take() {
            if done.recv_timeout(FLUSH_ON_CLOSE).is_err() {
                tracing::warn!("serial console output not flushed: its reader is stuck");
            }
        }
    }
}

/// Opens `path` for the console: a new or existing regular file (truncated),
/// never through a symlink and never a device, FIFO or socket.
pub fn open_console_file(path: &Path) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        // O_NONBLOCK: a FIFO without reader fails instead of blocking here.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .mode(0o600)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    file.set_len(0)?;
    // SAFETY: F_SETFL on a descriptor we own, with flags read just before.
    unsafe {
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(file)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A writer that blocks until released, like a pipe nobody reads.
    struct Stuck {
        release: mpsc::Receiver<()>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Stuck {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            let _ = self.release.recv();
            self.got.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn writes_never_block_on_a_stuck_reader_and_overflow_is_counted() {
        let (release, release_rx) = mpsc::channel();
        let got = Arc::new(Mutex::new(Vec::new()));
        let out = Stuck {
            release: release_rx,
            got: got.clone(),
        };
        let mut sink = ConsoleSink::spawn(Box::new(out), 16).unwrap();
        // The writer thread takes the first byte and blocks on it; the
        // buffer then fills and the rest is dropped, all without blocking.
        for b in 0..100u8 {
            assert_eq!(sink.write(&[b]).unwrap(), 1);
        }
        assert!(sink.dropped() >= 100 - 2 * 16, "{}", sink.dropped());
        let kept = 100 - sink.dropped() as usize;
        for _ in 0..100 {
            let _ = release.send(());
        }
        drop(sink);
        let got = got.lock().unwrap();
        assert_eq!(got.len(), kept);
        assert_eq!(got[0], 0);
    }

    #[test]
    fn a_console_file_must_be_a_regular_file_and_no_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("console");
        std::fs::write(&file, "old").unwrap();
        let mut f = open_console_file(&file).unwrap();
        f.write_all(b"new").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(open_console_file(&link).is_err());
        assert!(open_console_file(dir.path()).is_err());
        assert!(open_console_file(Path::new("/dev/null")).is_err());
    }
}
