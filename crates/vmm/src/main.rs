//! `rvirt-vmm`: run a KVM virtual machine, from its own disks through
//! firmware or from a kernel given on the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use rvirt_vmm::config::{
    parse_boot_order, parse_disk, parse_net, parse_on_reboot, parse_seccomp, parse_serial, parse_size, parse_uuid, Boot, JailConfig,
    DEFAULT_CMDLINE, DEFAULT_FIRMWARE,
};
use rvirt_vmm::{VmConfig, VmExit};

/// Run a KVM virtual machine (one process per VM): from its own disks
/// through SeaBIOS, or from a Linux kernel given with --kernel.
#[derive(Parser, Debug)]
#[command(name = "rvirt-vmm", version, about)]
struct Cli {
    /// Kernel to boot: a bzImage, or an ELF vmlinux with a PVH entry note.
    /// Without it the VM boots through firmware from its own disks.
    #[arg(long, value_name = "PATH", conflicts_with = "firmware")]
    kernel: Option<PathBuf>,
    /// Initramfs to load (with --kernel).
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line (with --kernel) [default: console=ttyS0 panic=-1].
    #[arg(long, value_name = "STR", requires = "kernel")]
    cmdline: Option<String>,
    /// Firmware image started at the reset vector [default without --kernel:
    /// /usr/share/seabios/bios-256k.bin]. SeaBIOS does not load kernels, so
    /// not with --kernel.
    #[arg(long, value_name = "PATH")]
    firmware: Option<PathBuf>,
    /// The machine's UUID, as firmware and SMBIOS report it.
    #[arg(long, value_name = "UUID")]
    uuid: Option<String>,
    /// With firmware: reboot this many milliseconds after a failed boot
    /// [default: wait for ever].
    #[arg(long, value_name = "MS", conflicts_with = "kernel")]
    reboot_timeout: Option<u32>,
    /// With firmware: device classes to boot from, in order, for devices
    /// without a `boot=N` place (a floppy, c disk, d CD-ROM, n network)
    /// [default: cd].
    #[arg(long, value_name = "LETTERS", conflicts_with = "kernel")]
    boot_order: Option<String>,
    /// With firmware: show its boot menu for this many milliseconds
    /// (press Esc on the console) [default: no menu].
    #[arg(long, value_name = "MS", conflicts_with = "kernel")]
    boot_menu: Option<u16>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,
    /// Guest RAM, e.g. 512M or 2G (a plain number is MiB).
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    memory: String,
    /// Where COM1 goes: stdio, file=PATH, pty or null.
    #[arg(long, value_name = "MODE", default_value = "stdio")]
    serial: String,
    /// Unix socket for the JSON control API.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// What a guest reboot does: restart the VM, or exit with status 0.
    #[arg(long, value_name = "ACTION", default_value = "restart")]
    on_reboot: String,
    /// A disk: path=FILE[,format=raw|qcow2][,readonly=on][,serial=S][,direct=on][,bus=virtio|scsi]
    /// [,media=disk|cdrom][,boot=N]. media=cdrom is a read-only SCSI CD-ROM drive, empty without path. Repeatable.
    #[arg(long, value_name = "SPEC")]
    disk: Vec<String>,
    /// A virtio network card on a tap (created if missing and permitted): tap=NAME[,mac=52:54:00:..][,bridge=BR][,fd=N][,link=up|down]. Repeatable.
    #[arg(long, value_name = "SPEC")]
    net: Vec<String>,
    /// A virtio entropy device fed from the host's /dev/urandom.
    #[arg(long)]
    rng: bool,
    /// A virtio memory balloon, steered with the API's `balloon` request.
    #[arg(long)]
    balloon: bool,
    /// Track a live migration's dirty pages in a KVM dirty ring of ENTRIES per vCPU (a power of two, 1024-65536) instead of bitmaps.
    #[arg(long, value_name = "ENTRIES")]
    dirty_ring: Option<u32>,
    /// Start with the vCPUs paused: they run once the API's `resume` comes (QEMU's -S).
    #[arg(long)]
    paused: bool,
    /// A virtio console (hvc0 in the guest): stdio, file=PATH, pty or null [default when given without a value: pty].
    #[arg(long, value_name = "MODE", num_args = 0..=1, default_missing_value = "pty")]
    console: Option<String>,
    /// What a system call outside a thread's allow-list does: kill (stop the
    /// VMM, naming the thread and the call), log (allow it; the kernel's
    /// audit log records it) or off.
    #[arg(long, value_name = "MODE", default_value = "kill")]
    seccomp: String,
    /// Confine the VMM once its files are open: mount, PID, IPC, UTS and
    /// network namespaces of its own whose root is an empty tmpfs mounted
    /// (privately) over DIR, no capabilities, no_new_privs. Needs root.
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = rvirt_sandbox::jail::DEFAULT_JAIL_ROOT)]
    jail: Option<PathBuf>,
    /// Run vCPU N on these host CPUs only: N:CPUS, e.g. 0:2 or 1:4-7,9. Repeatable.
    #[arg(long, value_name = "N:CPUS")]
    vcpu_pin: Vec<String>,
    /// Run every thread that is not a vCPU (main, devices, API) on these host CPUs.
    #[arg(long, value_name = "CPUS")]
    emulator_pin: Option<String>,
    /// Use inherited descriptor N wherever the file PATH is named (by
    /// --kernel, --initrd, --firmware, --disk, backing=, --serial file=,
    /// --console file=): its parent opened it. Repeatable.
    #[arg(long, value_name = "N=PATH")]
    pass_fd: Vec<String>,
    /// Open no file by name: each must come with --pass-fd (what rvirtd does).
    #[arg(long)]
    only_passed_files: bool,
    /// Continue the VM of a snapshot (written by the API's `snapshot`: a
    /// directory, or one file) from where it was: its memory (mapped
    /// copy-on-write from DIR/memory or the file),
    /// vCPUs and devices, built as the snapshot says. Backends are given
    /// again: --serial, --api-socket, --console's backend; --disk (all, in
    /// order: each clone its own copy) and --net (all: new taps, same MACs)
    /// when they differ from the snapshot's.
    #[arg(long, value_name = "DIR|FILE", conflicts_with_all = ["kernel", "firmware", "initrd", "cmdline", "cpus", "memory", "uuid", "rng", "balloon", "boot_order", "boot_menu", "reboot_timeout"])]
    restore: Option<PathBuf>,
    /// Wait at URI (unix:PATH or tcp:HOST:PORT) for a VM another rvirt-vmm
    /// sends with the API's `migrate`, and run it: its machine and devices
    /// come from the stream; backends (--serial, --api-socket, --console) are given here.
    #[arg(long, value_name = "URI", conflicts_with_all = ["kernel", "firmware", "initrd", "cmdline", "cpus", "memory", "uuid", "rng", "balloon", "boot_order", "boot_menu", "reboot_timeout", "restore"])]
    incoming: Option<String>,
    /// With --restore: read the memory file into fresh RAM at once instead of mapping it.
    #[arg(long, requires = "restore")]
    restore_copy_memory: bool,
    /// The whole VM as one JSON value (rvirt-api's `VmConfig`, what rvirtd
    /// writes), instead of the options that describe it.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel", "firmware", "initrd", "cmdline", "cpus", "memory", "uuid", "disk", "net", "rng", "balloon", "console", "boot_order", "boot_menu", "reboot_timeout", "restore", "serial", "api_socket", "on_reboot", "seccomp", "jail", "vcpu_pin", "emulator_pin"])]
    config: Option<PathBuf>,
    /// With --jail: the unprivileged uid and gid to run as.
    #[arg(long, value_name = "UID:GID", requires = "jail")]
    jail_user: Option<String>,
}

/// Parses `UID:GID` (numbers; uid and gid 0 are refused: that would not drop anything).
fn parse_jail_user(s: &str) -> rvirt_vmm::Result<(u32, u32)> {
    let bad = || rvirt_vmm::Error::Config(format!("--jail-user must be UID:GID with numbers above 0, not '{s}'"));
    let (u, g) = s.split_once(':').ok_or_else(bad)?;
    let (u, g) = (u.parse::<u32>().map_err(|_| bad())?, g.parse::<u32>().map_err(|_| bad())?);
    if u == 0 || g == 0 {
        return Err(bad());
    }
    Ok((u, g))
}

/// Largest `--config` file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads a `--config` file: JSON of one `VmConfig`, unknown fields refused.
fn read_config(path: &std::path::Path) -> rvirt_vmm::Result<VmConfig> {
    use std::io::Read;
    let bad = |why: String| rvirt_vmm::Error::Config(format!("--config {}: {why}", path.display()));
    let f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut text = String::new();
    f.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text).map_err(|e| bad(e.to_string()))?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(bad(format!("larger than {MAX_CONFIG_BYTES} bytes")));
    }
    VmConfig::from_json(&text).map_err(|e| bad(e.to_string()))
}

fn config(cli: Cli) -> rvirt_vmm::Result<VmConfig> {
    if let Some(path) = &cli.config {
        return read_config(path);
    }
    let boot = match (cli.restore, cli.kernel) {
        (None, _) if cli.incoming.is_some() => Boot::Incoming { uri: cli.incoming.clone().unwrap_or_default() },
        (Some(dir), _) => Boot::Restore { dir, copy_memory: cli.restore_copy_memory },
        (None, Some(kernel)) => Boot::Kernel { kernel, initrd: cli.initrd, cmdline: cli.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.into()) },
        (None, None) => Boot::Firmware {
            path: cli.firmware.unwrap_or_else(|| PathBuf::from(DEFAULT_FIRMWARE)),
            reboot_timeout_ms: cli.reboot_timeout,
            order: parse_boot_order(cli.boot_order.as_deref().unwrap_or("cd"))?,
            menu_ms: cli.boot_menu,
        },
    };
    Ok(VmConfig {
        boot,
        uuid: cli.uuid.as_deref().map(parse_uuid).transpose()?,
        // Out-of-range counts get the same message as 0 from validate().
        vcpus: u8::try_from(cli.cpus).unwrap_or(0),
        memory_bytes: parse_size(&cli.memory)?,
        serial: parse_serial("--serial", &cli.serial)?,
        api_socket: cli.api_socket,
        on_reboot: parse_on_reboot(&cli.on_reboot)?,
        disks: cli.disk.iter().map(|d| parse_disk(d)).collect::<Result<_, _>>()?,
        nets: cli.net.iter().map(|n| parse_net(n)).collect::<Result<_, _>>()?,
        rng: cli.rng,
        balloon: cli.balloon,
        console: cli.console.as_deref().map(|c| parse_serial("--console", c)).transpose()?,
        seccomp: parse_seccomp(&cli.seccomp)?,
        vcpu_pins: cli
            .vcpu_pin
            .iter()
            .map(|p| {
                let bad = || rvirt_vmm::Error::Config(format!("--vcpu-pin must be N:CPUS, not '{p}'"));
                let (v, cpus) = p.split_once(':').ok_or_else(bad)?;
                Ok((v.parse::<u8>().map_err(|_| bad())?, rvirt_vmm::config::parse_cpu_list("--vcpu-pin", cpus)?))
            })
            .collect::<rvirt_vmm::Result<_>>()?,
        dirty_ring: cli.dirty_ring,
        start_paused: cli.paused,
        emulator_pin: cli.emulator_pin.as_deref().map(|c| rvirt_vmm::config::parse_cpu_list("--emulator-pin", c)).transpose()?,
        jail: match cli.jail {
            Some(root) => Some(JailConfig { root, user: cli.jail_user.as_deref().map(parse_jail_user).transpose()? }),
            None => None,
        },
    })
}

fn main() -> ExitCode {
    let mut cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    // Guest-triggerable warnings are rate-limited and the run's log capped.
    let log: &'static _ = Box::leak(Box::new(rvirt_vmm::log_limit::LimitedLog::new(std::io::stderr(), rvirt_vmm::log_limit::MAX_LOG_BYTES)));
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(move || log.writer())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RVIRT_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let (pass_fd, only_passed) = (std::mem::take(&mut cli.pass_fd), cli.only_passed_files);
    let result = config(cli)
        .and_then(|cfg| {
            // Inherited descriptors are taken before the VMM opens anything.
            for spec in &pass_fd {
                rvirt_vmm::inherited::pass_file(spec)?;
            }
            for n in &cfg.nets {
                if let Some(fd) = n.fd {
                    rvirt_vmm::inherited::pass_tap(&n.tap, fd)?;
                }
            }
            if only_passed {
                rvirt_block::file::only_passed();
            }
            Ok(cfg)
        })
        .and_then(|cfg| rvirt_vmm::run(&cfg));
    rvirt_vmm::console::restore_terminal();
    match result {
        Ok(VmExit::Crashed(why)) => {
            eprintln!("rvirt-vmm: guest crashed: {why}");
            ExitCode::from(1)
        }
        // One line on how the VM ended, for logs and the rvirtd supervisor.
        Ok(VmExit::PowerOff) => {
            eprintln!("rvirt-vmm: guest powered off");
            ExitCode::SUCCESS
        }
        Ok(VmExit::Reset) => {
            eprintln!("rvirt-vmm: guest rebooted");
            ExitCode::SUCCESS
        }
        Ok(VmExit::Stopped) => {
            eprintln!("rvirt-vmm: stopped");
            ExitCode::SUCCESS
        }
        Ok(VmExit::Migrated(how)) => {
            eprintln!("rvirt-vmm: migrated: {how}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rvirt-vmm: {e}");
            ExitCode::from(1)
        }
    }
}
