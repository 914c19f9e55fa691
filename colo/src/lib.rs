//! Replication of a running guest between two `vmm` processes: the peer
//! protocol, the checkpoint engines of the primary and the secondary, the
//! secondary's staging of a checkpoint, the heartbeat and failover.
//!
//! The engines drive the VM, its disks and its output through the small
//! traits in [`vm`], which `vmm` implements over KVM and which tests
//! implement over plain memory: nothing here needs KVM.
//!
//! [`control`] is what the control API sees: status, metrics, commands.
//! [`fault`] makes either side die at a chosen protocol step (tests).
//! [`wire`] frames the messages, [`staging`] checks the secondary's
//! incoming stream, [`primary`] and [`secondary`] are the engines `vmm`
//! starts.
//!
//! # A session
//!
//! Two TCP connections from the primary to the secondary's `--listen`
//! address, both with `TCP_NODELAY`: the data connection (sync,
//! checkpoints, disk writes, acks: one ordered stream) and the heartbeat
//! connection (pings only, so checkpoint data never delays them). COLO
//! mode adds a third, the mirror connection (network frames both ways,
//! the secondary's checkpoint requests), so frames never wait behind
//! checkpoint data. Every message is a [`wire`] frame (magic, type,
//! length, CRC32).
//!
//! ```text
//!  primary (guest running)                        secondary (paused replica;
//!                                                  COLO: the SVM runs)
//!     |                                                   | Waiting
//!     |--- data: Hello{version, mode, session, identity} ->|
//!     |                          compare; on a difference: |
//!     |<-------------- Refused{every difference} ---------| (both exit/stop)
//!     |<-------------- Welcome{version, mode, identity} --|
//!     | compare; on a difference: Refused ---------------->|
//!     |--- heartbeat: HeartbeatHello{session} ----------->| Syncing
//!     |--- mirror: MirrorHello{session} (COLO) ---------->| colo_net
//!     |<------------- DiskHashes{disk, 64 KiB blocks} ----|
//!     |--- DiskBlock (each block that differs) ---------->| write_direct
//!     |--- SyncPages (all memory, guest running) -------->| write_pages
//!     |--- SyncPages (pages dirtied meanwhile) x rounds ->|
//!     | COLO: output.mirror(sink)                         |
//!     | pause: stop-and-copy                              |
//!     |--- DiskBlock (blocks written during the sync) --->|
//!     |--- Begin(0) Pages(0).. State(0) End(0) ---------->| stage whole,
//!     | resume; disk writes now forwarded, epoch 1        | load, flush;
//!     |                                                   | COLO: run(0)
//!     |<------------------------------------- Ack(0) -----| Protected
//!     | Protected                                         |
//!     |--- DiskWrite{epoch N} (any time) ---------------->| hold
//!     | checkpoint N: pause, take dirty pages + state,    |
//!     | resume at once, then send                         |
//!     |--- Begin(N) Pages(N).. State(N) End(N) ---------->| stage whole;
//!     |                                                   | load, commit N's
//!     |                                                   | writes, verify
//!     |                                                   | digest; COLO:
//!     |                                                   | run(N)
//!     |<------------------------------------- Ack(N) -----|
//!     | release epoch N's held output                     |
//!     |                                                   |
//!     |  COLO, any time, on the mirror connection:        |
//!     |--- Frame{epoch, nic, client frame} -------------->| SVM's NICs
//!     |<------------------- Frame{epoch, nic, SVM frame} -| (rewritten)
//!     | compare; a mismatch or timeout: checkpoint        |
//!     |<------------------- CheckpointRequest{cause} -----| overlay half full
//!     |                                                   |
//!     |--- heartbeat: Ping{seq} (every heartbeat_ms) ---->|
//!     |<---------------------------------- Pong{seq} -----|
//!     |                                                   |
//!  primary dies: the heartbeat is silent (or both connections end)
//!                                                         | auto: take over
//!                                                         | (drop staged
//!                                                         | checkpoint and
//!                                                         | uncommitted
//!                                                         | writes, resume)
//!                                                         | manual: wait for
//!                                                         | `failover`
//!  secondary dies or errs (Error{text}): release all held output,
//!  stop forwarding disk writes (and mirroring), run Unprotected.
//!  `failover` on the primary: heartbeat Goodbye{reason}, then close:
//!  the secondary stops without taking over.
//! ```
//!
//! Only one checkpoint is in flight: checkpoint N+1 is captured after
//! Ack(N). Disk writes of epoch N+1 may reach the secondary before
//! Begin(N) (the guest runs on while N is sent); [`staging`] admits
//! exactly those.
//!
//! In COLO mode the secondary's guest (the SVM) runs between checkpoints
//! on the client frames the primary mirrors, and the primary releases a
//! frame of its guest (the PVM) once the SVM sent the same: checkpoints
//! come when the two differ (or a timeout, or held bytes), and at the
//! latest every [`primary::DEFAULT_COLO_CHECKPOINT_MS`]. A load pauses
//! the SVM; it runs again from the loaded checkpoint before the ack. On
//! failover the SVM runs on from where it is. The mirror connection's
//! queues are bounded on both sides: a frame beyond the bound is dropped
//! and counted (the compare then sees a mismatch or a timeout).

pub mod control;
pub mod fault;
mod link;
pub mod primary;
pub mod secondary;
pub mod staging;
pub mod vm;
pub mod wire;

pub use link::SYNC_BLOCK;

/// The page size pages travel in.
pub const PAGE_SIZE: u64 = 4096;
