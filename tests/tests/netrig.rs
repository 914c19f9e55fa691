//! The network-namespace rig: the topology comes up, carries traffic only
//! inside its namespaces, holds taps where `vmm` will look for them, and
//! disappears on drop, also when a test panics.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use colo_tests::net::{guest_ip, sweep_stale, Host, Netns, Topology, CLIENT_IP};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Names of the namespaces `ip netns list` shows.
fn listed() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn names(topo: &Topology) -> Vec<String> {
    topo.namespaces()
        .iter()
        .map(|ns| ns.name().to_owned())
        .collect()
}

/// Serves `reply_prefix` followed by an echo of what each connection sends
/// on `port` of `host`'s address, from inside `host`'s namespace.
fn echo_server(topo: &Topology, host: Host, port: u16, reply_prefix: &'static [u8]) {
    let addr = SocketAddr::from((host.ip(), port));
    let listener = topo.host(host).enter(|| TcpListener::bind(addr)).unwrap();
    // The socket stays in host's namespace; any thread may serve it.
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            thread::spawn(move || {
                conn.write_all(reply_prefix).unwrap();
                let mut buf = [0u8; 4096];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => conn.write_all(&buf[..n]).unwrap(),
                    }
                }
            });
        }
    });
}

/// Sends `msg` over `stream` and reads back `expect_prefix` + `msg`.
fn round_trip(mut stream: TcpStream, expect_prefix: &[u8], msg: &[u8]) {
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(msg).unwrap();
    let mut got = vec![0u8; expect_prefix.len() + msg.len()];
    stream.read_exact(&mut got).unwrap();
    assert_eq!(&got[..expect_prefix.len()], expect_prefix);
    assert_eq!(&got[expect_prefix.len()..], msg);
}

#[test]
fn topology_comes_up() {
    let topo = Topology::new();
    let all = listed();
    for name in names(&topo) {
        assert!(all.contains(&name), "{name} not in {all:?}");
    }
    for ns in topo.namespaces() {
        let lo = ns.ip(&["-o", "link", "show", "lo"]);
        assert!(lo.contains("UP"), "lo is down in {}: {lo}", ns.name());
        // IPv6 is off: no link-local addresses, so no chatter on the LAN.
        let v6 = ns.ip(&["-6", "addr"]);
        assert!(v6.trim().is_empty(), "IPv6 in {}: {v6}", ns.name());
    }
    let client = topo
        .client()
        .ip(&["-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(client.contains(&format!("{CLIENT_IP}/24")), "{client}");
    assert!(
        topo.client_ping(Host::A.ip(), 1),
        "client cannot ping host-a"
    );
    assert!(
        topo.client_ping(Host::B.ip(), 1),
        "client cannot ping host-b"
    );
    assert_eq!(topo.client().ping(Host::A.ip(), 3), 3);
    // Hosts reach each other over the switch too.
    assert_eq!(topo.host(Host::A).ping(Host::B.ip(), 1), 1);
}

#[test]
fn nothing_leaks_into_the_root_namespace() {
    let topo = Topology::new();
    let out = Command::new("ip").args(["-o", "addr"]).output().unwrap();
    let root = String::from_utf8_lossy(&out.stdout);
    assert!(!root.contains("10.77.0."), "root namespace has {root}");
    // Nor are guest-LAN addresses routable from the client to elsewhere.
    let routes = topo.client().ip(&["-4", "route"]);
    assert!(!routes.contains("default"), "{routes}");
}

#[test]
fn unanswered_ping_is_false() {
    let topo = Topology::builder().host_b(false).build();
    assert!(!topo.client_ping(guest_ip(89), 1));
}

#[test]
fn client_reaches_tcp_server_in_host_a() {
    let topo = Topology::builder().host_b(false).build();
    echo_server(&topo, Host::A, 7000, b"");
    let addr = SocketAddr::from((Host::A.ip(), 7000));
    let stream = topo.wait_tcp(topo.client(), addr, TIMEOUT).unwrap();
    round_trip(stream, b"", b"hello across the bridge");
    // The connection leaves from the client's address: it goes over eth0.
    let local = topo
        .client()
        .enter(|| TcpStream::connect(addr))
        .unwrap()
        .local_addr()
        .unwrap();
    assert_eq!(local.ip(), CLIENT_IP);
}

#[test]
fn wait_tcp_gives_up_within_its_bound() {
    let topo = Topology::builder().host_b(false).build();
    // host-a's address answers ARP but nothing listens on the port.
    let addr = SocketAddr::from((Host::A.ip(), 7001));
    let start = std::time::Instant::now();
    let err = topo
        .wait_tcp(topo.client(), addr, Duration::from_millis(300))
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[test]
fn tap_lives_in_its_host_namespace_only() {
    let topo = Topology::new();
    topo.add_tap(Host::A, "tap-rig0");
    let inside = topo.host(Host::A).ip(&["-o", "link", "show", "tap-rig0"]);
    assert!(inside.contains("master br0"), "{inside}");
    let inside_run = topo.host(Host::A).run(&["ip", "link", "show", "tap-rig0"]);
    assert!(inside_run.contains("tap-rig0"), "{inside_run}");
    let root = Command::new("ip")
        .args(["link", "show", "tap-rig0"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!root.success(), "tap-rig0 is in the root namespace");
    assert!(
        topo.host(Host::B)
            .try_ip(&["link", "show", "tap-rig0"])
            .is_err(),
        "tap-rig0 is in host-b"
    );
    // The same name may be used on the other host.
    topo.add_tap(Host::B, "tap-rig0");
}

#[test]
fn namespaces_are_gone_after_drop() {
    let topo = Topology::new();
    let made = names(&topo);
    assert_eq!(made.len(), 4);
    drop(topo);
    let all = listed();
    for name in made {
        assert!(!all.contains(&name), "{name} survived drop: {all:?}");
    }
}

#[test]
fn processes_inside_are_killed_on_drop() {
    let topo = Topology::builder().host_b(false).build();
    let mut child = topo
        .host(Host::A)
        .exec("sleep", ["1000"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    // `ip netns exec` execs sleep once it is inside: poll until it is.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !topo.host(Host::A).pids().contains(&pid) {
        assert!(std::time::Instant::now() < deadline, "sleep never entered");
        thread::sleep(Duration::from_millis(10));
    }
    drop(topo);
    let status = child.wait().unwrap();
    assert!(!status.success(), "sleep was not killed: {status}");
}

#[test]
fn two_topologies_do_not_collide() {
    let one = Topology::new();
    let two = Topology::new();
    let (n1, n2) = (names(&one), names(&two));
    assert!(n1.iter().all(|n| !n2.contains(n)), "{n1:?} vs {n2:?}");
    // Same addresses and ports in both, each answering only its own client.
    echo_server(&one, Host::A, 7000, b"one:");
    echo_server(&two, Host::A, 7000, b"two:");
    let addr = SocketAddr::from((Host::A.ip(), 7000));
    round_trip(
        one.wait_tcp(one.client(), addr, TIMEOUT).unwrap(),
        b"one:",
        b"x",
    );
    round_trip(
        two.wait_tcp(two.client(), addr, TIMEOUT).unwrap(),
        b"two:",
        b"y",
    );
    one.add_tap(Host::A, "tap0");
    two.add_tap(Host::A, "tap0");
}

#[test]
fn panic_in_a_test_still_cleans_up() {
    let made = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let topo = Topology::new();
        topo.add_tap(Host::A, "tap0");
        made.lock().unwrap().extend(names(&topo));
        // A panic inside `enter` goes on in the caller.
        topo.host(Host::A)
            .enter(|| panic!("test failure inside host-a"));
    });
    assert!(result.is_err());
    let made = made.into_inner().unwrap();
    assert_eq!(made.len(), 4);
    let all = listed();
    for name in made {
        assert!(!all.contains(&name), "{name} survived a panic: {all:?}");
    }
}

#[test]
fn sweep_removes_namespaces_of_dead_processes_only() {
    // A pid that surely belonged to a process that is gone now.
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let stale = format!("colo-stale-{dead}-0");
    let out = Command::new("ip")
        .args(["netns", "add", &stale])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let live = Netns::new("live");
    sweep_stale();
    let all = listed();
    assert!(!all.contains(&stale), "{stale} survived the sweep");
    assert!(
        all.contains(&live.name().to_owned()),
        "the sweep took {}",
        live.name()
    );
}

#[test]
fn exec_runs_inside() {
    let topo = Topology::builder().host_b(false).build();
    let out = topo
        .host(Host::A)
        .exec("ip", ["-o", "-4", "addr", "show", "dev", "br0"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{}/24", Host::A.ip())), "{text}");
}

#[test]
fn unplugging_a_host_cuts_it_off() {
    let topo = Topology::new();
    assert!(topo.client_ping(Host::B.ip(), 1));
    topo.set_uplink(Host::B, false);
    assert!(!topo.client_ping(Host::B.ip(), 1));
    assert!(topo.client_ping(Host::A.ip(), 1));
    topo.set_uplink(Host::B, true);
    assert!(topo.client_ping(Host::B.ip(), 1));
}

/// The network namespace inode of the calling thread.
fn own_netns() -> u64 {
    let link = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let link = link.to_string_lossy();
    link.trim_start_matches("net:[")
        .trim_end_matches(']')
        .parse()
        .unwrap()
}

#[test]
fn enter_moves_only_its_thread() {
    use std::os::unix::fs::MetadataExt;
    let ns = Netns::new("enter");
    let inode = std::fs::metadata(ns.path()).unwrap().ino();
    let before = own_netns();
    assert_ne!(before, inode);
    let (inside, spawned) = ns.enter(|| (own_netns(), thread::spawn(own_netns).join().unwrap()));
    assert_eq!(inside, inode);
    assert_eq!(spawned, inode, "threads spawned inside start inside");
    assert_eq!(own_netns(), before, "the caller moved");
}
