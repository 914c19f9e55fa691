//! Network and block benchmarks of the test guest (see the crate doc).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use colo_tests::net::{guest_ip, Host, Topology};
use colo_tests::{guest_artifact, Vmm};

use crate::percentile;

const BOOT: Duration = Duration::from_secs(30);
const MSG: usize = 64;
const STREAM_BYTES: usize = 32 << 20;

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// `rounds` 64-byte round trips on one connection; returns (p50, p99).
pub(crate) fn rtt(addr: SocketAddr, rounds: usize) -> (Duration, Duration) {
    let mut s = TcpStream::connect_timeout(&addr, BOOT).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s.set_read_timeout(Some(BOOT)).expect("timeout");
    let msg = [0x5au8; MSG];
    let mut back = [0u8; MSG];
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds + rounds / 10 {
        let t = Instant::now();
        s.write_all(&msg).expect("send");
        s.read_exact(&mut back).expect("receive");
        if i >= rounds / 10 {
            samples.push(t.elapsed()); // the first tenth warms up
        }
    }
    (
        percentile(&mut samples, 0.5),
        percentile(&mut samples, 0.99),
    )
}

/// Streams `STREAM_BYTES` through an echo server; returns MiB/s.
fn throughput(addr: SocketAddr) -> f64 {
    let s = TcpStream::connect_timeout(&addr, BOOT).expect("connect");
    s.set_read_timeout(Some(BOOT)).expect("timeout");
    let mut w = s.try_clone().expect("clone");
    let t = Instant::now();
    let writer = std::thread::spawn(move || {
        let chunk = vec![0xa5u8; 64 * 1024];
        for _ in 0..STREAM_BYTES / chunk.len() {
            w.write_all(&chunk).expect("send");
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < STREAM_BYTES {
        let n = (&s).read(&mut buf).expect("receive");
        assert!(n > 0, "echo closed early");
        got += n;
    }
    writer.join().expect("writer");
    STREAM_BYTES as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64()
}

/// A host echo server: one thread per connection.
fn host_echo(listener: TcpListener) {
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = conn.set_nodelay(true);
            let mut r = conn;
            let mut w = r.try_clone().expect("clone");
            let _ = std::io::copy(&mut r, &mut w);
        });
    }
}

pub fn run(rounds: usize) {
    let topo = Topology::builder().host_b(false).build();
    topo.add_tap(Host::A, "tap0");
    let kernel = guest_artifact("test-guest");
    let mut vmm = Vmm::spawn_in(
        topo.host(Host::A),
        [
            "--kernel",
            kernel.to_str().expect("utf-8 path"),
            "--net",
            "tap=tap0",
            "--cmdline",
            &format!("ip={}/24", guest_ip(0)),
        ],
    );
    vmm.wait_for_serial("colo-test-guest: ready", BOOT);
    let host_addr = SocketAddr::from((Host::A.ip(), 7007));
    let listener = topo
        .host(Host::A)
        .enter(|| TcpListener::bind(host_addr).expect("bind"));
    std::thread::spawn(move || host_echo(listener));
    let guest_addr = SocketAddr::from((guest_ip(0), 7));

    let ((g50, g99), (h50, h99), g_tput, h_tput) = topo.client().enter(|| {
        let g = rtt(guest_addr, rounds);
        let h = rtt(host_addr, rounds);
        (g, h, throughput(guest_addr), throughput(host_addr))
    });
    println!("net: {rounds} round trips of {MSG} B from the client namespace");
    println!(
        "  guest echo RTT p50 {:8.1} us  p99 {:8.1} us",
        us(g50),
        us(g99)
    );
    println!(
        "  host  echo RTT p50 {:8.1} us  p99 {:8.1} us  (baseline)",
        us(h50),
        us(h99)
    );
    println!(
        "  ratio guest/host: p50 {:.2}x  p99 {:.2}x",
        us(g50) / us(h50),
        us(g99) / us(h99)
    );
    println!(
        "  echo throughput ({} MiB): guest {g_tput:.1} MiB/s, host {h_tput:.1} MiB/s, ratio {:.3}",
        STREAM_BYTES >> 20,
        g_tput / h_tput
    );
}

pub fn blk(ops: usize) {
    let disk = tempfile::NamedTempFile::new().expect("disk file");
    let blocks: u64 = (64 << 20) / 4096;
    disk.as_file().set_len(blocks * 4096).expect("size");
    let kernel = guest_artifact("test-guest");
    let mut vmm = Vmm::spawn([
        "--kernel",
        kernel.to_str().expect("utf-8 path"),
        "--disk",
        disk.path().to_str().expect("utf-8 path"),
        "--cmdline",
        &format!("blk_bench_ops={ops}"),
    ]);
    let line = vmm.wait_for_serial("colo-test-guest: blk bench", BOOT);
    let field = |name: &str| -> f64 {
        line.split_whitespace()
            .skip_while(|w| *w != name)
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
    };
    let guest_read = ops as f64 / (field("randread_us") / 1e6);
    let guest_write = ops as f64 / (field("randwrite_us") / 1e6);
    drop(vmm);

    // The host on the same file, same access pattern, pread/pwrite.
    let file = disk.as_file();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % blocks) * 4096
    };
    let mut buf = vec![0u8; 4096];
    let t = Instant::now();
    for _ in 0..ops {
        file.read_exact_at(&mut buf, next()).expect("pread");
    }
    let host_read = ops as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..ops {
        file.write_all_at(&buf, next()).expect("pwrite");
    }
    let host_write = ops as f64 / t.elapsed().as_secs_f64();
    println!("blk: {ops} random 4 KiB operations on a 64 MiB raw file");
    println!("  guest randread {guest_read:9.0} IOPS  randwrite {guest_write:9.0} IOPS");
    println!("  host  randread {host_read:9.0} IOPS  randwrite {host_write:9.0} IOPS  (baseline, page cache)");
    println!(
        "  ratio guest/host: read {:.3}  write {:.3}",
        guest_read / host_read,
        guest_write / host_write
    );
}
