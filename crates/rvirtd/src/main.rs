//! `rvirtd`: the rvirt management daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use rvirt_domain::protocol::{DEFAULT_SOCKET, DEFAULT_STATE_DIR};

/// The rvirt management daemon: stores domains and runs their VMMs.
#[derive(Parser, Debug)]
#[command(name = "rvirtd", version, about)]
struct Cli {
    /// Where definitions, run records and VMM logs are kept.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// The management socket clients connect to.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// The rvirt-vmm binary [default: next to rvirtd, else on PATH].
    #[arg(long, value_name = "PATH")]
    vmm: Option<PathBuf>,
    /// A group whose members may use the socket (mode 0660); otherwise only its owner (0600).
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("RVIRT_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let cfg = rvirtd::DaemonConfig { state_dir: cli.state_dir, socket: cli.socket, vmm: cli.vmm.unwrap_or_else(rvirtd::default_vmm), group: cli.group };
    match rvirtd::run(&cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rvirtd: {e:#}");
            ExitCode::from(1)
        }
    }
}
