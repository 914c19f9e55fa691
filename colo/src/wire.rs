//! Framing of the peer protocol.
//!
//! Every message is one frame: an 18-byte header, then the payload.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "COLO" (0x4f4c4f43 little-endian)
//!      4     2  message type
//!      6     4  payload length (at most MAX_PAYLOAD)
//!     10     4  CRC32 of type, length and payload
//!     14     4  CRC32 of bytes 0..14 (the header)
//!     18     n  payload
//! ```
//!
//! The header's own CRC makes a corrupt length an error at once: without
//! it, a length grown by a flipped bit would have the reader wait for
//! bytes that never come, with the primary waiting for an ack.
//!
//! All integers are little-endian. Bulk messages (pages, disk blocks, disk
//! writes, state) carry their bytes raw after a fixed prefix; the small
//! ones are postcard. Decoding checks everything and never panics: a frame
//! is either exactly one valid [`Message`] or a [`WireError`].

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::control::{Cause, Mode};
use crate::vm::{DiskWrite, Identity, PageBatch, PeerFrame, StateDigest};
use crate::PAGE_SIZE;

/// The version of this protocol.
pub const PROTOCOL_VERSION: u32 = 1;

/// Frame magic: "COLO" in the byte stream.
pub const MAGIC: u32 = u32::from_le_bytes(*b"COLO");

/// Header bytes before the payload.
pub const HEADER_LEN: usize = 18;

/// The largest payload a frame may carry (64 MiB).
pub const MAX_PAYLOAD: u32 = 64 << 20;

/// The largest network frame the mirror connection carries: a 64 KiB
/// segment (TSO/GSO) plus room for its headers. A bigger one is refused
/// as undecodable (no guest NIC makes one).
pub const MAX_PEER_FRAME: usize = (64 << 10) + 256;

/// The version this process announces: [`PROTOCOL_VERSION`], unless the
/// environment variable `COLO_TEST_PROTOCOL_VERSION` names another (tests
/// of a mismatch).
pub fn announced_version() -> u32 {
    std::env::var("COLO_TEST_PROTOCOL_VERSION")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(PROTOCOL_VERSION)
}

/// Primary -> secondary, first on the data connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub mode: Mode,
    /// Names this replication session; the heartbeat connection repeats it.
    pub session: u64,
    pub identity: Identity,
}

/// Secondary -> primary: the Hello is accepted; the primary checks the
/// secondary's side in turn.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub version: u32,
    pub mode: Mode,
    pub identity: Identity,
}

/// Every difference between the primary's side (its Hello) and the
/// secondary's (its Welcome, built whether or not it is sent): protocol
/// version, mode, then [`Identity::differences`]. Both sides refuse the
/// session unless this is empty.
pub fn handshake_differences(primary: &Hello, secondary: &Welcome) -> Vec<String> {
    let mut out = Vec::new();
    if primary.version != secondary.version {
        out.push(format!(
            "protocol version: primary {}, secondary {}",
            primary.version, secondary.version
        ));
    }
    if primary.mode != secondary.mode {
        out.push(format!(
            "mode: primary {:?}, secondary {:?}",
            primary.mode, secondary.mode
        ));
    }
    out.extend(primary.identity.differences(&secondary.identity));
    out
}

/// Every message of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Primary -> secondary: opens the data connection.
    Hello(Hello),
    /// Secondary -> primary: the handshake is accepted.
    Welcome(Welcome),
    /// Either way: the handshake is refused; the text names every difference.
    Refused { reason: String },
    /// Primary -> secondary: opens the heartbeat connection of `session`.
    HeartbeatHello { session: u64 },
    /// Primary -> secondary on the heartbeat connection.
    Ping { seq: u64 },
    /// Secondary -> primary on the heartbeat connection.
    Pong { seq: u64 },
    /// Primary -> secondary: the primary drops the secondary and runs on
    /// (the secondary must not take over).
    Goodbye { reason: String },
    /// Secondary -> primary: hashes of the blocks `first..` of disk `disk`.
    DiskHashes {
        disk: u16,
        block: u32,
        first: u64,
        hashes: Vec<u64>,
    },
    /// Primary -> secondary, initial sync: a disk block that differs.
    DiskBlock {
        disk: u16,
        offset: u64,
        data: Vec<u8>,
    },
    /// Primary -> secondary, initial sync: live pre-copied pages.
    SyncPages(PageBatch),
    /// Primary -> secondary: checkpoint `epoch` begins; `pages` pages and
    /// `state_len` bytes of state follow.
    CheckpointBegin {
        epoch: u64,
        pages: u64,
        state_len: u64,
        digest: Option<StateDigest>,
    },
    /// Primary -> secondary: a batch of checkpoint `epoch`'s pages.
    Pages { epoch: u64, batch: PageBatch },
    /// Primary -> secondary: checkpoint `epoch`'s vCPU, VM and device state.
    State { epoch: u64, bytes: Vec<u8> },
    /// Primary -> secondary: checkpoint `epoch` is complete.
    CheckpointEnd { epoch: u64 },
    /// Primary -> secondary: a guest disk write of epoch `write.epoch`.
    DiskWrite(DiskWrite),
    /// Secondary -> primary: checkpoint `epoch` is loaded and its disk
    /// writes are committed.
    Ack { epoch: u64 },
    /// Secondary -> primary: replication ends; the text says why.
    Error { text: String },
    /// Primary -> secondary: opens the mirror connection of `session`
    /// (COLO mode).
    MirrorHello { session: u64 },
    /// Either way on the mirror connection (COLO mode): a client frame
    /// the PVM received, or a frame the SVM sent (see [`PeerFrame`]).
    Frame(PeerFrame),
    /// Secondary -> primary on the mirror connection (COLO mode): take a
    /// checkpoint, for `cause`.
    CheckpointRequest { cause: Cause },
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the peer closed the connection")]
    Closed,
    #[error("connection failed")]
    Io(#[source] io::Error),
    #[error("bad frame magic {0:#010x}")]
    BadMagic(u32),
    #[error("CRC mismatch in a frame header")]
    BadHeaderCrc,
    #[error("CRC mismatch in a frame of type {0}")]
    BadCrc(u16),
    #[error("frame payload of {0} bytes exceeds the maximum")]
    TooLong(u64),
    #[error("unknown message type {0}")]
    UnknownType(u16),
    #[error("truncated frame (the connection ended mid-frame)")]
    Truncated,
    #[error("undecodable {kind} payload: {why}")]
    Undecodable { kind: &'static str, why: String },
}

impl WireError {
    /// Whether the connection just ended (no corrupt data seen).
    pub fn is_disconnect(&self) -> bool {
        matches!(self, WireError::Closed | WireError::Io(_))
    }
}

mod ty {
    pub const HELLO: u16 = 1;
    pub const WELCOME: u16 = 2;
    pub const REFUSED: u16 = 3;
    pub const HEARTBEAT_HELLO: u16 = 4;
    pub const PING: u16 = 5;
    pub const PONG: u16 = 6;
    pub const GOODBYE: u16 = 7;
    pub const MIRROR_HELLO: u16 = 8;
    pub const DISK_HASHES: u16 = 16;
    pub const DISK_BLOCK: u16 = 17;
    pub const SYNC_PAGES: u16 = 18;
    pub const CHECKPOINT_BEGIN: u16 = 32;
    pub const PAGES: u16 = 33;
    pub const STATE: u16 = 34;
    pub const CHECKPOINT_END: u16 = 35;
    pub const DISK_WRITE: u16 = 36;
    pub const FRAME: u16 = 37;
    pub const ACK: u16 = 48;
    pub const ERROR: u16 = 49;
    pub const CHECKPOINT_REQUEST: u16 = 50;
}

/// The postcard-encoded small messages, as they travel.
#[derive(Serialize, Deserialize)]
struct Text {
    text: String,
}

#[derive(Serialize, Deserialize)]
struct Number {
    n: u64,
}

#[derive(Serialize, Deserialize)]
struct Request {
    cause: Cause,
}

#[derive(Serialize, Deserialize)]
struct Begin {
    epoch: u64,
    pages: u64,
    state_len: u64,
    digest: Option<StateDigest>,
}

impl Message {
    /// The message's name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        type_name(self.type_code())
    }

    fn type_code(&self) -> u16 {
        match self {
            Message::Hello(_) => ty::HELLO,
            Message::Welcome(_) => ty::WELCOME,
            Message::Refused { .. } => ty::REFUSED,
            Message::HeartbeatHello { .. } => ty::HEARTBEAT_HELLO,
            Message::Ping { .. } => ty::PING,
            Message::Pong { .. } => ty::PONG,
            Message::Goodbye { .. } => ty::GOODBYE,
            Message::DiskHashes { .. } => ty::DISK_HASHES,
            Message::DiskBlock { .. } => ty::DISK_BLOCK,
            Message::SyncPages(_) => ty::SYNC_PAGES,
            Message::CheckpointBegin { .. } => ty::CHECKPOINT_BEGIN,
            Message::Pages { .. } => ty::PAGES,
            Message::State { .. } => ty::STATE,
            Message::CheckpointEnd { .. } => ty::CHECKPOINT_END,
            Message::DiskWrite(_) => ty::DISK_WRITE,
            Message::Ack { .. } => ty::ACK,
            Message::Error { .. } => ty::ERROR,
            Message::MirrorHello { .. } => ty::MIRROR_HELLO,
            Message::Frame(_) => ty::FRAME,
            Message::CheckpointRequest { .. } => ty::CHECKPOINT_REQUEST,
        }
    }
}

fn type_name(code: u16) -> &'static str {
    match code {
        ty::HELLO => "hello",
        ty::WELCOME => "welcome",
        ty::REFUSED => "refused",
        ty::HEARTBEAT_HELLO => "heartbeat-hello",
        ty::PING => "ping",
        ty::PONG => "pong",
        ty::GOODBYE => "goodbye",
        ty::DISK_HASHES => "disk-hashes",
        ty::DISK_BLOCK => "disk-block",
        ty::SYNC_PAGES => "sync-pages",
        ty::CHECKPOINT_BEGIN => "checkpoint-begin",
        ty::PAGES => "pages",
        ty::STATE => "state",
        ty::CHECKPOINT_END => "checkpoint-end",
        ty::DISK_WRITE => "disk-write",
        ty::ACK => "ack",
        ty::ERROR => "error",
        ty::MIRROR_HELLO => "mirror-hello",
        ty::FRAME => "frame",
        ty::CHECKPOINT_REQUEST => "checkpoint-request",
        _ => "unknown",
    }
}

fn put_postcard<T: Serialize>(out: &mut Vec<u8>, value: &T) {
    // Serializing our plain structs into a Vec cannot fail (no maps with
    // non-string keys, no unsized sequences).
    if let Ok(bytes) = postcard::to_stdvec(value) {
        out.extend_from_slice(&bytes);
    }
}

fn put_batch(out: &mut Vec<u8>, batch: &PageBatch) {
    out.extend_from_slice(&(batch.addrs.len() as u32).to_le_bytes());
    for a in &batch.addrs {
        out.extend_from_slice(&a.to_le_bytes());
    }
    out.extend_from_slice(&batch.data);
}

/// Encodes `msg` as one frame.
pub fn encode(msg: &Message) -> Result<Vec<u8>, WireError> {
    let mut out = vec![0u8; HEADER_LEN];
    match msg {
        Message::Hello(h) => put_postcard(&mut out, h),
        Message::Welcome(w) => put_postcard(&mut out, w),
        Message::Refused { reason: text }
        | Message::Goodbye { reason: text }
        | Message::Error { text } => put_postcard(&mut out, &Text { text: text.clone() }),
        Message::HeartbeatHello { session: n }
        | Message::MirrorHello { session: n }
        | Message::Ping { seq: n }
        | Message::Pong { seq: n }
        | Message::CheckpointEnd { epoch: n }
        | Message::Ack { epoch: n } => put_postcard(&mut out, &Number { n: *n }),
        Message::CheckpointRequest { cause } => put_postcard(&mut out, &Request { cause: *cause }),
        Message::CheckpointBegin {
            epoch,
            pages,
            state_len,
            digest,
        } => put_postcard(
            &mut out,
            &Begin {
                epoch: *epoch,
                pages: *pages,
                state_len: *state_len,
                digest: digest.clone(),
            },
        ),
        Message::DiskHashes {
            disk,
            block,
            first,
            hashes,
        } => {
            out.extend_from_slice(&disk.to_le_bytes());
            out.extend_from_slice(&block.to_le_bytes());
            out.extend_from_slice(&first.to_le_bytes());
            for h in hashes {
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        Message::DiskBlock { disk, offset, data } => {
            out.extend_from_slice(&disk.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(data);
        }
        Message::SyncPages(batch) => {
            check_batch(batch)?;
            put_batch(&mut out, batch);
        }
        Message::Pages { epoch, batch } => {
            check_batch(batch)?;
            out.extend_from_slice(&epoch.to_le_bytes());
            put_batch(&mut out, batch);
        }
        Message::State { epoch, bytes } => {
            out.extend_from_slice(&epoch.to_le_bytes());
            out.extend_from_slice(bytes);
        }
        Message::DiskWrite(w) => {
            out.extend_from_slice(&w.epoch.to_le_bytes());
            out.extend_from_slice(&w.disk.to_le_bytes());
            out.extend_from_slice(&w.offset.to_le_bytes());
            out.extend_from_slice(&w.data);
        }
        Message::Frame(f) => {
            check_frame(f.data.len())?;
            out.extend_from_slice(&f.epoch.to_le_bytes());
            out.extend_from_slice(&f.nic.to_le_bytes());
            out.extend_from_slice(&f.data);
        }
    }
    let len = out.len() - HEADER_LEN;
    if len > MAX_PAYLOAD as usize {
        return Err(WireError::TooLong(len as u64));
    }
    let code = msg.type_code();
    let len = len as u32;
    let crc = frame_crc(code, len, &out[HEADER_LEN..]);
    out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    out[4..6].copy_from_slice(&code.to_le_bytes());
    out[6..10].copy_from_slice(&len.to_le_bytes());
    out[10..14].copy_from_slice(&crc.to_le_bytes());
    let header_crc = crc32fast::hash(&out[..14]);
    out[14..18].copy_from_slice(&header_crc.to_le_bytes());
    Ok(out)
}

fn check_batch(batch: &PageBatch) -> Result<(), WireError> {
    if batch.is_well_formed() && batch.addrs.len() <= u32::MAX as usize {
        Ok(())
    } else {
        Err(WireError::Undecodable {
            kind: "pages",
            why: format!(
                "{} addresses but {} bytes of data",
                batch.addrs.len(),
                batch.data.len()
            ),
        })
    }
}

fn check_frame(len: usize) -> Result<(), WireError> {
    if len <= MAX_PEER_FRAME {
        Ok(())
    } else {
        Err(WireError::Undecodable {
            kind: "frame",
            why: format!("a network frame of {len} bytes (at most {MAX_PEER_FRAME})"),
        })
    }
}

fn frame_crc(code: u16, len: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&code.to_le_bytes());
    h.update(&len.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Encodes and writes `msg` as one frame.
pub fn write_message(w: &mut impl Write, msg: &Message) -> Result<(), WireError> {
    let frame = encode(msg)?;
    w.write_all(&frame).map_err(WireError::Io)?;
    Ok(())
}

/// Fills `buf`; `Ok(false)` if the stream ended before the first byte.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<bool, WireError> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) if done == 0 => return Ok(false),
            Ok(0) => return Err(WireError::Truncated),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::Io(e)),
        }
    }
    Ok(true)
}

/// Reads one frame and decodes it. A stream that ends cleanly between
/// frames is [`WireError::Closed`].
pub fn read_message(r: &mut impl Read) -> Result<Message, WireError> {
    let mut header = [0u8; HEADER_LEN];
    if !read_full(r, &mut header)? {
        return Err(WireError::Closed);
    }
    let [m0, m1, m2, m3, t0, t1, l0, l1, l2, l3, c0, c1, c2, c3, h0, h1, h2, h3] = header;
    let magic = u32::from_le_bytes([m0, m1, m2, m3]);
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    if crc32fast::hash(&header[..14]) != u32::from_le_bytes([h0, h1, h2, h3]) {
        return Err(WireError::BadHeaderCrc);
    }
    let code = u16::from_le_bytes([t0, t1]);
    let len = u32::from_le_bytes([l0, l1, l2, l3]);
    let crc = u32::from_le_bytes([c0, c1, c2, c3]);
    if len > MAX_PAYLOAD {
        return Err(WireError::TooLong(len.into()));
    }
    let mut payload = vec![0u8; len as usize];
    if !read_full(r, &mut payload)? && len > 0 {
        return Err(WireError::Truncated);
    }
    if frame_crc(code, len, &payload) != crc {
        return Err(WireError::BadCrc(code));
    }
    decode_payload(code, payload)
}

/// Reads raw fields off a payload.
struct Cursor<'a> {
    kind: &'static str,
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn short(&self, what: &str) -> WireError {
        WireError::Undecodable {
            kind: self.kind,
            why: format!("payload too short for {what}"),
        }
    }

    fn take<const N: usize>(&mut self, what: &str) -> Result<[u8; N], WireError> {
        let Some((head, rest)) = self.rest.split_first_chunk::<N>() else {
            return Err(self.short(what));
        };
        self.rest = rest;
        Ok(*head)
    }

    fn u16(&mut self, what: &str) -> Result<u16, WireError> {
        self.take::<2>(what).map(u16::from_le_bytes)
    }

    fn u32(&mut self, what: &str) -> Result<u32, WireError> {
        self.take::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, WireError> {
        self.take::<8>(what).map(u64::from_le_bytes)
    }

    fn batch(&mut self) -> Result<PageBatch, WireError> {
        let count = u64::from(self.u32("the page count")?);
        let expected = count.checked_mul(8 + PAGE_SIZE);
        if expected != Some(self.rest.len() as u64) {
            return Err(WireError::Undecodable {
                kind: self.kind,
                why: format!("{count} pages announced, {} bytes follow", self.rest.len()),
            });
        }
        let (addrs, data) = self.rest.split_at(count as usize * 8);
        self.rest = &[];
        Ok(PageBatch {
            addrs: addrs
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect(),
            data: data.to_vec(),
        })
    }
}

fn postcard_all<'a, T: Deserialize<'a>>(
    kind: &'static str,
    bytes: &'a [u8],
) -> Result<T, WireError> {
    let undecodable = |why: String| WireError::Undecodable { kind, why };
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| undecodable(e.to_string()))?;
    if !rest.is_empty() {
        return Err(undecodable(format!("{} trailing bytes", rest.len())));
    }
    Ok(value)
}

fn decode_payload(code: u16, payload: Vec<u8>) -> Result<Message, WireError> {
    let kind = type_name(code);
    let text = |p: &[u8]| postcard_all::<Text>(kind, p).map(|t| t.text);
    let number = |p: &[u8]| postcard_all::<Number>(kind, p).map(|n| n.n);
    let mut c = Cursor {
        kind,
        rest: &payload,
    };
    let msg = match code {
        ty::HELLO => Message::Hello(postcard_all(kind, &payload)?),
        ty::WELCOME => Message::Welcome(postcard_all(kind, &payload)?),
        ty::REFUSED => Message::Refused {
            reason: text(&payload)?,
        },
        ty::GOODBYE => Message::Goodbye {
            reason: text(&payload)?,
        },
        ty::ERROR => Message::Error {
            text: text(&payload)?,
        },
        ty::HEARTBEAT_HELLO => Message::HeartbeatHello {
            session: number(&payload)?,
        },
        ty::MIRROR_HELLO => Message::MirrorHello {
            session: number(&payload)?,
        },
        ty::CHECKPOINT_REQUEST => Message::CheckpointRequest {
            cause: postcard_all::<Request>(kind, &payload)?.cause,
        },
        ty::PING => Message::Ping {
            seq: number(&payload)?,
        },
        ty::PONG => Message::Pong {
            seq: number(&payload)?,
        },
        ty::CHECKPOINT_END => Message::CheckpointEnd {
            epoch: number(&payload)?,
        },
        ty::ACK => Message::Ack {
            epoch: number(&payload)?,
        },
        ty::CHECKPOINT_BEGIN => {
            let b: Begin = postcard_all(kind, &payload)?;
            Message::CheckpointBegin {
                epoch: b.epoch,
                pages: b.pages,
                state_len: b.state_len,
                digest: b.digest,
            }
        }
        ty::DISK_HASHES => {
            let disk = c.u16("the disk")?;
            let block = c.u32("the block size")?;
            let first = c.u64("the first block")?;
            if c.rest.len() % 8 != 0 {
                return Err(WireError::Undecodable {
                    kind,
                    why: format!("{} bytes of hashes", c.rest.len()),
                });
            }
            let hashes = c
                .rest
                .chunks_exact(8)
                .map(|h| u64::from_le_bytes(h.try_into().unwrap_or_default()))
                .collect();
            Message::DiskHashes {
                disk,
                block,
                first,
                hashes,
            }
        }
        ty::DISK_BLOCK => {
            let disk = c.u16("the disk")?;
            let offset = c.u64("the offset")?;
            Message::DiskBlock {
                disk,
                offset,
                data: c.rest.to_vec(),
            }
        }
        ty::SYNC_PAGES => Message::SyncPages(c.batch()?),
        ty::PAGES => {
            let epoch = c.u64("the epoch")?;
            Message::Pages {
                epoch,
                batch: c.batch()?,
            }
        }
        ty::STATE => {
            let epoch = c.u64("the epoch")?;
            Message::State {
                epoch,
                bytes: c.rest.to_vec(),
            }
        }
        ty::DISK_WRITE => {
            let epoch = c.u64("the epoch")?;
            let disk = c.u16("the disk")?;
            let offset = c.u64("the offset")?;
            Message::DiskWrite(DiskWrite {
                epoch,
                disk,
                offset,
                data: c.rest.to_vec(),
            })
        }
        ty::FRAME => {
            let epoch = c.u64("the epoch")?;
            let nic = c.u16("the NIC")?;
            check_frame(c.rest.len())?;
            Message::Frame(PeerFrame {
                epoch,
                nic,
                data: c.rest.to_vec(),
            })
        }
        other => return Err(WireError::UnknownType(other)),
    };
    Ok(msg)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn identity() -> impl Strategy<Value = Identity> {
        (
            any::<u64>(),
            any::<u8>(),
            proptest::collection::vec(("[a-z0-9]{0,6}", "[a-z-]{0,10}"), 0..4),
            proptest::collection::vec(any::<u64>(), 0..4),
            "[a-z0-9-]{0,8}",
            any::<u64>(),
            any::<u32>(),
        )
            .prop_map(
                |(mem_size, vcpus, devices, disks, cpu_template, cpuid_hash, tsc_khz)| Identity {
                    mem_size,
                    vcpus,
                    devices,
                    disks,
                    cpu_template,
                    cpuid_hash,
                    tsc_khz,
                },
            )
    }

    fn batch() -> impl Strategy<Value = PageBatch> {
        proptest::collection::vec((any::<u64>(), any::<u8>()), 0..4).prop_map(|pages| PageBatch {
            addrs: pages.iter().map(|p| p.0).collect(),
            data: pages
                .iter()
                .flat_map(|p| std::iter::repeat_n(p.1, PAGE_SIZE as usize))
                .collect(),
        })
    }

    fn mode() -> impl Strategy<Value = Mode> {
        prop_oneof![Just(Mode::Remus), Just(Mode::Colo)]
    }

    fn digest() -> impl Strategy<Value = Option<StateDigest>> {
        proptest::option::of(
            (
                any::<u64>(),
                proptest::collection::vec(("[a-z0-9]{0,6}", any::<u64>()), 0..4),
            )
                .prop_map(|(hash, parts)| StateDigest { hash, parts }),
        )
    }

    fn cause() -> impl Strategy<Value = Cause> {
        proptest::sample::select(Cause::ALL.to_vec())
    }

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..64)
    }

    pub(crate) fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u32>(), mode(), any::<u64>(), identity()).prop_map(
                |(version, mode, session, identity)| Message::Hello(Hello {
                    version,
                    mode,
                    session,
                    identity
                })
            ),
            (any::<u32>(), mode(), identity()).prop_map(|(version, mode, identity)| {
                Message::Welcome(Welcome {
                    version,
                    mode,
                    identity,
                })
            }),
            ".{0,20}".prop_map(|reason| Message::Refused { reason }),
            ".{0,20}".prop_map(|reason| Message::Goodbye { reason }),
            ".{0,20}".prop_map(|text| Message::Error { text }),
            any::<u64>().prop_map(|session| Message::HeartbeatHello { session }),
            any::<u64>().prop_map(|seq| Message::Ping { seq }),
            any::<u64>().prop_map(|seq| Message::Pong { seq }),
            any::<u64>().prop_map(|epoch| Message::CheckpointEnd { epoch }),
            any::<u64>().prop_map(|epoch| Message::Ack { epoch }),
            (any::<u64>(), any::<u64>(), any::<u64>(), digest()).prop_map(
                |(epoch, pages, state_len, digest)| Message::CheckpointBegin {
                    epoch,
                    pages,
                    state_len,
                    digest
                }
            ),
            (
                any::<u16>(),
                any::<u32>(),
                any::<u64>(),
                proptest::collection::vec(any::<u64>(), 0..8)
            )
                .prop_map(|(disk, block, first, hashes)| Message::DiskHashes {
                    disk,
                    block,
                    first,
                    hashes
                }),
            (any::<u16>(), any::<u64>(), bytes())
                .prop_map(|(disk, offset, data)| Message::DiskBlock { disk, offset, data }),
            batch().prop_map(Message::SyncPages),
            (any::<u64>(), batch()).prop_map(|(epoch, batch)| Message::Pages { epoch, batch }),
            (any::<u64>(), bytes()).prop_map(|(epoch, bytes)| Message::State { epoch, bytes }),
            (any::<u64>(), any::<u16>(), any::<u64>(), bytes()).prop_map(
                |(epoch, disk, offset, data)| Message::DiskWrite(DiskWrite {
                    epoch,
                    disk,
                    offset,
                    data
                })
            ),
            any::<u64>().prop_map(|session| Message::MirrorHello { session }),
            (any::<u64>(), any::<u16>(), bytes())
                .prop_map(|(epoch, nic, data)| Message::Frame(PeerFrame { epoch, nic, data })),
            cause().prop_map(|cause| Message::CheckpointRequest { cause }),
        ]
    }

    /// A frame of type `code` whose length field says `len`, with both
    /// CRCs right.
    fn raw_frame(code: u16, len: u32, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::new();
        frame.extend_from_slice(&MAGIC.to_le_bytes());
        frame.extend_from_slice(&code.to_le_bytes());
        frame.extend_from_slice(&len.to_le_bytes());
        frame.extend_from_slice(&frame_crc(code, len, payload).to_le_bytes());
        let header_crc = crc32fast::hash(&frame);
        frame.extend_from_slice(&header_crc.to_le_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    proptest! {
        #[test]
        fn messages_round_trip(msg in message()) {
            let frame = encode(&msg).expect("encodes");
            let back = read_message(&mut frame.as_slice()).expect("decodes");
            prop_assert_eq!(back, msg);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut r = bytes.as_slice();
            while read_message(&mut r).is_ok() {}
        }

        #[test]
        fn garbage_after_a_valid_header_never_panics(
            code in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            // A well-framed payload of any type and content: the CRC is
            // right, so only the payload decoder stands between the bytes
            // and a message.
            let frame = raw_frame(code, payload.len() as u32, &payload);
            if let Ok(msg) = read_message(&mut frame.as_slice()) {
                // Whatever decodes encodes back to the very same frame.
                prop_assert_eq!(encode(&msg).expect("encodes"), frame);
            }
        }

        #[test]
        fn a_flipped_bit_is_always_an_error(msg in message(), bit in any::<prop::sample::Index>()) {
            let mut frame = encode(&msg).expect("encodes");
            let bit = bit.index(frame.len() * 8);
            frame[bit / 8] ^= 1 << (bit % 8);
            // Caught from the frame's own bytes: never a message, never a
            // wait for bytes that a corrupt length promised (Truncated).
            let err = read_message(&mut frame.as_slice()).expect_err("a corrupt frame fails");
            prop_assert!(
                matches!(err, WireError::BadMagic(_) | WireError::BadHeaderCrc | WireError::BadCrc(_)),
                "{:?}",
                err
            );
        }

        #[test]
        fn a_truncated_frame_is_truncated(msg in message(), cut in any::<prop::sample::Index>()) {
            let frame = encode(&msg).expect("encodes");
            let cut = 1 + cut.index(frame.len() - 1);
            let err = read_message(&mut &frame[..cut]).expect_err("a cut frame fails");
            prop_assert!(matches!(err, WireError::Truncated), "{:?}", err);
        }
    }

    #[test]
    fn typed_errors() {
        let frame = encode(&Message::Ack { epoch: 7 }).expect("encodes");
        assert!(matches!(read_message(&mut &[][..]), Err(WireError::Closed)));

        let mut bad = frame.clone();
        bad[0] ^= 0xff;
        assert!(matches!(
            read_message(&mut bad.as_slice()),
            Err(WireError::BadMagic(_))
        ));

        let mut bad = frame.clone();
        *bad.last_mut().expect("payload") ^= 1;
        assert!(matches!(
            read_message(&mut bad.as_slice()),
            Err(WireError::BadCrc(48))
        ));

        let mut grown = frame.clone();
        grown[6] ^= 0x10;
        assert!(matches!(
            read_message(&mut grown.as_slice()),
            Err(WireError::BadHeaderCrc)
        ));

        let long = raw_frame(ty::ACK, MAX_PAYLOAD + 1, &[]);
        assert!(matches!(
            read_message(&mut long.as_slice()),
            Err(WireError::TooLong(_))
        ));

        let unknown = raw_frame(999, 0, &[]);
        assert!(matches!(
            read_message(&mut unknown.as_slice()),
            Err(WireError::UnknownType(999))
        ));

        let payload = [1u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let pages = raw_frame(ty::SYNC_PAGES, 12, &payload);
        assert!(matches!(
            read_message(&mut pages.as_slice()),
            Err(WireError::Undecodable {
                kind: "sync-pages",
                ..
            })
        ));
    }

    #[test]
    fn a_network_frame_beyond_the_bound_is_undecodable() {
        let frame = |len: usize| PeerFrame {
            epoch: 3,
            nic: 1,
            data: vec![0xab; len],
        };
        // The largest frame travels.
        let max = Message::Frame(frame(MAX_PEER_FRAME));
        let bytes = encode(&max).expect("encodes");
        assert_eq!(read_message(&mut bytes.as_slice()).expect("decodes"), max);
        // One byte more is refused when sending...
        assert!(matches!(
            encode(&Message::Frame(frame(MAX_PEER_FRAME + 1))),
            Err(WireError::Undecodable { kind: "frame", .. })
        ));
        // ...and when received from a hostile peer with both CRCs right.
        let mut payload = 3u64.to_le_bytes().to_vec();
        payload.extend_from_slice(&1u16.to_le_bytes());
        payload.extend(std::iter::repeat_n(0xab, MAX_PEER_FRAME + 1));
        let raw = raw_frame(ty::FRAME, payload.len() as u32, &payload);
        assert!(matches!(
            read_message(&mut raw.as_slice()),
            Err(WireError::Undecodable { kind: "frame", .. })
        ));
        // A frame without its NIC is short.
        let raw = raw_frame(ty::FRAME, 9, &[0; 9]);
        assert!(matches!(
            read_message(&mut raw.as_slice()),
            Err(WireError::Undecodable { kind: "frame", .. })
        ));
        // A request with an unknown cause is refused.
        let raw = raw_frame(ty::CHECKPOINT_REQUEST, 1, &[9]);
        assert!(matches!(
            read_message(&mut raw.as_slice()),
            Err(WireError::Undecodable {
                kind: "checkpoint-request",
                ..
            })
        ));
    }

    #[test]
    fn oversized_messages_are_refused_when_encoding() {
        let msg = Message::State {
            epoch: 1,
            bytes: vec![0; MAX_PAYLOAD as usize],
        };
        assert!(matches!(encode(&msg), Err(WireError::TooLong(_))));
    }
}
