//! `vmmctl`: the command-line client of `vmm`'s API socket.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use vmm::api::client;

#[derive(Debug, Parser)]
#[command(
    name = "vmmctl",
    version,
    about = "Control a running vmm through its API socket"
)]
struct Cli {
    /// The vmm's API socket (its --api-sock).
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the VM's status (JSON).
    Status,
    /// Pause vCPUs and devices.
    Pause,
    /// Resume after pause.
    Resume,
    /// Stop the VM; the vmm process exits.
    Shutdown,
    /// Print the Prometheus metrics.
    Metrics,
    /// Write a snapshot of the paused VM.
    Snapshot {
        /// full or diff.
        #[arg(long = "type", default_value = "full")]
        kind: String,
        /// Where the vmm writes it.
        path: PathBuf,
    },
    /// Print the state hash of the paused VM (JSON, with its parts).
    StateHash,
    /// Replicated VM: take over now (secondary), or drop the secondary and
    /// run alone (primary).
    Failover,
    /// Replicated VM: queue one checkpoint now (needs state `protected`).
    Checkpoint,
    /// Replicated VM: print the replication status (the `colo` object of
    /// the status, JSON).
    ColoStatus,
    /// Replicated VM: change the checkpoint interval, in milliseconds
    /// (1..=60000).
    SetCheckpointMs {
        /// The new interval.
        ms: u64,
    },
    /// Replicated VM in COLO mode (primary): change how long a frame
    /// waits for its twin from the other VM, in milliseconds (1..=60000).
    SetCompareTimeoutMs {
        /// The new timeout.
        ms: u64,
    },
    /// Send any request: METHOD URI [JSON-BODY].
    Raw {
        method: String,
        uri: String,
        body: Option<String>,
    },
}

fn main() -> ExitCode {
    match run(&Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmmctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let snapshot_body;
    let patch_body;
    let raw_method;
    let (method, uri, body) = match &cli.command {
        Command::Snapshot { kind, path } => {
            snapshot_body = serde_json::json!({ "type": kind, "path": path }).to_string();
            ("PUT", "/snapshot", Some(snapshot_body.as_str()))
        }
        Command::StateHash => ("GET", "/state-hash", None),
        Command::Status => ("GET", "/status", None),
        Command::Metrics => ("GET", "/metrics", None),
        Command::Pause => ("PUT", "/vm", Some(r#"{"state":"paused"}"#)),
        Command::Resume => ("PUT", "/vm", Some(r#"{"state":"running"}"#)),
        Command::Shutdown => ("PUT", "/actions", Some(r#"{"action":"shutdown"}"#)),
        Command::Failover => ("PUT", "/actions", Some(r#"{"action":"failover"}"#)),
        Command::Checkpoint => ("PUT", "/actions", Some(r#"{"action":"checkpoint"}"#)),
        Command::ColoStatus => ("GET", "/status", None),
        Command::SetCheckpointMs { ms } => {
            patch_body = serde_json::json!({ "checkpoint_ms": ms }).to_string();
            ("PATCH", "/colo", Some(patch_body.as_str()))
        }
        Command::SetCompareTimeoutMs { ms } => {
            patch_body = serde_json::json!({ "compare_timeout_ms": ms }).to_string();
            ("PATCH", "/colo", Some(patch_body.as_str()))
        }
        Command::Raw { method, uri, body } => {
            raw_method = method.to_ascii_uppercase();
            (raw_method.as_str(), uri.as_str(), body.as_deref())
        }
    };
    let (status, reply) = client::call(&cli.api_sock, method, uri, body)
        .with_context(|| format!("{method} {uri}"))?;
    if (200..300).contains(&status) {
        if let Command::ColoStatus = cli.command {
            return print_colo(&reply);
        }
        if !reply.is_empty() {
            println!("{}", reply.trim_end());
        }
        return Ok(());
    }
    let message = serde_json::from_str::<serde_json::Value>(&reply)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or(reply);
    anyhow::bail!("{method} {uri}: HTTP {status}: {message}")
}

/// Prints the `colo` object of a `GET /status` reply.
fn print_colo(status: &str) -> anyhow::Result<()> {
    let status: serde_json::Value =
        serde_json::from_str(status).context("malformed status reply")?;
    match status.get("colo") {
        Some(colo) if !colo.is_null() => {
            println!("{colo}");
            Ok(())
        }
        _ => anyhow::bail!("{}", vmm::api::NOT_REPLICATING),
    }
}
