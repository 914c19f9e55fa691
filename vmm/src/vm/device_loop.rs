//! Device threads: one event-manager loop per virtio device over its
//! queue-notify eventfds and backend fds ([`DeviceLoop`]), and the set of
//! them that pauses and resumes together ([`DeviceThreads`]). Disk I/O
//! never runs on the thread that serves the network.
//!
//! The VMM pauses them together with the vCPUs: a pause request is
//! answered only between two device events, so no request is
//! half-processed while the VM is paused (what a snapshot or a checkpoint
//! needs).

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A device for its own thread: name, the device, what the thread runs
/// before its first event.
pub type DeviceThread = (String, Subscriber, Box<dyn FnOnce() + Send>);

/// How long a caller waits for the device thread to acknowledge a command
/// by default.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Pause,
    Resume,
    Stop,
}

/// Errors driving the device thread.
#[derive(Debug, thiserror::Error)]
pub enum DeviceLoopError {
    #[error("cannot start the device thread: {0}")]
    Start(#[source] std::io::Error),
    #[error("cannot create the device event loop: {0:?}")]
    EventManager(event_manager::Error),
    #[error("the device thread did not acknowledge {0} in time")]
    NoAck(&'static str),
    #[error("the device thread died: {0}")]
    Died(String),
}

/// The control subscriber: wakes the loop and executes commands, each
/// acknowledged with its sequence number.
struct Control {
    evt: EventFd,
    commands: Receiver<(u64, Command)>,
    acks: Sender<u64>,
    stop: Arc<AtomicBool>,
}

impl Control {
    fn execute(&mut self, seq: u64, command: Command) {
        let _ = self.acks.send(seq);
        match command {
            Command::Stop => self.stop.store(true, Ordering::SeqCst),
            Command::Resume => {}
            Command::Pause => {
                // Block the whole loop until resumed or stopped.
                loop {
                    match self.commands.recv() {
                        Ok((seq, Command::Pause)) => {
                            let _ = self.acks.send(seq);
                        }
                        Ok((seq, other)) => {
                            self.execute(seq, other);
                            return;
                        }
                        Err(_) => {
                            self.stop.store(true, Ordering::SeqCst);
                            return;
                        }
                    }
                }
            }
        }
    }
}

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            tracing::error!("device loop: cannot watch its control eventfd: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        while let Ok((seq, command)) = self.commands.try_recv() {
            self.execute(seq, command);
        }
    }
}

/// Why the device thread ended before it was told to, once it has.
#[derive(Clone, Default)]
struct Failure(Arc<Mutex<Option<String>>>);

impl Failure {
    fn get(&self) -> Option<String> {
        devices::lock(&self.0).clone()
    }
}

/// The text of a panic's payload.
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// The running device thread.
pub struct DeviceLoop {
    thread: Option<JoinHandle<()>>,
    /// Holds a loop started paused before its first event.
    gate: Option<Sender<()>>,
    evt: EventFd,
    commands: Sender<(u64, Command)>,
    acks: Receiver<u64>,
    next_seq: u64,
    ack_timeout: Duration,
    /// Written once when the thread dies (panics or its loop fails).
    died: EventFd,
    failure: Failure,
}

impl DeviceLoop {
    /// Starts the loop over `subscribers`; with `paused`, it handles no
    /// event before the first [`DeviceLoop::resume`]. `on_start` runs on the
    /// device thread before its first event.
    pub fn start(
        name: &str,
        subscribers: Vec<Subscriber>,
        paused: bool,
        on_start: Box<dyn FnOnce() + Send>,
    ) -> Result<Self, DeviceLoopError> {
        let mut manager: EventManager<Subscriber> =
            EventManager::new().map_err(DeviceLoopError::EventManager)?;
        let evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceLoopError::Start)?;
        let died = EventFd::new(EFD_NONBLOCK).map_err(DeviceLoopError::Start)?;
        let (commands, commands_rx) = mpsc::channel();
        let (acks_tx, acks) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let control = Control {
            evt: evt.try_clone().map_err(DeviceLoopError::Start)?,
            commands: commands_rx,
            acks: acks_tx,
            stop: stop.clone(),
        };
        manager.add_subscriber(Arc::new(Mutex::new(control)));
        for s in subscribers {
            manager.add_subscriber(s);
        }
        let (gate, gate_rx) = mpsc::channel::<()>();
        let failure = Failure::default();
        let (thread_failure, thread_died) = (
            failure.clone(),
            died.try_clone().map_err(DeviceLoopError::Start)?,
        );
        let thread = std::thread::Builder::new()
            .name(format!("dev-{name}"))
            .spawn(move || {
                if paused && gate_rx.recv().is_err() {
                    return; // dropped before it was ever resumed
                }
                // A device that panics must end the VM, not leave it running
                // without devices (release builds abort on panic anyway).
                let run = std::panic::catch_unwind(AssertUnwindSafe(move || {
                    on_start();
                    while !stop.load(Ordering::SeqCst) {
                        manager.run().map_err(|e| format!("event loop: {e:?}"))?;
                    }
                    Ok::<(), String>(())
                }));
                let reason = match run {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => e,
                    Err(payload) => format!("panicked: {}", panic_text(payload.as_ref())),
                };
                tracing::error!("device thread died: {reason}");
                *devices::lock(&thread_failure.0) = Some(reason);
                let _ = thread_died.write(1);
            })
            .map_err(DeviceLoopError::Start)?;
        Ok(Self {
            thread: Some(thread),
            gate: paused.then_some(gate),
            evt,
            commands,
            acks,
            next_seq: 0,
            ack_timeout: ACK_TIMEOUT,
            died,
            failure,
        })
    }

    /// How long a command waits for its acknowledgement.
    pub fn set_ack_timeout(&mut self, timeout: Duration) {
        self.ack_timeout = timeout;
    }

    /// Readable once the device thread has died; see [`DeviceLoop::failure`].
    pub fn died_evt(&self) -> &EventFd {
        &self.died
    }

    /// Why the device thread died, if it has.
    pub fn failure(&self) -> Option<DeviceLoopError> {
        self.failure.get().map(DeviceLoopError::Died)
    }

    /// Sends `command` and waits for its own acknowledgement: a late one
    /// for an earlier command that timed out is skipped.
    fn command(&mut self, command: Command, what: &'static str) -> Result<(), DeviceLoopError> {
        self.next_seq += 1;
        let seq = self.next_seq;
        let gone = |this: &Self| this.failure().unwrap_or(DeviceLoopError::NoAck(what));
        if self.commands.send((seq, command)).is_err() {
            return Err(gone(self));
        }
        let _ = self.evt.write(1);
        let deadline = Instant::now() + self.ack_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.acks.recv_timeout(left) {
                Ok(ack) if ack == seq => return Ok(()),
                Ok(_) => {} // the answer to an earlier command
                Err(RecvTimeoutError::Timeout) => return Err(DeviceLoopError::NoAck(what)),
                Err(RecvTimeoutError::Disconnected) => return Err(gone(self)),
            }
        }
    }

    /// Returns once the loop is parked between two events.
    pub fn pause(&mut self) -> Result<(), DeviceLoopError> {
        if self.gate.is_some() {
            return Ok(()); // not started yet
        }
        self.command(Command::Pause, "pause")
    }

    /// Lets the loop run again.
    pub fn resume(&mut self) -> Result<(), DeviceLoopError> {
        if let Some(gate) = self.gate.take() {
            return gate.send(()).map_err(|_| DeviceLoopError::NoAck("resume"));
        }
        self.command(Command::Resume, "resume")
    }
}

impl Drop for DeviceLoop {
    fn drop(&mut self) {
        if let Some(gate) = self.gate.take() {
            let _ = gate.send(());
        }
        if let Err(e) = self.command(Command::Stop, "stop") {
            tracing::warn!("device loop: no answer to stop: {e}");
            // A loop stuck in a device would never end: leave it.
            if self.failure.get().is_none() {
                return;
            }
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One [`DeviceLoop`] per device, paused and resumed together.
pub struct DeviceThreads(Vec<DeviceLoop>);

impl DeviceThreads {
    /// Starts a thread per `(name, device, on_start)`.
    pub fn start(devices: Vec<DeviceThread>, paused: bool) -> Result<Self, DeviceLoopError> {
        devices
            .into_iter()
            .map(|(name, device, on_start)| {
                DeviceLoop::start(&name, vec![device], paused, on_start)
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    /// Parks every thread between two events. On an error some may be
    /// parked: the caller rolls back with [`DeviceThreads::resume`].
    pub fn pause(&mut self) -> Result<(), DeviceLoopError> {
        self.0.iter_mut().try_for_each(DeviceLoop::pause)
    }

    /// Lets every thread run again (a running one is left running); the
    /// first error, after trying them all.
    pub fn resume(&mut self) -> Result<(), DeviceLoopError> {
        let mut first = None;
        for dl in &mut self.0 {
            if let Err(e) = dl.resume() {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// One eventfd per thread, readable once it died.
    pub fn died_evts(&self) -> impl Iterator<Item = &EventFd> {
        self.0.iter().map(DeviceLoop::died_evt)
    }

    /// Why a device thread died, if one has.
    pub fn failure(&self) -> Option<DeviceLoopError> {
        self.0.iter().find_map(DeviceLoop::failure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// Counts its eventfd's events.
    struct Counter {
        evt: EventFd,
        seen: Arc<AtomicU64>,
    }

    impl MutEventSubscriber for Counter {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let n = self.evt.read().unwrap();
            self.seen.fetch_add(n, Ordering::SeqCst);
        }
    }

    #[test]
    fn paused_loop_processes_nothing_until_resumed() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let seen = Arc::new(AtomicU64::new(0));
        let counter = Counter {
            evt: evt.try_clone().unwrap(),
            seen: seen.clone(),
        };
        let mut dl = DeviceLoop::start(
            "test",
            vec![Arc::new(Mutex::new(counter))],
            false,
            Box::new(|| {}),
        )
        .unwrap();
        dl.pause().unwrap();
        evt.write(3).unwrap();
        // A second pause round-trips through the parked loop: had the loop
        // been running, it would have seen the event before acknowledging.
        dl.pause().unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 0);
        dl.resume().unwrap();
        // After resume, the loop drains the event before it acknowledges
        // another command only if it ran; pause again and check.
        let deadline = std::time::Instant::now() + ACK_TIMEOUT;
        while seen.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
            dl.pause().unwrap();
            dl.resume().unwrap();
        }
        assert_eq!(seen.load(Ordering::SeqCst), 3);
        drop(dl);
    }

    #[test]
    fn a_loop_started_paused_waits_for_resume() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let seen = Arc::new(AtomicU64::new(0));
        let counter = Counter {
            evt: evt.try_clone().unwrap(),
            seen: seen.clone(),
        };
        evt.write(2).unwrap();
        let mut dl = DeviceLoop::start(
            "test",
            vec![Arc::new(Mutex::new(counter))],
            true,
            Box::new(|| {}),
        )
        .unwrap();
        dl.pause().unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 0);
        dl.resume().unwrap();
        // Once running, a pause is acknowledged only between events, after
        // the pending one was handled.
        dl.pause().unwrap();
        dl.resume().unwrap();
        dl.pause().unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 2);
    }

    /// Panics on its first event.
    struct Panicker(EventFd);

    impl MutEventSubscriber for Panicker {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.0, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            panic!("device model bug");
        }
    }

    /// Blocks in its first event until released: a device stuck in I/O.
    struct Blocker {
        evt: EventFd,
        entered: Sender<()>,
        release: Receiver<()>,
    }

    impl MutEventSubscriber for Blocker {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let _ = self.evt.read();
            let _ = self.entered.send(());
            let _ = self.release.recv();
        }
    }

    /// A device that gets stuck when `stuck` is written, and a counter of
    /// `evt`'s events, with the handles to drive them.
    struct Pair {
        blocker: Blocker,
        entered: Receiver<()>,
        release: Sender<()>,
        stuck: EventFd,
        counter: Counter,
        evt: EventFd,
        seen: Arc<AtomicU64>,
    }

    impl Pair {
        fn new() -> Self {
            let (entered_tx, entered) = mpsc::channel();
            let (release, release_rx) = mpsc::channel();
            let stuck = EventFd::new(EFD_NONBLOCK).unwrap();
            let evt = EventFd::new(EFD_NONBLOCK).unwrap();
            let seen = Arc::new(AtomicU64::new(0));
            Self {
                blocker: Blocker {
                    evt: stuck.try_clone().unwrap(),
                    entered: entered_tx,
                    release: release_rx,
                },
                entered,
                release,
                stuck,
                counter: Counter {
                    evt: evt.try_clone().unwrap(),
                    seen: seen.clone(),
                },
                evt,
                seen,
            }
        }
    }

    /// Waits up to `ACK_TIMEOUT` for `evt` to become readable.
    fn wait_readable(evt: &EventFd) -> bool {
        use std::os::fd::AsRawFd;
        let mut fd = libc::pollfd {
            fd: evt.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut fd, 1, ACK_TIMEOUT.as_millis() as i32) };
        n == 1
    }

    #[test]
    fn a_panicking_device_ends_the_loop_with_an_error() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let panicker = Panicker(evt.try_clone().unwrap());
        let mut dl = DeviceLoop::start(
            "test",
            vec![Arc::new(Mutex::new(panicker))],
            false,
            Box::new(|| {}),
        )
        .unwrap();
        assert!(dl.failure().is_none());
        evt.write(1).unwrap();
        assert!(wait_readable(dl.died_evt()), "no death reported");
        let e = dl.pause().unwrap_err();
        assert!(e.to_string().contains("device model bug"), "{e}");
        assert!(dl.failure().is_some());
    }

    #[test]
    fn a_pause_that_times_out_is_rolled_back_and_late_acks_answer_nothing() {
        let p = Pair::new();
        let subscribers: Vec<Subscriber> = vec![
            Arc::new(Mutex::new(p.blocker)),
            Arc::new(Mutex::new(p.counter)),
        ];
        let mut dl = DeviceLoop::start("test", subscribers, false, Box::new(|| {})).unwrap();
        dl.set_ack_timeout(Duration::from_millis(200));
        p.stuck.write(1).unwrap();
        p.entered.recv_timeout(ACK_TIMEOUT).unwrap();

        // The device never gets back to the loop: the pause fails, and so
        // does the rollback's resume (it is queued behind the pause).
        assert!(matches!(dl.pause(), Err(DeviceLoopError::NoAck("pause"))));
        assert!(matches!(dl.resume(), Err(DeviceLoopError::NoAck("resume"))));
        dl.set_ack_timeout(ACK_TIMEOUT);
        p.release.send(()).unwrap();

        // Once unstuck, the loop runs (the queued resume undid the pause):
        // an event is handled without any further command.
        p.evt.write(5).unwrap();
        let deadline = Instant::now() + ACK_TIMEOUT;
        while p.seen.load(Ordering::SeqCst) != 5 {
            assert!(Instant::now() < deadline, "the loop stayed parked");
            std::thread::yield_now();
        }
        // The late acknowledgements of the failed pause and resume do not
        // answer these: a pause holds until the resume.
        dl.pause().unwrap();
        p.evt.write(1).unwrap();
        dl.pause().unwrap();
        assert_eq!(p.seen.load(Ordering::SeqCst), 5);
        dl.resume().unwrap();
    }

    #[test]
    fn device_threads_pause_together_and_roll_back_when_one_is_stuck() {
        let p = Pair::new();
        let noop = || -> Box<dyn FnOnce() + Send> { Box::new(|| {}) };
        let mut threads = DeviceThreads::start(
            vec![
                (
                    "net0".into(),
                    Arc::new(Mutex::new(p.counter)) as Subscriber,
                    noop(),
                ),
                (
                    "blk0".into(),
                    Arc::new(Mutex::new(p.blocker)) as Subscriber,
                    noop(),
                ),
            ],
            false,
        )
        .unwrap();
        // Both pause; while paused, the p.counter's device sees nothing.
        threads.pause().unwrap();
        p.evt.write(1).unwrap();
        threads.pause().unwrap();
        assert_eq!(p.seen.load(Ordering::SeqCst), 0);
        threads.resume().unwrap();

        // The disk's thread gets stuck: the next pause fails, and the
        // rollback lets the network's thread run on meanwhile.
        p.stuck.write(1).unwrap();
        p.entered.recv_timeout(ACK_TIMEOUT).unwrap();
        for dl in &mut threads.0 {
            dl.set_ack_timeout(Duration::from_millis(200));
        }
        assert!(threads.pause().is_err());
        assert!(threads.resume().is_err());
        p.evt.write(1).unwrap();
        let deadline = Instant::now() + ACK_TIMEOUT;
        while p.seen.load(Ordering::SeqCst) < 2 {
            assert!(
                Instant::now() < deadline,
                "the network thread stayed parked"
            );
            std::thread::yield_now();
        }
        p.release.send(()).unwrap();
    }
}
