//! `colo-bench snapshot`: how long a diff snapshot keeps the VM paused, by
//! dirty set size, against a plain memcpy of the same bytes in this
//! process, measured in the same run; then how long `vmm --restore` of a
//! full snapshot of the 128 MiB test guest takes from process start to a
//! running VM (its API answering), every chunk's checksum verified.

use std::path::Path;
use std::time::{Duration, Instant};

use colo_tests::http::{api_request, Response};
use colo_tests::{guest_artifact, Vmm};

use crate::percentile;

const BOOT: Duration = Duration::from_secs(60);

fn api(sock: &Path, method: &str, path: &str, body: &str) -> Response {
    let r = api_request(sock, method, path, body).expect("API request");
    assert!(
        (200..300).contains(&r.status),
        "{method} {path}: {}",
        r.text()
    );
    r
}

fn wait_generation(vmm: &mut Vmm) {
    let line = vmm.wait_for_serial("workload generation", BOOT);
    assert!(line.contains(" ok"), "{line}");
}

/// Median of `runs` memcpys of `bytes`.
pub(crate) fn memcpy_time(bytes: usize, runs: usize) -> Duration {
    let src = vec![0x5au8; bytes];
    let mut dst = vec![0u8; bytes];
    let mut samples: Vec<Duration> = (0..runs)
        .map(|i| {
            let t = Instant::now();
            dst.copy_from_slice(&src);
            std::hint::black_box(&mut dst)[i % bytes] ^= 1;
            t.elapsed()
        })
        .collect();
    percentile(&mut samples, 0.5)
}

pub fn run(runs: usize) {
    let kernel = guest_artifact("test-guest");
    let dir = tempfile::tempdir_in("/dev/shm").expect("a directory in /dev/shm");
    println!("snapshot: diff snapshot to tmpfs while paused, by dirty MiB (median of {runs})");
    println!(
        "  {:>9} {:>12} {:>12} {:>14} {:>8}",
        "dirty MiB", "diff pages", "pause ms", "memcpy ms", "ratio"
    );
    for mib in [1u64, 16, 64, 256] {
        let sock = dir.path().join(format!("{mib}.sock"));
        let mut vmm = Vmm::spawn([
            "--kernel",
            kernel.to_str().expect("utf-8 path"),
            "--mem-mib",
            "512",
            "--track-dirty-pages",
            "--api-sock",
            sock.to_str().expect("utf-8 path"),
            "--cmdline",
            &format!("workload_mib={mib} dirty_mib_per_s={}", (mib * 4).max(64)),
        ]);
        vmm.wait_for_serial("colo-test-guest: ready", BOOT);
        wait_generation(&mut vmm);
        let full = dir.path().join("base.full");
        let diff = dir.path().join("x.diff");
        let mut pauses = Vec::new();
        let mut pages = 0;
        for i in 0..=runs {
            api(&sock, "PUT", "/vm", r#"{"state":"paused"}"#);
            if i == 0 {
                let body = format!(r#"{{"type":"full","path":"{}"}}"#, full.display());
                api(&sock, "PUT", "/snapshot", &body);
            } else {
                let body = format!(r#"{{"type":"diff","path":"{}"}}"#, diff.display());
                let t = Instant::now();
                api(&sock, "PUT", "/snapshot", &body);
                pauses.push(t.elapsed());
                let len = std::fs::metadata(&diff).expect("diff file").len();
                pages = len / 4104;
            }
            api(&sock, "PUT", "/vm", r#"{"state":"running"}"#);
            // A full pass of the workload: every page of its buffer dirty.
            wait_generation(&mut vmm);
            wait_generation(&mut vmm);
        }
        let pause = percentile(&mut pauses, 0.5);
        let copy = memcpy_time((mib << 20) as usize, 9);
        println!(
            "  {mib:>9} {pages:>12} {:>12.2} {:>14.3} {:>8.1}",
            pause.as_secs_f64() * 1e3,
            copy.as_secs_f64() * 1e3,
            pause.as_secs_f64() / copy.as_secs_f64()
        );
        drop(vmm);
    }
    restore(&kernel, dir.path(), runs);
}

/// Process start to a running restored VM, median and range of `runs`.
fn restore(kernel: &Path, dir: &Path, runs: usize) {
    let sock = dir.join("r.sock");
    let mut vmm = Vmm::spawn([
        "--kernel",
        kernel.to_str().expect("utf-8 path"),
        "--mem-mib",
        "128",
        "--api-sock",
        sock.to_str().expect("utf-8 path"),
        "--cmdline",
        "workload_mib=16 dirty_mib_per_s=16",
    ]);
    vmm.wait_for_serial("colo-test-guest: ready", BOOT);
    wait_generation(&mut vmm);
    let snap = dir.join("r.full");
    api(&sock, "PUT", "/vm", r#"{"state":"paused"}"#);
    let body = format!(r#"{{"type":"full","path":"{}"}}"#, snap.display());
    api(&sock, "PUT", "/snapshot", &body);
    drop(vmm);
    let mut samples = Vec::new();
    for i in 0..runs.max(5) {
        let sock = dir.join(format!("r{i}.sock"));
        let t = Instant::now();
        let vmm = Vmm::spawn([
            "--restore",
            snap.to_str().expect("utf-8 path"),
            "--api-sock",
            sock.to_str().expect("utf-8 path"),
        ]);
        let deadline = t + BOOT;
        loop {
            match api_request(&sock, "GET", "/status", "") {
                Ok(r) if r.status == 200 && r.text().contains("running") => break,
                _ => {
                    assert!(Instant::now() < deadline, "the restored VM did not answer");
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
        samples.push(t.elapsed());
        drop(vmm);
    }
    samples.sort();
    println!(
        "restore: 128 MiB test guest, process start to running (verified), median {:.1} ms, min {:.1}, max {:.1} ({} runs)",
        percentile(&mut samples, 0.5).as_secs_f64() * 1e3,
        samples[0].as_secs_f64() * 1e3,
        samples[samples.len() - 1].as_secs_f64() * 1e3,
        samples.len()
    );
}
