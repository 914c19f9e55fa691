//! The VM's configuration: command-line flags, an optional TOML file, and
//! the validation that runs before any KVM object exists.
//!
//! Precedence: a flag given on the command line wins over the same setting
//! in `--config FILE`, which wins over the default.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use clap::{Parser, ValueEnum};
use colo::control::Mode;
use serde::Deserialize;

use crate::vm::cpuid::CpuTemplate;

/// Default guest RAM.
pub const DEFAULT_MEM_MIB: u64 = 128;
/// Default number of vCPUs.
pub const DEFAULT_VCPUS: u8 = 1;
/// Most vCPUs a VM may have (bounded by the MP table's room in base memory).
pub const MAX_VCPUS: u8 = 32;
/// Most guest RAM: 1 TiB.
pub const MAX_MEM_MIB: u64 = 1 << 20;
/// Default kernel command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

// The replication defaults and the interval range are the engine's.
pub use colo::control::CHECKPOINT_MS_RANGE;
pub use colo::primary::{
    DEFAULT_CHECKPOINT_MS, DEFAULT_COLO_CHECKPOINT_MS, DEFAULT_HEARTBEAT_MS,
    DEFAULT_HEARTBEAT_TIMEOUT_MS,
};
pub use net_proxy::compare::DEFAULT_COMPARE_TIMEOUT_MS;
/// Compare timeouts accepted (`--compare-timeout-ms`, `PATCH /colo`).
pub const COMPARE_TIMEOUT_MS_RANGE: std::ops::RangeInclusive<u64> = 1..=60_000;
/// Heartbeat intervals and timeouts accepted.
pub const HEARTBEAT_MS_RANGE: std::ops::RangeInclusive<u64> = 1..=60_000;

/// What this `vmm` is in a COLO pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A single VM, no fault tolerance.
    Standalone,
    /// The COLO primary: serves clients, sends checkpoints.
    Primary,
    /// The COLO secondary: runs the replica, takes over on failover.
    Secondary,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Standalone => "standalone",
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        })
    }
}

/// What a secondary does when the primary's heartbeat stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Failover {
    /// Wait for `PUT /actions {"action":"failover"}` (as QEMU does).
    #[default]
    Manual,
    /// Take over when the heartbeat times out. Until a witness exists this
    /// risks split brain: a network partition between the two hosts looks
    /// like a dead primary, so both sides run the guest.
    Auto,
}

/// `--mode`: `remus` or `colo`.
fn parse_mode(s: &str) -> Result<Mode, String> {
    match s {
        "remus" => Ok(Mode::Remus),
        "colo" => Ok(Mode::Colo),
        other => Err(format!("unknown mode {other:?} (expected remus or colo)")),
    }
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialOutput {
    /// The `vmm` process's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
}

impl SerialOutput {
    /// `stdout`, or else a file path.
    pub fn from_arg(s: &str) -> Self {
        match s {
            "stdout" => SerialOutput::Stdout,
            path => SerialOutput::File(PathBuf::from(path)),
        }
    }
}

impl std::str::FromStr for SerialOutput {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::from_arg(s))
    }
}

/// Command-line interface of `vmm`.
#[derive(Debug, Parser)]
#[command(
    name = "vmm",
    version,
    about = "A KVM microVMM with COLO fault tolerance"
)]
pub struct Cli {
    /// Role of this VMM.
    #[arg(long, value_enum)]
    pub role: Option<Role>,
    /// TOML file with the same settings as the flags; flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Guest kernel: an ELF vmlinux (or a bzImage) booted by the 64-bit Linux boot protocol.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk loaded for the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=1"].
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Guest RAM in MiB [default: 128].
    #[arg(long, value_name = "N")]
    pub mem_mib: Option<u64>,
    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u8>,
    /// Serial console destination: `stdout` or a file path [default: stdout].
    #[arg(long, value_name = "stdout|PATH")]
    pub serial: Option<SerialOutput>,
    /// CPU template: which CPUID features the guest sees [default: host].
    #[arg(long, value_enum, value_name = "NAME")]
    pub cpu_template: Option<CpuTemplate>,
    /// Track dirty pages from boot (KVM dirty log on every memory slot).
    #[arg(long)]
    pub track_dirty_pages: bool,
    /// A virtio-blk disk backed by a raw image file; repeat for more disks.
    #[arg(long = "disk", value_name = "PATH[,readonly]")]
    pub disks: Vec<DiskConfig>,
    /// A virtio-net device on a tap interface; repeat for more.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]")]
    pub nets: Vec<NetConfig>,
    /// REST control socket (HTTP/1.1 on a Unix socket, created mode 0600).
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Start from snapshots instead of booting: a full snapshot, then diffs,
    /// oldest first. Devices (--disk, --net) must match the snapshot's.
    #[arg(long, value_name = "PATH[,PATH...]", value_delimiter = ',')]
    pub restore: Vec<PathBuf>,
    /// Start paused: nothing runs until `PUT /vm {"state":"running"}`.
    #[arg(long)]
    pub start_paused: bool,
    /// Primary: the secondary's address (its --listen).
    #[arg(long, value_name = "HOST:PORT", help_heading = "Replication")]
    pub peer: Option<String>,
    /// Secondary: the address to wait on for the primary.
    #[arg(long, value_name = "HOST:PORT", help_heading = "Replication")]
    pub listen: Option<String>,
    /// How the pair replicates [default: colo]: `colo` runs a secondary VM
    /// in parallel and releases output the secondary produced too; `remus`
    /// holds the guest's output until its checkpoint (for guests whose
    /// output is never deterministic).
    #[arg(long, value_name = "remus|colo", value_parser = parse_mode, help_heading = "Replication")]
    pub mode: Option<Mode>,
    /// Milliseconds between checkpoints, 1..=60000 [default: 20 (remus),
    /// 2000 (colo)]: Remus holds the guest's replies up to one interval.
    #[arg(long, value_name = "N", help_heading = "Replication")]
    pub checkpoint_ms: Option<u64>,
    /// Primary, COLO mode: milliseconds a frame waits for its twin from
    /// the other VM before a checkpoint is taken, 1..=60000 [default: 20].
    #[arg(long, value_name = "N", help_heading = "Replication")]
    pub compare_timeout_ms: Option<u64>,
    /// Send the state hash with each checkpoint; the secondary compares it
    /// after applying and stops replication on a mismatch.
    #[arg(long, help_heading = "Replication")]
    pub verify_checkpoints: bool,
    /// On heartbeat loss: wait for a `failover` action (manual), or take
    /// over (auto: a network partition makes both sides run the guest)
    /// [default: manual].
    #[arg(long, value_enum, value_name = "POLICY", help_heading = "Replication")]
    pub failover: Option<Failover>,
    /// Milliseconds between heartbeats [default: 100].
    #[arg(long, value_name = "N", help_heading = "Replication")]
    pub heartbeat_ms: Option<u64>,
    /// Milliseconds without a heartbeat before the peer counts as gone;
    /// more than --heartbeat-ms [default: 1000].
    #[arg(long, value_name = "N", help_heading = "Replication")]
    pub heartbeat_timeout_ms: Option<u64>,
}

/// Most virtio devices a VM may have (one IRQ line each, 5..=15 minus the
/// serial port's).
pub const MAX_VIRTIO_DEVICES: usize = 8;

/// A virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Raw image file.
    pub path: PathBuf,
    /// Guest writes fail with an I/O error status; the file is opened read-only.
    pub read_only: bool,
}

impl std::str::FromStr for DiskConfig {
    type Err = String;

    /// `PATH` or `PATH,readonly` (also `ro`). A path may not contain a comma.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (path, opts) = match s.rsplit_once(',') {
            Some((path, opt @ ("readonly" | "ro" | "rw"))) => (path, Some(opt)),
            Some((_, other)) => {
                return Err(format!(
                    "unknown disk option {other:?} (expected `readonly`)"
                ))
            }
            _ => (s, None),
        };
        if path.is_empty() {
            return Err("empty disk path".into());
        }
        Ok(Self {
            path: PathBuf::from(path),
            read_only: matches!(opts, Some("readonly" | "ro")),
        })
    }
}

/// A virtio-net device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Tap interface name (created if missing and allowed).
    pub tap: String,
    /// The guest's MAC address; defaults to 52:54:00:c0:10:NN by device index.
    pub mac: Option<[u8; 6]>,
}

impl std::str::FromStr for NetConfig {
    type Err = String;

    /// `tap=NAME[,mac=aa:bb:cc:dd:ee:ff]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut tap = None;
        let mut mac = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", name)) if !name.is_empty() => tap = Some(name.to_string()),
                Some(("mac", m)) => mac = Some(parse_mac(m)?),
                _ => {
                    return Err(format!(
                        "unknown net option {part:?} (expected tap=NAME or mac=MAC)"
                    ))
                }
            }
        }
        Ok(Self {
            tap: tap.ok_or("a net device needs tap=NAME")?,
            mac,
        })
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`; refuses multicast addresses.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad =
        || format!("invalid MAC address {s:?} (expected six hex bytes like 52:54:00:12:34:56)");
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "MAC address {s} is multicast; a NIC needs a unicast address"
        ));
    }
    Ok(mac)
}

/// The settings a `--config` file may hold. Unknown keys are refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub role: Option<Role>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub mem_mib: Option<u64>,
    pub vcpus: Option<u8>,
    pub serial: Option<String>,
    pub cpu_template: Option<CpuTemplate>,
    pub track_dirty_pages: Option<bool>,
    /// Same syntax as `--disk`.
    pub disks: Option<Vec<String>>,
    /// Same syntax as `--net`.
    pub nets: Option<Vec<String>>,
    pub api_sock: Option<PathBuf>,
    /// Same as `--restore`: a full snapshot, then diffs.
    pub restore: Option<Vec<PathBuf>>,
    pub start_paused: Option<bool>,
    pub peer: Option<String>,
    pub listen: Option<String>,
    pub mode: Option<Mode>,
    pub checkpoint_ms: Option<u64>,
    pub compare_timeout_ms: Option<u64>,
    pub verify_checkpoints: Option<bool>,
    pub failover: Option<Failover>,
    pub heartbeat_ms: Option<u64>,
    pub heartbeat_timeout_ms: Option<u64>,
}

/// The replication settings of a primary or a secondary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicationConfig {
    pub role: colo::control::Role,
    /// Primary: the secondary's `HOST:PORT` (not resolved here).
    pub peer: Option<String>,
    /// Secondary: the `HOST:PORT` it waits on.
    pub listen: Option<String>,
    pub mode: Mode,
    /// Milliseconds between checkpoints ([`CHECKPOINT_MS_RANGE`]).
    pub checkpoint_ms: u64,
    /// Primary, COLO mode: how long a frame waits for its twin
    /// ([`COMPARE_TIMEOUT_MS_RANGE`]).
    pub compare_timeout_ms: u64,
    /// Checkpoints carry the state hash; the secondary compares it.
    pub verify: bool,
    /// Take over on heartbeat loss ([`Failover::Auto`]).
    pub failover_auto: bool,
    pub heartbeat_ms: u64,
    pub heartbeat_timeout_ms: u64,
}

impl ReplicationConfig {
    /// A primary sending to `peer` with every other setting at its default.
    pub fn primary(peer: impl Into<String>) -> Self {
        Self::new(colo::control::Role::Primary, Some(peer.into()), None)
    }

    /// A secondary waiting on `listen` with every other setting at its
    /// default.
    pub fn secondary(listen: impl Into<String>) -> Self {
        Self::new(colo::control::Role::Secondary, None, Some(listen.into()))
    }

    fn new(role: colo::control::Role, peer: Option<String>, listen: Option<String>) -> Self {
        Self {
            role,
            peer,
            listen,
            mode: Mode::Colo,
            checkpoint_ms: DEFAULT_COLO_CHECKPOINT_MS,
            compare_timeout_ms: DEFAULT_COMPARE_TIMEOUT_MS,
            verify: false,
            failover_auto: false,
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
            heartbeat_timeout_ms: DEFAULT_HEARTBEAT_TIMEOUT_MS,
        }
    }

    /// Checks the settings on their own (the role's rules are checked by
    /// [`VmConfig::validate`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        use colo::control::Role as Side;
        match (self.role, &self.peer, &self.listen) {
            (Side::Primary, None, _) => return Err(ConfigError::MissingPeer),
            (Side::Primary, _, Some(_)) => {
                return Err(ConfigError::NotForRole {
                    flag: "--listen",
                    role: Role::Primary,
                    hint: PRIMARY_HINT,
                })
            }
            (Side::Secondary, _, None) => return Err(ConfigError::MissingListen),
            (Side::Secondary, Some(_), _) => {
                return Err(ConfigError::NotForRole {
                    flag: "--peer",
                    role: Role::Secondary,
                    hint: SECONDARY_HINT,
                })
            }
            _ => {}
        }
        if let Some(peer) = &self.peer {
            check_address("--peer", peer)?;
        }
        if let Some(listen) = &self.listen {
            check_address("--listen", listen)?;
        }
        if !CHECKPOINT_MS_RANGE.contains(&self.checkpoint_ms) {
            return Err(ConfigError::CheckpointMs(self.checkpoint_ms));
        }
        if !COMPARE_TIMEOUT_MS_RANGE.contains(&self.compare_timeout_ms) {
            return Err(ConfigError::CompareTimeoutMs(self.compare_timeout_ms));
        }
        if !HEARTBEAT_MS_RANGE.contains(&self.heartbeat_ms) {
            return Err(ConfigError::HeartbeatMs(self.heartbeat_ms));
        }
        if !HEARTBEAT_MS_RANGE.contains(&self.heartbeat_timeout_ms)
            || self.heartbeat_timeout_ms <= self.heartbeat_ms
        {
            return Err(ConfigError::HeartbeatTimeout {
                timeout: self.heartbeat_timeout_ms,
                interval: self.heartbeat_ms,
            });
        }
        Ok(())
    }
}

const PRIMARY_HINT: &str = "a primary connects to its secondary at --peer HOST:PORT";
const SECONDARY_HINT: &str = "a secondary waits for its primary at --listen HOST:PORT";
const COMPARE_ON_PRIMARY: &str = "the primary compares the two VMs' output";
const GUEST_FROM_PRIMARY: &str = "the secondary gets its guest from the primary";

/// Checks that `value` is `HOST:PORT` with a port in 1..=65535 (an IPv6
/// host in brackets). The host is not resolved here.
fn check_address(flag: &'static str, value: &str) -> Result<(), ConfigError> {
    let bad = || ConfigError::BadAddress {
        flag,
        value: value.to_string(),
    };
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = match host.strip_prefix('[') {
        Some(v6) => v6
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok()),
        None => !host.is_empty() && !host.contains(':') && !host.contains(char::is_whitespace),
    };
    match port.parse::<u16>() {
        Ok(p) if p != 0 && host_ok => Ok(()),
        _ => Err(bad()),
    }
}

/// A complete, validated VM configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub role: Role,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub serial: SerialOutput,
    pub cpu_template: CpuTemplate,
    pub track_dirty_pages: bool,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub api_sock: Option<PathBuf>,
    /// Snapshot chain to start from (empty: boot the kernel).
    pub restore: Vec<PathBuf>,
    /// Wait for a resume before running.
    pub start_paused: bool,
    /// `None` for a standalone VM.
    pub replication: Option<ReplicationConfig>,
}

impl VmConfig {
    /// A standalone VM booting `kernel` with every other setting at its
    /// default (for callers that build a configuration in code).
    pub fn new(kernel: PathBuf) -> Self {
        Self {
            role: Role::Standalone,
            kernel,
            initrd: None,
            cmdline: DEFAULT_CMDLINE.into(),
            mem_mib: DEFAULT_MEM_MIB,
            vcpus: DEFAULT_VCPUS,
            serial: SerialOutput::Stdout,
            cpu_template: CpuTemplate::default(),
            track_dirty_pages: false,
            disks: Vec::new(),
            nets: Vec::new(),
            api_sock: None,
            restore: Vec::new(),
            start_paused: false,
            replication: None,
        }
    }

    /// Whether the VM boots its kernel: not when it is restored from
    /// snapshots, nor on a secondary (which gets its guest from the
    /// primary; its `kernel` is an empty path that nothing reads).
    pub fn boots(&self) -> bool {
        self.restore.is_empty() && self.role != Role::Secondary
    }
}

impl NetConfig {
    /// The MAC the device at `index` gets.
    pub fn mac_or_default(&self, index: usize) -> [u8; 6] {
        self.mac
            .unwrap_or([0x52, 0x54, 0x00, 0xc0, 0x10, index as u8])
    }
}

/// Kernel image formats `vmm` boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}")]
    ParseFile {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("no kernel given: pass --kernel PATH or set `kernel` in the config file")]
    MissingKernel,
    #[error("cannot open kernel {path}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat(PathBuf),
    #[error("cannot open initrd {path}")]
    OpenInitrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest memory must be at least 1 MiB (got --mem-mib 0)")]
    ZeroMemory,
    #[error("guest memory of {0} MiB is more than the supported {MAX_MEM_MIB} MiB")]
    TooMuchMemory(u64),
    #[error("a VM needs at least one vCPU (got --vcpus 0)")]
    ZeroVcpus,
    #[error("{0} vCPUs requested; at most {MAX_VCPUS} are supported")]
    TooManyVcpus(u8),
    #[error("kernel command line is {0} bytes; the limit is {max}", max = crate::arch::layout::CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("invalid entry in `{key}` of the config file: {message}")]
    FileEntry { key: &'static str, message: String },
    #[error("{0} virtio devices requested; at most {MAX_VIRTIO_DEVICES} are supported")]
    TooManyDevices(usize),
    #[error("cannot open disk {path}")]
    OpenDisk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {0} is not a regular file")]
    DiskNotFile(PathBuf),
    #[error("tap {0} is used by two net devices")]
    DuplicateTap(String),
    #[error("MAC address {0} is used by two net devices")]
    DuplicateMac(String),
    #[error("{flag} is a replication setting: it needs --role primary or --role secondary")]
    ReplicationOnly { flag: &'static str },
    #[error("{flag} is not for --role {role}: {hint}")]
    NotForRole {
        flag: &'static str,
        role: Role,
        hint: &'static str,
    },
    #[error("a primary needs --peer HOST:PORT: the address its secondary listens on")]
    MissingPeer,
    #[error("a secondary needs --listen HOST:PORT: the address its primary connects to")]
    MissingListen,
    #[error(
        "a secondary needs --mem-mib and --vcpus given explicitly, the same as the primary's \
         (it has no kernel or snapshot to take them from)"
    )]
    SecondarySize,
    #[error("invalid {flag} {value:?}: expected HOST:PORT with a port 1..=65535")]
    BadAddress { flag: &'static str, value: String },
    #[error("--checkpoint-ms {0} is out of range: give 1..=60000")]
    CheckpointMs(u64),
    #[error("--compare-timeout-ms {0} is out of range: give 1..=60000")]
    CompareTimeoutMs(u64),
    #[error("{flag} is a COLO setting: it needs --mode colo")]
    ColoOnly { flag: &'static str },
    #[error("--heartbeat-ms {0} is out of range: give 1..=60000")]
    HeartbeatMs(u64),
    #[error(
        "--heartbeat-timeout-ms {timeout} must be more than --heartbeat-ms {interval} \
         (and at most 60000)"
    )]
    HeartbeatTimeout { timeout: u64, interval: u64 },
    #[error("the replication settings do not match --role {0}")]
    RoleMismatch(Role),
}

impl VmConfig {
    /// Merges `cli` over the file it names (if any) over the defaults, and
    /// validates the result.
    pub fn from_cli(cli: &Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        Self::merge(cli, file)
    }

    fn merge(cli: &Cli, file: FileConfig) -> Result<Self, ConfigError> {
        let restore = if cli.restore.is_empty() {
            file.restore.clone().unwrap_or_default()
        } else {
            cli.restore.clone()
        };
        let role = cli.role.or(file.role).unwrap_or(Role::Standalone);
        let replication = merge_replication(role, cli, &file)?;
        if role == Role::Secondary {
            if cli.cmdline.is_some() || file.cmdline.is_some() {
                return Err(ConfigError::NotForRole {
                    flag: "--cmdline",
                    role,
                    hint: GUEST_FROM_PRIMARY,
                });
            }
            let mem_given = cli.mem_mib.is_some() || file.mem_mib.is_some();
            let vcpus_given = cli.vcpus.is_some() || file.vcpus.is_some();
            if !mem_given || !vcpus_given {
                return Err(ConfigError::SecondarySize);
            }
        }
        let config = VmConfig {
            role,
            kernel: match cli.kernel.clone().or(file.kernel) {
                Some(kernel) => kernel,
                // A restored VM and a secondary need no kernel.
                None if !restore.is_empty() || role == Role::Secondary => PathBuf::new(),
                None => return Err(ConfigError::MissingKernel),
            },
            initrd: cli.initrd.clone().or(file.initrd),
            cmdline: cli
                .cmdline
                .clone()
                .or(file.cmdline)
                .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
            mem_mib: cli.mem_mib.or(file.mem_mib).unwrap_or(DEFAULT_MEM_MIB),
            vcpus: cli.vcpus.or(file.vcpus).unwrap_or(DEFAULT_VCPUS),
            serial: cli
                .serial
                .clone()
                .or_else(|| file.serial.as_deref().map(SerialOutput::from_arg))
                .unwrap_or(SerialOutput::Stdout),
            cpu_template: cli.cpu_template.or(file.cpu_template).unwrap_or_default(),
            track_dirty_pages: cli.track_dirty_pages || file.track_dirty_pages.unwrap_or(false),
            disks: if cli.disks.is_empty() {
                parse_entries("disks", file.disks)?
            } else {
                cli.disks.clone()
            },
            nets: if cli.nets.is_empty() {
                parse_entries("nets", file.nets)?
            } else {
                cli.nets.clone()
            },
            api_sock: cli.api_sock.clone().or(file.api_sock),
            restore,
            start_paused: cli.start_paused || file.start_paused.unwrap_or(false),
            replication,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks everything that can be checked without KVM, so that a bad
    /// setting is reported before any VM is created.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_role()?;
        match self.mem_mib {
            0 => return Err(ConfigError::ZeroMemory),
            n if n > MAX_MEM_MIB => return Err(ConfigError::TooMuchMemory(n)),
            _ => {}
        }
        match self.vcpus {
            0 => return Err(ConfigError::ZeroVcpus),
            n if n > MAX_VCPUS => return Err(ConfigError::TooManyVcpus(n)),
            _ => {}
        }
        if self.cmdline.len() >= crate::arch::layout::CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong(self.cmdline.len()));
        }
        if self.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        if self.boots() {
            kernel_format(&self.kernel)?;
        }
        let devices = self.disks.len() + self.nets.len();
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        for disk in &self.disks {
            let meta = std::fs::metadata(&disk.path).map_err(|source| ConfigError::OpenDisk {
                path: disk.path.clone(),
                source,
            })?;
            if !meta.is_file() {
                return Err(ConfigError::DiskNotFile(disk.path.clone()));
            }
        }
        for (i, net) in self.nets.iter().enumerate() {
            for (j, other) in self.nets.iter().enumerate().take(i) {
                if other.tap == net.tap {
                    return Err(ConfigError::DuplicateTap(net.tap.clone()));
                }
                let (a, b) = (net.mac_or_default(i), other.mac_or_default(j));
                if a == b {
                    let text: Vec<String> = a.iter().map(|b| format!("{b:02x}")).collect();
                    return Err(ConfigError::DuplicateMac(text.join(":")));
                }
            }
        }
        if let Some(path) = &self.initrd {
            File::open(path).map_err(|source| ConfigError::OpenInitrd {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// The replication settings agree with the role; a secondary has no
    /// guest of its own to start.
    fn validate_role(&self) -> Result<(), ConfigError> {
        use colo::control::Role as Side;
        match (self.role, &self.replication) {
            (Role::Standalone, None) => return Ok(()),
            (Role::Primary, Some(r)) if r.role == Side::Primary => r.validate()?,
            (Role::Secondary, Some(r)) if r.role == Side::Secondary => r.validate()?,
            (role, _) => return Err(ConfigError::RoleMismatch(role)),
        }
        if self.role == Role::Secondary {
            let refused = [
                ("--kernel", !self.kernel.as_os_str().is_empty()),
                ("--initrd", self.initrd.is_some()),
                ("--restore", !self.restore.is_empty()),
                ("--start-paused", self.start_paused),
            ];
            if let Some((flag, _)) = refused.into_iter().find(|(_, given)| *given) {
                return Err(ConfigError::NotForRole {
                    flag,
                    role: self.role,
                    hint: GUEST_FROM_PRIMARY,
                });
            }
        }
        Ok(())
    }

    /// Guest RAM in bytes.
    pub fn mem_size(&self) -> u64 {
        self.mem_mib << 20
    }
}

/// The replication settings of `role` from the flags over the file over
/// the defaults; a standalone VM refuses every one of them.
fn merge_replication(
    role: Role,
    cli: &Cli,
    file: &FileConfig,
) -> Result<Option<ReplicationConfig>, ConfigError> {
    let side = match role {
        Role::Standalone => {
            let given = [
                ("--peer", cli.peer.is_some() || file.peer.is_some()),
                ("--listen", cli.listen.is_some() || file.listen.is_some()),
                ("--mode", cli.mode.is_some() || file.mode.is_some()),
                (
                    "--checkpoint-ms",
                    cli.checkpoint_ms.is_some() || file.checkpoint_ms.is_some(),
                ),
                (
                    "--compare-timeout-ms",
                    cli.compare_timeout_ms.is_some() || file.compare_timeout_ms.is_some(),
                ),
                (
                    "--verify-checkpoints",
                    cli.verify_checkpoints || file.verify_checkpoints.is_some(),
                ),
                (
                    "--failover",
                    cli.failover.is_some() || file.failover.is_some(),
                ),
                (
                    "--heartbeat-ms",
                    cli.heartbeat_ms.is_some() || file.heartbeat_ms.is_some(),
                ),
                (
                    "--heartbeat-timeout-ms",
                    cli.heartbeat_timeout_ms.is_some() || file.heartbeat_timeout_ms.is_some(),
                ),
            ];
            return match given.into_iter().find(|(_, given)| *given) {
                Some((flag, _)) => Err(ConfigError::ReplicationOnly { flag }),
                None => Ok(None),
            };
        }
        Role::Primary => colo::control::Role::Primary,
        Role::Secondary => colo::control::Role::Secondary,
    };
    let compare_timeout_ms = cli.compare_timeout_ms.or(file.compare_timeout_ms);
    if side == colo::control::Role::Secondary && compare_timeout_ms.is_some() {
        return Err(ConfigError::NotForRole {
            flag: "--compare-timeout-ms",
            role,
            hint: COMPARE_ON_PRIMARY,
        });
    }
    let mode = cli.mode.or(file.mode).unwrap_or(Mode::Colo);
    if mode == Mode::Remus && compare_timeout_ms.is_some() {
        return Err(ConfigError::ColoOnly {
            flag: "--compare-timeout-ms",
        });
    }
    Ok(Some(ReplicationConfig {
        role: side,
        peer: cli.peer.clone().or_else(|| file.peer.clone()),
        listen: cli.listen.clone().or_else(|| file.listen.clone()),
        mode,
        checkpoint_ms: cli
            .checkpoint_ms
            .or(file.checkpoint_ms)
            .unwrap_or(match mode {
                Mode::Remus => DEFAULT_CHECKPOINT_MS,
                Mode::Colo => DEFAULT_COLO_CHECKPOINT_MS,
            }),
        compare_timeout_ms: compare_timeout_ms.unwrap_or(DEFAULT_COMPARE_TIMEOUT_MS),
        verify: cli.verify_checkpoints || file.verify_checkpoints.unwrap_or(false),
        failover_auto: cli.failover.or(file.failover).unwrap_or_default() == Failover::Auto,
        heartbeat_ms: cli
            .heartbeat_ms
            .or(file.heartbeat_ms)
            .unwrap_or(DEFAULT_HEARTBEAT_MS),
        heartbeat_timeout_ms: cli
            .heartbeat_timeout_ms
            .or(file.heartbeat_timeout_ms)
            .unwrap_or(DEFAULT_HEARTBEAT_TIMEOUT_MS),
    }))
}

/// Parses list entries of a config file with the flags' syntax.
fn parse_entries<T: std::str::FromStr<Err = String>>(
    key: &'static str,
    entries: Option<Vec<String>>,
) -> Result<Vec<T>, ConfigError> {
    entries
        .unwrap_or_default()
        .iter()
        .map(|e| {
            e.parse()
                .map_err(|message| ConfigError::FileEntry { key, message })
        })
        .collect()
}

/// Reads and parses a `--config` file.
pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::ParseFile {
        path: path.to_path_buf(),
        source,
    })
}

/// Tells an ELF vmlinux from a bzImage by their magic numbers.
pub fn kernel_format(path: &Path) -> Result<KernelFormat, ConfigError> {
    let open_err = |source| ConfigError::OpenKernel {
        path: path.to_path_buf(),
        source,
    };
    let mut head = Vec::with_capacity(0x206);
    File::open(path)
        .map_err(open_err)?
        .take(0x206)
        .read_to_end(&mut head)
        .map_err(open_err)?;
    if head.starts_with(b"\x7fELF") {
        Ok(KernelFormat::Elf)
    } else if head.get(0x202..0x206) == Some(b"HdrS") {
        Ok(KernelFormat::BzImage)
    } else {
        Err(ConfigError::UnknownKernelFormat(path.to_path_buf()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn elf_file() -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"\x7fELF\x02\x01\x01").unwrap();
        f
    }

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("vmm").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_apply() {
        let kernel = elf_file();
        let c = VmConfig::from_cli(&cli(&["--kernel", kernel.path().to_str().unwrap()])).unwrap();
        assert_eq!(c.role, Role::Standalone);
        assert_eq!((c.mem_mib, c.vcpus), (DEFAULT_MEM_MIB, DEFAULT_VCPUS));
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        assert_eq!(c.serial, SerialOutput::Stdout);
        assert!(!c.track_dirty_pages);
    }

    #[test]
    fn flags_override_the_config_file() {
        let kernel = elf_file();
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            file,
            "kernel = {:?}\nmem-mib = 64\nvcpus = 2\ncmdline = \"from-file\"\nserial = \"/tmp/x\"",
            kernel.path()
        )
        .unwrap();
        let path = file.path().to_str().unwrap();
        let c = VmConfig::from_cli(&cli(&["--config", path, "--vcpus", "3"])).unwrap();
        assert_eq!((c.mem_mib, c.vcpus), (64, 3));
        assert_eq!(c.cmdline, "from-file");
        assert_eq!(c.serial, SerialOutput::File("/tmp/x".into()));
        assert_eq!(c.kernel, kernel.path());
    }

    #[test]
    fn bad_config_files_are_refused_with_their_path() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "memory = 5").unwrap();
        let path = file.path().to_str().unwrap();
        let err = VmConfig::from_cli(&cli(&["--config", path])).unwrap_err();
        assert!(matches!(err, ConfigError::ParseFile { .. }), "{err}");
        assert!(err.to_string().contains(path));
        let err = VmConfig::from_cli(&cli(&["--config", "/nonexistent/x.toml"])).unwrap_err();
        assert!(matches!(err, ConfigError::ReadFile { .. }));
    }

    #[test]
    fn invalid_values_are_refused() {
        let kernel = elf_file();
        let k = kernel.path().to_str().unwrap();
        let err = |args: &[&str]| VmConfig::from_cli(&cli(args)).unwrap_err();
        assert!(matches!(
            err(&["--kernel", k, "--mem-mib", "0"]),
            ConfigError::ZeroMemory
        ));
        assert!(matches!(
            err(&["--kernel", k, "--vcpus", "0"]),
            ConfigError::ZeroVcpus
        ));
        assert!(matches!(
            err(&["--kernel", k, "--vcpus", "33"]),
            ConfigError::TooManyVcpus(33)
        ));
        assert!(matches!(err(&[]), ConfigError::MissingKernel));
        assert!(matches!(
            err(&["--kernel", "/nonexistent/vmlinux"]),
            ConfigError::OpenKernel { .. }
        ));
        let long = "x".repeat(4096);
        assert!(matches!(
            err(&["--kernel", k, "--cmdline", &long]),
            ConfigError::CmdlineTooLong(4096)
        ));
    }

    const SECONDARY: &[&str] = &[
        "--role",
        "secondary",
        "--listen",
        "0.0.0.0:7000",
        "--mem-mib",
        "64",
        "--vcpus",
        "2",
    ];

    #[test]
    fn a_primary_takes_the_replication_flags_with_their_defaults() {
        let kernel = elf_file();
        let k = kernel.path().to_str().unwrap();
        let c = VmConfig::from_cli(&cli(&[
            "--kernel",
            k,
            "--role",
            "primary",
            "--peer",
            "10.0.0.2:7000",
        ]))
        .unwrap();
        assert!(c.boots());
        assert_eq!(
            c.replication,
            Some(ReplicationConfig::primary("10.0.0.2:7000"))
        );
        let r = c.replication.unwrap();
        assert_eq!(
            (r.mode, r.checkpoint_ms, r.verify),
            (Mode::Colo, 2000, false)
        );
        assert_eq!((r.heartbeat_ms, r.heartbeat_timeout_ms), (100, 1000));
        assert!(!r.failover_auto);
        let c = VmConfig::from_cli(&cli(&[
            "--kernel",
            k,
            "--role",
            "primary",
            "--peer",
            "[fd00::2]:7000",
            "--mode",
            "remus",
            "--checkpoint-ms",
            "5",
            "--verify-checkpoints",
            "--failover",
            "auto",
            "--heartbeat-ms",
            "50",
            "--heartbeat-timeout-ms",
            "51",
        ]))
        .unwrap();
        let r = c.replication.unwrap();
        assert_eq!(r.peer.as_deref(), Some("[fd00::2]:7000"));
        assert_eq!(
            (r.checkpoint_ms, r.verify, r.failover_auto),
            (5, true, true)
        );
        assert_eq!((r.heartbeat_ms, r.heartbeat_timeout_ms), (50, 51));
    }

    #[test]
    fn replication_settings_come_from_the_file_and_flags_win() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "role = \"secondary\"\nlisten = \"0.0.0.0:7000\"\nmem-mib = 64\nvcpus = 2\n\
             mode = \"remus\"\ncheckpoint-ms = 40\nverify-checkpoints = true\n\
             failover = \"auto\"\nheartbeat-ms = 10\nheartbeat-timeout-ms = 30"
        )
        .unwrap();
        let path = f.path().to_str().unwrap();
        let c = VmConfig::from_cli(&cli(&["--config", path, "--checkpoint-ms", "7"])).unwrap();
        assert_eq!(c.role, Role::Secondary);
        assert!(!c.boots());
        assert_eq!(c.kernel, PathBuf::new());
        let r = c.replication.unwrap();
        assert_eq!(r.role, colo::control::Role::Secondary);
        assert_eq!(r.listen.as_deref(), Some("0.0.0.0:7000"));
        assert_eq!(
            (r.checkpoint_ms, r.verify, r.failover_auto),
            (7, true, true)
        );
        assert_eq!((r.heartbeat_ms, r.heartbeat_timeout_ms), (10, 30));
        let c = VmConfig::from_cli(&cli(&["--config", path, "--failover", "manual"])).unwrap();
        assert!(!c.replication.unwrap().failover_auto);
    }

    #[test]
    fn a_primary_needs_a_peer_and_a_guest() {
        let kernel = elf_file();
        let k = kernel.path().to_str().unwrap();
        let err = |args: &[&str]| VmConfig::from_cli(&cli(args)).unwrap_err();
        let e = err(&["--kernel", k, "--role", "primary"]);
        assert!(matches!(e, ConfigError::MissingPeer), "{e}");
        assert!(e.to_string().contains("--peer HOST:PORT"), "{e}");
        let e = err(&["--role", "primary", "--peer", "h:1"]);
        assert!(matches!(e, ConfigError::MissingKernel), "{e}");
        let e = err(&[
            "--kernel", k, "--role", "primary", "--peer", "h:1", "--listen", "h:2",
        ]);
        assert!(
            matches!(
                e,
                ConfigError::NotForRole {
                    flag: "--listen",
                    ..
                }
            ),
            "{e}"
        );
        // A restored primary needs no kernel.
        let c = VmConfig::from_cli(&cli(&[
            "--role",
            "primary",
            "--peer",
            "h:1",
            "--restore",
            "/a",
        ]))
        .unwrap();
        assert!(!c.boots());
    }

    #[test]
    fn addresses_must_be_host_and_port() {
        let kernel = elf_file();
        let k = kernel.path().to_str().unwrap();
        for bad in [
            "h", "h:", ":7000", "h:0", "h:65536", "h:x", "::1:7", "[::1]", "[x]:7", "a b:1",
        ] {
            let e = VmConfig::from_cli(&cli(&["--kernel", k, "--role", "primary", "--peer", bad]))
                .unwrap_err();
            assert!(matches!(e, ConfigError::BadAddress { .. }), "{bad}: {e}");
            assert!(e.to_string().contains(bad), "{e}");
        }
        for good in ["h:1", "10.0.0.1:65535", "[::1]:7000", "host.example:7000"] {
            VmConfig::from_cli(&cli(&["--kernel", k, "--role", "primary", "--peer", good]))
                .unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        let mut args = SECONDARY.to_vec();
        args[3] = "nowhere";
        let e = VmConfig::from_cli(&cli(&args)).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::BadAddress {
                    flag: "--listen",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn a_secondary_needs_listen_and_size_and_no_guest() {
        let c = VmConfig::from_cli(&cli(SECONDARY)).unwrap();
        assert_eq!((c.mem_mib, c.vcpus), (64, 2));
        assert!(!c.boots());
        let err = |extra: &[&str]| {
            let args: Vec<&str> = SECONDARY.iter().chain(extra).copied().collect();
            VmConfig::from_cli(&cli(&args)).unwrap_err()
        };
        let kernel = elf_file();
        let k = kernel.path().to_str().unwrap();
        for (extra, flag) in [
            (&["--kernel", k][..], "--kernel"),
            (&["--initrd", k], "--initrd"),
            (&["--cmdline", "x"], "--cmdline"),
            (&["--restore", "/a.full"], "--restore"),
            (&["--start-paused"], "--start-paused"),
            (&["--peer", "h:1"], "--peer"),
        ] {
            let e = err(extra);
            assert!(
                matches!(e, ConfigError::NotForRole { flag: f, .. } if f == flag),
                "{flag}: {e}"
            );
            assert!(e.to_string().starts_with(flag), "{e}");
        }
        assert!(err(&["--kernel", k])
            .to_string()
            .contains("the secondary gets its guest from the primary"));
        let without = |skip: &str| {
            let mut args = SECONDARY.to_vec();
            let at = args.iter().position(|a| *a == skip).unwrap();
            args.drain(at..at + 2);
            VmConfig::from_cli(&cli(&args)).unwrap_err()
        };
        assert!(matches!(without("--listen"), ConfigError::MissingListen));
        assert!(matches!(without("--mem-mib"), ConfigError::SecondarySize));
        assert!(matches!(without("--vcpus"), ConfigError::SecondarySize));
        // A read-only disk is allowed (it is not forwarded).
        let disk = tempfile::NamedTempFile::new().unwrap();
        let spec = format!("{},readonly", disk.path().display());
        let args: Vec<&str> = SECONDARY.iter().copied().chain(["--disk", &spec]).collect();
        assert!(VmConfig::from_cli(&cli(&args)).unwrap().disks[0].read_only);
    }

    #[test]
    fn a_standalone_vm_refuses_replication_settings() {
        let kernel = elf_file();
        let k = kernel.path().to_str().unwrap();
        for (extra, flag) in [
            (&["--peer", "h:1"][..], "--peer"),
            (&["--listen", "h:1"], "--listen"),
            (&["--mode", "remus"], "--mode"),
            (&["--checkpoint-ms", "5"], "--checkpoint-ms"),
            (&["--compare-timeout-ms", "5"], "--compare-timeout-ms"),
            (&["--verify-checkpoints"], "--verify-checkpoints"),
            (&["--failover", "auto"], "--failover"),
            (&["--heartbeat-ms", "5"], "--heartbeat-ms"),
            (
                &["--heartbeat-timeout-ms", "5000"],
                "--heartbeat-timeout-ms",
            ),
        ] {
            let args: Vec<&str> = ["--kernel", k].iter().chain(extra).copied().collect();
            let e = VmConfig::from_cli(&cli(&args)).unwrap_err();
            assert!(
                matches!(e, ConfigError::ReplicationOnly { flag: f } if f == flag),
                "{flag}: {e}"
            );
            assert!(e.to_string().contains("needs --role primary"), "{e}");
        }
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "kernel = {:?}\npeer = \"h:1\"", kernel.path()).unwrap();
        let e = VmConfig::from_cli(&cli(&["--config", f.path().to_str().unwrap()])).unwrap_err();
        assert!(
            matches!(e, ConfigError::ReplicationOnly { flag: "--peer" }),
            "{e}"
        );
    }

    #[test]
    fn replication_values_are_checked() {
        let err = |extra: &[&str]| {
            let args: Vec<&str> = SECONDARY.iter().chain(extra).copied().collect();
            VmConfig::from_cli(&cli(&args)).unwrap_err()
        };
        assert!(matches!(
            err(&["--checkpoint-ms", "0"]),
            ConfigError::CheckpointMs(0)
        ));
        assert!(matches!(
            err(&["--checkpoint-ms", "60001"]),
            ConfigError::CheckpointMs(60001)
        ));
        assert!(matches!(
            err(&["--heartbeat-ms", "0"]),
            ConfigError::HeartbeatMs(0)
        ));
        assert!(matches!(
            err(&["--heartbeat-ms", "100", "--heartbeat-timeout-ms", "100"]),
            ConfigError::HeartbeatTimeout {
                timeout: 100,
                interval: 100
            }
        ));
        assert!(matches!(
            err(&["--heartbeat-timeout-ms", "50"]),
            ConfigError::HeartbeatTimeout {
                timeout: 50,
                interval: 100
            }
        ));
        let args: Vec<&str> = SECONDARY
            .iter()
            .chain(&["--checkpoint-ms", "60000"])
            .copied()
            .collect();
        assert_eq!(
            VmConfig::from_cli(&cli(&args))
                .unwrap()
                .replication
                .unwrap()
                .checkpoint_ms,
            60000
        );
        assert!(Cli::try_parse_from(["vmm", "--mode", "fast"]).is_err());
        assert!(Cli::try_parse_from(["vmm", "--failover", "sometimes"]).is_err());
    }

    #[test]
    fn colo_mode_takes_its_defaults_and_the_compare_timeout() {
        let kernel = elf_file();
        let k = kernel.path().to_str().unwrap();
        let primary = |extra: &[&str]| {
            let args: Vec<&str> = ["--kernel", k, "--role", "primary", "--peer", "h:1"]
                .iter()
                .chain(extra)
                .copied()
                .collect();
            VmConfig::from_cli(&cli(&args))
        };
        let r = primary(&["--mode", "colo"]).unwrap().replication.unwrap();
        assert_eq!(
            (r.mode, r.checkpoint_ms, r.compare_timeout_ms),
            (
                Mode::Colo,
                DEFAULT_COLO_CHECKPOINT_MS,
                DEFAULT_COMPARE_TIMEOUT_MS
            )
        );
        assert_eq!((r.checkpoint_ms, r.compare_timeout_ms), (2000, 20));
        let r = primary(&[
            "--mode",
            "colo",
            "--checkpoint-ms",
            "500",
            "--compare-timeout-ms",
            "60000",
        ])
        .unwrap()
        .replication
        .unwrap();
        assert_eq!((r.checkpoint_ms, r.compare_timeout_ms), (500, 60000));
        // Remus keeps its own interval.
        let r = primary(&["--mode", "remus"]).unwrap().replication.unwrap();
        assert_eq!(
            (r.mode, r.checkpoint_ms),
            (Mode::Remus, DEFAULT_CHECKPOINT_MS)
        );
        for bad in ["0", "60001"] {
            let e = primary(&["--mode", "colo", "--compare-timeout-ms", bad]).unwrap_err();
            assert!(matches!(e, ConfigError::CompareTimeoutMs(_)), "{e}");
            assert_eq!(
                e.to_string(),
                format!("--compare-timeout-ms {bad} is out of range: give 1..=60000")
            );
        }
        let e = primary(&["--mode", "remus", "--compare-timeout-ms", "5"]).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::ColoOnly {
                    flag: "--compare-timeout-ms"
                }
            ),
            "{e}"
        );
        // A secondary in COLO mode, without a compare timeout of its own.
        let args: Vec<&str> = SECONDARY
            .iter()
            .chain(&["--mode", "colo"])
            .copied()
            .collect();
        let r = VmConfig::from_cli(&cli(&args))
            .unwrap()
            .replication
            .unwrap();
        assert_eq!((r.mode, r.checkpoint_ms), (Mode::Colo, 2000));
        let args: Vec<&str> = SECONDARY
            .iter()
            .chain(&["--mode", "colo", "--compare-timeout-ms", "5"])
            .copied()
            .collect();
        let e = VmConfig::from_cli(&cli(&args)).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::NotForRole {
                    flag: "--compare-timeout-ms",
                    ..
                }
            ),
            "{e}"
        );
        // From the file; the flag wins.
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "kernel = {:?}\nrole = \"primary\"\npeer = \"h:1\"\nmode = \"colo\"\n\
             compare-timeout-ms = 40",
            kernel.path()
        )
        .unwrap();
        let path = f.path().to_str().unwrap();
        let r = VmConfig::from_cli(&cli(&["--config", path]))
            .unwrap()
            .replication
            .unwrap();
        assert_eq!((r.mode, r.compare_timeout_ms), (Mode::Colo, 40));
        let r = VmConfig::from_cli(&cli(&["--config", path, "--compare-timeout-ms", "7"]))
            .unwrap()
            .replication
            .unwrap();
        assert_eq!(r.compare_timeout_ms, 7);
    }

    #[test]
    fn role_and_replication_settings_must_agree() {
        let kernel = elf_file();
        let mut c = VmConfig::new(kernel.path().to_path_buf());
        c.replication = Some(ReplicationConfig::primary("h:1"));
        assert!(matches!(
            c.validate(),
            Err(ConfigError::RoleMismatch(Role::Standalone))
        ));
        c.role = Role::Secondary;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::RoleMismatch(Role::Secondary))
        ));
        c.role = Role::Primary;
        c.validate().unwrap();
        c.replication = None;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::RoleMismatch(Role::Primary))
        ));
    }

    #[test]
    fn restore_needs_no_kernel_and_comes_from_flags_or_file() {
        let c =
            VmConfig::from_cli(&cli(&["--restore", "/a.full,/b.diff", "--start-paused"])).unwrap();
        assert_eq!(
            c.restore,
            [PathBuf::from("/a.full"), PathBuf::from("/b.diff")]
        );
        assert!(c.start_paused);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "restore = [\"/x.full\"]\nstart-paused = true").unwrap();
        let c = VmConfig::from_cli(&cli(&["--config", f.path().to_str().unwrap()])).unwrap();
        assert_eq!((c.restore.len(), c.start_paused), (1, true));
        assert!(matches!(
            VmConfig::from_cli(&cli(&[])),
            Err(ConfigError::MissingKernel)
        ));
    }

    #[test]
    fn disk_and_net_options_parse() {
        let d: DiskConfig = "/tmp/a.img,readonly".parse().unwrap();
        assert_eq!((d.path.to_str(), d.read_only), (Some("/tmp/a.img"), true));
        let d: DiskConfig = "/tmp/a.img".parse().unwrap();
        assert_eq!((d.path.to_str(), d.read_only), (Some("/tmp/a.img"), false));
        assert!("/tmp/a.img,bogus".parse::<DiskConfig>().is_err());
        let n: NetConfig = "tap=tap0,mac=52:54:00:aa:bb:cc".parse().unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]));
        assert_eq!(n.mac_or_default(3), [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
        let n: NetConfig = "tap=t1".parse().unwrap();
        assert_eq!(n.mac_or_default(3), [0x52, 0x54, 0, 0xc0, 0x10, 3]);
        for bad in [
            "mac=52:54:00:aa:bb:cc",
            "tap=",
            "tap=t,mac=01:00:00:00:00:00",
            "tap=t,mac=1:2:3",
            "tap=t,x=y",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn device_lists_are_validated() {
        let kernel = elf_file();
        let k = kernel.path().to_str().unwrap();
        let e =
            VmConfig::from_cli(&cli(&["--kernel", k, "--disk", "/nonexistent.img"])).unwrap_err();
        assert!(e.to_string().contains("/nonexistent.img"), "{e}");
        let e = VmConfig::from_cli(&cli(&["--kernel", k, "--disk", "/tmp"])).unwrap_err();
        assert!(matches!(e, ConfigError::DiskNotFile(_)), "{e}");
        let e = VmConfig::from_cli(&cli(&["--kernel", k, "--net", "tap=a", "--net", "tap=a"]))
            .unwrap_err();
        assert!(matches!(e, ConfigError::DuplicateTap(_)), "{e}");
        let mut args = vec!["--kernel", k];
        let names: Vec<String> = (0..9).map(|i| format!("tap=t{i}")).collect();
        for n in &names {
            args.extend(["--net", n.as_str()]);
        }
        let e = VmConfig::from_cli(&cli(&args)).unwrap_err();
        assert!(matches!(e, ConfigError::TooManyDevices(9)), "{e}");
    }

    #[test]
    fn kernel_formats_are_told_apart() {
        let mut text = tempfile::NamedTempFile::new().unwrap();
        text.write_all(b"#!/bin/sh\necho not a kernel\n").unwrap();
        assert!(matches!(
            kernel_format(text.path()),
            Err(ConfigError::UnknownKernelFormat(_))
        ));
        let mut bz = tempfile::NamedTempFile::new().unwrap();
        let mut image = vec![0u8; 0x300];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        bz.write_all(&image).unwrap();
        assert_eq!(kernel_format(bz.path()).unwrap(), KernelFormat::BzImage);
        assert_eq!(kernel_format(elf_file().path()).unwrap(), KernelFormat::Elf);
    }
}
