//! `rvirtd`: the rvirt management daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use rvirt_domain::protocol::{DEFAULT_SOCKET, DEFAULT_STATE_DIR};
use rvirtd::policy::{Policy, DEFAULT_ALLOW, DEFAULT_ALLOW_READ_ONLY, DEFAULT_JAIL_UID_BASE};

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
    /// The read-only socket (list, dominfo, domstate, dumpxml), mode 0666
    /// [default: beside --socket, NAME-ro.sock: /run/rvirt/rvirtd-ro.sock].
    #[arg(long, value_name = "PATH")]
    read_only_socket: Option<PathBuf>,
    /// No read-only socket.
    #[arg(long, conflicts_with = "read_only_socket")]
    no_read_only_socket: bool,
    /// libvirt's socket, for virsh, virt-install and python-libvirt
    /// (`qemu:///system`); its read-only twin is PATH-ro.
    #[arg(long, value_name = "PATH", default_value = rvirtd::server::libvirt::DEFAULT_SOCKET)]
    libvirt_socket: PathBuf,
    /// Do not serve libvirt's protocol.
    #[arg(long)]
    no_libvirt_socket: bool,
    /// Define libvirt's `default` NAT network (virbr0, 192.168.122.0/24,
    /// autostarted) when there is none, as libvirt's packages do.
    #[arg(long)]
    default_network: bool,
    /// A directory whose files domains may use in every way (disk images);
    /// repeatable [default: /var/lib/rvirt/images, /var/lib/libvirt/images].
    #[arg(long, value_name = "DIR")]
    allow_path: Vec<PathBuf>,
    /// A directory whose files domains may only read (kernels, firmware,
    /// discs, read-only disks); repeatable [default: /boot, /usr/share/seabios,
    /// /usr/share/qemu, /var/lib/libvirt/boot].
    #[arg(long, value_name = "DIR")]
    allow_path_ro: Vec<PathBuf>,
    /// Start VMMs without the jail (namespaces, empty root, no capabilities,
    /// own uid); their system calls are still filtered. Without root there is no jail.
    #[arg(long)]
    no_jail: bool,
    /// Jailed VMMs run as uid and gid BASE + domain id.
    #[arg(long, value_name = "BASE", default_value_t = DEFAULT_JAIL_UID_BASE)]
    jail_uid_base: u32,
    /// Serve remote clients over TLS on ADDR[:PORT] (port 16514 unless
    /// given; `0.0.0.0`, `[::]` or one address): virsh's `qemu+tls://`.
    #[arg(long, value_name = "ADDR[:PORT]", value_parser = parse_listen)]
    listen_tls: Option<std::net::SocketAddr>,
    /// The TLS certificates in one directory (cacert.pem, servercert.pem,
    /// serverkey.pem, cacrl.pem if any) [default: libvirt's /etc/pki layout:
    /// /etc/pki/CA/cacert.pem, /etc/pki/libvirt/servercert.pem,
    /// /etc/pki/libvirt/private/serverkey.pem, /etc/pki/CA/cacrl.pem].
    #[arg(long, value_name = "DIR", requires = "listen_tls")]
    pki_dir: Option<PathBuf>,
    /// A client certificate DN let in over TLS (`*` and `?` match as in
    /// libvirtd's tls_allowed_dn_list); repeatable [default: any the CA signed].
    #[arg(long, value_name = "PATTERN", requires = "listen_tls")]
    tls_allowed_dn: Vec<String>,
    /// Jailed VMMs keep uid 0 (without any capability) instead of their own uid.
    #[arg(long)]
    jail_keep_uid: bool,
}

/// `ADDR[:PORT]` with libvirt's TLS port when none is given.
fn parse_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    let ip: std::net::IpAddr = s.trim_start_matches('[').trim_end_matches(']').parse().map_err(|_| format!("'{s}' is not ADDR or ADDR:PORT (10.0.0.1:16514, [::]:16514, 0.0.0.0)"))?;
    Ok(std::net::SocketAddr::new(ip, rvirt_remote::tls::DEFAULT_PORT))
}

/// The read-only socket's default place: `NAME-ro.sock` beside the read-write socket.
fn beside(socket: &std::path::Path) -> PathBuf {
    let stem = socket.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "rvirtd".into());
    socket.with_file_name(format!("{stem}-ro.sock"))
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("RVIRT_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let dirs = |given: Vec<PathBuf>, default: &[&str]| if given.is_empty() { default.iter().map(PathBuf::from).collect() } else { given };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let jail = (root && !cli.no_jail).then_some((!cli.jail_keep_uid).then_some(cli.jail_uid_base));
    let policy = Policy::new(&dirs(cli.allow_path, DEFAULT_ALLOW), &dirs(cli.allow_path_ro, DEFAULT_ALLOW_READ_ONLY), jail);
    let read_only_socket = (!cli.no_read_only_socket).then(|| cli.read_only_socket.clone().unwrap_or_else(|| beside(&cli.socket)));
    let cfg = rvirtd::DaemonConfig {
        state_dir: cli.state_dir,
        socket: cli.socket,
        vmm: cli.vmm.unwrap_or_else(rvirtd::default_vmm),
        group: cli.group,
        read_only_socket,
        policy,
        libvirt_socket: (!cli.no_libvirt_socket).then_some(cli.libvirt_socket),
        default_network: cli.default_network,
        listen_tls: cli.listen_tls.map(|addr| rvirtd::server::tls::TlsListen {
            addr,
            pki: cli.pki_dir.as_deref().map(rvirt_remote::pki::ServerPki::in_dir).unwrap_or_else(rvirt_remote::pki::ServerPki::system),
            allowed: rvirt_remote::dn::DnAllowList::new(cli.tls_allowed_dn),
        }),
    };
    match rvirtd::run(&cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rvirtd: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_read_only_socket_sits_beside_the_read_write_one() {
        use rvirt_domain::protocol::{DEFAULT_RO_SOCKET, DEFAULT_SOCKET};
        assert_eq!(super::beside(std::path::Path::new(DEFAULT_SOCKET)), std::path::Path::new(DEFAULT_RO_SOCKET));
        assert_eq!(super::beside(std::path::Path::new("/tmp/x/s.sock")), std::path::Path::new("/tmp/x/s-ro.sock"));
    }

    #[test]
    fn a_tls_address_takes_libvirt_s_port_unless_given() {
        assert_eq!(super::parse_listen("10.0.0.1").unwrap().to_string(), "10.0.0.1:16514");
        assert_eq!(super::parse_listen("[::]").unwrap().to_string(), "[::]:16514");
        assert_eq!(super::parse_listen("0.0.0.0:1234").unwrap().to_string(), "0.0.0.0:1234");
        assert!(super::parse_listen("host.example").unwrap_err().contains("not ADDR"));
    }
}
