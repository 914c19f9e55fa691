//! Whole replication sessions over loopback TCP, with a fake guest on the
//! primary and a fake replica on the secondary (see `common`).

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use colo::control::{Control, Mode, State};
use colo::primary;
use colo::secondary::Failover;
use colo::vm::Identity;
use colo::wire::{self, Message, Welcome};
use common::*;

#[test]
fn a_session_replicates_memory_state_and_disks() {
    let p = pair(Options::default());
    p.protected();
    let s = p.primary.status();
    assert_eq!(s.sync_pages, PAGES, "pre-copy sent all memory once");
    assert_eq!(s.sync_disk_bytes, 65536, "only the differing block is sent");
    assert_eq!(p.secondary.status().sync_disk_bytes, 65536);
    for n in 1..=20 {
        let epoch = act(&p.guest, n);
        if n % 5 == 0 {
            p.primary.checkpoint().expect("a checkpoint on request");
            p.settle(epoch);
            p.assert_equal();
        }
    }
    p.primary.set_checkpoint_ms(1).expect("interval");
    assert!(p.primary.set_checkpoint_ms(0).is_err());
    let epoch = act(&p.guest, 21);
    p.settle(epoch);
    p.assert_equal();

    let status = p.primary.status();
    assert!(status.checkpoints >= 4, "{status:?}");
    // The secondary commits before the primary hears of it.
    assert!(p.secondary.status().epoch >= status.epoch);
    assert!(
        lock(&p.early).is_empty(),
        "released before commit: {:?}",
        lock(&p.early)
    );
    let releases = lock(&p.releases).clone();
    assert!(releases.contains(&Release::Epoch(status.epoch)));
    assert!(!releases.contains(&Release::All));
    let m = p.primary.metrics();
    // Read after the status, and checkpoints go on: at least as many.
    assert!(m.pause.count >= status.checkpoints && m.pause.count > 0);
    assert!(m.checkpoint_bytes > 0);
    assert_eq!(p.secondary.checkpoint().map_err(|_| ()), Err(()));
}

#[test]
fn a_failover_on_the_primary_drops_the_secondary_without_a_takeover() {
    let p = pair(Options::default());
    p.protected();
    p.primary.failover().expect("failover");
    wait_for("the secondary to stop", || {
        p.secondary.status().state == State::Stopped
    });
    let s = p.secondary.status();
    assert!(
        s.error
            .as_deref()
            .is_some_and(|e| e.contains("the primary ended replication")),
        "{s:?}"
    );
    wait_for("the primary to run alone", || {
        p.primary.status().state == State::Unprotected
    });
    assert_eq!(lock(&p.replica).take_overs, 0);
    assert!(lock(&p.releases).contains(&Release::All));
    assert_eq!(
        p.primary.checkpoint().map_err(|_| ()),
        Err(()),
        "no checkpoint when unprotected"
    );
}

#[test]
fn a_flipped_byte_ends_replication_and_leaves_the_last_checkpoint() {
    let p = pair(Options {
        relay: true,
        ..Options::default()
    });
    let relay = p.relay.clone().expect("a relay");
    p.protected();
    let epoch = act(&p.guest, 1);
    p.settle(epoch);
    p.assert_equal();
    let (mem, state, disk) = {
        let r = lock(&p.replica);
        (r.mem.clone(), r.state.clone(), r.disk.clone())
    };
    relay.flip.store(true, Ordering::SeqCst);
    act(&p.guest, 2);
    wait_for("the secondary to stop", || {
        p.secondary.status().state == State::Stopped
    });
    let err = p.secondary.status().error.expect("an error");
    assert!(
        ["CRC", "magic", "truncated", "exceeds"]
            .iter()
            .any(|cause| err.contains(cause)),
        "{err}"
    );
    wait_for("the primary to run alone", || {
        p.primary.status().state == State::Unprotected
    });
    let perr = p.primary.status().error.expect("an error");
    assert!(perr.contains("the secondary ended replication"), "{perr}");
    let r = lock(&p.replica);
    assert!(
        r.mem == mem && r.state == state && r.disk == disk,
        "the replica changed"
    );
    assert_eq!(r.take_overs, 0);
    assert!(lock(&p.releases).contains(&Release::All));
}

#[test]
fn a_silent_primary_is_taken_over_with_uncommitted_writes_discarded() {
    let o = Options {
        failover: Failover::Auto,
        checkpoint_ms: 60_000,
        relay: true,
        ..Options::default()
    };
    let p = pair(o);
    let relay = p.relay.clone().expect("a relay");
    p.protected();
    let committed_disk = lock(&p.replica).disk.clone();
    // A write of epoch 1, held on the secondary, never committed.
    act(&p.guest, 3);
    wait_for("the write to be staged", || {
        !lock(&p.replica).staged.is_empty()
    });
    relay.frozen.store(true, Ordering::SeqCst);
    wait_for("the takeover", || {
        p.secondary.status().state == State::FailedOver
    });
    let r = lock(&p.replica);
    assert_eq!(r.take_overs, 1);
    assert_eq!(r.discarded, 1);
    assert!(
        r.disk == committed_disk,
        "an uncommitted write reached the disk"
    );
    drop(r);
    assert_eq!(p.secondary.metrics().failovers, 1);
    assert!(p
        .secondary
        .status()
        .error
        .is_some_and(|e| e.contains("no heartbeat")));
    assert!(p.secondary.failover().is_err(), "a second failover");
    wait_for("the primary to run alone", || {
        p.primary.status().state == State::Unprotected
    });
    assert!(lock(&p.releases).contains(&Release::All));
    relay.frozen.store(false, Ordering::SeqCst);
}

#[test]
fn a_dead_secondary_leaves_the_primary_unprotected_with_output_released() {
    let p = pair(Options {
        relay: true,
        ..Options::default()
    });
    let relay = p.relay.clone().expect("a relay");
    p.protected();
    let epoch = act(&p.guest, 4);
    p.settle(epoch);
    relay.cut();
    wait_for("the primary to run alone", || {
        p.primary.status().state == State::Unprotected
    });
    assert!(lock(&p.releases).contains(&Release::All));
    assert!(lock(&p.guest).forwarding_stopped);
    assert!(p.primary.status().error.is_some());
    // Manual failover: the secondary waits for the command, then takes over.
    wait_for("the secondary to notice", || {
        p.secondary.status().state == State::Stopped
    });
    assert_eq!(lock(&p.replica).take_overs, 0);
    p.secondary.failover().expect("failover on command");
    assert_eq!(lock(&p.replica).take_overs, 1);
    assert_eq!(p.secondary.status().state, State::FailedOver);
}

#[test]
fn a_checkpoint_loaded_as_the_primary_says_goodbye_leaves_the_secondary_stopped() {
    let p = pair(Options {
        checkpoint_ms: 60_000,
        ..Options::default()
    });
    p.protected();
    let (started, loading) = mpsc::channel();
    let (go_on, held) = mpsc::channel();
    lock(&p.replica).hold_next_load = Some((started, held));
    let epoch = act(&p.guest, 7);
    p.primary.checkpoint().expect("a checkpoint");
    loading
        .recv_timeout(Duration::from_secs(5))
        .expect("the checkpoint's load");
    // While the secondary loads it, the primary drops it.
    p.primary.failover().expect("failover");
    wait_for("the secondary to stop", || {
        p.secondary.status().state == State::Stopped
    });
    go_on.send(()).expect("the load waits");
    wait_for("the load to finish", || p.secondary.status().epoch == epoch);
    let s = p.secondary.status();
    assert_eq!(s.state, State::Stopped, "{s:?}");
    assert_eq!(p.secondary.metrics().state, Some(State::Stopped));
    assert!(s
        .error
        .is_some_and(|e| e.contains("the primary ended replication")),);
    // The checkpoint it loaded is what a failover resumes.
    p.secondary.failover().expect("failover");
    assert_eq!(lock(&p.replica).take_overs, 1);
}

/// The heartbeat decides whether a primary is gone, even when its
/// connection reaches the secondary after the data connection closed: a
/// primary that shuts down says goodbye there, and an auto-failover
/// secondary must stop, not take over.
#[test]
fn a_goodbye_on_a_late_heartbeat_connection_is_heard() {
    let p = pair(Options {
        failover: Failover::Auto,
        hold_heartbeat: true,
        heartbeat_timeout_ms: 5_000,
        checkpoint_ms: 60_000,
        ..Options::default()
    });
    p.protected();
    let Pair {
        primary,
        secondary,
        relay,
        replica,
        ..
    } = p;
    let relay = relay.expect("a relay");
    drop(primary);
    wait_for("the data connection's close to reach the secondary", || {
        relay.data_closed.load(Ordering::SeqCst)
    });
    relay.hold_later.store(false, Ordering::SeqCst);
    wait_for("the secondary to end replication", || {
        secondary.status().state != State::Protected
    });
    let s = secondary.status();
    assert_eq!(s.state, State::Stopped, "{s:?}");
    assert!(
        s.error
            .as_deref()
            .is_some_and(|e| e.contains("the primary is shutting down")),
        "{s:?}"
    );
    assert_eq!(lock(&replica).take_overs, 0, "took over unasked");
}

/// A secondary stuck applying a checkpoint, its heartbeat still answering,
/// must not hold the guest's output forever: the primary gives up on the
/// ack (after max(5 s, 10 heartbeat timeouts)), releases everything and
/// runs unprotected.
#[test]
fn a_secondary_that_never_acks_is_dropped_and_the_output_released() {
    let p = pair(Options {
        checkpoint_ms: 60_000,
        ..Options::default()
    });
    p.protected();
    let (started, loading) = mpsc::channel();
    let (_go_on, held) = mpsc::channel::<()>();
    lock(&p.replica).hold_next_load = Some((started, held));
    act(&p.guest, 7);
    p.primary.checkpoint().expect("a checkpoint");
    loading
        .recv_timeout(Duration::from_secs(5))
        .expect("the checkpoint's load");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while p.primary.status().state != State::Unprotected {
        assert!(
            std::time::Instant::now() < deadline,
            "the primary still waits: {:?}",
            p.primary.status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = p.primary.status();
    assert!(
        s.error
            .as_deref()
            .is_some_and(|e| e.contains("no ack for checkpoint")),
        "{s:?}"
    );
    assert_eq!(p.primary.metrics().held_frames, 0, "output still held");
}

#[test]
fn a_mismatched_secondary_is_refused_with_the_differences_named() {
    let o = Options {
        secondary_identity: identity(2 * MEM, 1),
        ..Options::default()
    };
    let p = pair(o);
    wait_for("the refusal", || !lock(&p.fatal).is_empty());
    let fatal = lock(&p.fatal)[0].clone();
    for diff in [
        "memory: primary 1 MiB, secondary 2 MiB",
        "vCPUs: primary 2, secondary 1",
    ] {
        assert!(fatal.contains(diff), "{fatal}");
    }
    wait_for("the primary to give up", || {
        p.primary.status().error.is_some()
    });
    let s = p.primary.status();
    assert_eq!(s.state, State::Unprotected);
    assert!(
        s.error
            .as_deref()
            .is_some_and(|e| e.contains("memory: primary 1 MiB")),
        "{s:?}"
    );
    assert_eq!(p.secondary.status().state, State::Stopped);
    assert_eq!(lock(&p.replica).loads, 0);
}

#[test]
fn the_primary_refuses_a_secondary_it_sees_differ() {
    // A fake secondary that accepts anything and answers with its own
    // (different) identity: the primary must refuse on its side.
    let l = listener();
    let addr = l.local_addr().expect("addr");
    let fake = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let Message::Hello(h) = wire::read_message(&mut s).expect("hello") else {
            panic!("not a hello")
        };
        let welcome = Welcome {
            version: h.version + 1,
            mode: Mode::Colo,
            identity: Identity {
                disks: vec![DISK / 2],
                ..h.identity
            },
        };
        wire::write_message(&mut s, &Message::Welcome(welcome)).expect("welcome");
        wire::read_message(&mut s).expect("the primary's answer")
    });
    let g = guest(primary::DEFAULT_HELD_BYTES_MAX);
    let (primary, _) = start_primary(addr, &Options::default(), &g, &replica());
    let answer = fake.join().expect("fake secondary");
    let Message::Refused { reason } = answer else {
        panic!("{answer:?}")
    };
    for diff in [
        "protocol version: primary 1, secondary 2",
        "mode: primary Remus, secondary Colo",
        "disk 0: primary 256 KiB",
    ] {
        let diff = diff.replace("256 KiB", "262144 bytes");
        assert!(reason.contains(&diff), "{reason}");
    }
    wait_for("the primary to give up", || {
        primary.status().error.is_some()
    });
    assert_eq!(primary.status().error.as_deref(), Some(reason.as_str()));
    assert_eq!(primary.status().state, State::Unprotected);
}

#[test]
fn a_checkpoint_whose_hash_differs_stops_replication_naming_the_part() {
    let p = pair(Options::default());
    p.protected();
    lock(&p.replica).lose_pages = true;
    act(&p.guest, 5);
    wait_for("the secondary to stop", || {
        p.secondary.status().state == State::Stopped
    });
    let err = p.secondary.status().error.expect("an error");
    assert!(
        err.contains("state hash differs") && err.contains("(parts: memory)"),
        "{err}"
    );
    wait_for("the primary to run alone", || {
        p.primary.status().state == State::Unprotected
    });
    let perr = p.primary.status().error.expect("an error");
    assert!(
        perr.contains("the secondary ended replication: checkpoint"),
        "{perr}"
    );
    // The last good checkpoint can still be taken over.
    p.secondary.failover().expect("failover");
}

#[test]
fn held_bytes_over_the_bound_take_a_checkpoint() {
    let o = Options {
        checkpoint_ms: 60_000,
        ..Options::default()
    };
    let p = pair(o);
    p.protected();
    let epoch = act(&p.guest, 6);
    p.primary
        .request_checkpoint(colo::control::Cause::HeldBytes);
    p.settle(epoch);
    p.assert_equal();
    let m = p.primary.metrics();
    let held: Vec<_> = m.checkpoints.iter().filter(|(_, n)| *n > 0).collect();
    assert_eq!(held, [&(colo::control::Cause::HeldBytes, 1)]);
    assert_eq!(m.transfer.count, 1);
}

#[test]
fn the_secondary_exits_when_the_primary_refuses_it() {
    // A fake primary that says hello, then refuses whatever comes back.
    let l = listener();
    let addr = l.local_addr().expect("addr");
    let (secondary, replica, fatal) = start_secondary(l, &Options::default());
    // A stray connection first: garbage is ignored, the wait goes on.
    TcpStream::connect(addr)
        .expect("connect")
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .expect("garbage");
    let mut s = TcpStream::connect(addr).expect("connect");
    let hello = wire::Hello {
        version: wire::PROTOCOL_VERSION,
        mode: Mode::Remus,
        session: 9,
        identity: identity(MEM, 2),
    };
    wire::write_message(&mut s, &Message::Hello(hello)).expect("hello");
    let welcome = wire::read_message(&mut s).expect("welcome");
    assert!(matches!(welcome, Message::Welcome(_)), "{welcome:?}");
    let reason = "the secondary differs: CPUID hash: primary 1, secondary 2".to_string();
    wire::write_message(&mut s, &Message::Refused { reason }).expect("refused");
    wait_for("the secondary to give up", || !lock(&fatal).is_empty());
    assert_eq!(
        lock(&fatal)[0],
        "the primary refused replication: the secondary differs: CPUID hash: primary 1, secondary 2"
    );
    assert_eq!(secondary.status().state, State::Stopped);
    assert_eq!(lock(&replica).loads, 0);
}
