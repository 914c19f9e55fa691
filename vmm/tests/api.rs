#![allow(clippy::unwrap_used)]
//! The control socket end to end without KVM: `spawn_server` with a fake
//! `VmControl` on a socket in a temporary directory, driven by the hyper
//! client, by hand-written (and malformed) HTTP, and by `vmmctl`.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm::api::{
    client, spawn_server, ApiError, ApiServer, ControlError, DeviceMetrics, Metrics, Status,
    VmControl, VmState,
};
use vmm::snapshot::Kind;

/// A VM that only records what it is asked and keeps a run state.
struct FakeVm {
    state: Mutex<VmState>,
    calls: Mutex<Vec<String>>,
    /// The next call fails with this.
    fail_next: Mutex<Option<ControlError>>,
}

impl FakeVm {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(VmState::Running),
            calls: Mutex::new(Vec::new()),
            fail_next: Mutex::new(None),
        })
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn state(&self) -> VmState {
        *self.state.lock().unwrap()
    }

    /// Records `name`; fails if asked to, or if the VM is shutting down.
    fn enter(&self, name: &str) -> Result<(), ControlError> {
        self.calls.lock().unwrap().push(name.to_string());
        if let Some(e) = self.fail_next.lock().unwrap().take() {
            return Err(e);
        }
        if self.state() == VmState::ShuttingDown {
            return Err(ControlError::Conflict("the VM is shutting down".into()));
        }
        Ok(())
    }

    fn set(&self, state: VmState) {
        *self.state.lock().unwrap() = state;
    }
}

impl VmControl for FakeVm {
    fn status(&self) -> Status {
        Status {
            role: "standalone".into(),
            state: self.state(),
            uptime_secs: 12.25,
            vcpus: 2,
            memory_mib: 256,
            colo: None,
        }
    }

    fn pause(&self) -> Result<(), ControlError> {
        self.enter("pause")?;
        self.set(VmState::Paused);
        Ok(())
    }

    fn resume(&self) -> Result<(), ControlError> {
        self.enter("resume")?;
        self.set(VmState::Running);
        Ok(())
    }

    fn shutdown(&self) -> Result<(), ControlError> {
        self.enter("shutdown")?;
        self.set(VmState::ShuttingDown);
        Ok(())
    }

    fn metrics(&self) -> Metrics {
        Metrics {
            uptime_secs: 12.25,
            exits: BTreeMap::from([("io".to_string(), 40), ("hlt".to_string(), 2)]),
            serial_tx_bytes: 1234,
            devices: vec![
                DeviceMetrics {
                    name: "blk0".into(),
                    kind: "virtio-blk".into(),
                    requests: 5,
                    read_bytes: 4096,
                    write_bytes: 512,
                    errors: 0,
                },
                DeviceMetrics {
                    name: "net\"0\\\n".into(),
                    kind: "virtio-net".into(),
                    requests: 7,
                    read_bytes: 100,
                    write_bytes: 200,
                    errors: 1,
                },
            ],
            colo: None,
        }
    }

    fn snapshot(&self, kind: Kind, path: &Path) -> Result<u64, ControlError> {
        self.enter(&format!("snapshot {kind:?} {}", path.display()))?;
        if self.state() != VmState::Paused {
            return Err(ControlError::Conflict("the VM must be paused".into()));
        }
        Ok(8192)
    }

    fn state_hash(&self) -> Result<String, ControlError> {
        self.enter("state_hash")?;
        if self.state() != VmState::Paused {
            return Err(ControlError::Conflict("the VM must be paused".into()));
        }
        Ok(r#"{"hash":"00112233445566ff","parts":{"memory":"0000000000000001"}}"#.into())
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    sock: PathBuf,
    vm: Arc<FakeVm>,
    server: ApiServer,
}

fn start() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let vm = FakeVm::new();
    let server = spawn_server(&sock, vm.clone()).unwrap();
    Fixture {
        dir,
        sock,
        vm,
        server,
    }
}

fn call(sock: &Path, method: &str, uri: &str, body: Option<&str>) -> (u16, String) {
    client::call(sock, method, uri, body).unwrap()
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

/// The `error` message of an error reply; it must have a non-empty one.
fn error_message(body: &str) -> String {
    let message = json(body)["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {body:?}"))
        .to_string();
    assert!(!message.is_empty());
    message
}

/// A reply read off the wire by hand.
#[derive(Debug)]
struct RawReply {
    status: u16,
    /// Lower-cased names.
    headers: Vec<(String, String)>,
    body: String,
}

impl RawReply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Writes `head` then `body` on a new connection and reads everything the
/// server sends until it closes (send `Connection: close`). A server that
/// answers and hangs up before taking the whole body is not an error.
fn raw(sock: &Path, head: &[u8], body: &[u8]) -> RawReply {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(head).unwrap();
    match s.write_all(body) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {}
        Err(e) => panic!("{e}"),
    }
    parse_reply(&read_reply(&mut s))
}

/// Reads until the server closes. A server that closes with some of our
/// request unread resets the connection after its reply: that ends the
/// reply too.
fn read_reply(s: &mut UnixStream) -> Vec<u8> {
    let mut reply = Vec::new();
    match s.read_to_end(&mut reply) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset && !reply.is_empty() => {}
        Err(e) => panic!("{e} after {reply:?}"),
    }
    reply
}

fn parse_reply(reply: &[u8]) -> RawReply {
    let text = String::from_utf8_lossy(reply);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no reply head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    RawReply {
        status,
        headers,
        body: body.to_string(),
    }
}

/// A complete request with `Connection: close`.
fn raw_request(
    sock: &Path,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawReply {
    let mut head = format!(
        "{method} {uri} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    raw(sock, head.as_bytes(), body)
}

fn vmmctl(sock: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmmctl"))
        .arg("--api-sock")
        .arg(sock)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn status_is_json() {
    let f = start();
    let r = raw_request(&f.sock, "GET", "/status", &[], b"");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let status: Status = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        status,
        Status {
            role: "standalone".into(),
            state: VmState::Running,
            uptime_secs: 12.25,
            vcpus: 2,
            memory_mib: 256,
            colo: None,
        }
    );
    assert_eq!(json(&r.body)["state"], "running");
    assert!(f.vm.calls().is_empty());
}

#[test]
fn put_vm_pauses_and_resumes_idempotently() {
    let f = start();
    for (body, want) in [
        (r#"{"state":"paused"}"#, "paused"),
        (r#"{"state":"paused"}"#, "paused"),
        (r#"{"state":"running"}"#, "running"),
        (r#"{"state":"running"}"#, "running"),
    ] {
        let (code, reply) = call(&f.sock, "PUT", "/vm", Some(body));
        assert_eq!((code, reply.as_str()), (204, ""), "{body}");
        let (_, status) = call(&f.sock, "GET", "/status", None);
        assert_eq!(json(&status)["state"], want);
    }
    assert_eq!(f.vm.calls(), ["pause", "pause", "resume", "resume"]);
}

#[test]
fn put_actions_shutdown_is_202_then_409() {
    let f = start();
    let (code, body) = call(&f.sock, "PUT", "/actions", Some(r#"{"action":"shutdown"}"#));
    assert_eq!((code, body.as_str()), (202, ""));
    assert_eq!(f.vm.state(), VmState::ShuttingDown);
    let (_, status) = call(&f.sock, "GET", "/status", None);
    assert_eq!(json(&status)["state"], "shutting_down");
    // Already shutting down: the fake says Conflict.
    let (code, body) = call(&f.sock, "PUT", "/actions", Some(r#"{"action":"shutdown"}"#));
    assert_eq!(code, 409);
    assert_eq!(error_message(&body), "the VM is shutting down");
    let (code, _) = call(&f.sock, "PUT", "/vm", Some(r#"{"state":"paused"}"#));
    assert_eq!(code, 409);
    assert_eq!(f.vm.calls(), ["shutdown", "shutdown", "pause"]);
}

#[test]
fn metrics_are_prometheus_text_with_escaped_labels() {
    let f = start();
    let r = raw_request(&f.sock, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4"));
    let text = &r.body;
    for line in [
        "colo_vmm_exits_total{reason=\"io\"} 40",
        "colo_vmm_exits_total{reason=\"hlt\"} 2",
        "colo_vmm_serial_tx_bytes_total 1234",
        "colo_vmm_uptime_seconds 12.250",
        "colo_vmm_virtio_requests_total{device=\"blk0\",kind=\"virtio-blk\"} 5",
        "colo_vmm_virtio_read_bytes_total{device=\"blk0\",kind=\"virtio-blk\"} 4096",
        "colo_vmm_virtio_write_bytes_total{device=\"blk0\",kind=\"virtio-blk\"} 512",
        "colo_vmm_virtio_errors_total{device=\"blk0\",kind=\"virtio-blk\"} 0",
        // `net"0\` and a newline, escaped.
        "colo_vmm_virtio_errors_total{device=\"net\\\"0\\\\\\n\",kind=\"virtio-net\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    // Every family announced once with HELP and TYPE, before its samples.
    for family in [
        ("colo_vmm_exits_total", "counter"),
        ("colo_vmm_serial_tx_bytes_total", "counter"),
        ("colo_vmm_uptime_seconds", "gauge"),
        ("colo_vmm_virtio_requests_total", "counter"),
        ("colo_vmm_virtio_read_bytes_total", "counter"),
        ("colo_vmm_virtio_write_bytes_total", "counter"),
        ("colo_vmm_virtio_errors_total", "counter"),
    ] {
        let (name, kind) = family;
        let type_line = format!("# TYPE {name} {kind}");
        let help = text.find(&format!("# HELP {name} ")).unwrap();
        let typ = text.find(&type_line).unwrap();
        let first_sample = text
            .lines()
            .position(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
            .unwrap();
        let type_lineno = text.lines().position(|l| l == type_line).unwrap();
        assert!(help < typ && type_lineno < first_sample, "{name}");
        assert_eq!(text.matches(&type_line).count(), 1, "{name}");
    }
    // Every sample line has a name, optional labels and a number.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
}

#[test]
fn snapshot_and_state_hash_reach_the_vm() {
    let f = start();
    let target = f.dir.path().join("vm.snap");
    let body = serde_json::json!({ "type": "full", "path": target }).to_string();
    let (code, reply) = call(&f.sock, "PUT", "/snapshot", Some(&body));
    assert_eq!(code, 409, "running: {reply}");
    error_message(&reply);
    let (code, _) = call(&f.sock, "GET", "/state-hash", None);
    assert_eq!(code, 409);
    call(&f.sock, "PUT", "/vm", Some(r#"{"state":"paused"}"#));
    let (code, reply) = call(&f.sock, "PUT", "/snapshot", Some(&body));
    assert_eq!((code, json(&reply)["bytes"].as_u64()), (200, Some(8192)));
    let (code, reply) = call(&f.sock, "GET", "/state-hash", None);
    assert_eq!(code, 200);
    assert_eq!(json(&reply)["hash"], "00112233445566ff");
    let snap = format!("snapshot Full {}", target.display());
    assert_eq!(
        f.vm.calls(),
        [
            snap.as_str(),
            "state_hash",
            "pause",
            snap.as_str(),
            "state_hash"
        ]
    );
}

#[test]
fn control_errors_become_400_409_500() {
    let f = start();
    for (e, want) in [
        (ControlError::Invalid("nope".into()), 400),
        (ControlError::Conflict("busy".into()), 409),
        (ControlError::Internal("vCPU thread gone".into()), 500),
    ] {
        let message = e.to_string();
        *f.vm.fail_next.lock().unwrap() = Some(e);
        let (code, body) = call(&f.sock, "PUT", "/vm", Some(r#"{"state":"paused"}"#));
        assert_eq!(code, want, "{body}");
        assert_eq!(error_message(&body), message);
    }
    assert_eq!(f.vm.state(), VmState::Running);
}

#[test]
fn unknown_path_is_404() {
    let f = start();
    for (method, uri) in [
        ("GET", "/"),
        ("GET", "/nope"),
        ("PUT", "/status/x"),
        ("GET", "/vm/"),
        ("POST", "/failover"),
    ] {
        let r = raw_request(&f.sock, method, uri, &[], b"");
        assert_eq!(r.status, 404, "{method} {uri}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert!(error_message(&r.body).contains(uri), "{}", r.body);
    }
}

#[test]
fn wrong_method_is_405_with_allow() {
    let f = start();
    for (method, uri, allow) in [
        ("POST", "/status", "GET"),
        ("DELETE", "/status", "GET"),
        ("PUT", "/metrics", "GET"),
        ("GET", "/vm", "PUT"),
        ("POST", "/vm", "PUT"),
        ("GET", "/actions", "PUT"),
        ("PATCH", "/actions", "PUT"),
        ("GET", "/snapshot", "PUT"),
        ("PUT", "/state-hash", "GET"),
    ] {
        let r = raw_request(
            &f.sock,
            method,
            uri,
            &[("Content-Type", "application/json")],
            br#"{"state":"paused"}"#,
        );
        assert_eq!(r.status, 405, "{method} {uri}");
        assert_eq!(r.header("allow"), Some(allow), "{method} {uri}");
        error_message(&r.body);
    }
    assert!(f.vm.calls().is_empty(), "{:?}", f.vm.calls());
}

#[test]
fn malformed_bodies_are_400() {
    let f = start();
    for (uri, body, says) in [
        ("/vm", "{not json", "invalid JSON"),
        ("/vm", "", "EOF"),
        ("/vm", r#"{"state": 5}"#, "invalid JSON"),
        ("/vm", r#"{"state": true}"#, "invalid JSON"),
        ("/vm", r#"["paused"]"#, "object"),
        ("/vm", r#""paused""#, "object"),
        ("/vm", r#"{}"#, "missing field `state`"),
        (
            "/vm",
            r#"{"state": "paused", "extra": 1}"#,
            "unknown field `extra`",
        ),
        (
            "/vm",
            r#"{"state": "sleeping"}"#,
            "unknown variant `sleeping`",
        ),
        ("/vm", r#"{"state": "shutting_down"}"#, "unknown variant"),
        (
            "/actions",
            r#"{"action": "explode"}"#,
            "unknown variant `explode`",
        ),
        (
            "/actions",
            r#"{"action": "shutdown", "now": true}"#,
            "unknown field",
        ),
        ("/actions", r#"{"action": ["shutdown"]}"#, "invalid JSON"),
        (
            "/snapshot",
            r#"{"type": "half", "path": "/x"}"#,
            "unknown variant",
        ),
        ("/snapshot", r#"{"type": "full", "path": ""}"#, "empty"),
        (
            "/snapshot",
            r#"{"type": "full", "path": 3}"#,
            "invalid type",
        ),
    ] {
        let (code, reply) = call(&f.sock, "PUT", uri, Some(body));
        assert_eq!(code, 400, "{uri} {body}: {reply}");
        let message = error_message(&reply);
        assert!(message.contains(says), "{uri} {body}: {message}");
    }
    assert!(f.vm.calls().is_empty(), "{:?}", f.vm.calls());
    assert_eq!(f.vm.state(), VmState::Running);
}

#[test]
fn content_type_must_be_json_if_given() {
    let f = start();
    let body = br#"{"state":"paused"}"#;
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/jsonp",
    ] {
        let r = raw_request(&f.sock, "PUT", "/vm", &[("Content-Type", ct)], body);
        assert_eq!(r.status, 415, "{ct}");
        assert!(error_message(&r.body).contains("application/json"));
    }
    assert!(f.vm.calls().is_empty());
    // With parameters it is still JSON; without a type it is taken as JSON.
    let r = raw_request(
        &f.sock,
        "PUT",
        "/vm",
        &[("Content-Type", "application/json; charset=utf-8")],
        body,
    );
    assert_eq!(r.status, 204, "{r:?}");
    let r = raw_request(&f.sock, "PUT", "/vm", &[], br#"{"state":"running"}"#);
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(f.vm.calls(), ["pause", "resume"]);
}

#[test]
fn bodies_over_16_kib_are_413() {
    let f = start();
    let mib = vec![b' '; 1 << 20];
    let mib = std::str::from_utf8(&mib).unwrap();

    // Through the hyper client: it must get the early answer.
    let (code, reply) = call(&f.sock, "PUT", "/vm", Some(mib));
    assert_eq!(code, 413, "{reply}");
    assert!(error_message(&reply).contains("16384"));

    // By hand, with Content-Length.
    let r = raw_request(&f.sock, "PUT", "/actions", &[], mib.as_bytes());
    assert_eq!(r.status, 413, "{r:?}");
    error_message(&r.body);

    // A declared length alone is refused without waiting for the body.
    let mut s = UnixStream::connect(&f.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"PUT /vm HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n")
        .unwrap();
    let r = parse_reply(&read_reply(&mut s));
    assert_eq!(r.status, 413);
    error_message(&r.body);

    // Chunked, no length: cut off once past the limit.
    let mut chunked = Vec::new();
    for _ in 0..64 {
        chunked.extend_from_slice(b"400\r\n");
        chunked.extend_from_slice(&[b' '; 0x400]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let r = raw(
        &f.sock,
        b"PUT /vm HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n",
        &chunked,
    );
    assert_eq!(r.status, 413, "{r:?}");

    // A 413 for a body read to its end keeps the connection.
    let mut s = UnixStream::connect(&f.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(
        format!(
            "PUT /vm HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            mib.len()
        )
        .as_bytes(),
    )
    .unwrap();
    s.write_all(mib.as_bytes()).unwrap();
    s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let text = String::from_utf8(read_reply(&mut s)).unwrap();
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("HTTP/1.1 200"), "{text}");
    assert!(text.contains(r#""state":"running""#), "{text}");

    // 16 KiB exactly is not too large.
    let mut at_limit = String::from(r#"{"state":"paused"}"#);
    at_limit.push_str(&" ".repeat(16 * 1024 - at_limit.len()));
    let (code, reply) = call(&f.sock, "PUT", "/vm", Some(&at_limit));
    assert_eq!(code, 204, "{reply}");
    assert_eq!(f.vm.calls(), ["pause"]);
}

#[test]
fn socket_is_mode_0600_and_removed_on_shutdown() {
    let f = start();
    let meta = std::fs::symlink_metadata(&f.sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(f.server.path(), f.sock);
    f.server.shutdown();
    assert!(!f.sock.exists(), "the socket outlived the server");
    let e = UnixStream::connect(&f.sock).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

#[test]
fn dropping_the_server_closes_open_connections() {
    let f = start();
    // A connection that sent half a request.
    let mut idle = UnixStream::connect(&f.sock).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    idle.write_all(b"GET /status HTTP/1.1\r\n").unwrap();
    drop(f.server);
    assert!(!f.sock.exists());
    let mut rest = Vec::new();
    // EOF (or reset), not a hang.
    let _ = idle.read_to_end(&mut rest);
    assert!(
        rest.is_empty() || rest.starts_with(b"HTTP/1.1 "),
        "{rest:?}"
    );
}

#[test]
fn stale_socket_is_replaced_but_live_socket_and_files_are_not() {
    let dir = tempfile::tempdir().unwrap();

    // Left behind by a dead process: a socket file nobody listens on.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let server = spawn_server(&stale, FakeVm::new()).unwrap();
    assert_eq!(call(&stale, "GET", "/status", None).0, 200);

    // Somebody listens: refused, and the first server keeps its socket.
    match spawn_server(&stale, FakeVm::new()) {
        Err(ApiError::InUse { path }) => assert_eq!(path, stale),
        other => panic!("{other:?}"),
    }
    assert_eq!(call(&stale, "GET", "/status", None).0, 200);
    drop(server);
    assert!(!stale.exists());

    // A server whose socket was replaced by somebody else's leaves that
    // one alone when it stops.
    let server = spawn_server(&stale, FakeVm::new()).unwrap();
    std::fs::remove_file(&stale).unwrap();
    let other = UnixListener::bind(&stale).unwrap();
    drop(server);
    assert!(stale.exists());
    drop(other);

    // Not a socket: left alone.
    let file = dir.path().join("file");
    std::fs::write(&file, "precious").unwrap();
    match spawn_server(&file, FakeVm::new()) {
        Err(e @ ApiError::NotASocket { .. }) => {
            assert!(e.to_string().contains("not a socket"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");

    // No such directory: a bind error naming the path.
    let nowhere = dir.path().join("no/such/dir/api.sock");
    match spawn_server(&nowhere, FakeVm::new()) {
        Err(e @ ApiError::Bind { .. }) => assert!(e.to_string().contains("no/such/dir")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn server_still_answers_after_a_string_of_bad_requests() {
    let f = start();
    // Not HTTP at all.
    let r = raw(&f.sock, b"HELLO THERE\r\n\r\n", b"");
    assert_eq!(r.status, 400, "{r:?}");
    // A broken header line.
    let r = raw(
        &f.sock,
        b"GET /status HTTP/1.1\r\nno colon here\r\n\r\n",
        b"",
    );
    assert_eq!(r.status, 400, "{r:?}");
    // A malformed Content-Length.
    let r = raw(
        &f.sock,
        b"PUT /vm HTTP/1.1\r\nContent-Length: ten\r\nConnection: close\r\n\r\n",
        b"",
    );
    assert_eq!(r.status, 400, "{r:?}");
    // Hang-ups mid-request, mid-body and before anything at all.
    drop(UnixStream::connect(&f.sock).unwrap());
    let mut s = UnixStream::connect(&f.sock).unwrap();
    s.write_all(b"PUT /vm HTTP/1.1\r\nContent-Le").unwrap();
    drop(s);
    let mut s = UnixStream::connect(&f.sock).unwrap();
    s.write_all(b"PUT /vm HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"sta")
        .unwrap();
    drop(s);
    // And a stream of bad JSON and wrong routes.
    for _ in 0..20 {
        assert_eq!(call(&f.sock, "PUT", "/vm", Some("{")).0, 400);
        assert_eq!(call(&f.sock, "GET", "/nope", None).0, 404);
        assert_eq!(call(&f.sock, "DELETE", "/vm", None).0, 405);
    }
    let (code, body) = call(&f.sock, "GET", "/status", None);
    assert_eq!(code, 200);
    assert_eq!(json(&body)["state"], "running");
    assert!(f.vm.calls().is_empty(), "{:?}", f.vm.calls());
}

#[test]
fn keep_alive_connections_and_concurrent_clients() {
    let f = start();
    // Two requests on one connection.
    let mut s = UnixStream::connect(&f.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(
        b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n\
          PUT /vm HTTP/1.1\r\nHost: x\r\nContent-Length: 18\r\nConnection: close\r\n\r\n\
          {\"state\":\"paused\"}",
    )
    .unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).unwrap();
    let text = String::from_utf8_lossy(&reply);
    assert_eq!(text.matches("HTTP/1.1 ").count(), 2, "{text}");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("HTTP/1.1 204"), "{text}");
    assert_eq!(f.vm.state(), VmState::Paused);

    // Many clients at once, each told the truth.
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let sock = f.sock.clone();
            std::thread::spawn(move || {
                for _ in 0..10 {
                    let (code, body) = client::call(&sock, "GET", "/status", None).unwrap();
                    assert_eq!(code, 200);
                    assert_eq!(json(&body)["state"], "paused");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn client_reports_connect_and_request_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.sock");
    match client::call(&missing, "GET", "/status", None) {
        Err(e @ client::ClientError::Connect { .. }) => {
            assert!(e.to_string().contains("missing.sock"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    let f = start();
    for (method, uri) in [("GET", "status"), ("G ET", "/status"), ("GET", "/a b")] {
        match client::call(&f.sock, method, uri, None) {
            Err(client::ClientError::Request(_)) => {}
            other => panic!("{method} {uri}: {other:?}"),
        }
    }
}

#[test]
fn vmmctl_prints_replies_and_fails_on_errors() {
    let f = start();
    let out = vmmctl(&f.sock, &["status"]);
    assert!(out.status.success(), "{out:?}");
    let status: Status = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status.state, VmState::Running);

    let out = vmmctl(&f.sock, &["pause"]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert_eq!(f.vm.state(), VmState::Paused);
    assert!(vmmctl(&f.sock, &["resume"]).status.success());
    assert_eq!(f.vm.state(), VmState::Running);

    let out = vmmctl(&f.sock, &["metrics"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("colo_vmm_serial_tx_bytes_total 1234"),
        "{text}"
    );

    // Errors: exit status 1 and the server's message on stderr.
    let out = vmmctl(&f.sock, &["raw", "PUT", "/vm", r#"{"state":"nap"}"#]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("HTTP 400"), "{stderr}");
    assert!(stderr.contains("unknown variant `nap`"), "{stderr}");
    assert!(out.stdout.is_empty());
    let out = vmmctl(&f.sock, &["raw", "get", "/missing"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no such endpoint /missing"),
        "{out:?}"
    );
    // raw with a good request prints the body.
    let out = vmmctl(&f.sock, &["raw", "GET", "/status"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"running\""));

    assert!(vmmctl(&f.sock, &["shutdown"]).status.success());
    assert_eq!(f.vm.state(), VmState::ShuttingDown);
    let out = vmmctl(&f.sock, &["shutdown"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 409: the VM is shutting down"));
    assert_eq!(
        f.vm.calls(),
        ["pause", "resume", "shutdown", "shutdown"],
        "{:?}",
        f.vm.calls()
    );

    drop(f.server);
    let out = vmmctl(&f.sock, &["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect"),
        "{out:?}"
    );
}

#[test]
fn openapi_file_describes_every_endpoint() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api.yaml");
    let yaml = std::fs::read_to_string(&path).unwrap();
    assert!(yaml.starts_with("openapi: 3.0"));
    for (uri, method) in [
        ("/status", "get"),
        ("/vm", "put"),
        ("/actions", "put"),
        ("/metrics", "get"),
        ("/snapshot", "put"),
        ("/state-hash", "get"),
        ("/colo", "patch"),
    ] {
        assert!(
            yaml.contains(&format!("\n  {uri}:\n    {method}:\n")),
            "{method} {uri} not in {}",
            path.display()
        );
    }
    for schema in ["ColoStatus", "ColoRequest"] {
        assert!(yaml.contains(&format!("\n    {schema}:\n")), "{schema}");
    }
    for state in colo::control::State::ALL {
        assert!(yaml.contains(state.name()), "{}", state.name());
    }
    for response in [
        "BadRequest",
        "MethodNotAllowed",
        "NotFound",
        "Conflict",
        "TooLarge",
        "UnsupportedMediaType",
        "Internal",
    ] {
        assert!(yaml.contains(&format!("\n    {response}:\n")), "{response}");
    }
}
