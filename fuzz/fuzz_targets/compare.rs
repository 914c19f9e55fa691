//! Fuzz target: the compare proxy driven by any sequence of PVM frames, SVM
//! frames (of any epoch), polls, checkpoints, commits and a release of
//! everything: never a panic, the SVM queue and the connection table stay
//! within their bounds, a checkpoint is asked at most once per epoch and
//! whenever a poll passes the deadline, and every PVM frame comes out
//! exactly once.
#![no_main]

use std::time::{Duration, Instant};

use net_proxy::compare::{Compare, CompareConfig};

const CONFIG: CompareConfig = CompareConfig {
    timeout: Duration::from_millis(20),
    held_bytes_max: 4096,
    max_connections: 8,
};

/// Reads the input as ops: one selector byte, then its operands.
struct Ops<'a>(&'a [u8]);

impl<'a> Ops<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    /// A frame: a length byte, then up to that many bytes.
    fn frame(&mut self) -> Option<&'a [u8]> {
        let len = usize::from(self.byte()?).min(self.0.len());
        let (frame, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(frame)
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut ops = Ops(data);
    let mut now = Instant::now();
    let mut c = Compare::new(CONFIG, 1);
    let (mut sent, mut out) = (0usize, 0usize);
    let mut asked = false;
    while let Some(op) = ops.byte() {
        let outcome = match op % 12 {
            0..=3 => {
                let Some(frame) = ops.frame() else { break };
                sent += 1;
                c.primary(frame.to_vec(), now)
            }
            4..=7 => {
                let Some(rel) = ops.byte() else { break };
                let Some(frame) = ops.frame() else { break };
                let epoch = c.epoch().wrapping_add(u64::from(rel % 3)).wrapping_sub(1);
                c.secondary(epoch, frame, now)
            }
            8 => {
                let Some(ms) = ops.byte() else { break };
                now += Duration::from_millis(u64::from(ms));
                let deadline = c.next_deadline();
                let o = c.poll(now);
                if deadline.is_some_and(|d| d <= now) {
                    assert!(o.checkpoint.is_some(), "poll past the deadline asked nothing");
                }
                o
            }
            9 => {
                c.checkpoint(c.epoch());
                asked = false;
                continue;
            }
            10 => {
                let Some(back) = ops.byte() else { break };
                out += c.committed(c.epoch().saturating_sub(u64::from(back % 3))).len();
                continue;
            }
            _ => {
                out += c.release_all().len();
                continue;
            }
        };
        out += outcome.release.len();
        if outcome.checkpoint.is_some() {
            assert!(!asked, "a second cause in one epoch");
            asked = true;
        }
        let stats = c.stats();
        assert!(stats.queue_bytes <= CONFIG.held_bytes_max);
        assert!(stats.connections <= CONFIG.max_connections as u64);
    }
    out += c.release_all().len();
    assert_eq!(out, sent);
    assert_eq!(c.stats().held_bytes, 0);
});
