//! The device thread: one event-manager loop over every virtio device's
//! queue-notify eventfds and backend fds.
//!
//! The VMM pauses it together with the vCPUs: a pause request is answered
//! only between two device events, so no request is half-processed while
//! the VM is paused (what a snapshot or a checkpoint needs).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// How long a caller waits for the device thread to acknowledge a command.
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
    #[error("the device thread did not acknowledge {0}")]
    NoAck(&'static str),
}

/// The control subscriber: wakes the loop and executes commands.
struct Control {
    evt: EventFd,
    commands: Receiver<Command>,
    acks: Sender<Command>,
    stop: Arc<AtomicBool>,
}

impl Control {
    fn execute(&mut self, command: Command) {
        let _ = self.acks.send(command);
        match command {
            Command::Stop => self.stop.store(true, Ordering::SeqCst),
            Command::Resume => {}
            Command::Pause => {
                // Block the whole loop until resumed or stopped.
                loop {
                    match self.commands.recv() {
                        Ok(Command::Pause) => {
                            let _ = self.acks.send(Command::Pause);
                        }
                        Ok(other) => {
                            self.execute(other);
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
        while let Ok(command) = self.commands.try_recv() {
            self.execute(command);
        }
    }
}

/// The running device thread.
pub struct DeviceLoop {
    thread: Option<JoinHandle<()>>,
    /// Holds a loop started paused before its first event.
    gate: Option<Sender<()>>,
    evt: EventFd,
    commands: Sender<Command>,
    acks: Receiver<Command>,
}

impl DeviceLoop {
    /// Starts the loop over `subscribers`; with `paused`, it handles no
    /// event before the first [`DeviceLoop::resume`]. `on_start` runs on the
    /// device thread before its first event.
    pub fn start(
        subscribers: Vec<Subscriber>,
        paused: bool,
        on_start: Box<dyn FnOnce() + Send>,
    ) -> Result<Self, DeviceLoopError> {
        let mut manager: EventManager<Subscriber> =
            EventManager::new().map_err(DeviceLoopError::EventManager)?;
        let evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceLoopError::Start)?;
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
        let thread = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                if paused && gate_rx.recv().is_err() {
                    return; // dropped before it was ever resumed
                }
                on_start();
                while !stop.load(Ordering::SeqCst) {
                    if let Err(e) = manager.run() {
                        tracing::error!("device loop: {e:?}");
                        break;
                    }
                }
            })
            .map_err(DeviceLoopError::Start)?;
        Ok(Self {
            thread: Some(thread),
            gate: paused.then_some(gate),
            evt,
            commands,
            acks,
        })
    }

    fn command(&self, command: Command, what: &'static str) -> Result<(), DeviceLoopError> {
        self.commands
            .send(command)
            .map_err(|_| DeviceLoopError::NoAck(what))?;
        let _ = self.evt.write(1);
        match self.acks.recv_timeout(ACK_TIMEOUT) {
            Ok(ack) if ack == command => Ok(()),
            _ => Err(DeviceLoopError::NoAck(what)),
        }
    }

    /// Returns once the loop is parked between two events.
    pub fn pause(&self) -> Result<(), DeviceLoopError> {
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
        if self.command(Command::Stop, "stop").is_err() {
            tracing::warn!("device loop: no answer to stop");
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
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
        let mut dl =
            DeviceLoop::start(vec![Arc::new(Mutex::new(counter))], false, Box::new(|| {})).unwrap();
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
        let mut dl =
            DeviceLoop::start(vec![Arc::new(Mutex::new(counter))], true, Box::new(|| {})).unwrap();
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
}
