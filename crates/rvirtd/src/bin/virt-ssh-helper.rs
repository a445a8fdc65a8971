//! `virt-ssh-helper`: what libvirt's client runs on the far side of
//! `qemu+ssh://host/system` (`virt-ssh-helper 'qemu:///system'`, through
//! the login shell sshd starts). It joins its standard input and output to
//! rvirtd's libvirt socket, so virsh and python-libvirt reach rvirtd over
//! an ordinary sshd; with `--rvirt` it joins rvirtd's own socket instead,
//! for `rvirt --connect qemu+ssh://…`. The sockets are the defaults, or
//! those in `RVIRT_LIBVIRT_SOCKET` and `RVIRT_SOCKET` (and their read-only
//! twins with `-r`), or `?socket=` in the URI.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use rvirt_remote::uri::{self, Transport};

/// Joins stdin and stdout to rvirtd's socket (libvirt's virt-ssh-helper for rvirtd).
#[derive(Parser, Debug)]
#[command(name = "virt-ssh-helper", version, about)]
struct Cli {
    /// The read-only socket.
    #[arg(short = 'r', long)]
    readonly: bool,
    /// rvirtd's own socket (rvirt's JSON requests) instead of libvirt's.
    #[arg(long)]
    rvirt: bool,
    /// The local URI to join, qemu:///system.
    uri: String,
}

/// The socket `cli` asks for.
fn socket(cli: &Cli) -> Result<PathBuf, String> {
    let given = match uri::parse(&cli.uri).map_err(|e| e.to_string())? {
        Transport::Local { socket } => socket,
        _ => return Err(format!("{}: a local URI is needed here (qemu:///system)", cli.uri)),
    };
    let env = |name: &str| std::env::var_os(name).map(PathBuf::from);
    Ok(match (cli.rvirt, cli.readonly) {
        (false, rw_or_ro) => {
            let rw = given.or_else(|| env("RVIRT_LIBVIRT_SOCKET")).unwrap_or_else(|| rvirtd::server::libvirt::DEFAULT_SOCKET.into());
            if rw_or_ro {
                rvirtd::server::libvirt::read_only_path(&rw)
            } else {
                rw
            }
        }
        (true, false) => given.or_else(|| env("RVIRT_SOCKET")).unwrap_or_else(|| rvirt_domain::protocol::DEFAULT_SOCKET.into()),
        (true, true) => given.or_else(|| env("RVIRT_RO_SOCKET")).unwrap_or_else(|| rvirt_domain::protocol::DEFAULT_RO_SOCKET.into()),
    })
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    let path = match socket(&cli) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("virt-ssh-helper: {e}");
            return ExitCode::from(1);
        }
    };
    let sock = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("virt-ssh-helper: cannot connect to rvirtd at {}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    let Ok(mut to_daemon) = sock.try_clone() else {
        eprintln!("virt-ssh-helper: out of descriptors");
        return ExitCode::from(1);
    };
    // The client's bytes to the daemon; its end of input ends our sending.
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut to_daemon);
        let _ = to_daemon.shutdown(std::net::Shutdown::Write);
    });
    // The daemon's bytes to the client, until the daemon closes.
    let mut from_daemon = sock;
    let mut out = std::io::stdout().lock();
    let mut buf = [0u8; 64 << 10];
    loop {
        match from_daemon.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                    break;
                }
            }
        }
    }
    ExitCode::SUCCESS
}
