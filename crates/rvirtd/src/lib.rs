//! `rvirtd`, the management daemon (libvirtd's role): it keeps domain
//! definitions under a state directory, runs one `rvirt-vmm` process per
//! running domain and drives it through the VMM's control API, and answers
//! `rvirt` clients on a unix socket. VMMs run in their own sessions, so they
//! outlive the daemon; a restarted daemon finds them again from its run
//! records. See docs/rvirtd.md.

pub mod cgroup;
pub mod events;
pub mod handoff;
pub mod manager;
pub mod network;
pub mod policy;
pub mod process;
pub mod server;
pub mod snapshots;
pub mod storage;
pub mod store;

use std::path::PathBuf;

pub use manager::Manager;
pub use store::Store;

/// How to run the daemon.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Definitions, run records and logs.
    pub state_dir: PathBuf,
    /// The management socket.
    pub socket: PathBuf,
    /// The `rvirt-vmm` binary.
    pub vmm: PathBuf,
    /// A group allowed to use the socket besides root.
    pub group: Option<String>,
    /// The read-only socket (list, dominfo, domstate, dumpxml), open to every local user.
    pub read_only_socket: Option<PathBuf>,
    /// What domains may touch and how VMMs are confined.
    pub policy: policy::Policy,
    /// libvirt's read-write socket (its read-only one is beside it, `-ro`),
    /// for virsh, virt-install and python-libvirt; `None`: not served.
    pub libvirt_socket: Option<PathBuf>,
    /// Define libvirt's `default` NAT network (autostarted) when absent.
    pub default_network: bool,
    /// The TLS listener for remote clients; `None`: local sockets only.
    pub listen_tls: Option<server::tls::TlsListen>,
}

/// Where `rvirt-vmm` is: next to this executable, else on `PATH`.
pub fn default_vmm() -> PathBuf {
    if let Ok(me) = std::env::current_exe() {
        let sibling = me.with_file_name("rvirt-vmm");
        if sibling.is_file() {
            return sibling;
        }
    }
    PathBuf::from("rvirt-vmm")
}

/// Loads the state, binds the socket, starts autostart domains and serves clients until killed.
pub fn run(cfg: &DaemonConfig) -> anyhow::Result<()> {
    let store = Store::open(&cfg.state_dir)?;
    // Certificates first: a TLS set-up that cannot work leaves no socket behind.
    let tls = cfg.listen_tls.as_ref().map(server::tls::bind).transpose()?;
    // libvirt's sockets first: once rvirtd's own socket answers, every socket is bound.
    let libvirt = cfg.libvirt_socket.as_deref().map(|p| server::libvirt::bind(p, cfg.group.as_deref())).transpose()?;
    let listener = server::bind(&cfg.socket, cfg.group.as_deref())?;
    let read_only = cfg.read_only_socket.as_deref().map(server::bind_read_only).transpose()?;
    if cfg.policy.jail.is_none() {
        tracing::warn!("VMMs run without a jail (rvirtd is not root, or --no-jail): each still filters its system calls");
    }
    let mgr = Manager::open(store, cfg.vmm.clone(), cfg.policy.clone())?;
    mgr.spawn_monitor().map_err(|e| anyhow::anyhow!("starting the monitor thread: {e}"))?;
    tracing::info!("rvirtd listening on {}", cfg.socket.display());
    if let (Some((rw, ro)), Some(path)) = (libvirt, cfg.libvirt_socket.as_deref()) {
        server::libvirt::spawn(rw, false, mgr.clone())?;
        server::libvirt::spawn(ro, true, mgr.clone())?;
        tracing::info!("libvirt clients served on {} (and {})", path.display(), server::libvirt::read_only_path(path).display());
    }
    if let Some(tls) = tls {
        let addr = tls.local_addr().map(|a| a.to_string()).unwrap_or_default();
        server::tls::spawn(tls, mgr.clone())?;
        tracing::info!("remote clients served over TLS on {addr}");
    }
    if cfg.default_network {
        if let Err(e) = mgr.networks().ensure_default() {
            tracing::error!("the default network: {e}");
        }
    }
    let auto = mgr.clone();
    // Networks and pools first: domains may use them.
    std::thread::spawn(move || {
        auto.networks().autostart();
        auto.pools().autostart();
        auto.autostart();
    });
    server::serve(listener, read_only, mgr)
}
