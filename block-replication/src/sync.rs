//! Initial sync of a disk: both sides hash their image block by block,
//! the primary sends only the blocks whose hashes differ.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use xxhash_rust::xxh3::xxh3_64;

/// How many bytes [`block_hashes`] reads at once (whole blocks; at least one).
const READ_CHUNK: u64 = 1 << 20;

/// xxh3-64 of every `block`-byte block of `file`'s first `capacity`
/// bytes (the last block may be short), positional reads only (the file
/// offset is untouched, so a device thread may use the same file). A
/// file shorter than `capacity` is an error (`UnexpectedEof`), as is a
/// `block` of 0.
pub fn block_hashes(file: &File, capacity: u64, block: u32) -> io::Result<Vec<u64>> {
    if block == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "block size must not be 0",
        ));
    }
    let block = u64::from(block);
    let count = capacity.div_ceil(block);
    let mut hashes = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let chunk = (READ_CHUNK / block).max(1) * block;
    let mut buf = vec![0u8; usize::try_from(chunk.min(capacity)).map_err(io::Error::other)?];
    let mut offset = 0;
    while offset < capacity {
        let len = chunk.min(capacity - offset) as usize;
        let buf = &mut buf[..len];
        file.read_exact_at(buf, offset)?;
        hashes.extend(buf.chunks(block as usize).map(xxh3_64));
        offset += len as u64;
    }
    Ok(hashes)
}

/// Indices where the lists differ (a longer list's tail counts as different).
pub fn differing(ours: &[u64], theirs: &[u64]) -> Vec<u64> {
    (0..ours.len().max(theirs.len()))
        .filter(|&i| ours.get(i) != theirs.get(i))
        .map(|i| i as u64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    fn file_with(data: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(data).unwrap();
        f
    }

    #[test]
    fn hashes_each_block_and_a_short_last_one() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let f = file_with(&data);
        let hashes = block_hashes(&f, 10_000, 4096).unwrap();
        let want: Vec<u64> = data.chunks(4096).map(xxh3_64).collect();
        assert_eq!(hashes.len(), 3);
        assert_eq!(hashes, want);
        // Only the first `capacity` bytes count.
        assert_eq!(block_hashes(&f, 8192, 4096).unwrap(), want[..2]);
        assert_eq!(block_hashes(&f, 0, 4096).unwrap(), Vec::<u64>::new());
    }

    #[test]
    fn reads_across_chunks() {
        // More than one READ_CHUNK with a block that does not divide it.
        let data: Vec<u8> = (0..(3 << 20) + 5u32).map(|i| (i % 251) as u8).collect();
        let f = file_with(&data);
        let hashes = block_hashes(&f, data.len() as u64, 3000).unwrap();
        let want: Vec<u64> = data.chunks(3000).map(xxh3_64).collect();
        assert_eq!(hashes, want);
    }

    #[test]
    fn refuses_a_short_file_and_block_zero() {
        let f = file_with(&[1; 100]);
        let e = block_hashes(&f, 101, 64).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let e = block_hashes(&f, 100, 0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn differing_counts_a_longer_tail() {
        assert_eq!(differing(&[1, 2, 3], &[1, 9, 3]), vec![1]);
        assert_eq!(differing(&[1, 2], &[1, 2, 3, 4]), vec![2, 3]);
        assert_eq!(differing(&[1, 2, 3], &[1]), vec![1, 2]);
        assert_eq!(differing(&[], &[]), Vec::<u64>::new());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Copying only the differing blocks from one file to another makes
        /// their contents and hashes equal.
        #[test]
        fn copying_differing_blocks_makes_files_equal(
            len in 0usize..20_000,
            block in 1u32..5000,
            seed in any::<u64>(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..20),
        ) {
            let src: Vec<u8> = (0..len).map(|i| (seed.wrapping_mul(i as u64 + 1) >> 13) as u8).collect();
            let mut dst = src.clone();
            for (at, byte) in &edits {
                if len > 0 {
                    dst[at.index(len)] = *byte;
                }
            }
            let (fs, fd) = (file_with(&src), file_with(&dst));
            let theirs = block_hashes(&fs, len as u64, block).unwrap();
            let ours = block_hashes(&fd, len as u64, block).unwrap();
            let diff = differing(&ours, &theirs);
            // Every differing block really differs, every other is equal.
            for (i, (a, b)) in src.chunks(block as usize).zip(dst.chunks(block as usize)).enumerate() {
                prop_assert_eq!(a != b, diff.contains(&(i as u64)));
            }
            let b = u64::from(block);
            let mut buf = vec![0; block as usize];
            for i in diff {
                let off = i * b;
                let n = b.min(len as u64 - off) as usize;
                fs.read_exact_at(&mut buf[..n], off).unwrap();
                fd.write_all_at(&buf[..n], off).unwrap();
            }
            prop_assert_eq!(block_hashes(&fd, len as u64, block).unwrap(), theirs);
            let mut back = vec![0; len];
            fd.read_exact_at(&mut back, 0).unwrap();
            prop_assert_eq!(back, src);
        }
    }
}
