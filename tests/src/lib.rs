//! The test rig: find the `vmm` binary and the guest artifacts, run `vmm`
//! as a child process, and wait for markers on its serial console or log.
//!
//! Every wait has a bound so a broken guest fails the test instead of
//! hanging it; nothing here sleeps to synchronise. A [`Vmm`] kills its
//! process when dropped, so a failing test leaves nothing running.

pub mod disk;
pub mod http;
pub mod net;
pub mod pair;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The repository's top directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Fails loudly when KVM is missing: every test here needs it, and CI
/// machines have it.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: colo-vmm's integration tests need KVM"
    );
}

/// A guest artifact built by `resources/build.sh` (`test-guest`, `vmlinux`,
/// `initramfs.cpio.gz`).
pub fn guest_artifact(name: &str) -> PathBuf {
    require_kvm();
    let path = repo_root().join("target/guest").join(name);
    assert!(
        path.exists(),
        "{} is missing: run resources/build.sh first",
        path.display()
    );
    path
}

/// The `vmm` binary: `$COLO_VMM_BIN`, or the one cargo built next to this
/// test executable (`cargo build --bins` before `cargo test`; the README's
/// test command does both).
pub fn vmm_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("COLO_VMM_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // Tests and benches run from target/<profile>/deps, binaries such as
    // colo-bench from target/<profile>: `vmm` is in target/<profile>.
    let dir = exe.parent().expect("executable has a directory");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("deps has a parent")
    } else {
        dir
    };
    let path = dir.join("vmm");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` before the tests",
        path.display()
    );
    path
}

/// Lines a child wrote, shared with the thread that reads them.
#[derive(Clone, Default)]
struct Transcript(Arc<Mutex<Vec<String>>>);

impl Transcript {
    fn push(&self, line: String) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(line);
    }

    fn text(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).join("\n")
    }
}

/// Reads `stream` line by line into `transcript`, forwarding each line.
fn pump(stream: impl Read + Send + 'static, transcript: Transcript) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            transcript.push(line.clone());
            if tx.send(line).is_err() {
                // Nobody waits on lines any more; keep recording.
                continue;
            }
        }
    });
    rx
}

/// A running `vmm` process with its serial console (stdout) and log (stderr).
pub struct Vmm {
    child: Child,
    serial_lines: Receiver<String>,
    serial: Transcript,
    log: Transcript,
    log_done: Option<thread::JoinHandle<()>>,
}

impl Vmm {
    /// Starts `vmm` with `args`.
    pub fn spawn<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut command = Command::new(vmm_bin());
        command.args(args);
        Self::spawn_command(command)
    }

    /// Starts `vmm` with `args` inside the network namespace `ns` (where
    /// its taps are).
    pub fn spawn_in<I, S>(ns: &net::Netns, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Self::spawn_command(ns.exec(vmm_bin(), args))
    }

    /// Starts `command` (a `vmm` command line, with its environment) with
    /// its console and log captured.
    pub fn spawn_command(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm");
        let serial = Transcript::default();
        let log = Transcript::default();
        let serial_lines = pump(child.stdout.take().expect("stdout"), serial.clone());
        let log_rx = pump(child.stderr.take().expect("stderr"), log.clone());
        // Drain the log channel so its reader never blocks.
        let log_done = thread::spawn(move || for _ in log_rx {});
        Self {
            child,
            serial_lines,
            serial,
            log,
            log_done: Some(log_done),
        }
    }

    /// Waits up to `timeout` for a serial line containing `marker`; returns it.
    /// Panics with everything seen so far when it does not come.
    pub fn wait_for_serial(&mut self, marker: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.serial_lines.recv_timeout(left) {
                Ok(line) if line.contains(marker) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no serial line with {marker:?} within {timeout:?}\n{}",
                        self.transcript()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "vmm closed its console before printing {marker:?}\n{}",
                    self.transcript()
                ),
            }
        }
    }

    /// Waits up to `timeout` for the process to end; kills it and panics
    /// if it does not.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        // The console pipe closes when the process ends: wait for that.
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.serial_lines.recv_timeout(left) {
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!("vmm still running after {timeout:?}\n{}", self.transcript());
                }
            }
        }
        let status = self.child.wait().expect("wait for vmm");
        if let Some(done) = self.log_done.take() {
            let _ = done.join();
        }
        status
    }

    /// Everything written to the serial console so far.
    pub fn serial(&self) -> String {
        self.serial.text()
    }

    /// Everything `vmm` logged so far (stderr).
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn transcript(&self) -> String {
        format!(
            "--- serial ---\n{}\n--- vmm log ---\n{}",
            self.serial(),
            self.log()
        )
    }
}

impl Vmm {
    /// Whether the process has ended (it is reaped if so).
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process (SIGKILL, like a host crash) and reaps it.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits up to `timeout` for `marker` in the file `path` (the console of a
/// VM run in-process, written to a file); panics with the file's text.
pub fn wait_for_file(path: &Path, marker: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(marker) {
            return;
        }
        assert!(Instant::now() < deadline, "no {marker:?} in:\n{text}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A count from the environment variable `name` (soak runs ask for more
/// cycles than the suite), or `default`.
pub fn env_count(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a count")),
        Err(_) => default,
    }
}

/// Waits up to `timeout` for a listener on the Unix socket `path` (a
/// `vmm` API socket appears once its VM has started).
pub fn wait_for_socket(path: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            Instant::now() < deadline,
            "no listener on {} within {timeout:?}",
            path.display()
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `vmm` with `args` to completion (bounded by `timeout`) and returns
/// its exit status with its log.
pub fn run_vmm<I, S>(args: I, timeout: Duration) -> (ExitStatus, Vmm)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut vmm = Vmm::spawn(args);
    let status = vmm.wait_exit(timeout);
    (status, vmm)
}
