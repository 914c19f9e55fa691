#![allow(clippy::unwrap_used)]
//! The networked test guest on virtio-net and virtio-blk, reached from the
//! `client` namespace across the rig's switch: echo, ping, the HTTP
//! counter, and the key-value store on a real disk file.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::Duration;

use colo_tests::http::{api_request, Client};
use colo_tests::net::{guest_ip, Host, Topology};
use colo_tests::{guest_artifact, Vmm};

const BOOT: Duration = Duration::from_secs(20);
const TAP: &str = "tap0";

/// A test guest on host-a's tap with a disk, and the topology around it.
struct Guest {
    topo: Topology,
    vmm: Vmm,
}

fn disk_file(sectors: u64) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(sectors * 512).unwrap();
    f
}

fn start_guest(topo: &Topology, disk: Option<(&Path, bool)>, extra: &[&str]) -> Vmm {
    let mut args: Vec<String> = vec![
        "--kernel".into(),
        guest_artifact("test-guest").display().to_string(),
        "--net".into(),
        format!("tap={TAP}"),
        "--cmdline".into(),
        format!("ip={}/24", guest_ip(0)),
    ];
    if let Some((path, ro)) = disk {
        args.push("--disk".into());
        args.push(format!(
            "{}{}",
            path.display(),
            if ro { ",readonly" } else { "" }
        ));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut vmm = Vmm::spawn_in(topo.host(Host::A), &args);
    vmm.wait_for_serial("colo-test-guest: ready", BOOT);
    vmm
}

impl Guest {
    fn new(disk: Option<(&Path, bool)>) -> Self {
        let topo = Topology::builder().host_b(false).build();
        topo.add_tap(Host::A, TAP);
        let vmm = start_guest(&topo, disk, &[]);
        Self { topo, vmm }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from((guest_ip(0), port))
    }

    /// Runs `f` with a keep-alive HTTP connection from the client.
    fn http<R: Send>(&self, f: impl FnOnce(&mut Client<TcpStream>) -> R + Send) -> R {
        self.topo.client().enter(|| {
            let stream = TcpStream::connect_timeout(&Self::addr(80), BOOT).unwrap();
            stream.set_read_timeout(Some(BOOT)).unwrap();
            let mut client = Client::new(stream, &guest_ip(0).to_string());
            f(&mut client)
        })
    }
}

#[test]
fn ping_tcp_and_udp_echo_from_the_client() {
    let g = Guest::new(None);
    assert!(
        g.topo.client_ping(guest_ip(0), 3),
        "the guest does not answer pings"
    );

    let sent: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let got = g.topo.client().enter(|| {
        let stream = TcpStream::connect_timeout(&Guest::addr(7), BOOT).unwrap();
        stream.set_read_timeout(Some(BOOT)).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let data = sent.clone();
        let w = std::thread::spawn(move || {
            writer.write_all(&data).unwrap();
            writer.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut got = Vec::new();
        (&stream).read_to_end(&mut got).unwrap();
        w.join().unwrap();
        got
    });
    assert_eq!(
        got.len(),
        sent.len(),
        "echo returned {} of {} bytes",
        got.len(),
        sent.len()
    );
    assert!(got == sent, "echoed bytes differ");

    g.topo.client().enter(|| {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for i in 0..20u32 {
            let msg = format!("datagram {i}");
            sock.send_to(msg.as_bytes(), Guest::addr(7)).unwrap();
            let mut buf = [0u8; 64];
            let (n, from) = sock.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (msg.as_bytes(), Guest::addr(7)));
        }
    });
}

#[test]
fn a_thousand_counter_requests_come_back_in_order() {
    let g = Guest::new(None);
    let counts = g.http(|c| {
        (0..1000)
            .map(|_| {
                let r = c.request("GET", "/count", b"").unwrap();
                assert_eq!(r.status, 200);
                r.text().parse::<u64>().unwrap()
            })
            .collect::<Vec<_>>()
    });
    assert_eq!(counts, (1..=1000).collect::<Vec<u64>>());
    // A new connection sees the same counter, and /stats agrees.
    let (next, stats) = g.http(|c| {
        let next = c.request("GET", "/count", b"").unwrap().text();
        (next, c.request("GET", "/stats", b"").unwrap().text())
    });
    assert_eq!(next, "1001");
    assert!(stats.contains("\"count\":1001"), "{stats}");
    // Unknown paths and methods get HTTP errors, and the service goes on.
    let statuses = g.http(|c| {
        [
            c.request("GET", "/nope", b"").unwrap().status,
            c.request("DELETE", "/count", b"").unwrap().status,
            c.request("GET", "/count", b"").unwrap().status,
        ]
    });
    assert_eq!(statuses, [404, 405, 200]);
}

/// One record of the guest's on-disk log (see the guest's `kv` module).
fn expected_record(seq: u32, key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut rec = vec![0u8; (32 + key.len() + value.len()).div_ceil(512) * 512];
    rec[..4].copy_from_slice(b"CKV1");
    rec[4..8].copy_from_slice(&seq.to_le_bytes());
    rec[8..10].copy_from_slice(&(key.len() as u16).to_le_bytes());
    rec[12..16].copy_from_slice(&(value.len() as u32).to_le_bytes());
    rec[32..32 + key.len()].copy_from_slice(key);
    rec[32 + key.len()..32 + key.len() + value.len()].copy_from_slice(value);
    let mut crc = 0xffff_ffffu32;
    for &b in rec[..16].iter().chain(key).chain(value) {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    rec[16..20].copy_from_slice(&(!crc).to_le_bytes());
    rec
}

#[test]
fn key_value_records_survive_a_restart_at_the_expected_offsets() {
    let disk = disk_file(4096);
    let alpha: Vec<u8> = b"first value".to_vec();
    let beta: Vec<u8> = (0..3000u32).map(|i| (i % 253) as u8).collect();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let topo = Topology::builder().host_b(false).build();
    topo.add_tap(Host::A, TAP);
    let api = ["--api-sock", sock.to_str().unwrap()];
    let vmm = start_guest(&topo, Some((disk.path(), false)), &api);
    let mut g = Guest { topo, vmm };
    let statuses = g.http(|c| {
        [
            c.request("POST", "/kv/alpha", &alpha).unwrap().status,
            c.request("POST", "/kv/beta", &beta).unwrap().status,
            c.request("POST", "/kv/bad key", b"x").unwrap().status,
        ]
    });
    assert_eq!(statuses, [201, 201, 400]);
    // An orderly shutdown over the API.
    let r = api_request(&sock, "PUT", "/actions", r#"{"action":"shutdown"}"#).unwrap();
    assert_eq!(r.status, 202);
    assert!(g.vmm.wait_exit(BOOT).success());

    // The host sees both records, flushed, where the format puts them.
    let bytes = std::fs::read(disk.path()).unwrap();
    let first = expected_record(1, b"alpha", &alpha);
    let second = expected_record(2, b"beta", &beta);
    assert_eq!(
        &bytes[512..512 + first.len()],
        &first[..],
        "record 1 at byte 512"
    );
    let at = 512 + first.len();
    assert_eq!(
        &bytes[at..at + second.len()],
        &second[..],
        "record 2 at byte {at}"
    );

    g.vmm = start_guest(&g.topo, Some((disk.path(), false)), &[]);
    let (a, b, missing) = g.http(|c| {
        (
            c.request("GET", "/kv/alpha", b"").unwrap(),
            c.request("GET", "/kv/beta", b"").unwrap(),
            c.request("GET", "/kv/gamma", b"").unwrap().status,
        )
    });
    assert_eq!((a.status, a.body), (200, alpha));
    assert_eq!((b.status, b.body), (200, beta));
    assert_eq!(missing, 404);
}

#[test]
fn a_readonly_disk_refuses_guest_writes() {
    let disk = disk_file(64);
    std::fs::write(disk.path(), vec![0x5au8; 64 * 512]).unwrap();
    let before = std::fs::read(disk.path()).unwrap();
    let g = Guest::new(Some((disk.path(), true)));
    let (put, stats) = g.http(|c| {
        (
            c.request("POST", "/kv/key", b"value").unwrap(),
            c.request("GET", "/stats", b"").unwrap().text(),
        )
    });
    assert_eq!(put.status, 500, "{}", put.text());
    assert_eq!(put.text(), "disk write failed\n");
    assert!(stats.contains("\"disk\":\"ro\""), "{stats}");
    assert_eq!(
        std::fs::read(disk.path()).unwrap(),
        before,
        "the read-only disk changed"
    );
}
