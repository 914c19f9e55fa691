//! The acceptance tests of issue 9: a client talking to a replicated guest
//! sees nothing of the death of either host. The primary is SIGKILLed at
//! seeded random points (or dies at each fault-injection point), the
//! secondary takes over, and the client's one TCP echo connection carries
//! on with no byte lost or duplicated, `/count` goes on above every value
//! it saw, every kv record that got its `201` reads back identical, and
//! the guest's own memory self-check keeps passing. A dead secondary
//! leaves the primary `unprotected` and serving.
//!
//! Every test runs in both modes: `remus::*` (the replica is paused, the
//! output waits for checkpoints) and `colo::*` (the replica runs, the
//! output is compared; issue 10's acceptance).
//!
//! `COLO_SEED=n` replays the random kill points; `COLO_KILL_POINTS=n`
//! tries more (or fewer) of them.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::os::unix::process::ExitStatusExt;
use std::thread;
use std::time::{Duration, Instant};

use colo_tests::env_count;
use colo_tests::pair::{seed, self_checks, Pair, PairOptions, Rng, Side, STATE_TIMEOUT};

/// The guest's memory workload during every test here.
const DIRTY_MIB_PER_S: u64 = 64;

/// COLO's periodic checkpoint interval in these tests: far below the
/// default (2 s), so that the kill points and fault points also fall into
/// checkpoints, not only between them.
const COLO_CHECKPOINT_MS: u64 = 200;

/// The pair every test starts from, in `mode`.
fn base(mode: &'static str) -> PairOptions {
    let opts = PairOptions::dirtying(DIRTY_MIB_PER_S).in_mode(mode);
    match mode {
        "colo" => PairOptions {
            checkpoint_ms: COLO_CHECKPOINT_MS,
            ..opts
        },
        _ => opts,
    }
}

/// After the survivor took over (or ran on alone): the client makes
/// progress on every channel, then everything it saw is checked, and the
/// survivor's guest passes a memory self-check after the event. Returns
/// the longest echo gap.
fn client_survives(pair: &mut Pair, w: colo_tests::pair::Workload, survivor: Side) -> Duration {
    let from = pair.serial(survivor).len();
    let w = w.expect_progress(100, 10, 10, pair.topo().client(), || pair.logs());
    let report = w.finish(pair.topo().client());
    eprintln!("{report:?}");
    report.assert_clean(&pair.logs());
    // The guest checks its memory every second: wait for a check that ran
    // after the event.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let serial = pair.serial(survivor);
        let (passed, failed) = self_checks(&serial, from.min(serial.len()));
        assert_eq!(
            failed,
            None,
            "the guest's self-check failed\n{}",
            pair.logs()
        );
        if passed > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no self-check of the guest's memory after the event\n{}",
            pair.logs()
        );
        thread::sleep(Duration::from_millis(20));
    }
    report.longest_echo_gap
}

/// One fresh pair; the primary is SIGKILLed once the client has had
/// `echoes` echo replies and `delay` more; then failover (by request, or
/// by the secondary itself with `auto`).
fn kill_primary_and_fail_over(
    mode: &'static str,
    echoes: u64,
    delay: Duration,
    auto: bool,
) -> Duration {
    let mut pair = Pair::start(PairOptions {
        failover_auto: auto,
        ..base(mode)
    });
    let w = pair.workload();
    let w = w.expect_progress(echoes, 1, 1, pair.topo().client(), || pair.logs());
    // Choosing the point, not synchronising: a random offset into a
    // checkpoint interval.
    thread::sleep(delay);
    pair.kill_primary();
    if auto {
        pair.wait_state(Side::Secondary, &["failed_over"], STATE_TIMEOUT);
    } else {
        pair.failover();
    }
    client_survives(&mut pair, w, Side::Secondary)
}

fn killed_at_random_points(mode: &'static str) {
    let seed = seed(0xc010_0009);
    let points = env_count("COLO_KILL_POINTS", 20);
    let mut rng = Rng::new(seed);
    let mut gaps = Vec::new();
    for i in 0..points {
        let echoes = rng.in_range(10..150);
        let delay = Duration::from_micros(rng.in_range(0..20_000));
        eprintln!(
            "kill point {i}/{points}: after {echoes} echo replies + {delay:?} (COLO_SEED={seed})"
        );
        gaps.push(kill_primary_and_fail_over(mode, echoes, delay, false));
    }
    gaps.sort();
    eprintln!(
        "{mode}: client-visible failover (longest echo gap): min {:?}, median {:?}, max {:?}",
        gaps[0],
        gaps[gaps.len() / 2],
        gaps[gaps.len() - 1]
    );
}

fn fails_over_by_itself(mode: &'static str) {
    let gap = kill_primary_and_fail_over(mode, 50, Duration::ZERO, true);
    eprintln!("{mode}: client-visible failover with --failover auto: {gap:?}");
}

fn killed_secondary(mode: &'static str) {
    let mut pair = Pair::start(base(mode));
    let w = pair.workload();
    let w = w.expect_progress(50, 5, 5, pair.topo().client(), || pair.logs());
    pair.kill_secondary();
    let s = pair.wait_state(Side::Primary, &["unprotected"], STATE_TIMEOUT);
    assert!(s.error.is_some(), "no error says why: {}", s.raw);
    let gap = client_survives(&mut pair, w, Side::Primary);
    // The issue bounds this by the heartbeat timeout (1 s by default):
    // measured here, a target for the benchmarks, not a timed assertion.
    eprintln!("client-visible delay when the secondary died: {gap:?} (heartbeat timeout 1 s)");
}

/// `COLO_FAULT=<side>:<point>:<nth>` makes `side` die at `point`: the
/// survivor serves on and nothing the client saw is lost.
fn dies_at(mode: &'static str, side: Side, point: &str, nth: u32) {
    let spec = format!("{}:{point}:{nth}", side.name());
    let mut pair = Pair::start(base(mode).fault(&spec));
    let w = pair.workload();
    let exit = pair.vmm(side).wait_exit(FAULT_TIMEOUT);
    assert_eq!(
        exit.signal(),
        Some(libc::SIGKILL),
        "the {} was to die at {point} by SIGKILL, but exited {exit}\n{}",
        side.name(),
        pair.logs()
    );
    assert!(
        pair.vmm(side).log().contains(point),
        "the {} did not say it died at {point}\n{}",
        side.name(),
        pair.logs()
    );
    let survivor = match side {
        Side::Primary => {
            pair.failover();
            Side::Secondary
        }
        Side::Secondary => {
            let s = pair.wait_state(Side::Primary, &["unprotected"], STATE_TIMEOUT);
            assert!(s.error.is_some(), "{}", s.raw);
            Side::Primary
        }
    };
    client_survives(&mut pair, w, survivor);
}

/// Checkpoints before a fault fires (Remus: up to 50 a second; COLO: 5 a
/// second and the workload's own): time for the client to get going first.
const NTH: u32 = 40;
const COLO_NTH: u32 = 8;

/// Epochs with disk writes before `mid_disk_apply` fires: the guest writes
/// only for the client's kv stores, one per round trip, and a round trip
/// waits for a checkpoint.
const NTH_WRITE: u32 = 5;

/// For the fault to fire: a debug build on a busy machine checkpoints far
/// less often than every 20 ms.
const FAULT_TIMEOUT: Duration = Duration::from_secs(90);

/// The suite of one mode, as a module of tests named after it.
macro_rules! suite {
    ($mode:ident, $nth:expr) => {
        mod $mode {
            use super::*;

            const MODE: &str = stringify!($mode);

            #[test]
            fn the_primary_killed_at_random_points_fails_over_without_client_visible_loss() {
                killed_at_random_points(MODE);
            }

            #[test]
            fn the_secondary_fails_over_by_itself_with_failover_auto() {
                fails_over_by_itself(MODE);
            }

            #[test]
            fn a_killed_secondary_leaves_the_primary_unprotected_and_serving() {
                killed_secondary(MODE);
            }

            suite!(@faults
                primary_dies_after_pause: Side::Primary, "after_pause", $nth;
                primary_dies_mid_memory: Side::Primary, "mid_memory", $nth;
                primary_dies_after_state: Side::Primary, "after_state", $nth;
                primary_dies_after_ack: Side::Primary, "after_ack", $nth;
                secondary_dies_mid_memory: Side::Secondary, "mid_memory", $nth;
                secondary_dies_after_state: Side::Secondary, "after_state", $nth;
                secondary_dies_before_ack: Side::Secondary, "before_ack", $nth;
                secondary_dies_after_ack: Side::Secondary, "after_ack", $nth;
                secondary_dies_mid_disk_apply: Side::Secondary, "mid_disk_apply", NTH_WRITE;
            );
        }
    };
    (@faults $($name:ident: $side:expr, $point:literal, $nth:expr;)*) => {$(
        #[test]
        fn $name() {
            dies_at(MODE, $side, $point, $nth);
        }
    )*};
}

suite!(remus, NTH);
suite!(colo, COLO_NTH);

/// Live migration, the README's lossless order: pause the primary, take a
/// checkpoint, check that the replica holds exactly the paused state (state
/// hashes equal), shut the primary down, fail over: the guest carries on on
/// host-b with the client's connection, nothing it did lost.
///
/// Remus mode only: a COLO replica runs on while the primary is paused, so
/// its state is the paused primary's only at the moment of a load.
#[test]
fn a_paused_primary_migrates_to_the_secondary_with_nothing_lost() {
    let mut pair = Pair::start(PairOptions::dirtying(DIRTY_MIB_PER_S));
    let w = pair.workload();
    let w = w.expect_progress(50, 5, 5, pair.topo().client(), || pair.logs());
    let paused = pair.pause_and_settle();
    assert_eq!(
        pair.state_hash(Side::Secondary),
        paused,
        "the replica does not hold the paused primary's state\n{}",
        pair.logs()
    );
    let r = colo_tests::http::api_request(
        &pair.primary_sock(),
        "PUT",
        "/actions",
        r#"{"action":"shutdown"}"#,
    )
    .unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    let exit = pair.vmm(Side::Primary).wait_exit(STATE_TIMEOUT);
    assert!(exit.success(), "the primary exited {exit}\n{}", pair.logs());
    pair.failover();
    client_survives(&mut pair, w, Side::Secondary);
}
