//! Whole replication sessions over loopback TCP, with a fake guest on the
//! primary (memory, state and disks in plain vectors, the test writing to
//! them) and a fake replica on the secondary.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use colo::control::{Control, Mode, State, Status};
use colo::primary::{self, PrimaryConfig, PrimaryHandle};
use colo::secondary::{self, Failover, SecondaryConfig, SecondaryHandle};
use colo::vm::{
    Capture, DiskWrite, DiskWriteSink, Identity, OutputControl, PageBatch, PrimaryDisks, PrimaryVm,
    ReplicaDisks, ReplicaVm, StateDigest, VmOpError,
};
use colo::wire::{self, Message, Welcome};
use colo::PAGE_SIZE;

const PAGES: u64 = 256;
const MEM: u64 = PAGES * PAGE_SIZE;
const DISK: u64 = 4 * 64 * 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `f` until true; panics naming `what` after 5 s.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn identity(mem_size: u64, vcpus: u8) -> Identity {
    Identity {
        mem_size,
        vcpus,
        devices: vec![("blk0".into(), "virtio-blk".into())],
        disks: vec![DISK],
        cpu_template: "none".into(),
        cpuid_hash: 7,
        tsc_khz: 1_000_000,
    }
}

fn digest(mem: &[u8], state: &[u8]) -> StateDigest {
    let h = |b: &[u8]| {
        let mut s = DefaultHasher::new();
        b.hash(&mut s);
        s.finish()
    };
    let parts = vec![
        ("memory".to_string(), h(mem)),
        ("state".to_string(), h(state)),
    ];
    StateDigest {
        hash: h(&[h(mem).to_le_bytes(), h(state).to_le_bytes()].concat()),
        parts,
    }
}

fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The primary's guest: what the fake VM, disks and output share.
struct Guest {
    mem: Vec<u8>,
    dirty: BTreeSet<u64>,
    state: Vec<u8>,
    disk: Vec<u8>,
    /// The epoch the guest's actions belong to now.
    epoch: u64,
    sink: Option<DiskWriteSink>,
    tracked: BTreeSet<u64>,
    tracking_disk: bool,
    forwarding_stopped: bool,
    paused: bool,
}

type SharedGuest = Arc<Mutex<Guest>>;

fn guest() -> SharedGuest {
    Arc::new(Mutex::new(Guest {
        mem: pattern(MEM, 1),
        dirty: BTreeSet::new(),
        state: b"boot".to_vec(),
        disk: pattern(DISK, 2),
        epoch: 0,
        sink: None,
        tracked: BTreeSet::new(),
        tracking_disk: false,
        forwarding_stopped: false,
        paused: false,
    }))
}

/// The guest runs: writes memory, state and disk. Returns the epoch
/// these belong to.
fn act(g: &SharedGuest, n: u8) -> u64 {
    let mut g = lock(g);
    assert!(!g.paused, "the guest acts while paused");
    let page = (u64::from(n) * 7) % PAGES;
    let at = (page * PAGE_SIZE + u64::from(n)) as usize;
    g.mem[at..at + 8].copy_from_slice(&[n; 8]);
    g.dirty.insert(page);
    g.state = format!("state {n}").into_bytes();
    let offset = (u64::from(n) * 4096) % DISK;
    let data = vec![n; 512];
    g.disk[offset as usize..offset as usize + 512].copy_from_slice(&data);
    if g.tracking_disk {
        g.tracked.insert(offset / u64::from(colo::SYNC_BLOCK));
    }
    if let Some(sink) = &g.sink {
        let w = DiskWrite {
            epoch: g.epoch,
            disk: 0,
            offset,
            data,
        };
        // Refused once replication ended: the guest runs on alone.
        let _ = sink(w);
    }
    g.epoch
}

struct FakeVm(SharedGuest);

impl FakeVm {
    fn capture(&mut self, epoch: u64, verify: bool) -> Capture {
        let mut g = lock(&self.0);
        g.epoch = epoch + 1;
        let dirty = std::mem::take(&mut g.dirty);
        Capture {
            pages: batch(&g.mem, dirty),
            state: g.state.clone(),
            digest: verify.then(|| digest(&g.mem, &g.state)),
            paused_for: Duration::from_micros(50),
        }
    }
}

fn batch(mem: &[u8], pages: impl IntoIterator<Item = u64>) -> PageBatch {
    let mut b = PageBatch::default();
    for p in pages {
        b.addrs.push(p * PAGE_SIZE);
        let at = (p * PAGE_SIZE) as usize;
        b.data.extend_from_slice(&mem[at..at + PAGE_SIZE as usize]);
    }
    b
}

impl PrimaryVm for FakeVm {
    fn identity(&self) -> Identity {
        identity(MEM, 2)
    }

    fn start_tracking(&mut self) -> Result<(), VmOpError> {
        lock(&self.0).dirty.clear();
        Ok(())
    }

    fn copy_live(
        &mut self,
        all: bool,
        out: &mut dyn FnMut(PageBatch) -> Result<(), VmOpError>,
    ) -> Result<u64, VmOpError> {
        let b = {
            let mut g = lock(&self.0);
            let pages: Vec<u64> = if all {
                g.dirty.clear();
                (0..PAGES).collect()
            } else {
                std::mem::take(&mut g.dirty).into_iter().collect()
            };
            batch(&g.mem, pages)
        };
        let n = b.len() as u64;
        out(b)?;
        Ok(n)
    }

    fn checkpoint(&mut self, epoch: u64, verify: bool) -> Result<Capture, VmOpError> {
        Ok(self.capture(epoch, verify))
    }

    fn checkpoint_paused(&mut self, epoch: u64, verify: bool) -> Result<Capture, VmOpError> {
        let c = self.capture(epoch, verify);
        lock(&self.0).paused = true;
        Ok(c)
    }

    fn resume(&mut self) -> Result<(), VmOpError> {
        lock(&self.0).paused = false;
        Ok(())
    }
}

fn block_hashes(disk: &[u8], block: u32) -> Vec<u64> {
    disk.chunks(block as usize)
        .map(|b| {
            let mut s = DefaultHasher::new();
            b.hash(&mut s);
            s.finish()
        })
        .collect()
}

struct FakeDisks(SharedGuest);

impl PrimaryDisks for FakeDisks {
    fn capacities(&self) -> Vec<u64> {
        vec![DISK]
    }

    fn track(&mut self, _block: u32) {
        lock(&self.0).tracking_disk = true;
    }

    fn hashes(&mut self, _disk: usize, block: u32) -> io::Result<Vec<u64>> {
        Ok(block_hashes(&lock(&self.0).disk, block))
    }

    fn read(&mut self, _disk: usize, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let g = lock(&self.0);
        buf.copy_from_slice(&g.disk[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn take_tracked(&mut self) -> Vec<(usize, u64)> {
        let mut g = lock(&self.0);
        g.tracking_disk = false;
        std::mem::take(&mut g.tracked)
            .into_iter()
            .map(|b| (0, b))
            .collect()
    }

    fn forward(&mut self, epoch: u64, sink: DiskWriteSink) {
        let mut g = lock(&self.0);
        assert!(g.paused, "forward() with the guest running");
        g.epoch = epoch;
        g.sink = Some(sink);
    }

    fn stop(&mut self) {
        let mut g = lock(&self.0);
        g.sink = None;
        g.forwarding_stopped = true;
    }
}

/// The replica: memory, state and disk, with the writes held per epoch.
#[derive(Default)]
struct Replica {
    mem: Vec<u8>,
    state: Vec<u8>,
    disk: Vec<u8>,
    staged: Vec<DiskWrite>,
    committed: Option<u64>,
    discarded: usize,
    took_over: bool,
    loads: u64,
    /// Loads ignore the pages (a replica missing dirty pages).
    lose_pages: bool,
}

type SharedReplica = Arc<Mutex<Replica>>;

fn replica() -> SharedReplica {
    // The replica's disk differs from the primary's in block 2 only.
    let mut disk = pattern(DISK, 2);
    disk[2 * 65536 + 100] ^= 0xff;
    Arc::new(Mutex::new(Replica {
        mem: vec![0; MEM as usize],
        disk,
        ..Replica::default()
    }))
}

struct FakeReplica(SharedReplica, Identity);

fn write_pages(mem: &mut [u8], pages: &PageBatch) {
    for (i, &a) in pages.addrs.iter().enumerate() {
        let src = &pages.data[i * PAGE_SIZE as usize..(i + 1) * PAGE_SIZE as usize];
        mem[a as usize..(a + PAGE_SIZE) as usize].copy_from_slice(src);
    }
}

impl ReplicaVm for FakeReplica {
    fn identity(&self) -> Identity {
        self.1.clone()
    }

    fn write_pages(&mut self, pages: &PageBatch) -> Result<(), VmOpError> {
        write_pages(&mut lock(&self.0).mem, pages);
        Ok(())
    }

    fn load(&mut self, pages: PageBatch, state: Vec<u8>) -> Result<(), VmOpError> {
        let mut r = lock(&self.0);
        if !r.lose_pages {
            write_pages(&mut r.mem, &pages);
        }
        r.state = state;
        r.loads += 1;
        Ok(())
    }

    fn digest(&mut self) -> Result<StateDigest, VmOpError> {
        let r = lock(&self.0);
        Ok(digest(&r.mem, &r.state))
    }

    fn take_over(&mut self) -> Result<(), VmOpError> {
        lock(&self.0).took_over = true;
        Ok(())
    }
}

struct FakeReplicaDisks(SharedReplica);

impl ReplicaDisks for FakeReplicaDisks {
    fn capacities(&self) -> Vec<u64> {
        vec![DISK]
    }

    fn hashes(&mut self, _disk: usize, block: u32) -> io::Result<Vec<u64>> {
        Ok(block_hashes(&lock(&self.0).disk, block))
    }

    fn write_direct(&mut self, _disk: usize, offset: u64, data: &[u8]) -> io::Result<()> {
        lock(&self.0).disk[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        lock(&self.0).committed = Some(0);
        Ok(())
    }

    fn stage(&mut self, write: DiskWrite) -> io::Result<()> {
        lock(&self.0).staged.push(write);
        Ok(())
    }

    fn commit(&mut self, epoch: u64) -> io::Result<()> {
        let mut r = lock(&self.0);
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut r.staged)
            .into_iter()
            .partition(|w| w.epoch <= epoch);
        for w in now {
            let at = w.offset as usize;
            r.disk[at..at + w.data.len()].copy_from_slice(&w.data);
        }
        r.staged = later;
        r.committed = Some(epoch);
        Ok(())
    }

    fn discard_uncommitted(&mut self) {
        let mut r = lock(&self.0);
        r.discarded += r.staged.len();
        r.staged.clear();
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Release {
    Epoch(u64),
    All,
}

/// Records releases; each must find its epoch committed on the replica.
struct FakeOutput {
    log: Arc<Mutex<Vec<Release>>>,
    replica: SharedReplica,
    early: Arc<Mutex<Vec<u64>>>,
}

impl OutputControl for FakeOutput {
    fn release(&mut self, epoch: u64) {
        if lock(&self.replica).committed.is_none_or(|c| c < epoch) {
            lock(&self.early).push(epoch);
        }
        lock(&self.log).push(Release::Epoch(epoch));
    }

    fn release_all(&mut self) {
        lock(&self.log).push(Release::All);
    }

    fn held(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// A pair and what the test watches.
struct Pair {
    guest: SharedGuest,
    replica: SharedReplica,
    primary: Arc<PrimaryHandle>,
    secondary: Arc<SecondaryHandle>,
    releases: Arc<Mutex<Vec<Release>>>,
    early: Arc<Mutex<Vec<u64>>>,
    fatal: Arc<Mutex<Vec<String>>>,
}

struct Options {
    failover: Failover,
    secondary_identity: Identity,
    checkpoint_ms: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            failover: Failover::Manual,
            secondary_identity: identity(MEM, 2),
            checkpoint_ms: 5,
        }
    }
}

fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind")
}

fn start_secondary(
    listener: TcpListener,
    o: &Options,
) -> (Arc<SecondaryHandle>, SharedReplica, Arc<Mutex<Vec<String>>>) {
    let replica = replica();
    let fatal = Arc::new(Mutex::new(Vec::new()));
    let f = fatal.clone();
    let mut config = SecondaryConfig::new(Box::new(move |msg| lock(&f).push(msg)));
    config.failover = o.failover;
    config.heartbeat_timeout_ms = 500;
    let handle = secondary::start(
        config,
        listener,
        Box::new(FakeReplica(replica.clone(), o.secondary_identity.clone())),
        Box::new(FakeReplicaDisks(replica.clone())),
    )
    .expect("secondary starts");
    (handle, replica, fatal)
}

/// Starts a pair; the primary connects to `via` (a relay) or straight
/// to the secondary.
fn pair(o: Options, via: Option<fn(SocketAddr) -> SocketAddr>) -> Pair {
    let l = listener();
    let target = l.local_addr().expect("addr");
    let (secondary, replica, fatal) = start_secondary(l, &o);
    assert_eq!(
        secondary.failover(),
        Err(colo::control::CommandError::Conflict(
            "no checkpoint loaded yet: nothing to take over from".into()
        ))
    );
    let peer = via.map_or(target, |relay| relay(target));
    let guest = guest();
    let releases = Arc::new(Mutex::new(Vec::new()));
    let early = Arc::new(Mutex::new(Vec::new()));
    let mut config = PrimaryConfig::new(peer.to_string());
    config.checkpoint_ms = o.checkpoint_ms;
    config.verify = true;
    config.heartbeat_ms = 20;
    config.heartbeat_timeout_ms = 600;
    let primary = primary::start(
        config,
        Box::new(FakeVm(guest.clone())),
        Box::new(FakeDisks(guest.clone())),
        Box::new(FakeOutput {
            log: releases.clone(),
            replica: replica.clone(),
            early: early.clone(),
        }),
    )
    .expect("primary starts");
    Pair {
        guest,
        replica,
        primary,
        secondary,
        releases,
        early,
        fatal,
    }
}

impl Pair {
    /// Waits until `f` holds for the two statuses; panics with them
    /// after 5 s.
    fn wait(&self, what: &str, f: impl Fn(&Status, &Status) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (p, s) = (self.primary.status(), self.secondary.status());
            if f(&p, &s) {
                return;
            }
            assert!(Instant::now() < deadline, "not {what}: {p:?} {s:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn protected(&self) {
        self.wait("protected", |p, s| {
            p.state == State::Protected && s.state == State::Protected
        });
    }

    /// Waits until `epoch` is committed on the secondary.
    fn settle(&self, epoch: u64) {
        self.wait("acked", |p, _| p.epoch >= epoch);
    }

    fn assert_equal(&self) {
        let g = lock(&self.guest);
        let r = lock(&self.replica);
        assert!(g.mem == r.mem, "replica memory differs");
        assert_eq!(g.state, r.state);
        assert!(g.disk == r.disk, "replica disk differs");
    }
}

#[test]
fn a_session_replicates_memory_state_and_disks() {
    let p = pair(Options::default(), None);
    p.protected();
    let s = p.primary.status();
    assert_eq!(s.sync_pages, PAGES, "pre-copy sent all memory once");
    assert_eq!(s.sync_disk_bytes, 65536, "only the differing block is sent");
    assert_eq!(p.secondary.status().sync_disk_bytes, 65536);
    for n in 1..=20 {
        let epoch = act(&p.guest, n);
        if n % 5 == 0 {
            p.primary.checkpoint().expect("a checkpoint on request");
            p.settle(epoch);
            p.assert_equal();
        }
    }
    p.primary.set_checkpoint_ms(1).expect("interval");
    assert!(p.primary.set_checkpoint_ms(0).is_err());
    let epoch = act(&p.guest, 21);
    p.settle(epoch);
    p.assert_equal();

    let status = p.primary.status();
    assert!(status.checkpoints >= 4, "{status:?}");
    // The secondary commits before the primary hears of it.
    assert!(p.secondary.status().epoch >= status.epoch);
    assert!(
        lock(&p.early).is_empty(),
        "released before commit: {:?}",
        lock(&p.early)
    );
    let releases = lock(&p.releases).clone();
    assert!(releases.contains(&Release::Epoch(status.epoch)));
    assert!(!releases.contains(&Release::All));
    let m = p.primary.metrics();
    // Read after the status, and checkpoints go on: at least as many.
    assert!(m.pause.count >= status.checkpoints && m.pause.count > 0);
    assert!(m.checkpoint_bytes > 0);
    assert_eq!(p.secondary.checkpoint().map_err(|_| ()), Err(()));
}

#[test]
fn a_failover_on_the_primary_drops_the_secondary_without_a_takeover() {
    let p = pair(Options::default(), None);
    p.protected();
    p.primary.failover().expect("failover");
    wait_for("the secondary to stop", || {
        p.secondary.status().state == State::Stopped
    });
    let s = p.secondary.status();
    assert!(
        s.error
            .as_deref()
            .is_some_and(|e| e.contains("the primary ended replication")),
        "{s:?}"
    );
    wait_for("the primary to run alone", || {
        p.primary.status().state == State::Unprotected
    });
    assert!(!lock(&p.replica).took_over);
    assert!(lock(&p.releases).contains(&Release::All));
    assert_eq!(
        p.primary.checkpoint().map_err(|_| ()),
        Err(()),
        "no checkpoint when unprotected"
    );
}

/// A TCP relay between primary and secondary that can flip a byte of the
/// data connection, freeze (stop forwarding, keep the sockets), or cut.
struct Relay {
    flip: AtomicBool,
    frozen: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
}

static RELAY: Mutex<Option<Arc<Relay>>> = Mutex::new(None);

fn relay_to(target: SocketAddr) -> SocketAddr {
    let relay = Arc::new(Relay {
        flip: AtomicBool::new(false),
        frozen: AtomicBool::new(false),
        conns: Mutex::new(Vec::new()),
    });
    let l = listener();
    let addr = l.local_addr().expect("addr");
    let r = relay.clone();
    std::thread::spawn(move || {
        for (i, from) in l.incoming().enumerate() {
            let Ok(from) = from else { return };
            let Ok(to) = TcpStream::connect(target) else {
                return;
            };
            for s in [&from, &to] {
                s.set_nodelay(true).expect("nodelay");
                lock(&r.conns).push(s.try_clone().expect("clone"));
            }
            // Only the first connection (data) flips, primary -> secondary.
            pump(r.clone(), &from, &to, i == 0);
            pump(r.clone(), &to, &from, false);
        }
    });
    *lock(&RELAY) = Some(relay);
    addr
}

fn pump(r: Arc<Relay>, from: &TcpStream, to: &TcpStream, flips: bool) {
    let mut from = from.try_clone().expect("clone");
    let mut to = to.try_clone().expect("clone");
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            while r.frozen.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            if flips && r.flip.swap(false, Ordering::SeqCst) {
                buf[n - 1] ^= 0x10;
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

fn relay() -> Arc<Relay> {
    lock(&RELAY).clone().expect("a relay")
}

/// Tests that use the relay run one at a time (it is a global).
static RELAY_TESTS: Mutex<()> = Mutex::new(());

#[test]
fn a_flipped_byte_ends_replication_and_leaves_the_last_checkpoint() {
    let _one = lock(&RELAY_TESTS);
    let p = pair(Options::default(), Some(relay_to));
    let relay = relay();
    p.protected();
    let epoch = act(&p.guest, 1);
    p.settle(epoch);
    p.assert_equal();
    let (mem, state, disk) = {
        let r = lock(&p.replica);
        (r.mem.clone(), r.state.clone(), r.disk.clone())
    };
    relay.flip.store(true, Ordering::SeqCst);
    act(&p.guest, 2);
    wait_for("the secondary to stop", || {
        p.secondary.status().state == State::Stopped
    });
    let err = p.secondary.status().error.expect("an error");
    assert!(
        ["CRC", "magic", "truncated", "exceeds"]
            .iter()
            .any(|cause| err.contains(cause)),
        "{err}"
    );
    wait_for("the primary to run alone", || {
        p.primary.status().state == State::Unprotected
    });
    let perr = p.primary.status().error.expect("an error");
    assert!(perr.contains("the secondary ended replication"), "{perr}");
    let r = lock(&p.replica);
    assert!(
        r.mem == mem && r.state == state && r.disk == disk,
        "the replica changed"
    );
    assert!(!r.took_over);
    assert!(lock(&p.releases).contains(&Release::All));
}

#[test]
fn a_silent_primary_is_taken_over_with_uncommitted_writes_discarded() {
    let _one = lock(&RELAY_TESTS);
    let o = Options {
        failover: Failover::Auto,
        checkpoint_ms: 60_000,
        ..Options::default()
    };
    let p = pair(o, Some(relay_to));
    let relay = relay();
    p.protected();
    let committed_disk = lock(&p.replica).disk.clone();
    // A write of epoch 1, held on the secondary, never committed.
    act(&p.guest, 3);
    wait_for("the write to be staged", || {
        !lock(&p.replica).staged.is_empty()
    });
    relay.frozen.store(true, Ordering::SeqCst);
    wait_for("the takeover", || {
        p.secondary.status().state == State::FailedOver
    });
    let r = lock(&p.replica);
    assert!(r.took_over);
    assert_eq!(r.discarded, 1);
    assert!(
        r.disk == committed_disk,
        "an uncommitted write reached the disk"
    );
    drop(r);
    assert_eq!(p.secondary.metrics().failovers, 1);
    assert!(p
        .secondary
        .status()
        .error
        .is_some_and(|e| e.contains("no heartbeat")));
    assert!(p.secondary.failover().is_err(), "a second failover");
    wait_for("the primary to run alone", || {
        p.primary.status().state == State::Unprotected
    });
    assert!(lock(&p.releases).contains(&Release::All));
    relay.frozen.store(false, Ordering::SeqCst);
}

#[test]
fn a_dead_secondary_leaves_the_primary_unprotected_with_output_released() {
    let _one = lock(&RELAY_TESTS);
    let p = pair(Options::default(), Some(relay_to));
    let relay = relay();
    p.protected();
    let epoch = act(&p.guest, 4);
    p.settle(epoch);
    for s in lock(&relay.conns).drain(..) {
        let _ = s.shutdown(Shutdown::Both);
    }
    wait_for("the primary to run alone", || {
        p.primary.status().state == State::Unprotected
    });
    assert!(lock(&p.releases).contains(&Release::All));
    assert!(lock(&p.guest).forwarding_stopped);
    assert!(p.primary.status().error.is_some());
    // Manual failover: the secondary waits for the command, then takes over.
    wait_for("the secondary to notice", || {
        p.secondary.status().state == State::Stopped
    });
    assert!(!lock(&p.replica).took_over);
    p.secondary.failover().expect("failover on command");
    assert!(lock(&p.replica).took_over);
    assert_eq!(p.secondary.status().state, State::FailedOver);
}

#[test]
fn a_mismatched_secondary_is_refused_with_the_differences_named() {
    let o = Options {
        secondary_identity: identity(2 * MEM, 1),
        ..Options::default()
    };
    let p = pair(o, None);
    wait_for("the refusal", || !lock(&p.fatal).is_empty());
    let fatal = lock(&p.fatal)[0].clone();
    for diff in [
        "memory: primary 1 MiB, secondary 2 MiB",
        "vCPUs: primary 2, secondary 1",
    ] {
        assert!(fatal.contains(diff), "{fatal}");
    }
    wait_for("the primary to give up", || {
        p.primary.status().error.is_some()
    });
    let s = p.primary.status();
    assert_eq!(s.state, State::Unprotected);
    assert!(
        s.error
            .as_deref()
            .is_some_and(|e| e.contains("memory: primary 1 MiB")),
        "{s:?}"
    );
    assert_eq!(p.secondary.status().state, State::Stopped);
    assert_eq!(lock(&p.replica).loads, 0);
}

#[test]
fn the_primary_refuses_a_secondary_it_sees_differ() {
    // A fake secondary that accepts anything and answers with its own
    // (different) identity: the primary must refuse on its side.
    let l = listener();
    let addr = l.local_addr().expect("addr");
    let fake = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let Message::Hello(h) = wire::read_message(&mut s).expect("hello") else {
            panic!("not a hello")
        };
        let welcome = Welcome {
            version: h.version + 1,
            mode: Mode::Colo,
            identity: Identity {
                disks: vec![DISK / 2],
                ..h.identity
            },
        };
        wire::write_message(&mut s, &Message::Welcome(welcome)).expect("welcome");
        wire::read_message(&mut s).expect("the primary's answer")
    });
    let g = guest();
    let replica = replica();
    let primary = primary::start(
        PrimaryConfig::new(addr.to_string()),
        Box::new(FakeVm(g.clone())),
        Box::new(FakeDisks(g.clone())),
        Box::new(FakeOutput {
            log: Arc::default(),
            replica,
            early: Arc::default(),
        }),
    )
    .expect("primary");
    let answer = fake.join().expect("fake secondary");
    let Message::Refused { reason } = answer else {
        panic!("{answer:?}")
    };
    for diff in [
        "protocol version: primary 1, secondary 2",
        "mode: primary Remus, secondary Colo",
        "disk 0: primary 256 KiB",
    ] {
        let diff = diff.replace("256 KiB", "262144 bytes");
        assert!(reason.contains(&diff), "{reason}");
    }
    wait_for("the primary to give up", || {
        primary.status().error.is_some()
    });
    assert_eq!(primary.status().error.as_deref(), Some(reason.as_str()));
    assert_eq!(primary.status().state, State::Unprotected);
}

#[test]
fn a_checkpoint_whose_hash_differs_stops_replication_naming_the_part() {
    let p = pair(Options::default(), None);
    p.protected();
    lock(&p.replica).lose_pages = true;
    act(&p.guest, 5);
    wait_for("the secondary to stop", || {
        p.secondary.status().state == State::Stopped
    });
    let err = p.secondary.status().error.expect("an error");
    assert!(
        err.contains("state hash differs") && err.contains("(parts: memory)"),
        "{err}"
    );
    wait_for("the primary to run alone", || {
        p.primary.status().state == State::Unprotected
    });
    let perr = p.primary.status().error.expect("an error");
    assert!(
        perr.contains("the secondary ended replication: checkpoint"),
        "{perr}"
    );
    // The last good checkpoint can still be taken over.
    p.secondary.failover().expect("failover");
}

#[test]
fn held_bytes_over_the_bound_take_a_checkpoint() {
    let o = Options {
        checkpoint_ms: 60_000,
        ..Options::default()
    };
    let p = pair(o, None);
    p.protected();
    let epoch = act(&p.guest, 6);
    p.primary
        .request_checkpoint(colo::control::Cause::HeldBytes);
    p.settle(epoch);
    p.assert_equal();
    let m = p.primary.metrics();
    let held: Vec<_> = m.checkpoints.iter().filter(|(_, n)| *n > 0).collect();
    assert_eq!(held, [&(colo::control::Cause::HeldBytes, 1)]);
    assert_eq!(m.transfer.count, 1);
}

#[test]
fn the_secondary_exits_when_the_primary_refuses_it() {
    // A fake primary that says hello, then refuses whatever comes back.
    let l = listener();
    let addr = l.local_addr().expect("addr");
    let (secondary, replica, fatal) = start_secondary(l, &Options::default());
    // A stray connection first: garbage is ignored, the wait goes on.
    TcpStream::connect(addr)
        .expect("connect")
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .expect("garbage");
    let mut s = TcpStream::connect(addr).expect("connect");
    let hello = wire::Hello {
        version: wire::PROTOCOL_VERSION,
        mode: Mode::Remus,
        session: 9,
        identity: identity(MEM, 2),
    };
    wire::write_message(&mut s, &Message::Hello(hello)).expect("hello");
    let welcome = wire::read_message(&mut s).expect("welcome");
    assert!(matches!(welcome, Message::Welcome(_)), "{welcome:?}");
    let reason = "the secondary differs: CPUID hash: primary 1, secondary 2".to_string();
    wire::write_message(&mut s, &Message::Refused { reason }).expect("refused");
    wait_for("the secondary to give up", || !lock(&fatal).is_empty());
    assert_eq!(
        lock(&fatal)[0],
        "the primary refused replication: the secondary differs: CPUID hash: primary 1, secondary 2"
    );
    assert_eq!(secondary.status().state, State::Stopped);
    assert_eq!(lock(&replica).loads, 0);
}
