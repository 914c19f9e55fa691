//! Replication of a running guest between two `vmm`s on the netns rig
//! (issue 9): verified checkpoints under load, refusal of a secondary that
//! does not match, a corrupted peer link, the initial sync of a disk that
//! started different. The first tests check the rig itself (the client
//! workload against one standalone guest, the relay) and run without
//! replication.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::thread;
use std::time::Duration;

use colo_tests::http::api_request;
use colo_tests::net::{guest_ip, Host, Topology};
use colo_tests::pair::{
    self_checks, Pair, PairOptions, Relay, SecondaryDisk, Side, Workload, STATE_TIMEOUT,
};
use colo_tests::{env_count, guest_artifact, Vmm};

const BOOT: Duration = Duration::from_secs(20);

/// A standalone test guest in host-a on tap `tapa` with the disk `disk`.
fn standalone(topo: &Topology, disk: &Path) -> Vmm {
    let mut vmm = Vmm::spawn_in(
        topo.host(Host::A),
        [
            "--kernel",
            guest_artifact("test-guest").to_str().unwrap(),
            "--cmdline",
            &format!("ip={}/24 dirty_mib_per_s=64", guest_ip(0)),
            "--disk",
            disk.to_str().unwrap(),
            "--net",
            "tap=tapa",
        ],
    );
    vmm.wait_for_serial("colo-test-guest: ready", BOOT);
    vmm
}

fn blank_disk() -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(16 << 20).unwrap();
    f
}

#[test]
fn the_workload_passes_against_a_standalone_guest() {
    let topo = Topology::builder().host_b(false).build();
    topo.add_tap(Host::A, "tapa");
    let disk = blank_disk();
    let vmm = standalone(&topo, disk.path());
    let w = Workload::start(topo.client(), guest_ip(0));
    let w = w.expect_progress(100, 20, 20, topo.client(), || vmm.log());
    let report = w.finish(topo.client());
    eprintln!("{report:?}");
    report.assert_clean(&vmm.log());
    assert!(report.echoes >= 100 && report.kv_stored >= 20, "{report:?}");
    assert_eq!(report.reconnects, 0, "{report:?}");
    let (passed, failed) = self_checks(&vmm.serial(), 0);
    assert_eq!(failed, None);
    assert!(passed > 0, "no workload self-check yet:\n{}", vmm.serial());
}

/// The checks can fail: a guest replaced by a fresh one (what a failover
/// that lost the guest's state would look like) is caught on every count.
#[test]
fn the_workload_catches_a_guest_that_lost_its_state() {
    let topo = Topology::builder().host_b(false).build();
    topo.add_tap(Host::A, "tapa");
    let disk = blank_disk();
    let mut vmm = standalone(&topo, disk.path());
    let w = Workload::start(topo.client(), guest_ip(0));
    let w = w.expect_progress(50, 10, 10, topo.client(), || vmm.log());
    vmm.kill();
    let fresh = blank_disk();
    let _vmm = standalone(&topo, fresh.path());
    let report = w.finish(topo.client());
    eprintln!("{report:?}");
    let all = report.failures.join("\n");
    assert!(
        all.contains("echo"),
        "a lost echo connection went unseen: {all}"
    );
    assert!(
        all.contains("/count"),
        "a counter that went back went unseen: {all}"
    );
    assert!(all.contains("kv"), "lost kv records went unseen: {all}");
}

/// Echoes whatever each connection sends, on `addr` inside host-b.
fn echo_server(topo: &Topology, addr: SocketAddr) {
    let listener = topo
        .host(Host::B)
        .enter(|| TcpListener::bind(addr))
        .unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = conn.read(&mut buf) {
                    if conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

#[test]
fn the_relay_forwards_and_flips_one_byte_on_demand() {
    let topo = Topology::new();
    let target = SocketAddr::from((Host::B.ip(), 7070));
    echo_server(&topo, target);
    let relay = Relay::start(
        topo.host(Host::A),
        SocketAddr::from((Host::A.ip(), 7071)),
        target,
    );
    let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let (clean, flipped) = topo.host(Host::A).enter(|| {
        let mut s = TcpStream::connect(relay.addr()).unwrap();
        s.set_read_timeout(Some(BOOT)).unwrap();
        let mut round = |data: &[u8]| {
            s.write_all(data).unwrap();
            let mut got = vec![0u8; data.len()];
            s.read_exact(&mut got).unwrap();
            got
        };
        let clean = round(&data);
        relay.arm_flip(1000);
        (clean, round(&data))
    });
    assert!(clean == data, "the relay changed bytes it was not asked to");
    let diff: Vec<usize> = (0..data.len()).filter(|&i| flipped[i] != data[i]).collect();
    assert_eq!(diff, [1000], "exactly the armed byte differs");
    assert_eq!(flipped[1000], !data[1000]);
    assert_eq!(relay.flipped_at(), Some(data.len() as u64 + 1000));
    assert_eq!(relay.connections(), 1);
}

// ---------------------------------------------------------------------------
// Replication.

#[test]
fn two_hundred_verified_checkpoints_under_load() {
    let n = env_count("COLO_CHECKPOINTS", 200) as u64;
    let pair = Pair::start(PairOptions::dirtying(64));
    let w = pair.workload();
    let before = pair.status(Side::Primary).checkpoints;
    let timeout = Duration::from_secs(60 + n / 5);
    pair.wait_checkpoints(Side::Primary, before + n, timeout);
    pair.wait_checkpoints(Side::Secondary, before + n, timeout);
    for side in [Side::Primary, Side::Secondary] {
        let s = pair.status(side);
        assert_eq!(
            (s.state.as_str(), s.error.as_deref()),
            ("protected", None),
            "the {} after {n} checkpoints: {}\n{}",
            side.name(),
            s.raw,
            pair.logs()
        );
    }
    let report = w.finish(pair.topo().client());
    eprintln!("{report:?}");
    report.assert_clean(&pair.logs());
    // Beyond the per-checkpoint hashes the secondary compared: the replica
    // of a paused primary is the primary.
    let hash = pair.pause_and_settle();
    assert_eq!(pair.state_hash(Side::Secondary), hash, "{}", pair.logs());
    let (passed, failed) = self_checks(&pair.serial(Side::Primary), 0);
    assert_eq!(failed, None);
    assert!(passed > 0, "no self-check passed on the primary");
}

#[test]
fn checkpoints_are_requested_and_tuned_over_the_api() {
    let mut pair = Pair::start(PairOptions::default());
    let a = pair.primary_sock();
    let patch = |body: &str| api_request(&a, "PATCH", "/colo", body).unwrap();
    let r = patch(r#"{"checkpoint_ms":60000}"#);
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(pair.status(Side::Primary).raw["checkpoint_ms"], 60000);
    for bad in [
        r#"{"checkpoint_ms":0}"#,
        r#"{"checkpoint_ms":60001}"#,
        r#"{"every":5}"#,
    ] {
        assert_eq!(patch(bad).status, 400, "{bad}");
    }
    // The compare timeout is COLO's: a Remus pair refuses it, and the
    // interval given with it stays.
    let r = patch(r#"{"compare_timeout_ms":5,"checkpoint_ms":30}"#);
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("not in COLO mode"), "{}", r.text());
    assert_eq!(pair.status(Side::Primary).raw["checkpoint_ms"], 60000);
    assert!(pair
        .status(Side::Primary)
        .raw
        .get("compare_timeout_ms")
        .is_none());

    // With the timer out of the way, each request is one checkpoint.
    let requested = r#"colo_checkpoints_total{cause="requested"}"#;
    let count = |pair: &Pair| pair.metric(Side::Primary, requested).unwrap_or(0.0);
    for _ in 0..3 {
        let before = count(&pair);
        let r = pair.request_checkpoint();
        assert_eq!(r.status, 202, "{}", r.text());
        let deadline = std::time::Instant::now() + STATE_TIMEOUT;
        while count(&pair) < before + 1.0 {
            assert!(std::time::Instant::now() < deadline, "{}", pair.logs());
            thread::sleep(Duration::from_millis(15));
        }
    }
    let s = pair.status(Side::Primary);
    assert_eq!(pair.status(Side::Secondary).epoch, s.epoch, "{}", s.raw);
    assert_eq!(
        pair.metric(Side::Primary, r#"colo_state{state="protected"}"#),
        Some(1.0)
    );

    // Back to 20 ms: the timer runs again.
    assert_eq!(patch(r#"{"checkpoint_ms":20}"#).status, 204);
    pair.wait_checkpoints(Side::Primary, s.checkpoints + 20, STATE_TIMEOUT);

    // Unprotected, a checkpoint is refused.
    pair.kill_secondary();
    pair.wait_state(Side::Primary, &["unprotected"], STATE_TIMEOUT);
    let r = pair.request_checkpoint();
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(
        pair.metric(Side::Primary, r#"colo_state{state="unprotected"}"#),
        Some(1.0)
    );
}

/// Starts a pair whose secondary differs as `opts` says and checks the
/// refusal: the secondary exits non-zero, the primary reports the error
/// and serves on alone, and both logs carry every one of `needles`
/// (lower case).
fn refused(opts: PairOptions, needles: &[&str]) {
    let mut pair = Pair::start(PairOptions {
        wait_protected: false,
        ..opts
    });
    let exit = pair.vmm(Side::Secondary).wait_exit(STATE_TIMEOUT);
    assert!(!exit.success(), "the refusing secondary exited {exit}");
    let s = pair.wait_until(Side::Primary, "refused", STATE_TIMEOUT, |s| {
        s.error.is_some()
    });
    assert_eq!(s.state, "unprotected", "{}", s.raw);
    let error = s.error.clone().unwrap().to_lowercase();
    for needle in needles {
        assert!(
            error.contains(needle),
            "the primary's error {error:?} does not name {needle:?}"
        );
        for side in [Side::Primary, Side::Secondary] {
            let log = pair.vmm(side).log().to_lowercase();
            assert!(
                log.contains(needle),
                "the {} log does not name {needle:?}:\n{}",
                side.name(),
                pair.logs()
            );
        }
    }
    // Nothing was started on the secondary; the primary serves on.
    let w = pair.workload();
    let w = w.expect_progress(20, 5, 5, pair.topo().client(), || pair.logs());
    let report = w.finish(pair.topo().client());
    report.assert_clean(&pair.logs());
    assert_eq!(pair.status(Side::Primary).state, "unprotected");
}

#[test]
fn a_secondary_with_other_memory_is_refused() {
    refused(
        PairOptions {
            secondary_mem_mib: Some(48),
            ..PairOptions::default()
        },
        &["memory", "48 mib"],
    );
}

#[test]
fn a_secondary_with_other_vcpus_is_refused() {
    refused(
        PairOptions {
            secondary_vcpus: Some(2),
            ..PairOptions::default()
        },
        &["vcpus"],
    );
}

#[test]
fn a_secondary_with_other_devices_is_refused() {
    refused(
        PairOptions {
            secondary_disk: SecondaryDisk::Missing,
            ..PairOptions::default()
        },
        &["devices"],
    );
}

#[test]
fn a_secondary_with_a_smaller_disk_is_refused() {
    refused(
        PairOptions {
            secondary_disk: SecondaryDisk::Size(8 << 20),
            ..PairOptions::default()
        },
        &["disk 0", "8 mib"],
    );
}

#[test]
fn a_primary_of_another_protocol_version_is_refused() {
    refused(
        PairOptions {
            primary_env: vec![("COLO_TEST_PROTOCOL_VERSION".into(), "99".into())],
            ..PairOptions::default()
        },
        &["protocol version", "99"],
    );
}

#[test]
fn a_corrupted_peer_link_ends_replication_with_the_replica_at_its_last_checkpoint() {
    let pair = Pair::start(PairOptions {
        relay: true,
        ..PairOptions::dirtying(64)
    });
    let w = pair.workload();
    pair.wait_checkpoints(Side::Secondary, 10, STATE_TIMEOUT);
    let committed = pair.pause_and_settle();
    // The next thousand bytes of the data connection carry the next
    // checkpoint (or the rest of one taken while paused): none taken after
    // the resume can commit.
    pair.relay().arm_flip(1000);
    pair.set_vm_state(Side::Primary, "running");
    let s = pair.wait_until(
        Side::Secondary,
        "stopped by the bad byte",
        STATE_TIMEOUT,
        |s| s.error.is_some(),
    );
    eprintln!("the secondary stopped: {}", s.raw);
    assert!(pair.relay().flipped_at().is_some(), "{}", s.raw);
    assert_ne!(s.state, "protected", "{}", s.raw);
    assert_eq!(
        pair.state_hash(Side::Secondary),
        committed,
        "the replica is not its last committed checkpoint\n{}",
        pair.logs()
    );
    let p = pair.wait_state(Side::Primary, &["unprotected"], STATE_TIMEOUT);
    assert!(p.error.is_some(), "{}", p.raw);
    // The primary serves on.
    let w = w.expect_progress(50, 10, 10, pair.topo().client(), || pair.logs());
    let report = w.finish(pair.topo().client());
    report.assert_clean(&pair.logs());
}

#[test]
fn the_initial_sync_repairs_a_secondary_disk_that_started_different() {
    // The secondary's image starts as garbage (PairOptions' default).
    let mut pair = Pair::start(PairOptions::dirtying(16));
    let w = pair.workload();
    let w = w.expect_progress(50, 10, 20, pair.topo().client(), || pair.logs());
    let report = w.finish(pair.topo().client());
    report.assert_clean(&pair.logs());
    pair.pause_and_settle();
    pair.kill_primary();
    pair.kill_secondary();
    let a = std::fs::read(pair.image(Side::Primary)).unwrap();
    let b = std::fs::read(pair.image(Side::Secondary)).unwrap();
    assert_eq!(a.len(), b.len());
    assert!(
        a[512..516] == *b"CKV1",
        "the primary's disk holds no kv record"
    );
    let differ = (0..a.len() / 512)
        .filter(|&s| a[s * 512..(s + 1) * 512] != b[s * 512..(s + 1) * 512])
        .collect::<Vec<_>>();
    assert!(
        differ.is_empty(),
        "{} sectors differ, first {:?}",
        differ.len(),
        &differ[..differ.len().min(8)]
    );
}

/// Output held beyond its bound (4 MiB) forces a checkpoint: with the
/// periodic checkpoint 60 s away (the longest interval), UDP datagrams
/// echoed by the guest pile up on the primary until the bound releases
/// them, and the primary counts a checkpoint caused by held bytes. (TCP
/// cannot show it: its window keeps held output small until the timer.)
#[test]
fn held_output_over_its_bound_forces_a_checkpoint() {
    let pair = Pair::start(PairOptions {
        verify: false,
        ..PairOptions::default()
    });
    let guest = SocketAddr::from((guest_ip(colo_tests::pair::GUEST_INDEX), 7));
    let client = pair.topo().client();
    let socket = client.enter(|| std::net::UdpSocket::bind("0.0.0.0:0").unwrap());
    socket.connect(guest).unwrap();
    // One round trip at the 20 ms interval teaches the client the guest's
    // MAC; pinned, no ARP reply (held like any output) is needed later.
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 2048];
    let warm = (0..50).any(|_| {
        socket.send(b"warm-up").unwrap();
        socket.recv(&mut buf).is_ok()
    });
    assert!(warm, "no UDP echo from the guest\n{}", pair.logs());
    let ip = guest.ip().to_string();
    let neigh = client.ip(&["neigh", "show", &ip]);
    let mac = neigh
        .split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)
        .unwrap_or_else(|| panic!("no neighbour entry for the guest: {neigh:?}"))
        .to_string();
    client.ip(&[
        "neigh",
        "replace",
        &ip,
        "lladdr",
        &mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    let a = pair.primary_sock();
    let r = api_request(&a, "PATCH", "/colo", r#"{"checkpoint_ms":60000}"#).unwrap();
    assert_eq!(r.status, 204, "{}", r.text());
    // Settle: one requested checkpoint after the change, then nothing
    // releases output but the bound.
    let done = pair.status(Side::Primary).checkpoints;
    assert_eq!(pair.request_checkpoint().status, 202);
    pair.wait_checkpoints(Side::Primary, done + 1, STATE_TIMEOUT);
    while socket.recv(&mut buf).is_ok() {} // echoes of the warm-up
    let cause = r#"colo_checkpoints_total{cause="held_bytes"}"#;
    assert_eq!(pair.metric(Side::Primary, cause), Some(0.0));

    socket
        .set_read_timeout(Some(Duration::from_millis(5)))
        .unwrap();
    let datagram = [0x5au8; 1400];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut sent = 0u64;
    let echoed = loop {
        // The deadline stands for "before the periodic checkpoint".
        assert!(
            std::time::Instant::now() < deadline,
            "{sent} datagrams sent, none echoed: held output never forced a checkpoint\n{}",
            pair.logs()
        );
        for _ in 0..32 {
            socket.send(&datagram).unwrap();
            sent += 1;
        }
        if let Ok(n) = socket.recv(&mut buf) {
            break n;
        }
    };
    assert_eq!(&buf[..echoed], &datagram[..]);
    // The ack releases the output before the engine counts it.
    let deadline = std::time::Instant::now() + STATE_TIMEOUT;
    let mut forced = 0.0;
    while forced < 1.0 && std::time::Instant::now() < deadline {
        forced = pair.metric(Side::Primary, cause).unwrap_or(0.0);
        thread::sleep(Duration::from_millis(15));
    }
    let causes: Vec<String> = ["periodic", "requested", "held_bytes"]
        .iter()
        .map(|c| {
            let series = format!("colo_checkpoints_total{{cause=\"{c}\"}}");
            format!("{c} {:?}", pair.metric(Side::Primary, &series))
        })
        .collect();
    assert!(
        forced >= 1.0,
        "echoed after {sent} datagrams without a held-bytes checkpoint ({causes:?})\n{}",
        pair.logs()
    );
    let s = pair.status(Side::Primary);
    assert_eq!(s.raw["state"], "protected", "{}", s.raw);
    eprintln!("{sent} datagrams of 1400 B sent before the first echo");
}
