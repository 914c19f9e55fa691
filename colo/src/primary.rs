//! The primary's engine: connects to the secondary, syncs disks and
//! memory, then takes a checkpoint every interval (or on request) and
//! releases the guest's held output when the secondary acks it.
//!
//! Threads: the engine (owns the VM and the disks; connects, syncs, runs
//! the checkpoint loop), a writer draining the outgoing queue to the data
//! connection, a reader of the data connection (acks, errors), a pinger
//! and a pong reader on the heartbeat connection. The others talk to the
//! engine through one event channel.
//!
//! COLO mode adds the mirror connection, opened after the heartbeat
//! connection: before the stop-and-copy the engine hands the output a
//! sink ([`OutputControl::mirror`]) that queues the client frames the
//! PVM receives into a bounded queue (a full queue drops the frame and
//! counts it; it never blocks a device thread); a writer thread drains
//! it. A reader thread hands each frame the SVM sent to
//! [`OutputControl::secondary_frame`] (holding the output's lock
//! briefly) and turns the secondary's checkpoint requests into
//! checkpoints, as [`PrimaryHandle::request_checkpoint`] does. The
//! checkpoint interval is then only the longest time between
//! checkpoints ([`DEFAULT_COLO_CHECKPOINT_MS`]). When replication ends,
//! [`OutputControl::release_all`] also stops mirroring and the queue is
//! closed.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::control::{
    check_checkpoint_ms, Cause, CommandError, Control, Histogram, Metrics, Mode, ProxyStats, Role,
    State, Status,
};
use crate::fault::{self, Point};
use crate::link::{self, lock, ms, Conns, Mirror, Outbox, Stop, SYNC_BLOCK};
use crate::vm::{
    Capture, DiskWriteSink, FrameSink, OutputControl, PrimaryDisks, PrimaryVm, VmOpError,
};
use crate::wire::{self, Hello, Message, WireError};

/// Checkpoint interval unless configured, in milliseconds.
///
/// In Remus mode a reply the guest sends waits on the primary until the
/// checkpoint that covers it is safe on the secondary: up to one interval
/// plus the checkpoint itself. A checkpoint pauses the guest for about
/// 1 ms plus the time to copy its dirty pages. 20 ms keeps the added
/// latency near the 25 ms interval of the Remus paper while the pauses
/// cost the guest a few percent of its time.
pub const DEFAULT_CHECKPOINT_MS: u64 = 20;
/// Checkpoint interval in COLO mode unless configured, in milliseconds.
///
/// In COLO mode the interval is only the longest time between
/// checkpoints: an output mismatch, a compare timeout and held bytes
/// over the bound (either side's) take the others. 2 s bounds how far
/// the SVM diverges from the last checkpoint, i.e. the pages a load
/// copies from the state cache and the disk overlay it drops, while
/// costing about one pause per 2 s. (QEMU's default is 20 s.)
pub const DEFAULT_COLO_CHECKPOINT_MS: u64 = 2000;
/// Interval between heartbeats to the peer unless configured, in ms.
pub const DEFAULT_HEARTBEAT_MS: u64 = 100;
/// Time without a heartbeat after which the peer counts as gone unless
/// configured, in ms.
pub const DEFAULT_HEARTBEAT_TIMEOUT_MS: u64 = 1000;
/// Held output beyond which a checkpoint is taken at once.
pub const DEFAULT_HELD_BYTES_MAX: u64 = 4 << 20;

/// Pre-copy ends when a round copies at most this many pages...
const PRECOPY_SMALL_PAGES: u64 = 256;
/// ...or after this many rounds after the first full copy.
const PRECOPY_MAX_ROUNDS: u32 = 8;
/// Sync data queued ahead of the socket at most (so pre-copy rounds
/// measure what the link carries, not what memory holds).
const SYNC_QUEUE_BYTES: usize = 8 << 20;
/// How long the secondary may take to answer the hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The least time a checkpoint's ack may take before the secondary counts
/// as lost although its heartbeat answers (a replica stuck applying): the
/// guest's output waits for that ack, so a stuck secondary must not stall
/// the clients for longer. The bound is this or ten heartbeat timeouts,
/// whichever is longer (a 256 MiB checkpoint travels in ~0.5 s here).
const ACK_TIMEOUT_MIN: Duration = Duration::from_secs(5);
const CONNECT_RETRY: Duration = Duration::from_millis(200);

/// How the primary replicates.
#[derive(Clone, Debug)]
pub struct PrimaryConfig {
    /// The secondary's `HOST:PORT`.
    pub peer: String,
    pub mode: Mode,
    /// Interval between checkpoints.
    pub checkpoint_ms: u64,
    /// Send the state hash with each checkpoint; the secondary compares.
    pub verify: bool,
    pub heartbeat_ms: u64,
    /// Heartbeat silence after which the secondary counts as lost.
    pub heartbeat_timeout_ms: u64,
    /// Held output beyond which the output buffer asks for a checkpoint
    /// ([`PrimaryHandle::request_checkpoint`] with [`Cause::HeldBytes`]);
    /// the engine also checks it after each release.
    pub held_bytes_max: u64,
}

impl PrimaryConfig {
    /// Remus mode and the defaults above.
    pub fn new(peer: impl Into<String>) -> Self {
        Self {
            peer: peer.into(),
            mode: Mode::Remus,
            checkpoint_ms: DEFAULT_CHECKPOINT_MS,
            verify: false,
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
            heartbeat_timeout_ms: DEFAULT_HEARTBEAT_TIMEOUT_MS,
            held_bytes_max: DEFAULT_HELD_BYTES_MAX,
        }
    }
}

enum Event {
    Ack(u64),
    /// The secondary is gone or said replication ends.
    Lost(String),
    Checkpoint(Cause),
    Failover,
    Interval,
    Shutdown,
}

struct Shared {
    config: PrimaryConfig,
    status: Mutex<Status>,
    metrics: Mutex<Metrics>,
    output: Mutex<Box<dyn OutputControl>>,
    checkpoint_ms: AtomicU64,
    /// A requested checkpoint is on its way to the engine.
    requested: AtomicBool,
    events: Sender<Event>,
    /// Set when the session's helper threads must end.
    stop: Stop,
    /// COLO: the mirror connection's sending side.
    mirror: Arc<Mirror>,
}

impl Shared {
    fn send(&self, e: Event) {
        // The engine gone means replication ended: nothing to tell.
        let _ = self.events.send(e);
    }

    /// See [`PrimaryHandle::request_checkpoint`].
    fn request_checkpoint(&self, cause: Cause) {
        if lock(&self.status).state == State::Protected
            && !self.requested.swap(true, Ordering::SeqCst)
        {
            self.send(Event::Checkpoint(cause));
        }
    }

    /// COLO: the output's counts and the mirror's.
    fn proxy(&self) -> ProxyStats {
        let mut p = lock(&self.output).proxy_stats();
        let (mirrored, dropped) = self.mirror.counts();
        p.mirrored_frames += mirrored;
        p.dropped_frames += dropped;
        p
    }

    fn set_state(&self, state: State) {
        lock(&self.status).state = state;
        lock(&self.metrics).state = Some(state);
    }
}

/// The running primary engine; drop it to end replication.
pub struct PrimaryHandle {
    shared: Arc<Shared>,
}

/// Starts the primary's engine on threads of its own: it connects to
/// `config.peer` (retrying until the secondary answers), syncs, then
/// checkpoints. `output` holds the guest's frames until their epoch is
/// acked.
pub fn start(
    config: PrimaryConfig,
    vm: Box<dyn PrimaryVm>,
    disks: Box<dyn PrimaryDisks>,
    output: Box<dyn OutputControl>,
) -> io::Result<Arc<PrimaryHandle>> {
    let (events, rx) = mpsc::channel();
    let status = Status {
        peer: Some(config.peer.clone()),
        ..Status::new(
            Role::Primary,
            config.mode,
            State::Unprotected,
            config.checkpoint_ms,
        )
    };
    let metrics = Metrics {
        checkpoints: Cause::ALL.iter().map(|&c| (c, 0)).collect(),
        pause: Histogram::new(),
        transfer: Histogram::new(),
        state: Some(State::Unprotected),
        ..Metrics::default()
    };
    let shared = Arc::new(Shared {
        checkpoint_ms: AtomicU64::new(config.checkpoint_ms),
        requested: AtomicBool::new(false),
        config,
        status: Mutex::new(status),
        metrics: Mutex::new(metrics),
        output: Mutex::new(output),
        events,
        stop: Stop::default(),
        mirror: Arc::new(Mirror::default()),
    });
    let engine = Engine {
        shared: shared.clone(),
        vm,
        disks,
        rx,
        conns: Arc::new(Conns::default()),
        outbox: Arc::new(Outbox::default()),
        heartbeat: None,
        paused: false,
    };
    std::thread::Builder::new()
        .name("colo-primary".into())
        .spawn(move || engine.run())?;
    Ok(Arc::new(PrimaryHandle { shared }))
}

impl PrimaryHandle {
    /// Asks for a checkpoint now (the output buffer, over its bound, with
    /// [`Cause::HeldBytes`]). Ignored unless protected.
    /// Cheap to call for every frame: requests coalesce until the
    /// engine takes the checkpoint.
    pub fn request_checkpoint(&self, cause: Cause) {
        self.shared.request_checkpoint(cause);
    }
}

impl Drop for PrimaryHandle {
    fn drop(&mut self) {
        self.shared.send(Event::Shutdown);
    }
}

impl Control for PrimaryHandle {
    fn status(&self) -> Status {
        let mut status = lock(&self.shared.status).clone();
        if status.mode == Mode::Colo {
            status.proxy = Some(self.shared.proxy());
        }
        status
    }

    fn metrics(&self) -> Metrics {
        let (frames, bytes) = lock(&self.shared.output).held();
        let mut m = lock(&self.shared.metrics).clone();
        m.held_frames = frames;
        m.held_bytes = bytes;
        m.proxy = self.shared.proxy();
        m
    }

    fn failover(&self) -> Result<(), CommandError> {
        self.shared.send(Event::Failover);
        Ok(())
    }

    fn checkpoint(&self) -> Result<(), CommandError> {
        let state = lock(&self.shared.status).state;
        if state != State::Protected {
            return Err(CommandError::Conflict(format!(
                "replication is {}, not protected",
                state.name()
            )));
        }
        self.shared.send(Event::Checkpoint(Cause::Requested));
        Ok(())
    }

    fn set_checkpoint_ms(&self, ms: u64) -> Result<(), CommandError> {
        check_checkpoint_ms(ms)?;
        self.shared.checkpoint_ms.store(ms, Ordering::Relaxed);
        lock(&self.shared.status).checkpoint_ms = ms;
        self.shared.send(Event::Interval);
        Ok(())
    }
}

/// Why a session ended.
enum End {
    /// The handshake failed both sides' checks (no retry).
    Refused(String),
    /// The peer is gone, broke the protocol, or the VM failed.
    Lost(String),
    /// `failover()`: run alone (the secondary is told not to take over).
    Dropped,
    Shutdown,
}

fn lost(what: &str) -> impl Fn(io::Error) -> End + '_ {
    move |e| End::Lost(format!("{what}: {e}"))
}

fn vm_lost(what: &str) -> impl Fn(VmOpError) -> End + '_ {
    move |e| End::Lost(format!("{what}: {e}"))
}

fn wire_lost(what: &str) -> impl Fn(WireError) -> End + '_ {
    move |e| End::Lost(format!("{what}: {}", chain(&e)))
}

/// An error and its sources, one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// The checkpoint in flight.
struct InFlight {
    epoch: u64,
    cause: Option<Cause>,
    captured: Instant,
    paused_for: Duration,
    bytes: u64,
}

struct Engine {
    shared: Arc<Shared>,
    vm: Box<dyn PrimaryVm>,
    disks: Box<dyn PrimaryDisks>,
    rx: Receiver<Event>,
    conns: Arc<Conns>,
    outbox: Arc<Outbox>,
    /// The heartbeat connection's writing half (pings, goodbye).
    heartbeat: Option<Arc<Mutex<TcpStream>>>,
    /// The guest is paused by the stop-and-copy.
    paused: bool,
}

impl Engine {
    fn run(mut self) {
        // The session only returns by ending.
        let end = self.session().err().unwrap_or(End::Shutdown);
        if self.paused {
            if let Err(e) = self.vm.resume() {
                tracing::error!("colo: resuming the guest after the sync failed: {e}");
            }
        }
        let reason = match &end {
            End::Refused(r) => {
                tracing::error!("colo: the secondary refused replication: {r}");
                Some(r.clone())
            }
            End::Lost(r) => {
                tracing::error!("colo: replication lost: {r}; running unprotected");
                // A secondary that is alive after all must not take over
                // when it sees the connections end: this side runs on.
                self.goodbye(&format!("the primary runs alone: {r}"));
                Some(r.clone())
            }
            End::Dropped => {
                tracing::warn!("colo: failover requested: dropping the secondary, running alone");
                self.goodbye("the primary runs alone (failover requested)");
                Some("the secondary was dropped on request".to_string())
            }
            End::Shutdown => {
                self.goodbye("the primary is shutting down");
                None
            }
        };
        self.shared.stop.set();
        self.outbox.close("replication ended");
        self.shared.mirror.close("replication ended");
        self.conns.shutdown();
        self.disks.stop();
        lock(&self.shared.output).release_all();
        let mut status = lock(&self.shared.status);
        status.state = State::Unprotected;
        status.error = reason;
        drop(status);
        lock(&self.shared.metrics).state = Some(State::Unprotected);
    }

    /// Tells the secondary on the heartbeat connection not to take over.
    fn goodbye(&self, reason: &str) {
        if let Some(hb) = &self.heartbeat {
            let msg = Message::Goodbye {
                reason: reason.to_string(),
            };
            let _ = wire::write_message(&mut *lock(hb), &msg);
        }
    }

    /// Handles the events that end a session anywhere; returns the others.
    fn check(&self, e: Event) -> Result<Event, End> {
        match e {
            Event::Lost(why) => Err(End::Lost(why)),
            Event::Failover => Err(End::Dropped),
            Event::Shutdown => Err(End::Shutdown),
            other => Ok(other),
        }
    }

    /// Events that came meanwhile: ends the session if one says so.
    fn poll(&self) -> Result<(), End> {
        while let Ok(e) = self.rx.try_recv() {
            match self.check(e)? {
                Event::Ack(epoch) => {
                    return Err(End::Lost(format!(
                        "the secondary acked checkpoint {epoch} during the sync"
                    )))
                }
                Event::Checkpoint(_) | Event::Interval => {}
                _ => {}
            }
        }
        Ok(())
    }

    fn session(&mut self) -> Result<(), End> {
        let data = self.connect()?;
        let session = session_id();
        let hello = Hello {
            version: wire::announced_version(),
            mode: self.shared.config.mode,
            session,
            identity: self.vm.identity(),
        };
        self.handshake(&data, &hello)?;
        self.shared.set_state(State::Syncing);
        tracing::info!(
            "colo: handshake with {} done; syncing",
            self.shared.config.peer
        );
        self.start_heartbeat(session)?;
        let colo = self.shared.config.mode == Mode::Colo;
        if colo {
            self.start_mirror(session)?;
        }
        self.disks.track(SYNC_BLOCK);
        let remote = self.read_hashes(&data)?;
        self.start_io(&data)?;
        self.sync_disks(&remote)?;
        self.sync_memory()?;
        if colo {
            let mirror = self.shared.mirror.clone();
            let sink: FrameSink = Arc::new(move |f| mirror.frame(f));
            lock(&self.shared.output).mirror(sink);
        }
        self.stop_and_copy()?;
        self.protect()
    }

    fn connect(&mut self) -> Result<TcpStream, End> {
        let peer = self.shared.config.peer.clone();
        let mut logged = false;
        loop {
            let attempt = peer.to_socket_addrs().and_then(|mut addrs| {
                let addr = addrs.next().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "resolves to no address")
                })?;
                TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            });
            match attempt {
                Ok(s) => {
                    link::configure(&s).map_err(lost("data connection"))?;
                    self.conns.add(&s);
                    return Ok(s);
                }
                Err(e) => {
                    if !logged {
                        tracing::info!("colo: waiting for the secondary at {peer}: {e}");
                        logged = true;
                    }
                }
            }
            match self.rx.recv_timeout(CONNECT_RETRY) {
                Ok(e) => {
                    self.check(e)?;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(End::Shutdown),
            }
        }
    }

    fn handshake(&mut self, data: &TcpStream, hello: &Hello) -> Result<(), End> {
        let mut s = data;
        s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(lost("data connection"))?;
        wire::write_message(&mut s, &Message::Hello(hello.clone()))
            .map_err(wire_lost("sending the hello"))?;
        match wire::read_message(&mut s).map_err(wire_lost("awaiting the secondary's answer"))? {
            Message::Welcome(welcome) => {
                let diffs = wire::handshake_differences(hello, &welcome);
                if !diffs.is_empty() {
                    let reason = format!("the secondary differs: {}", diffs.join("; "));
                    let _ = wire::write_message(
                        &mut s,
                        &Message::Refused {
                            reason: reason.clone(),
                        },
                    );
                    return Err(End::Refused(reason));
                }
            }
            Message::Refused { reason } => return Err(End::Refused(reason)),
            other => {
                return Err(End::Lost(format!(
                    "the secondary answered the hello with {}",
                    other.kind()
                )))
            }
        }
        s.set_read_timeout(None).map_err(lost("data connection"))
    }

    fn start_heartbeat(&mut self, session: u64) -> Result<(), End> {
        let hb = self.dial("heartbeat connection")?;
        hb.set_write_timeout(Some(Duration::from_secs(1)))
            .map_err(lost("heartbeat connection"))?;
        let mut reader = hb.try_clone().map_err(lost("heartbeat connection"))?;
        let writer = Arc::new(Mutex::new(hb));
        wire::write_message(&mut *lock(&writer), &Message::HeartbeatHello { session })
            .map_err(wire_lost("heartbeat connection"))?;
        self.heartbeat = Some(writer.clone());

        let epoch = Instant::now();
        let last_pong = Arc::new(AtomicU64::new(0));
        let shared = self.shared.clone();
        let seen = last_pong.clone();
        spawn("colo-hb-read", move || loop {
            match wire::read_message(&mut reader) {
                Ok(Message::Pong { .. }) => {
                    seen.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed)
                }
                Ok(Message::Error { text }) => {
                    return shared.send(Event::Lost(format!(
                        "the secondary ended replication: {text}"
                    )))
                }
                Ok(other) => {
                    return shared.send(Event::Lost(format!(
                        "unexpected {} on the heartbeat connection",
                        other.kind()
                    )))
                }
                Err(e) => {
                    if !shared.stop.is_set() {
                        shared.send(Event::Lost(format!("heartbeat connection: {}", chain(&e))));
                    }
                    return;
                }
            }
        })?;
        let shared = self.shared.clone();
        let conns = self.conns.clone();
        spawn("colo-hb-ping", move || {
            let period = Duration::from_millis(shared.config.heartbeat_ms.max(1));
            let timeout = shared.config.heartbeat_timeout_ms;
            let mut seq = 0u64;
            loop {
                seq += 1;
                if let Err(e) = wire::write_message(&mut *lock(&writer), &Message::Ping { seq }) {
                    shared.send(Event::Lost(format!("heartbeat connection: {}", chain(&e))));
                    return;
                }
                if shared.stop.wait(period) {
                    return;
                }
                let now = epoch.elapsed().as_millis() as u64;
                let silent = now.saturating_sub(last_pong.load(Ordering::Relaxed));
                if silent > timeout {
                    shared.send(Event::Lost(format!(
                        "the secondary did not answer heartbeats for {silent} ms"
                    )));
                    // Wakes the engine if it is blocked on the data connection.
                    conns.shutdown();
                    return;
                }
            }
        })
    }

    /// COLO: the mirror connection, its writer and its reader.
    fn start_mirror(&mut self, session: u64) -> Result<(), End> {
        let mut stream = self.dial("mirror connection")?;
        wire::write_message(&mut stream, &Message::MirrorHello { session })
            .map_err(wire_lost("mirror connection"))?;
        let mut reader = stream.try_clone().map_err(lost("mirror connection"))?;
        let shared = self.shared.clone();
        shared
            .mirror
            .open_direct(&stream)
            .map_err(lost("mirror connection"))?;
        spawn("colo-mirror-tx", move || {
            if let Err(e) = shared.mirror.drain(&mut stream) {
                if !shared.stop.is_set() {
                    shared.send(Event::Lost(format!("mirror connection: {e}")));
                }
            }
        })?;
        let shared = self.shared.clone();
        spawn("colo-mirror-rx", move || loop {
            let lost = match wire::read_message(&mut reader) {
                Ok(Message::Frame(f)) => {
                    lock(&shared.output).secondary_frame(f);
                    continue;
                }
                Ok(Message::CheckpointRequest { cause }) => {
                    shared.request_checkpoint(cause);
                    continue;
                }
                Ok(Message::Error { text }) => format!("the secondary ended replication: {text}"),
                Ok(other) => format!("unexpected {} on the mirror connection", other.kind()),
                // The secondary ends the mirror connection with the others
                // and says why on those: the data connection and the
                // heartbeat decide.
                Err(WireError::Closed) => return,
                Err(e) => format!("mirror connection: {}", chain(&e)),
            };
            if !shared.stop.is_set() {
                shared.send(Event::Lost(lost));
            }
            return;
        })
    }

    /// A second connection to the peer (heartbeat, mirror).
    fn dial(&self, what: &str) -> Result<TcpStream, End> {
        let addr = self
            .shared
            .config
            .peer
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| End::Lost("the peer address no longer resolves".into()))?;
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(lost(what))?;
        link::configure(&s).map_err(lost(what))?;
        self.conns.add(&s);
        Ok(s)
    }

    /// The secondary's block hashes of every disk (it sends them first).
    fn read_hashes(&mut self, data: &TcpStream) -> Result<Vec<Vec<u64>>, End> {
        let mut s = data;
        let caps = self.disks.capacities();
        let mut all = Vec::with_capacity(caps.len());
        for (disk, &cap) in caps.iter().enumerate() {
            let count = cap.div_ceil(u64::from(SYNC_BLOCK));
            let mut hashes: Vec<u64> = Vec::new();
            while (hashes.len() as u64) < count {
                match wire::read_message(&mut s).map_err(wire_lost("awaiting disk hashes"))? {
                    Message::DiskHashes {
                        disk: d,
                        block,
                        first,
                        hashes: h,
                    } if usize::from(d) == disk
                        && block == SYNC_BLOCK
                        && first == hashes.len() as u64
                        && first + h.len() as u64 <= count =>
                    {
                        hashes.extend(h)
                    }
                    Message::Error { text } => {
                        return Err(End::Lost(format!("the secondary failed: {text}")))
                    }
                    other => {
                        return Err(End::Lost(format!(
                            "unexpected {} while awaiting disk {disk}'s hashes",
                            other.kind()
                        )))
                    }
                }
            }
            all.push(hashes);
        }
        Ok(all)
    }

    /// The writer and reader threads of the data connection.
    fn start_io(&mut self, data: &TcpStream) -> Result<(), End> {
        let mut writer = data.try_clone().map_err(lost("data connection"))?;
        let mut reader = data.try_clone().map_err(lost("data connection"))?;
        let outbox = self.outbox.clone();
        let shared = self.shared.clone();
        spawn("colo-tx", move || {
            if let Err(e) = outbox.drain(&mut writer) {
                if !shared.stop.is_set() {
                    shared.send(Event::Lost(format!("data connection: {e}")));
                }
            }
        })?;
        let shared = self.shared.clone();
        spawn("colo-rx", move || loop {
            let event = match wire::read_message(&mut reader) {
                Ok(Message::Ack { epoch }) => Event::Ack(epoch),
                Ok(Message::Error { text }) => {
                    Event::Lost(format!("the secondary ended replication: {text}"))
                }
                Ok(other) => Event::Lost(format!("unexpected {} from the secondary", other.kind())),
                Err(e) => {
                    if !shared.stop.is_set() {
                        shared.send(Event::Lost(format!("data connection: {}", chain(&e))));
                    }
                    return;
                }
            };
            let end = matches!(event, Event::Lost(_));
            shared.send(event);
            if end {
                return;
            }
        })
    }

    fn push(&self, msg: &Message) -> Result<usize, End> {
        self.outbox.push(msg).map_err(lost("data connection"))
    }

    fn send_block(&mut self, disk: usize, index: u64) -> Result<u64, End> {
        let cap = self.disks.capacities().get(disk).copied().unwrap_or(0);
        let offset = index * u64::from(SYNC_BLOCK);
        let len = cap.saturating_sub(offset).min(u64::from(SYNC_BLOCK));
        let mut data = vec![0u8; len as usize];
        self.disks
            .read(disk, offset, &mut data)
            .map_err(lost("reading a disk block"))?;
        self.push(&Message::DiskBlock {
            disk: disk as u16,
            offset,
            data,
        })?;
        lock(&self.shared.status).sync_disk_bytes += len;
        Ok(len)
    }

    fn sync_disks(&mut self, remote: &[Vec<u64>]) -> Result<(), End> {
        let started = Instant::now();
        let mut sent = 0;
        for (disk, theirs) in remote.iter().enumerate() {
            let ours = self
                .disks
                .hashes(disk, SYNC_BLOCK)
                .map_err(lost("hashing a disk"))?;
            for (index, h) in ours.iter().enumerate() {
                if theirs.get(index) != Some(h) {
                    sent += self.send_block(disk, index as u64)?;
                    self.outbox
                        .wait_below(SYNC_QUEUE_BYTES)
                        .map_err(lost("data connection"))?;
                }
            }
            self.poll()?;
        }
        tracing::info!(
            "colo: disks synced: {sent} bytes sent in {:.1} ms",
            ms(started.elapsed())
        );
        Ok(())
    }

    /// One pre-copy pass; returns the pages copied.
    fn copy_round(&mut self, all: bool) -> Result<u64, End> {
        let outbox = self.outbox.clone();
        let shared = self.shared.clone();
        let mut out = |batch: crate::vm::PageBatch| -> Result<(), VmOpError> {
            for b in link::split(&batch) {
                outbox
                    .push(&Message::SyncPages(b))
                    .map_err(VmOpError::new)?;
                outbox
                    .wait_below(SYNC_QUEUE_BYTES)
                    .map_err(VmOpError::new)?;
            }
            lock(&shared.status).sync_pages += batch.len() as u64;
            Ok(())
        };
        let n = self
            .vm
            .copy_live(all, &mut out)
            .map_err(vm_lost("copying memory"))?;
        // The round ends when its pages are on the wire.
        self.outbox.wait_below(0).map_err(lost("data connection"))?;
        self.poll()?;
        Ok(n)
    }

    fn sync_memory(&mut self) -> Result<(), End> {
        self.vm
            .start_tracking()
            .map_err(vm_lost("starting dirty tracking"))?;
        let started = Instant::now();
        let n = self.copy_round(true)?;
        tracing::info!(
            "colo: memory pre-copy round 0: {n} pages in {:.1} ms",
            ms(started.elapsed())
        );
        for round in 1..=PRECOPY_MAX_ROUNDS {
            let t = Instant::now();
            let n = self.copy_round(false)?;
            tracing::info!(
                "colo: memory pre-copy round {round}: {n} pages in {:.1} ms",
                ms(t.elapsed())
            );
            if n <= PRECOPY_SMALL_PAGES {
                break;
            }
        }
        Ok(())
    }

    fn stop_and_copy(&mut self) -> Result<(), End> {
        let verify = self.shared.config.verify;
        let capture = self
            .vm
            .checkpoint_paused(0, verify)
            .map_err(vm_lost("stop-and-copy"))?;
        self.paused = true;
        let mut blocks = 0u64;
        for (disk, index) in self.disks.take_tracked() {
            blocks += self.send_block(disk, index)?;
        }
        let outbox = self.outbox.clone();
        let sink: DiskWriteSink = Arc::new(move |w| outbox.push(&Message::DiskWrite(w)).map(drop));
        self.disks.forward(1, sink);
        let bytes = self.queue_checkpoint(0, &capture)?;
        self.vm
            .resume()
            .map_err(vm_lost("resuming after the sync"))?;
        self.paused = false;
        tracing::info!(
            "colo: stop-and-copy: {} pages, {blocks} disk bytes, guest paused {:.1} ms; checkpoint 0 is {bytes} bytes",
            capture.pages.len(),
            ms(capture.paused_for)
        );
        let inflight = InFlight {
            epoch: 0,
            cause: None,
            captured: Instant::now(),
            paused_for: capture.paused_for,
            bytes,
        };
        // Checkpoint 0 needs its ack before anything else happens.
        loop {
            match self.check(self.rx.recv().map_err(|_| End::Shutdown)?)? {
                Event::Ack(epoch) => {
                    self.acked(&inflight, epoch)?;
                    return Ok(());
                }
                Event::Checkpoint(_) | Event::Interval => {}
                _ => {}
            }
        }
    }

    /// Queues checkpoint `epoch`; returns its bytes on the wire.
    fn queue_checkpoint(&mut self, epoch: u64, capture: &Capture) -> Result<u64, End> {
        let mut bytes = self.push(&Message::CheckpointBegin {
            epoch,
            pages: capture.pages.len() as u64,
            state_len: capture.state.len() as u64,
            digest: capture.digest.clone(),
        })?;
        let batches: Vec<_> = link::split(&capture.pages).collect();
        let half = batches.len().div_ceil(2);
        if half == 0 {
            fault::point(Role::Primary, Point::MidMemory);
        }
        for (i, batch) in batches.into_iter().enumerate() {
            bytes += self.push(&Message::Pages { epoch, batch })?;
            if i + 1 == half {
                fault::point(Role::Primary, Point::MidMemory);
            }
        }
        bytes += self.push(&Message::State {
            epoch,
            bytes: capture.state.clone(),
        })?;
        fault::point(Role::Primary, Point::AfterState);
        bytes += self.push(&Message::CheckpointEnd { epoch })?;
        Ok(bytes as u64)
    }

    /// Checkpoint `inflight` was acked: release its output, count it.
    fn acked(&mut self, inflight: &InFlight, epoch: u64) -> Result<(), End> {
        if epoch != inflight.epoch {
            return Err(End::Lost(format!(
                "the secondary acked checkpoint {epoch}, checkpoint {} is in flight",
                inflight.epoch
            )));
        }
        fault::point(Role::Primary, Point::AfterAck);
        lock(&self.shared.output).release(epoch);
        let transfer = inflight.captured.elapsed();
        {
            let mut m = lock(&self.shared.metrics);
            if let Some(cause) = inflight.cause {
                if let Some(entry) = m.checkpoints.iter_mut().find(|(c, _)| *c == cause) {
                    entry.1 += 1;
                }
                m.pause.observe(inflight.paused_for);
                m.transfer.observe(transfer);
            }
            m.checkpoint_bytes += inflight.bytes;
            m.state = Some(State::Protected);
        }
        let mut status = lock(&self.shared.status);
        if epoch == 0 {
            tracing::info!("colo: checkpoint 0 acked: protected");
        } else {
            status.checkpoints += 1;
        }
        status.state = State::Protected;
        status.epoch = epoch;
        status.last_checkpoint_ms = Some(ms(inflight.paused_for));
        tracing::debug!(
            "colo: checkpoint {epoch} acked: paused {:.2} ms, {} bytes, transfer {:.2} ms",
            ms(inflight.paused_for),
            inflight.bytes,
            ms(transfer)
        );
        Ok(())
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(self.shared.checkpoint_ms.load(Ordering::Relaxed))
    }

    /// The checkpoint loop, protected.
    fn protect(&mut self) -> Result<(), End> {
        let mut epoch = 0u64;
        let mut last = Instant::now();
        let mut inflight: Option<InFlight> = None;
        let mut pending: Option<Cause> = None;
        loop {
            let event = if let Some(f) = &inflight {
                let deadline = f.captured + self.ack_timeout();
                match self
                    .rx
                    .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                {
                    Ok(e) => Some(e),
                    Err(RecvTimeoutError::Timeout) => {
                        return Err(End::Lost(format!(
                            "no ack for checkpoint {} within {:.1} s",
                            f.epoch,
                            self.ack_timeout().as_secs_f64()
                        )))
                    }
                    Err(RecvTimeoutError::Disconnected) => return Err(End::Shutdown),
                }
            } else {
                let due = last + self.interval();
                match self
                    .rx
                    .recv_timeout(due.saturating_duration_since(Instant::now()))
                {
                    Ok(e) => Some(e),
                    Err(RecvTimeoutError::Timeout) => {
                        pending.get_or_insert(Cause::Periodic);
                        None
                    }
                    Err(RecvTimeoutError::Disconnected) => return Err(End::Shutdown),
                }
            };
            match event.map(|e| self.check(e)).transpose()? {
                Some(Event::Ack(acked)) => {
                    let Some(done) = inflight.take() else {
                        return Err(End::Lost(format!(
                            "the secondary acked checkpoint {acked}, none is in flight"
                        )));
                    };
                    self.acked(&done, acked)?;
                    let (_, held) = lock(&self.shared.output).held();
                    if held > self.shared.config.held_bytes_max {
                        pending.get_or_insert(Cause::HeldBytes);
                    }
                }
                Some(Event::Checkpoint(cause)) => {
                    pending.get_or_insert(cause);
                }
                _ => {}
            }
            if inflight.is_none() {
                if let Some(cause) = pending.take() {
                    self.shared.requested.store(false, Ordering::SeqCst);
                    epoch += 1;
                    last = Instant::now();
                    inflight = Some(self.take_checkpoint(epoch, cause)?);
                }
            }
        }
    }

    /// How long a checkpoint's ack may take (see [`ACK_TIMEOUT_MIN`]).
    fn ack_timeout(&self) -> Duration {
        ACK_TIMEOUT_MIN.max(Duration::from_millis(
            self.shared.config.heartbeat_timeout_ms.saturating_mul(10),
        ))
    }

    fn take_checkpoint(&mut self, epoch: u64, cause: Cause) -> Result<InFlight, End> {
        let capture = self
            .vm
            .checkpoint(epoch, self.shared.config.verify)
            .map_err(vm_lost("checkpoint"))?;
        let captured = Instant::now();
        let bytes = self.queue_checkpoint(epoch, &capture)?;
        Ok(InFlight {
            epoch,
            cause: Some(cause),
            captured,
            paused_for: capture.paused_for,
            bytes,
        })
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), End> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
        .map_err(lost("starting a thread"))
}

/// A session id unlikely to repeat: time and pid.
fn session_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}
