//! `rvirt`: the command line of rvirtd, with virsh's command names.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use rvirt_client::console::{self, Detach};
use rvirt_client::install::{self, InstallOptions};
use rvirt_client::{format, Connection};
use rvirt_domain::protocol::{Request, Response, DEFAULT_SOCKET};

/// Manage rvirt domains through rvirtd (virsh's commands).
#[derive(Parser, Debug)]
#[command(name = "rvirt", version, about)]
struct Cli {
    /// The daemon's socket.
    #[arg(short = 'c', long, value_name = "PATH", global = true, default_value = DEFAULT_SOCKET, env = "RVIRT_CONNECT")]
    connect: PathBuf,
    /// Print the daemon's JSON response instead of text (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List running domains (all with --all).
    List {
        /// Inactive domains too.
        #[arg(long)]
        all: bool,
    },
    /// Define (or update) a domain from an XML file.
    Define {
        /// Domain XML file.
        file: PathBuf,
    },
    /// Remove a stopped domain's definition.
    Undefine {
        /// Name, id or UUID.
        domain: String,
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
    /// Start a transient domain from an XML file (not stored).
    Create {
        /// Domain XML file.
        file: PathBuf,
    },
    /// Write a domain definition from options, define it and start it (virt-install).
    Install {
        /// Domain name.
        #[arg(long)]
        name: String,
        /// RAM in MiB.
        #[arg(long, value_name = "MiB", default_value_t = 512)]
        memory: u64,
        /// vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Kernel to boot.
        #[arg(long, value_name = "PATH")]
        kernel: PathBuf,
        /// Initramfs.
        #[arg(long, value_name = "PATH")]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[arg(long, alias = "extra-args", value_name = "STR")]
        cmdline: Option<String>,
        /// path=FILE[,size=GiB][,format=raw|qcow2][,readonly=on][,serial=S][,cache=none] (repeatable).
        #[arg(long, value_name = "SPEC")]
        disk: Vec<String>,
        /// bridge=BR[,mac=M], tap=NAME[,mac=M] or none (repeatable).
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
    },
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

fn edit(conn: &mut Connection, domain: &str) -> Result<String> {
    let xml = conn.expect(&Request::DumpXml { domain: domain.into() })?.xml.unwrap_or_default();
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
            return Ok(format!("Domain '{domain}' XML configuration not changed."));
        }
        let r = conn.call(&Request::Define { xml: edited })?;
        if r.ok {
            warn(&r);
            return Ok(format!("Domain '{}' XML configuration edited.", r.name.unwrap_or_default()));
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
fn install_command(cli: &Cli) -> Result<()> {
    if let Command::Install { name, memory, vcpus, kernel, initrd, cmdline, disk, network, rng, autostart, print_xml } = &cli.command {
        let o = InstallOptions {
            name: name.clone(),
            memory_mib: *memory,
            vcpus: *vcpus,
            kernel: kernel.clone(),
            initrd: initrd.clone(),
            cmdline: cmdline.clone(),
            disks: disk.clone(),
            networks: network.clone(),
            rng: *rng,
        };
        let def = install::build(&o)?;
        if *print_xml {
            print!("{}", def.to_xml());
            return Ok(());
        }
        let mut conn = Connection::open(&cli.connect)?;
        let r = conn.expect(&Request::Define { xml: def.to_xml() })?;
        warn(&r);
        if *autostart {
            conn.expect(&Request::Autostart { domain: def.name.clone(), enable: true })?;
        }
        let r = conn.expect(&Request::Start { domain: def.name.clone() })?;
        if cli.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!("Domain '{}' defined and started", def.name);
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let simple = |conn: &mut Connection, req: Request, msg: &dyn Fn(&str) -> String| -> Result<()> {
        let r = conn.expect(&req)?;
        if cli.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            warn(&r);
            println!("{}", msg(r.name.as_deref().unwrap_or("")));
        }
        Ok(())
    };
    if let Command::Install { .. } = &cli.command {
        return install_command(&cli);
    }
    let mut conn = Connection::open(&cli.connect)?;
    match &cli.command {
        Command::List { all } => {
            let r = conn.expect(&Request::List { all: *all })?;
            if cli.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print!("{}", format::list(r.domains.as_deref().unwrap_or_default()));
            }
        }
        Command::Define { file } => {
            let f = file.display().to_string();
            simple(&mut conn, Request::Define { xml: read_file(file)? }, &|n| format!("Domain '{n}' defined from {f}"))?
        }
        Command::Create { file } => {
            let f = file.display().to_string();
            simple(&mut conn, Request::Create { xml: read_file(file)? }, &|n| format!("Domain '{n}' created from {f}"))?
        }
        Command::Undefine { domain } => {
            simple(&mut conn, Request::Undefine { domain: domain.clone() }, &|n| format!("Domain '{n}' has been undefined"))?
        }
        Command::Start { domain } => simple(&mut conn, Request::Start { domain: domain.clone() }, &|n| format!("Domain '{n}' started"))?,
        Command::Shutdown { domain, timeout } => {
            let waited = timeout.is_some();
            simple(&mut conn, Request::Shutdown { domain: domain.clone(), timeout_seconds: *timeout }, &|n| {
                if waited {
                    format!("Domain '{n}' is shut off")
                } else {
                    format!("Domain '{n}' is being shutdown")
                }
            })?
        }
        Command::Destroy { domain } => simple(&mut conn, Request::Destroy { domain: domain.clone() }, &|n| format!("Domain '{n}' destroyed"))?,
        Command::Reboot { domain } => {
            simple(&mut conn, Request::Reboot { domain: domain.clone() }, &|n| format!("Domain '{n}' is being rebooted"))?
        }
        Command::Suspend { domain } => simple(&mut conn, Request::Suspend { domain: domain.clone() }, &|n| format!("Domain '{n}' suspended"))?,
        Command::Resume { domain } => simple(&mut conn, Request::Resume { domain: domain.clone() }, &|n| format!("Domain '{n}' resumed"))?,
        Command::Autostart { domain, disable } => {
            let on = !disable;
            simple(&mut conn, Request::Autostart { domain: domain.clone(), enable: on }, &|n| {
                if on {
                    format!("Domain '{n}' marked as autostarted")
                } else {
                    format!("Domain '{n}' unmarked as autostarted")
                }
            })?
        }
        Command::Dumpxml { domain } => {
            let r = conn.expect(&Request::DumpXml { domain: domain.clone() })?;
            if cli.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print!("{}", r.xml.unwrap_or_default());
            }
        }
        Command::Edit { domain } => println!("{}", edit(&mut conn, domain)?),
        Command::Dominfo { domain } => {
            let r = conn.expect(&Request::DomInfo { domain: domain.clone() })?;
            if cli.json {
                println!("{}", serde_json::to_string(&r)?);
            } else if let Some(i) = &r.info {
                print!("{}", format::info(i));
            }
        }
        Command::Domstate { domain, reason } => {
            let r = conn.expect(&Request::DomState { domain: domain.clone() })?;
            if cli.json {
                println!("{}", serde_json::to_string(&r)?);
            } else if let Some(s) = &r.state {
                if *reason {
                    println!("{} ({})", s.state, s.reason);
                } else {
                    println!("{}", s.state);
                }
            }
        }
        Command::Console { domain } => {
            let r = conn.expect(&Request::Console { domain: domain.clone() })?;
            let pty = r.console.unwrap_or_default();
            eprintln!("Connected to domain '{domain}'\r\nEscape character is ^] (Ctrl + ])\r");
            match console::attach(&pty)? {
                Detach::User => eprintln!("\r"),
                Detach::DomainGone => eprintln!("\r\nThe domain stopped; console closed.\r"),
            }
        }
        Command::Install { .. } => install_command(&cli)?,
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
