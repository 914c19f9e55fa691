//! `colo-bench remus [pause|net|failover|sync]`: the replication pair of
//! issue 9 on the rig of `colo_tests::pair` (both hosts, the client
//! namespace), each part against a baseline measured in the same run:
//!
//! - `pause`: the primary's pause per requested checkpoint with exactly N
//!   MiB dirty (the guest rewrites an N MiB buffer page after page; N MiB
//!   written, by its console, between checkpoints; `--checkpoint-ms 60000`, so no periodic ones), read from
//!   `colo.last_checkpoint_ms`, against a memcpy of N MiB in this process;
//!   target: pause ≤ 1 ms + 2× memcpy. Also the transfer (capture to ack),
//!   the checkpoint bytes and the secondary's RSS beyond guest memory.
//! - `net`: 64-byte TCP RTT p50/p99 and echo throughput from the client
//!   namespace, a standalone guest vs the protected primary at
//!   `--checkpoint-ms` 5, 20 and 100 (one pair, the interval changed with
//!   `PATCH /colo`).
//! - `failover`: the primary's death to the first echo answered on the
//!   same connection, with `failover` sent at once, and with `--failover
//!   auto` at the default and a 300 ms heartbeat timeout. Death is SIGKILL
//!   (its host's kernel lives on and closes the peer connections: the
//!   secondary knows at once) or a host crash (host-a's cable cut at the
//!   switch, then SIGKILL: only the heartbeat timeout tells).
//! - `sync`: a 512 MiB guest with a 64 MiB disk (the secondary's differs
//!   in every fourth MiB) from the primary's start to `protected`, and the
//!   secondary's RSS beyond guest memory once protected.
//!
//! Without a part, all four run. As root (network namespaces).
//!
//! `colo-bench colo [pause|net|causes|failover]` runs the same parts on a
//! COLO pair (issue 10), where `net` compares standalone, COLO and Remus
//! at 20 ms, and `causes` counts checkpoints per 1000 requests by cause
//! for deterministic and non-deterministic requests.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use colo_tests::http::api_request;
use colo_tests::net::{guest_ip, Host, Topology};
use colo_tests::pair::{
    check_echo, colo_status, echo_message, seed, self_checks, Pair, PairOptions, Rng,
    SecondaryDisk, Side, ECHO_LEN, GUEST_INDEX, STATE_TIMEOUT,
};
use colo_tests::{guest_artifact, Vmm};

use crate::net::rtt;
use crate::snapshot::memcpy_time;
use crate::{ms, parse_smaps, percentile};

/// The parts, in the order `remus` without a part runs them.
pub const PARTS: [&str; 4] = ["pause", "net", "failover", "sync"];

/// The parts of `colo`, in the order `colo` without a part runs them.
pub const COLO_PARTS: [&str; 4] = ["pause", "net", "causes", "failover"];

/// Runs `part` of `mode` ("remus" or "colo"; all parts when `None`);
/// false for an unknown part.
pub fn run(mode: &'static str, part: Option<&str>, runs: usize) -> bool {
    let parts: &[&str] = if mode == "colo" { &COLO_PARTS } else { &PARTS };
    let chosen: Vec<&str> = match part {
        None => parts.to_vec(),
        Some(p) if parts.contains(&p) => vec![p],
        Some(_) => return false,
    };
    for part in chosen {
        match (mode, part) {
            (_, "pause") => pause(mode, runs.clamp(1, 9)),
            ("colo", "net") => colo_net(runs),
            (_, "net") => net(runs),
            (_, "causes") => causes(runs),
            (_, "failover") => failover(mode, runs.clamp(1, 5)),
            _ => sync(runs.clamp(1, 3)),
        }
    }
    true
}

fn api_ok(sock: &std::path::Path, method: &str, path: &str, body: &str) {
    let r = api_request(sock, method, path, body).expect("API request");
    assert!(
        (200..300).contains(&r.status),
        "{method} {path} {body}: {}",
        r.text()
    );
}

/// RSS of `pid` beyond its `mem_mib` guest-memory mapping, now and at its
/// peak (`VmHWM` less the guest mapping's RSS now), in MiB.
fn rss_beyond_mib(pid: u32, mem_mib: u64) -> (f64, f64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    let (total, guest) = parse_smaps(&smaps, mem_mib << 10);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .expect("VmHWM in /proc/PID/status");
    let mib = |kib: u64| kib as f64 / 1024.0;
    (mib(total - guest), mib(hwm.saturating_sub(guest)))
}

// ---------------------------------------------------------------------------
// Checkpoint pause by dirty MiB.

const PAUSE_MEM_MIB: u64 = 512;

fn pause(mode: &'static str, runs: usize) {
    println!(
        "{mode} pause: requested checkpoints with N MiB dirty ({PAUSE_MEM_MIB} MiB guest, \
         --checkpoint-ms 60000, median of {runs}) vs a memcpy of N MiB"
    );
    println!(
        "  {:>9} {:>10} {:>10} {:>11} {:>10} {:>7} {:>11} {:>8} {:>17}",
        "dirty MiB",
        "sent MiB",
        "pause ms",
        "transfer ms",
        "memcpy ms",
        "ratio",
        "target ms",
        "target",
        "2nd RSS+ now/peak"
    );
    for mib in [1u64, 16, 64, 256] {
        let mut pair = Pair::start(PairOptions {
            mem_mib: PAUSE_MEM_MIB,
            guest_args: format!("workload_mib={mib} dirty_mib_per_s={}", (mib * 4).max(64)),
            checkpoint_ms: 60_000,
            verify: false,
            ..PairOptions::default().in_mode(mode)
        });
        dirty_since_now(&pair, mib);
        let (mut pauses, mut transfers, mut sent) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..=runs {
            let epoch = pair.status(Side::Primary).epoch;
            let bytes = metric(&pair, "colo_checkpoint_bytes_total");
            let transfer = metric(&pair, "colo_checkpoint_transfer_seconds_sum");
            let r = pair.request_checkpoint();
            assert_eq!(r.status, 202, "PUT checkpoint: {}", r.text());
            let s = pair.wait_until(
                Side::Primary,
                "past the requested checkpoint",
                STATE_TIMEOUT,
                |s| s.epoch > epoch,
            );
            assert_eq!(
                s.epoch,
                epoch + 1,
                "a checkpoint nobody asked for: {}",
                s.raw
            );
            // The first checkpoint carries what dirtied since the sync.
            if i > 0 {
                let paused = s.raw["last_checkpoint_ms"]
                    .as_f64()
                    .expect("last_checkpoint_ms");
                pauses.push(Duration::from_secs_f64(paused / 1e3));
                transfers.push(Duration::from_secs_f64(
                    metric(&pair, "colo_checkpoint_transfer_seconds_sum") - transfer,
                ));
                sent.push(metric(&pair, "colo_checkpoint_bytes_total") - bytes);
            }
            // The workload writes its buffer's pages in turn: `mib` MiB
            // written after the checkpoint dirtied every one of them.
            dirty_since_now(&pair, mib);
        }
        let (rss, peak) = rss_beyond_mib(pair.vmm(Side::Secondary).pid(), PAUSE_MEM_MIB);
        drop(pair);
        let pause = percentile(&mut pauses, 0.5);
        let transfer = percentile(&mut transfers, 0.5);
        sent.sort_by(f64::total_cmp);
        let sent_mib = sent[sent.len() / 2] / f64::from(1 << 20);
        let copy = memcpy_time((mib << 20) as usize, 9);
        let target = Duration::from_millis(1) + copy * 2;
        println!(
            "  {mib:>9} {sent_mib:>10.1} {:>10.2} {:>11.2} {:>10.3} {:>7.1} {:>11.2} {:>8} {:>17}",
            ms(pause),
            ms(transfer),
            ms(copy),
            pause.as_secs_f64() / copy.as_secs_f64(),
            ms(target),
            if pause <= target { "met" } else { "not met" },
            format!("{rss:.1} / {peak:.1}"),
        );
    }
}

/// The "MiB written" of every workload line of the primary's console
/// after byte `from` (the guest prints one a second).
fn written_mib(pair: &Pair, from: usize) -> Vec<u64> {
    let serial = pair.serial(Side::Primary);
    let (_, failed) = self_checks(&serial, 0);
    assert_eq!(
        failed,
        None,
        "the guest's self-check failed\n{}",
        pair.logs()
    );
    serial
        .get(from..)
        .unwrap_or("")
        .lines()
        .filter(|l| l.contains("workload generation"))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let i = words.iter().position(|w| *w == "MiB")?;
            words.get(i.checked_sub(1)?)?.parse().ok()
        })
        .collect()
}

/// Waits until the primary's guest has written `mib` MiB since now: the
/// first workload line printed from now on counts at least what was
/// written until now, so a later line `mib` above it proves it.
fn dirty_since_now(pair: &Pair, mib: u64) {
    let from = pair.serial(Side::Primary).len();
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        let lines = written_mib(pair, from);
        if let (Some(first), Some(last)) = (lines.first(), lines.last()) {
            if last - first >= mib {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the guest did not write {mib} MiB\n{}",
            pair.logs()
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// The primary's metric `series`; 0 when absent.
fn metric(pair: &Pair, series: &str) -> f64 {
    pair.metric(Side::Primary, series).unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// Round trips and throughput.

/// How long each throughput measurement streams.
const STREAM_FOR: Duration = Duration::from_secs(3);

/// Echo throughput in MiB/s: a writer streams 64 KiB chunks while this
/// thread counts echoed bytes for [`STREAM_FOR`].
fn throughput(addr: SocketAddr) -> f64 {
    let s = TcpStream::connect_timeout(&addr, STATE_TIMEOUT).expect("connect");
    s.set_read_timeout(Some(STATE_TIMEOUT)).expect("timeout");
    let mut w = s.try_clone().expect("clone");
    let stop = Arc::new(AtomicBool::new(false));
    let stop_writer = stop.clone();
    let writer = thread::spawn(move || {
        let chunk = vec![0xa5u8; 64 * 1024];
        // Ends on the stop flag, or when the socket is shut down under it.
        while !stop_writer.load(Ordering::SeqCst) && w.write_all(&chunk).is_ok() {}
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    let t = Instant::now();
    while t.elapsed() < STREAM_FOR {
        let n = (&s).read(&mut buf).expect("receive");
        assert!(n > 0, "echo closed early");
        got += n as u64;
    }
    let elapsed = t.elapsed();
    stop.store(true, Ordering::SeqCst);
    let _ = s.shutdown(Shutdown::Both);
    writer.join().expect("writer");
    got as f64 / f64::from(1 << 20) / elapsed.as_secs_f64()
}

/// Round trips for a checkpoint interval of `interval_ms` (0: standalone):
/// about 300 × `runs` ms of them, at least 50.
fn rounds(runs: usize, interval_ms: u64) -> usize {
    (runs * 300 / interval_ms.max(1) as usize).clamp(50, runs.max(1) * 100)
}

/// The baseline of `net`: a standalone guest on the same tap in the same
/// host namespace: (rounds, p50, p99, MiB/s).
fn standalone_net(runs: usize) -> (usize, Duration, Duration, f64) {
    let guest = SocketAddr::from((guest_ip(GUEST_INDEX), 7));
    // The standalone guest: the same tap in the same host namespace.
    let topo = Topology::builder().host_b(false).build();
    topo.add_tap(Host::A, "tapa");
    let mut vmm = Vmm::spawn_in(
        topo.host(Host::A),
        [
            "--kernel",
            guest_artifact("test-guest").to_str().expect("utf-8 path"),
            "--net",
            "tap=tapa",
            "--cmdline",
            &format!("ip={}/24", guest_ip(GUEST_INDEX)),
        ],
    );
    vmm.wait_for_serial("colo-test-guest: ready", STATE_TIMEOUT);
    let n = rounds(runs, 0);
    let ((p50, p99), tput) = topo.client().enter(|| (rtt(guest, n), throughput(guest)));
    (n, p50, p99, tput)
}

/// Prints `net`'s table head and its baseline row; returns the printer of
/// the other rows (ratios against the baseline).
fn net_table(
    mode: &str,
    (n, p50, p99, tput): (usize, Duration, Duration, f64),
) -> impl Fn(&str, usize, Duration, Duration, f64) {
    println!(
        "{mode} net: {} B TCP round trips and echo throughput ({} s) from the client namespace",
        ECHO_LEN,
        STREAM_FOR.as_secs()
    );
    println!(
        "  {:<26} {:>7} {:>10} {:>10} {:>8} {:>8} {:>9} {:>7}",
        "guest", "rounds", "p50 ms", "p99 ms", "p50 x", "p99 x", "MiB/s", "tput x"
    );
    let row = move |name: &str, n: usize, r50: Duration, r99: Duration, t: f64| {
        println!(
            "  {name:<26} {n:>7} {:>10.3} {:>10.3} {:>8.2} {:>8.2} {t:>9.2} {:>7.3}",
            ms(r50),
            ms(r99),
            r50.as_secs_f64() / p50.as_secs_f64(),
            r99.as_secs_f64() / p99.as_secs_f64(),
            t / tput
        );
    };
    row("standalone (baseline)", n, p50, p99, tput);
    row
}

fn net(runs: usize) {
    let guest = SocketAddr::from((guest_ip(GUEST_INDEX), 7));
    let row = net_table("remus", standalone_net(runs));

    let intervals = [5u64, 20, 100];
    let pair = Pair::start(PairOptions {
        checkpoint_ms: intervals[0],
        verify: false,
        ..PairOptions::default()
    });
    for ms in intervals {
        let body = format!(r#"{{"checkpoint_ms":{ms}}}"#);
        api_ok(&pair.primary_sock(), "PATCH", "/colo", &body);
        let n = rounds(runs, ms);
        let ((r50, r99), t) = pair
            .topo()
            .client()
            .enter(|| (rtt(guest, n), throughput(guest)));
        row(&format!("remus --checkpoint-ms {ms}"), n, r50, r99, t);
    }
}

/// Standalone vs COLO (default periodic interval) vs Remus at 20 ms.
fn colo_net(runs: usize) {
    let guest = SocketAddr::from((guest_ip(GUEST_INDEX), 7));
    let row = net_table("colo", standalone_net(runs));
    for (name, opts) in [
        ("colo", PairOptions::colo()),
        ("remus --checkpoint-ms 20", PairOptions::default()),
    ] {
        let pair = Pair::start(PairOptions {
            verify: false,
            ..opts
        });
        let n = rounds(runs, if name == "colo" { 0 } else { 20 });
        let before = metric(&pair, "colo_checkpoints_total{cause=\"mismatch\"}");
        let ((r50, r99), t) = pair
            .topo()
            .client()
            .enter(|| (rtt(guest, n), throughput(guest)));
        row(name, n, r50, r99, t);
        if name == "colo" {
            let mismatches = metric(&pair, "colo_checkpoints_total{cause=\"mismatch\"}") - before;
            println!("  (colo: {mismatches} mismatch checkpoints during the run)");
        }
    }
}

/// The checkpoint causes, as `GET /metrics` labels them.
const CAUSES: [&str; 5] = ["mismatch", "timeout", "periodic", "held_bytes", "requested"];

fn checkpoints_by_cause(pair: &Pair) -> Vec<f64> {
    CAUSES
        .iter()
        .map(|c| metric(pair, &format!("colo_checkpoints_total{{cause=\"{c}\"}}")))
        .collect()
}

/// COLO checkpoints per 1000 requests by cause: deterministic requests
/// (`GET /count`, 64-byte echoes) and a mix in which every 10th request
/// is `GET /rand` (a different answer from each VM).
fn causes(runs: usize) {
    let requests = 1000 * runs.clamp(1, 5);
    println!(
        "colo causes: checkpoints per 1000 requests by cause ({requests} requests per row, \
         one keep-alive connection, default periodic interval)"
    );
    print!("  {:<28} {:>9}", "requests", "req/s");
    for c in CAUSES {
        print!(" {c:>10}");
    }
    println!();
    let pair = Pair::start(PairOptions {
        verify: false,
        ..PairOptions::colo()
    });
    let http = SocketAddr::from((guest_ip(GUEST_INDEX), 80));
    let echo = SocketAddr::from((guest_ip(GUEST_INDEX), 7));
    for name in ["GET /count", "64 B echo", "GET /count, every 10th /rand"] {
        let before = checkpoints_by_cause(&pair);
        let t = Instant::now();
        pair.topo().client().enter(|| {
            if name == "64 B echo" {
                rtt(echo, requests);
                return;
            }
            let s = TcpStream::connect_timeout(&http, STATE_TIMEOUT).expect("connect");
            s.set_read_timeout(Some(STATE_TIMEOUT)).expect("timeout");
            let mut client = colo_tests::http::Client::new(s, "guest");
            for i in 0..requests {
                let path = if name.contains("rand") && i % 10 == 9 {
                    "/rand"
                } else {
                    "/count"
                };
                let r = client.request("GET", path, b"").expect("request");
                assert_eq!(r.status, 200, "{}", r.text());
            }
        });
        let rate = requests as f64 / t.elapsed().as_secs_f64();
        print!("  {name:<28} {rate:>9.0}");
        for (a, b) in checkpoints_by_cause(&pair).iter().zip(&before) {
            print!(" {:>10.1}", (a - b) * 1000.0 / requests as f64);
        }
        println!();
    }
}

// ---------------------------------------------------------------------------
// Failover.

/// An echo client on one connection: one 64-byte message at a time, each
/// reply checked, the time of every reply kept.
struct Pinger {
    replies: Arc<Mutex<Vec<Instant>>>,
    failure: Arc<Mutex<Option<String>>>,
    socket: TcpStream,
    thread: Option<thread::JoinHandle<()>>,
}

impl Pinger {
    fn start(pair: &Pair) -> Self {
        let addr = SocketAddr::from((guest_ip(GUEST_INDEX), 7));
        let s = pair
            .topo()
            .client()
            .enter(|| TcpStream::connect_timeout(&addr, STATE_TIMEOUT))
            .expect("connect to the guest's echo port");
        s.set_nodelay(true).expect("nodelay");
        s.set_read_timeout(Some(STATE_TIMEOUT)).expect("timeout");
        let socket = s.try_clone().expect("clone");
        let replies = Arc::new(Mutex::new(Vec::new()));
        let failure = Arc::new(Mutex::new(None));
        let (r, f) = (replies.clone(), failure.clone());
        let thread = thread::spawn(move || {
            let mut s = s;
            let mut back = [0u8; ECHO_LEN];
            for seq in 0u64.. {
                let result = s
                    .write_all(&echo_message(seq))
                    .and_then(|()| s.read_exact(&mut back));
                let wrong = match result {
                    Ok(()) => check_echo(seq, &back),
                    Err(e) => Some(format!("message {seq}: {e}")),
                };
                if let Some(wrong) = wrong {
                    *f.lock().unwrap_or_else(|p| p.into_inner()) = Some(wrong);
                    return;
                }
                r.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Instant::now());
            }
        });
        Self {
            replies,
            failure,
            socket,
            thread: Some(thread),
        }
    }

    fn count(&self) -> usize {
        self.replies.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The first reply after `after`, waiting up to `timeout`.
    fn first_after(&self, after: Instant, timeout: Duration) -> Result<Instant, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(&t) = self
                .replies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .find(|&&t| t > after)
            {
                return Ok(t);
            }
            if let Some(e) = self
                .failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
            {
                return Err(e);
            }
            if Instant::now() >= deadline {
                return Err(format!("no echo within {timeout:?}"));
            }
            thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How the primary dies.
#[derive(Clone, Copy, PartialEq)]
enum Death {
    /// SIGKILL: its host's kernel closes its connections, so the secondary
    /// sees the heartbeat connection end at once.
    Kill,
    /// Host-a's cable cut at the switch, then SIGKILL: a host that stops
    /// without a word; only the heartbeat timeout tells.
    Crash,
}

/// One pair, an echo connection, the primary dies: the time from its
/// death (the cut, or the signal) to the first echo on the same connection
/// after the primary was reaped (no reply after that can come from it),
/// and to the secondary's `failed_over` (polled every millisecond).
///
/// The death comes at a random point of the client's request cycle (up to
/// [`KILL_SPREAD_US`] after its 20th reply): a death right after a reply,
/// when the client's next message is on its way to the primary, loses that
/// message with the primary and the client resends it only on its own
/// retransmission timer.
fn failover_once(
    mode: &'static str,
    death: Death,
    auto: bool,
    heartbeat_timeout_ms: Option<u64>,
    rng: &mut Rng,
) -> (Duration, Duration) {
    let mut pair = Pair::start(PairOptions {
        failover_auto: auto,
        heartbeat_timeout_ms,
        verify: false,
        ..PairOptions::dirtying(64).in_mode(mode)
    });
    let pinger = Pinger::start(&pair);
    let deadline = Instant::now() + STATE_TIMEOUT;
    while pinger.count() < 20 {
        assert!(
            Instant::now() < deadline,
            "the echo client made no progress\n{}",
            pair.logs()
        );
        thread::sleep(Duration::from_millis(1));
    }
    thread::sleep(Duration::from_micros(rng.in_range(0..KILL_SPREAD_US)));
    let killed = Instant::now();
    if death == Death::Crash {
        pair.topo().set_uplink(Host::A, false);
    }
    pair.kill_primary();
    let reaped = Instant::now();
    let b = pair.secondary_sock();
    if !auto {
        api_ok(&b, "PUT", "/actions", r#"{"action":"failover"}"#);
    }
    let taken_over = loop {
        if colo_status(&b).is_ok_and(|s| s.state == "failed_over") {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < STATE_TIMEOUT,
            "the secondary did not take over\n{}",
            pair.logs()
        );
        thread::sleep(Duration::from_millis(1));
    };
    let first = pinger
        .first_after(reaped, STATE_TIMEOUT)
        .unwrap_or_else(|e| panic!("no echo after the failover: {e}\n{}", pair.logs()));
    (taken_over, first - killed)
}

/// The kill's spread over the client's request cycle (about 0.5 ms in
/// COLO mode, 20 ms in Remus mode at its default interval).
const KILL_SPREAD_US: u64 = 20_000;

/// A first echo this much later than the takeover waited for the client's
/// retransmission timer (200 ms at least on Linux).
const CLIENT_RESENT: Duration = Duration::from_millis(150);

fn failover(mode: &'static str, runs: usize) {
    let interval = PairOptions::default().in_mode(mode).checkpoint_ms;
    let mut rng = Rng::new(seed(1));
    println!(
        "{mode} failover: the primary's death to the first echo answered on the same \
         connection (64 MiB guest dirtying 64 MiB/s, --checkpoint-ms {interval}; {runs} pairs each)"
    );
    println!("  kill: SIGKILL (host-a's kernel closes the peer connections); crash: host-a's");
    println!("  cable cut at the switch, then SIGKILL (only the heartbeat timeout tells);");
    println!(
        "  at a random point up to {} ms after the client's 20th reply; resent: runs",
        KILL_SPREAD_US / 1000
    );
    println!("  where the client's message died with the primary and its own timer resent it");
    println!(
        "  {:<44} {:>14} {:>24} {:>7}",
        "mode", "taken over ms", "first echo ms", "resent"
    );
    println!("  {:<44} {:>14} {:>24}", "", "p50", "min / p50 / max");
    let modes: [(&str, Death, bool, Option<u64>); 5] = [
        (
            "kill, failover action sent at once",
            Death::Kill,
            false,
            None,
        ),
        ("kill, --failover auto", Death::Kill, true, None),
        (
            "crash, failover action sent at once",
            Death::Crash,
            false,
            None,
        ),
        (
            "crash, --failover auto (heartbeat 1000 ms)",
            Death::Crash,
            true,
            None,
        ),
        (
            "crash, --failover auto, heartbeat 300 ms",
            Death::Crash,
            true,
            Some(300),
        ),
    ];
    for (name, death, auto, timeout) in modes {
        let (mut over, mut echo): (Vec<_>, Vec<_>) = (0..runs)
            .map(|_| failover_once(mode, death, auto, timeout, &mut rng))
            .unzip();
        let resent = over
            .iter()
            .zip(&echo)
            .filter(|(o, e)| e.saturating_sub(**o) >= CLIENT_RESENT)
            .count();
        let over = percentile(&mut over, 0.5);
        let p50 = percentile(&mut echo, 0.5);
        println!(
            "  {name:<44} {:>14.1} {:>24} {:>7}",
            ms(over),
            format!(
                "{:.1} / {:.1} / {:.1}",
                ms(echo[0]),
                ms(p50),
                ms(echo[echo.len() - 1])
            ),
            format!("{resent}/{runs}")
        );
    }
}

// ---------------------------------------------------------------------------
// Initial sync.

const SYNC_MEM_MIB: u64 = 512;
const SYNC_DISK_MIB: u64 = 64;

fn sync(runs: usize) {
    println!(
        "remus sync: {SYNC_MEM_MIB} MiB guest + {SYNC_DISK_MIB} MiB disk (the secondary's differs \
         in every fourth MiB), primary start to both protected ({runs} runs)"
    );
    println!(
        "  {:>4} {:>9} {:>11} {:>14} {:>14} {:>18}",
        "run", "sync ms", "pages sent", "disk MiB sent", "memcpy ms", "2nd RSS+ now/peak"
    );
    // What copying the guest's memory and disk once costs here.
    let copy = memcpy_time(((SYNC_MEM_MIB + SYNC_DISK_MIB) << 20) as usize, 3);
    for run in 0..runs {
        let mut pair = Pair::start(PairOptions {
            mem_mib: SYNC_MEM_MIB,
            disk_bytes: SYNC_DISK_MIB << 20,
            secondary_disk: SecondaryDisk::GarbageEvery(4),
            verify: false,
            ..PairOptions::default()
        });
        let took = pair.primary_started().elapsed();
        let s = pair.status(Side::Primary);
        let (rss, peak) = rss_beyond_mib(pair.vmm(Side::Secondary).pid(), SYNC_MEM_MIB);
        println!(
            "  {run:>4} {:>9.0} {:>11} {:>14.1} {:>14.1} {:>18}",
            ms(took),
            s.raw["sync_pages"].as_u64().unwrap_or(0),
            s.raw["sync_disk_bytes"].as_u64().unwrap_or(0) as f64 / f64::from(1 << 20),
            ms(copy),
            format!("{rss:.1} / {peak:.1}"),
        );
    }
}
