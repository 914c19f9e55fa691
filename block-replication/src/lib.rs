//! Disk replication of a COLO pair: the primary's write forwarder, the
//! secondary's per-epoch write buffer, and the block-hash comparison that
//! makes two images equal at start-up.
//!
//! ```text
//! primary                                   secondary
//! sync::block_hashes ───── compare ──────── sync::block_hashes
//! Forwarder::track        (differing blocks sent, written directly)
//! Forwarder::take_tracked (blocks written meanwhile, sent again while paused)
//! Forwarder::forward_from(N)
//! guest write ─ on_write → Some(N) ───────→ EpochBuffer::stage(N, ..)
//! checkpoint N: close_epoch(N) ────────────→ (checkpoint N complete)
//!                                           EpochBuffer::commit(N) → ack N
//! ```
//!
//! In COLO mode the secondary's VM runs: [`overlay::ColoDisks`] keeps its
//! writes in an overlay over the base image and the primary's writes in
//! the epoch buffer, commits a checkpoint by dropping the overlay and
//! applying the epoch, and at failover merges the overlay instead.
//!
//! Crash safety: without a journal the secondary writes its image in
//! place, so a crash in the middle of [`secondary::EpochBuffer::commit`]
//! leaves an image that matches no checkpoint. That is why the secondary
//! keeps no durable claim at all: after a restart it knows nothing, is a
//! fresh secondary, and is made equal to the primary again by the initial
//! sync (block hashes, only the differing blocks sent). The only claim it
//! makes is the ack of checkpoint N, sent after `commit(N)` returned (the
//! writes synced). With a [`journal::Journal`] (a write-ahead journal
//! beside the images) a commit, and the COLO failover merge, is all or
//! nothing across a crash: the images always hold some committed
//! checkpoint.

pub mod journal;
pub mod overlay;
pub mod primary;
pub mod secondary;
pub mod sync;
#[cfg(test)]
mod testing;
