//! A primary in COLO mode whose secondary never answers (issue 10): until
//! checkpoint 0 its NICs pass frames through, so clients are served as by
//! a standalone guest; the API shows and changes the compare timeout.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::Duration;

use colo_tests::http::api_request;
use colo_tests::net::{guest_ip, Host, Topology};
use colo_tests::pair::{self_checks, Workload};
use colo_tests::{guest_artifact, wait_for_socket, Vmm};

const BOOT: Duration = Duration::from_secs(20);

#[test]
fn a_colo_primary_serves_clients_before_its_first_checkpoint() {
    let topo = Topology::builder().host_b(false).build();
    topo.add_tap(Host::A, "tapa");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut vmm = Vmm::spawn_in(
        topo.host(Host::A),
        [
            "--role",
            "primary",
            "--mode",
            "colo",
            // Nobody listens: the engine keeps trying, the guest runs.
            "--peer",
            "127.0.0.1:9",
            "--compare-timeout-ms",
            "35",
            "--kernel",
            guest_artifact("test-guest").to_str().unwrap(),
            "--cmdline",
            &format!("ip={}/24", guest_ip(0)),
            "--disk",
            disk.to_str().unwrap(),
            "--net",
            "tap=tapa",
            "--api-sock",
            sock.to_str().unwrap(),
        ],
    );
    vmm.wait_for_serial("colo-test-guest: ready", BOOT);
    wait_for_socket(&sock, BOOT);

    let w = Workload::start(topo.client(), guest_ip(0));
    let w = w.expect_progress(50, 10, 10, topo.client(), || vmm.log());
    let report = w.finish(topo.client());
    report.assert_clean(&vmm.log());
    assert_eq!(self_checks(&vmm.serial(), 0).1, None);

    let colo = |sock: &std::path::Path| {
        let r = api_request(sock, "GET", "/status", "").unwrap();
        let status: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
        status["colo"].clone()
    };
    let status = colo(&sock);
    assert_eq!(status["mode"], "colo", "{status}");
    assert_eq!(status["checkpoint_ms"], 2000, "{status}");
    assert_eq!(status["compare_timeout_ms"], 35, "{status}");
    let r = api_request(&sock, "PATCH", "/colo", r#"{"compare_timeout_ms":40}"#).unwrap();
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(colo(&sock)["compare_timeout_ms"], 40);
    let r = api_request(&sock, "PATCH", "/colo", r#"{"compare_timeout_ms":0}"#).unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(colo(&sock)["compare_timeout_ms"], 40);

    // Nothing was compared: the frames went straight out.
    let r = api_request(&sock, "GET", "/metrics", "").unwrap();
    let text = r.text();
    for series in ["colo_compared_frames_total 0", "colo_proxy_held_frames 0"] {
        assert!(text.lines().any(|l| l == series), "{series}\n{text}");
    }
}
