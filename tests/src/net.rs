//! Network namespaces that stand for hosts, so one machine can hold a
//! client, a primary and a secondary without touching its own network.
//!
//! A [`Netns`] is one uniquely named namespace (`colo-<role>-<pid>-<n>`:
//! the pid of the test process and a per-process counter, so parallel tests
//! and parallel test processes never collide). Dropping it kills whatever
//! still runs inside and deletes it, which also removes every interface in
//! it (veths, bridges, taps). [`sweep_stale`] deletes namespaces left by
//! test processes that died without dropping theirs (SIGKILL, abort).
//!
//! A [`Topology`] is the standard layout. Everything lives in namespaces it
//! creates; the root namespace gets no interface, address or route:
//!
//! ```text
//!  client ns              switch ns                 host-a ns
//!  eth0 10.77.0.1 ─veth─ [client]                   br0 10.77.0.2
//!                        [host-a] ──────veth────── uplink ─┬─ tap (vmm)
//!                        [host-b] ─┐  (all on br0)         └─ tap (vmm)
//!                                  │                    host-b ns
//!                                  └───────veth─────── uplink ─ br0 10.77.0.3
//!                                                              └─ tap (vmm)
//! ```
//!
//! One subnet, 10.77.0.0/24, is one Ethernet segment: the switch's `br0`
//! joins the client and each host's `br0`, and [`Topology::add_tap`]
//! enslaves a tap to its host's `br0`, so a `vmm` started in that host's
//! namespace (`ip netns exec <host-a> vmm --net tap=NAME,...`, or
//! [`Netns::exec`]) puts its guest on the segment. Guests answer for
//! [`guest_ip`]`(i)` = 10.77.0.(10 + i). Cutting a host's switch port
//! ([`Topology::set_uplink`]) stands for unplugging that host.
//!
//! Each namespace has `lo` up and IPv6 off, so the segment carries only
//! what tests and guests send (no router solicitations, MLD or DAD): COLO
//! compares guests' packets and must not see host chatter. Bridges run
//! without STP, so ports forward as soon as they have carrier.
//!
//! Test code runs inside a namespace with [`Netns::enter`]. A socket stays
//! in the namespace it was created in, so a listener made inside `enter`
//! can be served from any thread afterwards; threads spawned inside
//! `enter` start in the namespace too.
//!
//! Pinging uses a raw ICMP socket opened in the namespace ([`Netns::ping`]),
//! so the rig needs no `ping` binary; setup needs only `ip` (iproute2), root,
//! and `/dev/net/tun` for taps.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// Every namespace the rig makes starts with this.
pub const PREFIX: &str = "colo-";

/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/var/run/netns";

/// The guest LAN: 10.77.0.0/[`PREFIX_LEN`].
pub const SUBNET: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 0);

/// Prefix length of [`SUBNET`].
pub const PREFIX_LEN: u8 = 24;

/// The client's address on the guest LAN.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

/// The address of guest number `index` (0, 1, ...): 10.77.0.(10 + index).
pub fn guest_ip(index: u8) -> Ipv4Addr {
    assert!(index < 240, "guest index {index} is past the /24");
    Ipv4Addr::new(10, 77, 0, 10 + index)
}

/// Between readiness polls. Polling, not synchronising: each poll checks
/// the real condition and the total wait is bounded by the caller.
const POLL: Duration = Duration::from_millis(20);

/// Serialises `ip netns add` within this process: the first `ip netns add`
/// on a machine sets up the `/var/run/netns` mount, and concurrent first
/// calls race on it.
static CREATE: Mutex<()> = Mutex::new(());

/// Numbers the namespaces this process makes.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Runs `cmd`; returns its stdout, or an error carrying its stderr.
fn output(mut cmd: Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let Output {
        status,
        stdout,
        stderr,
    } = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{shown}: {e}"))?;
    if status.success() {
        Ok(String::from_utf8_lossy(&stdout).into_owned())
    } else {
        Err(format!(
            "{shown} failed ({status}): {}",
            String::from_utf8_lossy(&stderr).trim()
        ))
    }
}

/// Runs `ip args...` in the root namespace.
fn ip_root(args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    output(cmd)
}

/// Whether a process with `pid` exists (a zombie counts).
fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 sends nothing; it only checks that `pid`
    // exists and takes no pointers.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The processes whose network namespace is `name`, except this one.
fn pids_in(name: &str) -> Result<Vec<i32>, String> {
    let own = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    Ok(ip_root(&["netns", "pids", name])?
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|&p| p != own && p > 1)
        .collect())
}

/// Kills everything in namespace `name`, then deletes it. Never panics:
/// it runs in `Drop`, possibly while a test unwinds.
fn destroy(name: &str) -> Result<(), String> {
    // Kill until none is left: a process may be entering while we look.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = pids_in(name)?;
        if pids.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!("processes {pids:?} in {name} survive SIGKILL"));
        }
        for pid in pids {
            // SAFETY: kill takes no pointers; `pid` is a process that
            // `ip netns pids` found in our test namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        thread::sleep(POLL);
    }
    ip_root(&["netns", "del", name]).map(drop)
}

/// Deletes namespaces with the rig's [`PREFIX`] whose creating process is
/// gone, killing anything still inside them first. [`Topology::new`] calls
/// it. A namespace whose creator's pid was reused by a live process stays
/// until that process ends.
pub fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    let own = std::process::id();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = creator_pid(&name) else {
            continue;
        };
        if u32::try_from(pid).ok() == Some(own) || pid_alive(pid) {
            continue;
        }
        // Another process may be sweeping the same one: ignore failures.
        if let Err(e) = destroy(&name) {
            if std::path::Path::new(NETNS_DIR).join(&name).exists() {
                eprintln!("netns rig: cannot sweep {name}: {e}");
            }
        }
    }
}

/// The pid in a rig namespace name `colo-<role>-<pid>-<counter>`.
fn creator_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(PREFIX)?;
    let mut parts = rest.rsplitn(3, '-');
    let _counter: u64 = parts.next()?.parse().ok()?;
    let pid: i32 = parts.next()?.parse().ok()?;
    let role = parts.next()?;
    (!role.is_empty() && pid > 0).then_some(pid)
}

/// One network namespace, deleted on drop with everything in it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `colo-<role>-<pid>-<n>` with `lo` up and IPv6 off. `role`
    /// is lowercase letters, digits and `-`. Panics when `ip` fails (not
    /// root, no netns support).
    pub fn new(role: &str) -> Self {
        assert!(
            !role.is_empty()
                && role
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "bad namespace role {role:?}"
        );
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{role}-{}-{n}", std::process::id());
        {
            let _serial = CREATE.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = ip_root(&["netns", "add", &name]) {
                panic!("cannot create network namespace (tests need root and iproute2): {e}");
            }
        }
        // From here Drop deletes it, even if the rest panics.
        let ns = Self { name };
        ns.enter(|| {
            for knob in ["all", "default"] {
                let path = format!("/proc/sys/net/ipv6/conf/{knob}/disable_ipv6");
                match std::fs::write(&path, "1") {
                    Ok(()) => {}
                    // A kernel without IPv6 has no such knob: nothing to turn off.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => panic!("{path}: {e}"),
                }
            }
        });
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/var/run/netns/<name>`, the file `setns` opens.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// A command that runs `program args...` inside the namespace (as
    /// `ip netns exec <name> program args...`; `ip` execs the program, so
    /// the child's pid is the program's).
    pub fn exec<P, I, S>(&self, program: P, args: I) -> Command
    where
        P: AsRef<OsStr>,
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(program)
            .args(args);
        cmd
    }

    /// Runs `args[0] args[1..]` inside the namespace and returns its
    /// stdout; panics with its stderr when it fails. For setup.
    pub fn run(&self, args: &[&str]) -> String {
        let (program, rest) = args.split_first().expect("run needs a program");
        output(self.exec(program, rest)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Netns::run`] but reports failure instead of panicking.
    pub fn try_run(&self, args: &[&str]) -> Result<String, String> {
        let (program, rest) = args.split_first().expect("try_run needs a program");
        output(self.exec(program, rest))
    }

    /// `ip -n <name> args...`: stdout, or a panic with stderr.
    pub fn ip(&self, args: &[&str]) -> String {
        self.try_ip(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `ip -n <name> args...`: stdout, or stderr as the error.
    pub fn try_ip(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &self.name]).args(args);
        output(cmd)
    }

    /// Runs `f` on a fresh thread whose network namespace is this one, and
    /// returns its result; a panic in `f` goes on in the caller. Sockets
    /// made in `f` stay in this namespace after it returns.
    pub fn enter<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = self.path();
        let name = self.name.as_str();
        thread::scope(|scope| {
            let inside = thread::Builder::new()
                .name(format!("in-{name}"))
                .spawn_scoped(scope, move || {
                    let file = File::open(&path)
                        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
                    // SAFETY: setns takes a descriptor that `file` keeps open
                    // for the call and no pointers; it moves only this fresh
                    // thread into the namespace.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    if rc != 0 {
                        panic!("setns into {name}: {}", io::Error::last_os_error());
                    }
                    drop(file);
                    f()
                })
                .expect("spawn a thread");
            match inside.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Connects to `addr` from inside the namespace, retrying until it
    /// accepts or `timeout` passes; returns the connected stream. For
    /// waiting until a server (a guest's, say) is ready.
    pub fn wait_tcp(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.enter(|| {
            let deadline = Instant::now() + timeout;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let attempt = left.clamp(Duration::from_millis(1), Duration::from_secs(1));
                let err = match TcpStream::connect_timeout(&addr, attempt) {
                    Ok(stream) => return Ok(stream),
                    Err(e) => e,
                };
                if Instant::now() + POLL >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "{addr} accepted no connection from {} within {timeout:?}; last: {err}",
                            self.name
                        ),
                    ));
                }
                thread::sleep(POLL);
            }
        })
    }

    /// Sends `count` ICMP echo requests to `ip` from inside the namespace,
    /// each waiting up to a second for its reply (like `ping -c count -W
    /// 1`); returns how many were answered.
    pub fn ping(&self, ip: Ipv4Addr, count: u32) -> u32 {
        self.enter(|| icmp_echo(ip, count, Duration::from_secs(1)))
            .unwrap_or_else(|e| panic!("ping {ip} from {}: {e}", self.name))
    }

    /// The processes inside the namespace (by their main thread).
    pub fn pids(&self) -> Vec<i32> {
        pids_in(&self.name).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = destroy(&self.name) {
            eprintln!("netns rig: cannot delete {}: {e}", self.name);
        }
    }
}

/// Tells concurrent pings in this process apart.
static PING_ID: AtomicU16 = AtomicU16::new(0);

/// The Internet checksum (RFC 1071) of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Pings `dst` `count` times over a raw ICMP socket in the calling thread's
/// namespace, waiting up to `wait` for each reply; returns the replies.
fn icmp_echo(dst: Ipv4Addr, count: u32, wait: Duration) -> io::Result<u32> {
    // SAFETY: socket takes no pointers; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor socket just returned, owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let ident = (std::process::id() as u16) ^ PING_ID.fetch_add(0x0101, Ordering::Relaxed);
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut replies = 0;
    for seq in 0..count {
        let seq = seq as u16;
        let mut packet = [0u8; 64];
        packet[0] = 8; // echo request
        packet[4..6].copy_from_slice(&ident.to_be_bytes());
        packet[6..8].copy_from_slice(&seq.to_be_bytes());
        for (i, b) in packet[8..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let sum = checksum(&packet);
        packet[2..4].copy_from_slice(&sum.to_be_bytes());
        // SAFETY: `packet` and `to` are live for the call and the lengths
        // passed are theirs.
        let sent = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const to).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            let e = io::Error::last_os_error();
            // No route or no neighbour is an unanswered ping, not a rig fault.
            if matches!(
                e.raw_os_error(),
                Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN)
            ) {
                continue;
            }
            return Err(e);
        }
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let mut pfd = libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, 1000) as libc::c_int;
            // SAFETY: `pfd` is one live pollfd and we pass a count of 1.
            let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
            if ready < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if ready == 0 {
                continue;
            }
            let mut buf = [0u8; 1500];
            // SAFETY: `buf` is live and writable for its whole length.
            let n = unsafe {
                libc::recv(
                    sock.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    continue;
                }
                return Err(e);
            }
            // A raw IPv4 socket hands over the IP header too.
            let got = &buf[..n as usize];
            let Some(&first) = got.first() else { continue };
            let ihl = usize::from(first & 0x0f) * 4;
            if got.len() < ihl + 8 || ihl < 20 {
                continue;
            }
            let src = Ipv4Addr::new(got[12], got[13], got[14], got[15]);
            let icmp = &got[ihl..];
            if src == dst
                && icmp[0] == 0
                && icmp[4..6] == ident.to_be_bytes()
                && icmp[6..8] == seq.to_be_bytes()
            {
                replies += 1;
                break;
            }
        }
    }
    Ok(replies)
}

/// A host namespace of a [`Topology`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    /// `host-a`: the primary in COLO tests.
    A,
    /// `host-b`: the secondary in COLO tests.
    B,
}

impl Host {
    /// The host's own address on the guest LAN (on its `br0`).
    pub fn ip(self) -> Ipv4Addr {
        match self {
            Host::A => Ipv4Addr::new(10, 77, 0, 2),
            Host::B => Ipv4Addr::new(10, 77, 0, 3),
        }
    }

    /// The role in its namespace's name, and its port's name on the switch.
    pub fn role(self) -> &'static str {
        match self {
            Host::A => "host-a",
            Host::B => "host-b",
        }
    }
}

/// Chooses which namespaces a [`Topology`] has.
#[derive(Clone, Debug)]
pub struct TopologyBuilder {
    host_b: bool,
}

impl TopologyBuilder {
    /// Whether to make `host-b` (default: yes).
    pub fn host_b(mut self, yes: bool) -> Self {
        self.host_b = yes;
        self
    }

    /// Sweeps stale namespaces, then builds the layout in the module doc.
    /// Panics if any step fails; whatever was made is deleted again.
    pub fn build(self) -> Topology {
        sweep_stale();
        let switch = Netns::new("switch");
        let client = Netns::new("client");
        let host_a = Netns::new(Host::A.role());
        let host_b = self.host_b.then(|| Netns::new(Host::B.role()));

        add_bridge(&switch, None);
        switch.ip(&[
            "link",
            "add",
            "client",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            client.name(),
        ]);
        switch.ip(&["link", "set", "client", "master", "br0", "up"]);
        let cidr = format!("{CLIENT_IP}/{PREFIX_LEN}");
        client.ip(&["addr", "add", &cidr, "dev", "eth0"]);
        client.ip(&["link", "set", "eth0", "up"]);

        for (host, ns) in [(Host::A, Some(&host_a)), (Host::B, host_b.as_ref())] {
            let Some(ns) = ns else { continue };
            add_bridge(ns, Some(host.ip()));
            switch.ip(&[
                "link",
                "add",
                host.role(),
                "type",
                "veth",
                "peer",
                "name",
                "uplink",
                "netns",
                ns.name(),
            ]);
            switch.ip(&["link", "set", host.role(), "master", "br0", "up"]);
            ns.ip(&["link", "set", "uplink", "master", "br0", "up"]);
        }
        let topo = Topology {
            client,
            host_a,
            host_b,
            switch,
        };
        // Ports forward once they have carrier and the first ARP went
        // through: tests start on a working segment.
        topo.wait_reachable(Host::A);
        if topo.host_b.is_some() {
            topo.wait_reachable(Host::B);
        }
        topo
    }
}

/// Makes `br0` in `ns` (no STP, forwarding at once), with `ip` if given, up.
fn add_bridge(ns: &Netns, ip: Option<Ipv4Addr>) {
    ns.ip(&[
        "link",
        "add",
        "br0",
        "type",
        "bridge",
        "stp_state",
        "0",
        "forward_delay",
        "0",
    ]);
    if let Some(ip) = ip {
        let cidr = format!("{ip}/{PREFIX_LEN}");
        ns.ip(&["addr", "add", &cidr, "dev", "br0"]);
    }
    ns.ip(&["link", "set", "br0", "up"]);
}

/// The standard test network: `client`, `host-a`, optionally `host-b`,
/// joined by a bridge in a `switch` namespace (see the module doc). All of
/// it is deleted on drop, also when a test panics.
#[derive(Debug)]
pub struct Topology {
    client: Netns,
    host_a: Netns,
    host_b: Option<Netns>,
    switch: Netns,
}

impl Topology {
    /// The full layout: client, host-a and host-b.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder, to leave out `host-b`.
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder { host_b: true }
    }

    /// The client namespace (10.77.0.1 on `eth0`).
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// A host's namespace; panics for [`Host::B`] if it was left out.
    pub fn host(&self, host: Host) -> &Netns {
        match host {
            Host::A => &self.host_a,
            Host::B => self
                .host_b
                .as_ref()
                .expect("this topology was built without host-b"),
        }
    }

    /// The namespace holding the switch bridge.
    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// Every namespace of the topology.
    pub fn namespaces(&self) -> Vec<&Netns> {
        let mut all = vec![&self.switch, &self.client, &self.host_a];
        all.extend(self.host_b.as_ref());
        all
    }

    /// Makes a persistent tap `name` (at most 15 bytes; single queue, as
    /// `vmm` opens it) in `host`'s namespace, up and on its `br0`, so a
    /// `vmm --net tap=name` started in that namespace reaches the client.
    /// It goes away with the namespace.
    pub fn add_tap(&self, host: Host, name: &str) {
        assert!(
            !name.is_empty() && name.len() <= 15,
            "tap name {name:?} must be 1 to 15 bytes"
        );
        let ns = self.host(host);
        ns.ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
        ns.ip(&["link", "set", name, "master", "br0", "up"]);
    }

    /// Plugs (`up`) or unplugs `host`'s cable at the switch.
    pub fn set_uplink(&self, host: Host, up: bool) {
        self.host(host);
        let state = if up { "up" } else { "down" };
        self.switch.ip(&["link", "set", host.role(), state]);
        if up {
            self.wait_reachable(host);
        }
    }

    /// Waits until the client's pings reach `host` (bounded: 10 tries of a
    /// second each), panicking if they never do.
    fn wait_reachable(&self, host: Host) {
        let reachable = (0..10).any(|_| self.client_ping(host.ip(), 1));
        assert!(
            reachable,
            "the client cannot reach {} at {}",
            host.role(),
            host.ip()
        );
    }

    /// Whether the client's pings to `ip` (`count` of them, a second each
    /// at most) got any answer, as `ping -c count -W 1` would succeed.
    pub fn client_ping(&self, ip: Ipv4Addr, count: u32) -> bool {
        self.client.ping(ip, count) > 0
    }

    /// Connects from `ns` to `addr`, retrying until it accepts or `timeout`
    /// passes: see [`Netns::wait_tcp`].
    pub fn wait_tcp(
        &self,
        ns: &Netns,
        addr: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        ns.wait_tcp(addr, timeout)
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rig_names() {
        assert_eq!(creator_pid("colo-host-a-123-4"), Some(123));
        assert_eq!(creator_pid("colo-client-9-0"), Some(9));
        assert_eq!(creator_pid("colo-123-4"), None);
        assert_eq!(creator_pid("other-host-a-123-4"), None);
        assert_eq!(creator_pid("colo-x-abc-4"), None);
    }

    #[test]
    fn checksum_of_known_header() {
        // An echo request with id 1, seq 1 and no data.
        let packet = [8, 0, 0, 0, 0, 1, 0, 1];
        assert_eq!(checksum(&packet), 0xf7fd);
    }

    #[test]
    fn guest_addresses() {
        assert_eq!(guest_ip(0), Ipv4Addr::new(10, 77, 0, 10));
        assert_eq!(guest_ip(5), Ipv4Addr::new(10, 77, 0, 15));
    }
}
