#![allow(clippy::unwrap_used)] // tests fail loudly by design
//! Pause → state-hash → resume, many times over, while a client keeps the
//! guest's network and disk busy: no request hangs, every acknowledged
//! key-value record is readable afterwards, and the guest's request counter
//! never jumps.
//!
//! `COLO_STRESS_CYCLES=10000` makes it a soak run (README, "Soak runs").

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use colo_tests::http::{api_request, Client};
use colo_tests::net::{guest_ip, Host, Topology};
use colo_tests::{env_count, guest_artifact, Vmm};

const BOOT: Duration = Duration::from_secs(20);
/// No request may take longer than this, pauses included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
const TAP: &str = "tap0";
/// Cycles in the suite; `COLO_STRESS_CYCLES` asks for more.
const CYCLES: usize = 300;

fn call(sock: &Path, method: &str, path: &str, body: &str, want: u16) {
    let r = api_request(sock, method, path, body).unwrap();
    assert_eq!(r.status, want, "{method} {path}: {}", r.text());
}

/// What the client saw: acknowledged records and `/count` answers.
#[derive(Default)]
struct Load {
    stored: Vec<(String, Vec<u8>)>,
    counts: u64,
}

/// Alternates `POST /kv/k<i>` and `GET /count` until `stop`, checking
/// that the counter goes up by exactly one per request.
fn load(client: &mut Client<TcpStream>, stop: &AtomicBool) -> Load {
    let mut seen = Load::default();
    let mut last_count = None;
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let key = format!("k{i}");
        let value = format!("value {i} {}", "x".repeat((i % 200) as usize)).into_bytes();
        let r = client
            .request("POST", &format!("/kv/{key}"), &value)
            .unwrap_or_else(|e| panic!("POST /kv/{key}: {e}"));
        assert_eq!(r.status, 201, "POST /kv/{key}: {}", r.text());
        seen.stored.push((key, value));
        let r = client
            .request("GET", "/count", b"")
            .unwrap_or_else(|e| panic!("GET /count: {e}"));
        let count: u64 = r.text().trim().parse().unwrap();
        if let Some(last) = last_count {
            assert_eq!(count, last + 1, "the guest's counter jumped");
        }
        last_count = Some(count);
        seen.counts += 1;
        i += 1;
    }
    seen
}

#[test]
fn pause_hash_resume_cycles_under_network_and_disk_load() {
    let cycles = env_count("COLO_STRESS_CYCLES", CYCLES);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let disk = dir.path().join("disk.img");
    // Room for far more records than a run writes.
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let topo = Topology::builder().host_b(false).build();
    topo.add_tap(Host::A, TAP);
    let mut vmm = Vmm::spawn_in(
        topo.host(Host::A),
        [
            "--kernel",
            guest_artifact("test-guest").to_str().unwrap(),
            "--mem-mib",
            "32",
            "--net",
            &format!("tap={TAP}"),
            "--disk",
            disk.to_str().unwrap(),
            "--cmdline",
            &format!("ip={}/24", guest_ip(0)),
            "--api-sock",
            sock.to_str().unwrap(),
        ],
    );
    vmm.wait_for_serial("colo-test-guest: ready", BOOT);

    let connect = || {
        let addr = SocketAddr::from((guest_ip(0), 80));
        let stream = topo
            .client()
            .enter(|| TcpStream::connect_timeout(&addr, BOOT).unwrap());
        stream.set_read_timeout(Some(REQUEST_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(REQUEST_TIMEOUT)).unwrap();
        Client::new(stream, &guest_ip(0).to_string())
    };
    let mut client = connect();
    let stop = Arc::new(AtomicBool::new(false));
    let client_stop = stop.clone();
    let loader = std::thread::spawn(move || load(&mut client, &client_stop));

    for cycle in 0..cycles {
        call(&sock, "PUT", "/vm", r#"{"state":"paused"}"#, 204);
        call(&sock, "GET", "/state-hash", "", 200);
        call(&sock, "PUT", "/vm", r#"{"state":"running"}"#, 204);
        assert!(
            !loader.is_finished(),
            "the client stopped at cycle {cycle}\n{}",
            vmm.serial()
        );
    }
    stop.store(true, Ordering::SeqCst);
    let seen = loader.join().unwrap();
    assert!(seen.counts > 0, "the client got nothing through");

    // Every acknowledged record is there, with its value.
    let mut client = connect();
    for (key, value) in &seen.stored {
        let r = client.request("GET", &format!("/kv/{key}"), b"").unwrap();
        assert_eq!(r.status, 200, "GET /kv/{key}: {}", r.text());
        assert_eq!(&r.body, value, "GET /kv/{key}");
    }
    assert!(!vmm.serial().contains("FAILED"), "{}", vmm.serial());
}
