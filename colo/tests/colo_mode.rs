//! COLO mode's engines over loopback TCP with fake VMs: the mirror
//! connection both ways, checkpoints the secondary asks for, the SVM run
//! before each ack, failover, and hostile mirror input.

mod common;

use std::net::TcpStream;
use std::sync::atomic::Ordering;

use colo::control::{Cause, Control, Mode, ProxyStats, State};
use colo::vm::PeerFrame;
use colo::wire::{self, Hello, Message};
use common::*;

fn colo() -> Options {
    Options {
        mode: Mode::Colo,
        // Only the checkpoints a test asks for.
        checkpoint_ms: 60_000,
        ..Options::default()
    }
}

fn frame(epoch: u64, n: u32) -> PeerFrame {
    PeerFrame {
        epoch,
        nic: (n % 2) as u16,
        data: n.to_le_bytes().repeat(1 + n as usize % 40),
    }
}

/// Checkpoint on request, after the guest acted; waits for its ack.
fn checkpoint(p: &Pair, n: u8) -> u64 {
    let epoch = act(&p.guest, n);
    p.primary.checkpoint().expect("a checkpoint on request");
    p.settle(epoch);
    epoch
}

/// A side's COLO counts, the same in its status and its metrics.
fn proxy(side: &dyn Control) -> ProxyStats {
    let counts = side.status().proxy.expect("COLO status has proxy counts");
    assert_eq!(side.metrics().proxy, counts);
    counts
}

fn position(events: &[Ev], ev: &Ev) -> usize {
    let found: Vec<usize> = (0..events.len()).filter(|&i| events[i] == *ev).collect();
    assert_eq!(found.len(), 1, "{ev:?} once in {events:?}");
    found[0]
}

#[test]
fn a_colo_session_mirrors_frames_both_ways_and_runs_the_svm_before_each_ack() {
    let p = pair(colo());
    p.protected();
    let (mirror, out) = {
        let c = lock(&p.colo);
        (
            c.mirror_sink.clone().expect("output.mirror was called"),
            c.out.clone().expect("colo_net was called"),
        )
    };

    // Client frames the PVM received reach the SVM's NICs in order, with
    // their epochs.
    let sent: Vec<PeerFrame> = (0..50).map(|n| frame(1 + u64::from(n / 20), n)).collect();
    for f in &sent {
        mirror(f.clone()).expect("queued");
    }
    wait_for("the client frames at the SVM", || {
        lock(&p.colo).inbound.len() >= sent.len()
    });
    assert_eq!(lock(&p.colo).inbound, sent);

    // The SVM's frames reach the primary's compare in order.
    let svm: Vec<PeerFrame> = (100..140).map(|n| frame(1, n)).collect();
    for f in &svm {
        out(f.clone()).expect("queued");
    }
    wait_for("the SVM's frames at the primary", || {
        lock(&p.colo).from_secondary.len() >= svm.len()
    });
    assert_eq!(lock(&p.colo).from_secondary, svm);

    lock(&p.colo).svm_stats = ProxyStats {
        rewritten_connections: 3,
        ..ProxyStats::default()
    };
    for n in 1..=3 {
        checkpoint(&p, n);
    }
    p.assert_equal();

    // Every checkpoint: loaded, committed, run, and only then acked (the
    // primary releases on the ack).
    let events = lock(&p.colo).events.clone();
    // The mirror is set up before the stop-and-copy, the SVM's NICs
    // before the first load.
    let mirror_set = position(&events, &Ev::Mirror);
    let colo_net = position(&events, &Ev::ColoNet);
    assert!(mirror_set < position(&events, &Ev::Load(0)), "{events:?}");
    for n in 0..=3 {
        let load = position(&events, &Ev::Load(n));
        let commit = position(&events, &Ev::Commit(n));
        let run = position(&events, &Ev::Run(n));
        let release = position(&events, &Ev::Release(n));
        assert!(
            colo_net < load && load < commit && commit < run && run < release,
            "checkpoint {n}: {events:?}"
        );
    }

    // A checkpoint the SVM's side asks for is taken and counted under
    // its cause, once per ask (one per SVM epoch).
    let held = |c: &dyn Control| {
        c.metrics()
            .checkpoints
            .iter()
            .find(|(cause, _)| *cause == Cause::HeldBytes)
            .map_or(0, |(_, n)| *n)
    };
    let ask = lock(&p.colo).ask.clone().expect("colo_net got ask");
    for round in 1..=2 {
        let before = p.primary.status().epoch;
        ask(Cause::HeldBytes);
        p.settle(before + 1);
        assert_eq!(held(&*p.primary), round);
    }

    // Both sides count the same frames; the engines add the mirror's
    // counts to the output's and the VM's.
    let ps = proxy(&*p.primary);
    assert_eq!(ps.compared_frames, 7, "the output's counts");
    assert_eq!((ps.mirrored_frames, ps.dropped_frames), (50, 0));
    let ss = proxy(&*p.secondary);
    assert_eq!(ss.rewritten_connections, 3, "the SVM's counts");
    assert_eq!((ss.mirrored_frames, ss.dropped_frames), (40, 0));

    // Failover: the disks take over first (the overlay merged), then the
    // SVM runs on.
    p.secondary.failover().expect("failover");
    let events = lock(&p.colo).events.clone();
    let disks = position(&events, &Ev::TakeOverDisks);
    let vm = position(&events, &Ev::TakeOverVm);
    assert!(disks < vm && vm == events.len() - 1, "{events:?}");
    assert_eq!(p.secondary.status().state, State::FailedOver);

    // The primary runs alone and mirrors nothing more.
    wait_state(&*p.primary, State::Unprotected);
    assert!(lock(&p.releases).contains(&Release::All));
    assert!(mirror(frame(9, 9)).is_err(), "mirroring ended");
    assert_eq!(proxy(&*p.primary).dropped_frames, 1);
    assert!(engine_panics().is_empty(), "{:?}", engine_panics());
}

#[test]
fn a_remus_session_calls_no_colo_method() {
    let p = pair(Options::default());
    p.protected();
    checkpoint(&p, 1);
    let events = lock(&p.colo).events.clone();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Ev::Run(_) | Ev::ColoNet | Ev::Mirror)),
        "{events:?}"
    );
    assert_eq!(p.primary.status().proxy, None);
    assert_eq!(p.secondary.status().proxy, None);
}

#[test]
fn a_failed_run_ends_replication_without_its_ack() {
    let p = pair(colo());
    p.protected();
    checkpoint(&p, 1);
    lock(&p.colo).fail_run = Some(2);
    act(&p.guest, 2);
    p.primary.checkpoint().expect("checkpoint 2");
    wait_state(&*p.secondary, State::Stopped);
    let err = p.secondary.status().error.expect("an error");
    assert!(err.contains("running the SVM from checkpoint 2"), "{err}");
    wait_state(&*p.primary, State::Unprotected);
    let perr = p.primary.status().error.expect("an error");
    assert!(perr.contains("the secondary ended replication"), "{perr}");
    assert_eq!(p.primary.status().epoch, 1);
    assert!(!lock(&p.colo).events.contains(&Ev::Release(2)));
    assert_eq!(lock(&p.replica).take_overs, 0);
}

/// A pair, protected, then one byte of the next frame on the mirror
/// connection flipped, primary -> secondary or (`back`) the other way.
/// Returns the two sides' errors once the secondary stopped and the
/// primary runs alone, output released and the replica not taken over.
fn flip_a_mirrored_frame(back: bool) -> (String, String) {
    let p = pair(Options {
        relay: true,
        ..colo()
    });
    let relay = p.relay.clone().expect("a relay");
    p.protected();
    checkpoint(&p, 1);
    let (mirror, out) = {
        let c = lock(&p.colo);
        (
            c.mirror_sink.clone().expect("mirror"),
            c.out.clone().expect("out"),
        )
    };
    if back {
        relay.flip_mirror_back.store(true, Ordering::SeqCst);
        out(frame(2, 1)).expect("queued");
    } else {
        relay.flip_mirror.store(true, Ordering::SeqCst);
        mirror(frame(2, 1)).expect("queued");
    }
    wait_state(&*p.primary, State::Unprotected);
    wait_state(&*p.secondary, State::Stopped);
    assert!(lock(&p.releases).contains(&Release::All));
    let c = lock(&p.colo);
    assert!(
        c.inbound.is_empty() && c.from_secondary.is_empty(),
        "a corrupt frame got through"
    );
    assert_eq!(lock(&p.replica).take_overs, 0);
    let error = |side: &dyn Control| side.status().error.expect("an error");
    (error(&*p.primary), error(&*p.secondary))
}

#[test]
fn a_flipped_byte_on_the_mirror_connection_ends_replication() {
    // The secondary reads it: it stops and tells the primary.
    let (primary, secondary) = flip_a_mirrored_frame(false);
    assert!(secondary.contains("mirror connection: CRC"), "{secondary}");
    assert!(
        primary.contains("the secondary ended replication"),
        "{primary}"
    );
    // The primary reads it: it runs alone and says goodbye, so the
    // secondary stops rather than taking over.
    let (primary, secondary) = flip_a_mirrored_frame(true);
    assert!(primary.contains("mirror connection: CRC"), "{primary}");
    assert!(
        secondary.contains("the primary ended replication"),
        "{secondary}"
    );
}

/// A frame with both CRCs right around any payload.
fn raw_frame(code: u16, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&code.to_le_bytes());
    crc.update(&len.to_le_bytes());
    crc.update(payload);
    let mut frame = wire::MAGIC.to_le_bytes().to_vec();
    frame.extend_from_slice(&code.to_le_bytes());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&crc.finalize().to_le_bytes());
    let header = crc32fast::hash(&frame);
    frame.extend_from_slice(&header.to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn open(addr: std::net::SocketAddr, first: &Message) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    wire::write_message(&mut s, first).expect("send");
    s
}

#[test]
fn the_secondary_refuses_a_foreign_mirror_and_stops_on_an_oversized_frame() {
    let l = listener();
    let addr = l.local_addr().expect("addr");
    let o = Options {
        heartbeat_timeout_ms: 10_000,
        ..colo()
    };
    let (secondary, replica, _fatal) = start_secondary(l, &o);
    let colo = lock(&replica).colo.clone();
    // A primary by hand: hello, heartbeat, then mirror connections.
    let hello = Hello {
        version: wire::PROTOCOL_VERSION,
        mode: Mode::Colo,
        session: 42,
        identity: identity(MEM, 2),
    };
    let mut data = open(addr, &Message::Hello(hello));
    assert!(matches!(
        wire::read_message(&mut data),
        Ok(Message::Welcome(_))
    ));
    let mut hb = open(addr, &Message::HeartbeatHello { session: 42 });

    let mut foreign = open(addr, &Message::MirrorHello { session: 43 });
    match wire::read_message(&mut foreign) {
        Ok(Message::Refused { reason }) => assert!(reason.contains("session"), "{reason}"),
        other => panic!("a foreign mirror was not refused: {other:?}"),
    }
    assert!(
        lock(&colo).events.is_empty(),
        "colo_net for a foreign mirror"
    );

    let mut mirror = open(addr, &Message::MirrorHello { session: 42 });
    let f = frame(1, 5);
    wire::write_message(&mut mirror, &Message::Frame(f.clone())).expect("send");
    wait_for("the frame at the SVM", || !lock(&colo).inbound.is_empty());
    assert_eq!(lock(&colo).inbound, vec![f]);
    assert_eq!(lock(&colo).events, vec![Ev::ColoNet]);

    // The SVM's side asks once per epoch, in order with its frames.
    let (ask, out) = {
        let c = lock(&colo);
        (c.ask.clone().expect("ask"), c.out.clone().expect("out"))
    };
    ask(Cause::HeldBytes);
    ask(Cause::HeldBytes);
    let svm = frame(1, 6);
    out(svm.clone()).expect("queued");
    assert_eq!(
        wire::read_message(&mut mirror).expect("a request"),
        Message::CheckpointRequest {
            cause: Cause::HeldBytes
        }
    );
    assert_eq!(
        wire::read_message(&mut mirror).expect("the frame"),
        Message::Frame(svm)
    );

    // A second mirror connection is refused.
    let mut second = open(addr, &Message::MirrorHello { session: 42 });
    assert!(matches!(
        wire::read_message(&mut second),
        Ok(Message::Refused { .. })
    ));

    // A frame over the bound, well framed: replication stops, the
    // primary hears why on the heartbeat connection.
    let mut payload = 1u64.to_le_bytes().to_vec();
    payload.extend_from_slice(&0u16.to_le_bytes());
    payload.resize(payload.len() + wire::MAX_PEER_FRAME + 1, 0);
    use std::io::Write;
    mirror.write_all(&raw_frame(37, &payload)).expect("send");
    let text = loop {
        match wire::read_message(&mut hb) {
            Ok(Message::Error { text }) => break text,
            Ok(Message::Pong { .. }) => {}
            other => panic!("no error on the heartbeat connection: {other:?}"),
        }
    };
    assert!(text.contains("undecodable frame"), "{text}");
    wait_state(&*secondary, State::Stopped);
    let err = secondary.status().error.expect("an error");
    assert!(err.contains("undecodable frame"), "{err}");
    assert_eq!(lock(&colo).inbound.len(), 1, "nothing more reached the SVM");
}
