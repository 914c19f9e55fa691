//! What the control API sees of replication: status, metrics, commands.
//!
//! This module is the contract between `colo` and `vmm`'s API: change it
//! only together with both sides.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which side of the pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Secondary,
}

/// How the pair replicates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The secondary is a paused replica; output waits for its checkpoint.
    Remus,
    /// The secondary runs in parallel; output is compared.
    Colo,
}

/// Where replication stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// A secondary before a primary connected.
    Waiting,
    /// Disks and memory being copied.
    Syncing,
    /// Checkpoints flow: the guest survives the death of either side.
    Protected,
    /// A primary whose peer is gone: it runs alone.
    Unprotected,
    /// A secondary that took over.
    FailedOver,
    /// A secondary whose replication ended without a checkpoint to take
    /// over from (or after an error): it waits for nothing.
    Stopped,
}

impl State {
    /// Every state, for per-state gauges.
    pub const ALL: [State; 6] = [
        State::Waiting,
        State::Syncing,
        State::Protected,
        State::Unprotected,
        State::FailedOver,
        State::Stopped,
    ];

    pub fn name(self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::Syncing => "syncing",
            State::Protected => "protected",
            State::Unprotected => "unprotected",
            State::FailedOver => "failed_over",
            State::Stopped => "stopped",
        }
    }
}

/// Why a checkpoint was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    Periodic,
    Requested,
    HeldBytes,
    Mismatch,
    Timeout,
}

impl Cause {
    pub const ALL: [Cause; 5] = [
        Cause::Periodic,
        Cause::Requested,
        Cause::HeldBytes,
        Cause::Mismatch,
        Cause::Timeout,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cause::Periodic => "periodic",
            Cause::Requested => "requested",
            Cause::HeldBytes => "held_bytes",
            Cause::Mismatch => "mismatch",
            Cause::Timeout => "timeout",
        }
    }
}

/// `GET /status`'s `colo` object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub role: Role,
    pub mode: Mode,
    pub state: State,
    /// The peer's address once known.
    pub peer: Option<String>,
    /// The last committed epoch (checkpoint number).
    pub epoch: u64,
    /// Checkpoints committed since replication began.
    pub checkpoints: u64,
    /// Pause of the last checkpoint, in milliseconds.
    pub last_checkpoint_ms: Option<f64>,
    /// The checkpoint interval now.
    pub checkpoint_ms: u64,
    /// Initial sync progress: pages and disk bytes sent (primary) or
    /// received (secondary).
    pub sync_pages: u64,
    pub sync_disk_bytes: u64,
    /// Why replication stopped, when it did.
    pub error: Option<String>,
    /// Primary, COLO mode: how long a frame waits for its twin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compare_timeout_ms: Option<u64>,
    /// COLO mode's network counts (None in Remus mode), as in
    /// [`Metrics::proxy`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyStats>,
}

impl Status {
    /// A status before anything happened.
    pub fn new(role: Role, mode: Mode, state: State, checkpoint_ms: u64) -> Self {
        Self {
            role,
            mode,
            state,
            peer: None,
            epoch: 0,
            checkpoints: 0,
            last_checkpoint_ms: None,
            checkpoint_ms,
            sync_pages: 0,
            sync_disk_bytes: 0,
            error: None,
            compare_timeout_ms: None,
            proxy: None,
        }
    }
}

/// The checkpoint intervals [`Control::set_checkpoint_ms`] accepts.
pub const CHECKPOINT_MS_RANGE: std::ops::RangeInclusive<u64> = 1..=60_000;

/// Refuses an interval outside [`CHECKPOINT_MS_RANGE`].
pub fn check_checkpoint_ms(ms: u64) -> Result<(), CommandError> {
    if CHECKPOINT_MS_RANGE.contains(&ms) {
        Ok(())
    } else {
        Err(CommandError::Invalid(format!(
            "checkpoint_ms {ms} is outside 1..=60000"
        )))
    }
}

/// A histogram in Prometheus' shape: cumulative counts per upper bound.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// (upper bound in seconds, observations ≤ bound), ascending.
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    /// Bounds from 100 µs to 10 s.
    pub const BOUNDS: [f64; 12] = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0, 10.0,
    ];

    pub fn new() -> Self {
        Self {
            buckets: Self::BOUNDS.iter().map(|&b| (b, 0)).collect(),
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (bound, n) in &mut self.buckets {
            if s <= *bound {
                *n += 1;
            }
        }
        self.sum += s;
        self.count += 1;
    }
}

/// COLO mode's network counts: the primary's compare proxy and mirror,
/// the secondary's rewriter and mirror. Counters since replication
/// began; gauges now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyStats {
    /// Primary: PVM frames compared (counter).
    pub compared_frames: u64,
    /// Primary: PVM frames released because the SVM sent the same (counter).
    pub matched_frames: u64,
    /// Primary: PVM frames held now (gauge).
    pub held_frames: u64,
    /// Primary: SVM frames waiting for their PVM twin; secondary: client
    /// frames waiting for the SVM (gauge).
    pub queue_depth: u64,
    /// Primary: connections the compare tracks now (gauge).
    pub connections: u64,
    /// Secondary: connections whose sequence numbers are rewritten now
    /// (gauge).
    pub rewritten_connections: u64,
    /// Frames sent to the peer on the mirror connection (counter).
    pub mirrored_frames: u64,
    /// Frames dropped because the mirror connection was behind, or (SVM)
    /// of an epoch already loaded (counter).
    pub dropped_frames: u64,
}

/// `GET /metrics`' COLO series.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Committed checkpoints by cause.
    pub checkpoints: Vec<(Cause, u64)>,
    /// Guest pause per checkpoint.
    pub pause: Histogram,
    /// From the capture to the secondary's ack.
    pub transfer: Histogram,
    pub checkpoint_bytes: u64,
    pub held_frames: u64,
    pub held_bytes: u64,
    pub failovers: u64,
    pub state: Option<State>,
    /// COLO mode's network counts.
    pub proxy: ProxyStats,
}

/// Why a command was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The state forbids it now (409): the text says why.
    #[error("{0}")]
    Conflict(String),
    /// A bad argument (400).
    #[error("{0}")]
    Invalid(String),
    /// Tried and failed (500).
    #[error("{0}")]
    Failed(String),
}

/// Commands and reports of a running replication, for the control API.
pub trait Control: Send + Sync {
    fn status(&self) -> Status;
    fn metrics(&self) -> Metrics;
    /// Secondary: take over now. Primary: drop the secondary, run alone.
    fn failover(&self) -> Result<(), CommandError>;
    /// Queues one checkpoint (Conflict unless protected).
    fn checkpoint(&self) -> Result<(), CommandError>;
    /// Changes the checkpoint interval (Invalid outside 1..=60000).
    fn set_checkpoint_ms(&self, ms: u64) -> Result<(), CommandError>;
    /// Primary, COLO mode: changes the compare timeout (Invalid outside
    /// 1..=60000; Conflict in any other mode).
    fn set_compare_timeout_ms(&self, _ms: u64) -> Result<(), CommandError> {
        Err(CommandError::Conflict("not in COLO mode".into()))
    }
}
