//! The management protocol between `rvirt` and `rvirtd`: one JSON request
//! per line on the daemon's unix socket, one JSON response line back. The
//! connection stays open for more requests. See docs/rvirtd.md.

use serde::{Deserialize, Serialize};

mod snapshot;
pub use snapshot::{SnapshotCreateFlags, SnapshotFilter, SnapshotSummary};

/// Longest request line the daemon reads: the largest definition
/// ([`crate::MAX_XML_BYTES`]) with room for JSON escaping.
pub const MAX_REQUEST_BYTES: usize = 8 << 20;

/// Default state directory of the daemon.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/rvirt";
/// Default socket of the daemon.
pub const DEFAULT_SOCKET: &str = "/run/rvirt/rvirtd.sock";

/// A request. `domain` names a domain by name, id or UUID, as virsh does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Domains: running ones, or all with `all`.
    List {
        /// Include inactive domains.
        #[serde(default)]
        all: bool,
    },
    /// Store a definition (new, or replacing the one with the same name and UUID).
    Define {
        /// Domain XML.
        xml: String,
    },
    /// Start a domain that is not stored (gone when it stops).
    Create {
        /// Domain XML.
        xml: String,
    },
    /// Remove a stopped domain's definition.
    Undefine {
        /// Name, id or UUID.
        domain: String,
        /// Also remove its managed save (refused without, as libvirt).
        #[serde(default)]
        managed_save: bool,
        /// Also forget its snapshots' metadata (refused without, as libvirt).
        #[serde(default)]
        snapshots_metadata: bool,
    },
    /// Start a defined domain.
    Start {
        /// Name, id or UUID.
        domain: String,
    },
    /// Press the ACPI power button; with a timeout, wait until the domain is shut off.
    Shutdown {
        /// Name, id or UUID.
        domain: String,
        /// Seconds to wait for the guest to power off (none: do not wait).
        #[serde(default)]
        timeout_seconds: Option<u64>,
    },
    /// Stop a domain at once.
    Destroy {
        /// Name, id or UUID.
        domain: String,
    },
    /// Ask the guest to power off, then start it again.
    Reboot {
        /// Name, id or UUID.
        domain: String,
    },
    /// Pause the vCPUs.
    Suspend {
        /// Name, id or UUID.
        domain: String,
    },
    /// Let paused vCPUs run.
    Resume {
        /// Name, id or UUID.
        domain: String,
    },
    /// The domain's XML: the one it runs with, or the stored one with `inactive`.
    DumpXml {
        /// Name, id or UUID.
        domain: String,
        /// The stored definition (the next start) rather than the running one.
        #[serde(default)]
        inactive: bool,
    },
    /// Facts about a domain.
    DomInfo {
        /// Name, id or UUID.
        domain: String,
    },
    /// A domain's state and why it is in it.
    DomState {
        /// Name, id or UUID.
        domain: String,
    },
    /// Start the domain when the daemon starts (or stop doing so).
    Autostart {
        /// Name, id or UUID.
        domain: String,
        /// On or off.
        enable: bool,
    },
    /// Where the domain's serial console is (a pty path).
    Console {
        /// Name, id or UUID.
        domain: String,
    },
    /// Eject the disc of a running domain's CD-ROM drive, or insert one (virsh change-media).
    ChangeMedia {
        /// Name, id or UUID.
        domain: String,
        /// The drive's `<target dev>` (`hdc`, `sdb`, ...).
        target: String,
        /// The image to insert; none ejects.
        #[serde(default)]
        path: Option<std::path::PathBuf>,
        /// Eject even though the guest locked the tray.
        #[serde(default)]
        force: bool,
    },
    /// A domain's addresses, from its networks' leases (virsh domifaddr).
    DomIfAddr {
        /// Name, id or UUID.
        domain: String,
    },
    /// Set the memory the guest has: live through the balloon, or in the
    /// stored definition (`<currentMemory>`) (virsh setmem).
    SetMemory {
        /// Name, id or UUID.
        domain: String,
        /// KiB.
        kib: u64,
        /// Change the running domain (with neither flag: running ? live : config).
        #[serde(default)]
        live: bool,
        /// Change the stored definition.
        #[serde(default)]
        config: bool,
    },
    /// Set `<memory>`, the most the guest may have (virsh setmaxmem); stored definitions only.
    SetMaxMemory {
        /// Name, id or UUID.
        domain: String,
        /// KiB.
        kib: u64,
        /// Change the running domain (refused: no memory hotplug).
        #[serde(default)]
        live: bool,
        /// Change the stored definition.
        #[serde(default)]
        config: bool,
    },
    /// Set the number of vCPUs (virsh setvcpus); stored definitions only.
    SetVcpus {
        /// Name, id or UUID.
        domain: String,
        /// vCPUs.
        count: u32,
        /// Change the running domain (refused: no vCPU hotplug).
        #[serde(default)]
        live: bool,
        /// Change the stored definition.
        #[serde(default)]
        config: bool,
    },
    /// vCPU counts of the stored and the running definition (virsh vcpucount).
    VcpuCount {
        /// Name, id or UUID.
        domain: String,
    },
    /// Each vCPU's thread: state, host CPU, CPU time, affinity (virsh vcpuinfo).
    VcpuInfo {
        /// Name, id or UUID.
        domain: String,
    },
    /// Press a running domain's reset button (virsh reset).
    Reset {
        /// Name, id or UUID.
        domain: String,
    },
    /// Take a snapshot from `<domainsnapshot>` XML (`snapshot-create`,
    /// `snapshot-create-as`), or store one given whole (`--redefine`).
    SnapshotCreate {
        /// Name, id or UUID.
        domain: String,
        /// The `<domainsnapshot>`.
        xml: String,
        /// How.
        #[serde(default)]
        flags: SnapshotCreateFlags,
    },
    /// A domain's snapshots (`snapshot-list`), parents first.
    SnapshotList {
        /// Name, id or UUID.
        domain: String,
        /// Which.
        #[serde(default)]
        filter: SnapshotFilter,
    },
    /// One snapshot's XML (`snapshot-dumpxml`).
    SnapshotDumpXml {
        /// Name, id or UUID.
        domain: String,
        /// The snapshot's name.
        snapshot: String,
    },
    /// Make a snapshot's moment the domain's again (`snapshot-revert`):
    /// its disks, its definition and, when it was taken running, its
    /// memory, running or paused as it was.
    SnapshotRevert {
        /// Name, id or UUID.
        domain: String,
        /// The snapshot's name.
        snapshot: String,
        /// `--running`: run afterwards, whatever the snapshot's state.
        #[serde(default)]
        running: bool,
        /// `--paused`: paused afterwards.
        #[serde(default)]
        paused: bool,
    },
    /// Delete a snapshot (`snapshot-delete`).
    SnapshotDelete {
        /// Name, id or UUID.
        domain: String,
        /// The snapshot's name.
        snapshot: String,
        /// `--children`: and everything below it.
        #[serde(default)]
        children: bool,
        /// `--children-only`: only what is below it.
        #[serde(default)]
        children_only: bool,
        /// `--metadata`: only rvirtd's record; the images keep theirs.
        #[serde(default)]
        metadata_only: bool,
    },
    /// Save a running domain's memory and state to a file and stop it (`save`).
    Save {
        /// Name, id or UUID.
        domain: String,
        /// The file (absolute).
        path: std::path::PathBuf,
        /// `--running` / `--paused`: how `restore` leaves it (default: as it was).
        #[serde(default)]
        running: bool,
        /// See `running`.
        #[serde(default)]
        paused: bool,
    },
    /// Run a domain again from a file `save` wrote (`restore`).
    Restore {
        /// The file (absolute).
        path: std::path::PathBuf,
        /// `--running`: run whatever it was.
        #[serde(default)]
        running: bool,
        /// `--paused`: stay paused.
        #[serde(default)]
        paused: bool,
    },
    /// Save a running domain where rvirtd keeps it and stop it; the next
    /// `start` continues it (`managedsave`).
    ManagedSave {
        /// Name, id or UUID.
        domain: String,
        /// `--running`: the next start runs it whatever it was.
        #[serde(default)]
        running: bool,
        /// `--paused`: the next start leaves it paused.
        #[serde(default)]
        paused: bool,
    },
    /// Drop a managed save: the next start boots afresh (`managedsave-remove`).
    ManagedSaveRemove {
        /// Name, id or UUID.
        domain: String,
    },
    /// Rename a stopped domain (virsh domrename).
    Rename {
        /// Name, id or UUID.
        domain: String,
        /// The new name.
        new_name: String,
    },
    /// Read or set `<description>` or `<title>` (virsh desc).
    Desc {
        /// Name, id or UUID.
        domain: String,
        /// The title rather than the description.
        #[serde(default)]
        title: bool,
        /// The new text (none: read it; empty: remove it).
        #[serde(default)]
        set: Option<String>,
        /// The running domain's.
        #[serde(default)]
        live: bool,
        /// The stored definition's.
        #[serde(default)]
        config: bool,
    },
    /// Read, set or remove an application's element in `<metadata>` (virsh metadata).
    Metadata {
        /// Name, id or UUID.
        domain: String,
        /// The application's namespace URI.
        uri: String,
        /// The namespace prefix to store it under (needed to set).
        #[serde(default)]
        key: Option<String>,
        /// The element to store (none: read it).
        #[serde(default)]
        set: Option<String>,
        /// Remove the element.
        #[serde(default)]
        remove: bool,
        /// The running domain's.
        #[serde(default)]
        live: bool,
        /// The stored definition's.
        #[serde(default)]
        config: bool,
    },
    /// Add a `<disk>` or `<interface>` to the stored definition (virsh attach-device --config).
    AttachDevice {
        /// Name, id or UUID.
        domain: String,
        /// The device's XML.
        xml: String,
        /// Hotplug into the running domain (refused: a later release).
        #[serde(default)]
        live: bool,
        /// Change the stored definition.
        #[serde(default)]
        config: bool,
    },
    /// Remove a `<disk>` (by target) or `<interface>` (by MAC) from the stored definition.
    DetachDevice {
        /// Name, id or UUID.
        domain: String,
        /// The device's XML.
        xml: String,
        /// Unplug from the running domain (refused: a later release).
        #[serde(default)]
        live: bool,
        /// Change the stored definition.
        #[serde(default)]
        config: bool,
    },
    /// Plug a network card's cable in or out (virsh domif-setlink).
    SetLink {
        /// Name, id or UUID.
        domain: String,
        /// The card: its tap (target dev) or MAC address.
        interface: String,
        /// Up or down.
        up: bool,
        /// The running domain's.
        #[serde(default)]
        live: bool,
        /// The stored definition's.
        #[serde(default)]
        config: bool,
    },
    /// A running domain's memory figures: balloon, RSS, the guest's own (virsh dommemstat).
    MemStat {
        /// Name, id or UUID.
        domain: String,
    },
    /// A disk's size, allocation and host file size (virsh domblkinfo).
    BlkInfo {
        /// Name, id or UUID.
        domain: String,
        /// The disk's target (`vda`) or source path.
        disk: String,
    },
    /// Figures of domains by group (virsh domstats): the named domains, or
    /// all (only active ones with `active`).
    DomStats {
        /// Names, ids or UUIDs; none: every domain.
        #[serde(default)]
        domains: Vec<String>,
        /// [`StatGroups`] bits; 0: every group.
        #[serde(default)]
        groups: u32,
        /// With no domains named: only running (and paused) ones.
        #[serde(default)]
        active: bool,
    },
    /// A running domain's counters of one disk or card (virsh domblkstat, domifstat).
    DevStat {
        /// Name, id or UUID.
        domain: String,
        /// A disk's target or path, a card's tap or MAC.
        device: String,
    },
    /// Networks: active ones, or all with `all`.
    NetList {
        /// Include inactive networks.
        #[serde(default)]
        all: bool,
    },
    /// Store a network definition (new, or replacing the one with the same name).
    NetDefine {
        /// Network XML.
        xml: String,
    },
    /// Remove a network's definition (an active one stays up, transient).
    NetUndefine {
        /// Name or UUID.
        network: String,
    },
    /// Bring a defined network up.
    NetStart {
        /// Name or UUID.
        network: String,
    },
    /// Take a network down.
    NetDestroy {
        /// Name or UUID.
        network: String,
    },
    /// The network's XML: the one it runs with, or the stored one with `inactive`.
    NetDumpXml {
        /// Name or UUID.
        network: String,
        /// The stored definition rather than the running one.
        #[serde(default)]
        inactive: bool,
    },
    /// Change a network's fixed leases or DNS names (virsh net-update ... ip-dhcp-host|ip-dhcp-range|dns-host).
    NetUpdate {
        /// Name or UUID.
        network: String,
        /// `add` (= `add-last`), `add-first`, `modify` or `delete`.
        action: String,
        /// The section; rvirt changes `ip-dhcp-host`, `ip-dhcp-range` and `dns-host`.
        section: String,
        /// The `<host mac name ip/>`, `<range start end/>` or `<host ip><hostname>` element.
        xml: String,
        /// Change the running network.
        #[serde(default)]
        live: bool,
        /// Change the stored definition.
        #[serde(default)]
        config: bool,
    },
    /// Start the network when the daemon starts (or stop doing so).
    NetAutostart {
        /// Name or UUID.
        network: String,
        /// On or off.
        enable: bool,
    },
    /// The leases an active network handed out.
    NetDhcpLeases {
        /// Name or UUID.
        network: String,
    },
    /// Storage pools, with their sizes: active ones, or all with `all`.
    PoolList {
        /// Include inactive pools.
        #[serde(default)]
        all: bool,
    },
    /// Store a pool definition (new, or replacing the one with the same name).
    PoolDefine {
        /// Pool XML.
        xml: String,
    },
    /// Make a defined pool's directory.
    PoolBuild {
        /// Name or UUID.
        pool: String,
    },
    /// Start a defined pool.
    PoolStart {
        /// Name or UUID.
        pool: String,
        /// Make its directory first.
        #[serde(default)]
        build: bool,
    },
    /// Stop using a pool (its files stay).
    PoolDestroy {
        /// Name or UUID.
        pool: String,
    },
    /// Remove an inactive pool's directory, which must be empty.
    PoolDelete {
        /// Name or UUID.
        pool: String,
    },
    /// Forget a pool's definition (an active one stays, transient).
    PoolUndefine {
        /// Name or UUID.
        pool: String,
    },
    /// Start the pool when the daemon starts (or stop doing so).
    PoolAutostart {
        /// Name or UUID.
        pool: String,
        /// On or off.
        enable: bool,
    },
    /// The pool's XML.
    PoolDumpXml {
        /// Name or UUID.
        pool: String,
    },
    /// The volumes of an active pool, with their sizes.
    VolList {
        /// Name or UUID of the pool.
        pool: String,
    },
    /// Create a volume from volume XML, or as a copy of another volume of the pool.
    VolCreate {
        /// Name or UUID of the pool.
        pool: String,
        /// Volume XML.
        xml: String,
        /// The volume to copy.
        #[serde(default)]
        clone_of: Option<String>,
        /// qcow2: map every cluster up front (`--prealloc-metadata`).
        #[serde(default)]
        prealloc_metadata: bool,
    },
    /// Delete a volume's file.
    VolDelete {
        /// Name or UUID of the pool.
        pool: String,
        /// The volume's name.
        volume: String,
    },
    /// Overwrite a volume with zeros.
    VolWipe {
        /// Name or UUID of the pool.
        pool: String,
        /// The volume's name.
        volume: String,
    },
    /// Change a volume's capacity.
    VolResize {
        /// Name or UUID of the pool.
        pool: String,
        /// The volume's name.
        volume: String,
        /// The new capacity in bytes (or the change, with `delta`).
        capacity: u64,
        /// `capacity` is added (or, with `shrink`, taken away).
        #[serde(default)]
        delta: bool,
        /// It may get smaller.
        #[serde(default)]
        shrink: bool,
        /// Reserve the new space on the host.
        #[serde(default)]
        allocate: bool,
    },
    /// A volume's XML.
    VolDumpXml {
        /// Name or UUID of the pool.
        pool: String,
        /// The volume's name.
        volume: String,
    },
}

impl Request {
    /// The command's name, as on the wire (`list`, `start`, ...), for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::List { .. } => "list",
            Self::Define { .. } => "define",
            Self::Create { .. } => "create",
            Self::Undefine { .. } => "undefine",
            Self::Start { .. } => "start",
            Self::Shutdown { .. } => "shutdown",
            Self::Destroy { .. } => "destroy",
            Self::Reboot { .. } => "reboot",
            Self::Suspend { .. } => "suspend",
            Self::Resume { .. } => "resume",
            Self::DumpXml { .. } => "dump-xml",
            Self::DomInfo { .. } => "dom-info",
            Self::DomState { .. } => "dom-state",
            Self::Autostart { .. } => "autostart",
            Self::Console { .. } => "console",
            Self::ChangeMedia { .. } => "change-media",
            Self::DomIfAddr { .. } => "dom-if-addr",
            Self::SetMemory { .. } => "set-memory",
            Self::SetMaxMemory { .. } => "set-max-memory",
            Self::SetVcpus { .. } => "set-vcpus",
            Self::VcpuCount { .. } => "vcpu-count",
            Self::VcpuInfo { .. } => "vcpu-info",
            Self::Reset { .. } => "reset",
            Self::Rename { .. } => "rename",
            Self::SnapshotCreate { .. } => "snapshot-create",
            Self::SnapshotList { .. } => "snapshot-list",
            Self::SnapshotDumpXml { .. } => "snapshot-dump-xml",
            Self::SnapshotRevert { .. } => "snapshot-revert",
            Self::SnapshotDelete { .. } => "snapshot-delete",
            Self::Save { .. } => "save",
            Self::Restore { .. } => "restore",
            Self::ManagedSave { .. } => "managed-save",
            Self::ManagedSaveRemove { .. } => "managed-save-remove",
            Self::Desc { .. } => "desc",
            Self::Metadata { .. } => "metadata",
            Self::AttachDevice { .. } => "attach-device",
            Self::DetachDevice { .. } => "detach-device",
            Self::SetLink { .. } => "set-link",
            Self::MemStat { .. } => "mem-stat",
            Self::BlkInfo { .. } => "blk-info",
            Self::DevStat { .. } => "dev-stat",
            Self::DomStats { .. } => "dom-stats",
            Self::NetList { .. } => "net-list",
            Self::NetDefine { .. } => "net-define",
            Self::NetUndefine { .. } => "net-undefine",
            Self::NetStart { .. } => "net-start",
            Self::NetDestroy { .. } => "net-destroy",
            Self::NetDumpXml { .. } => "net-dump-xml",
            Self::NetAutostart { .. } => "net-autostart",
            Self::NetUpdate { .. } => "net-update",
            Self::NetDhcpLeases { .. } => "net-dhcp-leases",
            Self::PoolList { .. } => "pool-list",
            Self::PoolDefine { .. } => "pool-define",
            Self::PoolBuild { .. } => "pool-build",
            Self::PoolStart { .. } => "pool-start",
            Self::PoolDestroy { .. } => "pool-destroy",
            Self::PoolDelete { .. } => "pool-delete",
            Self::PoolUndefine { .. } => "pool-undefine",
            Self::PoolAutostart { .. } => "pool-autostart",
            Self::PoolDumpXml { .. } => "pool-dump-xml",
            Self::VolList { .. } => "vol-list",
            Self::VolCreate { .. } => "vol-create",
            Self::VolDelete { .. } => "vol-delete",
            Self::VolWipe { .. } => "vol-wipe",
            Self::VolResize { .. } => "vol-resize",
            Self::VolDumpXml { .. } => "vol-dump-xml",
        }
    }

    /// Whether the request only reads (the read-only socket answers it).
    /// The console is not: it types into the guest.
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Self::List { .. }
                | Self::DumpXml { .. }
                | Self::DomInfo { .. }
                | Self::DomState { .. }
                | Self::DomIfAddr { .. }
                | Self::VcpuCount { .. }
                | Self::VcpuInfo { .. }
                | Self::Desc { set: None, .. }
                | Self::Metadata { set: None, remove: false, .. }
                | Self::MemStat { .. }
                | Self::BlkInfo { .. }
                | Self::DevStat { .. }
                | Self::DomStats { .. }
                | Self::NetList { .. }
                | Self::NetDumpXml { .. }
                | Self::NetDhcpLeases { .. }
                | Self::PoolList { .. }
                | Self::PoolDumpXml { .. }
                | Self::VolList { .. }
                | Self::VolDumpXml { .. }
                | Self::SnapshotList { .. }
                | Self::SnapshotDumpXml { .. }
        )
    }
}

/// Default read-only socket of the daemon.
pub const DEFAULT_RO_SOCKET: &str = "/run/rvirt/rvirtd-ro.sock";

/// A domain's state, named as virsh names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomainState {
    /// The VMM runs the guest.
    Running,
    /// The guest's vCPUs are paused.
    Paused,
    /// Not running.
    ShutOff,
    /// The guest or its VMM crashed and `on_crash` is `preserve`.
    Crashed,
}

impl DomainState {
    /// virsh's words.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::ShutOff => "shut off",
            Self::Crashed => "crashed",
        }
    }

    /// Whether a VMM process exists for the domain.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Running | Self::Paused)
    }
}

impl std::fmt::Display for DomainState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of `list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainSummary {
    /// Id while active.
    pub id: Option<u32>,
    /// Name.
    pub name: String,
    /// State.
    pub state: DomainState,
    /// UUID (`list --uuid`).
    #[serde(default)]
    pub uuid: String,
    /// Whether the definition is stored (`list --persistent`, `--transient`).
    #[serde(default)]
    pub persistent: bool,
    /// Whether it starts with the daemon (`list --autostart`).
    #[serde(default)]
    pub autostart: bool,
    /// Whether the next start continues a managed save (`list --with-managed-save`).
    #[serde(default)]
    pub managed_save: bool,
    /// How many snapshots it has (`list --with-snapshot`).
    #[serde(default)]
    pub snapshots: u32,
}

/// Where a change goes, from a request's `live` and `config` flags (libvirt's
/// `--live`, `--config`, neither meaning `--current`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Affect {
    /// The running domain.
    pub live: bool,
    /// The stored definition.
    pub config: bool,
}

/// The answer to `vcpu-count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuCounts {
    /// The stored definition's (none for a transient domain).
    pub config: Option<u32>,
    /// The running domain's (none when stopped).
    pub live: Option<u32>,
}

/// One row of `vcpu-info`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuThread {
    /// The vCPU's number.
    pub vcpu: u32,
    /// `running`, `sleeping` (halted), ...
    pub state: String,
    /// The host CPU it last ran on.
    pub cpu: u32,
    /// CPU time it used, in seconds.
    pub cpu_seconds: f64,
    /// Host CPUs it may run on (`0-3,6`).
    pub affinity: String,
}

/// The groups of `dom-stats` figures, as bits (libvirt's numbers).
pub struct StatGroups;

impl StatGroups {
    /// `state.state`, `state.reason` (libvirt's numbers).
    pub const STATE: u32 = 1;
    /// `cpu.time` (ns).
    pub const CPU_TOTAL: u32 = 2;
    /// `balloon.*` (KiB, and the guest driver's figures).
    pub const BALLOON: u32 = 4;
    /// `vcpu.*`: counts, and each vCPU's state and time.
    pub const VCPU: u32 = 8;
    /// `net.*`: each card's frames and bytes.
    pub const INTERFACE: u32 = 16;
    /// `block.*`: each disk's requests, bytes and errors.
    pub const BLOCK: u32 = 32;
    /// Every group rvirt serves.
    pub const ALL: u32 = 63;
}

/// One figure of `dom-stats`, typed as libvirt types it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StatValue {
    /// A signed int (states).
    Int(i32),
    /// An unsigned int (counts).
    UInt(u32),
    /// An unsigned 64-bit number (bytes, KiB, ns).
    ULLong(u64),
    /// Text (names, paths).
    Str(String),
}

impl std::fmt::Display for StatValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Int(v) => write!(f, "{v}"),
            Self::UInt(v) => write!(f, "{v}"),
            Self::ULLong(v) => write!(f, "{v}"),
            Self::Str(v) => f.write_str(v),
        }
    }
}

/// One domain's figures in `dom-stats`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainStats {
    /// The domain.
    pub name: String,
    /// Figures by libvirt's field names (`state.state`, `block.0.rd.bytes`, ...).
    pub fields: Vec<(String, StatValue)>,
}

/// The answer to `blk-info`, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockInfo {
    /// The guest's disk size.
    pub capacity: u64,
    /// Bytes the image occupies on the host.
    pub allocation: u64,
    /// The host file's (or device's) size.
    pub physical: u64,
}

/// The answer to `dev-stat`: a disk's or card's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCounters {
    /// Requests read from the disk (received frames).
    pub reads: u64,
    /// Bytes to the guest.
    pub read_bytes: u64,
    /// Requests written (sent frames).
    pub writes: u64,
    /// Bytes from the guest.
    pub write_bytes: u64,
    /// Failed requests.
    pub errors: u64,
}

/// The answer to `dom-state`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateReport {
    /// State.
    pub state: DomainState,
    /// Why (`booted`, `shutdown`, `destroyed`, `crashed`, `user`, ...).
    pub reason: String,
}

/// The answer to `dom-info`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainInfo {
    /// Id while active.
    pub id: Option<u32>,
    /// Name.
    pub name: String,
    /// UUID.
    pub uuid: String,
    /// Always `hvm`.
    pub os_type: String,
    /// State.
    pub state: DomainState,
    /// Why it is in that state.
    pub reason: String,
    /// vCPUs.
    pub vcpus: u32,
    /// `<memory>` in KiB.
    pub max_memory_kib: u64,
    /// Memory the guest has now (after ballooning) in KiB.
    pub used_memory_kib: u64,
    /// Whether the definition is stored.
    pub persistent: bool,
    /// Whether it starts with the daemon.
    pub autostart: bool,
    /// CPU seconds the VMM used, while active.
    pub cpu_time_seconds: Option<f64>,
    /// The VMM's process ID, while active.
    pub pid: Option<u32>,
}

/// A response. `ok` says whether the request was carried out; the other
/// fields are present when the request produces them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Success.
    pub ok: bool,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Things the user should know, like XML elements that have no effect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The domain the request acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domains: Option<Vec<DomainSummary>>,
    /// `dump-xml`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xml: Option<String>,
    /// `dom-info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<DomainInfo>,
    /// `dom-state`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<StateReport>,
    /// `console`: the pty to open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
    /// `net-list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<NetworkSummary>>,
    /// `net-dhcp-leases`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leases: Option<Vec<LeaseInfo>>,
    /// `pool-list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pools: Option<Vec<PoolSummary>>,
    /// `vol-list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Vec<VolumeSummary>>,
    /// `dom-if-addr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<Vec<InterfaceAddress>>,
    /// `vcpu-count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_counts: Option<VcpuCounts>,
    /// `vcpu-info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_threads: Option<Vec<VcpuThread>>,
    /// `desc`: the text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// `mem-stat`: figures by virsh's names (KiB, or counts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_stats: Option<Vec<(String, u64)>>,
    /// `blk-info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_info: Option<BlockInfo>,
    /// `dev-stat`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<DeviceCounters>,
    /// `dom-stats`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dom_stats: Option<Vec<DomainStats>>,
    /// `snapshot-list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<Vec<SnapshotSummary>>,
}

/// One address of `domifaddr`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceAddress {
    /// The card's tap.
    pub name: String,
    /// The card's MAC address.
    pub mac: String,
    /// The address with its prefix length.
    pub address: String,
}

/// One row of `net-list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSummary {
    /// Name.
    pub name: String,
    /// UUID.
    #[serde(default)]
    pub uuid: String,
    /// Up.
    pub active: bool,
    /// Starts with the daemon.
    pub autostart: bool,
    /// Its definition is stored.
    pub persistent: bool,
    /// Its bridge.
    pub bridge: String,
}

/// One row of `pool-list`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSummary {
    /// Name.
    pub name: String,
    /// UUID.
    pub uuid: String,
    /// Started.
    pub active: bool,
    /// Starts with the daemon.
    pub autostart: bool,
    /// Its definition is stored.
    pub persistent: bool,
    /// Its directory.
    pub target: String,
    /// Its filesystem's size in bytes (0 while inactive).
    pub capacity: u64,
    /// Bytes in use there.
    pub allocation: u64,
    /// Bytes free there.
    pub available: u64,
}

/// One row of `vol-list`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSummary {
    /// Its file name.
    pub name: String,
    /// Its path (and key).
    pub path: String,
    /// raw or qcow2.
    pub format: String,
    /// Virtual size in bytes.
    pub capacity: u64,
    /// Bytes allocated on the host.
    pub allocation: u64,
}

/// One lease of `net-dhcp-leases`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// When it expires, seconds since the epoch (0: never).
    pub expiry: i64,
    /// The client's MAC address.
    pub mac: String,
    /// The address with its prefix length (`10.0.0.5/24`).
    pub address: String,
    /// The name the client gave.
    pub hostname: Option<String>,
}

impl Response {
    /// A bare success.
    pub fn ok() -> Self {
        Self { ok: true, ..Default::default() }
    }

    /// Success naming the domain acted on.
    pub fn done(name: &str) -> Self {
        Self { ok: true, name: Some(name.to_string()), ..Default::default() }
    }

    /// A failure explained by `msg`.
    pub fn error(msg: impl Into<String>) -> Self {
        Self { ok: false, error: Some(msg.into()), ..Default::default() }
    }
}

/// Parses one request line, with an error a client can show as it is.
pub fn parse_request(line: &str) -> Result<Request, String> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(format!("request longer than {MAX_REQUEST_BYTES} bytes"));
    }
    serde_json::from_str(line).map_err(|e| format!("malformed request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_use_command_tags_and_reject_junk() {
        let r = parse_request(r#"{"command":"shutdown","domain":"web","timeout_seconds":30}"#).unwrap();
        assert_eq!(r, Request::Shutdown { domain: "web".into(), timeout_seconds: Some(30) });
        assert_eq!(parse_request(r#"{"command":"list"}"#).unwrap(), Request::List { all: false });
        for bad in ["", "{", r#"{"command":"fly"}"#, r#"{"command":"start"}"#, r#"{"command":"start","domain":"a","x":1}"#, "[1]"] {
            assert!(parse_request(bad).unwrap_err().starts_with("malformed request"), "{bad}");
        }
        assert!(parse_request(&"x".repeat(MAX_REQUEST_BYTES + 1)).unwrap_err().contains("longer"));
        let s = serde_json::to_string(&Response::error("no")).unwrap();
        assert_eq!(s, r#"{"ok":false,"error":"no"}"#);
        let s = serde_json::to_string(&DomainState::ShutOff).unwrap();
        assert_eq!(s, r#""shut-off""#);
    }
}
