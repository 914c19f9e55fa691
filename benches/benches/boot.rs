//! Boot-to-ready time of the test guest under `vmm`, against spawning a
//! trivial process (`/bin/true`) measured in the same run.
//!
//! Build first: `cargo build --release --bins && resources/build.sh test-guest`.

use std::process::Command;
use std::time::{Duration, Instant};

use colo_tests::{guest_artifact, Vmm};
use criterion::{criterion_group, criterion_main, Criterion};

const TIMEOUT: Duration = Duration::from_secs(30);

fn boot(c: &mut Criterion) {
    let kernel = guest_artifact("test-guest");
    let kernel = kernel.to_str().expect("utf-8 path").to_string();
    let mut group = c.benchmark_group("boot");
    group.sample_size(20);
    group.bench_function("baseline_spawn_true", |b| {
        b.iter(|| Command::new("true").status().expect("run true"))
    });
    group.bench_function("test_guest_to_ready", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let mut vmm = Vmm::spawn([
                    "--kernel",
                    &kernel,
                    "--mem-mib",
                    "128",
                    "--cmdline",
                    "halt_after_ms=0",
                ]);
                vmm.wait_for_serial("colo-test-guest: ready", TIMEOUT);
                total += start.elapsed();
                vmm.wait_exit(TIMEOUT);
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, boot);
criterion_main!(benches);
