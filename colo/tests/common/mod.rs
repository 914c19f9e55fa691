//! A replication pair over loopback TCP for the engine tests: a fake
//! guest on the primary (memory, state and disks in plain vectors, the
//! test writing to them; its output held in net-proxy's real output
//! buffer) and a fake replica on the secondary. Every checkpoint the
//! primary captures and everything the replica holds at each release is
//! recorded, so tests compare the two.

// Each test file uses its own subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use colo::control::{Control, Mode, ProxyStats, State, Status};
use colo::primary::{self, PrimaryConfig, PrimaryHandle};
use colo::secondary::{self, Failover, SecondaryConfig, SecondaryHandle};
use colo::vm::{
    Capture, CheckpointAsk, DiskWrite, DiskWriteSink, FrameSink, Identity, OutputControl,
    PageBatch, PeerFrame, PrimaryDisks, PrimaryVm, ReplicaDisks, ReplicaVm, StateDigest, VmOpError,
};
use colo::PAGE_SIZE;
use net_proxy::output::{OutputBuffer, Push};

pub const PAGES: u64 = 256;
pub const MEM: u64 = PAGES * PAGE_SIZE;
pub const DISK: u64 = 4 * 64 * 1024;

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `f` until true; panics naming `what` after 5 s.
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until `side` is in `state`; panics with its status after 5 s.
pub fn wait_state(side: &dyn Control, state: State) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = side.status();
        if s.state == state {
            return;
        }
        assert!(Instant::now() < deadline, "not {}: {s:?}", state.name());
        std::thread::sleep(Duration::from_millis(2));
    }
}

static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Records panics of the engines' threads (named "colo-..."), which no
/// test thread would see otherwise.
fn watch_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            let name = thread.name().unwrap_or_default();
            if name.starts_with("colo-") {
                lock(&PANICS).push(format!("{name}: {info}"));
            }
            default(info);
        }));
    });
}

/// Panics of the engines' threads so far, in any test of this binary.
pub fn engine_panics() -> Vec<String> {
    lock(&PANICS).clone()
}

pub fn identity(mem_size: u64, vcpus: u8) -> Identity {
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

/// CRC32 (built optimised even in dev builds): tests hash megabytes
/// per checkpoint.
fn hash(b: &[u8]) -> u64 {
    u64::from(crc32fast::hash(b))
}

fn digest(mem: &[u8], state: &[u8]) -> StateDigest {
    let parts = vec![
        ("memory".to_string(), hash(mem)),
        ("state".to_string(), hash(state)),
    ];
    StateDigest {
        hash: hash(&[hash(mem).to_le_bytes(), hash(state).to_le_bytes()].concat()),
        parts,
    }
}

pub fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// What a side holds at one moment: memory and disk by hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub mem: u64,
    pub state: Vec<u8>,
    pub disk: u64,
}

fn image(mem: &[u8], state: &[u8], disk: &[u8]) -> Image {
    Image {
        mem: hash(mem),
        state: state.to_vec(),
        disk: hash(disk),
    }
}

/// The primary's guest: what the fake VM, disks and output share.
pub struct Guest {
    pub mem: Vec<u8>,
    dirty: BTreeSet<u64>,
    pub state: Vec<u8>,
    pub disk: Vec<u8>,
    /// The epoch the guest's actions belong to now.
    pub epoch: u64,
    sink: Option<DiskWriteSink>,
    tracked: BTreeSet<u64>,
    tracking_disk: bool,
    pub forwarding_stopped: bool,
    paused: bool,
    /// The guest's output, held per epoch as `vmm` holds it.
    output: OutputBuffer,
    /// Every frame the guest sent, with the epoch it belongs to.
    pub frames: Vec<(u64, Vec<u8>)>,
    /// Frames out of the buffer, in the order they went out.
    pub wire: Vec<Vec<u8>>,
    /// What each checkpoint captured: (epoch, image at the capture).
    pub captures: Vec<(u64, Image)>,
}

pub type SharedGuest = Arc<Mutex<Guest>>;

pub fn guest(held_bytes_max: u64) -> SharedGuest {
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
        output: OutputBuffer::new(held_bytes_max),
        frames: Vec::new(),
        wire: Vec::new(),
        captures: Vec::new(),
    }))
}

impl Guest {
    fn running(&self) {
        assert!(!self.paused, "the guest acts while paused");
    }

    /// Writes `bytes` at guest-physical `at`.
    pub fn write_mem(&mut self, at: u64, bytes: &[u8]) {
        self.running();
        let at = at as usize;
        self.mem[at..at + bytes.len()].copy_from_slice(bytes);
        let (first, last) = (
            at as u64 / PAGE_SIZE,
            (at + bytes.len() - 1) as u64 / PAGE_SIZE,
        );
        self.dirty.extend(first..=last);
    }

    /// Writes `data` to the disk at `offset`, and forwards it while
    /// replicating.
    pub fn write_disk(&mut self, offset: u64, data: Vec<u8>) {
        self.running();
        let at = offset as usize;
        self.disk[at..at + data.len()].copy_from_slice(&data);
        if self.tracking_disk {
            let block = u64::from(colo::SYNC_BLOCK);
            let last = offset + data.len() as u64 - 1;
            self.tracked.extend(offset / block..=last / block);
        }
        if let Some(sink) = &self.sink {
            let w = DiskWrite {
                epoch: self.epoch,
                disk: 0,
                offset,
                data,
            };
            // Refused once replication ended: the guest runs on alone.
            let _ = sink(w);
        }
    }

    pub fn set_state(&mut self, state: Vec<u8>) {
        self.running();
        self.state = state;
    }

    /// Sends `frame`; true when the held output is now over its bound.
    pub fn emit(&mut self, frame: Vec<u8>) -> bool {
        self.running();
        self.frames.push((self.epoch, frame.clone()));
        match self.output.push(frame) {
            Push::Pass(frame) => {
                self.wire.push(frame);
                false
            }
            Push::Held { over_bound } => over_bound,
        }
    }
}

/// The guest runs: writes memory, state and disk. Returns the epoch
/// these belong to.
pub fn act(g: &SharedGuest, n: u8) -> u64 {
    let mut g = lock(g);
    let page = (u64::from(n) * 7) % PAGES;
    g.write_mem(page * PAGE_SIZE + u64::from(n), &[n; 8]);
    g.set_state(format!("state {n}").into_bytes());
    g.write_disk((u64::from(n) * 4096) % DISK, vec![n; 512]);
    g.epoch
}

pub struct FakeVm(SharedGuest);

impl FakeVm {
    /// Closes epoch `epoch` (output and disk writes) and takes what
    /// changed, as `vmm` does with the guest paused.
    fn capture(&mut self, epoch: u64, verify: bool) -> Result<Capture, VmOpError> {
        let mut g = lock(&self.0);
        if g.output.holding() {
            g.output.close_epoch(epoch).map_err(VmOpError::new)?;
        } else {
            g.output.hold_from(epoch + 1);
        }
        g.epoch = epoch + 1;
        let dirty = std::mem::take(&mut g.dirty);
        let taken = image(&g.mem, &g.state, &g.disk);
        g.captures.push((epoch, taken));
        Ok(Capture {
            pages: batch(&g.mem, dirty),
            state: g.state.clone(),
            digest: verify.then(|| digest(&g.mem, &g.state)),
            paused_for: Duration::from_micros(50),
        })
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
        self.capture(epoch, verify)
    }

    fn checkpoint_paused(&mut self, epoch: u64, verify: bool) -> Result<Capture, VmOpError> {
        let c = self.capture(epoch, verify)?;
        lock(&self.0).paused = true;
        Ok(c)
    }

    fn resume(&mut self) -> Result<(), VmOpError> {
        lock(&self.0).paused = false;
        Ok(())
    }
}

fn block_hashes(disk: &[u8], block: u32) -> Vec<u64> {
    disk.chunks(block as usize).map(hash).collect()
}

pub struct FakeDisks(SharedGuest);

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

/// A call of the fakes that COLO cares about, in the order both sides
/// made them (one log for the pair).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ev {
    /// Secondary: checkpoint N loaded, its disk writes committed, the
    /// SVM run from it.
    Load(u64),
    Commit(u64),
    Run(u64),
    /// Primary: epoch N's output released (after Ack(N)).
    Release(u64),
    /// Secondary: failover.
    TakeOverDisks,
    TakeOverVm,
    /// Secondary: `colo_net`; primary: `output.mirror`.
    ColoNet,
    Mirror,
}

/// What the COLO methods of the fakes saw and were given.
#[derive(Default)]
pub struct Colo {
    pub events: Vec<Ev>,
    /// Primary: the sink `output.mirror` got (the test pushes client
    /// frames into it as the PVM's NIC would).
    pub mirror_sink: Option<FrameSink>,
    /// Primary: what `output.secondary_frame` got.
    pub from_secondary: Vec<PeerFrame>,
    /// Secondary: what `colo_net` got (the test sends SVM frames and
    /// asks with them).
    pub out: Option<FrameSink>,
    pub ask: Option<CheckpointAsk>,
    /// Secondary: what the inbound sink `colo_net` returned got.
    pub inbound: Vec<PeerFrame>,
    /// Secondary: `run(N)` fails for this N.
    pub fail_run: Option<u64>,
    /// Secondary: what `proxy_stats` says.
    pub svm_stats: ProxyStats,
}

pub type SharedColo = Arc<Mutex<Colo>>;

fn record(colo: &SharedColo, ev: Ev) {
    lock(colo).events.push(ev);
}

/// The replica: memory, state and disk, with the writes held per epoch.
#[derive(Default)]
pub struct Replica {
    pub mem: Vec<u8>,
    pub state: Vec<u8>,
    pub disk: Vec<u8>,
    pub staged: Vec<DiskWrite>,
    pub committed: Option<u64>,
    pub discarded: usize,
    /// Calls of `take_over`.
    pub take_overs: u32,
    pub loads: u64,
    /// Loads ignore the pages (a replica missing dirty pages).
    pub lose_pages: bool,
    /// The next load says it started on the first, then waits for the
    /// second.
    pub hold_next_load: Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>,
    /// The COLO log of the pair.
    pub colo: SharedColo,
}

impl Replica {
    pub fn image(&self) -> Image {
        image(&self.mem, &self.state, &self.disk)
    }
}

pub type SharedReplica = Arc<Mutex<Replica>>;

pub fn replica() -> SharedReplica {
    // The replica's disk differs from the primary's in block 2 only.
    let mut disk = pattern(DISK, 2);
    disk[2 * 65536 + 100] ^= 0xff;
    Arc::new(Mutex::new(Replica {
        mem: vec![0; MEM as usize],
        disk,
        ..Replica::default()
    }))
}

struct FakeReplica(SharedReplica, Identity, SharedColo);

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
        let hold = lock(&self.0).hold_next_load.take();
        if let Some((started, go_on)) = hold {
            let _ = started.send(());
            let _ = go_on.recv();
        }
        let mut r = lock(&self.0);
        if !r.lose_pages {
            write_pages(&mut r.mem, &pages);
        }
        r.state = state;
        r.loads += 1;
        record(&self.2, Ev::Load(r.loads - 1));
        Ok(())
    }

    fn digest(&mut self) -> Result<StateDigest, VmOpError> {
        let r = lock(&self.0);
        Ok(digest(&r.mem, &r.state))
    }

    fn take_over(&mut self) -> Result<(), VmOpError> {
        lock(&self.0).take_overs += 1;
        record(&self.2, Ev::TakeOverVm);
        Ok(())
    }

    fn colo_net(&mut self, out: FrameSink, ask: CheckpointAsk) -> Result<FrameSink, VmOpError> {
        let mut c = lock(&self.2);
        c.events.push(Ev::ColoNet);
        c.out = Some(out);
        c.ask = Some(ask);
        let colo = self.2.clone();
        Ok(Arc::new(move |f| {
            lock(&colo).inbound.push(f);
            Ok(())
        }))
    }

    fn run(&mut self, epoch: u64) -> Result<(), VmOpError> {
        let mut c = lock(&self.2);
        c.events.push(Ev::Run(epoch));
        if c.fail_run == Some(epoch) {
            return Err(VmOpError("the SVM would not run".into()));
        }
        Ok(())
    }

    fn proxy_stats(&self) -> ProxyStats {
        lock(&self.2).svm_stats
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
        let mut r = lock(&self.0);
        r.committed = Some(0);
        record(&r.colo, Ev::Commit(0));
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
        record(&r.colo, Ev::Commit(epoch));
        Ok(())
    }

    fn take_over(&mut self) -> std::io::Result<()> {
        let mut r = lock(&self.0);
        r.discarded += r.staged.len();
        r.staged.clear();
        record(&r.colo, Ev::TakeOverDisks);
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Release {
    Epoch(u64),
    All,
}

/// One `release(epoch)`: what the replica held then, and how many frames
/// had gone out once the epoch's were released.
#[derive(Clone, Debug)]
pub struct Acked {
    pub epoch: u64,
    pub replica: Image,
    pub sent: usize,
}

/// The guest's output buffer as the engine sees it. Records each release
/// and what the replica held at that moment.
struct FakeOutput {
    guest: SharedGuest,
    replica: SharedReplica,
    log: Arc<Mutex<Vec<Release>>>,
    acked: Arc<Mutex<Vec<Acked>>>,
    /// Epochs released before the replica committed them.
    early: Arc<Mutex<Vec<u64>>>,
    colo: SharedColo,
}

impl OutputControl for FakeOutput {
    fn release(&mut self, epoch: u64) {
        let (committed, replica) = {
            let r = lock(&self.replica);
            (r.committed, r.image())
        };
        if committed.is_none_or(|c| c < epoch) {
            lock(&self.early).push(epoch);
        }
        let sent = {
            let mut g = lock(&self.guest);
            let frames = g.output.release_through(epoch);
            g.wire.extend(frames);
            g.wire.len()
        };
        lock(&self.acked).push(Acked {
            epoch,
            replica,
            sent,
        });
        lock(&self.log).push(Release::Epoch(epoch));
        record(&self.colo, Ev::Release(epoch));
    }

    fn release_all(&mut self) {
        {
            let mut g = lock(&self.guest);
            let frames = g.output.release_all();
            g.wire.extend(frames);
        }
        lock(&self.log).push(Release::All);
    }

    fn held(&self) -> (u64, u64) {
        let g = lock(&self.guest);
        (g.output.held_frames(), g.output.held_bytes())
    }

    fn mirror(&mut self, sink: FrameSink) {
        let mut c = lock(&self.colo);
        c.events.push(Ev::Mirror);
        c.mirror_sink = Some(sink);
    }

    fn secondary_frame(&mut self, frame: PeerFrame) {
        lock(&self.colo).from_secondary.push(frame);
    }

    fn proxy_stats(&self) -> ProxyStats {
        ProxyStats {
            compared_frames: 7,
            ..ProxyStats::default()
        }
    }
}

/// A TCP relay between primary and secondary that can flip a byte of the
/// data connection, freeze (stop forwarding, keep the sockets), cut, or
/// hold back the connections after the first (the heartbeat): accepted
/// from the primary, not yet passed on to the secondary.
pub struct Relay {
    pub flip: AtomicBool,
    /// Flip a byte of the mirror connection (the third), primary ->
    /// secondary, or secondary -> primary.
    pub flip_mirror: AtomicBool,
    pub flip_mirror_back: AtomicBool,
    pub frozen: AtomicBool,
    pub hold_later: AtomicBool,
    /// The primary closed the data connection and the relay passed the
    /// close on to the secondary.
    pub data_closed: AtomicBool,
    /// The secondary answered on the heartbeat connection (the second):
    /// from then on a cut reaches its heartbeat thread as an end, not
    /// only its watchdog as silence.
    pub answered: AtomicBool,
    cut: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
}

impl Relay {
    /// Relays connections to `target`; returns the relay and its address.
    fn start(target: SocketAddr, hold_later: bool) -> (Arc<Relay>, SocketAddr) {
        let relay = Arc::new(Relay {
            flip: AtomicBool::new(false),
            flip_mirror: AtomicBool::new(false),
            flip_mirror_back: AtomicBool::new(false),
            frozen: AtomicBool::new(false),
            hold_later: AtomicBool::new(hold_later),
            data_closed: AtomicBool::new(false),
            answered: AtomicBool::new(false),
            cut: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let l = listener();
        let addr = l.local_addr().expect("addr");
        let r = relay.clone();
        std::thread::spawn(move || {
            for (i, from) in l.incoming().enumerate() {
                let Ok(from) = from else { return };
                while i > 0 && r.hold_later.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(2));
                }
                let Ok(to) = TcpStream::connect(target) else {
                    return;
                };
                for s in [&from, &to] {
                    s.set_nodelay(true).expect("nodelay");
                    lock(&r.conns).push(s.try_clone().expect("clone"));
                }
                pump(r.clone(), &from, &to, i, true);
                pump(r.clone(), &to, &from, i, false);
            }
        });
        (relay, addr)
    }

    /// Cuts every relayed connection, both ways, at once: nothing read
    /// after the first is cut goes through (a dead link, not a peer that
    /// closed one connection and spoke on the other).
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in lock(&self.conns).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Pumps connection `conn` (0 data, 1 heartbeat, 2 mirror) from `from`
/// to `to`, primary -> secondary when `forward`.
fn pump(r: Arc<Relay>, from: &TcpStream, to: &TcpStream, conn: usize, forward: bool) {
    let mut from = from.try_clone().expect("clone");
    let mut to = to.try_clone().expect("clone");
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            while r.frozen.load(Ordering::SeqCst) && !r.cut.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            if r.cut.load(Ordering::SeqCst) {
                break;
            }
            let flip = match (conn, forward) {
                (0, true) => Some(&r.flip),
                (2, true) => Some(&r.flip_mirror),
                (2, false) => Some(&r.flip_mirror_back),
                _ => None,
            };
            if flip.is_some_and(|f| f.swap(false, Ordering::SeqCst)) {
                buf[n - 1] ^= 0x10;
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            if (conn, forward) == (1, false) {
                r.answered.store(true, Ordering::SeqCst);
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        if (conn, forward) == (0, true) {
            r.data_closed.store(true, Ordering::SeqCst);
        }
    });
}

/// A pair and what the test watches.
pub struct Pair {
    pub guest: SharedGuest,
    pub replica: SharedReplica,
    pub primary: Arc<PrimaryHandle>,
    pub secondary: Arc<SecondaryHandle>,
    pub releases: Arc<Mutex<Vec<Release>>>,
    pub acked: Arc<Mutex<Vec<Acked>>>,
    pub early: Arc<Mutex<Vec<u64>>>,
    pub fatal: Arc<Mutex<Vec<String>>>,
    /// What the COLO methods saw, both sides.
    pub colo: SharedColo,
    /// Between the two when asked for.
    pub relay: Option<Arc<Relay>>,
}

pub struct Options {
    pub mode: Mode,
    pub failover: Failover,
    pub secondary_identity: Identity,
    pub checkpoint_ms: u64,
    pub held_bytes_max: u64,
    /// Connect the primary through a [`Relay`].
    pub relay: bool,
    /// Start the relay holding back the heartbeat connection
    /// ([`Relay::hold_later`]).
    pub hold_heartbeat: bool,
    /// The secondary's heartbeat timeout (the primary's is 100 ms more).
    pub heartbeat_timeout_ms: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            mode: Mode::Remus,
            failover: Failover::Manual,
            secondary_identity: identity(MEM, 2),
            checkpoint_ms: 5,
            held_bytes_max: primary::DEFAULT_HELD_BYTES_MAX,
            relay: false,
            hold_heartbeat: false,
            heartbeat_timeout_ms: 500,
        }
    }
}

pub fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind")
}

pub fn start_secondary(
    listener: TcpListener,
    o: &Options,
) -> (Arc<SecondaryHandle>, SharedReplica, Arc<Mutex<Vec<String>>>) {
    watch_panics();
    let replica = replica();
    let fatal = Arc::new(Mutex::new(Vec::new()));
    let f = fatal.clone();
    let mut config = SecondaryConfig::new(Box::new(move |msg| lock(&f).push(msg)));
    config.mode = o.mode;
    config.failover = o.failover;
    config.heartbeat_timeout_ms = o.heartbeat_timeout_ms;
    let colo = lock(&replica).colo.clone();
    let handle = secondary::start(
        config,
        listener,
        Box::new(FakeReplica(
            replica.clone(),
            o.secondary_identity.clone(),
            colo,
        )),
        Box::new(FakeReplicaDisks(replica.clone())),
    )
    .expect("secondary starts");
    (handle, replica, fatal)
}

/// Starts a primary that connects to `peer`.
pub fn start_primary(
    peer: SocketAddr,
    o: &Options,
    guest: &SharedGuest,
    replica: &SharedReplica,
) -> (Arc<PrimaryHandle>, FakeOutputLogs) {
    watch_panics();
    let logs = FakeOutputLogs::default();
    let mut config = PrimaryConfig::new(peer.to_string());
    config.mode = o.mode;
    config.checkpoint_ms = o.checkpoint_ms;
    config.verify = true;
    config.heartbeat_ms = 20;
    config.heartbeat_timeout_ms = o.heartbeat_timeout_ms + 100;
    config.held_bytes_max = o.held_bytes_max;
    let primary = primary::start(
        config,
        Box::new(FakeVm(guest.clone())),
        Box::new(FakeDisks(guest.clone())),
        Box::new(FakeOutput {
            guest: guest.clone(),
            replica: replica.clone(),
            log: logs.releases.clone(),
            acked: logs.acked.clone(),
            early: logs.early.clone(),
            colo: lock(replica).colo.clone(),
        }),
    )
    .expect("primary starts");
    (primary, logs)
}

/// What the primary's output records.
#[derive(Default)]
pub struct FakeOutputLogs {
    pub releases: Arc<Mutex<Vec<Release>>>,
    pub acked: Arc<Mutex<Vec<Acked>>>,
    pub early: Arc<Mutex<Vec<u64>>>,
}

/// Starts a pair; the primary connects through a relay when `o.relay`
/// or `o.hold_heartbeat`.
pub fn pair(o: Options) -> Pair {
    let l = listener();
    let target = l.local_addr().expect("addr");
    let (secondary, replica, fatal) = start_secondary(l, &o);
    assert_eq!(
        secondary.failover(),
        Err(colo::control::CommandError::Conflict(
            "no checkpoint loaded yet: nothing to take over from".into()
        ))
    );
    let (relay, peer) = if o.relay || o.hold_heartbeat {
        let (relay, addr) = Relay::start(target, o.hold_heartbeat);
        (Some(relay), addr)
    } else {
        (None, target)
    };
    let guest = guest(o.held_bytes_max);
    let (primary, logs) = start_primary(peer, &o, &guest, &replica);
    let colo = lock(&replica).colo.clone();
    Pair {
        colo,
        guest,
        replica,
        primary,
        secondary,
        releases: logs.releases,
        acked: logs.acked,
        early: logs.early,
        fatal,
        relay,
    }
}

impl Pair {
    /// Waits until `f` holds for the two statuses; panics with them
    /// after 5 s.
    pub fn wait(&self, what: &str, f: impl Fn(&Status, &Status) -> bool) {
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

    pub fn protected(&self) {
        self.wait("protected", |p, s| {
            p.state == State::Protected && s.state == State::Protected
        });
    }

    /// Protected, and with a relay, the secondary's heartbeat answering
    /// through it. A secondary is protected before its heartbeat
    /// connection is up (that one may trail); a link cut before it is up
    /// is noticed only by the watchdog, after the heartbeat timeout.
    pub fn linked(&self) {
        self.protected();
        if let Some(relay) = &self.relay {
            wait_for("the secondary's first pong", || {
                relay.answered.load(Ordering::SeqCst)
            });
        }
    }

    /// Waits until `epoch` is committed on the secondary.
    pub fn settle(&self, epoch: u64) {
        self.wait("acked", |p, _| p.epoch >= epoch);
    }

    pub fn assert_equal(&self) {
        let g = lock(&self.guest);
        let r = lock(&self.replica);
        assert!(g.mem == r.mem, "replica memory differs");
        assert_eq!(g.state, r.state);
        assert!(g.disk == r.disk, "replica disk differs");
    }
}
