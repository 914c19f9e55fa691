//! A file layer in memory for the tests: files with a durable part and
//! the writes since their last sync, a count of every write, truncate and
//! sync, and a crash at any one of them.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::journal::JournalFile;
use crate::secondary::{Image, ReadImage};

#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Clone, Debug, Default)]
struct FileState {
    /// What survives any crash.
    durable: Vec<u8>,
    /// Since the last sync, in order.
    pending: Vec<Op>,
    /// What reads see: durable with pending applied.
    view: Vec<u8>,
}

fn apply(data: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write(offset, bytes) => {
            let at = *offset as usize;
            if data.len() < at + bytes.len() {
                data.resize(at + bytes.len(), 0);
            }
            data[at..at + bytes.len()].copy_from_slice(bytes);
        }
        Op::SetLen(len) => data.resize(*len as usize, 0),
    }
}

/// How a crash treats the writes not yet synced.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Loss {
    /// All of them reached the disk.
    None,
    /// None of them did.
    All,
    /// Those whose bit (index mod 64) is clear in the mask were lost.
    Some(u64),
}

#[derive(Debug, Default)]
pub(crate) struct World {
    files: Vec<FileState>,
    ops: usize,
    /// The index of the operation that does not happen (nor any after).
    crash_at: Option<usize>,
    /// The crashing operation, a write, leaves its first half.
    torn: bool,
    /// Fail (an I/O error, no crash) the next write to this file.
    fail_write: Option<usize>,
}

pub(crate) type Shared = Arc<Mutex<World>>;

impl World {
    pub(crate) fn new(files: Vec<Vec<u8>>) -> Shared {
        let files = files
            .into_iter()
            .map(|d| FileState {
                durable: d.clone(),
                pending: Vec::new(),
                view: d,
            })
            .collect();
        Arc::new(Mutex::new(World {
            files,
            ..World::default()
        }))
    }

    pub(crate) fn lock(w: &Shared) -> MutexGuard<'_, World> {
        w.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Operations so far.
    pub(crate) fn ops(&self) -> usize {
        self.ops
    }

    pub(crate) fn crash_at(&mut self, op: usize, torn: bool) {
        self.crash_at = Some(op);
        self.torn = torn;
    }

    pub(crate) fn fail_next_write(&mut self, file: usize) {
        self.fail_write = Some(file);
    }

    pub(crate) fn crashed(&self) -> bool {
        self.crash_at.is_some_and(|c| self.ops > c)
    }

    /// What a read of `file` sees now.
    pub(crate) fn contents(&self, file: usize) -> Vec<u8> {
        self.files[file].view.clone()
    }

    /// The files after the machine came back: the durable bytes and the
    /// pending operations `loss` kept, in order.
    pub(crate) fn reboot(&self, loss: Loss) -> Shared {
        let files = self
            .files
            .iter()
            .map(|f| {
                let mut data = f.durable.clone();
                for (i, op) in f.pending.iter().enumerate() {
                    let kept = match loss {
                        Loss::None => true,
                        Loss::All => false,
                        Loss::Some(mask) => mask & (1 << (i % 64)) != 0,
                    };
                    if kept {
                        apply(&mut data, op);
                    }
                }
                data
            })
            .collect();
        World::new(files)
    }

    /// Counts an operation; an error once the crash point is reached.
    fn op(&mut self) -> Result<(), Crash> {
        let n = self.ops;
        self.ops += 1;
        match self.crash_at {
            Some(c) if n == c => Err(Crash { now: true }),
            Some(c) if n > c => Err(Crash { now: false }),
            _ => Ok(()),
        }
    }

    fn mutate(&mut self, file: usize, op: Op) -> io::Result<()> {
        if let Err(crash) = self.op() {
            if let (true, true, Op::Write(offset, data)) = (crash.now, self.torn, &op) {
                let half = Op::Write(*offset, data[..data.len() / 2].to_vec());
                let f = &mut self.files[file];
                apply(&mut f.view, &half);
                f.pending.push(half);
            }
            return Err(io::Error::other("crashed"));
        }
        if matches!(op, Op::Write(..)) && self.fail_write == Some(file) {
            self.fail_write = None;
            return Err(io::Error::other("injected write error"));
        }
        let f = &mut self.files[file];
        apply(&mut f.view, &op);
        f.pending.push(op);
        Ok(())
    }
}

struct Crash {
    now: bool,
}

/// One file of a [`World`].
#[derive(Debug)]
pub(crate) struct Fake {
    pub(crate) world: Shared,
    pub(crate) file: usize,
}

impl Fake {
    pub(crate) fn new(world: &Shared, file: usize) -> Self {
        Self {
            world: world.clone(),
            file,
        }
    }
}

impl Image for Fake {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        World::lock(&self.world).mutate(self.file, Op::Write(offset, data.to_vec()))
    }

    fn sync(&mut self) -> io::Result<()> {
        let mut w = World::lock(&self.world);
        w.op().map_err(|_| io::Error::other("crashed"))?;
        let f = &mut w.files[self.file];
        f.durable = f.view.clone();
        f.pending.clear();
        Ok(())
    }
}

impl ReadImage for Fake {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let w = World::lock(&self.world);
        let view = &w.files[self.file].view;
        let at = usize::try_from(offset).unwrap_or(usize::MAX);
        let src = at
            .checked_add(buf.len())
            .and_then(|end| view.get(at..end))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl JournalFile for Fake {
    fn size(&mut self) -> io::Result<u64> {
        Ok(World::lock(&self.world).files[self.file].view.len() as u64)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        World::lock(&self.world).mutate(self.file, Op::SetLen(len))
    }
}
