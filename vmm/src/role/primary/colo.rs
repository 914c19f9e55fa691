//! The primary's NICs in COLO mode: each NIC's output goes through a
//! [`Compare`] once checkpoint 0 paused the guest (before: pass-through);
//! the frames the guest receives are mirrored to the secondary, tagged
//! with the epoch the guest is in.
//!
//! ```text
//! device thread   send(frame)  -> compare.primary   -> tap / checkpoint ask
//!                 recv(frame)  -> mirror sink (PeerFrame{epoch, nic})
//! mirror reader   secondary_frame -> compare.secondary -> tap / ask
//! "colo-compare"  at the earliest next_deadline: compare.poll -> tap / ask
//! engine          close_epoch(N) (guest paused) -> compare.checkpoint(N)
//!                 release(N) -> committed(N) -> tap
//!                 release_all -> everything -> tap, pass-through, no mirror
//! ```

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use colo::control::{Cause, ProxyStats};
use colo::vm::{FrameSink, OutputControl, PeerFrame};
use devices::lock;
use devices::ratelimit::LogLimit;
use devices::virtio::{NetBackend, Tap};
use net_proxy::compare::{self, Compare, CompareConfig, CompareStats, Outcome};

use super::Trigger;

/// Where a NIC's released frames go: its tap (a list in tests).
pub(crate) trait FrameOut: Send {
    fn put(&mut self, frame: &[u8]) -> io::Result<()>;
}

impl FrameOut for Tap {
    fn put(&mut self, frame: &[u8]) -> io::Result<()> {
        NetBackend::send(self, frame)
    }
}

/// One NIC's output.
struct Nic {
    /// `None`: pass-through (before the first checkpoint, after
    /// `release_all`).
    compare: Option<Compare>,
    /// The counters of compares that ended (`release_all`).
    ended: CompareStats,
    out: Box<dyn FrameOut>,
}

/// Sends released `frames` to `out` in order; one that fails is logged
/// (rate-limited) and skipped. Remus and COLO release through it.
pub(crate) fn put_all(out: &mut dyn FrameOut, frames: impl IntoIterator<Item = impl AsRef<[u8]>>) {
    static LIMIT: LogLimit = LogLimit::every_ms(1000);
    for frame in frames {
        if let Err(e) = out.put(frame.as_ref()) {
            if LIMIT.allow().is_some() {
                tracing::warn!("a released frame did not go out: {e}");
            }
        }
    }
}

impl Nic {
    /// Sends `frames` to the tap, in order (called with the NIC locked, so
    /// releases and passed-through frames keep the guest's order).
    fn send(&mut self, frames: impl IntoIterator<Item = impl AsRef<[u8]>>) {
        put_all(self.out.as_mut(), frames);
    }

    /// The compare's gauges and the counters since the first compare.
    fn stats(&self) -> CompareStats {
        let now = self
            .compare
            .as_ref()
            .map(Compare::stats)
            .unwrap_or_default();
        with_counters(&self.ended, now)
    }
}

/// `now` with the counters of `ended` added.
fn with_counters(ended: &CompareStats, now: CompareStats) -> CompareStats {
    CompareStats {
        compared: ended.compared + now.compared,
        matched: ended.matched + now.matched,
        stale_dropped: ended.stale_dropped + now.stale_dropped,
        dropped: ended.dropped + now.dropped,
        ..now
    }
}

/// Wakes the "colo-compare" thread when a deadline may have come earlier.
#[derive(Default)]
struct Timer {
    state: Mutex<TimerState>,
    wake: Condvar,
}

#[derive(Default)]
struct TimerState {
    /// Bumped at each wake-up call.
    changes: u64,
    stop: bool,
}

/// Every NIC of the primary in COLO mode.
pub(crate) struct ColoNics {
    nics: Vec<Mutex<Nic>>,
    config: Mutex<CompareConfig>,
    /// The epoch the guest is in: advanced in `close_epoch`, with the
    /// guest paused.
    epoch: AtomicU64,
    mirror: RwLock<Option<FrameSink>>,
    trigger: Trigger,
    timer: Timer,
    /// SVM frames for a NIC that does not exist or does not compare.
    dropped: AtomicU64,
}

/// The engine's checkpoint cause for the compare's.
fn cause(c: compare::Cause) -> Cause {
    match c {
        compare::Cause::Mismatch => Cause::Mismatch,
        compare::Cause::Timeout => Cause::Timeout,
        compare::Cause::HeldBytes => Cause::HeldBytes,
    }
}

/// Whether `after` is a deadline earlier than `before` (or a first one).
fn earlier(before: Option<Instant>, after: Option<Instant>) -> bool {
    match (before, after) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(b), Some(a)) => a < b,
    }
}

impl ColoNics {
    /// NICs sending to `outs` (guest order), comparing with `config` once
    /// the first checkpoint closes; `trigger` asks for checkpoints.
    pub(crate) fn new(
        outs: Vec<Box<dyn FrameOut>>,
        config: CompareConfig,
        trigger: Trigger,
    ) -> Arc<Self> {
        Arc::new(Self {
            nics: outs
                .into_iter()
                .map(|out| {
                    Mutex::new(Nic {
                        compare: None,
                        ended: CompareStats::default(),
                        out,
                    })
                })
                .collect(),
            config: Mutex::new(config),
            epoch: AtomicU64::new(0),
            mirror: RwLock::new(None),
            trigger,
            timer: Timer::default(),
            dropped: AtomicU64::new(0),
        })
    }

    fn nic(&self, i: usize) -> Option<MutexGuard<'_, Nic>> {
        self.nics.get(i).map(lock)
    }

    /// Feeds NIC `i`'s compare (`None`: pass-through, `frame` goes out),
    /// sends what it releases, wakes the timer when a deadline came
    /// earlier, and asks for the checkpoint it wants.
    fn feed(&self, i: usize, frame: Option<&[u8]>, call: impl FnOnce(&mut Compare) -> Outcome) {
        let Some(mut nic) = self.nic(i) else { return };
        let (outcome, kick) = match nic.compare.as_mut() {
            Some(compare) => {
                let before = compare.next_deadline();
                let outcome = call(compare);
                (outcome, earlier(before, compare.next_deadline()))
            }
            None => {
                nic.send(frame);
                return;
            }
        };
        nic.send(outcome.release);
        drop(nic);
        if kick {
            self.wake();
        }
        if let Some(c) = outcome.checkpoint {
            self.ask(cause(c));
        }
    }

    /// A frame the guest sent on NIC `i` (device thread).
    pub(crate) fn primary(&self, i: usize, frame: &[u8]) {
        self.feed(i, Some(frame), |c| {
            c.primary(frame.to_vec(), Instant::now())
        });
    }

    /// A frame the SVM sent (the engine's mirror reader).
    pub(crate) fn secondary(&self, frame: PeerFrame) {
        let i = usize::from(frame.nic);
        let comparing = self.nic(i).map(|n| n.compare.is_some());
        if comparing != Some(true) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            if comparing.is_none() {
                static LIMIT: LogLimit = LogLimit::every_ms(1000);
                if let Some(suppressed) = LIMIT.allow() {
                    tracing::warn!(nic = frame.nic, suppressed, "SVM frame for no NIC, dropped");
                }
            }
            return;
        }
        let now = Instant::now();
        self.feed(i, None, |c| c.secondary(frame.epoch, &frame.data, now));
    }

    /// A frame the guest received on NIC `i` from its tap (device
    /// thread): a copy goes to the mirror, if any.
    pub(crate) fn mirror(&self, i: usize, data: &[u8]) {
        let sink = self.mirror.read().unwrap_or_else(|e| e.into_inner());
        let (Some(sink), Ok(nic)) = (sink.as_ref(), u16::try_from(i)) else {
            return;
        };
        // A refused frame is counted by the engine; the SVM diverges and
        // the compare realigns the pair.
        let _ = sink(PeerFrame {
            epoch: self.epoch.load(Ordering::SeqCst),
            nic,
            data: data.to_vec(),
        });
    }

    /// Timeouts of every NIC; returns the earliest next deadline.
    fn poll(&self, now: Instant) -> Option<Instant> {
        let mut earliest: Option<Instant> = None;
        for i in 0..self.nics.len() {
            let mut next = None;
            self.feed(i, None, |c| {
                let outcome = c.poll(now);
                next = c.next_deadline();
                outcome
            });
            earliest = match (earliest, next) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        earliest
    }

    /// Where epoch `epoch` ends, told while the guest is paused: NICs
    /// that pass through start comparing epoch + 1, the others close it.
    pub(crate) fn close_epoch(&self, epoch: u64) {
        let config = *lock(&self.config);
        for nic in &self.nics {
            let mut nic = lock(nic);
            match nic.compare.as_mut() {
                Some(compare) => compare.checkpoint(epoch),
                None => nic.compare = Some(Compare::new(config, epoch + 1)),
            }
        }
        self.epoch.store(epoch + 1, Ordering::SeqCst);
    }

    /// Changes every NIC's compare timeout.
    pub(crate) fn set_timeout(&self, timeout: Duration) {
        lock(&self.config).timeout = timeout;
        for nic in &self.nics {
            if let Some(compare) = lock(nic).compare.as_mut() {
                compare.set_timeout(timeout);
            }
        }
        self.wake();
    }

    pub(crate) fn timeout(&self) -> Duration {
        lock(&self.config).timeout
    }

    fn ask(&self, cause: Cause) {
        if let Some(trigger) = self.trigger.get() {
            trigger(cause);
        }
    }

    fn wake(&self) {
        lock(&self.timer.state).changes += 1;
        self.timer.wake.notify_one();
    }

    /// The "colo-compare" thread: polls at the earliest deadline, or
    /// when woken; ends when `stop` is set.
    fn run_timer(&self) {
        let mut seen = 0;
        loop {
            let deadline = self.poll(Instant::now());
            let mut state = lock(&self.timer.state);
            loop {
                if state.stop {
                    return;
                }
                if state.changes != seen {
                    seen = state.changes;
                    break;
                }
                let now = Instant::now();
                state = match deadline {
                    Some(d) if d <= now => break,
                    Some(d) => {
                        self.timer
                            .wake
                            .wait_timeout(state, d - now)
                            .unwrap_or_else(|e| e.into_inner())
                            .0
                    }
                    None => self
                        .timer
                        .wake
                        .wait(state)
                        .unwrap_or_else(|e| e.into_inner()),
                };
            }
        }
    }
}

/// The primary's output in COLO mode, as the engine drives it; its drop
/// ends the "colo-compare" thread.
pub(crate) struct ColoOutput {
    nics: Arc<ColoNics>,
}

impl ColoOutput {
    /// Starts the "colo-compare" thread over `nics`.
    pub(crate) fn start(nics: Arc<ColoNics>) -> io::Result<Self> {
        let timer = nics.clone();
        std::thread::Builder::new()
            .name("colo-compare".into())
            .spawn(move || timer.run_timer())?;
        Ok(Self { nics })
    }
}

impl Drop for ColoOutput {
    fn drop(&mut self) {
        lock(&self.nics.timer.state).stop = true;
        self.nics.timer.wake.notify_one();
    }
}

impl OutputControl for ColoOutput {
    fn release(&mut self, epoch: u64) {
        for nic in &self.nics.nics {
            let mut nic = lock(nic);
            if let Some(frames) = nic.compare.as_mut().map(|c| c.committed(epoch)) {
                nic.send(frames);
            }
        }
    }

    fn release_all(&mut self) {
        *self.nics.mirror.write().unwrap_or_else(|e| e.into_inner()) = None;
        for nic in &self.nics.nics {
            let mut nic = lock(nic);
            if let Some(mut compare) = nic.compare.take() {
                let frames = compare.release_all();
                nic.ended = with_counters(&nic.ended, compare.stats());
                nic.send(frames);
            }
        }
    }

    fn held(&self) -> (u64, u64) {
        self.nics.nics.iter().fold((0, 0), |(f, b), nic| {
            let s = lock(nic).stats();
            (f + s.held_frames, b + s.held_bytes)
        })
    }

    fn mirror(&mut self, sink: FrameSink) {
        *self.nics.mirror.write().unwrap_or_else(|e| e.into_inner()) = Some(sink);
    }

    fn secondary_frame(&mut self, frame: PeerFrame) {
        self.nics.secondary(frame);
    }

    fn proxy_stats(&self) -> ProxyStats {
        let mut p = ProxyStats {
            dropped_frames: self.nics.dropped.load(Ordering::Relaxed),
            ..ProxyStats::default()
        };
        for nic in &self.nics.nics {
            let s = lock(nic).stats();
            p.compared_frames += s.compared;
            p.matched_frames += s.matched;
            p.held_frames += s.held_frames;
            p.queue_depth += s.queue_depth;
            p.connections += s.connections;
            p.dropped_frames += s.stale_dropped + s.dropped;
        }
        p
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// A tap's far side: the frames that went out.
    #[derive(Clone, Default)]
    struct Wire(Arc<Mutex<Vec<Vec<u8>>>>);

    impl FrameOut for Wire {
        fn put(&mut self, frame: &[u8]) -> io::Result<()> {
            lock(&self.0).push(frame.to_vec());
            Ok(())
        }
    }

    impl Wire {
        fn take(&self) -> Vec<Vec<u8>> {
            std::mem::take(&mut *lock(&self.0))
        }
    }

    /// A frame compared whole (an unknown ethertype), `tag` its payload.
    fn frame(tag: u8) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x88, 0xb5];
        f.extend([tag; 50]);
        f
    }

    /// Two NICs on wires, the checkpoints they ask for on a channel.
    struct Setup {
        nics: Arc<ColoNics>,
        output: ColoOutput,
        wires: [Wire; 2],
        asked: mpsc::Receiver<Cause>,
    }

    fn setup(timeout: Duration) -> Setup {
        setup_with(CompareConfig {
            timeout,
            ..CompareConfig::default()
        })
    }

    fn setup_with(config: CompareConfig) -> Setup {
        let wires = [Wire::default(), Wire::default()];
        let (tx, asked) = mpsc::channel();
        let trigger: Trigger = Arc::default();
        let _ = trigger.set(Box::new(move |cause| {
            let _ = tx.send(cause);
        }));
        let outs: Vec<Box<dyn FrameOut>> = wires
            .iter()
            .map(|w| Box::new(w.clone()) as Box<dyn FrameOut>)
            .collect();
        let nics = ColoNics::new(outs, config, trigger);
        let output = ColoOutput::start(nics.clone()).unwrap();
        Setup {
            nics,
            output,
            wires,
            asked,
        }
    }

    /// A timeout no test reaches.
    const NEVER: Duration = Duration::from_secs(3600);

    fn svm(epoch: u64, nic: u16, data: Vec<u8>) -> PeerFrame {
        PeerFrame { epoch, nic, data }
    }

    #[test]
    fn frames_pass_through_before_checkpoint_0() {
        let s = setup(NEVER);
        s.nics.primary(0, &frame(1));
        s.nics.primary(1, &frame(2));
        assert_eq!(s.wires[0].take(), [frame(1)]);
        assert_eq!(s.wires[1].take(), [frame(2)]);
        assert_eq!(s.output.held(), (0, 0));
        assert_eq!(s.output.proxy_stats().compared_frames, 0);
        assert!(s.asked.try_recv().is_err());
    }

    #[test]
    fn equal_frames_go_out_at_once() {
        let mut s = setup(NEVER);
        s.nics.close_epoch(0);
        s.nics.primary(0, &frame(1));
        assert!(s.wires[0].take().is_empty(), "held until the SVM sent it");
        assert_eq!(s.output.held(), (1, frame(1).len() as u64));
        s.output.secondary_frame(svm(1, 0, frame(1)));
        assert_eq!(s.wires[0].take(), [frame(1)]);
        // The SVM first this time.
        s.output.secondary_frame(svm(1, 1, frame(3)));
        assert_eq!(s.output.proxy_stats().queue_depth, 1);
        s.nics.primary(1, &frame(3));
        assert_eq!(s.wires[1].take(), [frame(3)]);
        assert_eq!(s.output.held(), (0, 0));
        let p = s.output.proxy_stats();
        assert_eq!((p.compared_frames, p.matched_frames), (2, 2));
        assert_eq!((p.held_frames, p.queue_depth), (0, 0));
        assert!(s.asked.try_recv().is_err());
    }

    #[test]
    fn a_difference_asks_for_a_checkpoint_and_its_frame_waits_for_the_ack() {
        let mut s = setup(NEVER);
        s.nics.close_epoch(0);
        s.nics.primary(0, &frame(1));
        s.output.secondary_frame(svm(1, 0, frame(9)));
        assert_eq!(s.asked.try_recv(), Ok(Cause::Mismatch));
        assert!(s.wires[0].take().is_empty());
        // Checkpoint 1 closes the epoch; its frame goes out at its ack.
        s.nics.close_epoch(1);
        s.nics.primary(0, &frame(2));
        s.output.release(0);
        assert!(
            s.wires[0].take().is_empty(),
            "not before checkpoint 1's ack"
        );
        s.output.release(1);
        assert_eq!(s.wires[0].take(), [frame(1)]);
        // Epoch 2 compares from a fresh start: frame 2 matches.
        s.output.secondary_frame(svm(2, 0, frame(2)));
        assert_eq!(s.wires[0].take(), [frame(2)]);
        assert!(s.asked.try_recv().is_err());
    }

    #[test]
    fn the_timer_asks_for_a_checkpoint_when_a_twin_does_not_come() {
        let s = setup(Duration::from_millis(1));
        s.nics.close_epoch(0);
        s.nics.primary(1, &frame(1));
        let cause = s.asked.recv_timeout(Duration::from_secs(30));
        assert_eq!(cause, Ok(Cause::Timeout));
        assert!(s.wires[1].take().is_empty());
        // The timer asked from its poll of NIC 1, the last: that poll
        // found no deadline left, so the timer sleeps until woken. A
        // frame on NIC 0 must wake it.
        s.nics.close_epoch(1);
        s.nics.primary(0, &frame(2));
        let cause = s.asked.recv_timeout(Duration::from_secs(30));
        assert_eq!(cause, Ok(Cause::Timeout));
    }

    #[test]
    fn a_shorter_timeout_applies_to_the_frames_held() {
        let s = setup(NEVER);
        s.nics.close_epoch(0);
        s.nics.primary(0, &frame(1));
        assert_eq!(s.nics.timeout(), NEVER);
        s.nics.set_timeout(Duration::from_millis(1));
        assert_eq!(s.nics.timeout(), Duration::from_millis(1));
        let cause = s.asked.recv_timeout(Duration::from_secs(30));
        assert_eq!(cause, Ok(Cause::Timeout));
    }

    #[test]
    fn too_many_held_bytes_ask_for_a_checkpoint() {
        let s = setup_with(CompareConfig {
            timeout: NEVER,
            held_bytes_max: 100,
            ..CompareConfig::default()
        });
        s.nics.close_epoch(0);
        s.nics.primary(0, &frame(1));
        assert!(s.asked.try_recv().is_err());
        s.nics.primary(0, &frame(2));
        assert_eq!(s.asked.try_recv(), Ok(Cause::HeldBytes));
    }

    /// The mirror's frames, collected.
    fn mirror(output: &mut ColoOutput) -> Arc<Mutex<Vec<PeerFrame>>> {
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        output.mirror(Arc::new(move |f| {
            lock(&sink).push(f);
            Ok(())
        }));
        got
    }

    #[test]
    fn mirrored_frames_carry_the_epoch_the_guest_is_in() {
        let mut s = setup(NEVER);
        s.nics.mirror(0, &frame(1));
        let got = mirror(&mut s.output);
        s.nics.mirror(0, &frame(2));
        s.nics.close_epoch(0);
        s.nics.mirror(1, &frame(3));
        s.nics.close_epoch(1);
        s.nics.mirror(0, &frame(4));
        assert_eq!(
            *lock(&got),
            [
                svm(0, 0, frame(2)),
                svm(1, 1, frame(3)),
                svm(2, 0, frame(4))
            ]
        );
    }

    #[test]
    fn release_all_sends_everything_and_stops_comparing_and_mirroring() {
        let mut s = setup(NEVER);
        let got = mirror(&mut s.output);
        s.nics.close_epoch(0);
        s.nics.primary(0, &frame(1));
        s.nics.close_epoch(1);
        s.nics.primary(0, &frame(2));
        s.nics.primary(1, &frame(3));
        s.output.release_all();
        assert_eq!(s.wires[0].take(), [frame(1), frame(2)]);
        assert_eq!(s.wires[1].take(), [frame(3)]);
        assert_eq!(s.output.held(), (0, 0));
        s.nics.primary(0, &frame(4));
        assert_eq!(s.wires[0].take(), [frame(4)]);
        s.nics.mirror(0, &frame(5));
        assert!(lock(&got).is_empty());
        // The counters stay.
        assert_eq!(s.output.proxy_stats().compared_frames, 3);
        // A later SVM frame is dropped and counted.
        s.output.secondary_frame(svm(2, 0, frame(2)));
        assert_eq!(s.output.proxy_stats().dropped_frames, 1);
    }

    #[test]
    fn an_svm_frame_for_no_nic_is_dropped_and_counted() {
        let mut s = setup(NEVER);
        s.nics.close_epoch(0);
        s.nics.primary(0, &frame(1));
        s.output.secondary_frame(svm(1, 7, frame(1)));
        assert_eq!(s.output.proxy_stats().dropped_frames, 1);
        assert!(s.wires[0].take().is_empty());
        assert_eq!(s.output.held().0, 1);
    }
}
