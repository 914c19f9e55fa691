//! The nested tier: `vmm` on a hardware-style KVM.
//!
//! The KVM of our machines is a shadow-paging PVM hypervisor under which
//! Linux barely boots (../shared/KVM-HERE.md). QEMU's TCG emulates AMD SVM
//! with nested paging, so an L1 Linux under `qemu-system-x86_64 -accel tcg
//! -cpu EPYC` loads Debian's `kvm-amd` and offers the `/dev/kvm` a user's
//! distro host has; `vmm` runs there. `scripts/nested/build-l1.sh` builds
//! L1 (Debian's cloud kernel, its KVM modules, busybox, our binaries and
//! guests), `scripts/nested/run.sh` boots it, and L1's /init
//! (`scripts/nested/l1-init.sh`) runs each scenario and reports one
//! `colo-nested: NAME ok|FAIL ...` line on the serial console, which this
//! test reads. An L1 silent for [`SILENCE`] is ended (the watchdog) and
//! replaced once (see [`run_l1`]; the README's "Which KVMs it is tested
//! on" says why: TCG's SVM emulation occasionally breaks L2 and, rarely,
//! L1); QEMU is killed on every path.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use colo_tests::vmm_bin;

/// The watchdog: an L1 that prints nothing for this long has hung (the
/// slowest step, an L2 Linux boot under emulated SVM, prints all along).
const SILENCE: Duration = Duration::from_secs(240);
/// The whole L1 run, every scenario included.
const TOTAL: Duration = Duration::from_secs(1500);
const MARKER: &str = "colo-nested: ";

/// One L1 at a time: each takes both of a CI machine's cores.
static ONE_L1: Mutex<()> = Mutex::new(());

/// A running L1: QEMU, killed when dropped.
struct L1 {
    qemu: Child,
    lines: Receiver<String>,
}

impl Drop for L1 {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}

/// This checkout (not `colo_tests::repo_root`, which a shared target
/// directory may have built from another checkout).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Builds L1 and returns its kernel and initramfs.
fn build_l1() -> (PathBuf, PathBuf) {
    let root = repo_root();
    let bin_dir = vmm_bin().parent().unwrap().to_path_buf();
    let out = Command::new(root.join("scripts/nested/build-l1.sh"))
        .arg(&bin_dir)
        .arg(root.join("target/guest"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "build-l1.sh failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("build-l1.sh printed no {key}"))
    };
    (field("kernel="), field("initrd="))
}

/// Every line of `stream`, sent to `tx`.
fn pump(stream: impl Read + Send + 'static, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}

impl L1 {
    fn boot(cpu: &str, scenarios: &str) -> Self {
        let (kernel, initrd) = build_l1();
        let mut command = Command::new(repo_root().join("scripts/nested/run.sh"));
        command
            .args([kernel.as_os_str(), initrd.as_os_str()])
            .args([cpu, scenarios])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to
        // kill QEMU if this test's thread dies before it ends it.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut qemu = command
            .spawn()
            .expect("qemu-system-x86_64 (scripts/install-deps.sh installs qemu-system-x86)");
        let (tx, lines) = mpsc::channel();
        pump(qemu.stdout.take().unwrap(), tx.clone());
        pump(qemu.stderr.take().unwrap(), tx);
        Self { qemu, lines }
    }

    /// Reads L1's console until `colo-nested: done` and returns each
    /// scenario's result line by name, with why L1 ended before `done`
    /// (silent for [`SILENCE`], out of time, or gone) and its
    /// transcript's tail, if it did.
    fn results(&mut self) -> (BTreeMap<String, String>, Option<String>) {
        let start = Instant::now();
        let mut transcript = Vec::new();
        let mut results = BTreeMap::new();
        let tail = |t: &Vec<String>| t[t.len().saturating_sub(60)..].join("\n");
        loop {
            let left = TOTAL.saturating_sub(start.elapsed());
            let line = match self.lines.recv_timeout(SILENCE.min(left)) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => {
                    let why = format!(
                        "L1 silent for {:?} (or out of time) after {:.0} s; ended it. Last lines:\n{}",
                        SILENCE,
                        start.elapsed().as_secs_f64(),
                        tail(&transcript)
                    );
                    return (results, Some(why));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let why = format!(
                        "L1 ended before `colo-nested: done`:\n{}",
                        tail(&transcript)
                    );
                    return (results, Some(why));
                }
            };
            if let Some(result) = line.strip_prefix(MARKER) {
                eprintln!("{:>7.1} s  {line}", start.elapsed().as_secs_f64());
                if result == "done" {
                    return (results, None);
                }
                let mut words = result.splitn(2, ' ');
                if let (Some(name), Some(rest)) = (words.next(), words.next()) {
                    if rest.starts_with("ok") || rest.starts_with("FAIL") {
                        results.insert(name.to_string(), rest.to_string());
                    }
                }
            }
            transcript.push(line);
        }
    }
}

/// l1-init.sh's scenarios, each with the result lines it reports (every
/// L1 reports `kvm` first).
const SCENARIOS: &[(&str, &[&str])] = &[
    ("smp", &["smp"]),
    (
        "net",
        &[
            "net",
            "hash-paused",
            "snapshot",
            "restore",
            "kv-after-restore",
        ],
    ),
    ("linux-vmlinux-1", &["linux-vmlinux-1"]),
    ("linux-vmlinux-2", &["linux-vmlinux-2"]),
    ("linux-bzimage-1", &["linux-bzimage-1"]),
    ("linux-bzimage-2", &["linux-bzimage-2"]),
    ("debian-2", &["debian-2"]),
];

/// The result lines `scenario` reports.
fn reports(scenario: &str) -> &'static [&'static str] {
    SCENARIOS
        .iter()
        .find(|(name, _)| *name == scenario)
        .map_or(&[], |(_, lines)| *lines)
}

/// Runs `scenarios` on an L1 with `cpu` and returns every result line.
/// An L1 that hangs or dies (QEMU's TCG, the emulator under the whole
/// tier, has taken a whole L1 down mid-scenario) is replaced once by a
/// fresh one, which runs the scenarios that have not reported everything;
/// a second such end fails the test.
fn run_l1(cpu: &str, scenarios: &[&str]) -> BTreeMap<String, String> {
    let _one = ONE_L1.lock().unwrap_or_else(|e| e.into_inner());
    let mut results = BTreeMap::new();
    let mut todo = scenarios.to_vec();
    for boot in 1..=2 {
        let (got, ended) = L1::boot(cpu, &todo.join(",")).results();
        results.extend(got);
        let Some(why) = ended else {
            return results;
        };
        assert!(boot == 1, "the second L1 too: {why}");
        todo.retain(|s| reports(s).iter().any(|r| !results.contains_key(*r)));
        if todo.is_empty() {
            break;
        }
        eprintln!(
            "colo-nested: note the first L1 ended early, booting another for {}: {why}",
            todo.join(",")
        );
    }
    results
}

/// Asserts that every one of `names` reported ok; lists all failures.
fn assert_ok(results: &BTreeMap<String, String>, names: &[&str]) {
    let failed: Vec<String> = names
        .iter()
        .filter(|name| !results.get(**name).is_some_and(|r| r.starts_with("ok")))
        .map(|name| format!("{name}: {}", results.get(*name).map_or("not run", |r| r)))
        .collect();
    assert!(failed.is_empty(), "failed on L1:\n{}", failed.join("\n"));
}

/// On an EPYC L1 (SVM with nested paging, XSAVE): the test guest with two
/// vCPUs; the networked test guest's kv store, a state hash stable while
/// paused (Hyper-V's time MSRs tick on this KVM), snapshot, kill, restore
/// to an equal hash; our Linux (vmlinux and bzImage, each with 1 and 2
/// vCPUs) and Debian's stock kernel (2 vCPUs, found through ACPI) to /init,
/// each seeing every vCPU (the PIT must be on the pin KVM routes it to).
#[test]
fn on_a_hardware_style_kvm_guests_snapshots_and_linux_work() {
    let all: Vec<&str> = SCENARIOS.iter().map(|(name, _)| *name).collect();
    let results = run_l1("EPYC", &all);
    assert_ok(
        &results,
        &[
            "kvm",
            "smp",
            "net",
            "hash-paused",
            "snapshot",
            "restore",
            "kv-after-restore",
            "linux-vmlinux-1",
            "linux-vmlinux-2",
            "linux-bzimage-1",
            "linux-bzimage-2",
            "debian-2",
        ],
    );
}

/// On an L1 whose CPU has no XSAVE (`-cpu qemu64`): KVM there has no XCRs,
/// and a snapshot still restores to an equal state hash.
#[test]
fn on_a_host_without_xsave_a_snapshot_restores() {
    let results = run_l1("qemu64", &["net"]);
    assert_ok(
        &results,
        &["kvm", "net", "hash-paused", "snapshot", "restore"],
    );
}
