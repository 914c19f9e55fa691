//! Property tests of the two engines: random guest activity, link
//! failures and control requests, each case a whole session over
//! loopback TCP with the fakes of `common`.

mod common;

use std::sync::Mutex;

use colo::control::{Cause, CommandError, Control, State};
use colo::primary::PrimaryHandle;
use colo::secondary::Failover;
use colo::PAGE_SIZE;
use common::*;
use proptest::prelude::*;

/// What the guest (or the test, for the guest) does next.
#[derive(Clone, Debug)]
enum Action {
    /// Writes `bytes` at byte `at` of page `page`.
    Mem {
        page: u64,
        at: u64,
        bytes: Vec<u8>,
    },
    /// Writes `sectors` sectors of a pattern from `seed` at `sector`.
    Disk {
        sector: u64,
        sectors: u64,
        seed: u8,
    },
    State(Vec<u8>),
    /// Sends a frame of `len` bytes besides its number.
    Frame {
        len: usize,
    },
    /// A checkpoint on request (not waited for).
    Checkpoint,
    /// A checkpoint on request, waited for.
    Settle,
}

const SECTOR: u64 = 512;

/// A heartbeat timeout no stall of a loaded machine reaches: these
/// properties see a link end, never its silence.
const SLOW_HEARTBEAT_MS: u64 = 10_000;

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => (0..PAGES, 0..PAGE_SIZE, prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(page, at, bytes)| Action::Mem { page, at, bytes }),
        2 => (0..DISK / SECTOR, 1..=16u64, any::<u8>())
            .prop_map(|(sector, sectors, seed)| Action::Disk { sector, sectors, seed }),
        1 => prop::collection::vec(any::<u8>(), 0..32).prop_map(Action::State),
        3 => (0..200usize).prop_map(|len| Action::Frame { len }),
        1 => Just(Action::Checkpoint),
        1 => Just(Action::Settle),
    ]
}

fn actions() -> impl Strategy<Value = Vec<Action>> {
    prop::collection::vec(action(), 0..32)
}

/// Periodic checkpoints every few ms, or (almost) only requested ones.
fn interval() -> impl Strategy<Value = u64> {
    prop_oneof![1..8u64, Just(60_000)]
}

/// The default bound, or one small enough that frames reach it.
fn held_bytes_max() -> impl Strategy<Value = u64> {
    prop_oneof![Just(colo::primary::DEFAULT_HELD_BYTES_MAX), 64..1024u64]
}

/// Does `a` on the guest; `primary` takes the checkpoint requests while
/// the pair is protected (none after the link died).
fn run(g: &SharedGuest, primary: Option<&PrimaryHandle>, a: &Action, frames: &mut u32) {
    match a {
        Action::Mem { page, at, bytes } => {
            let at = page * PAGE_SIZE + at;
            let len = (bytes.len() as u64).min(MEM - at) as usize;
            lock(g).write_mem(at, &bytes[..len]);
        }
        Action::Disk {
            sector,
            sectors,
            seed,
        } => {
            let sectors = (*sectors).min(DISK / SECTOR - sector);
            let data = pattern(sectors * SECTOR, *seed);
            lock(g).write_disk(sector * SECTOR, data);
        }
        Action::State(s) => lock(g).set_state(s.clone()),
        Action::Frame { len } => {
            *frames += 1;
            let mut frame = frames.to_le_bytes().to_vec();
            frame.extend(pattern(*len as u64, *frames as u8));
            // Over the bound, ask for a checkpoint (as `vmm`'s output does).
            let over = lock(g).emit(frame);
            if let Some(p) = primary.filter(|_| over) {
                p.request_checkpoint(Cause::HeldBytes);
            }
        }
        Action::Checkpoint => {
            if let Some(p) = primary {
                p.checkpoint().expect("a checkpoint when protected");
            }
        }
        Action::Settle => {
            if let Some(p) = primary {
                settle(g, p);
            }
        }
    }
}

/// Asks for a checkpoint covering everything the guest did so far and
/// waits for its ack; returns its epoch.
fn settle(g: &SharedGuest, p: &PrimaryHandle) -> u64 {
    let epoch = lock(g).epoch;
    p.checkpoint().expect("a checkpoint when protected");
    wait_for("the checkpoint's ack", || p.status().epoch >= epoch);
    epoch
}

/// Every release found the replica equal to the primary at that
/// checkpoint's capture, epochs were released in order, each once, and
/// the frames out by then were exactly those of the released epochs,
/// in the order the guest sent them. Returns the last released epoch.
fn check_releases(g: &SharedGuest, acked: &Mutex<Vec<Acked>>, early: &Mutex<Vec<u64>>) -> u64 {
    let acked = lock(acked).clone();
    let g = lock(g);
    let epochs: Vec<u64> = acked.iter().map(|a| a.epoch).collect();
    let expected: Vec<u64> = (0..epochs.len() as u64).collect();
    assert_eq!(epochs, expected, "released out of order or twice");
    assert!(
        lock(early).is_empty(),
        "released before commit: {:?}",
        lock(early)
    );
    for a in &acked {
        assert_eq!(
            Some(&a.replica),
            captured(&g, a.epoch),
            "the replica differs from checkpoint {}'s capture",
            a.epoch
        );
        let due: Vec<&Vec<u8>> = g
            .frames
            .iter()
            .filter(|(e, _)| *e <= a.epoch)
            .map(|(_, f)| f)
            .collect();
        assert_eq!(
            a.sent,
            due.len(),
            "frames out once checkpoint {} was acked",
            a.epoch
        );
        assert!(
            g.wire.iter().take(a.sent).eq(due.iter().copied()),
            "frames out of order or not the guest's by checkpoint {}",
            a.epoch
        );
    }
    epochs.last().copied().unwrap_or(0)
}

/// The primary's image at checkpoint `epoch`'s capture.
fn captured(g: &Guest, epoch: u64) -> Option<&Image> {
    g.captures
        .iter()
        .find(|(e, _)| *e == epoch)
        .map(|(_, image)| image)
}

fn assert_no_engine_panics() {
    let panics = engine_panics();
    assert!(panics.is_empty(), "engine threads panicked: {panics:?}");
}

/// Few cases (each is a session): 16, or `PROPTEST_CASES` for a longer
/// hunt.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(16);
    ProptestConfig {
        cases,
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Property 1: whatever the guest does between checkpoints (periodic,
    /// requested, over the held-output bound), each ack finds the replica
    /// equal to the primary at the capture, and output goes out exactly
    /// per acked epoch.
    #[test]
    fn every_ack_leaves_the_replica_equal_to_its_capture(
        actions in actions(),
        checkpoint_ms in interval(),
        held_bytes_max in held_bytes_max(),
    ) {
        let p = pair(Options {
            checkpoint_ms,
            held_bytes_max,
            heartbeat_timeout_ms: SLOW_HEARTBEAT_MS,
            ..Options::default()
        });
        p.protected();
        let mut frames = 0;
        for a in &actions {
            run(&p.guest, Some(&p.primary), a, &mut frames);
        }
        let epoch = settle(&p.guest, &p.primary);
        let last = check_releases(&p.guest, &p.acked, &p.early);
        assert!(last >= epoch, "checkpoint {epoch} acked but not released");
        let g = lock(&p.guest);
        assert_eq!(g.wire.len(), g.frames.len(), "frames left held after their ack");
        drop(g);
        assert!(!lock(&p.releases).contains(&Release::All));
        assert!(lock(&p.fatal).is_empty());
        let s = p.primary.status();
        assert_eq!((s.state, s.error), (State::Protected, None));
        assert_no_engine_panics();
    }
}

/// How the link dies.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// Every connection cut, both ways (a dead link or host).
    Cut,
    /// The primary's engine dropped (its `vmm` shutting down).
    DropPrimary,
}

fn kill() -> impl Strategy<Value = Kill> {
    prop_oneof![Just(Kill::Cut), Just(Kill::DropPrimary)]
}

fn failover_mode() -> impl Strategy<Value = Failover> {
    prop_oneof![Just(Failover::Auto), Just(Failover::Manual)]
}

proptest! {
    #![proptest_config(config())]

    /// Property 2: the link dies at a random point; after failover the
    /// replica is the primary at the last checkpoint the secondary
    /// committed (uncommitted disk writes dropped), that checkpoint is
    /// at least the last one the primary saw acked, and the replica took
    /// over exactly once. No frame is lost or doubled on the primary.
    #[test]
    fn a_failover_resumes_the_last_committed_checkpoint(
        actions in actions(),
        cut_at in any::<prop::sample::Index>(),
        kill in kill(),
        failover in failover_mode(),
        checkpoint_ms in interval(),
    ) {
        let p = pair(Options {
            checkpoint_ms,
            failover,
            relay: true,
            heartbeat_timeout_ms: SLOW_HEARTBEAT_MS,
            ..Options::default()
        });
        p.linked();
        let Pair { guest, replica, primary, secondary, releases, acked, early, relay, .. } = p;
        let cut_at = cut_at.index(actions.len() + 1);
        let mut frames = 0;
        for a in &actions[..cut_at] {
            run(&guest, Some(&primary), a, &mut frames);
        }
        let _primary = match kill {
            Kill::Cut => {
                relay.expect("a relay").cut();
                Some(primary)
            }
            Kill::DropPrimary => {
                drop(primary);
                None
            }
        };
        // The guest runs on, alone.
        for a in &actions[cut_at..] {
            run(&guest, None, a, &mut frames);
        }
        wait_for("the primary to release all output", || {
            lock(&releases).contains(&Release::All)
        });
        let reached = |state: State| wait_state(&*secondary, state);
        if matches!((kill, failover), (Kill::Cut, Failover::Auto)) {
            reached(State::FailedOver);
        } else {
            reached(State::Stopped);
            assert_eq!(lock(&replica).take_overs, 0, "took over unasked");
            secondary.failover().expect("failover on command");
        }
        assert_eq!(
            secondary.failover(),
            Err(CommandError::Conflict("already failed over".into()))
        );
        let last_released = check_releases(&guest, &acked, &early);
        let r = lock(&replica);
        assert_eq!(r.take_overs, 1);
        assert!(r.staged.is_empty(), "uncommitted writes kept");
        let committed = r.committed.expect("checkpoint 0 committed");
        assert!(committed >= last_released, "{committed} < {last_released}");
        assert_eq!(secondary.status().epoch, committed);
        let g = lock(&guest);
        assert_eq!(
            Some(&r.image()),
            captured(&g, committed),
            "the replica is not checkpoint {committed}"
        );
        let all: Vec<&Vec<u8>> = g.frames.iter().map(|(_, f)| f).collect();
        assert!(g.wire.iter().eq(all), "frames lost, doubled or reordered");
        drop((g, r));
        assert_no_engine_panics();
    }
}

#[derive(Clone, Copy, Debug)]
enum Side {
    Primary,
    Secondary,
}

/// A request on either side's control interface.
#[derive(Clone, Debug)]
enum Request {
    Checkpoint(Side),
    Interval(Side, u64),
    Failover(Side),
    /// The output path asking for a checkpoint (held bytes over the bound).
    HeldBytes,
    /// `GET /status` and `GET /metrics`.
    Read(Side),
}

fn side() -> impl Strategy<Value = Side> {
    prop_oneof![Just(Side::Primary), Just(Side::Secondary)]
}

fn request() -> impl Strategy<Value = Request> {
    let ms = prop_oneof![
        Just(0),
        Just(1),
        Just(60_000),
        Just(60_001),
        Just(u64::MAX),
        0..70_000u64,
    ];
    prop_oneof![
        3 => side().prop_map(Request::Checkpoint),
        3 => (side(), ms).prop_map(|(s, ms)| Request::Interval(s, ms)),
        1 => side().prop_map(Request::Failover),
        1 => Just(Request::HeldBytes),
        1 => side().prop_map(Request::Read),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Property 3: control requests in any order never panic and get
    /// the documented answers: a checkpoint only while protected (409
    /// otherwise, always on the secondary), intervals only in
    /// 1..=60000 (400 otherwise), failover on the primary drops the
    /// secondary without a takeover, on the secondary takes over once.
    #[test]
    fn control_requests_get_the_documented_answers(
        requests in prop::collection::vec(request(), 1..16),
        failover in failover_mode(),
    ) {
        let p = pair(Options {
            failover,
            heartbeat_timeout_ms: SLOW_HEARTBEAT_MS,
            ..Options::default()
        });
        p.protected();
        let control = |side: Side| -> &dyn Control {
            match side {
                Side::Primary => &*p.primary,
                Side::Secondary => &*p.secondary,
            }
        };
        // Replication ended by a failover on the primary / the secondary.
        let (mut dropped, mut over) = (false, false);
        let mut interval = [p.primary.status().checkpoint_ms, p.secondary.status().checkpoint_ms];
        for r in &requests {
            match *r {
                Request::Checkpoint(Side::Primary) => {
                    let expected = if dropped || over {
                        Err(CommandError::Conflict(
                            "replication is unprotected, not protected".into(),
                        ))
                    } else {
                        Ok(())
                    };
                    assert_eq!(p.primary.checkpoint(), expected);
                }
                Request::Checkpoint(Side::Secondary) => assert_eq!(
                    p.secondary.checkpoint(),
                    Err(CommandError::Conflict("checkpoints are taken by the primary".into()))
                ),
                Request::Interval(side, ms) => {
                    let got = control(side).set_checkpoint_ms(ms);
                    if (1..=60_000).contains(&ms) {
                        assert_eq!(got, Ok(()));
                        interval[side as usize] = ms;
                    } else {
                        assert_eq!(
                            got,
                            Err(CommandError::Invalid(format!(
                                "checkpoint_ms {ms} is outside 1..=60000"
                            )))
                        );
                    }
                    assert_eq!(control(side).status().checkpoint_ms, interval[side as usize]);
                }
                Request::Failover(Side::Primary) => {
                    assert_eq!(p.primary.failover(), Ok(()));
                    if !dropped && !over {
                        p.wait("dropped", |p, s| {
                            p.state == State::Unprotected && s.state == State::Stopped
                        });
                        assert_eq!(
                            p.primary.status().error.as_deref(),
                            Some("the secondary was dropped on request")
                        );
                        dropped = true;
                    }
                }
                Request::Failover(Side::Secondary) => {
                    let got = p.secondary.failover();
                    if over {
                        assert_eq!(got, Err(CommandError::Conflict("already failed over".into())));
                    } else {
                        assert_eq!(got, Ok(()));
                        over = true;
                        p.wait("failed over", |p, s| {
                            p.state == State::Unprotected && s.state == State::FailedOver
                        });
                    }
                }
                Request::HeldBytes => p.primary.request_checkpoint(Cause::HeldBytes),
                Request::Read(side) => {
                    let c = control(side);
                    let (status, metrics) = (c.status(), c.metrics());
                    assert_eq!(status.checkpoint_ms, interval[side as usize]);
                    assert!(metrics.state.is_some());
                }
            }
            assert_eq!(lock(&p.replica).take_overs, u32::from(over), "after {r:?}");
        }
        if !dropped && !over {
            let s = p.primary.status();
            assert_eq!((s.state, s.error), (State::Protected, None));
        }
        assert!(lock(&p.fatal).is_empty());
        assert_no_engine_panics();
    }
}
