#![allow(clippy::unwrap_used)]
//! The REST control socket of a real `vmm`: every endpoint, malformed
//! requests, `vmmctl`, and pause/resume seen from a network client.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use colo_tests::http::{api_client, api_request, Client, Response};
use colo_tests::net::{guest_ip, Host, Topology};
use colo_tests::{guest_artifact, vmm_bin, Vmm};

const BOOT: Duration = Duration::from_secs(20);

fn api(sock: &Path) -> Client<UnixStream> {
    api_client(sock).unwrap()
}

fn json(r: &Response) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()))
}

fn put_json(sock: &Path, path: &str, body: &str) -> Response {
    api_request(sock, "PUT", path, body).unwrap()
}

struct Plain {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    vmm: Vmm,
}

/// A test guest without devices, with an API socket.
fn plain_vm() -> Plain {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut vmm = Vmm::spawn([
        "--kernel",
        guest_artifact("test-guest").to_str().unwrap(),
        "--vcpus",
        "2",
        "--mem-mib",
        "96",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    vmm.wait_for_serial("colo-test-guest: ready", BOOT);
    Plain {
        _dir: dir,
        sock,
        vmm,
    }
}

fn vmmctl(sock: &Path, args: &[&str]) -> std::process::Output {
    let bin = vmm_bin().with_file_name("vmmctl");
    Command::new(bin)
        .arg("--api-sock")
        .arg(sock)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn status_metrics_pause_resume_and_shutdown() {
    let mut vm = plain_vm();
    let mode = std::fs::metadata(&vm.sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    let r = api(&vm.sock).request("GET", "/status", b"").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let s = json(&r);
    assert_eq!(s["role"], "standalone");
    assert_eq!(s["state"], "running");
    assert_eq!(
        (s["vcpus"].as_u64(), s["memory_mib"].as_u64()),
        (Some(2), Some(96))
    );
    assert!(s["uptime_secs"].as_f64().unwrap() > 0.0);

    let m = api(&vm.sock).request("GET", "/metrics", b"").unwrap();
    assert_eq!(m.status, 200);
    let text = m.text();
    assert!(
        text.contains("# TYPE colo_vmm_exits_total counter"),
        "{text}"
    );
    let serial: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("colo_vmm_serial_tx_bytes_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        serial as usize >= vm.vmm.serial().len(),
        "{serial} serial bytes counted"
    );

    assert_eq!(
        put_json(&vm.sock, "/vm", r#"{"state":"paused"}"#).status,
        204
    );
    assert_eq!(
        json(&api(&vm.sock).request("GET", "/status", b"").unwrap())["state"],
        "paused"
    );
    // Idempotent.
    assert_eq!(
        put_json(&vm.sock, "/vm", r#"{"state":"paused"}"#).status,
        204
    );
    assert_eq!(
        put_json(&vm.sock, "/vm", r#"{"state":"running"}"#).status,
        204
    );
    assert_eq!(
        json(&api(&vm.sock).request("GET", "/status", b"").unwrap())["state"],
        "running"
    );

    assert_eq!(
        put_json(&vm.sock, "/actions", r#"{"action":"shutdown"}"#).status,
        202
    );
    let status = vm.vmm.wait_exit(BOOT);
    assert!(status.success(), "{status:?}\n{}", vm.vmm.log());
    assert!(!vm.sock.exists(), "the socket outlived the vmm");
}

#[test]
fn malformed_requests_get_4xx_and_the_vm_keeps_running() {
    let vm = plain_vm();
    /// method, path, extra headers, body, expected status
    type Case = (
        &'static str,
        &'static str,
        Vec<(&'static str, &'static str)>,
        Vec<u8>,
        u16,
    );
    let cases: Vec<Case> = vec![
        ("GET", "/nope", vec![], vec![], 404),
        ("DELETE", "/status", vec![], vec![], 405),
        ("GET", "/vm", vec![], vec![], 405),
        ("PUT", "/vm", vec![], b"{not json".to_vec(), 400),
        ("PUT", "/vm", vec![], br#"{"state": 5}"#.to_vec(), 400),
        (
            "PUT",
            "/vm",
            vec![],
            br#"{"state": "sleeping"}"#.to_vec(),
            400,
        ),
        (
            "PUT",
            "/vm",
            vec![],
            br#"{"state": "paused", "extra": 1}"#.to_vec(),
            400,
        ),
        ("PUT", "/vm", vec![], br#"{}"#.to_vec(), 400),
        (
            "PUT",
            "/vm",
            vec![("Content-Type", "text/plain")],
            br#"{"state":"paused"}"#.to_vec(),
            415,
        ),
        (
            "PUT",
            "/actions",
            vec![],
            br#"{"action": "explode"}"#.to_vec(),
            400,
        ),
        ("PUT", "/actions", vec![], vec![b'x'; 1 << 20], 413),
        (
            "PUT",
            "/snapshot",
            vec![],
            br#"{"type": "half", "path": "/tmp/x"}"#.to_vec(),
            400,
        ),
        (
            "PUT",
            "/snapshot",
            vec![],
            br#"{"type": "full"}"#.to_vec(),
            400,
        ),
        (
            "PUT",
            "/snapshot",
            vec![],
            br#"{"type": "full", "path": ""}"#.to_vec(),
            400,
        ),
        ("GET", "/snapshot", vec![], vec![], 405),
        // The VM runs: snapshots and hashes need it paused.
        (
            "PUT",
            "/snapshot",
            vec![],
            br#"{"type": "full", "path": "/tmp/colo-never.snap"}"#.to_vec(),
            409,
        ),
        ("GET", "/state-hash", vec![], vec![], 409),
    ];
    for (method, path, headers, body, want) in cases {
        let r = api(&vm.sock)
            .request_with(method, path, &headers, &body)
            .unwrap();
        assert_eq!(
            r.status,
            want,
            "{method} {path} {:?}: {}",
            String::from_utf8_lossy(&body[..body.len().min(40)]),
            r.text()
        );
        assert!(
            json(&r)["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{}",
            r.text()
        );
    }
    // A lying Content-Length is refused before any body is read.
    let mut s = UnixStream::connect(&vm.sock).unwrap();
    s.write_all(b"PUT /vm HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n")
        .unwrap();
    let mut reply = [0u8; 12];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"HTTP/1.1 413");

    let r = api(&vm.sock).request("GET", "/status", b"").unwrap();
    assert_eq!(json(&r)["state"], "running");
    assert!(!Path::new("/tmp/colo-never.snap").exists());

    // Paused, but started without --track-dirty-pages: no diffs.
    assert_eq!(
        put_json(&vm.sock, "/vm", r#"{"state":"paused"}"#).status,
        204
    );
    let r = put_json(
        &vm.sock,
        "/snapshot",
        r#"{"type":"diff","path":"/tmp/colo-never.snap"}"#,
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(json(&r)["error"]
        .as_str()
        .unwrap()
        .contains("--track-dirty-pages"));
    let r = api(&vm.sock).request("GET", "/state-hash", b"").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(json(&r)["hash"].as_str().unwrap().len(), 16);
}

#[test]
fn vmmctl_calls_every_endpoint() {
    let mut vm = plain_vm();
    let out = vmmctl(&vm.sock, &["status"]);
    assert!(out.status.success());
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["state"], "running");
    assert!(vmmctl(&vm.sock, &["pause"]).status.success());
    let out = vmmctl(&vm.sock, &["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"paused\""));
    assert!(vmmctl(&vm.sock, &["resume"]).status.success());
    let out = vmmctl(&vm.sock, &["metrics"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("colo_vmm_uptime_seconds"));
    let out = vmmctl(&vm.sock, &["raw", "PUT", "/vm", r#"{"state":"nap"}"#]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HTTP 400"),
        "{out:?}"
    );
    assert!(vmmctl(&vm.sock, &["pause"]).status.success());
    let snap = vm._dir.path().join("ctl.snap");
    let out = vmmctl(
        &vm.sock,
        &["snapshot", "--type", "full", snap.to_str().unwrap()],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(snap.exists());
    let out = vmmctl(&vm.sock, &["state-hash"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"memory\""),
        "{out:?}"
    );
    assert!(vmmctl(&vm.sock, &["resume"]).status.success());
    let out = vmmctl(&vm.sock, &["raw", "GET", "/missing"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HTTP 404"),
        "{out:?}"
    );
    // The replication commands reach the API; a standalone VM refuses
    // them with the API's message, and keeps running.
    for args in [
        &["failover"][..],
        &["checkpoint"],
        &["set-checkpoint-ms", "50"],
        &["set-compare-timeout-ms", "50"],
        &["colo-status"],
    ] {
        let out = vmmctl(&vm.sock, args);
        assert!(!out.status.success(), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not replicating"), "{args:?}: {err}");
    }
    let out = vmmctl(&vm.sock, &["set-checkpoint-ms", "0"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HTTP 400: checkpoint_ms 0 is out of range"),
        "{out:?}"
    );
    let out = vmmctl(&vm.sock, &["set-compare-timeout-ms", "60001"]);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("HTTP 400: compare_timeout_ms 60001 is out of range"),
        "{out:?}"
    );
    let out = vmmctl(&vm.sock, &["status"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["state"], "running");
    assert!(status.get("colo").is_none(), "{status}");
    assert!(vmmctl(&vm.sock, &["shutdown"]).status.success());
    assert!(vm.vmm.wait_exit(BOOT).success());
    let out = vmmctl(&vm.sock, &["status"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect"),
        "{out:?}"
    );
}

#[test]
fn pause_stops_the_counter_and_the_echo_until_resume() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let topo = Topology::builder().host_b(false).build();
    topo.add_tap(Host::A, "tap0");
    let mut vmm = Vmm::spawn_in(
        topo.host(Host::A),
        [
            "--kernel",
            guest_artifact("test-guest").to_str().unwrap(),
            "--net",
            "tap=tap0",
            "--api-sock",
            sock.to_str().unwrap(),
            "--cmdline",
            &format!("ip={}/24", guest_ip(0)),
        ],
    );
    vmm.wait_for_serial("colo-test-guest: ready", BOOT);
    let addr = |port| SocketAddr::from((guest_ip(0), port));

    topo.client().enter(|| {
        let http = TcpStream::connect_timeout(&addr(80), BOOT).unwrap();
        http.set_read_timeout(Some(BOOT)).unwrap();
        let mut http = Client::new(http, "guest");
        let mut echo = TcpStream::connect_timeout(&addr(7), BOOT).unwrap();
        echo.set_read_timeout(Some(BOOT)).unwrap();
        let ping = |echo: &mut TcpStream, msg: &[u8]| {
            echo.write_all(msg).unwrap();
            let mut got = vec![0; msg.len()];
            echo.read_exact(&mut got).unwrap();
            assert_eq!(got, msg);
        };
        assert_eq!(http.request("GET", "/count", b"").unwrap().text(), "1");
        ping(&mut echo, b"before");
        // Connected now: a paused guest cannot accept connections.
        let mut probe = TcpStream::connect_timeout(&addr(80), BOOT).unwrap();

        assert_eq!(put_json(&sock, "/vm", r#"{"state":"paused"}"#).status, 204);
        // While paused, neither service answers: a short read times out.
        echo.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        echo.write_all(b"during").unwrap();
        let mut buf = [0u8; 6];
        let e = echo.read_exact(&mut buf).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{e}"
        );
        probe
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        probe.write_all(b"GET /count HTTP/1.1\r\n\r\n").unwrap();
        let e = probe.read(&mut [0u8; 64]).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{e}"
        );

        assert_eq!(put_json(&sock, "/vm", r#"{"state":"running"}"#).status, 204);
        // The echo sent while paused arrives now, and the counter goes on
        // from where it stopped (the probe's request counted once).
        echo.set_read_timeout(Some(BOOT)).unwrap();
        echo.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"during");
        probe.set_read_timeout(Some(BOOT)).unwrap();
        let mut probe = Client::new(probe, "guest");
        assert_eq!(probe.raw(b"").unwrap().text(), "2");
        assert_eq!(http.request("GET", "/count", b"").unwrap().text(), "3");
        ping(&mut echo, b"after");
    });
}
