#![allow(clippy::unwrap_used)] // tests fail loudly by design
//! The control plane stays responsive: a console nobody reads does not
//! stop a pause, and the API answers `GET /status` while a snapshot is
//! being written.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use colo_tests::http::api_request;
use colo_tests::{guest_artifact, vmm_bin, wait_for_socket, Vmm};

const BOOT: Duration = Duration::from_secs(30);

fn status(sock: &Path, method: &str, path: &str, body: &str) -> u16 {
    api_request(sock, method, path, body).unwrap().status
}

/// Bytes waiting in a pipe.
fn queued(fd: &impl AsRawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(r, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    n as usize
}

/// Whether a thread of process `pid` waits for room in a full pipe.
fn writer_blocked(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        std::fs::read_to_string(task.path().join("wchan")).is_ok_and(|w| w.ends_with("pipe_write"))
    })
}

/// Kills the child when the test ends, failed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_console_nobody_reads_does_not_stop_a_pause() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut child = KillOnDrop(
        Command::new(vmm_bin())
            .args(["--kernel", guest_artifact("test-guest").to_str().unwrap()])
            .args(["--mem-mib", "32", "--cmdline", "pio_loop", "--api-sock"])
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let console = child.0.stdout.take().unwrap();
    // A small pipe, never read: the guest's progress lines fill it.
    // SAFETY: F_SETPIPE_SZ on a pipe we own.
    let size = unsafe { libc::fcntl(console.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(size >= 4096, "{}", std::io::Error::last_os_error());
    wait_for_socket(&sock, BOOT);
    let deadline = Instant::now() + BOOT;
    while !writer_blocked(child.0.id()) {
        assert!(
            Instant::now() < deadline,
            "the console never filled ({} bytes queued)",
            queued(&console)
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // The guest keeps printing into a full pipe; its vCPU must still stop.
    for _ in 0..3 {
        assert_eq!(status(&sock, "PUT", "/vm", r#"{"state":"paused"}"#), 204);
        assert_eq!(status(&sock, "GET", "/state-hash", ""), 200);
        assert_eq!(status(&sock, "PUT", "/vm", r#"{"state":"running"}"#), 204);
    }
    assert_eq!(
        status(&sock, "PUT", "/actions", r#"{"action":"shutdown"}"#),
        202
    );
    // Once the console is read again, the output starts where the guest's did.
    let mut head = [0u8; 64];
    let mut console = console;
    console.read_exact(&mut head).unwrap();
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("colo-test-guest: banner"), "{head}");
    let _ = child.0.wait();
}

#[test]
fn status_answers_while_a_snapshot_is_being_written() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    // The debug log says when the API has taken the snapshot request. A
    // 2 GiB guest makes the full snapshot take seconds (every byte is
    // written and checksummed); a status answer takes a millisecond. An
    // API that ran the snapshot on its only thread answers the status
    // only after the snapshot, whatever the machine's speed.
    let mut command = Command::new(vmm_bin());
    command
        .env("VMM_LOG", "info,vmm::api=debug")
        .args(["--kernel", guest_artifact("test-guest").to_str().unwrap()])
        .args(["--mem-mib", "2048", "--api-sock"])
        .arg(&sock);
    let mut vmm = Vmm::spawn_command(command);
    vmm.wait_for_serial("colo-test-guest: ready", BOOT);
    wait_for_socket(&sock, BOOT);
    assert_eq!(status(&sock, "PUT", "/vm", r#"{"state":"paused"}"#), 204);

    let snap = dir.path().join("vm.snap");
    let (done_tx, done) = mpsc::channel();
    let snap_sock = sock.clone();
    let body = format!(r#"{{"type":"full","path":"{}"}}"#, snap.display());
    let snapshot = std::thread::spawn(move || {
        let r = api_request(&snap_sock, "PUT", "/snapshot", &body).unwrap();
        done_tx.send(()).unwrap();
        r
    });
    let deadline = Instant::now() + BOOT;
    while !vmm.log().contains("API PUT /snapshot") {
        assert!(
            Instant::now() < deadline,
            "no snapshot request seen\n{}",
            vmm.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    let r = api_request(&sock, "GET", "/status", "").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains(r#""state":"paused""#), "{}", r.text());
    assert!(
        done.try_recv().is_err(),
        "the status answer came only after the snapshot"
    );
    let r = snapshot.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(std::fs::metadata(&snap).unwrap().len() > 2 << 30);
}

#[test]
fn idle_connections_are_closed_and_the_api_survives_running_out_of_descriptors() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let log_path = dir.path().join("vmm.log");
    let mut command = Command::new(vmm_bin());
    command
        .args(["--kernel", guest_artifact("test-guest").to_str().unwrap()])
        .args(["--mem-mib", "32", "--api-sock"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap());
    // SAFETY: setrlimit is async-signal-safe; it runs in the child only.
    unsafe {
        command.pre_exec(|| {
            // A VM without devices uses about 25 descriptors.
            let limit = libc::rlimit {
                rlim_cur: 40,
                rlim_max: 40,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
    };
    let _child = KillOnDrop(command.spawn().unwrap());
    wait_for_socket(&sock, BOOT);

    // More idle connections than the VMM has descriptors for: it runs out,
    // and accepting fails until idle connections time out.
    let mut idle: Vec<UnixStream> = (0..40)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    let mut first = idle.remove(0);
    first
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(
        first.read(&mut byte).unwrap(),
        0,
        "an idle connection stays open"
    );

    // The API still answers once descriptors are free again.
    drop(idle);
    let r = api_request(&sock, "GET", "/status", "").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let log = std::fs::read_to_string(&log_path).unwrap();
    let failures = log.matches("accept failed").count();
    assert!(failures >= 1, "the VMM never ran out of descriptors\n{log}");
    assert!(
        failures <= 3,
        "{failures} accept warnings: the API spins\n{log}"
    );
}
