#![allow(clippy::unwrap_used)]
//! Snapshots and restores of the networked test guest: the guest carries
//! on (its counter, its memory self-check, a client's open TCP connection),
//! diff chains restore to the same state hash as a full snapshot, VMM
//! writes are tracked, and bad files are refused before anything runs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use colo_tests::http::{api_request, Client, Response};
use colo_tests::net::{guest_ip, Host, Topology};
use colo_tests::{guest_artifact, Vmm};
use vmm::snapshot::{self, Memory};

const BOOT: Duration = Duration::from_secs(20);
const TAP: &str = "tap0";

fn api(sock: &Path, method: &str, path: &str, body: &str) -> Response {
    api_request(sock, method, path, body).unwrap()
}

fn pause(sock: &Path) {
    let r = api(sock, "PUT", "/vm", r#"{"state":"paused"}"#);
    assert_eq!(r.status, 204, "{}", r.text());
}

fn resume(sock: &Path) {
    let r = api(sock, "PUT", "/vm", r#"{"state":"running"}"#);
    assert_eq!(r.status, 204, "{}", r.text());
}

fn snapshot(sock: &Path, kind: &str, path: &Path) {
    let body = format!(r#"{{"type":"{kind}","path":"{}"}}"#, path.display());
    let r = api(sock, "PUT", "/snapshot", &body);
    assert_eq!(r.status, 200, "{}", r.text());
}

/// The state hash with its parts (as JSON text, so a mismatch shows which
/// part differs).
fn state_hash(sock: &Path) -> String {
    let r = api(sock, "GET", "/state-hash", "");
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
}

/// Starts `vmm` in host-a with the tap, an API socket and `extra` args.
fn start(topo: &Topology, sock: &Path, extra: &[&str]) -> Vmm {
    let mut args: Vec<String> = vec![
        "--net".into(),
        format!("tap={TAP}"),
        "--api-sock".into(),
        sock.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Vmm::spawn_in(topo.host(Host::A), &args)
}

fn boot_args(kernel: &Path, cmdline: &str) -> Vec<String> {
    vec![
        "--kernel".into(),
        kernel.display().to_string(),
        "--track-dirty-pages".into(),
        "--cmdline".into(),
        format!("ip={}/24 {cmdline}", guest_ip(0)),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

struct Rig {
    topo: Topology,
    dir: tempfile::TempDir,
}

impl Rig {
    fn new() -> Self {
        let topo = Topology::builder().host_b(false).build();
        topo.add_tap(Host::A, TAP);
        Self {
            topo,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Boots the test guest (dirty tracking on, API at `a.sock`) with
    /// `cmdline` and `extra` flags; returns once it is ready.
    fn boot(&self, cmdline: &str, extra: &[&str]) -> (Vmm, PathBuf) {
        let sock = self.path("a.sock");
        let mut args = boot_args(&guest_artifact("test-guest"), cmdline);
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut vmm = start(&self.topo, &sock, &strs(&args));
        vmm.wait_for_serial("colo-test-guest: ready", BOOT);
        (vmm, sock)
    }
}

#[test]
fn a_restored_guest_carries_on_with_its_counter_memory_and_open_connections() {
    let rig = Rig::new();
    let (mut vmm, sock) = rig.boot("dirty_mib_per_s=16 workload_mib=16", &[]);
    vmm.wait_for_serial("workload generation 1 ok", BOOT);
    let snap = rig.path("full.snap");

    let addr = |port| SocketAddr::from((guest_ip(0), port));
    rig.topo.client().enter(|| {
        let http = TcpStream::connect_timeout(&addr(80), BOOT).unwrap();
        http.set_read_timeout(Some(BOOT)).unwrap();
        let mut http = Client::new(http, "guest");
        let mut echo = TcpStream::connect_timeout(&addr(7), BOOT).unwrap();
        echo.set_read_timeout(Some(BOOT)).unwrap();
        let mut roundtrip = |msg: &[u8]| {
            echo.write_all(msg).unwrap();
            let mut got = vec![0; msg.len()];
            echo.read_exact(&mut got).unwrap();
            assert_eq!(got, msg);
        };
        for want in ["1", "2"] {
            assert_eq!(http.request("GET", "/count", b"").unwrap().text(), want);
        }
        roundtrip(b"before the snapshot");

        pause(&sock);
        snapshot(&sock, "full", &snap);
        vmm.kill();

        let sock2 = rig.path("b.sock");
        let mut restored = start(&rig.topo, &sock2, &["--restore", snap.to_str().unwrap()]);
        // The same connections, opened before the snapshot, still work.
        assert_eq!(http.request("GET", "/count", b"").unwrap().text(), "3");
        roundtrip(b"after the restore");
        // The memory workload goes on and its self-check passes.
        let line = restored.wait_for_serial("workload generation", BOOT);
        assert!(line.contains(" ok"), "{line}");
        let line = restored.wait_for_serial("workload generation", BOOT);
        assert!(line.contains(" ok"), "{line}");
        assert!(
            !restored.serial().contains("FAILED"),
            "{}",
            restored.serial()
        );
        assert_eq!(http.request("GET", "/count", b"").unwrap().text(), "4");
    });
}

/// Waits for the next workload generation line, which must be a pass.
fn next_generation(vmm: &mut Vmm) {
    let line = vmm.wait_for_serial("workload generation", BOOT);
    assert!(line.contains(" ok"), "{line}");
}

#[test]
fn full_plus_diffs_restore_to_the_state_of_a_full_snapshot_at_the_end() {
    let rig = Rig::new();
    let (mut vmm, sock) = rig.boot("dirty_mib_per_s=8 workload_mib=8", &[]);
    let (full, d1, d2, last) = (
        rig.path("0.full"),
        rig.path("1.diff"),
        rig.path("2.diff"),
        rig.path("last.full"),
    );

    pause(&sock);
    // A diff needs a full snapshot (or a restore) to follow: 409, not 500,
    // and no file.
    let body = format!(r#"{{"type":"diff","path":"{}"}}"#, d1.display());
    let r = api(&sock, "PUT", "/snapshot", &body);
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("full snapshot first"), "{}", r.text());
    assert!(!d1.exists());
    snapshot(&sock, "full", &full);
    resume(&sock);
    next_generation(&mut vmm);
    pause(&sock);
    snapshot(&sock, "diff", &d1);
    resume(&sock);
    next_generation(&mut vmm);
    pause(&sock);
    snapshot(&sock, "diff", &d2);
    let hash = state_hash(&sock);
    snapshot(&sock, "full", &last);
    assert_eq!(
        state_hash(&sock),
        hash,
        "taking a snapshot changed the state"
    );
    vmm.kill();
    // The diffs hold far less than the whole memory.
    let full_len = std::fs::metadata(&full).unwrap().len();
    for d in [&d1, &d2] {
        let len = std::fs::metadata(d).unwrap().len();
        assert!(len < full_len / 4, "diff of {len} bytes vs full {full_len}");
    }

    for chain in [
        format!("{},{},{}", full.display(), d1.display(), d2.display()),
        last.display().to_string(),
    ] {
        let sock = rig.path("r.sock");
        let mut r = start(&rig.topo, &sock, &["--restore", &chain, "--start-paused"]);
        wait_socket(&sock);
        assert_eq!(state_hash(&sock), hash, "restoring {chain}");
        resume(&sock);
        next_generation(&mut r);
        r.kill();
    }
    // A chain that skips a diff, or has them out of order, would be a
    // different machine: refused before any VM exists.
    for chain in [
        format!("{},{}", full.display(), d2.display()),
        format!("{},{},{}", full.display(), d2.display(), d1.display()),
    ] {
        let sock = rig.path("s.sock");
        let mut r = start(&rig.topo, &sock, &["--restore", &chain]);
        assert_eq!(r.wait_exit(BOOT).code(), Some(1), "{chain}");
        assert!(
            r.log().contains("does not continue the restore chain"),
            "{chain}: {}",
            r.log()
        );
        assert!(r.serial().is_empty(), "{chain}: the guest ran");
    }
}

fn wait_socket(sock: &Path) {
    let deadline = std::time::Instant::now() + BOOT;
    while UnixStream::connect(sock).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "no API socket at {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn pages_the_vmm_writes_for_received_packets_are_dirty() {
    let rig = Rig::new();
    // No workload: the guest is idle but for the network.
    let (_vmm, sock) = rig.boot("", &[]);
    pause(&sock);
    snapshot(&sock, "full", &rig.path("base.full"));
    resume(&sock);

    // Datagrams to a port nobody listens on: the guest drops them (at most
    // quoting the first bytes in an ICMP error), so the marker deep in the
    // payload exists only where the VMM wrote the frame: an rx buffer.
    let marker = b"colo-dirty-marker-5f3a9c1e-received-by-the-vmm";
    let mut payload = vec![b'.'; 600];
    payload.extend_from_slice(marker);
    rig.topo.client().enter(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..3 {
            s.send_to(&payload, SocketAddr::from((guest_ip(0), 9999)))
                .unwrap();
        }
        // Round trip through the guest so the datagrams have been received.
        let mut echo =
            TcpStream::connect_timeout(&SocketAddr::from((guest_ip(0), 7)), BOOT).unwrap();
        echo.set_read_timeout(Some(BOOT)).unwrap();
        echo.write_all(b"sync").unwrap();
        echo.read_exact(&mut [0u8; 4]).unwrap();
    });
    pause(&sock);
    // A diff that cannot be written must not lose the dirty pages it took:
    // the next diff still has them.
    let body = r#"{"type":"diff","path":"/proc/colo-no-such-dir/x.diff"}"#;
    let failed = api(&sock, "PUT", "/snapshot", body);
    assert_eq!(failed.status, 500, "{}", failed.text());
    assert!(
        failed.text().contains("cannot write snapshot"),
        "{}",
        failed.text()
    );
    let diff = rig.path("rx.diff");
    let image = rig.path("after.full");
    snapshot(&sock, "diff", &diff);
    snapshot(&sock, "full", &image);

    let Memory::Full(mem) = snapshot::read(&image).unwrap().memory else {
        panic!("a full snapshot without a full image")
    };
    let found: Vec<u64> = mem
        .windows(marker.len())
        .enumerate()
        .filter(|(_, w)| *w == marker)
        .map(|(i, _)| i as u64)
        .collect();
    assert!(!found.is_empty(), "the marker is nowhere in guest memory");
    let Memory::Diff(diff) = snapshot::read(&diff).unwrap().memory else {
        panic!("a diff snapshot without pages")
    };
    let pages: Vec<u64> = diff.iter().map(|(addr, _)| *addr).collect();
    for addr in &found {
        let page = addr & !0xfff;
        assert!(
            pages.contains(&page),
            "page {page:#x} holding a received frame is not dirty; dirty: {pages:x?}"
        );
    }
}

#[test]
fn two_vcpus_round_trip_with_equal_state_hashes() {
    let rig = Rig::new();
    let (mut vmm, sock) = rig.boot("dirty_mib_per_s=4 workload_mib=4", &["--vcpus", "2"]);
    vmm.wait_for_serial("workload generation 1 ok", BOOT);
    pause(&sock);
    let hash = state_hash(&sock);
    let snap = rig.path("two.full");
    snapshot(&sock, "full", &snap);
    vmm.kill();
    let sock = rig.path("b.sock");
    let mut r = start(
        &rig.topo,
        &sock,
        &["--restore", snap.to_str().unwrap(), "--start-paused"],
    );
    wait_socket(&sock);
    assert_eq!(state_hash(&sock), hash);
    let status: serde_json::Value =
        serde_json::from_slice(&api(&sock, "GET", "/status", "").body).unwrap();
    assert_eq!(status["vcpus"], 2);
    resume(&sock);
    next_generation(&mut r);
}

#[test]
fn bad_snapshot_files_are_refused_before_anything_runs() {
    let rig = Rig::new();
    let (mut vmm, sock) = rig.boot("", &[]);
    pause(&sock);
    let good = rig.path("good.full");
    snapshot(&sock, "full", &good);
    let diff = rig.path("good.diff");
    snapshot(&sock, "diff", &diff);
    vmm.kill();
    let bytes = std::fs::read(&good).unwrap();

    let write = |name: &str, data: &[u8]| {
        let p = rig.path(name);
        std::fs::write(&p, data).unwrap();
        p
    };
    let truncated = write("truncated", &bytes[..bytes.len() / 2]);
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let flipped = write("flipped", &flipped);
    let mut version = bytes.clone();
    version[8] = 99;
    let version = write("version", &version);
    let garbage = write("garbage", b"not a snapshot at all");

    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--restore".into(), truncated.display().to_string()],
            "truncated",
        ),
        (
            vec!["--restore".into(), flipped.display().to_string()],
            "checksum mismatch",
        ),
        (
            vec!["--restore".into(), version.display().to_string()],
            "version 99",
        ),
        (
            vec!["--restore".into(), garbage.display().to_string()],
            "bad magic",
        ),
        (
            vec!["--restore".into(), diff.display().to_string()],
            "starts with a full snapshot",
        ),
        (
            vec![
                "--restore".into(),
                good.display().to_string(),
                "--mem-mib".into(),
                "64".into(),
            ],
            "128 MiB",
        ),
        (
            vec![
                "--restore".into(),
                good.display().to_string(),
                "--cpu-template".into(),
                "baseline".into(),
            ],
            "the snapshot's CPU template is host, this VM's is baseline",
        ),
        (
            vec![
                "--restore".into(),
                rig.path("missing").display().to_string(),
            ],
            "cannot read snapshot",
        ),
    ];
    for (args, want) in cases {
        let sock = rig.path("x.sock");
        let mut v = start(&rig.topo, &sock, &strs(&args));
        let status = v.wait_exit(BOOT);
        assert_eq!(status.code(), Some(1), "{args:?}: {status:?}");
        let log = v.log();
        assert!(log.contains(want), "{args:?}: expected {want:?} in:\n{log}");
        assert!(
            v.serial().is_empty(),
            "{args:?}: the guest ran:\n{}",
            v.serial()
        );
    }
}

/// POSTs a kv record to the guest from the client namespace.
fn post_record(rig: &Rig, key: &str, value: &[u8]) {
    rig.topo.client().enter(|| {
        let http = TcpStream::connect_timeout(&SocketAddr::from((guest_ip(0), 80)), BOOT).unwrap();
        http.set_read_timeout(Some(BOOT)).unwrap();
        let r = Client::new(http, "guest")
            .request("POST", &format!("/kv/{key}"), value)
            .unwrap();
        assert!((200..300).contains(&r.status), "{}", r.text());
    });
}

#[test]
fn a_restore_onto_a_disk_written_since_the_snapshot_is_refused() {
    let rig = Rig::new();
    let disk = rig.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let disk_arg = disk.display().to_string();
    let (mut vmm, sock) = rig.boot("", &["--disk", &disk_arg]);
    post_record(&rig, "before", b"in the snapshot");
    pause(&sock);
    let snap = rig.path("a.full");
    snapshot(&sock, "full", &snap);
    resume(&sock);
    // Acknowledged after the snapshot: a restore would silently lose it.
    post_record(&rig, "after", b"acknowledged after the snapshot");
    vmm.kill();

    let restore = |snap: &Path, sock: &Path| {
        let snap = snap.display().to_string();
        let args = ["--restore", &snap, "--disk", &disk_arg, "--start-paused"];
        start(&rig.topo, sock, &args)
    };
    let mut r = restore(&snap, &rig.path("r.sock"));
    let status = r.wait_exit(BOOT);
    assert_eq!(status.code(), Some(1), "{status:?}");
    let log = r.log();
    assert!(
        log.contains("disk blk0") && log.contains("changed since the snapshot"),
        "{log}"
    );
    assert!(r.serial().is_empty(), "the guest ran:\n{}", r.serial());

    // A snapshot with the disk as it is now restores.
    let (mut vmm, sock) = rig.boot("", &["--disk", &disk_arg]);
    pause(&sock);
    let snap = rig.path("b.full");
    snapshot(&sock, "full", &snap);
    vmm.kill();
    let sock = rig.path("r2.sock");
    let _r = restore(&snap, &sock);
    wait_socket(&sock);
    assert!(state_hash(&sock).contains("blk0"));
}
