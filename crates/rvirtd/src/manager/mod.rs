//! The domains the daemon owns and their lifecycle: definitions, one VMM
//! process per running domain driven through its control API, and what
//! happens when a VMM ends (`on_poweroff`, `on_reboot`, `on_crash`).
//!
//! All state sits behind one mutex. Requests that wait (start, shutdown
//! with a timeout, destroy) wait on a condition variable with the mutex
//! released, so `list` never blocks behind a slow guest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

mod commands;
mod saves;
mod snapshot;
mod stats;

pub use stats::state_numbers;

use rvirt_api::{ApiClient, Request as VmmRequest};
use rvirt_domain::protocol::{Affect, DomainInfo, DomainState, DomainSummary, InterfaceAddress, Request, Response, StateReport};
use rvirt_domain::{CharDevice, DiskSource, DomainXml, LifecycleAction, VmmLaunch};

use crate::events::{DomainEvent, EventBus, Lifecycle, StopReason};
use crate::process::{self, VmmEnd};
use crate::storage;
use crate::store::{RunRecord, Store};

/// How long a VMM may take from spawn to answering its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `destroy` waits after asking the VMM to stop before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often the monitor looks at VMM processes.
const MONITOR_PERIOD: Duration = Duration::from_millis(100);
/// Longest UNIX socket path.
const MAX_SOCKET_PATH: usize = 107;
/// Longest a client may ask `shutdown` to wait.
pub const MAX_SHUTDOWN_WAIT: Duration = Duration::from_secs(3600);

/// Parses a definition and checks that it reads back from its own XML
/// unchanged, so what is stored is what a restarted daemon will load.
fn parse_checked(xml: &str) -> Result<DomainXml, String> {
    let mut def = DomainXml::parse(xml).map_err(|e| e.to_string())?;
    // Each card gets its MAC address now, as libvirt gives it: the guest
    // keeps it across starts, and leases can be matched to it (domifaddr).
    for i in def.interfaces.iter_mut().filter(|i| i.mac.is_none()) {
        i.mac = Some(crate::network::random_mac());
    }
    let text = def.to_xml();
    match DomainXml::parse(&text) {
        Ok(again) if again.to_xml() == text => Ok(def),
        Ok(_) => Err("the definition does not write back the same way twice; it was not stored (please report this)".into()),
        Err(e) => Err(format!("the definition does not read back from its own XML ({e}); it was not stored (please report this)")),
    }
}

struct Running {
    record: RunRecord,
    /// Set when this daemon started the VMM (then it reaps it).
    child: Option<Child>,
    /// The live definition (as started).
    def: DomainXml,
    /// The daemon is stopping it (`destroy`, `save`, a revert): the end is
    /// that, whatever the log says.
    stopping: Option<StopReason>,
    /// The backing chains its disks were started with (for conflict checks).
    chains: storage::Chains,
}

struct Domain {
    /// The stored (or, for transient domains, the running) definition.
    def: DomainXml,
    persistent: bool,
    state: DomainState,
    reason: String,
    run: Option<Running>,
}

struct Inner {
    domains: BTreeMap<String, Domain>,
    next_id: u32,
}

/// A domain's identity and state at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainBrief {
    /// Its name.
    pub name: String,
    /// Its UUID's bytes.
    pub uuid: [u8; 16],
    /// Its id while a VMM runs it.
    pub id: Option<u32>,
    /// Its state.
    pub state: DomainState,
    /// Why it is in that state (`booted`, `user`, `shutdown`, `destroyed`, `crashed`, `failed`, ...).
    pub reason: String,
    /// Whether its definition is stored.
    pub persistent: bool,
    /// Whether it starts with the daemon.
    pub autostart: bool,
    /// Whether its next start continues a managed save.
    pub managed_save: bool,
    /// Whether it has snapshots.
    pub has_snapshots: bool,
}

/// The daemon's domains.
pub struct Manager {
    store: Store,
    vmm: PathBuf,
    policy: crate::policy::Policy,
    inner: Mutex<Inner>,
    changed: Condvar,
    events: EventBus,
    networks: crate::network::Networks,
    pools: crate::storage::Pools,
    snapshots: crate::snapshots::SnapshotStore,
    /// Held by every snapshot, save and restore: one at a time.
    snapshot_lock: Mutex<()>,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn vmm_call(socket: &Path, req: &VmmRequest, timeout: Duration) -> Result<rvirt_api::Response, String> {
    vmm_call_with_fd(socket, req, None, timeout)
}

/// [`vmm_call`], sending `fd` along with the request when given.
fn vmm_call_with_fd(socket: &Path, req: &VmmRequest, fd: Option<std::os::fd::BorrowedFd<'_>>, timeout: Duration) -> Result<rvirt_api::Response, String> {
    let mut c = ApiClient::connect(socket, timeout).map_err(|e| e.to_string())?;
    let r = match fd {
        Some(fd) => c.call_with_fd(req, fd),
        None => c.call(req),
    }
    .map_err(|e| e.to_string())?;
    if r.ok {
        Ok(r)
    } else {
        Err(r.error.unwrap_or_else(|| "the VMM refused the request".into()))
    }
}

impl Inner {
    /// Finds a domain by name, id or UUID.
    fn find(&self, key: &str) -> Result<String, String> {
        if self.domains.contains_key(key) {
            return Ok(key.to_string());
        }
        let by_id = key.parse::<u32>().ok();
        self.domains
            .iter()
            .find(|(_, d)| {
                d.def.uuid.to_string().eq_ignore_ascii_case(key)
                    || (by_id.is_some() && d.run.as_ref().map(|r| r.record.id) == by_id)
            })
            .map(|(n, _)| n.clone())
            .ok_or_else(|| format!("no domain with a matching name, id or uuid '{key}'"))
    }
}

impl Manager {
    /// Loads the state directory: definitions, autostart marks, and the VMMs
    /// a previous daemon started (adopted when still running).
    pub fn open(store: Store, vmm: PathBuf, policy: crate::policy::Policy) -> anyhow::Result<Arc<Self>> {
        let mut inner = Inner { domains: BTreeMap::new(), next_id: 1 };
        for (name, text) in store.definitions() {
            let parsed = text.map_err(|e| e.to_string()).and_then(|t| DomainXml::parse(&t).map_err(|e| e.to_string()));
            match parsed {
                Ok(def) if def.name == name => {
                    inner.domains.insert(name, Domain { def, persistent: true, state: DomainState::ShutOff, reason: "unknown".into(), run: None });
                }
                Ok(def) => tracing::error!("{}: holds domain '{}', not '{name}'; ignored", store.root().display(), def.name),
                // Kept on disk untouched: a definition is never thrown away.
                Err(e) => tracing::error!("definition '{name}' is unreadable and was skipped: {e}"),
            }
        }
        let networks = crate::network::Networks::open(store.clone());
        let pools = crate::storage::Pools::open(store.clone(), policy.clone());
        let snapshots = crate::snapshots::SnapshotStore::new(store.snapshots());
        let mgr = Arc::new(Self {
            store,
            vmm,
            policy,
            inner: Mutex::new(inner),
            changed: Condvar::new(),
            events: EventBus::default(),
            networks,
            pools,
            snapshots,
            snapshot_lock: Mutex::new(()),
        });
        mgr.adopt_running();
        Ok(mgr)
    }

    fn adopt_running(&self) {
        let mut g = lock(&self.inner);
        for (name, rec) in self.store.run_records() {
            let rec = match rec {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("run record of '{name}' is unreadable, left alone: {e:#}");
                    continue;
                }
            };
            g.next_id = g.next_id.max(rec.id + 1);
            let def = match DomainXml::parse(&rec.xml) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!("run record of '{name}' has bad XML, left alone: {e}");
                    continue;
                }
            };
            if !process::alive(rec.pid, rec.start_ticks) {
                // It ended while no daemon watched: record how, and move on.
                let end = process::read_end(&self.store.log(&name), rec.log_offset);
                tracing::info!("domain '{name}' ended while the daemon was down: {end:?}");
                crate::network::macvtap::remove_for(&def, &rec.taps);
                self.store.remove_run(&name, &rec);
                if let Some(d) = g.domains.get_mut(&name) {
                    d.reason = if matches!(end, VmmEnd::Crashed(_)) { "crashed" } else { "shutdown" }.into();
                }
                continue;
            }
            let state = if rec.paused { DomainState::Paused } else { DomainState::Running };
            // Read once here, for later starts' conflict checks; best effort, as the VMM already runs.
            let chains = storage::resolve_chains(&def).unwrap_or_else(|_| vec![Vec::new(); def.disks.len()]);
            let run = Running { record: rec.clone(), child: None, def: def.clone(), stopping: None, chains };
            match g.domains.get_mut(&name) {
                Some(d) => {
                    d.state = state;
                    d.reason = "adopted".into();
                    d.run = Some(run);
                }
                None => {
                    // A running domain whose definition was undefined or never stored (transient).
                    g.domains.insert(name.clone(), Domain { def, persistent: false, state, reason: "adopted".into(), run: Some(run) });
                }
            }
            tracing::info!("found running domain '{name}' (pid {})", rec.pid);
        }
    }

    /// The daemon's virtual networks.
    pub fn networks(&self) -> &crate::network::Networks {
        &self.networks
    }

    /// The daemon's storage pools and their volumes.
    pub fn pools(&self) -> &crate::storage::Pools {
        &self.pools
    }

    /// Where the manager reports lifecycle events, for front ends to subscribe to.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    fn emit(&self, name: &str, def: &DomainXml, id: Option<u32>, what: Lifecycle) {
        self.events.emit(DomainEvent { name: name.to_string(), uuid: def.uuid.to_string(), id, what });
    }

    /// Starts the domains marked for autostart that are not running.
    pub fn autostart(self: &Arc<Self>) {
        let names: Vec<String> = {
            let g = lock(&self.inner);
            g.domains.iter().filter(|(n, d)| d.persistent && !d.state.is_active() && self.store.autostart(n)).map(|(n, _)| n.clone()).collect()
        };
        for n in names {
            match self.start(&n) {
                Ok(_) => tracing::info!("autostarted '{n}'"),
                Err(e) => tracing::error!("autostart of '{n}' failed: {e}"),
            }
        }
    }

    /// Runs the monitor: notices VMMs that ended and applies the lifecycle actions.
    pub fn spawn_monitor(self: &Arc<Self>) -> std::io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new().name("monitor".into()).spawn(move || loop {
            std::thread::sleep(MONITOR_PERIOD);
            me.check_processes();
        })?;
        Ok(())
    }

    fn check_processes(self: &Arc<Self>) {
        let mut g = lock(&self.inner);
        let mut ended = Vec::new();
        for (name, d) in g.domains.iter_mut() {
            let Some(run) = d.run.as_mut() else { continue };
            let gone = match run.child.as_mut() {
                Some(c) => !matches!(c.try_wait(), Ok(None)),
                None => !process::alive(run.record.pid, run.record.start_ticks),
            };
            if gone {
                ended.push(name.clone());
            }
        }
        for name in ended {
            self.vmm_ended(&mut g, &name);
        }
    }

    /// A domain's VMM is gone: decide the domain's next state.
    fn vmm_ended(self: &Arc<Self>, g: &mut Inner, name: &str) {
        let Some(d) = g.domains.get_mut(name) else { return };
        let Some(run) = d.run.take() else { return };
        crate::network::macvtap::remove_for(&run.def, &run.record.taps);
        self.store.remove_run(name, &run.record);
        let end = process::read_end(&self.store.log(name), run.record.log_offset);
        tracing::info!("domain '{name}' VMM (pid {}) ended: {end:?}", run.record.pid);
        let (restart, what) = if let Some(why) = run.stopping {
            d.state = DomainState::ShutOff;
            d.reason = why.as_str().into();
            (false, Lifecycle::Stopped(why))
        } else {
            match end {
                VmmEnd::PowerOff if run.record.reboot_pending || run.def.on_poweroff == LifecycleAction::Restart => {
                    (true, Lifecycle::Stopped(StopReason::Shutdown))
                }
                VmmEnd::PowerOff | VmmEnd::Reboot => {
                    d.state = DomainState::ShutOff;
                    d.reason = "shutdown".into();
                    (false, Lifecycle::Stopped(StopReason::Shutdown))
                }
                VmmEnd::Stopped => {
                    d.state = DomainState::ShutOff;
                    d.reason = "destroyed".into();
                    (false, Lifecycle::Stopped(StopReason::Destroyed))
                }
                // Never restarted: it would fail the same way again.
                VmmEnd::Failed(why) => {
                    tracing::warn!("domain '{name}': the VMM failed: {why}");
                    d.state = DomainState::ShutOff;
                    d.reason = "failed".into();
                    (false, Lifecycle::Stopped(StopReason::Failed))
                }
                VmmEnd::Crashed(why) => {
                    tracing::warn!("domain '{name}' crashed: {why}");
                    d.reason = "crashed".into();
                    match run.def.on_crash {
                        LifecycleAction::Restart => (true, Lifecycle::Stopped(StopReason::Crashed)),
                        LifecycleAction::Preserve => {
                            d.state = DomainState::Crashed;
                            (false, Lifecycle::Crashed)
                        }
                        LifecycleAction::Destroy => {
                            d.state = DomainState::ShutOff;
                            (false, Lifecycle::Stopped(StopReason::Crashed))
                        }
                    }
                }
            }
        };
        self.emit(name, &run.def, None, what);
        if restart {
            // The same definition the domain ran with, as libvirt does on reboot.
            let def = run.def.clone();
            match self.spawn(g, name, def) {
                Ok((socket, offset)) => {
                    let me = self.clone();
                    let n = name.to_string();
                    std::thread::spawn(move || {
                        if let Err(e) = me.finish_start(&n, &socket, offset) {
                            tracing::error!("restarting '{n}': {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::error!("restarting '{name}' failed: {e}");
                    if let Some(d) = g.domains.get_mut(name) {
                        d.state = DomainState::ShutOff;
                        d.reason = "failed".into();
                    }
                }
            }
        } else if let Some(d) = g.domains.get(name) {
            if !d.persistent && d.state == DomainState::ShutOff {
                g.domains.remove(name);
            }
        }
        self.changed.notify_all();
    }

    /// Checks the files a domain needs before any process is started.
    fn check_files(def: &DomainXml) -> Result<(), String> {
        let need = |what: &str, p: &Path| -> Result<(), String> {
            std::fs::metadata(p).map(|_| ()).map_err(|e| format!("{what} {}: {e}", p.display()))
        };
        match &def.kernel {
            Some(k) => need("kernel", k)?,
            None => {
                if let Some(why) = &def.firmware.uefi {
                    return Err(format!(
                        "{why}: UEFI firmware is not supported yet; rvirt boots disks through SeaBIOS (remove it to boot this domain through BIOS)"
                    ));
                }
                match &def.firmware.loader {
                    Some(l) => need("firmware (<loader>)", l)?,
                    None => need("firmware (package seabios)", Path::new(rvirt_api::DEFAULT_FIRMWARE))?,
                }
            }
        }
        if let Some(i) = &def.initrd {
            need("initrd", i)?;
        }
        for d in def.disks.iter().filter(|d| !d.path.as_os_str().is_empty()) {
            let what = if d.source_kind == DiskSource::File { "disk image" } else { "disk device" };
            need(&format!("{what} ({})", d.target), &d.path)?;
        }
        if let Some(CharDevice::File(p)) = def.virtio_console.as_ref().or(def.serial.as_ref()) {
            if let Some(dir) = p.parent() {
                need("console log directory", dir)?;
            }
        }
        Ok(())
    }

    /// Spawns the VMM for `name` with `def`; the domain is `running` from here.
    fn spawn(&self, g: &mut Inner, name: &str, def: DomainXml) -> Result<(PathBuf, u64), String> {
        self.spawn_with(g, name, def, None)
    }

    /// [`Manager::spawn`], continuing a saved VM when `restore` is given.
    fn spawn_with(&self, g: &mut Inner, name: &str, def: DomainXml, restore: Option<saves::RestoreFrom>) -> Result<(PathBuf, u64), String> {
        Self::check_files(&def)?;
        self.policy.check_domain(&def)?;
        let chains = storage::resolve_chains(&def)?;
        for (disk, chain) in def.disks.iter().zip(&chains) {
            for (backing, _) in chain {
                self.policy.check(&format!("backing file of disk ({})", disk.target), backing, false)?;
            }
        }
        let others =
            g.domains.iter().filter(|(n, _)| n.as_str() != name).filter_map(|(n, d)| d.run.as_ref().map(|r| (n.as_str(), &r.def, &r.chains)));
        storage::check_disk_conflicts(name, &def, &chains, others)?;
        let id = g.next_id;
        let api_socket = self.store.api_socket(id);
        if api_socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(format!("the state directory's path is too long for a socket ({})", api_socket.display()));
        }
        let taps: Vec<String> =
            def.interfaces.iter().enumerate().map(|(i, itf)| itf.tap.clone().unwrap_or_else(|| format!("rv{id}n{i}"))).collect();
        self.store.rotate_log(name);
        let log = self.store.log(name);
        let log_offset = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let _ = std::fs::remove_file(&api_socket);
        // rvirtd opens every file and tap; the VMM gets descriptors only.
        let launch = def.with_network_bridges(|n| self.networks.active_bridge(n))?;
        let mut handoff = crate::handoff::Handoff::open(&def, &chains, &taps, &self.policy)?;
        // The VMM gets the whole VM as one typed value, and descriptors.
        let mut cfg = launch.vm_config(&VmmLaunch { api_socket: &api_socket, taps: &taps, chains: &chains, tap_fds: &handoff.tap_fds() })?;
        if let Some(r) = restore {
            cfg.boot = rvirt_api::config::Boot::Restore { dir: r.path.clone(), copy_memory: r.copy_memory };
            cfg.start_paused = r.paused;
            handoff.add_file(r.path, r.file);
        }
        cfg.seccomp = rvirt_api::config::SeccompMode::Kill;
        cfg.jail = self.policy.jail(&self.store.jail_dir(), id);
        let config_path = self.store.vm_config(id);
        let json = cfg.to_json().map_err(|e| format!("domain '{name}': {e}"))?;
        crate::store::write_atomic(&config_path, json.as_bytes()).map_err(|e| format!("writing {}: {e}", config_path.display()))?;
        let mut args = vec!["--config".to_string(), config_path.to_string_lossy().into_owned()];
        args.extend(handoff.args());
        let group = match crate::cgroup::prepare(crate::cgroup::v2_root().as_deref(), name, &def.tuning) {
            Ok(g) => g,
            // A group only for accounting and the thread cap: not worth refusing the domain.
            Err(e) if !def.tuning.has_cgroup_limits() => {
                tracing::warn!("domain '{name}' runs without a cgroup: {e}");
                None
            }
            Err(e) => {
                crate::network::macvtap::remove_for(&def, &taps);
                return Err(e);
            }
        };
        let child = process::spawn_vmm(&self.vmm, &args, &log, group.as_ref().map(|g| g.procs()).as_deref(), &handoff.inherited()).map_err(|e| {
            crate::network::macvtap::remove_for(&def, &taps);
            format!("starting {}: {e}", self.vmm.display())
        })?;
        // The VMM holds its copies; the daemon keeps none.
        drop(handoff);
        g.next_id += 1;
        let pid = child.id();
        let start_ticks = process::proc_stat(pid).map(|(t, _)| t).unwrap_or(0);
        let persistent = g.domains.get(name).is_some_and(|d| d.persistent);
        let record = RunRecord {
            id,
            pid,
            start_ticks,
            api_socket: api_socket.clone(),
            log_offset,
            xml: def.to_xml(),
            persistent,
            taps,
            paused: false,
            reboot_pending: false,
            serial_pty: None,
        };
        if let Err(e) = self.store.save_run(name, &record) {
            tracing::error!("{e:#}: a restarted daemon will not find '{name}'");
        }
        let run = Running { record, child: Some(child), def: def.clone(), stopping: None, chains };
        let d = g.domains.entry(name.to_string()).or_insert_with(|| Domain {
            def: def.clone(),
            persistent: false,
            state: DomainState::ShutOff,
            reason: String::new(),
            run: None,
        });
        d.run = Some(run);
        d.state = DomainState::Running;
        d.reason = "booted".into();
        self.emit(name, &def, Some(id), Lifecycle::Started);
        Ok((api_socket, log_offset))
    }

    /// Waits (without the lock) until the VMM of `name` answers on `socket`,
    /// then sets the balloon for `currentMemory` and records the serial pty.
    fn finish_start(&self, name: &str, socket: &Path, log_offset: u64) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let status = loop {
            if let Ok(r) = vmm_call(socket, &VmmRequest::Status, Duration::from_secs(5)) {
                break r.status;
            }
            let g = lock(&self.inner);
            let still = g.domains.get(name).and_then(|d| d.run.as_ref()).is_some_and(|r| r.record.api_socket == socket);
            if !still {
                drop(g);
                // Gone already: a guest that powered off or crashed at once
                // did start; a VMM that could not run it did not.
                return match process::read_end(&self.store.log(name), log_offset) {
                    VmmEnd::Failed(_) => Err(format!("the VMM exited during start:\n{}", self.start_failure(name, log_offset))),
                    _ => Ok(()),
                };
            }
            drop(g);
            if Instant::now() > deadline {
                return Err(format!("the VMM did not answer on {} within {} s", socket.display(), START_TIMEOUT.as_secs()));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut g = lock(&self.inner);
        let Some(d) = g.domains.get_mut(name) else { return Ok(()) };
        let Some(run) = d.run.as_mut() else { return Ok(()) };
        run.record.serial_pty = status.and_then(|s| s.serial_pty);
        let balloon = (run.def.memory_kib - run.def.current_memory_kib) * 1024;
        let _ = self.store.save_run(name, &run.record);
        drop(g);
        if balloon > 0 {
            vmm_call(socket, &VmmRequest::Balloon { target_bytes: balloon }, Duration::from_secs(5))
                .map_err(|e| format!("setting the balloon for currentMemory: {e}"))?;
        }
        Ok(())
    }

    /// The last lines a VMM that failed to start logged.
    fn start_failure(&self, name: &str, log_offset: u64) -> String {
        let log = self.store.log(name);
        let tail = process::log_tail(&log, log_offset, 5);
        format!("{tail}\n(log: {})", log.display())
    }

    /// `start`: spawns the VMM and returns once it runs the guest.
    pub fn start(&self, key: &str) -> Result<String, String> {
        let (name, socket) = {
            let mut g = lock(&self.inner);
            let name = g.find(key)?;
            let d = &g.domains[&name];
            if d.state.is_active() {
                return Err(format!("domain '{name}' is already running"));
            }
            if self.store.managed_save(&name).exists() {
                drop(g);
                return self.start_managed_save(&name);
            }
            let def = d.def.clone();
            (name.clone(), self.spawn(&mut g, &name, def)?)
        };
        self.finish_start(&name, &socket.0, socket.1).map(|_| name)
    }

    /// `create`: starts a domain from XML without storing it.
    pub fn create(&self, xml: &str) -> Result<(String, Vec<String>), String> {
        self.create_domain(xml).map(|(b, w)| (b.name, w))
    }

    /// [`Manager::create`], answering with the domain as it started: a
    /// transient guest that powered off at once is gone by the time a
    /// second lookup could find it, yet it was created.
    pub fn create_domain(&self, xml: &str) -> Result<(DomainBrief, Vec<String>), String> {
        let def = parse_checked(xml)?;
        let warnings = def.unknown_report();
        let (name, socket, started) = {
            let mut g = lock(&self.inner);
            Self::check_unique(&g, &def, false)?;
            let name = def.name.clone();
            let socket = self.spawn(&mut g, &name, def)?;
            let started = g.domains.get(&name).map(|d| self.brief_of(&name, d, false));
            (name, socket, started)
        };
        self.finish_start(&name, &socket.0, socket.1)?;
        match (self.brief(&name), started) {
            (Ok(now), _) => Ok((now, warnings)),
            (Err(_), Some(started)) => Ok((started, warnings)),
            (Err(e), None) => Err(e),
        }
    }

    /// Refuses a definition whose name or UUID another domain has.
    /// `replace`: the same name with the same UUID is an update.
    fn check_unique(g: &Inner, def: &DomainXml, replace: bool) -> Result<(), String> {
        if let Some(d) = g.domains.get(&def.name) {
            // The same name and UUID: an update, or (for a running transient
            // domain) making it persistent, as libvirt does.
            if !replace || d.def.uuid != def.uuid {
                return Err(format!("domain '{}' already exists with uuid {}", def.name, d.def.uuid));
            }
        }
        if let Some((other, _)) = g.domains.iter().find(|(n, d)| **n != def.name && d.def.uuid == def.uuid) {
            return Err(format!("uuid {} is already used by domain '{other}'", def.uuid));
        }
        Ok(())
    }

    /// `define`: stores a new definition or updates one (same name and UUID).
    pub fn define(&self, xml: &str) -> Result<(String, Vec<String>), String> {
        let def = parse_checked(xml)?;
        let warnings = def.unknown_report();
        let mut g = lock(&self.inner);
        Self::check_unique(&g, &def, true)?;
        self.store.save_definition(&def.name, &def.to_xml()).map_err(|e| format!("{e:#}"))?;
        let name = def.name.clone();
        let updated = g.domains.get(&name).is_some_and(|d| d.persistent);
        self.emit(&name, &def, g.domains.get(&name).and_then(|d| d.run.as_ref()).map(|r| r.record.id), Lifecycle::Defined { updated });
        match g.domains.get_mut(&name) {
            // A running domain keeps its live definition until it restarts.
            Some(d) => {
                d.def = def;
                d.persistent = true;
                if let Some(r) = d.run.as_mut() {
                    r.record.persistent = true;
                    if let Err(e) = self.store.save_run(&name, &r.record) {
                        tracing::error!("{e:#}: a restarted daemon will think '{name}' transient");
                    }
                }
            }
            None => {
                g.domains.insert(name.clone(), Domain { def, persistent: true, state: DomainState::ShutOff, reason: "unknown".into(), run: None });
            }
        }
        Ok((name, warnings))
    }

    /// `undefine`: removes a domain's stored definition. A running domain
    /// runs on as a transient one (gone when it stops), as with libvirt.
    pub fn undefine(&self, key: &str, managed_save: bool, snapshots_metadata: bool) -> Result<String, String> {
        let mut g = lock(&self.inner);
        let name = g.find(key)?;
        let d = &g.domains[&name];
        if !d.persistent {
            return Err(format!("domain '{name}' is transient: it has no definition to remove (it vanishes when it stops)"));
        }
        let save = self.store.managed_save(&name);
        if save.exists() && !managed_save {
            return Err(format!("domain '{name}' has a managed save: remove it with managedsave-remove, or undefine with --managed-save"));
        }
        let snapshots = self.snapshots.load(&name).snaps.len();
        if snapshots > 0 && !snapshots_metadata {
            return Err(format!("domain '{name}' has {snapshots} snapshots: delete them, or undefine with --snapshots-metadata (their data stays in the images)"));
        }
        self.store.remove_definition(&name).map_err(|e| format!("{e:#}"))?;
        if managed_save {
            let _ = std::fs::remove_file(&save);
        }
        if snapshots_metadata {
            self.snapshots.remove_domain(&name);
        }
        let Some(d) = g.domains.get_mut(&name) else { return Ok(name) };
        self.emit(&name, &d.def, d.run.as_ref().map(|r| r.record.id), Lifecycle::Undefined);
        match d.run.as_mut() {
            Some(r) => {
                d.persistent = false;
                r.record.persistent = false;
                // The live definition is all that is left.
                d.def = r.def.clone();
                if let Err(e) = self.store.save_run(&name, &r.record) {
                    tracing::error!("{e:#}: a restarted daemon will think '{name}' persistent");
                }
            }
            None => {
                g.domains.remove(&name);
            }
        }
        Ok(name)
    }

    fn active(&self, key: &str) -> Result<(String, PathBuf), String> {
        let g = lock(&self.inner);
        let name = g.find(key)?;
        match g.domains[&name].run.as_ref() {
            Some(r) => Ok((name, r.record.api_socket.clone())),
            None => Err(format!("domain '{name}' is not running")),
        }
    }

    fn update_run(&self, name: &str, f: impl FnOnce(&mut Domain)) {
        let mut g = lock(&self.inner);
        if let Some(d) = g.domains.get_mut(name) {
            f(d);
            if let Some(r) = &d.run {
                let _ = self.store.save_run(name, &r.record);
            }
        }
        self.changed.notify_all();
    }

    /// `suspend` / `resume`.
    pub fn set_paused(&self, key: &str, paused: bool) -> Result<String, String> {
        let (name, socket) = self.active(key)?;
        let req = if paused { VmmRequest::Pause } else { VmmRequest::Resume };
        vmm_call(&socket, &req, Duration::from_secs(10)).map_err(|e| format!("domain '{name}': {e}"))?;
        self.update_run(&name, |d| {
            d.state = if paused { DomainState::Paused } else { DomainState::Running };
            d.reason = if paused { "user" } else { "unpaused" }.into();
            if let Some(r) = d.run.as_mut() {
                r.record.paused = paused;
                self.emit(&name, &r.def, Some(r.record.id), if paused { Lifecycle::Suspended } else { Lifecycle::Resumed });
            }
        });
        Ok(name)
    }

    /// `change-media`: ejects or inserts the disc of CD-ROM drive `target`
    /// of a running domain, through its VMM, and updates the live XML. A
    /// guest holding the tray locked is asked to eject (as QEMU does) and
    /// the eject tried again for up to 3 s before it is refused.
    pub fn change_media(&self, key: &str, target: &str, path: Option<&Path>, force: bool) -> Result<String, String> {
        let (name, socket) = self.active(key)?;
        let index = {
            let g = lock(&self.inner);
            let def = g.domains.get(&name).and_then(|d| d.run.as_ref()).map(|r| &r.def);
            let disk = def.and_then(|d| d.disks.iter().position(|x| x.target == target));
            match (disk, def) {
                (Some(i), Some(d)) if d.disks[i].cdrom => i,
                (Some(_), _) => return Err(format!("domain '{name}': {target} is not a CD-ROM drive")),
                (None, _) => return Err(format!("domain '{name}' has no drive {target}")),
            }
        };
        // rvirtd opens the disc itself, where the path policy allows, and
        // hands the VMM the descriptor: a jailed VMM can open no path.
        let disc = match path {
            Some(p) => {
                if !p.is_absolute() {
                    return Err(format!("'{}' must be an absolute path (rvirtd does not share your working directory)", p.display()));
                }
                let real = self.policy.check("disc", p, false)?;
                let file = rvirt_block::file::open_checked(&real, false, rvirt_block::file::Kind::RegularOrBlock, 0)
                    .map_err(|e| format!("{}: {e}", p.display()))?;
                Some(file)
            }
            None => None,
        };
        let req = VmmRequest::ChangeMedia { device: format!("disk{index}"), path: path.map(Path::to_path_buf), force, fd: disc.is_some() };
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match vmm_call_with_fd(&socket, &req, disc.as_ref().map(std::os::fd::AsFd::as_fd), Duration::from_secs(10)) {
                Ok(_) => break,
                Err(e) if e.contains("locked the tray") && Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => return Err(format!("domain '{name}': {e}")),
            }
        }
        self.update_run(&name, |d| {
            if let Some(disk) = d.run.as_mut().and_then(|r| r.def.disks.get_mut(index)) {
                disk.path = path.map(Path::to_path_buf).unwrap_or_default();
            }
        });
        Ok(name)
    }

    /// Waits until `name` is no longer active (or is gone), up to `timeout`.
    fn wait_inactive(&self, name: &str, socket: &Path, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout.min(MAX_SHUTDOWN_WAIT);
        let mut g = lock(&self.inner);
        loop {
            let same_run = g.domains.get(name).and_then(|d| d.run.as_ref()).is_some_and(|r| r.record.api_socket == socket);
            if !same_run {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self.changed.wait_timeout(g, deadline - now).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// `shutdown`: presses the power button; with a timeout, waits for `shut off`.
    pub fn shutdown(&self, key: &str, timeout: Option<Duration>) -> Result<String, String> {
        if let Some(t) = timeout.filter(|t| *t > MAX_SHUTDOWN_WAIT) {
            return Err(format!("a shutdown timeout of {} s is too long; at most {} s", t.as_secs(), MAX_SHUTDOWN_WAIT.as_secs()));
        }
        let (name, socket) = self.active(key)?;
        vmm_call(&socket, &VmmRequest::Shutdown, Duration::from_secs(10)).map_err(|e| format!("domain '{name}': {e}"))?;
        if let Some(t) = timeout {
            if !self.wait_inactive(&name, &socket, t) {
                return Err(format!(
                    "domain '{name}' did not shut down within {} s (the guest may ignore ACPI; 'destroy' stops it at once)",
                    t.as_secs()
                ));
            }
        }
        Ok(name)
    }

    /// `reboot`: asks the guest to power off and starts it again when it has.
    pub fn reboot(&self, key: &str) -> Result<String, String> {
        let (name, socket) = self.active(key)?;
        self.update_run(&name, |d| {
            if let Some(r) = d.run.as_mut() {
                r.record.reboot_pending = true;
            }
        });
        if let Err(e) = vmm_call(&socket, &VmmRequest::Shutdown, Duration::from_secs(10)) {
            self.update_run(&name, |d| {
                if let Some(r) = d.run.as_mut() {
                    r.record.reboot_pending = false;
                }
            });
            return Err(format!("domain '{name}': {e}"));
        }
        Ok(name)
    }

    /// `destroy`: stops the VMM at once (API `stop`, then SIGKILL).
    pub fn destroy(&self, key: &str) -> Result<String, String> {
        self.end_run(key, StopReason::Destroyed)
    }

    /// Ends a domain's VMM (asks it to stop, then SIGKILL after a grace),
    /// recording `why` as the reason it stopped.
    fn end_run(&self, key: &str, why: StopReason) -> Result<String, String> {
        let (name, socket, pid, ticks) = {
            let mut g = lock(&self.inner);
            let name = g.find(key)?;
            let d = g.domains.get_mut(&name).ok_or("vanished")?;
            let Some(run) = d.run.as_mut() else {
                if d.state == DomainState::Crashed {
                    d.state = DomainState::ShutOff;
                    d.reason = "destroyed".into();
                    if !d.persistent {
                        g.domains.remove(&name);
                    }
                    return Ok(name);
                }
                return Err(format!("domain '{name}' is not running"));
            };
            run.stopping = Some(why);
            (name, run.record.api_socket.clone(), run.record.pid, run.record.start_ticks)
        };
        let _ = vmm_call(&socket, &VmmRequest::Stop, Duration::from_secs(2));
        if !self.wait_inactive(&name, &socket, STOP_GRACE) {
            process::signal(pid, ticks, libc::SIGKILL);
            if !self.wait_inactive(&name, &socket, STOP_GRACE) {
                return Err(format!("domain '{name}': the VMM (pid {pid}) did not exit after SIGKILL"));
            }
        }
        Ok(name)
    }

    /// `autostart`.
    pub fn set_autostart(&self, key: &str, on: bool) -> Result<String, String> {
        let g = lock(&self.inner);
        let name = g.find(key)?;
        if !g.domains[&name].persistent {
            return Err(format!("domain '{name}' is transient: only defined domains can autostart"));
        }
        self.store.set_autostart(&name, on).map_err(|e| format!("{e:#}"))?;
        Ok(name)
    }

    /// `dumpxml`: the live definition of a running domain, else the stored one.
    pub fn dump_xml(&self, key: &str) -> Result<String, String> {
        let g = lock(&self.inner);
        let name = g.find(key)?;
        let d = &g.domains[&name];
        Ok(d.run.as_ref().map_or(&d.def, |r| &r.def).to_xml())
    }

    /// The stored definition (`dumpxml --inactive`): a running domain's
    /// next run, or the live one of a transient domain, which has no other.
    pub fn dump_inactive_xml(&self, key: &str) -> Result<String, String> {
        let g = lock(&self.inner);
        let name = g.find(key)?;
        Ok(g.domains[&name].def.to_xml())
    }

    /// `list`.
    pub fn list(&self, all: bool) -> Vec<DomainSummary> {
        let g = lock(&self.inner);
        let mut rows: Vec<DomainSummary> = g
            .domains
            .iter()
            // Crashed domains are shown like active ones: with libvirt, their process is kept.
            .filter(|(_, d)| all || d.state.is_active() || d.state == DomainState::Crashed)
            .map(|(n, d)| DomainSummary {
                id: d.run.as_ref().map(|r| r.record.id),
                name: n.clone(),
                state: d.state,
                uuid: d.def.uuid.to_string(),
                persistent: d.persistent,
                autostart: d.persistent && self.store.autostart(n),
                managed_save: self.store.managed_save(n).exists(),
                snapshots: self.snapshots.load(n).snaps.len() as u32,
            })
            .collect();
        // Running domains by id first, then the rest by name, as virsh does.
        rows.sort_by(|a, b| (a.id.is_none(), a.id, &a.name).cmp(&(b.id.is_none(), b.id, &b.name)));
        rows
    }

    /// Who domain `key` is and what state it is in: the libvirt front end's
    /// lookups (by name, id or UUID) and list filters.
    pub fn brief(&self, key: &str) -> Result<DomainBrief, String> {
        let g = lock(&self.inner);
        let name = g.find(key)?;
        Ok(self.brief_of(&name, &g.domains[&name], true))
    }

    /// [`Manager::brief`] of every domain, by name; `autostart` is read only
    /// when asked for (it costs a file check per domain), else false.
    pub fn briefs(&self, autostart: bool) -> Vec<DomainBrief> {
        let g = lock(&self.inner);
        g.domains.iter().map(|(n, d)| self.brief_of(n, d, autostart)).collect()
    }

    fn brief_of(&self, name: &str, d: &Domain, autostart: bool) -> DomainBrief {
        DomainBrief {
            name: name.to_string(),
            uuid: *d.def.uuid.as_bytes(),
            id: d.run.as_ref().map(|r| r.record.id),
            state: d.state,
            reason: d.reason.clone(),
            persistent: d.persistent,
            autostart: autostart && d.persistent && self.store.autostart(name),
            managed_save: self.store.managed_save(name).exists(),
            has_snapshots: !self.snapshots.load(name).snaps.is_empty(),
        }
    }

    /// `domstate`.
    pub fn state(&self, key: &str) -> Result<StateReport, String> {
        let g = lock(&self.inner);
        let name = g.find(key)?;
        let d = &g.domains[&name];
        Ok(StateReport { state: d.state, reason: d.reason.clone() })
    }

    /// `dominfo`.
    pub fn info(&self, key: &str) -> Result<DomainInfo, String> {
        let (socket, mut info) = {
            let g = lock(&self.inner);
            let name = g.find(key)?;
            let d = &g.domains[&name];
            let def = d.run.as_ref().map_or(&d.def, |r| &r.def);
            let info = DomainInfo {
                id: d.run.as_ref().map(|r| r.record.id),
                name: name.clone(),
                uuid: def.uuid.to_string(),
                os_type: "hvm".into(),
                state: d.state,
                reason: d.reason.clone(),
                vcpus: def.vcpus,
                max_memory_kib: def.memory_kib,
                used_memory_kib: if d.run.is_some() { def.current_memory_kib } else { 0 },
                persistent: d.persistent,
                autostart: d.persistent && self.store.autostart(&name),
                cpu_time_seconds: d.run.as_ref().and_then(|r| process::cpu_seconds(r.record.pid)),
                pid: d.run.as_ref().map(|r| r.record.pid),
            };
            (d.run.as_ref().map(|r| r.record.api_socket.clone()), info)
        };
        if let Some(s) = socket {
            if let Ok(Some(b)) = vmm_call(&s, &VmmRequest::Status, Duration::from_secs(2)).map(|r| r.status.and_then(|s| s.balloon)) {
                info.used_memory_kib = info.max_memory_kib.saturating_sub(b.actual_bytes / 1024);
            }
        }
        Ok(info)
    }

    /// A running domain's disks (target, source path, whether it has
    /// counters of its own) and taps, in order.
    pub fn devices(&self, key: &str) -> Result<(Vec<(String, String, bool)>, Vec<String>), String> {
        let g = lock(&self.inner);
        let name = g.find(key)?;
        let run = g.domains[&name].run.as_ref().ok_or_else(|| format!("domain '{name}' is not running"))?;
        let disks = run
            .def
            .disks
            .iter()
            .map(|x| (x.target.clone(), x.path.display().to_string(), x.bus == rvirt_domain::DiskBus::Virtio && !x.cdrom))
            .collect();
        Ok((disks, run.record.taps.clone()))
    }

    /// The counters of a running domain's disk (by target, `vda`, or source
    /// path) or network card (by tap name or MAC address), from its VMM.
    pub fn device_stats(&self, key: &str, device: &str) -> Result<rvirt_api::DeviceStats, String> {
        let (name, socket) = self.active(key)?;
        let vmm_name = {
            let g = lock(&self.inner);
            let run = g.domains.get(&name).and_then(|d| d.run.as_ref()).ok_or_else(|| format!("domain '{name}' is not running"))?;
            let def = &run.def;
            let disk = def.disks.iter().position(|x| x.target == device || (!x.path.as_os_str().is_empty() && x.path == Path::new(device)));
            let nic = def.interfaces.iter().enumerate().position(|(i, x)| run.record.taps.get(i).is_some_and(|t| t == device) || x.mac.as_deref().is_some_and(|m| m.eq_ignore_ascii_case(device)));
            match (disk, nic) {
                (Some(i), _) if def.disks[i].bus == rvirt_domain::DiskBus::Virtio && !def.disks[i].cdrom => format!("disk{i}"),
                (Some(_), _) => return Err(format!("domain '{name}': {device} is on the SCSI controller, whose counters cover all its disks together")),
                (None, Some(i)) => format!("net{i}"),
                (None, None) => return Err(format!("domain '{name}' has no disk or interface '{device}'")),
            }
        };
        let r = vmm_call(&socket, &VmmRequest::Stats, Duration::from_secs(5)).map_err(|e| format!("domain '{name}': {e}"))?;
        r.stats.and_then(|s| s.devices.get(&vmm_name).copied()).ok_or_else(|| format!("domain '{name}': the VMM has no counters for {vmm_name}"))
    }

    /// A domain's cards as it runs (or would run): the network each is on
    /// (if any), its MAC address and its tap.
    pub fn interfaces(&self, key: &str) -> Result<Vec<(Option<String>, Option<String>, Option<String>)>, String> {
        let g = lock(&self.inner);
        let name = g.find(key)?;
        let d = &g.domains[&name];
        let def = d.run.as_ref().map_or(&d.def, |r| &r.def);
        let taps = d.run.as_ref().map(|r| r.record.taps.clone()).unwrap_or_default();
        Ok(def
            .interfaces
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let net = match &x.kind {
                    rvirt_domain::InterfaceKind::Network(n) => Some(n.clone()),
                    _ => None,
                };
                (net, x.mac.clone(), taps.get(i).cloned().or_else(|| x.tap.clone()))
            })
            .collect())
    }

    /// A domain's addresses, from the leases of the networks its cards are
    /// on (`domifaddr`): each card with a lease, its tap, MAC and leased
    /// addresses with their prefix lengths.
    pub fn interface_addresses(&self, key: &str) -> Result<Vec<(String, String, Vec<(std::net::IpAddr, u8)>)>, String> {
        let mut found = Vec::new();
        for (net, mac, tap) in self.interfaces(key)? {
            let (Some(net), Some(mac)) = (net, mac) else { continue };
            let Ok((_, leases)) = self.networks.leases(&net) else { continue };
            let addrs: Vec<_> = leases.into_iter().filter(|(l, _)| l.mac == mac).map(|(l, p)| (l.ip, p)).collect();
            if !addrs.is_empty() {
                found.push((tap.unwrap_or_else(|| "-".into()), mac, addrs));
            }
        }
        Ok(found)
    }

    /// `console`: the pty of a running domain's serial port.
    pub fn console(&self, key: &str) -> Result<String, String> {
        let (name, socket) = self.active(key)?;
        {
            let g = lock(&self.inner);
            let d = &g.domains[&name];
            let def = d.run.as_ref().map_or(&d.def, |r| &r.def);
            if def.serial != Some(CharDevice::Pty) {
                return Err(format!("domain '{name}' has no serial console on a pty (<serial type='pty'/>)"));
            }
        }
        let status = vmm_call(&socket, &VmmRequest::Status, Duration::from_secs(5)).map_err(|e| format!("domain '{name}': {e}"))?;
        match status.status.and_then(|s| s.serial_pty) {
            Some(p) => Ok(p),
            None => Err(format!("domain '{name}': the VMM reports no serial pty")),
        }
    }

    /// Carries out one protocol request.
    pub fn handle(&self, req: Request) -> Response {
        let done = |r: Result<String, String>| match r {
            Ok(n) => Response::done(&n),
            Err(e) => Response::error(e),
        };
        let with_warnings = |r: Result<(String, Vec<String>), String>| match r {
            Ok((n, w)) => Response { warnings: w, ..Response::done(&n) },
            Err(e) => Response::error(e),
        };
        match req {
            Request::List { all } => Response { domains: Some(self.list(all)), ..Response::ok() },
            Request::Define { xml } => with_warnings(self.define(&xml)),
            Request::Create { xml } => with_warnings(self.create(&xml)),
            Request::Undefine { domain, managed_save, snapshots_metadata } => done(self.undefine(&domain, managed_save, snapshots_metadata)),
            Request::Start { domain } => done(self.start(&domain)),
            Request::Shutdown { domain, timeout_seconds } => {
                done(self.shutdown(&domain, timeout_seconds.map(Duration::from_secs)))
            }
            Request::Destroy { domain } => done(self.destroy(&domain)),
            Request::Reboot { domain } => done(self.reboot(&domain)),
            Request::Suspend { domain } => done(self.set_paused(&domain, true)),
            Request::Resume { domain } => done(self.set_paused(&domain, false)),
            Request::DumpXml { domain, inactive } => match if inactive { self.dump_inactive_xml(&domain) } else { self.dump_xml(&domain) } {
                Ok(x) => Response { xml: Some(x), ..Response::ok() },
                Err(e) => Response::error(e),
            },
            Request::DomInfo { domain } => match self.info(&domain) {
                Ok(i) => Response { info: Some(i), ..Response::ok() },
                Err(e) => Response::error(e),
            },
            Request::DomState { domain } => match self.state(&domain) {
                Ok(s) => Response { state: Some(s), ..Response::ok() },
                Err(e) => Response::error(e),
            },
            Request::Autostart { domain, enable } => done(self.set_autostart(&domain, enable)),
            Request::ChangeMedia { domain, target, path, force } => done(self.change_media(&domain, &target, path.as_deref(), force)),
            Request::Console { domain } => match self.console(&domain) {
                Ok(p) => Response { console: Some(p), ..Response::ok() },
                Err(e) => Response::error(e),
            },
            Request::DomIfAddr { domain } => match self.interface_addresses(&domain) {
                Ok(cards) => {
                    let rows = cards
                        .into_iter()
                        .flat_map(|(tap, mac, addrs)| addrs.into_iter().map(move |(ip, p)| InterfaceAddress { name: tap.clone(), mac: mac.clone(), address: format!("{ip}/{p}") }))
                        .collect();
                    Response { addresses: Some(rows), ..Response::ok() }
                }
                Err(e) => Response::error(e),
            },
            Request::SetMemory { domain, kib, live, config } => done(self.set_memory(&domain, kib, Affect { live, config })),
            Request::SetMaxMemory { domain, kib, live, config } => done(self.set_max_memory(&domain, kib, Affect { live, config })),
            Request::SetVcpus { domain, count, live, config } => done(self.set_vcpus(&domain, count, Affect { live, config })),
            Request::VcpuCount { domain } => match self.vcpu_counts(&domain) {
                Ok(c) => Response { vcpu_counts: Some(c), ..Response::ok() },
                Err(e) => Response::error(e),
            },
            Request::VcpuInfo { domain } => match self.vcpu_threads(&domain) {
                Ok(t) => Response { vcpu_threads: Some(t), ..Response::ok() },
                Err(e) => Response::error(e),
            },
            Request::Reset { domain } => done(self.reset(&domain)),
            Request::Rename { domain, new_name } => done(self.rename(&domain, &new_name)),
            r @ (Request::SnapshotCreate { .. }
            | Request::SnapshotList { .. }
            | Request::SnapshotDumpXml { .. }
            | Request::SnapshotRevert { .. }
            | Request::SnapshotDelete { .. }
            | Request::Save { .. }
            | Request::Restore { .. }
            | Request::ManagedSave { .. }
            | Request::ManagedSaveRemove { .. }) => self.handle_saved_state(r),
            Request::Desc { domain, title, set, live, config } => match self.desc(&domain, title, set.as_deref(), Affect { live, config }) {
                Ok((n, text)) => Response { text, ..Response::done(&n) },
                Err(e) => Response::error(e),
            },
            Request::Metadata { domain, uri, key, set, remove, live, config } => {
                let change = match (remove, set.as_deref(), key.as_deref()) {
                    (true, _, _) => Some((key.as_deref().unwrap_or("x"), None)),
                    (false, Some(x), Some(k)) => Some((k, Some(x))),
                    (false, Some(_), None) => return Response::error("setting metadata needs a key (the namespace prefix)"),
                    (false, None, _) => None,
                };
                match self.metadata(&domain, &uri, change, Affect { live, config }) {
                    Ok((n, text)) => Response { text, ..Response::done(&n) },
                    Err(e) => Response::error(e),
                }
            }
            Request::AttachDevice { domain, xml, live, config } => done(self.attach_device(&domain, &xml, Affect { live, config })),
            Request::DetachDevice { domain, xml, live, config } => done(self.detach_device(&domain, &xml, Affect { live, config })),
            Request::SetLink { domain, interface, up, live, config } => done(self.set_link(&domain, &interface, up, Affect { live, config })),
            Request::MemStat { domain } => match self.memory_stats(&domain) {
                Ok(m) => Response { memory_stats: Some(m), ..Response::ok() },
                Err(e) => Response::error(e),
            },
            Request::BlkInfo { domain, disk } => match self.block_info(&domain, &disk) {
                Ok(b) => Response { block_info: Some(b), ..Response::ok() },
                Err(e) => Response::error(e),
            },
            Request::DomStats { domains, groups, active } => {
                let groups = if groups == 0 { rvirt_domain::protocol::StatGroups::ALL } else { groups };
                let briefs: Result<Vec<DomainBrief>, String> = if domains.is_empty() {
                    Ok(self.briefs(false).into_iter().filter(|b| !active || b.id.is_some()).collect())
                } else {
                    domains.iter().map(|k| self.brief(k)).collect()
                };
                match briefs {
                    Ok(bs) => {
                        let stats = bs.iter().map(|b| rvirt_domain::protocol::DomainStats { name: b.name.clone(), fields: self.domain_stats(b, groups) }).collect();
                        Response { dom_stats: Some(stats), ..Response::ok() }
                    }
                    Err(e) => Response::error(e),
                }
            }
            Request::DevStat { domain, device } => match self.device_counters(&domain, &device) {
                Ok(c) => Response { counters: Some(c), ..Response::ok() },
                Err(e) => Response::error(e),
            },
            net @ (Request::NetList { .. }
            | Request::NetDefine { .. }
            | Request::NetUndefine { .. }
            | Request::NetStart { .. }
            | Request::NetDestroy { .. }
            | Request::NetDumpXml { .. }
            | Request::NetAutostart { .. }
            | Request::NetUpdate { .. }
            | Request::NetDhcpLeases { .. }) => self.networks.handle(net),
            storage @ (Request::PoolList { .. }
            | Request::PoolDefine { .. }
            | Request::PoolBuild { .. }
            | Request::PoolStart { .. }
            | Request::PoolDestroy { .. }
            | Request::PoolDelete { .. }
            | Request::PoolUndefine { .. }
            | Request::PoolAutostart { .. }
            | Request::PoolDumpXml { .. }
            | Request::VolList { .. }
            | Request::VolCreate { .. }
            | Request::VolDelete { .. }
            | Request::VolWipe { .. }
            | Request::VolResize { .. }
            | Request::VolDumpXml { .. }) => self.pools.handle(storage),
        }
    }
}
