//! The secondary's staging: every message of the data connection goes
//! through [`Staging::feed`], which refuses anything out of order or out
//! of range and collects each checkpoint whole. Only a complete, checked
//! checkpoint comes out ([`Staged::Complete`]); nothing before that may
//! touch the replica.
//!
//! Order on the data connection (primary -> secondary):
//!
//! ```text
//! Hello
//! (DiskBlock | SyncPages)*                      initial sync
//! Begin(0) Pages(0)* State(0) End(0)            checkpoint 0
//! then for N = 1, 2, ...:
//!   DiskWrite(N | N+1)*                         writes of epoch N, and
//!                                               of N+1 once N is captured
//!   Begin(N) (Pages(N) | DiskWrite(N+1))* State(N) (DiskWrite(N+1))* End(N)
//! ```
//!
//! State may come anywhere inside Begin..End (once); End needs every
//! announced page and the state.

use crate::vm::{DiskWrite, PageBatch, StateDigest};
use crate::wire::{Hello, Message, MAX_PAYLOAD};
use crate::PAGE_SIZE;

/// What the replica accepts: its memory size and disk capacities.
#[derive(Clone, Debug)]
pub struct Limits {
    pub mem_size: u64,
    pub disks: Vec<u64>,
}

/// One complete checkpoint, checked against [`Limits`] and its Begin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub epoch: u64,
    pub pages: PageBatch,
    pub state: Vec<u8>,
    pub digest: Option<StateDigest>,
}

/// What a message fed to [`Staging`] asks the engine to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Staged {
    /// Absorbed into the checkpoint being staged.
    Nothing,
    /// The session begins: check the primary's side.
    Hello(Hello),
    /// Initial sync: pages for the replica's memory.
    SyncPages(PageBatch),
    /// Initial sync: a block for disk `disk`'s image.
    DiskBlock {
        disk: usize,
        offset: u64,
        data: Vec<u8>,
    },
    /// A forwarded write, to hold until its epoch commits.
    DiskWrite(DiskWrite),
    /// This batch (or, with no pages announced, the Begin) brought the
    /// checkpoint to half its pages.
    HalfPages,
    /// The checkpoint's state arrived.
    StateIn,
    /// The checkpoint is complete: load it.
    Complete(Checkpoint),
}

/// A message the staging refused; replication ends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StagingError(pub String);

struct Building {
    epoch: u64,
    announced: u64,
    state_len: u64,
    digest: Option<StateDigest>,
    pages: PageBatch,
    state: Option<Vec<u8>>,
}

enum Phase {
    /// Nothing received yet.
    Hello,
    /// Initial sync, before checkpoint 0.
    Sync,
    /// Between checkpoints; `committed` is out.
    Between {
        committed: u64,
    },
    Building(Box<Building>),
    /// An error was returned: everything is refused from now on.
    Failed,
}

/// The secondary's staging state machine.
pub struct Staging {
    limits: Limits,
    phase: Phase,
}

fn err<T>(text: impl Into<String>) -> Result<T, StagingError> {
    Err(StagingError(text.into()))
}

impl Staging {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            phase: Phase::Hello,
        }
    }

    /// The last complete checkpoint handed out.
    pub fn committed(&self) -> Option<u64> {
        match &self.phase {
            Phase::Between { committed } => Some(*committed),
            Phase::Building(b) => b.epoch.checked_sub(1),
            _ => None,
        }
    }

    /// Feeds one message of the data connection. After an error every
    /// later message is refused too.
    pub fn feed(&mut self, msg: Message) -> Result<Staged, StagingError> {
        let result = self.step(msg);
        if result.is_err() {
            self.phase = Phase::Failed;
        }
        result
    }

    fn where_(&self) -> String {
        match &self.phase {
            Phase::Hello => "before the hello".into(),
            Phase::Sync => "during the initial sync".into(),
            Phase::Between { committed } => format!("after checkpoint {committed}"),
            Phase::Building(b) => format!("inside checkpoint {}", b.epoch),
            Phase::Failed => "after an error".into(),
        }
    }

    fn step(&mut self, msg: Message) -> Result<Staged, StagingError> {
        let kind = msg.kind();
        let unexpected = |s: &Self| err(format!("unexpected {kind} message {}", s.where_()));
        match (&mut self.phase, msg) {
            (Phase::Failed, _) => unexpected(self),
            (Phase::Hello, Message::Hello(h)) => {
                self.phase = Phase::Sync;
                Ok(Staged::Hello(h))
            }
            (Phase::Sync, Message::SyncPages(batch)) => {
                self.check_pages(&batch)?;
                Ok(Staged::SyncPages(batch))
            }
            (Phase::Sync, Message::DiskBlock { disk, offset, data }) => {
                let disk = self.check_disk(disk, offset, data.len())?;
                Ok(Staged::DiskBlock { disk, offset, data })
            }
            (
                Phase::Sync,
                Message::CheckpointBegin {
                    epoch: 0,
                    pages,
                    state_len,
                    digest,
                },
            ) => self.begin(0, pages, state_len, digest),
            (
                Phase::Between { committed },
                Message::CheckpointBegin {
                    epoch,
                    pages,
                    state_len,
                    digest,
                },
            ) if Some(epoch) == committed.checked_add(1) => {
                self.begin(epoch, pages, state_len, digest)
            }
            (Phase::Between { committed }, Message::DiskWrite(w)) => {
                // Epoch c+1's writes, and c+2's once c+1 is captured
                // (the checkpoint's own messages may still be queued
                // behind them).
                let c = *committed;
                if w.epoch <= c || w.epoch - c > 2 {
                    return err(format!(
                        "disk write of epoch {} after checkpoint {c}",
                        w.epoch
                    ));
                }
                self.check_disk(w.disk, w.offset, w.data.len())?;
                Ok(Staged::DiskWrite(w))
            }
            (Phase::Building(b), Message::DiskWrite(w)) => {
                if Some(w.epoch) != b.epoch.checked_add(1) {
                    return err(format!(
                        "disk write of epoch {} inside checkpoint {}",
                        w.epoch, b.epoch
                    ));
                }
                self.check_disk(w.disk, w.offset, w.data.len())?;
                Ok(Staged::DiskWrite(w))
            }
            (Phase::Building(b), Message::Pages { epoch, batch }) if epoch == b.epoch => {
                let before = b.pages.len() as u64;
                let after = before + batch.len() as u64;
                if after > b.announced {
                    return err(format!(
                        "checkpoint {epoch} brings more than its {} announced pages",
                        b.announced
                    ));
                }
                let announced = b.announced;
                self.check_pages(&batch)?;
                let Phase::Building(b) = &mut self.phase else {
                    return unexpected(self);
                };
                b.pages.addrs.extend_from_slice(&batch.addrs);
                b.pages.data.extend_from_slice(&batch.data);
                let half = before * 2 < announced && after * 2 >= announced;
                Ok(if half {
                    Staged::HalfPages
                } else {
                    Staged::Nothing
                })
            }
            (Phase::Building(b), Message::State { epoch, bytes }) if epoch == b.epoch => {
                if b.state.is_some() {
                    return err(format!("a second state in checkpoint {epoch}"));
                }
                if bytes.len() as u64 != b.state_len {
                    return err(format!(
                        "checkpoint {epoch}'s state has {} bytes, {} announced",
                        bytes.len(),
                        b.state_len
                    ));
                }
                b.state = Some(bytes);
                Ok(Staged::StateIn)
            }
            (Phase::Building(b), Message::CheckpointEnd { epoch }) if epoch == b.epoch => {
                if (b.pages.len() as u64) != b.announced {
                    return err(format!(
                        "checkpoint {epoch} ends with {} of its {} pages",
                        b.pages.len(),
                        b.announced
                    ));
                }
                let Some(state) = b.state.take() else {
                    return err(format!("checkpoint {epoch} ends without its state"));
                };
                let checkpoint = Checkpoint {
                    epoch,
                    pages: std::mem::take(&mut b.pages),
                    state,
                    digest: b.digest.take(),
                };
                self.phase = Phase::Between { committed: epoch };
                Ok(Staged::Complete(checkpoint))
            }
            (_, Message::CheckpointBegin { epoch, .. }) => {
                let expected = match self.committed() {
                    Some(c) => format!("{}", c.saturating_add(1)),
                    None => "0".into(),
                };
                err(format!(
                    "checkpoint {epoch} begins {} (expected {expected}, after an end)",
                    self.where_()
                ))
            }
            _ => unexpected(self),
        }
    }

    fn begin(
        &mut self,
        epoch: u64,
        pages: u64,
        state_len: u64,
        digest: Option<StateDigest>,
    ) -> Result<Staged, StagingError> {
        if pages > self.limits.mem_size / PAGE_SIZE {
            return err(format!(
                "checkpoint {epoch} announces {pages} pages, more than guest memory holds"
            ));
        }
        if state_len > u64::from(MAX_PAYLOAD) {
            return err(format!(
                "checkpoint {epoch} announces {state_len} bytes of state"
            ));
        }
        self.phase = Phase::Building(Box::new(Building {
            epoch,
            announced: pages,
            state_len,
            digest,
            pages: PageBatch::default(),
            state: None,
        }));
        // No pages announced: half of them are in already.
        Ok(if pages == 0 {
            Staged::HalfPages
        } else {
            Staged::Nothing
        })
    }

    fn check_pages(&self, batch: &PageBatch) -> Result<(), StagingError> {
        if !batch.is_well_formed() {
            return err("a page batch whose data does not match its addresses");
        }
        for &addr in &batch.addrs {
            if addr % PAGE_SIZE != 0 {
                return err(format!("page address {addr:#x} is not page-aligned"));
            }
            if addr
                .checked_add(PAGE_SIZE)
                .is_none_or(|end| end > self.limits.mem_size)
            {
                return err(format!(
                    "page address {addr:#x} is beyond guest memory ({:#x} bytes)",
                    self.limits.mem_size
                ));
            }
        }
        Ok(())
    }

    fn check_disk(&self, disk: u16, offset: u64, len: usize) -> Result<usize, StagingError> {
        let Some(&capacity) = self.limits.disks.get(usize::from(disk)) else {
            return err(format!(
                "disk {disk} does not exist ({} disks)",
                self.limits.disks.len()
            ));
        };
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > capacity)
        {
            return err(format!(
                "{len} bytes at {offset} are beyond disk {disk} ({capacity} bytes)"
            ));
        }
        Ok(usize::from(disk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Mode;
    use crate::vm::Identity;
    use proptest::prelude::*;

    const MEM_PAGES: u64 = 16;
    const DISK: u64 = 8192;

    fn limits() -> Limits {
        Limits {
            mem_size: MEM_PAGES * PAGE_SIZE,
            disks: vec![DISK],
        }
    }

    fn hello() -> Message {
        Message::Hello(Hello {
            version: 1,
            mode: Mode::Remus,
            session: 1,
            identity: Identity {
                mem_size: MEM_PAGES * PAGE_SIZE,
                vcpus: 1,
                devices: vec![],
                disks: vec![DISK],
                cpu_template: String::new(),
                cpuid_hash: 0,
                tsc_khz: 0,
            },
        })
    }

    fn pages(which: &[(u64, u8)]) -> PageBatch {
        PageBatch {
            addrs: which.iter().map(|p| p.0 * PAGE_SIZE).collect(),
            data: which
                .iter()
                .flat_map(|p| std::iter::repeat_n(p.1, PAGE_SIZE as usize))
                .collect(),
        }
    }

    fn write(epoch: u64, offset: u64) -> Message {
        Message::DiskWrite(DiskWrite {
            epoch,
            disk: 0,
            offset,
            data: vec![epoch as u8; 16],
        })
    }

    /// One generated checkpoint: its page batches, state, digest and the
    /// disk writes around it.
    #[derive(Clone, Debug)]
    struct Gen {
        batches: Vec<Vec<(u64, u8)>>,
        state: Vec<u8>,
        digest: bool,
        writes_before: usize,
        writes_inside: usize,
    }

    fn gen() -> impl Strategy<Value = Gen> {
        (
            proptest::collection::vec(
                proptest::collection::vec((0..MEM_PAGES, any::<u8>()), 0..3),
                0..3,
            ),
            proptest::collection::vec(any::<u8>(), 0..8),
            any::<bool>(),
            0..3usize,
            0..3usize,
        )
            .prop_map(
                |(batches, state, digest, writes_before, writes_inside)| Gen {
                    batches,
                    state,
                    digest,
                    writes_before,
                    writes_inside,
                },
            )
    }

    /// A valid stream and the checkpoints it must yield.
    fn valid(sync: &[(u64, u8)], gens: &[Gen]) -> (Vec<Message>, Vec<Checkpoint>) {
        let mut msgs = vec![hello(), Message::SyncPages(pages(sync))];
        msgs.push(Message::DiskBlock {
            disk: 0,
            offset: 0,
            data: vec![1; 512],
        });
        let mut out = Vec::new();
        for (epoch, g) in gens.iter().enumerate() {
            let epoch = epoch as u64;
            if epoch > 0 {
                msgs.extend((0..g.writes_before).map(|i| write(epoch, i as u64 * 16)));
            }
            let all: Vec<(u64, u8)> = g.batches.concat();
            let digest = g.digest.then(|| StateDigest {
                hash: epoch,
                parts: vec![("memory".into(), epoch)],
            });
            msgs.push(Message::CheckpointBegin {
                epoch,
                pages: all.len() as u64,
                state_len: g.state.len() as u64,
                digest: digest.clone(),
            });
            for b in &g.batches {
                msgs.push(Message::Pages {
                    epoch,
                    batch: pages(b),
                });
                if epoch > 0 {
                    msgs.extend((0..g.writes_inside).map(|i| write(epoch + 1, i as u64)));
                }
            }
            msgs.push(Message::State {
                epoch,
                bytes: g.state.clone(),
            });
            msgs.push(Message::CheckpointEnd { epoch });
            out.push(Checkpoint {
                epoch,
                pages: pages(&all),
                state: g.state.clone(),
                digest,
            });
        }
        (msgs, out)
    }

    /// Feeds `msgs`; the complete checkpoints, or the first error.
    fn run(msgs: Vec<Message>) -> Result<Vec<Checkpoint>, StagingError> {
        let mut s = Staging::new(limits());
        let mut out = Vec::new();
        for m in msgs {
            if let Staged::Complete(c) = s.feed(m)? {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// Ways to break a valid stream, each always out of order.
    #[derive(Clone, Debug)]
    enum Break {
        SecondHello,
        PagesOutside,
        BeginEpoch(u64),
        DropEnd,
        OldWrite,
        FarWrite,
        Unaligned,
        BeyondMemory,
        BeyondDisk,
        StateLength,
        ExtraPage,
        SyncAfterCheckpoint,
        Reply,
    }

    fn breaks() -> impl Strategy<Value = Break> {
        prop_oneof![
            Just(Break::SecondHello),
            Just(Break::PagesOutside),
            (1..5u64).prop_map(Break::BeginEpoch),
            Just(Break::DropEnd),
            Just(Break::OldWrite),
            Just(Break::FarWrite),
            Just(Break::Unaligned),
            Just(Break::BeyondMemory),
            Just(Break::BeyondDisk),
            Just(Break::StateLength),
            Just(Break::ExtraPage),
            Just(Break::SyncAfterCheckpoint),
            Just(Break::Reply),
        ]
    }

    /// Index of the `n`th (mod count) message matching `f`.
    fn nth(msgs: &[Message], n: usize, f: impl Fn(&Message) -> bool) -> usize {
        let found: Vec<usize> = (0..msgs.len()).filter(|&i| f(&msgs[i])).collect();
        found[n % found.len()]
    }

    fn apply(msgs: &mut Vec<Message>, b: &Break, n: usize) {
        let ends = |m: &Message| matches!(m, Message::CheckpointEnd { .. });
        let begins = |m: &Message| matches!(m, Message::CheckpointBegin { .. });
        match b {
            Break::SecondHello => {
                let at = 1 + n % msgs.len();
                msgs.insert(at, hello());
            }
            Break::PagesOutside => {
                // Right after a checkpoint's end, or during the sync.
                let at = if n % 2 == 0 {
                    nth(msgs, n, ends) + 1
                } else {
                    1
                };
                msgs.insert(
                    at,
                    Message::Pages {
                        epoch: n as u64 % 3,
                        batch: pages(&[(0, 1)]),
                    },
                );
            }
            Break::BeginEpoch(delta) => {
                let at = nth(msgs, n, begins);
                if let Message::CheckpointBegin { epoch, .. } = &mut msgs[at] {
                    *epoch += delta;
                }
            }
            Break::DropEnd => {
                // Not the last one: the next begin then comes inside.
                let count = msgs.iter().filter(|m| ends(m)).count();
                let at = nth(&msgs[..], n % (count - 1), ends);
                msgs.remove(at);
            }
            Break::OldWrite => {
                let at = nth(msgs, n, ends);
                let Message::CheckpointEnd { epoch } = msgs[at] else {
                    return;
                };
                msgs.insert(at + 1, write(epoch, 0));
            }
            Break::FarWrite => {
                let at = nth(msgs, n, ends);
                let Message::CheckpointEnd { epoch } = msgs[at] else {
                    return;
                };
                msgs.insert(at + 1, write(epoch + 3, 0));
            }
            Break::Unaligned | Break::BeyondMemory => {
                let unaligned = matches!(b, Break::Unaligned);
                let at = nth(msgs, n, |m| match m {
                    Message::SyncPages(p) | Message::Pages { batch: p, .. } => !p.is_empty(),
                    _ => false,
                });
                if let Message::SyncPages(p) | Message::Pages { batch: p, .. } = &mut msgs[at] {
                    p.addrs[0] = if unaligned {
                        p.addrs[0] + 8
                    } else {
                        MEM_PAGES * PAGE_SIZE
                    };
                }
            }
            Break::BeyondDisk => {
                let at = nth(msgs, n, |m| {
                    matches!(m, Message::DiskBlock { .. } | Message::DiskWrite(_))
                });
                match &mut msgs[at] {
                    Message::DiskBlock { offset, .. } => *offset = DISK,
                    Message::DiskWrite(w) => w.disk = 1,
                    _ => {}
                }
            }
            Break::StateLength => {
                let at = nth(msgs, n, |m| matches!(m, Message::State { .. }));
                if let Message::State { bytes, .. } = &mut msgs[at] {
                    bytes.push(0);
                }
            }
            Break::ExtraPage => {
                let at = nth(msgs, n, ends);
                let Message::CheckpointEnd { epoch } = msgs[at] else {
                    return;
                };
                msgs.insert(
                    at,
                    Message::Pages {
                        epoch,
                        batch: pages(&[(1, 2)]),
                    },
                );
            }
            Break::SyncAfterCheckpoint => {
                let at = nth(msgs, n, ends);
                msgs.insert(at + 1, Message::SyncPages(pages(&[(2, 3)])));
            }
            Break::Reply => {
                let at = 1 + n % msgs.len();
                msgs.insert(at, Message::Ack { epoch: 0 });
            }
        }
    }

    proptest! {
        #[test]
        fn random_messages_never_panic(msgs in proptest::collection::vec(crate::wire::tests::message(), 0..16)) {
            let _ = run(msgs);
        }

        #[test]
        fn a_valid_stream_yields_exactly_its_checkpoints(
            sync in proptest::collection::vec((0..MEM_PAGES, any::<u8>()), 0..4),
            gens in proptest::collection::vec(gen(), 1..5),
        ) {
            let (msgs, expected) = valid(&sync, &gens);
            prop_assert_eq!(run(msgs).expect("a valid stream is accepted"), expected);
        }

        #[test]
        fn an_out_of_order_stream_is_always_refused(
            sync in proptest::collection::vec((0..MEM_PAGES, any::<u8>()), 1..4),
            gens in proptest::collection::vec(gen(), 2..5),
            b in breaks(),
            n in any::<usize>(),
        ) {
            let (mut msgs, _) = valid(&sync, &gens);
            apply(&mut msgs, &b, n);
            prop_assert!(run(msgs.clone()).is_err(), "{:?} accepted: {:?}", b, msgs);
        }
    }

    #[test]
    fn nothing_is_accepted_after_an_error() {
        let mut s = Staging::new(limits());
        s.feed(hello()).expect("hello");
        s.feed(Message::Ack { epoch: 0 }).expect_err("a reply");
        let again = s.feed(Message::SyncPages(pages(&[(0, 0)])));
        assert!(again.is_err());
    }

    #[test]
    fn errors_name_the_cause() {
        let (mut msgs, _) = valid(&[], &[gen_plain(), gen_plain()]);
        msgs.insert(
            2,
            Message::Pages {
                epoch: 0,
                batch: pages(&[(0, 0)]),
            },
        );
        assert_eq!(
            run(msgs).expect_err("refused").0,
            "unexpected pages message during the initial sync"
        );
    }

    fn gen_plain() -> Gen {
        Gen {
            batches: vec![vec![(1, 1)]],
            state: vec![1, 2],
            digest: true,
            writes_before: 1,
            writes_inside: 1,
        }
    }
}
