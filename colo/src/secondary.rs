//! The secondary's engine: waits for a primary, answers its handshake,
//! applies the initial sync, then loads each complete checkpoint into the
//! paused replica, commits its disk writes and acks. Takes over when the
//! primary is lost (auto) or when told to (manual).
//!
//! Threads: the acceptor (handshake, then the heartbeat connection), the
//! data thread (reads, stages, applies, acks), the heartbeat thread
//! (answers pings) and a watchdog (heartbeat silence).
//!
//! COLO mode: the replica is the SVM, which runs between checkpoints.
//! The acceptor also takes the session's mirror connection and then
//! connects the SVM's NICs to it once ([`ReplicaVm::colo_net`]): the
//! SVM's frames go out through a bounded queue (a writer thread drains
//! it; a full queue drops and counts), its checkpoint requests too (at
//! most one per epoch), and a mirror reader thread hands the primary's
//! client frames to the sink `colo_net` returned (without the replica's
//! lock). After each load (load, commit, verify) the data thread calls
//! [`ReplicaVm::run`], then acks. Failover is unchanged (disks, then VM;
//! the SVM runs on from where it is).

use std::io;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::control::{
    check_checkpoint_ms, CommandError, Control, Histogram, Metrics, Mode, ProxyStats, Role, State,
    Status,
};
use crate::fault::{self, Point};
use crate::link::{self, lock, ms, Conns, Mirror, HASHES_PER_MESSAGE, SYNC_BLOCK};
use crate::primary::chain;
use crate::staging::{Checkpoint, Limits, Staged, Staging};
use crate::vm::{CheckpointAsk, FrameSink, ReplicaDisks, ReplicaVm};
use crate::wire::{self, Message, Welcome};

/// What the secondary does when the primary is lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Failover {
    /// Take over at once. Risks a split brain when only the link failed:
    /// both sides then run the guest (no witness yet).
    Auto,
    /// Log it and wait for the `failover` command (QEMU's default).
    Manual,
}

/// How the secondary replicates.
pub struct SecondaryConfig {
    pub mode: Mode,
    pub failover: Failover,
    /// Heartbeat silence after which the primary counts as lost.
    pub heartbeat_timeout_ms: u64,
    /// Called when replication cannot even start (the handshake was
    /// refused by either side), with the message to exit with.
    pub fatal: Box<dyn Fn(String) + Send + Sync>,
}

impl SecondaryConfig {
    /// Remus, manual failover, the default heartbeat timeout.
    pub fn new(fatal: Box<dyn Fn(String) + Send + Sync>) -> Self {
        Self {
            mode: Mode::Remus,
            failover: Failover::Manual,
            heartbeat_timeout_ms: crate::primary::DEFAULT_HEARTBEAT_TIMEOUT_MS,
            fatal,
        }
    }
}

struct Replica {
    vm: Box<dyn ReplicaVm>,
    disks: Box<dyn ReplicaDisks>,
    /// Checkpoint 0 is loaded: failover is possible.
    loaded: bool,
    /// Failed over: replication must not touch the replica any more.
    over: bool,
    /// COLO: the SVM's NICs are connected to the mirror.
    net: bool,
}

struct Shared {
    config: SecondaryConfig,
    status: Mutex<Status>,
    metrics: Mutex<Metrics>,
    replica: Mutex<Replica>,
    conns: Conns,
    /// The heartbeat connection's writing half (pongs, a last error).
    heartbeat: Mutex<Option<TcpStream>>,
    /// The data connection's writing half (hashes, acks, a last error).
    data_out: Mutex<Option<TcpStream>>,
    /// Replication ended (error, loss, goodbye or failover).
    ended: AtomicBool,
    session: AtomicU64,
    /// Milliseconds after `born` of the last ping (or of the welcome).
    last_ping: AtomicU64,
    born: Instant,
    /// COLO: the mirror connection's sending side.
    mirror: Arc<Mirror>,
    /// COLO: where the primary's client frames go (the SVM's NICs).
    inbound: Mutex<Option<FrameSink>>,
    /// COLO: the epoch the SVM runs in, and the last one it asked for a
    /// checkpoint in.
    svm_epoch: Arc<AtomicU64>,
    asked: Arc<AtomicU64>,
    /// COLO: the replica's counts as of the last load.
    proxy: Mutex<ProxyStats>,
}

/// The running secondary engine.
pub struct SecondaryHandle {
    shared: Arc<Shared>,
}

/// Starts the secondary's engine on threads of its own: it waits on
/// `listener` for a primary, then replicates into `vm` and `disks`.
pub fn start(
    config: SecondaryConfig,
    listener: TcpListener,
    vm: Box<dyn ReplicaVm>,
    disks: Box<dyn ReplicaDisks>,
) -> io::Result<Arc<SecondaryHandle>> {
    let status = Status::new(Role::Secondary, config.mode, State::Waiting, 0);
    let shared = Arc::new(Shared {
        config,
        status: Mutex::new(status),
        metrics: Mutex::new(Metrics {
            pause: Histogram::new(),
            transfer: Histogram::new(),
            state: Some(State::Waiting),
            ..Metrics::default()
        }),
        replica: Mutex::new(Replica {
            vm,
            disks,
            loaded: false,
            over: false,
            net: false,
        }),
        conns: Conns::default(),
        heartbeat: Mutex::new(None),
        data_out: Mutex::new(None),
        ended: AtomicBool::new(false),
        session: AtomicU64::new(0),
        last_ping: AtomicU64::new(0),
        born: Instant::now(),
        mirror: Arc::new(Mirror::default()),
        inbound: Mutex::new(None),
        svm_epoch: Arc::new(AtomicU64::new(0)),
        asked: Arc::new(AtomicU64::new(u64::MAX)),
        proxy: Mutex::new(ProxyStats::default()),
    });
    let s = shared.clone();
    std::thread::Builder::new()
        .name("colo-accept".into())
        .spawn(move || accept(s, listener))?;
    Ok(Arc::new(SecondaryHandle { shared }))
}

impl Control for SecondaryHandle {
    fn status(&self) -> Status {
        let mut status = lock(&self.shared.status).clone();
        if status.mode == Mode::Colo {
            status.proxy = Some(self.shared.proxy());
        }
        status
    }

    fn metrics(&self) -> Metrics {
        let mut m = lock(&self.shared.metrics).clone();
        m.proxy = self.shared.proxy();
        m
    }

    fn failover(&self) -> Result<(), CommandError> {
        self.shared.failover("failover requested")
    }

    fn checkpoint(&self) -> Result<(), CommandError> {
        Err(CommandError::Conflict(
            "checkpoints are taken by the primary".into(),
        ))
    }

    fn set_checkpoint_ms(&self, ms: u64) -> Result<(), CommandError> {
        check_checkpoint_ms(ms)?;
        lock(&self.shared.status).checkpoint_ms = ms;
        Ok(())
    }
}

impl Drop for SecondaryHandle {
    fn drop(&mut self) {
        self.shared.end(State::Stopped, None);
    }
}

impl Shared {
    fn set_state(&self, state: State) {
        lock(&self.status).state = state;
        lock(&self.metrics).state = Some(state);
    }

    /// COLO: the replica's counts (as of its last load) and the mirror's.
    fn proxy(&self) -> ProxyStats {
        let mut p = *lock(&self.proxy);
        let (mirrored, dropped) = self.mirror.counts();
        p.mirrored_frames += mirrored;
        p.dropped_frames += dropped;
        p
    }

    /// COLO: connects the SVM's NICs to the mirror, once.
    fn colo_net(&self, replica: &mut Replica) -> Result<(), String> {
        if replica.net {
            return Ok(());
        }
        let mirror = self.mirror.clone();
        let out: FrameSink = Arc::new(move |f| mirror.frame(f));
        let (mirror, epoch, asked) = (
            self.mirror.clone(),
            self.svm_epoch.clone(),
            self.asked.clone(),
        );
        let ask: CheckpointAsk = Arc::new(move |cause| {
            let now = epoch.load(Ordering::SeqCst);
            if asked.swap(now, Ordering::SeqCst) != now {
                if let Err(e) = mirror.message(&Message::CheckpointRequest { cause }) {
                    tracing::debug!("colo: a checkpoint request was dropped: {e}");
                }
            }
        });
        let inbound = replica
            .vm
            .colo_net(out, ask)
            .map_err(|e| format!("connecting the SVM's NICs: {e}"))?;
        replica.net = true;
        *lock(&self.inbound) = Some(inbound);
        Ok(())
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// Claims the end of replication: true for the first caller only.
    fn claim_end(&self) -> bool {
        !self.ended.swap(true, Ordering::SeqCst)
    }

    /// `state` and `error` go to the status unless failed over.
    fn record_end(&self, state: State, error: Option<String>) {
        let mut status = lock(&self.status);
        if status.state != State::FailedOver {
            status.state = state;
            status.error = error;
            drop(status);
            lock(&self.metrics).state = Some(state);
        }
    }

    /// Ends replication (once): closes the connections, records why.
    fn end(&self, state: State, error: Option<String>) -> bool {
        if !self.claim_end() {
            return false;
        }
        self.conns.shutdown();
        self.mirror.close("replication ended");
        self.record_end(state, error);
        true
    }

    /// Replication broke (bad data, failed apply): tell the primary,
    /// stop. The replica keeps its last loaded checkpoint.
    fn broken(&self, why: String) {
        // Claimed first: the primary's reaction to the error (closing)
        // must not read here as the primary being lost.
        if !self.claim_end() {
            return;
        }
        tracing::error!("colo: replication stopped: {why}");
        // On both connections: the primary reads it whichever it reads
        // first, before the end of the stream.
        let msg = Message::Error { text: why.clone() };
        if let Some(data) = &mut *lock(&self.data_out) {
            let _ = wire::write_message(data, &msg);
        }
        if let Some(hb) = &mut *lock(&self.heartbeat) {
            let _ = wire::write_message(hb, &msg);
        }
        self.conns.finish();
        self.mirror.close("replication ended");
        self.record_end(State::Stopped, Some(why));
    }

    /// The primary is gone: take over (auto) or wait for the command.
    fn primary_lost(&self, why: String) {
        if self.ended.load(Ordering::SeqCst) {
            return;
        }
        let auto = self.config.failover == Failover::Auto;
        let loaded = lock(&self.replica).loaded;
        if auto && loaded {
            tracing::warn!("colo: primary lost ({why}): taking over");
            if let Err(e) = self.failover(&why) {
                tracing::error!("colo: failover failed: {e}");
            }
        } else {
            let next = if loaded {
                "waiting for the failover command"
            } else {
                "no checkpoint to take over from"
            };
            tracing::error!("colo: primary lost ({why}): {next}");
            self.end(State::Stopped, Some(format!("primary lost: {why}")));
        }
    }

    fn failover(&self, why: &str) -> Result<(), CommandError> {
        let mut replica = lock(&self.replica);
        if replica.over {
            return Err(CommandError::Conflict("already failed over".into()));
        }
        if !replica.loaded {
            return Err(CommandError::Conflict(
                "no checkpoint loaded yet: nothing to take over from".into(),
            ));
        }
        replica.over = true;
        self.end(State::Stopped, Some(format!("failed over: {why}")));
        let r = &mut *replica;
        if let Err(e) = r.disks.take_over() {
            let text = format!("taking over the disks failed: {e}");
            lock(&self.status).error = Some(text.clone());
            return Err(CommandError::Failed(text));
        }
        r.vm.take_over().map_err(|e| {
            let text = format!("taking over failed: {e}");
            lock(&self.status).error = Some(text.clone());
            CommandError::Failed(text)
        })?;
        self.set_state(State::FailedOver);
        lock(&self.metrics).failovers += 1;
        let epoch = lock(&self.status).epoch;
        tracing::warn!("colo: failed over from checkpoint {epoch} ({why})");
        Ok(())
    }
}

fn refuse(stream: &mut TcpStream, reason: &str) {
    let _ = wire::write_message(
        stream,
        &Message::Refused {
            reason: reason.to_string(),
        },
    );
}

/// Waits for the primary's data connection, then its heartbeat
/// connection; refuses any other.
fn accept(shared: Arc<Shared>, listener: TcpListener) {
    let mut heartbeat = false;
    let mut mirror = false;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        if shared.ended.load(Ordering::SeqCst) {
            refuse(&mut stream, "replication has ended");
            continue;
        }
        if link::configure(&stream).is_err()
            || stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .is_err()
        {
            continue;
        }
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let session = shared.session.load(Ordering::SeqCst);
        match wire::read_message(&mut stream) {
            Ok(Message::Hello(hello)) if session == 0 => {
                let welcome = {
                    let replica = lock(&shared.replica);
                    Welcome {
                        version: wire::announced_version(),
                        mode: shared.config.mode,
                        identity: replica.vm.identity(),
                    }
                };
                let diffs = wire::handshake_differences(&hello, &welcome);
                if !diffs.is_empty() {
                    let reason = format!("the secondary differs: {}", diffs.join("; "));
                    tracing::error!("colo: refusing the primary at {peer}: {reason}");
                    refuse(&mut stream, &reason);
                    shared.end(State::Stopped, Some(reason.clone()));
                    (shared.config.fatal)(reason);
                    return;
                }
                if wire::write_message(&mut stream, &Message::Welcome(welcome)).is_err()
                    || stream.set_read_timeout(None).is_err()
                {
                    continue;
                }
                tracing::info!("colo: primary {peer} connected; syncing");
                shared.session.store(hello.session.max(1), Ordering::SeqCst);
                shared.last_ping.store(shared.now_ms(), Ordering::SeqCst);
                shared.conns.add(&stream);
                *lock(&shared.data_out) = stream.try_clone().ok();
                {
                    let mut status = lock(&shared.status);
                    status.peer = Some(peer);
                }
                shared.set_state(State::Syncing);
                let s = shared.clone();
                let limits = {
                    let replica = lock(&shared.replica);
                    let id = replica.vm.identity();
                    Limits {
                        mem_size: id.mem_size,
                        disks: replica.disks.capacities(),
                    }
                };
                let mut staging = Staging::new(limits);
                // The hello opens the staged stream too.
                let _ = staging.feed(Message::Hello(hello));
                let spawned = std::thread::Builder::new()
                    .name("colo-data".into())
                    .spawn(move || data(s, stream, staging));
                if spawned.is_err() {
                    shared.end(State::Stopped, Some("cannot start a thread".into()));
                    return;
                }
                let s = shared.clone();
                let _ = std::thread::Builder::new()
                    .name("colo-watchdog".into())
                    .spawn(move || watchdog(s));
            }
            Ok(Message::HeartbeatHello { session: id }) if session != 0 && !heartbeat => {
                if id.max(1) != session {
                    refuse(&mut stream, "not this session's heartbeat");
                    continue;
                }
                heartbeat = true;
                shared.conns.add(&stream);
                *lock(&shared.heartbeat) = stream.try_clone().ok();
                if stream.set_read_timeout(None).is_err() {
                    shared.primary_lost("heartbeat connection failed".into());
                    continue;
                }
                let s = shared.clone();
                let _ = std::thread::Builder::new()
                    .name("colo-hb".into())
                    .spawn(move || answer_pings(s, stream));
            }
            Ok(Message::MirrorHello { session: id })
                if session != 0 && !mirror && shared.config.mode == Mode::Colo =>
            {
                if id.max(1) != session {
                    tracing::warn!(
                        "colo: refusing a mirror connection of another session from {peer}"
                    );
                    refuse(&mut stream, "not this session's mirror connection");
                    continue;
                }
                mirror = true;
                shared.conns.add(&stream);
                if let Err(why) = start_mirror(&shared, stream) {
                    shared.broken(why);
                }
            }
            Ok(other) => {
                tracing::warn!(
                    "colo: refusing a connection from {peer} that opened with {}",
                    other.kind()
                );
                refuse(&mut stream, "unexpected connection");
            }
            Err(e) => {
                tracing::warn!("colo: ignoring a connection from {peer}: {}", chain(&e));
            }
        }
    }
}

/// COLO: connects the SVM's NICs, starts the mirror's writer and reader.
fn start_mirror(shared: &Arc<Shared>, stream: TcpStream) -> Result<(), String> {
    let failed = |e: io::Error| format!("mirror connection: {e}");
    stream.set_read_timeout(None).map_err(failed)?;
    let mut writer = stream.try_clone().map_err(failed)?;
    shared.colo_net(&mut lock(&shared.replica))?;
    shared.mirror.open_direct(&stream).map_err(failed)?;
    let s = shared.clone();
    std::thread::Builder::new()
        .name("colo-mirror-tx".into())
        // A failed write decides nothing: the heartbeat does.
        .spawn(move || drop(s.mirror.drain(&mut writer)))
        .map_err(failed)?;
    let s = shared.clone();
    std::thread::Builder::new()
        .name("colo-mirror-rx".into())
        .spawn(move || mirror_in(s, stream))
        .map_err(failed)?;
    Ok(())
}

/// COLO: the primary's client frames, to the SVM's NICs.
fn mirror_in(shared: Arc<Shared>, mut stream: TcpStream) {
    loop {
        let why = match wire::read_message(&mut stream) {
            Ok(Message::Frame(f)) => {
                if shared.ended.load(Ordering::SeqCst) {
                    return;
                }
                // Cloned out: the sink is called without any lock (a load
                // holds the replica's for milliseconds).
                let sink = lock(&shared.inbound).clone();
                if let Some(sink) = sink {
                    // A full NIC queue drops the frame (counted there).
                    let _ = sink(f);
                }
                continue;
            }
            Ok(other) => format!("unexpected {} on the mirror connection", other.kind()),
            // As for the data connection: the heartbeat decides.
            Err(e) if e.is_disconnect() => return,
            Err(e) => format!("mirror connection: {}", chain(&e)),
        };
        return shared.broken(why);
    }
}

fn answer_pings(shared: Arc<Shared>, mut stream: TcpStream) {
    loop {
        match wire::read_message(&mut stream) {
            Ok(Message::Ping { seq }) => {
                shared.last_ping.store(shared.now_ms(), Ordering::SeqCst);
                // A failed write decides nothing: the read that follows
                // finds a goodbye queued before the end, or the end.
                if let Some(hb) = &mut *lock(&shared.heartbeat) {
                    let _ = wire::write_message(hb, &Message::Pong { seq });
                }
            }
            Ok(Message::Goodbye { reason }) => {
                tracing::warn!("colo: the primary ended replication: {reason}");
                shared.end(
                    State::Stopped,
                    Some(format!("the primary ended replication: {reason}")),
                );
                return;
            }
            Ok(other) => {
                let why = format!("unexpected {} on the heartbeat connection", other.kind());
                tracing::error!("colo: replication stopped: {why}");
                shared.end(State::Stopped, Some(why));
                return;
            }
            Err(e) => {
                return shared.primary_lost(format!("heartbeat connection: {}", chain(&e)));
            }
        }
    }
}

fn watchdog(shared: Arc<Shared>) {
    let timeout = shared.config.heartbeat_timeout_ms.max(1);
    let period = Duration::from_millis((timeout / 4).max(1));
    while !shared.ended.load(Ordering::SeqCst) {
        std::thread::sleep(period);
        let silent = shared
            .now_ms()
            .saturating_sub(shared.last_ping.load(Ordering::SeqCst));
        if silent > timeout {
            shared.primary_lost(format!("no heartbeat for {silent} ms"));
            return;
        }
    }
}

/// The data connection: disk hashes out, then everything staged in.
fn data(shared: Arc<Shared>, mut stream: TcpStream, mut staging: Staging) {
    if let Err(e) = send_hashes(&shared) {
        return shared.broken(format!("sending disk hashes: {e}"));
    }
    loop {
        let msg = match wire::read_message(&mut stream) {
            Ok(m) => m,
            Err(e) if e.is_disconnect() => {
                // The heartbeat decides: a primary that drops us says
                // goodbye there before closing; a dead one just closes
                // it. Its connection may not have been accepted yet (it
                // can trail the data connection), so no heartbeat yet
                // decides nothing either: the watchdog ends a session
                // whose heartbeat never comes.
                tracing::info!(
                    "colo: the primary closed the data connection ({}); the heartbeat decides",
                    chain(&e)
                );
                return;
            }
            Err(e) => return shared.broken(chain(&e)),
        };
        if shared.ended.load(Ordering::SeqCst) {
            return;
        }
        if let Message::Refused { reason } = msg {
            let text = format!("the primary refused replication: {reason}");
            tracing::error!("colo: {text}");
            shared.end(State::Stopped, Some(text.clone()));
            (shared.config.fatal)(text);
            return;
        }
        let staged = match staging.feed(msg) {
            Ok(s) => s,
            Err(e) => return shared.broken(e.0),
        };
        if let Err(why) = apply(&shared, staged) {
            return shared.broken(why);
        }
    }
}

/// Writes `msg` on the data connection.
fn send(shared: &Shared, msg: &Message) -> Result<(), String> {
    match &mut *lock(&shared.data_out) {
        Some(data) => wire::write_message(data, msg).map_err(|e| chain(&e)),
        None => Err("the data connection is gone".into()),
    }
}

fn send_hashes(shared: &Shared) -> Result<(), String> {
    let started = Instant::now();
    let count = lock(&shared.replica).disks.capacities().len();
    for disk in 0..count {
        let hashes = lock(&shared.replica)
            .disks
            .hashes(disk, SYNC_BLOCK)
            .map_err(|e| e.to_string())?;
        for (i, chunk) in hashes.chunks(HASHES_PER_MESSAGE).enumerate() {
            let msg = Message::DiskHashes {
                disk: disk as u16,
                block: SYNC_BLOCK,
                first: (i * HASHES_PER_MESSAGE) as u64,
                hashes: chunk.to_vec(),
            };
            send(shared, &msg)?;
        }
    }
    tracing::info!(
        "colo: hashed {count} disks in {:.1} ms",
        ms(started.elapsed())
    );
    Ok(())
}

/// Does what a staged message asks; an error ends replication.
fn apply(shared: &Shared, staged: Staged) -> Result<(), String> {
    let mut replica = lock(&shared.replica);
    if replica.over {
        return Ok(());
    }
    match staged {
        Staged::Nothing | Staged::Hello(_) => {}
        Staged::SyncPages(batch) => {
            replica
                .vm
                .write_pages(&batch)
                .map_err(|e| format!("writing sync pages: {e}"))?;
            lock(&shared.status).sync_pages += batch.len() as u64;
        }
        Staged::DiskBlock { disk, offset, data } => {
            replica
                .disks
                .write_direct(disk, offset, &data)
                .map_err(|e| format!("writing disk {disk} at {offset}: {e}"))?;
            lock(&shared.status).sync_disk_bytes += data.len() as u64;
        }
        Staged::DiskWrite(w) => {
            let epoch = w.epoch;
            replica
                .disks
                .stage(w)
                .map_err(|e| format!("staging a disk write of epoch {epoch}: {e}"))?;
        }
        Staged::HalfPages => fault::point(Role::Secondary, Point::MidMemory),
        Staged::StateIn => fault::point(Role::Secondary, Point::AfterState),
        Staged::Complete(checkpoint) => {
            let epoch = checkpoint.epoch;
            let colo = shared.config.mode == Mode::Colo;
            if colo {
                // Normally done when the mirror connection came; a
                // mirror connection still on its way finds it done.
                shared.colo_net(&mut replica)?;
            }
            load(&mut replica, checkpoint)?;
            if colo {
                replica
                    .vm
                    .run(epoch)
                    .map_err(|e| format!("running the SVM from checkpoint {epoch}: {e}"))?;
                shared.svm_epoch.store(epoch + 1, Ordering::SeqCst);
                *lock(&shared.proxy) = replica.vm.proxy_stats();
            }
            if epoch == 0 {
                tracing::info!("colo: checkpoint 0 loaded: protected");
            }
            // Loaded and committed: the status says so before the ack
            // (the primary may read its own before this side's).
            let mut status = lock(&shared.status);
            status.epoch = epoch;
            if epoch > 0 {
                status.checkpoints += 1;
            }
            // Replication may have ended during the load (the primary
            // said goodbye): the end's state stands. Checked under the
            // status lock, which the end takes after claiming.
            if !shared.ended.load(Ordering::SeqCst) {
                status.state = State::Protected;
                lock(&shared.metrics).state = Some(State::Protected);
            }
            drop(status);
            fault::point(Role::Secondary, Point::BeforeAck);
            send(shared, &Message::Ack { epoch })
                .map_err(|e| format!("acking checkpoint {epoch}: {e}"))?;
            fault::point(Role::Secondary, Point::AfterAck);
        }
    }
    Ok(())
}

/// Loads a complete checkpoint, commits its disk writes, checks its hash.
fn load(replica: &mut Replica, c: Checkpoint) -> Result<(), String> {
    let Checkpoint {
        epoch,
        pages,
        state,
        digest,
    } = c;
    let (page_count, state_len) = (pages.len(), state.len());
    let started = Instant::now();
    replica
        .vm
        .load(pages, state)
        .map_err(|e| format!("loading checkpoint {epoch}: {e}"))?;
    let disks = if epoch == 0 {
        replica.disks.flush()
    } else {
        replica.disks.commit(epoch)
    };
    disks.map_err(|e| format!("committing checkpoint {epoch}'s disk writes: {e}"))?;
    replica.loaded = true;
    if let Some(expected) = &digest {
        let got = replica
            .vm
            .digest()
            .map_err(|e| format!("hashing checkpoint {epoch}: {e}"))?;
        if got.hash != expected.hash {
            let parts = expected.differing_parts(&got);
            return Err(format!(
                "checkpoint {epoch}'s state hash differs after loading (parts: {})",
                parts.join(", ")
            ));
        }
    }
    tracing::debug!(
        "colo: checkpoint {epoch} loaded: {} pages, {} state bytes, {:.2} ms",
        page_count,
        state_len,
        ms(started.elapsed())
    );
    Ok(())
}
