//! Fault injection for tests: `COLO_FAULT=<side>:<point>[:<n>]` makes the
//! `vmm` of that side (`primary` or `secondary`) kill itself with SIGKILL
//! the `n`th time (default 1st) it reaches `point`. Unset, every point is
//! a relaxed atomic load and a branch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::control::Role;

/// Protocol steps where a side can be made to die.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// Primary: the guest is paused for a checkpoint.
    AfterPause,
    /// Primary: half of a checkpoint's pages are sent. Secondary: half are received.
    MidMemory,
    /// Primary: the state is sent. Secondary: the state is received.
    AfterState,
    /// Secondary: the checkpoint is applied, the ack not yet sent.
    BeforeAck,
    /// Secondary: the ack is sent. Primary: the ack is received, output not yet released.
    AfterAck,
    /// Secondary: half of an epoch's disk writes are applied.
    MidDiskApply,
}

impl Point {
    pub const ALL: [Point; 6] = [
        Point::AfterPause,
        Point::MidMemory,
        Point::AfterState,
        Point::BeforeAck,
        Point::AfterAck,
        Point::MidDiskApply,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Point::AfterPause => "after_pause",
            Point::MidMemory => "mid_memory",
            Point::AfterState => "after_state",
            Point::BeforeAck => "before_ack",
            Point::AfterAck => "after_ack",
            Point::MidDiskApply => "mid_disk_apply",
        }
    }
}

struct Armed {
    role: Role,
    point: Point,
    nth: u64,
    hits: AtomicU64,
}

static ARMED: OnceLock<Option<Armed>> = OnceLock::new();

/// Parses `<side>:<point>[:<n>]`.
fn parse(spec: &str) -> Option<(Role, Point, u64)> {
    let mut it = spec.split(':');
    let role = match it.next()? {
        "primary" => Role::Primary,
        "secondary" => Role::Secondary,
        _ => return None,
    };
    let name = it.next()?;
    let point = Point::ALL.into_iter().find(|p| p.name() == name)?;
    let nth = match it.next() {
        Some(n) => n.parse().ok().filter(|&n| n > 0)?,
        None => 1,
    };
    it.next().is_none().then_some((role, point, nth))
}

/// Reads `COLO_FAULT` once; a malformed value is reported and ignored.
fn armed() -> Option<&'static Armed> {
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("COLO_FAULT").ok()?;
            match parse(&spec) {
                Some((role, point, nth)) => Some(Armed {
                    role,
                    point,
                    nth,
                    hits: AtomicU64::new(0),
                }),
                None => {
                    tracing::warn!(
                        "COLO_FAULT={spec:?} is not <primary|secondary>:<point>[:<n>]; ignored"
                    );
                    None
                }
            }
        })
        .as_ref()
}

/// Kills this process with SIGKILL if `COLO_FAULT` names `role` and
/// `point` and this is the chosen hit.
pub fn point(role: Role, point: Point) {
    let Some(armed) = armed() else { return };
    if armed.role != role || armed.point != point {
        return;
    }
    if armed.hits.fetch_add(1, Ordering::SeqCst) + 1 == armed.nth {
        eprintln!("vmm: COLO_FAULT: dying at {}", point.name());
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_or_are_refused() {
        assert_eq!(
            parse("primary:after_pause"),
            Some((Role::Primary, Point::AfterPause, 1))
        );
        assert_eq!(
            parse("secondary:mid_disk_apply:3"),
            Some((Role::Secondary, Point::MidDiskApply, 3))
        );
        for bad in [
            "",
            "primary",
            "tertiary:after_pause",
            "primary:nowhere",
            "primary:after_ack:0",
            "primary:after_ack:x",
            "primary:after_ack:1:2",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
