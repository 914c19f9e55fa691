//! The cost of the write-ahead journal: one epoch's commit of forwarded
//! writes into an image file, in place against through the journal (the
//! writes twice, two more fsyncs), for a few epoch shapes.
//!
//! `cargo bench -p block-replication --bench commit`; the files live in
//! `$CARGO_TARGET_DIR` (or `target/`), on the disk the images would be on,
//! not in a tmpfs.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use block_replication::journal::Journal;
use block_replication::secondary::{EpochBuffer, Image};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

const IMAGE: u64 = 256 << 20;

fn scratch() -> tempfile::TempDir {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    std::fs::create_dir_all(&dir).expect("create the scratch parent");
    tempfile::tempdir_in(dir).expect("create a scratch directory")
}

fn image(dir: &tempfile::TempDir) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("image"))
        .expect("create the image");
    f.set_len(IMAGE).expect("size the image");
    f
}

fn commit(c: &mut Criterion) {
    let dir = scratch();
    let mut group = c.benchmark_group("commit");
    group.sample_size(20);
    for (writes, size) in [(16usize, 4096usize), (256, 4096), (16, 256 << 10)] {
        for journaled in [false, true] {
            let name = if journaled { "journaled" } else { "in_place" };
            let shape = format!("{writes}x{}KiB", size >> 10);
            group.bench_function(BenchmarkId::new(name, shape), |b| {
                let mut img = image(&dir);
                let mut buffer = EpochBuffer::new(1 << 30);
                if journaled {
                    let (j, _) = Journal::open(&dir.path().join("journal"), &mut [&mut img])
                        .expect("open the journal");
                    buffer = buffer.with_journal(j);
                }
                let mut epoch = 0u64;
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        epoch += 1;
                        for i in 0..writes {
                            let slot = (i * 7919 + epoch as usize * 31) % (IMAGE as usize / size);
                            let data = vec![epoch as u8; size];
                            buffer
                                .stage(epoch, 0, (slot * size) as u64, data)
                                .expect("stage");
                        }
                        let start = Instant::now();
                        let mut images: [&mut dyn Image; 1] = [&mut img];
                        buffer
                            .commit(epoch, &mut images, &mut |_, _| {})
                            .expect("commit");
                        total += start.elapsed();
                    }
                    total
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, commit);
criterion_main!(benches);
