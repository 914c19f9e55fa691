//! The key-value store's on-disk format: an append-only log of records on
//! the virtio-blk disk, one record per write, each a whole number of
//! 512-byte sectors.
//!
//! Sector 0 is left alone (a host tool may label the disk there); the log
//! starts at sector [`LOG_START_SECTOR`]. A record is a 32-byte header, the
//! key, the value, and zero padding to the next sector boundary:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `CKV1` |
//! | 4 | 4 | sequence number, little-endian, from 1 |
//! | 8 | 2 | key length |
//! | 10 | 2 | zero |
//! | 12 | 4 | value length |
//! | 16 | 4 | CRC-32 (IEEE) of bytes 0..16, the key and the value |
//! | 20 | 12 | zero |
//!
//! The log ends at the first sector that does not start a valid record, so
//! a torn last write is simply not there after a restart; the next write
//! overwrites it. The newest record of a key wins.

use alloc::vec::Vec;

/// Bytes per disk sector.
pub const SECTOR: usize = 512;
/// First sector of the log.
pub const LOG_START_SECTOR: u64 = 1;
/// Record header length.
pub const HEADER_LEN: usize = 32;
/// Longest key.
pub const MAX_KEY_LEN: usize = 64;
/// Longest value.
pub const MAX_VALUE_LEN: usize = 16 * 1024;
const MAGIC: &[u8; 4] = b"CKV1";

/// Why a key or value cannot be stored.
#[derive(Debug, PartialEq, Eq)]
pub enum KvError {
    BadKey,
    ValueTooLong,
}

/// A key may hold 1..=64 bytes of `[A-Za-z0-9._-]`.
pub fn valid_key(key: &[u8]) -> bool {
    !key.is_empty()
        && key.len() <= MAX_KEY_LEN
        && key
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(b))
}

/// Sectors a record with these lengths occupies.
pub fn record_sectors(key_len: usize, value_len: usize) -> u64 {
    (HEADER_LEN + key_len + value_len).div_ceil(SECTOR) as u64
}

/// CRC-32 (IEEE 802.3, reflected, as zlib computes it), continued from `crc`
/// (start with 0).
pub fn crc32(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Encodes a record into whole sectors.
pub fn encode(seq: u32, key: &[u8], value: &[u8]) -> Result<Vec<u8>, KvError> {
    if !valid_key(key) {
        return Err(KvError::BadKey);
    }
    if value.len() > MAX_VALUE_LEN {
        return Err(KvError::ValueTooLong);
    }
    let sectors = record_sectors(key.len(), value.len()) as usize;
    let mut out = alloc::vec![0u8; sectors * SECTOR];
    out[..4].copy_from_slice(MAGIC);
    out[4..8].copy_from_slice(&seq.to_le_bytes());
    out[8..10].copy_from_slice(&(key.len() as u16).to_le_bytes());
    out[12..16].copy_from_slice(&(value.len() as u32).to_le_bytes());
    out[HEADER_LEN..HEADER_LEN + key.len()].copy_from_slice(key);
    out[HEADER_LEN + key.len()..HEADER_LEN + key.len() + value.len()].copy_from_slice(value);
    let crc = crc32(crc32(crc32(0, &out[..16]), key), value);
    out[16..20].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// What the first sector of a record says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub seq: u32,
    pub key_len: usize,
    pub value_len: usize,
    pub crc: u32,
}

impl Header {
    /// Parses the first sector of a would-be record; `None` ends the log.
    pub fn parse(sector: &[u8]) -> Option<Self> {
        if sector.len() < HEADER_LEN || &sector[..4] != MAGIC {
            return None;
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([sector[o], sector[o + 1], sector[o + 2], sector[o + 3]]);
        let key_len = usize::from(u16::from_le_bytes([sector[8], sector[9]]));
        let value_len = u32_at(12) as usize;
        if key_len == 0 || key_len > MAX_KEY_LEN || value_len > MAX_VALUE_LEN {
            return None;
        }
        Some(Self {
            seq: u32_at(4),
            key_len,
            value_len,
            crc: u32_at(16),
        })
    }

    /// Sectors the whole record occupies.
    pub fn sectors(&self) -> u64 {
        record_sectors(self.key_len, self.value_len)
    }

    /// The key and value of the whole record `bytes` (all its sectors), if
    /// its checksum holds.
    pub fn verify<'a>(&self, bytes: &'a [u8]) -> Option<(&'a [u8], &'a [u8])> {
        let end = HEADER_LEN + self.key_len + self.value_len;
        if bytes.len() < end {
            return None;
        }
        let key = &bytes[HEADER_LEN..HEADER_LEN + self.key_len];
        let value = &bytes[HEADER_LEN + self.key_len..end];
        let crc = crc32(crc32(crc32(0, &bytes[..16]), key), value);
        (crc == self.crc && valid_key(key)).then_some((key, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(0, b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(crc32(0, b"1234"), b"56789"), 0xcbf4_3926);
    }

    #[test]
    fn records_round_trip_and_fill_whole_sectors() {
        let rec = encode(7, b"alpha", b"hello world").unwrap();
        assert_eq!(rec.len(), SECTOR);
        let h = Header::parse(&rec).unwrap();
        assert_eq!((h.seq, h.key_len, h.value_len, h.sectors()), (7, 5, 11, 1));
        assert_eq!(h.verify(&rec), Some((&b"alpha"[..], &b"hello world"[..])));
        let big = encode(1, b"k", &[0xaa; 1000]).unwrap();
        assert_eq!(big.len(), 3 * SECTOR);
    }

    #[test]
    fn corruption_and_bad_input_are_caught() {
        let mut rec = encode(1, b"key", b"value").unwrap();
        rec[HEADER_LEN + 4] ^= 1;
        let h = Header::parse(&rec).unwrap();
        assert_eq!(h.verify(&rec), None);
        assert_eq!(Header::parse(&[0u8; SECTOR]), None);
        assert_eq!(encode(1, b"bad key", b"v"), Err(KvError::BadKey));
        assert_eq!(encode(1, b"", b"v"), Err(KvError::BadKey));
        assert_eq!(
            encode(1, b"k", &[0; MAX_VALUE_LEN + 1]),
            Err(KvError::ValueTooLong)
        );
    }
}
