#![allow(clippy::unwrap_used)]
//! The API server against a fake VM: error mapping, socket handling and
//! shutdown, without KVM.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use vmm::api::{client, spawn_server, ApiError, ControlError, Metrics, Status, VmControl, VmState};
use vmm::snapshot::Kind;

type Failure = fn() -> ControlError;

/// Records calls; answers with the error set in `fail`, if any.
#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<String>>,
    fail: Mutex<Option<Failure>>,
}

impl Fake {
    fn answer(&self, call: String) -> Result<(), ControlError> {
        self.calls.lock().unwrap().push(call);
        match *self.fail.lock().unwrap() {
            Some(make) => Err(make()),
            None => Ok(()),
        }
    }
}

impl VmControl for Fake {
    fn status(&self) -> Status {
        Status {
            role: "standalone".into(),
            state: VmState::Running,
            uptime_secs: 1.0,
            vcpus: 1,
            memory_mib: 64,
        }
    }
    fn pause(&self) -> Result<(), ControlError> {
        self.answer("pause".into())
    }
    fn resume(&self) -> Result<(), ControlError> {
        self.answer("resume".into())
    }
    fn shutdown(&self) -> Result<(), ControlError> {
        self.answer("shutdown".into())
    }
    fn metrics(&self) -> Metrics {
        Metrics::default()
    }
    fn snapshot(&self, kind: Kind, path: &Path) -> Result<u64, ControlError> {
        self.answer(format!("snapshot {kind:?} {}", path.display()))
            .map(|()| 42)
    }
    fn state_hash(&self) -> Result<String, ControlError> {
        self.answer("hash".into())
            .map(|()| r#"{"hash":"00000000000000aa","parts":{}}"#.into())
    }
}

#[test]
fn control_errors_map_to_status_codes() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let fake = Arc::new(Fake::default());
    let _server = spawn_server(&sock, fake.clone()).unwrap();

    let ok = client::call(
        &sock,
        "PUT",
        "/snapshot",
        Some(r#"{"type":"diff","path":"/x/y"}"#),
    );
    assert_eq!(ok.unwrap(), (200, r#"{"bytes":42}"#.to_string()));
    assert_eq!(
        fake.calls.lock().unwrap().last().unwrap(),
        "snapshot Diff /x/y"
    );
    let cases: [(Failure, u16); 3] = [
        (|| ControlError::Invalid("no".into()), 400),
        (|| ControlError::Conflict("busy".into()), 409),
        (|| ControlError::Internal("broken".into()), 500),
    ];
    for (make, want) in cases {
        *fake.fail.lock().unwrap() = Some(make);
        for (method, path, body) in [
            ("PUT", "/vm", Some(r#"{"state":"paused"}"#)),
            ("PUT", "/actions", Some(r#"{"action":"shutdown"}"#)),
            ("PUT", "/snapshot", Some(r#"{"type":"full","path":"/a"}"#)),
            ("GET", "/state-hash", None),
        ] {
            let (status, body) = client::call(&sock, method, path, body).unwrap();
            assert_eq!(status, want, "{method} {path}: {body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert!(v["error"].as_str().unwrap().len() > 1, "{body}");
        }
    }
    *fake.fail.lock().unwrap() = None;
    assert_eq!(
        client::call(&sock, "GET", "/state-hash", None).unwrap().0,
        200
    );
    assert_eq!(
        client::call(&sock, "PUT", "/nowhere", Some("{}"))
            .unwrap()
            .0,
        404
    );
}

#[test]
fn the_socket_is_private_replaces_a_stale_file_and_refuses_a_live_one() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    // A stale socket file (nobody listening) is replaced.
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let server = spawn_server(&sock, Arc::new(Fake::default())).unwrap();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // A live one is not taken over.
    let e = spawn_server(&sock, Arc::new(Fake::default()))
        .err()
        .unwrap();
    assert!(matches!(e, ApiError::InUse { .. }), "{e}");
    // Dropping the server removes its socket.
    drop(server);
    assert!(!sock.exists());
}

#[test]
fn keep_alive_connections_and_garbage_are_handled() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let _server = spawn_server(&sock, Arc::new(Fake::default())).unwrap();
    let mut s = UnixStream::connect(&sock).unwrap();
    // Two requests on one connection.
    s.write_all(
        b"GET /status HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert_eq!(reply.matches("HTTP/1.1 200").count(), 2, "{reply}");
    // Garbage gets a 4xx or a closed connection, never a hang or a crash.
    let mut g = UnixStream::connect(&sock).unwrap();
    g.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
    let mut reply = Vec::new();
    let _ = g.read_to_end(&mut reply);
    assert!(
        reply.is_empty() || reply.starts_with(b"HTTP/1.1 4"),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );
    assert_eq!(client::call(&sock, "GET", "/status", None).unwrap().0, 200);
}
