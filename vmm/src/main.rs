//! The `vmm` binary.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use std::sync::{Arc, OnceLock};

use vmm::config::{Cli, Role, VmConfig};
use vmm::control::VmmControl;
use vmm::vm::{Vm, VmExit};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("VMM_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    fail_stop_on_panic();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(exit) => {
            tracing::info!("VM ended: {exit:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vmm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Fail-stop: a panic on any thread (a device model, a vCPU, the API) ends
/// the process with exit status 1 and says so, rather than leaving a VM
/// that runs on without that thread, or (with the release profile's
/// `panic = "abort"`) dying of SIGABRT without a word of ours.
fn fail_stop_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!("vmm: error: the VM failed: a VMM thread panicked; stopping");
        std::process::exit(1);
    }));
}

fn run(cli: &Cli) -> anyhow::Result<VmExit> {
    let mut config = VmConfig::from_cli(cli).context("invalid configuration")?;
    // Everything that can be checked up front is, before any VM exists.
    if let Some(path) = &config.api_sock {
        vmm::api::check_socket_path(path).context("invalid configuration")?;
    }
    // A restore reads and verifies the whole chain before any VM exists.
    let chain = if config.restore.is_empty() {
        Vec::new()
    } else {
        let chain = vmm::snapshot::open_chain(&config.restore).context("cannot restore")?;
        if let Some(first) = chain.first() {
            let (mib, vcpus) = (first.layout.mem_size >> 20, first.layout.vcpus);
            if cli.mem_mib.is_some_and(|m| m != mib) || cli.vcpus.is_some_and(|v| v != vcpus) {
                anyhow::bail!(
                    "cannot restore: the snapshot is of a VM with {mib} MiB and {vcpus} vCPUs; \
                     leave out --mem-mib/--vcpus or give those"
                );
            }
            config.mem_mib = mib;
            config.vcpus = vcpus;
            // The CPU template follows the snapshot unless given: a given
            // one that differs is refused by name when the state is loaded.
            if cli.cpu_template.is_none() {
                use clap::ValueEnum;
                let name = &first.layout.cpu_template;
                config.cpu_template =
                    vmm::vm::cpuid::CpuTemplate::from_str(name, false).map_err(|_| {
                        anyhow::anyhow!("cannot restore: unknown CPU template {name:?}")
                    })?;
            }
            // What came from the file is checked like the command line.
            config
                .validate()
                .context("cannot restore: the snapshot's configuration")?;
        }
        chain
    };
    // The backends (console, disk images, taps) open before the VM
    // exists, and a secondary's listening socket too.
    let (backends, role) = match config.role {
        Role::Standalone => (
            vmm::role::standalone::backends(&config).context("invalid configuration")?,
            RoleParts::Standalone,
        ),
        Role::Primary => {
            let (backends, parts) =
                vmm::role::primary::backends(&config).context("invalid configuration")?;
            (backends, RoleParts::Primary(parts))
        }
        Role::Secondary => {
            let listen = config
                .replication
                .as_ref()
                .and_then(|r| r.listen.clone())
                .context("a secondary needs --listen")?;
            let listener = std::net::TcpListener::bind(&listen)
                .with_context(|| format!("cannot listen on {listen}"))?;
            let (backends, parts) =
                vmm::role::secondary::backends(&config).context("invalid configuration")?;
            (backends, RoleParts::Secondary(parts, listener))
        }
    };
    let mut vm = Vm::create(&config, backends).context("cannot create the VM")?;
    if let Some(last) = config.restore.last() {
        vm.restore(chain, last).context("cannot restore")?;
    }
    // A secondary's replica runs only after a failover.
    let paused = config.start_paused || config.role == Role::Secondary;
    let running = vm.start_with(paused).context("cannot start the VM")?;
    // Why replication could not start, when it could not: the VM is
    // stopped and `vmm` fails with this.
    let fatal_error: Arc<OnceLock<String>> = Arc::default();
    let colo = match role {
        RoleParts::Standalone => None,
        RoleParts::Primary(parts) => Some(vmm::role::primary::start(&config, &running, parts)?),
        RoleParts::Secondary(parts, listener) => {
            let (handle, slot) = (running.handle(), fatal_error.clone());
            let fatal = Box::new(move |why: String| {
                let _ = slot.set(why);
                let _ = handle.shutdown();
            });
            Some(vmm::role::secondary::start(
                &config, &running, parts, listener, fatal,
            )?)
        }
    };
    // Dropped after `wait` returns: the socket goes away with the VM.
    let _api = match &config.api_sock {
        Some(path) => {
            let mut control = VmmControl::new(&config, &running);
            if let Some(colo) = colo {
                control = control.with_colo(colo);
            }
            Some(vmm::api::spawn_server(path, Arc::new(control)).context("cannot start the API")?)
        }
        None => None,
    };
    let exit = running.wait().context("the VM failed")?;
    if let Some(why) = fatal_error.get() {
        anyhow::bail!("replication cannot start: {why}");
    }
    Ok(exit)
}

/// What a role keeps of its backends for its engine.
enum RoleParts {
    Standalone,
    Primary(vmm::role::primary::Parts),
    Secondary(vmm::role::secondary::Parts, std::net::TcpListener),
}
