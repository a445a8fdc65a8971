//! `rvirt`: the command line of rvirtd, with virsh's command names.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use rvirt_client::console::{self, Detach};
use rvirt_client::install::{self, InstallOptions};
use rvirt_client::everyday::EverydayCommand;
use rvirt_client::snapshots::SnapshotCommand;
use rvirt_client::storage::StorageCommand;
use rvirt_client::{format, Connection};
use rvirt_domain::protocol::{Request, Response, DEFAULT_SOCKET};

/// Manage rvirt domains through rvirtd (virsh's commands).
#[derive(Parser, Debug)]
#[command(name = "rvirt", version, about)]
struct Cli {
    /// The daemon: its socket, or a URI as virsh takes them (qemu:///system,
    /// qemu+tls://HOST[:PORT]/system?pkipath=DIR, qemu+ssh://USER@HOST/system).
    #[arg(short = 'c', long, value_name = "PATH|URI", global = true, default_value = DEFAULT_SOCKET, env = "RVIRT_CONNECT")]
    connect: String,
    /// Print the daemon's JSON response instead of text (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// `list`'s filters and layouts (virsh's).
#[derive(Args, Debug, Default, Clone)]
struct ListArgs {
    /// Inactive domains too.
    #[arg(long)]
    all: bool,
    /// Only inactive domains.
    #[arg(long)]
    inactive: bool,
    /// Only running domains.
    #[arg(long)]
    state_running: bool,
    /// Only paused domains.
    #[arg(long)]
    state_paused: bool,
    /// Only shut off domains.
    #[arg(long)]
    state_shutoff: bool,
    /// Only domains in another state (crashed).
    #[arg(long)]
    state_other: bool,
    /// Only domains with a stored definition.
    #[arg(long)]
    persistent: bool,
    /// Only domains without one.
    #[arg(long)]
    transient: bool,
    /// Only domains that start with the daemon.
    #[arg(long)]
    autostart: bool,
    /// Only domains that do not.
    #[arg(long)]
    no_autostart: bool,
    /// Print names only, one per line.
    #[arg(long)]
    name: bool,
    /// Print UUIDs only, one per line.
    #[arg(long, conflicts_with = "name")]
    uuid: bool,
    /// Only domains with a managed save.
    #[arg(long)]
    with_managed_save: bool,
    /// Only domains without one.
    #[arg(long)]
    without_managed_save: bool,
    /// Only domains with snapshots.
    #[arg(long)]
    with_snapshot: bool,
    /// Only domains without.
    #[arg(long)]
    without_snapshot: bool,
}

impl ListArgs {
    /// Whether the filters need inactive domains from the daemon.
    fn wants_inactive(&self) -> bool {
        self.all
            || self.inactive
            || self.state_shutoff
            || self.persistent
            || self.transient
            || self.autostart
            || self.no_autostart
            || self.with_managed_save
            || self.without_managed_save
            || self.with_snapshot
            || self.without_snapshot
    }

    /// The rows these filters keep, printed as asked.
    fn show(&self, rows: &[rvirt_domain::protocol::DomainSummary]) -> String {
        use rvirt_domain::protocol::DomainState as S;
        let states = [(self.state_running, S::Running), (self.state_paused, S::Paused), (self.state_shutoff, S::ShutOff), (self.state_other, S::Crashed)];
        let any_state = states.iter().any(|(on, _)| *on);
        let kept: Vec<_> = rows
            .iter()
            .filter(|r| !self.inactive || r.id.is_none())
            .filter(|r| !any_state || states.iter().any(|(on, s)| *on && r.state == *s))
            .filter(|r| !(self.persistent && !r.persistent) && !(self.transient && r.persistent))
            .filter(|r| !(self.autostart && !r.autostart) && !(self.no_autostart && r.autostart))
            .filter(|r| !(self.with_managed_save && !r.managed_save) && !(self.without_managed_save && r.managed_save))
            .filter(|r| !(self.with_snapshot && r.snapshots == 0) && !(self.without_snapshot && r.snapshots > 0))
            .cloned()
            .collect();
        if self.name || self.uuid {
            let mut out: String = kept.iter().map(|r| format!("{}\n", if self.name { &r.name } else { &r.uuid })).collect();
            out.push('\n');
            return out;
        }
        format::list(&kept)
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List running domains (all with --all), filtered as virsh filters.
    List(ListArgs),
    /// Define (or update) a domain from an XML file.
    Define {
        /// Domain XML file.
        file: PathBuf,
    },
    /// Remove a stopped domain's definition.
    Undefine {
        /// Name, id or UUID.
        domain: String,
        /// Also remove its managed save.
        #[arg(long)]
        managed_save: bool,
        /// Also forget its snapshots (their data stays in the images).
        #[arg(long)]
        snapshots_metadata: bool,
    },
    /// Start a defined domain.
    Start {
        /// Name, id or UUID.
        domain: String,
    },
    /// Ask the guest to power off (ACPI power button).
    Shutdown {
        /// Name, id or UUID.
        domain: String,
        /// Wait up to this many seconds for the domain to be shut off.
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
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
    /// Pause a domain's vCPUs.
    Suspend {
        /// Name, id or UUID.
        domain: String,
    },
    /// Resume a paused domain.
    Resume {
        /// Name, id or UUID.
        domain: String,
    },
    /// Print a domain's XML.
    Dumpxml {
        /// Name, id or UUID.
        domain: String,
        /// The stored definition (the next start) rather than the running one.
        #[arg(long)]
        inactive: bool,
    },
    /// Edit a domain's XML in $EDITOR; saved only if valid.
    Edit {
        /// Name, id or UUID.
        domain: String,
    },
    /// Facts about a domain.
    Dominfo {
        /// Name, id or UUID.
        domain: String,
    },
    /// A domain's state.
    Domstate {
        /// Name, id or UUID.
        domain: String,
        /// Also say why.
        #[arg(long)]
        reason: bool,
    },
    /// Start a domain with the daemon (--disable: stop doing so).
    Autostart {
        /// Name, id or UUID.
        domain: String,
        /// Turn autostart off.
        #[arg(long)]
        disable: bool,
    },
    /// Attach to a domain's serial console; Ctrl-] detaches.
    Console {
        /// Name, id or UUID.
        domain: String,
    },
    /// Eject or insert the disc of a running domain's CD-ROM drive (virsh change-media).
    ChangeMedia {
        /// Name, id or UUID.
        domain: String,
        /// The drive's target (hdc, sdb, ...).
        target: String,
        /// Take the disc out.
        #[arg(long, conflicts_with = "insert", required_unless_present = "insert")]
        eject: bool,
        /// Put this image in.
        #[arg(long, value_name = "PATH")]
        insert: Option<PathBuf>,
        /// Eject even though the guest locked the tray.
        #[arg(long)]
        force: bool,
    },
    /// Start a transient domain from an XML file (not stored).
    Create {
        /// Domain XML file.
        file: PathBuf,
    },
    /// Write a domain definition from options, define it and start it (virt-install).
    Install(InstallArgs),
    /// A domain's addresses, from the leases of its networks.
    Domifaddr {
        /// Name, id or UUID.
        domain: String,
    },
    /// List active networks (all with --all).
    NetList {
        /// Inactive networks too.
        #[arg(long)]
        all: bool,
    },
    /// Define (or update) a network from an XML file.
    NetDefine {
        /// Network XML file.
        file: PathBuf,
    },
    /// Remove a network's definition.
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
    /// Print a network's XML (the one it runs with; --inactive: the stored one).
    NetDumpxml {
        /// Name or UUID.
        network: String,
        /// The stored definition, which its next start uses.
        #[arg(long)]
        inactive: bool,
    },
    /// Facts about a network.
    NetInfo {
        /// Name or UUID.
        network: String,
    },
    /// Edit a network's stored definition in $EDITOR; saved only when valid.
    NetEdit {
        /// Name or UUID.
        network: String,
    },
    /// Change a network's fixed leases, DHCP ranges or DNS names: ACTION (add, add-first, add-last,
    /// modify, delete) of SECTION ip-dhcp-host (XML <host mac name ip/>), ip-dhcp-range
    /// (<range start end/>) or dns-host (<host ip><hostname>NAME</hostname></host>).
    NetUpdate {
        /// Name or UUID.
        network: String,
        /// add, add-first, add-last, modify or delete.
        action: String,
        /// ip-dhcp-host, ip-dhcp-range or dns-host.
        section: String,
        /// The <host .../> element.
        xml: String,
        /// Change the running network (dnsmasq re-reads its hosts).
        #[arg(long)]
        live: bool,
        /// Change the stored definition.
        #[arg(long)]
        config: bool,
    },
    /// Start the network with the daemon (or stop doing so with --disable).
    NetAutostart {
        /// Name or UUID.
        network: String,
        /// Stop autostarting it.
        #[arg(long)]
        disable: bool,
    },
    /// The leases an active network handed out.
    NetDhcpLeases {
        /// Name or UUID.
        network: String,
    },
    #[command(flatten)]
    Everyday(EverydayCommand),
    #[command(flatten)]
    Snapshots(SnapshotCommand),
    #[command(flatten)]
    Storage(StorageCommand),
}

/// The options of `rvirt install`.
#[derive(Args, Debug)]
struct InstallArgs {
    /// Domain name.
    #[arg(long)]
    name: String,
    /// RAM in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 512)]
    memory: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Kernel to boot directly.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["import", "cdrom"], conflicts_with_all = ["import", "cdrom"])]
    kernel: Option<PathBuf>,
    /// Initramfs (with --kernel).
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line (with --kernel).
    #[arg(long, alias = "extra-args", value_name = "STR", requires = "kernel")]
    cmdline: Option<String>,
    /// Boot the first disk's own bootloader through firmware (SeaBIOS), as
    /// virt-install --import: the disk already holds an installed system.
    #[arg(long)]
    import: bool,
    /// An installer ISO in a CD-ROM drive: it boots while the disk has no bootloader.
    #[arg(long, value_name = "ISO")]
    cdrom: Option<PathBuf>,
    /// user-data=FILE[,meta-data=FILE][,network-config=FILE]: a cloud-init NoCloud seed is built and attached.
    #[arg(long, value_name = "SPEC")]
    cloud_init: Option<String>,
    /// Accepted for virt-install's sake (rvirt has one machine type).
    #[arg(long, value_name = "NAME")]
    os_variant: Option<String>,
    /// path=FILE[,size=GiB][,format=raw|qcow2][,readonly=on][,serial=S][,cache=none] (repeatable).
    #[arg(long, value_name = "SPEC")]
    disk: Vec<String>,
    /// network=NET, bridge=BR or tap=NAME, each [,mac=M], or none
    /// (repeatable) [default: network=default when the daemon has that network].
    #[arg(long, value_name = "SPEC")]
    network: Vec<String>,
    /// Add a virtio entropy device.
    #[arg(long)]
    rng: bool,
    /// Also start it with the daemon.
    #[arg(long)]
    autostart: bool,
    /// Print the XML and stop (nothing is defined).
    #[arg(long)]
    print_xml: bool,
}

fn read_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Prints a response's warnings on stderr.
fn warn(r: &Response) {
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
}

/// What `edit` and `net-edit` edit.
#[derive(Clone, Copy)]
enum Editable {
    Domain,
    Network,
}

fn edit(conn: &mut Connection, what: Editable, name: &str) -> Result<String> {
    let (dump, noun, quoted) = match what {
        Editable::Domain => (Request::DumpXml { domain: name.into(), inactive: true }, "Domain", format!("'{name}'")),
        // The stored definition: an edit applies at the network's next start.
        Editable::Network => (Request::NetDumpXml { network: name.into(), inactive: true }, "Network", name.to_string()),
    };
    let domain = name;
    let xml = conn.expect(&dump)?.xml.unwrap_or_default();
    let file = std::env::temp_dir().join(format!("rvirt-edit-{}-{domain}.xml", std::process::id()));
    // create_new: never follow something another user left at that path in /tmp.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&file)
        .and_then(|mut f| f.write_all(xml.as_bytes()))
        .with_context(|| format!("writing {}", file.display()))?;
    let editor = std::env::var("VISUAL").or_else(|_| std::env::var("EDITOR")).unwrap_or_else(|_| "vi".into());
    let result = (|| loop {
        let st = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{editor} \"$1\""))
            .arg("rvirt-edit")
            .arg(&file)
            .status()
            .with_context(|| format!("running the editor '{editor}'"))?;
        if !st.success() {
            bail!("the editor '{editor}' failed ({st}); the definition is unchanged");
        }
        let edited = read_file(&file)?;
        if edited == xml {
            return Ok(format!("{noun} {quoted} XML configuration not changed."));
        }
        let define = match what {
            Editable::Domain => Request::Define { xml: edited },
            Editable::Network => Request::NetDefine { xml: edited },
        };
        let r = conn.call(&define)?;
        if r.ok {
            warn(&r);
            return Ok(format!("{noun} {quoted} XML configuration edited."));
        }
        let err = r.error.unwrap_or_default();
        eprintln!("error: {err}");
        // Ask again only when someone is there to answer.
        if !std::io::stdin().is_terminal() {
            bail!("the edited XML is invalid; the definition is unchanged");
        }
        eprint!("Failed. Try again? [y,n]: ");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !answer.trim().eq_ignore_ascii_case("y") {
            bail!("the definition is unchanged");
        }
    })();
    let _ = std::fs::remove_file(&file);
    result
}

/// `rvirt install`: define from options and start (the daemon is not needed for --print-xml).
fn install_command(cli: &Cli, a: &InstallArgs) -> Result<()> {
    let o = InstallOptions {
        name: a.name.clone(),
        memory_mib: a.memory,
        vcpus: a.vcpus,
        kernel: a.kernel.clone(),
        import: a.import,
        cdrom: a.cdrom.clone(),
        cloud_init: a.cloud_init.clone(),
        initrd: a.initrd.clone(),
        cmdline: a.cmdline.clone(),
        disks: a.disk.clone(),
        networks: a.network.clone(),
        rng: a.rng,
    };
    if a.print_xml {
        print!("{}", install::build(&o)?.to_xml());
        return Ok(());
    }
    let mut conn = Connection::connect(&cli.connect)?;
    if conn.is_remote() {
        // Images and seeds would be probed and made on this host, not the daemon's.
        bail!(
            "rvirt install reads and creates disk images on this host; for a remote daemon write the definition with --print-xml, make the images on its host (rvirt-img) and run: rvirt --connect {} define FILE",
            cli.connect
        );
    }
    // As virt-install: without --network, the daemon's default network if it has one.
    let mut o = o;
    if o.networks.is_empty() {
        let nets = conn.expect(&Request::NetList { all: true })?.networks.unwrap_or_default();
        if nets.iter().any(|n| n.name == "default") {
            o.networks = vec!["network=default".into()];
        }
    }
    let def = install::build(&o)?;
    let r = conn.expect(&Request::Define { xml: def.to_xml() })?;
    warn(&r);
    if a.autostart {
        conn.expect(&Request::Autostart { domain: def.name.clone(), enable: true })?;
    }
    let r = conn.expect(&Request::Start { domain: def.name.clone() })?;
    emit(cli.json, &r, |_| format!("Domain '{}' defined and started\n", def.name))
}

/// Prints a response: as JSON with `--json`, else its warnings on stderr
/// and `text` on stdout.
fn emit(json: bool, r: &Response, text: impl FnOnce(&Response) -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        warn(r);
        print!("{}", text(r));
    }
    Ok(())
}

/// The domain a response names.
fn named(r: &Response) -> &str {
    r.name.as_deref().unwrap_or("")
}

/// How to print a command's response when not `--json`.
type Text = Box<dyn FnOnce(&Response) -> String>;

fn run(cli: Cli) -> Result<()> {
    let (req, text): (Request, Text) = match &cli.command {
        Command::Install(a) => return install_command(&cli, a),
        Command::Edit { domain } => {
            println!("{}", edit(&mut Connection::connect(&cli.connect)?, Editable::Domain, domain)?);
            return Ok(());
        }
        Command::Console { domain } => return console_command(&cli, domain),
        Command::ChangeMedia { domain, target, eject: _, insert, force } => {
            let path = insert.as_deref().map(|p| std::path::absolute(p)).transpose()?;
            // virsh's words.
            let what = if path.is_some() { "inserted" } else { "ejected" };
            let req = Request::ChangeMedia { domain: domain.clone(), target: target.clone(), path, force: *force };
            (req, Box::new(move |_: &Response| format!("Successfully {what} media.\n")))
        }
        Command::Everyday(cmd) => {
            let mut conn = Connection::connect(&cli.connect)?;
            return match rvirt_client::everyday::run(cmd, &mut conn)? {
                Ok((r, text)) => emit(cli.json, &r, text),
                Err(printed) => {
                    print!("{printed}");
                    Ok(())
                }
            };
        }
        Command::Snapshots(cmd) => return act(&cli, |conn| rvirt_client::snapshots::request(cmd, &mut |r| conn.expect(r))),
        Command::Storage(cmd) => return act(&cli, |conn| rvirt_client::storage::request(cmd, &mut |r| conn.expect(r))),
        Command::List(l) => {
            let all = l.wants_inactive();
            let l = l.clone();
            let shown: Box<dyn FnOnce(&Response) -> String> = Box::new(move |r: &Response| l.show(r.domains.as_deref().unwrap_or_default()));
            (Request::List { all }, shown)
        }
        Command::Define { file } => {
            let f = file.display().to_string();
            (Request::Define { xml: read_file(file)? }, Box::new(move |r: &Response| format!("Domain '{}' defined from {f}\n", named(r))))
        }
        Command::Create { file } => {
            let f = file.display().to_string();
            (Request::Create { xml: read_file(file)? }, Box::new(move |r: &Response| format!("Domain '{}' created from {f}\n", named(r))))
        }
        Command::Undefine { domain, managed_save, snapshots_metadata } => (
            Request::Undefine { domain: domain.clone(), managed_save: *managed_save, snapshots_metadata: *snapshots_metadata },
            Box::new(|r: &Response| format!("Domain '{}' has been undefined\n", named(r))),
        ),
        Command::Start { domain } => (Request::Start { domain: domain.clone() }, Box::new(|r: &Response| format!("Domain '{}' started\n", named(r)))),
        Command::Shutdown { domain, timeout } => {
            let how = if timeout.is_some() { "is shut off" } else { "is being shutdown" };
            (
                Request::Shutdown { domain: domain.clone(), timeout_seconds: *timeout },
                Box::new(move |r: &Response| format!("Domain '{}' {how}\n", named(r))),
            )
        }
        Command::Destroy { domain } => {
            (Request::Destroy { domain: domain.clone() }, Box::new(|r: &Response| format!("Domain '{}' destroyed\n", named(r))))
        }
        Command::Reboot { domain } => {
            (Request::Reboot { domain: domain.clone() }, Box::new(|r: &Response| format!("Domain '{}' is being rebooted\n", named(r))))
        }
        Command::Suspend { domain } => {
            (Request::Suspend { domain: domain.clone() }, Box::new(|r: &Response| format!("Domain '{}' suspended\n", named(r))))
        }
        Command::Resume { domain } => {
            (Request::Resume { domain: domain.clone() }, Box::new(|r: &Response| format!("Domain '{}' resumed\n", named(r))))
        }
        Command::Autostart { domain, disable } => {
            let how = if *disable { "unmarked" } else { "marked" };
            (
                Request::Autostart { domain: domain.clone(), enable: !disable },
                Box::new(move |r: &Response| format!("Domain '{}' {how} as autostarted\n", named(r))),
            )
        }
        Command::Dumpxml { domain, inactive } => {
            (Request::DumpXml { domain: domain.clone(), inactive: *inactive }, Box::new(|r: &Response| r.xml.clone().unwrap_or_default()))
        }
        Command::Dominfo { domain } => {
            (Request::DomInfo { domain: domain.clone() }, Box::new(|r: &Response| r.info.as_ref().map(format::info).unwrap_or_default()))
        }
        Command::Domifaddr { domain } => {
            (Request::DomIfAddr { domain: domain.clone() }, Box::new(|r: &Response| format::addresses(r.addresses.as_deref().unwrap_or_default())))
        }
        Command::NetList { all } => {
            (Request::NetList { all: *all }, Box::new(|r: &Response| format::net_list(r.networks.as_deref().unwrap_or_default())))
        }
        Command::NetDefine { file } => {
            let f = file.display().to_string();
            (Request::NetDefine { xml: read_file(file)? }, Box::new(move |r: &Response| format!("Network {} defined from {f}\n", named(r))))
        }
        Command::NetUndefine { network } => {
            (Request::NetUndefine { network: network.clone() }, Box::new(|r: &Response| format!("Network {} has been undefined\n", named(r))))
        }
        Command::NetStart { network } => (Request::NetStart { network: network.clone() }, Box::new(|r: &Response| format!("Network {} started\n", named(r)))),
        Command::NetDestroy { network } => {
            (Request::NetDestroy { network: network.clone() }, Box::new(|r: &Response| format!("Network {} destroyed\n", named(r))))
        }
        Command::NetDumpxml { network, inactive } => {
            (Request::NetDumpXml { network: network.clone(), inactive: *inactive }, Box::new(|r: &Response| r.xml.clone().unwrap_or_default()))
        }
        Command::NetInfo { network } => {
            let want = network.clone();
            (
                Request::NetList { all: true },
                Box::new(move |r: &Response| {
                    let rows = r.networks.as_deref().unwrap_or_default();
                    match rows.iter().find(|n| n.name == want || n.uuid.eq_ignore_ascii_case(&want)) {
                        Some(n) => format::net_info(n),
                        None => format!("no network with a matching name or uuid '{want}'\n"),
                    }
                }),
            )
        }
        Command::NetEdit { network } => {
            println!("{}", edit(&mut Connection::connect(&cli.connect)?, Editable::Network, network)?);
            return Ok(());
        }
        Command::NetUpdate { network, action, section, xml, live, config } => {
            let req = Request::NetUpdate { network: network.clone(), action: action.clone(), section: section.clone(), xml: xml.clone(), live: *live, config: *config };
            (req, Box::new(|r: &Response| format!("Updated network {}\n", named(r))))
        }
        Command::NetAutostart { network, disable } => {
            let how = if *disable { "unmarked" } else { "marked" };
            (
                Request::NetAutostart { network: network.clone(), enable: !disable },
                Box::new(move |r: &Response| format!("Network {} {how} as autostarted\n", named(r))),
            )
        }
        Command::NetDhcpLeases { network } => {
            (Request::NetDhcpLeases { network: network.clone() }, Box::new(|r: &Response| format::leases(r.leases.as_deref().unwrap_or_default())))
        }
        Command::Domstate { domain, reason } => {
            let reason = *reason;
            (
                Request::DomState { domain: domain.clone() },
                Box::new(move |r: &Response| match &r.state {
                    Some(s) if reason => format!("{} ({})\n", s.state, s.reason),
                    Some(s) => format!("{}\n", s.state),
                    None => String::new(),
                }),
            )
        }
    };
    let r = Connection::connect(&cli.connect)?.expect(&req)?;
    emit(cli.json, &r, text)
}

/// Carries out the action `decide` chooses on a new connection: a request
/// whose answer is printed, or text printed as it is.
fn act(cli: &Cli, decide: impl FnOnce(&mut Connection) -> Result<rvirt_client::everyday::Action>) -> Result<()> {
    let mut conn = Connection::connect(&cli.connect)?;
    match decide(&mut conn)? {
        rvirt_client::everyday::Action::Call(req, text) => emit(cli.json, &conn.expect(&req)?, text),
        rvirt_client::everyday::Action::Print(printed) => {
            print!("{printed}");
            Ok(())
        }
    }
}

/// `rvirt console`: attach to the domain's serial pty until Ctrl-].
fn console_command(cli: &Cli, domain: &str) -> Result<()> {
    let mut conn = Connection::connect(&cli.connect)?;
    if conn.is_remote() {
        bail!("rvirt console joins the domain's pty on the daemon's host; over a remote connection use virsh -c {} console {domain}", cli.connect);
    }
    let r = conn.expect(&Request::Console { domain: domain.to_string() })?;
    let pty = r.console.unwrap_or_default();
    eprintln!("Connected to domain '{domain}'\r\nEscape character is ^] (Ctrl + ])\r");
    match console::attach(&pty)? {
        Detach::User => eprintln!("\r"),
        Detach::DomainGone => eprintln!("\r\nThe domain stopped; console closed.\r"),
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
