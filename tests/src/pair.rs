//! A replicated pair on the netns rig, the client workload that judges it,
//! and a relay that corrupts the peer link on demand.
//!
//! [`Pair::start`] builds a [`Topology`] with both hosts, makes a tap in
//! each, writes two disk images (the secondary's starts as garbage: the
//! initial sync must repair it), starts `vmm --role secondary` in `host-b`
//! and `vmm --role primary` in `host-a`, and waits until both report
//! `protected`. The guest (the test guest, [`GUEST_INDEX`]) answers at
//! [`guest_ip`]`(0)` from whichever side runs it.
//!
//! ```text
//!  client ns ── switch ──┬── host-a: primary vmm  (tap "tapa", --peer 10.77.0.3:7070)
//!                        └── host-b: secondary vmm (tap "tapb", --listen 10.77.0.3:7070)
//! ```
//!
//! [`Workload`] is what a user of the guest would check, from the client
//! namespace on its own threads: one TCP echo connection (a numbered,
//! checksummed message every 10 ms, every reply checked byte for byte, the
//! same connection for the whole run), ordered `GET /count` (every value
//! above every value seen before) and `POST /kv/KEY` with checksummed
//! values (each `201` remembered and read back at the end). Its
//! [`WorkloadReport`] lists every violation and the longest silence of the
//! echo connection: the client-visible failover time.
//!
//! Every wait polls a real condition with a deadline; nothing sleeps to
//! synchronise. Dropping a [`Pair`] kills both `vmm`s, then the relay,
//! then the namespaces, then the image files.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::http::{api_request, Client};
use crate::net::{guest_ip, Host, Netns, Topology};
use crate::{guest_artifact, Vmm};

/// The guest's index on the rig: it answers at `guest_ip(GUEST_INDEX)`.
pub const GUEST_INDEX: u8 = 0;

/// The port the secondary listens on, on host-b's address.
pub const PEER_PORT: u16 = 7070;

/// The relay's port on host-a's address.
pub const RELAY_PORT: u16 = 7071;

/// The taps of the two sides, each in its host's namespace.
pub const TAP_A: &str = "tapa";
pub const TAP_B: &str = "tapb";

/// Boot, then initial sync (disks and memory over the veths).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A state change after an event (death, failover, refusal).
pub const STATE_TIMEOUT: Duration = Duration::from_secs(30);

/// Between polls of `/status`.
const POLL: Duration = Duration::from_millis(15);

/// One side of the pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Primary,
    Secondary,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Primary => "primary",
            Side::Secondary => "secondary",
        }
    }
}

/// Which disk the secondary gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecondaryDisk {
    /// One of the primary's size, filled with garbage.
    Garbage,
    /// One of this many bytes (a mismatch when it is not the primary's).
    Size(u64),
    /// None at all (a device-layout mismatch).
    Missing,
    /// The primary's contents (zeros) and size, except that every n-th MiB
    /// (the first of each n) is garbage: a disk that differs in part.
    GarbageEvery(u64),
}

/// vmm's default checkpoint interval in COLO mode (periodic checkpoints
/// only; mismatches take the others).
pub const COLO_CHECKPOINT_MS: u64 = 2000;

/// How to start a [`Pair`].
#[derive(Clone, Debug)]
pub struct PairOptions {
    /// `--mode` on both sides: "remus" (the default here) or "colo".
    pub mode: &'static str,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub disk_bytes: u64,
    /// Words appended to the guest's command line (`dirty_mib_per_s=64`).
    pub guest_args: String,
    pub checkpoint_ms: u64,
    /// `--verify-checkpoints` on the primary.
    pub verify: bool,
    /// `--failover auto` on the secondary (default manual).
    pub failover_auto: bool,
    /// `--heartbeat-timeout-ms` on both sides (default: vmm's, 1000).
    pub heartbeat_timeout_ms: Option<u64>,
    /// Extra environment of each `vmm` (`COLO_FAULT`, ...).
    pub primary_env: Vec<(String, String)>,
    pub secondary_env: Vec<(String, String)>,
    /// The secondary's own idea of the machine (mismatch tests).
    pub secondary_mem_mib: Option<u64>,
    pub secondary_vcpus: Option<u8>,
    pub secondary_disk: SecondaryDisk,
    /// Route the peer link through a [`Relay`] in host-a.
    pub relay: bool,
    /// Wait for both sides to be `protected` before returning.
    pub wait_protected: bool,
}

impl Default for PairOptions {
    fn default() -> Self {
        Self {
            mode: "remus",
            mem_mib: 64,
            vcpus: 1,
            disk_bytes: 16 << 20,
            guest_args: String::new(),
            checkpoint_ms: 20,
            verify: true,
            failover_auto: false,
            heartbeat_timeout_ms: None,
            primary_env: Vec::new(),
            secondary_env: Vec::new(),
            secondary_mem_mib: None,
            secondary_vcpus: None,
            secondary_disk: SecondaryDisk::Garbage,
            relay: false,
            wait_protected: true,
        }
    }
}

impl PairOptions {
    /// The default pair in COLO mode.
    pub fn colo() -> Self {
        Self::default().in_mode("colo")
    }

    /// The same pair in `mode` ("remus" or "colo"); COLO with vmm's
    /// default interval of periodic checkpoints.
    pub fn in_mode(self, mode: &'static str) -> Self {
        let checkpoint_ms = match mode {
            "colo" => COLO_CHECKPOINT_MS,
            _ => self.checkpoint_ms,
        };
        Self {
            mode,
            checkpoint_ms,
            ..self
        }
    }

    /// The default pair with the guest dirtying `mib_per_s` MiB/s.
    pub fn dirtying(mib_per_s: u64) -> Self {
        Self {
            guest_args: format!("dirty_mib_per_s={mib_per_s}"),
            ..Self::default()
        }
    }

    /// `COLO_FAULT=spec` in the environment of the side the spec names.
    pub fn fault(mut self, spec: &str) -> Self {
        let env = ("COLO_FAULT".to_string(), spec.to_string());
        if spec.starts_with("primary:") {
            self.primary_env.push(env);
        } else {
            self.secondary_env.push(env);
        }
        self
    }
}

/// `GET /status`'s `colo` object, as far as tests read it.
#[derive(Clone, Debug, PartialEq)]
pub struct ColoStatus {
    pub state: String,
    pub epoch: u64,
    pub checkpoints: u64,
    pub error: Option<String>,
    /// The whole object, for messages.
    pub raw: serde_json::Value,
}

/// Reads the `colo` object of the vmm behind `sock`.
pub fn colo_status(sock: &Path) -> io::Result<ColoStatus> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let r = api_request(sock, "GET", "/status", "")?;
    if r.status != 200 {
        return Err(bad(format!("GET /status: {} {}", r.status, r.text())));
    }
    let body: serde_json::Value =
        serde_json::from_slice(&r.body).map_err(|e| bad(format!("GET /status: {e}")))?;
    let colo = body
        .get("colo")
        .filter(|c| c.is_object())
        .ok_or_else(|| bad(format!("no colo object in {body}")))?;
    let number = |key: &str| colo.get(key).and_then(serde_json::Value::as_u64);
    Ok(ColoStatus {
        state: colo
            .get("state")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| bad(format!("no colo.state in {colo}")))?
            .to_string(),
        epoch: number("epoch").unwrap_or(0),
        checkpoints: number("checkpoints").unwrap_or(0),
        error: colo
            .get("error")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string),
        raw: colo.clone(),
    })
}

/// A `vmm` command line as strings.
fn args(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// A file of `bytes` bytes: zeros, or splitmix64 garbage from `seed`.
fn image(path: &Path, bytes: u64, garbage: Option<u64>) {
    let file = std::fs::File::create(path).expect("create a disk image");
    match garbage {
        None => file.set_len(bytes).expect("size a disk image"),
        Some(seed) => {
            let mut rng = Rng::new(seed);
            let mut data = Vec::with_capacity(bytes as usize);
            while (data.len() as u64) < bytes {
                data.extend_from_slice(&rng.next_u64().to_le_bytes());
            }
            data.truncate(bytes as usize);
            std::fs::write(path, data).expect("write a disk image");
        }
    }
}

/// A file of `bytes` zeros whose first MiB of every `every` MiB is
/// splitmix64 garbage from `seed`.
fn partly_garbage(path: &Path, bytes: u64, every: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    image(path, bytes, None);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open a disk image");
    let mut rng = Rng::new(seed);
    let mib = 1u64 << 20;
    for start in (0..bytes).step_by((every.max(1) * mib) as usize) {
        let len = mib.min(bytes - start) as usize;
        let mut data = Vec::with_capacity(len + 8);
        while data.len() < len {
            data.extend_from_slice(&rng.next_u64().to_le_bytes());
        }
        data.truncate(len);
        file.write_all_at(&data, start).expect("write a disk image");
    }
}

/// A primary and a secondary `vmm` on the rig (see the module doc).
pub struct Pair {
    // Drop order is declaration order: processes, relay, namespaces, files.
    primary: Vmm,
    secondary: Vmm,
    relay: Option<Relay>,
    topo: Topology,
    dir: tempfile::TempDir,
    opts: PairOptions,
    primary_started: Instant,
}

impl Pair {
    /// Starts the pair `opts` describes and, unless told otherwise, waits
    /// until both sides are `protected`.
    pub fn start(opts: PairOptions) -> Self {
        let topo = Topology::new();
        topo.add_tap(Host::A, TAP_A);
        topo.add_tap(Host::B, TAP_B);
        let dir = tempfile::tempdir().expect("temporary directory");
        image(&dir.path().join("a.img"), opts.disk_bytes, None);
        let garbage_seed = 0x5eed ^ opts.disk_bytes;
        match opts.secondary_disk {
            SecondaryDisk::Garbage => image(
                &dir.path().join("b.img"),
                opts.disk_bytes,
                Some(garbage_seed),
            ),
            SecondaryDisk::Size(n) => image(&dir.path().join("b.img"), n, Some(garbage_seed)),
            SecondaryDisk::GarbageEvery(n) => {
                partly_garbage(&dir.path().join("b.img"), opts.disk_bytes, n, garbage_seed)
            }
            SecondaryDisk::Missing => {}
        }

        let listen = SocketAddr::from((Host::B.ip(), PEER_PORT));
        let relay = opts.relay.then(|| {
            Relay::start(
                topo.host(Host::A),
                SocketAddr::from((Host::A.ip(), RELAY_PORT)),
                listen,
            )
        });
        let peer = relay.as_ref().map_or(listen, Relay::addr);

        let path = |name: &str| dir.path().join(name).display().to_string();
        let mut b = args(&[
            "--role",
            "secondary",
            "--listen",
            &listen.to_string(),
            "--mem-mib",
            &opts.secondary_mem_mib.unwrap_or(opts.mem_mib).to_string(),
            "--vcpus",
            &opts.secondary_vcpus.unwrap_or(opts.vcpus).to_string(),
            "--net",
            &format!("tap={TAP_B}"),
            "--api-sock",
            &path("b.sock"),
            "--mode",
            opts.mode,
        ]);
        if opts.secondary_disk != SecondaryDisk::Missing {
            b.extend(args(&["--disk", &path("b.img")]));
        }
        if opts.failover_auto {
            b.extend(args(&["--failover", "auto"]));
        }
        let heartbeat = opts
            .heartbeat_timeout_ms
            .map(|ms| args(&["--heartbeat-timeout-ms", &ms.to_string()]))
            .unwrap_or_default();
        b.extend(heartbeat.iter().cloned());
        let mut command = topo.host(Host::B).exec(crate::vmm_bin(), &b);
        command.envs(opts.secondary_env.iter().cloned());
        let mut secondary = Vmm::spawn_command(command);
        // `waiting`: it listens for the primary (whose first connection
        // attempt then reaches it, also through the relay).
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match colo_status(&dir.path().join("b.sock")) {
                Ok(s) if s.state == "waiting" => break,
                Ok(s) => panic!("the new secondary is not waiting: {}", s.raw),
                Err(_) if !secondary.has_exited() && Instant::now() < deadline => {}
                Err(e) => panic!(
                    "the secondary did not start listening: {e}\n{}",
                    tail(&secondary.log(), 60)
                ),
            }
            thread::sleep(POLL);
        }

        let cmdline = format!("ip={}/24 {}", guest_ip(GUEST_INDEX), opts.guest_args);
        let mut a = args(&[
            "--role",
            "primary",
            "--peer",
            &peer.to_string(),
            "--kernel",
            &guest_artifact("test-guest").display().to_string(),
            "--cmdline",
            cmdline.trim_end(),
            "--mem-mib",
            &opts.mem_mib.to_string(),
            "--vcpus",
            &opts.vcpus.to_string(),
            "--disk",
            &path("a.img"),
            "--net",
            &format!("tap={TAP_A}"),
            "--api-sock",
            &path("a.sock"),
            "--checkpoint-ms",
            &opts.checkpoint_ms.to_string(),
            "--mode",
            opts.mode,
        ]);
        if opts.verify {
            a.push("--verify-checkpoints".into());
        }
        a.extend(heartbeat);
        let mut command = topo.host(Host::A).exec(crate::vmm_bin(), &a);
        command.envs(opts.primary_env.iter().cloned());
        let primary_started = Instant::now();
        let mut primary = Vmm::spawn_command(command);
        primary.wait_for_serial("colo-test-guest: ready", START_TIMEOUT);

        let pair = Self {
            primary,
            secondary,
            relay,
            topo,
            dir,
            opts,
            primary_started,
        };
        if pair.opts.wait_protected {
            pair.wait_state(Side::Primary, &["protected"], START_TIMEOUT);
            pair.wait_state(Side::Secondary, &["protected"], START_TIMEOUT);
        }
        pair
    }

    /// When the primary `vmm` was spawned (the secondary was already
    /// waiting): the start of the initial sync's clock.
    pub fn primary_started(&self) -> Instant {
        self.primary_started
    }

    pub fn options(&self) -> &PairOptions {
        &self.opts
    }

    pub fn topo(&self) -> &Topology {
        &self.topo
    }

    /// The API socket of `side`.
    pub fn sock(&self, side: Side) -> PathBuf {
        self.dir.path().join(match side {
            Side::Primary => "a.sock",
            Side::Secondary => "b.sock",
        })
    }

    pub fn primary_sock(&self) -> PathBuf {
        self.sock(Side::Primary)
    }

    pub fn secondary_sock(&self) -> PathBuf {
        self.sock(Side::Secondary)
    }

    /// The disk image of `side`.
    pub fn image(&self, side: Side) -> PathBuf {
        self.dir.path().join(match side {
            Side::Primary => "a.img",
            Side::Secondary => "b.img",
        })
    }

    /// The `vmm` process of `side`.
    pub fn vmm(&mut self, side: Side) -> &mut Vmm {
        match side {
            Side::Primary => &mut self.primary,
            Side::Secondary => &mut self.secondary,
        }
    }

    /// Everything `side`'s guest console printed so far.
    pub fn serial(&self, side: Side) -> String {
        match side {
            Side::Primary => self.primary.serial(),
            Side::Secondary => self.secondary.serial(),
        }
    }

    pub fn relay(&self) -> &Relay {
        self.relay
            .as_ref()
            .expect("this pair was started without a relay")
    }

    /// SIGKILLs `side`'s `vmm` (a host crash) and reaps it.
    pub fn kill(&mut self, side: Side) {
        self.vmm(side).kill();
    }

    pub fn kill_primary(&mut self) {
        self.kill(Side::Primary);
    }

    pub fn kill_secondary(&mut self) {
        self.kill(Side::Secondary);
    }

    /// `PUT /actions {"action":"failover"}` on the secondary (expects 204),
    /// then waits until it reports `failed_over`.
    pub fn failover(&self) -> ColoStatus {
        let r = api_request(
            &self.secondary_sock(),
            "PUT",
            "/actions",
            r#"{"action":"failover"}"#,
        )
        .unwrap_or_else(|e| panic!("PUT failover on the secondary: {e}\n{}", self.logs()));
        assert_eq!(
            r.status,
            204,
            "PUT failover on the secondary: {}\n{}",
            r.text(),
            self.logs()
        );
        self.wait_state(Side::Secondary, &["failed_over"], STATE_TIMEOUT)
    }

    /// The `colo` status of `side`; panics with both logs when it cannot
    /// be read.
    pub fn status(&self, side: Side) -> ColoStatus {
        colo_status(&self.sock(side))
            .unwrap_or_else(|e| panic!("status of the {}: {e}\n{}", side.name(), self.logs()))
    }

    /// Polls `side`'s status until `done` holds (every [`POLL`], up to
    /// `timeout`); returns that status. A status that cannot be read (the
    /// process is starting or ending) counts as not done. Panics with the
    /// last status and both logs on timeout.
    pub fn wait_until(
        &self,
        side: Side,
        what: &str,
        timeout: Duration,
        done: impl Fn(&ColoStatus) -> bool,
    ) -> ColoStatus {
        let deadline = Instant::now() + timeout;
        // A socket nobody listens on any more: the process is gone.
        let mut refused = 0;
        loop {
            let last = colo_status(&self.sock(side));
            match &last {
                Ok(status) if done(status) => return status.clone(),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => refused += 1,
                _ => refused = 0,
            }
            if Instant::now() >= deadline || refused >= 3 {
                let last = match last {
                    Ok(s) => s.raw.to_string(),
                    Err(e) => e.to_string(),
                };
                panic!(
                    "the {} is not {what} (waited up to {timeout:?}); last status: {last}\n{}",
                    side.name(),
                    self.logs()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Waits until `side`'s state is one of `states`.
    pub fn wait_state(&self, side: Side, states: &[&str], timeout: Duration) -> ColoStatus {
        self.wait_until(side, &states.join(" or "), timeout, |s| {
            states.contains(&s.state.as_str())
        })
    }

    /// Waits until `side` reports at least `n` committed checkpoints.
    pub fn wait_checkpoints(&self, side: Side, n: u64, timeout: Duration) -> ColoStatus {
        self.wait_until(side, &format!("past {n} checkpoints"), timeout, |s| {
            s.checkpoints >= n
        })
    }

    /// `GET /state-hash` of `side` (the VM must be paused: the secondary's
    /// replica always is before failover).
    pub fn state_hash(&self, side: Side) -> String {
        let r = api_request(&self.sock(side), "GET", "/state-hash", "")
            .unwrap_or_else(|e| panic!("state hash of the {}: {e}", side.name()));
        assert_eq!(
            r.status,
            200,
            "state hash of the {}: {}",
            side.name(),
            r.text()
        );
        r.text()
    }

    /// `PUT /vm {"state": state}` on `side` (expects 204).
    pub fn set_vm_state(&self, side: Side, state: &str) {
        let body = format!(r#"{{"state":"{state}"}}"#);
        let r = api_request(&self.sock(side), "PUT", "/vm", &body)
            .unwrap_or_else(|e| panic!("PUT /vm on the {}: {e}", side.name()));
        assert_eq!(
            r.status,
            204,
            "PUT /vm {state} on the {}: {}",
            side.name(),
            r.text()
        );
    }

    /// `PUT /actions {"action":"checkpoint"}` on the primary: its status.
    pub fn request_checkpoint(&self) -> crate::http::Response {
        api_request(
            &self.primary_sock(),
            "PUT",
            "/actions",
            r#"{"action":"checkpoint"}"#,
        )
        .unwrap_or_else(|e| panic!("PUT checkpoint: {e}"))
    }

    /// Pauses the primary and makes the secondary hold a checkpoint taken
    /// after the pause; returns the primary's state hash, which the
    /// replica then has too. The primary stays paused.
    ///
    /// Any checkpoint committed after epoch `e + 1` (`e` read once paused;
    /// `e + 1` may have been captured before the pause) was captured while
    /// paused, so a secondary at `e + 2` or later holds the paused state.
    pub fn pause_and_settle(&self) -> String {
        self.set_vm_state(Side::Primary, "paused");
        let e = self.status(Side::Primary).epoch;
        let r = self.request_checkpoint();
        assert_eq!(r.status, 202, "PUT checkpoint: {}", r.text());
        self.wait_until(
            Side::Secondary,
            &format!("at epoch {} or later", e + 2),
            STATE_TIMEOUT,
            |s| s.epoch >= e + 2,
        );
        self.state_hash(Side::Primary)
    }

    /// The value of the metric line `series` (name with labels, as
    /// `GET /metrics` prints it) of `side`, if present.
    pub fn metric(&self, side: Side, series: &str) -> Option<f64> {
        let r = api_request(&self.sock(side), "GET", "/metrics", "")
            .unwrap_or_else(|e| panic!("metrics of the {}: {e}", side.name()));
        assert_eq!(
            r.status,
            200,
            "metrics of the {}: {}",
            side.name(),
            r.text()
        );
        r.text().lines().find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
    }

    /// Both `vmm`s' logs and consoles, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- primary log ---\n{}\n--- primary console ---\n{}\n--- secondary log ---\n{}\n--- secondary console ---\n{}",
            tail(&self.primary.log(), 60),
            tail(&self.primary.serial(), 20),
            tail(&self.secondary.log(), 60),
            tail(&self.secondary.serial(), 20),
        )
    }

    /// Starts a [`Workload`] from the client against the guest.
    pub fn workload(&self) -> Workload {
        Workload::start(self.topo.client(), guest_ip(GUEST_INDEX))
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The guest console's workload self-check lines after `from` (a byte
/// offset into `serial`): how many generations passed, and the first
/// failure marker if any.
pub fn self_checks(serial: &str, from: usize) -> (usize, Option<String>) {
    let text = serial.get(from..).unwrap_or("");
    let passed = text
        .lines()
        .filter(|l| l.contains("workload generation") && l.contains(" ok, "))
        .count();
    let failed = serial
        .lines()
        .find(|l| l.contains("selfcheck FAILED"))
        .map(str::to_string);
    (passed, failed)
}

// ---------------------------------------------------------------------------
// Randomness for kill points: reproducible from a seed.

/// splitmix64: small, seedable, good enough to pick test points.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `range` (start inclusive, end exclusive).
    pub fn in_range(&mut self, range: std::ops::Range<u64>) -> u64 {
        assert!(range.start < range.end, "empty range {range:?}");
        range.start + self.next_u64() % (range.end - range.start)
    }
}

/// The seed of randomised tests: `COLO_SEED`, or `default`. Tests print
/// it so a failure can be replayed.
pub fn seed(default: u64) -> u64 {
    match std::env::var("COLO_SEED") {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("COLO_SEED={text:?} is not a number")),
        Err(_) => default,
    }
}

/// FNV-1a, 64 bits: the checksum of echo messages and kv values.
pub fn fnv64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

// ---------------------------------------------------------------------------
// The client workload.

/// For the client to make the progress a test asks for: a round trip
/// waits for a checkpoint, and a debug build on a busy machine takes far
/// more than the 20 ms interval per checkpoint.
pub const PROGRESS_TIMEOUT: Duration = Duration::from_secs(90);

/// Bytes per echo message.
pub const ECHO_LEN: usize = 64;

/// Between echo messages, and between HTTP requests.
pub const TICK: Duration = Duration::from_millis(10);

/// How long the client waits for any one reply before it gives the
/// connection up: longer than any failover the tests cause.
pub const CLIENT_PATIENCE: Duration = Duration::from_secs(30);

/// Echo message `seq`: the number, 48 bytes that depend on it, and the
/// FNV-1a of those 56 bytes.
pub fn echo_message(seq: u64) -> [u8; ECHO_LEN] {
    let mut m = [0u8; ECHO_LEN];
    m[..8].copy_from_slice(&seq.to_le_bytes());
    let mut rng = Rng::new(seq ^ 0xec40);
    for chunk in m[8..56].chunks_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let sum = fnv64(&m[..56]);
    m[56..].copy_from_slice(&sum.to_le_bytes());
    m
}

/// What is wrong with echo reply `got` where message `want` was due, if
/// anything.
pub fn check_echo(want: u64, got: &[u8; ECHO_LEN]) -> Option<String> {
    if got == &echo_message(want) {
        return None;
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&got[..8]);
    let seq = u64::from_le_bytes(seq);
    let mut sum = [0u8; 8];
    sum.copy_from_slice(&got[56..]);
    Some(if u64::from_le_bytes(sum) != fnv64(&got[..56]) {
        format!("echo reply where message {want} was due is corrupt (bad checksum)")
    } else if seq < want {
        format!("echo message {seq} came back again where {want} was due (duplicate)")
    } else if seq > want {
        format!("echo message {want} is lost: {seq} came back in its place")
    } else {
        format!("echo message {want} came back different")
    })
}

/// The value stored under kv key number `n`: a header naming the key, the
/// payload's length and FNV-1a, then the payload (20..900 bytes: a
/// record of at most two sectors, so long runs do not fill the disk).
pub fn kv_value(n: u64) -> Vec<u8> {
    let mut rng = Rng::new(n ^ 0x4b56);
    let len = rng.in_range(20..900) as usize;
    let payload: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
    let mut value = format!("k-{n} len={len} fnv={:016x}\n", fnv64(&payload)).into_bytes();
    value.extend_from_slice(&payload);
    value
}

/// Counters the workload threads update as they go.
#[derive(Debug, Default)]
struct Progress {
    echoes: AtomicU64,
    counts: AtomicU64,
    stored: AtomicU64,
}

/// What the HTTP side found.
#[derive(Debug, Default)]
struct HttpOutcome {
    counts: u64,
    max_count: u64,
    stored: Vec<(String, Vec<u8>)>,
    unknown: u64,
    reconnects: u64,
    failures: Vec<String>,
}

/// What the echo side found.
#[derive(Debug, Default)]
struct EchoOutcome {
    echoes: u64,
    longest_gap: Duration,
    failures: Vec<String>,
}

/// What a [`Workload`] saw.
#[derive(Debug, Default)]
pub struct WorkloadReport {
    /// Echo messages that came back, each checked.
    pub echoes: u64,
    /// The longest time between two echo replies (the first reply counts
    /// from the connection's start): the client-visible outage.
    pub longest_echo_gap: Duration,
    /// `GET /count` answers, and the highest value seen (including the
    /// final check after the run).
    pub counts: u64,
    pub max_count: u64,
    /// kv records that got `201` (all read back at the end).
    pub kv_stored: usize,
    /// POSTs whose reply never came: maybe applied, not checked.
    pub kv_unknown: u64,
    /// HTTP connections given up and opened again.
    pub reconnects: u64,
    /// Every violation seen: empty when the guest behaved.
    pub failures: Vec<String>,
}

impl WorkloadReport {
    /// Panics, listing every failure and `context`, unless there were none
    /// and the workload did something.
    pub fn assert_clean(&self, context: &str) {
        assert!(
            self.failures.is_empty(),
            "the client saw {} failure(s):\n  {}\n{self:?}\n{context}",
            self.failures.len(),
            self.failures.join("\n  ")
        );
        assert!(
            self.echoes > 0 && self.counts > 0 && self.kv_stored > 0,
            "the workload did nothing: {self:?}\n{context}"
        );
    }
}

/// The client side (see the module doc): runs on its own threads in the
/// client namespace until [`Workload::finish`].
pub struct Workload {
    server: Ipv4Addr,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
    echo: Option<JoinHandle<EchoOutcome>>,
    http: Option<JoinHandle<HttpOutcome>>,
}

impl Workload {
    /// Connects to `server`'s echo (7) and HTTP (80) ports from `client`
    /// and starts both loops; panics if either connection fails.
    pub fn start(client: &Netns, server: Ipv4Addr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::default());
        let (echo, http) = client.enter(|| {
            let echo_stream = connect(SocketAddr::from((server, 7)))
                .unwrap_or_else(|e| panic!("echo connection to {server}: {e}"));
            let http_stream = connect(SocketAddr::from((server, 80)))
                .unwrap_or_else(|e| panic!("HTTP connection to {server}: {e}"));
            // Threads started here stay in the client namespace, so the
            // HTTP loop can open new connections there.
            let (s, p) = (stop.clone(), progress.clone());
            let echo = thread::Builder::new()
                .name("workload-echo".into())
                .spawn(move || run_echo(echo_stream, &s, &p))
                .expect("spawn the echo thread");
            let (s, p) = (stop.clone(), progress.clone());
            let http = thread::Builder::new()
                .name("workload-http".into())
                .spawn(move || run_http(server, http_stream, &s, &p))
                .expect("spawn the HTTP thread");
            (echo, http)
        });
        Self {
            server,
            stop,
            progress,
            echo: Some(echo),
            http: Some(http),
        }
    }

    /// Echo replies so far.
    pub fn echoes(&self) -> u64 {
        self.progress.echoes.load(Ordering::SeqCst)
    }

    /// `GET /count` answers so far.
    pub fn counts(&self) -> u64 {
        self.progress.counts.load(Ordering::SeqCst)
    }

    /// kv records stored (201) so far.
    pub fn stored(&self) -> u64 {
        self.progress.stored.load(Ordering::SeqCst)
    }

    /// Waits until the workload has made `echoes` more echo round trips,
    /// `counts` more counter reads and `stored` more kv stores than now,
    /// within `timeout`; else says how far it got.
    pub fn wait_progress(
        &self,
        echoes: u64,
        counts: u64,
        stored: u64,
        timeout: Duration,
    ) -> Result<(), String> {
        let (e, c, s) = (self.echoes(), self.counts(), self.stored());
        let deadline = Instant::now() + timeout;
        loop {
            let got = (self.echoes() - e, self.counts() - c, self.stored() - s);
            if got.0 >= echoes && got.1 >= counts && got.2 >= stored {
                return Ok(());
            }
            let ended = self.finished();
            if Instant::now() >= deadline || ended {
                return Err(format!(
                    "the client made {} of {echoes} echo round trips, {} of {counts} counter \
                     reads and {} of {stored} kv stores{}",
                    got.0,
                    got.1,
                    got.2,
                    if ended {
                        " before a loop ended".to_string()
                    } else {
                        format!(" in {timeout:?}")
                    }
                ));
            }
            thread::sleep(POLL);
        }
    }

    /// [`Workload::wait_progress`] within [`PROGRESS_TIMEOUT`]; when the
    /// client does not get there, finishes the workload and panics with
    /// what it saw and `context()` (logs).
    pub fn expect_progress(
        self,
        echoes: u64,
        counts: u64,
        stored: u64,
        client: &Netns,
        context: impl FnOnce() -> String,
    ) -> Self {
        if let Err(short) = self.wait_progress(echoes, counts, stored, PROGRESS_TIMEOUT) {
            let report = self.finish(client);
            panic!(
                "{short}\nfailures: {:?}\n{report:?}\n{}",
                report.failures,
                context()
            );
        }
        self
    }

    /// Whether a loop has already ended (on a failure).
    fn finished(&self) -> bool {
        self.echo.as_ref().is_some_and(JoinHandle::is_finished)
            || self.http.as_ref().is_some_and(JoinHandle::is_finished)
    }

    /// Stops both loops (the echo loop first collects every reply still
    /// due), then reads back every stored kv record and the counter once
    /// more on a fresh connection from `client`.
    pub fn finish(mut self, client: &Netns) -> WorkloadReport {
        self.stop.store(true, Ordering::SeqCst);
        let echo = self
            .echo
            .take()
            .expect("finish runs once")
            .join()
            .unwrap_or_else(|_| EchoOutcome {
                failures: vec!["the echo thread panicked".into()],
                ..EchoOutcome::default()
            });
        let mut http = self
            .http
            .take()
            .expect("finish runs once")
            .join()
            .unwrap_or_else(|_| HttpOutcome {
                failures: vec!["the HTTP thread panicked".into()],
                ..HttpOutcome::default()
            });
        let server = self.server;
        client.enter(|| verify_after(server, &mut http));
        let mut failures = echo.failures;
        failures.append(&mut http.failures);
        WorkloadReport {
            echoes: echo.echoes,
            longest_echo_gap: echo.longest_gap,
            counts: http.counts,
            max_count: http.max_count,
            kv_stored: http.stored.len(),
            kv_unknown: http.unknown,
            reconnects: http.reconnects,
            failures,
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        // A test that panics before `finish` must not leave loops running.
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A TCP connection with the client's patience.
fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    // A loaded machine can leave the client's ARP request unanswered for
    // the kernel's three probes (a Remus guest's reply waits for a
    // checkpoint): the kernel then says "no route to host". A client
    // tries again, for as long as a user would.
    let deadline = Instant::now() + Duration::from_secs(60);
    let stream = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(s) => break s,
            Err(e) if e.kind() == io::ErrorKind::HostUnreachable && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    };
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(stream)
}

/// One echo connection: a writer thread sends a message every [`TICK`];
/// this thread checks each reply in order and times the gaps.
fn run_echo(stream: TcpStream, stop: &AtomicBool, progress: &Progress) -> EchoOutcome {
    let mut out = EchoOutcome::default();
    let sent = Arc::new(AtomicU64::new(0));
    let writer_done = Arc::new(AtomicBool::new(false));
    let writer = match stream.try_clone() {
        Ok(mut w) => {
            let (sent, done) = (sent.clone(), writer_done.clone());
            let stop_flag = Arc::new(AtomicBool::new(false));
            let stop_writer = stop_flag.clone();
            let handle = thread::spawn(move || {
                let start = Instant::now();
                let mut error = None;
                for seq in 0u64.. {
                    if stop_writer.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Err(e) = w.write_all(&echo_message(seq)) {
                        error = Some(format!("echo: sending message {seq}: {e}"));
                        break;
                    }
                    sent.store(seq + 1, Ordering::SeqCst);
                    // Pacing, not synchronisation: one message per tick.
                    let next = start + TICK * (seq as u32 + 1);
                    thread::sleep(next.saturating_duration_since(Instant::now()));
                }
                done.store(true, Ordering::SeqCst);
                error
            });
            Some((handle, stop_flag))
        }
        Err(e) => {
            out.failures
                .push(format!("echo: cannot clone the socket: {e}"));
            None
        }
    };
    let Some((writer, stop_writer)) = writer else {
        return out;
    };

    let mut reader = stream;
    let mut buf = [0u8; ECHO_LEN];
    let mut filled = 0;
    let mut last_reply = Instant::now();
    let mut stopping_since: Option<Instant> = None;
    loop {
        if stop.load(Ordering::SeqCst) && stopping_since.is_none() {
            stop_writer.store(true, Ordering::SeqCst);
            stopping_since = Some(Instant::now());
        }
        let done_sending = writer_done.load(Ordering::SeqCst);
        if done_sending && out.echoes >= sent.load(Ordering::SeqCst) {
            break;
        }
        if last_reply.elapsed() > CLIENT_PATIENCE {
            out.failures.push(format!(
                "echo: no reply for {CLIENT_PATIENCE:?} after {} messages ({} sent)",
                out.echoes,
                sent.load(Ordering::SeqCst)
            ));
            break;
        }
        match reader.read(&mut buf[filled..]) {
            Ok(0) => {
                out.failures.push(format!(
                    "echo: the guest closed the connection after {} messages",
                    out.echoes
                ));
                break;
            }
            Ok(n) => {
                filled += n;
                if filled == ECHO_LEN {
                    filled = 0;
                    let now = Instant::now();
                    out.longest_gap = out.longest_gap.max(now - last_reply);
                    last_reply = now;
                    if let Some(wrong) = check_echo(out.echoes, &buf) {
                        out.failures.push(wrong);
                        break;
                    }
                    out.echoes += 1;
                    progress.echoes.store(out.echoes, Ordering::SeqCst);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                out.failures.push(format!(
                    "echo: connection failed after {} messages: {e}",
                    out.echoes
                ));
                break;
            }
        }
    }
    stop_writer.store(true, Ordering::SeqCst);
    // A writer blocked on a full socket ends when the socket goes away.
    let _ = reader.shutdown(Shutdown::Both);
    match writer.join() {
        Ok(Some(e)) if out.failures.is_empty() => out.failures.push(e),
        Ok(_) => {}
        Err(_) => out.failures.push("echo: the writer panicked".into()),
    }
    out
}

/// An HTTP connection to `server`:80 that waits [`CLIENT_PATIENCE`] for
/// each reply.
fn http_client(stream: TcpStream, server: Ipv4Addr) -> io::Result<Client<TcpStream>> {
    stream.set_read_timeout(Some(CLIENT_PATIENCE))?;
    Ok(Client::new(stream, &server.to_string()))
}

/// Ordered `GET /count` and `POST /kv/k-N`, alternating, one per [`TICK`].
fn run_http(
    server: Ipv4Addr,
    first: TcpStream,
    stop: &AtomicBool,
    progress: &Progress,
) -> HttpOutcome {
    let mut out = HttpOutcome::default();
    let addr = SocketAddr::from((server, 80));
    let mut conn = match http_client(first, server) {
        Ok(c) => Some(c),
        Err(e) => {
            out.failures.push(format!("http: {e}"));
            return out;
        }
    };
    let start = Instant::now();
    let mut n = 0u64;
    // A GET is retried on a new connection when its connection dies; a
    // POST whose reply never came is "unknown" and not retried.
    let mut retry_get = false;
    while !stop.load(Ordering::SeqCst) {
        if conn.is_none() {
            out.reconnects += 1;
            match connect(addr).and_then(|s| http_client(s, server)) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    out.failures
                        .push(format!("http: cannot reconnect to {addr}: {e}"));
                    break;
                }
            }
        }
        let Some(c) = conn.as_mut() else { break };
        if retry_get || n.is_multiple_of(2) {
            retry_get = false;
            match c.request("GET", "/count", b"") {
                Ok(r) if r.status == 200 => match r.text().trim().parse::<u64>() {
                    Ok(v) if v > out.max_count => {
                        out.max_count = v;
                        out.counts += 1;
                        progress.counts.store(out.counts, Ordering::SeqCst);
                    }
                    Ok(v) => {
                        out.failures.push(format!(
                            "GET /count answered {v} after {} had been seen",
                            out.max_count
                        ));
                        break;
                    }
                    Err(_) => {
                        out.failures
                            .push(format!("GET /count answered {:?}", r.text()));
                        break;
                    }
                },
                Ok(r) => {
                    out.failures
                        .push(format!("GET /count: {} {}", r.status, r.text()));
                    break;
                }
                Err(_) => {
                    conn = None;
                    retry_get = true;
                    continue;
                }
            }
        } else {
            let key = format!("k-{n}");
            let value = kv_value(n);
            match c.request("POST", &format!("/kv/{key}"), &value) {
                Ok(r) if r.status == 201 => {
                    out.stored.push((key, value));
                    progress
                        .stored
                        .store(out.stored.len() as u64, Ordering::SeqCst);
                }
                Ok(r) => {
                    out.failures
                        .push(format!("POST /kv/{key}: {} {}", r.status, r.text()));
                    break;
                }
                Err(_) => {
                    out.unknown += 1;
                    conn = None;
                }
            }
        }
        n += 1;
        let next = start + TICK * (n as u32);
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    out
}

/// Reads of stored records sent at once in the final check (their replies
/// fit the guest's socket buffer).
const VERIFY_BATCH: usize = 8;

/// After the run: every stored record reads back identical and the
/// counter is above every value seen, on a fresh connection.
fn verify_after(server: Ipv4Addr, out: &mut HttpOutcome) {
    let addr = SocketAddr::from((server, 80));
    let mut c = match connect(addr).and_then(|s| http_client(s, server)) {
        Ok(c) => c,
        Err(e) => {
            out.failures
                .push(format!("http: cannot connect for the final check: {e}"));
            return;
        }
    };
    match c.request("GET", "/count", b"") {
        Ok(r) => match r.text().trim().parse::<u64>() {
            Ok(v) if r.status == 200 && v > out.max_count => out.max_count = v,
            _ => out.failures.push(format!(
                "final GET /count: {} {:?} (highest seen {})",
                r.status,
                r.text(),
                out.max_count
            )),
        },
        Err(e) => out.failures.push(format!("final GET /count: {e}")),
    }
    // Pipelined, a batch at a time: under Remus every round trip waits for
    // a checkpoint.
    let mut missing = 0;
    for batch in out.stored.chunks(VERIFY_BATCH) {
        let requests: String = batch
            .iter()
            .map(|(key, _)| format!("GET /kv/{key} HTTP/1.1\r\nHost: {server}\r\n\r\n"))
            .collect();
        for (i, (key, value)) in batch.iter().enumerate() {
            // The first call sends the whole batch; each reads one reply.
            let sent: &[u8] = if i == 0 { requests.as_bytes() } else { b"" };
            match c.raw(sent) {
                Ok(r) if r.status == 200 && &r.body == value => {}
                Ok(r) => {
                    missing += 1;
                    if missing <= 5 {
                        let what = if r.status == 200 {
                            format!("{} different bytes", r.body.len())
                        } else {
                            format!("{} {}", r.status, r.text())
                        };
                        out.failures
                            .push(format!("kv {key} got 201 but reads back as {what}"));
                    }
                }
                Err(e) => {
                    out.failures.push(format!("GET /kv/{key}: {e}"));
                    return;
                }
            }
        }
    }
    if missing > 5 {
        out.failures.push(format!(
            "{missing} stored kv records in all read back wrong"
        ));
    }
}

// ---------------------------------------------------------------------------
// The relay.

/// Forwards every TCP connection made to it (in a host namespace) to a
/// target, and on demand flips one byte of the first connection's
/// forward direction: what a bad NIC or cable would do to the peer link.
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<RelayShared>,
    accept: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct RelayShared {
    stop: AtomicBool,
    /// Bytes of the first connection's forward stream to let through
    /// before the one that is flipped; `None` when not armed.
    flip_in: Mutex<Option<u64>>,
    /// The forward-stream offset of the flipped byte, once flipped.
    flipped_at: Mutex<Option<u64>>,
    connections: AtomicU64,
    /// Clones of every socket, to shut down on drop.
    sockets: Mutex<Vec<TcpStream>>,
}

impl Relay {
    /// Listens on `listen` inside `ns` and forwards to `target` (from `ns`).
    pub fn start(ns: &Netns, listen: SocketAddr, target: SocketAddr) -> Self {
        let shared = Arc::new(RelayShared::default());
        let s = shared.clone();
        let accept = ns.enter(move || {
            let listener =
                TcpListener::bind(listen).unwrap_or_else(|e| panic!("relay: bind {listen}: {e}"));
            listener
                .set_nonblocking(true)
                .expect("relay: nonblocking listener");
            // Started inside the namespace: so are the connections it makes.
            thread::Builder::new()
                .name("relay-accept".into())
                .spawn(move || relay_accept(&listener, target, &s))
                .expect("spawn the relay")
        });
        Self {
            addr: listen,
            shared,
            accept: Some(accept),
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Flips (XOR 0xff) the byte `after` bytes from now in the first
    /// connection's forward direction (the peer's data connection, opened
    /// first).
    pub fn arm_flip(&self, after: u64) {
        *self
            .shared
            .flip_in
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(after);
    }

    /// The forward offset of the flipped byte, once it went through.
    pub fn flipped_at(&self) -> Option<u64> {
        *self
            .shared
            .flipped_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for s in self
            .shared
            .sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
    }
}

fn relay_accept(listener: &TcpListener, target: SocketAddr, shared: &Arc<RelayShared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        let inbound = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(POLL);
                continue;
            }
            Err(_) => continue,
        };
        let Ok(outbound) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
            // The target is not there: the client sees the connection close.
            continue;
        };
        // Counted once forwarded: a refused attempt is no connection.
        let index = shared.connections.fetch_add(1, Ordering::SeqCst);
        let streams = (|| -> io::Result<_> {
            inbound.set_nonblocking(false)?;
            inbound.set_nodelay(true)?;
            outbound.set_nodelay(true)?;
            let mut all = shared.sockets.lock().unwrap_or_else(|p| p.into_inner());
            all.push(inbound.try_clone()?);
            all.push(outbound.try_clone()?);
            Ok((
                inbound.try_clone()?,
                outbound.try_clone()?,
                inbound,
                outbound,
            ))
        })();
        let Ok((in_r, out_w, in_w, out_r)) = streams else {
            continue;
        };
        let fwd = shared.clone();
        thread::spawn(move || pump(in_r, out_w, (index == 0).then_some(&fwd)));
        thread::spawn(move || pump(out_r, in_w, None));
    }
}

/// Copies `from` to `to` until either ends, flipping the byte `shared`
/// asks for when given; then shuts both down.
fn pump(mut from: TcpStream, mut to: TcpStream, flips: Option<&Arc<RelayShared>>) {
    let mut buf = [0u8; 16 * 1024];
    let mut offset = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(shared) = flips {
            let mut armed = shared.flip_in.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(left) = *armed {
                if left < n as u64 {
                    buf[left as usize] ^= 0xff;
                    *armed = None;
                    *shared.flipped_at.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(offset + left);
                } else {
                    *armed = Some(left - n as u64);
                }
            }
        }
        offset += n as u64;
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_messages_check_order_and_content() {
        let m = echo_message(7);
        assert_eq!(check_echo(7, &m), None);
        assert!(check_echo(8, &m).unwrap().contains("duplicate"));
        assert!(check_echo(6, &m).unwrap().contains("lost"));
        let mut bad = m;
        bad[20] ^= 1;
        assert!(check_echo(7, &bad).unwrap().contains("corrupt"));
        assert_ne!(echo_message(1), echo_message(2));
    }

    #[test]
    fn kv_values_carry_their_checksum() {
        let v = kv_value(3);
        let text = String::from_utf8_lossy(&v);
        let header = text.lines().next().unwrap();
        let payload = &v[header.len() + 1..];
        assert!(header.starts_with("k-3 len="), "{header}");
        assert!(header.ends_with(&format!("{:016x}", fnv64(payload))));
        assert!(v.len() <= 16 * 1024, "the guest takes at most 16 KiB");
        assert_eq!(kv_value(3), v, "values are reproducible");
    }

    #[test]
    fn a_partly_garbage_image_differs_in_every_nth_mib_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.img");
        let mib = 1usize << 20;
        partly_garbage(&path, (9 * mib + 4096) as u64, 4, 1);
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 9 * mib + 4096);
        for (i, chunk) in data.chunks(mib).enumerate() {
            let zeros = chunk.iter().all(|&b| b == 0);
            assert_eq!(zeros, i % 4 != 0, "MiB {i}");
        }
    }

    #[test]
    fn rng_is_seeded() {
        let a: Vec<u64> = (0..4).map(|_| Rng::new(1).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let mut r = Rng::new(9);
        for _ in 0..1000 {
            assert!((10..20).contains(&r.in_range(10..20)));
        }
    }

    #[test]
    fn self_check_lines_are_counted() {
        let serial = "x\ncolo-test-guest: workload generation 1 ok, 64 MiB written\n\
                      colo-test-guest: workload generation 2 ok, 128 MiB written\n";
        assert_eq!(self_checks(serial, 0), (2, None));
        assert_eq!(
            self_checks(serial, 2 + serial[2..].find('\n').unwrap()),
            (1, None)
        );
        let bad = format!("{serial}colo-test-guest: selfcheck FAILED page 1 word 2\n");
        assert!(self_checks(&bad, 0).1.is_some());
    }
}
