//! `colo-bench`: the end-to-end benchmark harness.
//!
//! `colo-bench boot [--runs N]` boots the test guest N times and reports
//! boot-to-ready and boot-to-exit times (median, p90) as ratios against
//! spawning `/bin/true` in the same run, then the RSS of `vmm` beyond guest
//! memory while a guest runs.
//!
//! `colo-bench net [--runs N]` puts the test guest on the rig's network and
//! measures, from the `client` namespace, TCP request/response round trips
//! (64 bytes, p50/p99) and echo throughput through the guest, each against
//! the same measurement on a host echo server in the guest's host namespace
//! (same switch, same path length) taken in the same run.
//!
//! `colo-bench blk [--runs N]` has the guest time N random 4 KiB reads and
//! writes on a 64 MiB virtio-blk disk and compares the IOPS with the host
//! doing the same on the same file with pread/pwrite.
//!
//! `colo-bench snapshot [--runs N]` times how long a diff snapshot (to
//! tmpfs) keeps the VM paused with 1, 16, 64 and 256 MiB dirty, next to a
//! memcpy of the same bytes.
//!
//! `colo-bench remus [pause|net|failover|sync] [--runs N]` measures the
//! replication pair of issue 9 (see `remus.rs`): checkpoint pause by dirty
//! MiB vs memcpy, RTT and throughput standalone vs Remus at three
//! checkpoint intervals, client-visible failover after SIGKILL of the
//! primary, and the initial sync with the secondary's RSS. As root.
//!
//! Build first: `cargo build --release --bins && resources/build.sh test-guest`,
//! then `target/release/colo-bench boot` (as root for `net`).

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use colo_tests::{guest_artifact, Vmm};

mod net;
mod remus;
mod snapshot;

const TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse::<usize>())
        .unwrap_or(Ok(30));
    let Ok(runs) = runs else {
        eprintln!("colo-bench: --runs needs a positive number");
        return ExitCode::from(2);
    };
    match args.first().map(String::as_str) {
        Some("boot") => {
            boot(runs.max(1));
            ExitCode::SUCCESS
        }
        Some("net") => {
            net::run(runs.max(1) * 100);
            ExitCode::SUCCESS
        }
        Some("snapshot") => {
            snapshot::run(runs.clamp(1, 9));
            ExitCode::SUCCESS
        }
        Some("blk") => {
            net::blk(runs.max(1) * 100);
            ExitCode::SUCCESS
        }
        Some(mode @ ("remus" | "colo")) => {
            let mode = if mode == "colo" { "colo" } else { "remus" };
            let part = args.get(1).filter(|a| !a.starts_with("--"));
            if remus::run(mode, part.map(String::as_str), runs.max(1)) {
                ExitCode::SUCCESS
            } else {
                usage()
            }
        }
        _ => usage(),
    }
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: colo-bench boot|net|blk|snapshot|remus [{}]|colo [{}] [--runs N]",
        remus::PARTS.join("|"),
        remus::COLO_PARTS.join("|")
    );
    ExitCode::from(2)
}

/// The `q` quantile (0.5 = median) of non-empty `samples`, which it sorts.
fn percentile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * q).round() as usize]
}

/// Median and 90th percentile of `samples`.
fn stats(mut samples: Vec<Duration>) -> (Duration, Duration) {
    (percentile(&mut samples, 0.5), percentile(&mut samples, 0.9))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn boot(runs: usize) {
    let kernel = guest_artifact("test-guest");
    let kernel = kernel.to_str().expect("utf-8 path").to_string();
    let mem_mib = 128u64;

    let baseline: Vec<_> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            Command::new("true").status().expect("run true");
            start.elapsed()
        })
        .collect();
    let (mut ready, mut exited) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let start = Instant::now();
        let mut vmm = Vmm::spawn([
            "--kernel",
            &kernel,
            "--mem-mib",
            &mem_mib.to_string(),
            "--cmdline",
            "halt_after_ms=0",
        ]);
        vmm.wait_for_serial("colo-test-guest: ready", TIMEOUT);
        ready.push(start.elapsed());
        vmm.wait_exit(TIMEOUT);
        exited.push(start.elapsed());
    }
    let (base_p50, base_p90) = stats(baseline);
    println!("boot ({runs} runs, {mem_mib} MiB, 1 vCPU)");
    println!(
        "  baseline spawn /bin/true   p50 {:8.2} ms  p90 {:8.2} ms",
        ms(base_p50),
        ms(base_p90)
    );
    for (name, samples) in [("vmm start to ready", ready), ("vmm start to exit", exited)] {
        let (p50, p90) = stats(samples);
        println!(
            "  {name:<26} p50 {:8.2} ms  p90 {:8.2} ms  ({:.1}x baseline)",
            ms(p50),
            ms(p90),
            p50.as_secs_f64() / base_p50.as_secs_f64()
        );
    }
    rss(&kernel, mem_mib);
}

/// RSS of a running `vmm` outside the guest-memory mapping, read from
/// /proc/PID/smaps while the guest runs its memory workload.
fn rss(kernel: &str, mem_mib: u64) {
    let mut vmm = Vmm::spawn([
        "--kernel",
        kernel,
        "--mem-mib",
        &mem_mib.to_string(),
        "--cmdline",
        "dirty_mib_per_s=4 workload_mib=32",
    ]);
    vmm.wait_for_serial("colo-test-guest: workload generation 2", TIMEOUT);
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", vmm.pid())).expect("read smaps");
    let (total_kib, guest_kib) = parse_smaps(&smaps, mem_mib << 10);
    let beyond = total_kib - guest_kib;
    println!("rss of vmm while the guest runs ({mem_mib} MiB guest, 32 MiB workload at 4 MiB/s)");
    println!("  total            {:8} KiB", total_kib);
    println!("  guest memory     {:8} KiB", guest_kib);
    println!(
        "  beyond guest     {:8} KiB  ({:.2}% of guest memory size)",
        beyond,
        beyond as f64 * 100.0 / (mem_mib << 10) as f64
    );
}

/// (total RSS, RSS of the guest-memory mapping) in KiB: the guest mapping is
/// the one whose size equals the guest's memory.
fn parse_smaps(smaps: &str, guest_kib: u64) -> (u64, u64) {
    let (mut total, mut guest) = (0, 0);
    let mut size = 0;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let field = |w: Option<&str>| w.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        match words.next() {
            Some("Size:") => size = field(words.next()),
            Some("Rss:") => {
                let rss = field(words.next());
                total += rss;
                if size == guest_kib {
                    guest += rss;
                }
            }
            _ => {}
        }
    }
    (total, guest)
}
