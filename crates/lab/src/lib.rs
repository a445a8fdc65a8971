//! The nested KVM lab: runs real Linux guests under rvirt-vmm on hosts whose
//! own `/dev/kvm` cannot boot a stock kernel (see `shared/LAB.md`).
//!
//! QEMU's TCG emulates an AMD CPU with SVM; a Debian kernel booted there
//! (L1) loads `kvm-amd` and gets a working `/dev/kvm`, and rvirt-vmm inside
//! it boots the guest (L2). A test describes the L1 script and the files it
//! needs; [`Lab::run`] builds the L1 initramfs, boots it and hands back the
//! console output, split by the markers the script prints.
//!
//! Everything is built here from Debian packages (`setup.sh`), cached under
//! `target/lab-cache` (or `$RVIRT_LAB_CACHE`) so a second run is fast.

pub mod compare;
pub mod counting;
pub mod disk;
pub mod guests;
pub mod nethost;
pub mod procfs;
pub mod stats;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap_or_else(|_| PathBuf::from("."))
}

/// Whether `RVIRT_LAB_TRACE` (given as `value`) asks L1 to keep every KVM
/// event up to an L2 shutdown; a misspelt value is an error, not the default.
fn trace_history(value: Option<&str>) -> Result<bool> {
    match value {
        None | Some("") => Ok(false),
        Some("history") => Ok(true),
        Some(other) => bail!("RVIRT_LAB_TRACE={other}: want history (or unset, for shutdown exits only)"),
    }
}

/// Where the console of L1 run `name` is kept: `target/lab-logs/NAME.log`.
fn console_log(name: &str) -> PathBuf {
    workspace_root().join("target/lab-logs").join(format!("{name}.log"))
}

/// Writes a line straight to the process's stderr, past the test harness's
/// output capture, so CI logs show what the guests printed.
pub fn log(line: &str) {
    let _ = writeln!(std::io::stderr(), "[lab] {line}");
}

/// What a stuck kernel prints: L1 soft lockups (seen with the nested guest
/// stalled) and RCU stalls (seen in L2 when its timer stopped on a CPU).
const STUCK_KERNEL: [&[u8]; 2] = [b"watchdog: BUG: soft lockup", b"rcu: INFO: rcu_preempt detected stalls"];

/// L1's trace of an L2 shutdown (a triple fault): the first attempt of a
/// run that retries them ends a few seconds later instead of waiting for a
/// guest that is gone (a VMM whose stderr goes to a file says nothing on the
/// console); the retry runs to its end, as every run did before.
const L2_SHUTDOWN_TRACED: &str = "reason shutdown";

/// How long a run goes on after a traced L2 shutdown, for the rest of the trace.
const AFTER_L2_SHUTDOWN: Duration = Duration::from_secs(5);

/// The prepared lab: packages installed, kernel cached, binaries built.
pub struct Lab {
    /// Cache directory.
    pub cache: PathBuf,
    /// The Debian kernel (bzImage), for L1 and L2 alike.
    pub kernel: PathBuf,
    /// Directory with the kernel's modules (flat .ko files plus `tree/`).
    pub modules: PathBuf,
    /// Release build of rvirt-vmm.
    pub vmm: PathBuf,
    /// Release build of the lab's API client.
    pub api_client: PathBuf,
    /// Release builds of the management daemon and its client.
    pub rvirtd: PathBuf,
    /// See `rvirtd`.
    pub rvirt: PathBuf,
}

static LAB: OnceLock<std::result::Result<Lab, String>> = OnceLock::new();
/// L1 runs one at a time: each wants both host cores.
static RUN_LOCK: Mutex<()> = Mutex::new(());

impl Lab {
    /// Prepares the lab once per process and returns it.
    pub fn get() -> Result<&'static Lab> {
        LAB.get_or_init(|| Lab::prepare().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("lab setup failed: {e}"))
    }

    fn prepare() -> Result<Lab> {
        let root = workspace_root();
        let cache = std::env::var_os("RVIRT_LAB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/lab-cache"));
        let setup = Path::new(env!("CARGO_MANIFEST_DIR")).join("setup.sh");
        let st = Command::new("bash").arg(&setup).arg(&cache).status().context("running lab setup.sh")?;
        if !st.success() {
            bail!("{} failed ({st})", setup.display());
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .current_dir(&root)
            .args(["build", "--release", "--quiet", "-p", "rvirt-vmm", "-p", "rvirt-lab", "-p", "rvirtd", "-p", "rvirt", "--bins"])
            .status()
            .context("building release binaries")?;
        if !st.success() {
            bail!("cargo build --release failed ({st})");
        }
        let kdir = cache.join("kernel");
        Ok(Lab {
            kernel: kdir.join("vmlinuz"),
            modules: kdir.join("modules"),
            vmm: root.join("target/release/rvirt-vmm"),
            api_client: root.join("target/release/rvirt-lab-api"),
            rvirtd: root.join("target/release/rvirtd"),
            rvirt: root.join("target/release/rvirt"),
            cache,
        })
    }

    /// The modules [`ACPID_GUEST`] loads.
    pub fn acpid_modules(&self) -> Vec<PathBuf> {
        vec![self.module("evdev.ko"), self.module("button.ko")]
    }

    /// Path of a flat module file (`kvm.ko`, `button.ko`, ...).
    pub fn module(&self, name: &str) -> PathBuf {
        self.modules.join(name)
    }

    /// Path of a module in the kernel's tree, e.g. `drivers/virtio/virtio.ko`.
    pub fn module_in_tree(&self, rel: &str) -> PathBuf {
        self.modules.join("tree").join(rel)
    }

    /// An L2 initramfs whose `init` is `script` with its `INSMOD` line
    /// replaced by loading the virtio core and the named `drivers` (see
    /// [`Lab::virtio_modules`]); the `extra` files go beside the modules, in
    /// /lib/modules, for the script to run.
    pub fn virtio_initramfs(&self, script: &str, drivers: &[&str], extra: &[PathBuf]) -> Result<Vec<u8>> {
        let mut files = self.virtio_modules(drivers);
        let script = script.replace("INSMOD\n", &insmod_lines(&files));
        files.extend_from_slice(extra);
        l2_initramfs(&script, &files)
    }

    /// The virtio modules a guest needs for `drivers` (e.g. `virtio_blk`,
    /// `virtio_net`), core modules first, in the order `insmod` needs them.
    pub fn virtio_modules(&self, drivers: &[&str]) -> Vec<PathBuf> {
        let mut rel = vec![
            "drivers/virtio/virtio_ring.ko",
            "drivers/virtio/virtio.ko",
            "drivers/virtio/virtio_pci_modern_dev.ko",
            "drivers/virtio/virtio_pci_legacy_dev.ko",
            "drivers/virtio/virtio_pci.ko",
        ];
        for d in drivers {
            rel.extend_from_slice(match *d {
                "virtio_blk" => &["drivers/block/virtio_blk.ko"][..],
                "virtio_net" => &["net/core/failover.ko", "drivers/net/net_failover.ko", "drivers/net/virtio_net.ko"],
                "virtio-rng" => &["drivers/char/hw_random/virtio-rng.ko"],
                "virtio_console" => &["drivers/char/virtio_console.ko"],
                "virtio_balloon" => &["drivers/virtio/virtio_balloon.ko"],
                "virtio_scsi" => &[
                    "drivers/scsi/scsi_common.ko",
                    "drivers/scsi/scsi_mod.ko",
                    "drivers/cdrom/cdrom.ko",
                    "drivers/scsi/sd_mod.ko",
                    "drivers/scsi/sr_mod.ko",
                    "drivers/scsi/virtio_scsi.ko",
                    "fs/isofs/isofs.ko",
                ],
                _ => &[],
            });
        }
        rel.into_iter().map(|r| self.module_in_tree(r)).collect()
    }

    /// The kernel as an ELF vmlinux (decompressed from the bzImage once and cached).
    pub fn vmlinux(&self) -> Result<PathBuf> {
        let out = self.cache.join("vmlinux");
        if !out.exists() {
            extract_vmlinux(&self.kernel, &out)?;
        }
        Ok(out)
    }

    /// The QEMU command that boots L1 with `initrd`.
    fn qemu_l1(&self, spec: &L1Spec, initrd: &Path) -> Command {
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-machine", "q35,accel=tcg", "-cpu", "EPYC,+svm,+npt", "-smp", "2", "-m"])
            .arg(format!("{}", spec.l1_memory_mib))
            .args(["-nographic", "-no-reboot", "-kernel"])
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(initrd)
            // nokaslr: L1's /proc/kallsyms then names L2 kernel addresses (L1_INIT).
            .args(["-append", "console=ttyS0 panic=-1 quiet nokaslr"]);
        c
    }

    /// Boots L1 with `spec` on this terminal (for demos): the user talks to
    /// whatever the script runs.
    pub fn run_interactive(&self, spec: &L1Spec) -> Result<()> {
        let work = tempdir("l1")?;
        let initrd = work.join("l1.cpio.gz");
        self.build_l1(spec, &work.join("root"), &initrd)?;
        // QEMU's own stderr (TCG's warnings about CPU features it does not
        // emulate) is kept out of the user's terminal, and shown on failure.
        let qemu_log = work.join("qemu.stderr");
        let st = self
            .qemu_l1(spec, &initrd)
            .stderr(std::fs::File::create(&qemu_log)?)
            .status()
            .context("starting qemu-system-x86_64")?;
        let stderr = std::fs::read_to_string(&qemu_log).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&work);
        if !st.success() {
            bail!("qemu exited with {st}: {}", stderr.trim());
        }
        Ok(())
    }

    /// Boots L1 with `spec` and returns its console output. A run whose
    /// console goes silent for `spec.stall_timeout` or reports an L1 soft
    /// lockup, whose L2 guest triple-faults (no lab test expects one), whose
    /// script says an L2 guest stalled ([`LabOutput::l2_stalled`]), or whose
    /// L1 kernel panics before its script ends, is retried once:
    /// nested guests under TCG occasionally stall or crash mid-boot (see
    /// docs/design.md, "Known lab issues"); the retry is logged loudly.
    pub fn run(&self, spec: &L1Spec) -> Result<LabOutput> {
        let _one_at_a_time = RUN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let first = self.run_once(spec, spec.retry_l2_crash)?;
        let what = if first.stalled {
            format!("stalled (no console output for {} s, or a soft lockup or RCU stall report)", spec.stall_timeout.as_secs())
        } else if spec.retry_l2_crash && first.l2_triple_faulted() {
            let at: Vec<String> = first.l2_shutdowns().iter().map(L2Shutdown::to_string).collect();
            format!("saw its L2 guest triple-fault (rip at the shutdown, from L1's trace: {})", if at.is_empty() { "not traced".into() } else { at.join(", ") })
        } else if first.l1_panicked() {
            "saw its L1 kernel panic before the script finished".to_string()
        } else if first.l2_stalled() {
            let which: Vec<String> = first.values().into_keys().filter(|k| k.contains("STALLED")).collect();
            format!("saw its L2 guest stop making progress ({})", which.join(", "))
        } else {
            return Ok(first);
        };
        // The retry streams to the same log file: keep the first attempt's.
        let kept = console_log(&format!("{}.first", spec.name));
        let _ = std::fs::rename(console_log(&spec.name), &kept);
        log(&format!(
            "WARNING: L1 run '{}' {what}; console tail (all of it in {}):\n{}\n[lab] retrying once",
            spec.name,
            kept.display(),
            first.tail(40)
        ));
        // The retry runs to its end whatever it traces: its test judges it.
        self.run_once(spec, false)
    }

    /// One boot of L1; `end_on_l2_shutdown`: stop 5 s after a traced L2 shutdown.
    fn run_once(&self, spec: &L1Spec, end_on_l2_shutdown: bool) -> Result<LabOutput> {
        let work = tempdir("l1")?;
        let initrd = work.join("l1.cpio.gz");
        self.build_l1(spec, &work.join("root"), &initrd)?;
        log(&format!("booting L1 for '{}'", spec.name));
        let started = Instant::now();
        let mut child = self
            .qemu_l1(spec, &initrd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting qemu-system-x86_64")?;
        let mut stdout = child.stdout.take().context("qemu stdout")?;
        // The console is also streamed to target/lab-logs/NAME.log as it
        // arrives, so a run that hangs can be watched.
        let live_path = console_log(&spec.name);
        let _ = live_path.parent().map(std::fs::create_dir_all);
        let mut live = std::fs::File::create(&live_path).ok();
        let last_output = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let last_output_w = last_output.clone();
        // L1's own soft-lockup reports keep the console busy while the
        // nested guest is stuck; they count as a stall.
        let lockup = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let lockup_w = lockup.clone();
        let l2_down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let l2_down_w = l2_down.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                let seen = buf.len().saturating_sub(64);
                buf.extend_from_slice(&chunk[..n]);
                let found = |p: &[u8]| buf[seen..].windows(p.len()).any(|w| w == p);
                if STUCK_KERNEL.iter().any(|p| found(p)) {
                    lockup_w.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                if found(L2_SHUTDOWN_TRACED.as_bytes()) {
                    l2_down_w.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                last_output_w.store(started.elapsed().as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
                if let Some(f) = live.as_mut() {
                    let _ = f.write_all(&chunk[..n]);
                }
            }
            buf
        });
        let deadline = started + spec.timeout;
        let mut stalled = false;
        let mut l2_down_at = None;
        let timed_out = loop {
            if child.try_wait()?.is_some() {
                break false;
            }
            if end_on_l2_shutdown && l2_down.load(std::sync::atomic::Ordering::Relaxed) {
                let at = *l2_down_at.get_or_insert_with(Instant::now);
                if at.elapsed() > AFTER_L2_SHUTDOWN {
                    let _ = child.kill();
                    let _ = child.wait();
                    break false;
                }
            }
            let quiet_ms = (started.elapsed().as_millis() as u64)
                .saturating_sub(last_output.load(std::sync::atomic::Ordering::Relaxed));
            stalled = quiet_ms > spec.stall_timeout.as_millis() as u64 || lockup.load(std::sync::atomic::Ordering::Relaxed);
            if Instant::now() > deadline || stalled {
                let _ = child.kill();
                let _ = child.wait();
                break !stalled;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let raw = reader.join().unwrap_or_default();
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        let _ = std::fs::remove_dir_all(&work);
        let console = String::from_utf8_lossy(&raw).replace('\r', "");
        let out = LabOutput { console, elapsed: started.elapsed(), timed_out, stalled, qemu_stderr: stderr };
        log(&format!("L1 for '{}' finished in {:.1}s{}", spec.name, out.elapsed.as_secs_f64(), if timed_out { " (TIMED OUT)" } else if stalled { " (STALLED)" } else { "" }));
        Ok(out)
    }

    fn build_l1(&self, spec: &L1Spec, root: &Path, out: &Path) -> Result<()> {
        let mut fs = Initramfs::new(root)?;
        fs.add_busybox()?;
        for m in ["irqbypass.ko", "kvm.ko", "kvm-amd.ko"] {
            fs.add_file(&self.module(m), &format!("lib/modules/{m}"))?;
        }
        fs.add_binary(&self.vmm, "bin/rvirt-vmm")?;
        fs.add_binary(&self.api_client, "bin/rvirt-lab-api")?;
        for (src, dest) in &spec.files {
            fs.add_file(src, dest)?;
        }
        for (src, dest) in &spec.binaries {
            fs.add_binary(src, dest)?;
        }
        for (dest, bytes) in &spec.blobs {
            fs.add_bytes(bytes, dest, 0o644)?;
        }
        if trace_history(std::env::var("RVIRT_LAB_TRACE").ok().as_deref())? {
            fs.add_bytes(b"", "lab-trace-history", 0o644)?;
        }
        fs.add_bytes(spec.script.as_bytes(), "test.sh", 0o755)?;
        fs.add_bytes(L1_INIT.as_bytes(), "init", 0o755)?;
        fs.pack(out)
    }
}

/// Debian's SeaBIOS, rvirt-vmm's default firmware (package `seabios`):
/// tests copy it to the same path in L1.
pub const SEABIOS: &str = rvirt_api::DEFAULT_FIRMWARE;

/// An L2 init for tests that shut guests down through ACPI: acpid turns the
/// power button into a clean poweroff (needs [`Lab::acpid_modules`]); a
/// ticker on the console shows whether the guest is running.
pub const ACPID_GUEST: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
insmod /lib/modules/evdev.ko
insmod /lib/modules/button.ko
mkdir -p /etc/acpi/PWRF
printf '#!/bin/sh\necho "@@L2-POWER-BUTTON=pressed"\npoweroff -f\n' > /etc/acpi/PWRF/00000080
chmod +x /etc/acpi/PWRF/00000080
mkdir -p /var/log /var/run
acpid -d &
sleep 1
echo "@@L2-READY=1"
i=0
while true; do i=$((i+1)); echo "tick $i"; sleep 0.2; done
"#;

/// L1's init: mount the basics, load KVM, run the test script, power off.
const L1_INIT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mkdir -p /tmp /run && mount -t tmpfs tmpfs /tmp
insmod /lib/modules/irqbypass.ko
insmod /lib/modules/kvm.ko
insmod /lib/modules/kvm-amd.ko
if [ -c /dev/kvm ]; then echo "@@L1-KVM=yes"; else echo "@@L1-KVM=no"; fi
# Evidence for hung guests (docs/design.md, "Known lab issues"): a vCPU
# thread of an rvirt-vmm that has not been scheduled for 60 s is reported
# once, with every thread's state and, through SIGUSR2, the VMM's account
# of its vCPUs (registers, LAPIC timer, pending interrupts).
lab_watch() {
  while sleep 30; do
    for p in $(pidof rvirt-vmm); do
      for t in /proc/$p/task/*; do
        grep -q '^vcpu' $t/comm 2>/dev/null || continue
        id=${t##*/}
        now=$(awk '/ctxt_switches/ {s += $2} END {print s + 0}' $t/status 2>/dev/null)
        eval "last=\${lab_s_$id:-none}; n=\${lab_n_$id:-0}"
        if [ "$now" = "$last" ]; then n=$((n + 1)); else n=0; fi
        eval "lab_s_$id=$now; lab_n_$id=$n"
        [ $n = 2 ] || continue
        echo "[lab-watch] rvirt-vmm $p: $(cat $t/comm) not scheduled for 60 s; threads:"
        for u in /proc/$p/task/*; do
          echo "[lab-watch]   $(cat $u/comm) state=$(cut -d' ' -f3 $u/stat) wchan=$(cat $u/wchan) syscall=$(cut -d' ' -f1 $u/syscall)"
        done
        kill -USR2 $p
        sleep 3
        [ -f /proc/$p/fd/2 ] && tail -n 40 /proc/$p/fd/2 | sed 's/^/[lab-watch]   /'
      done
    done
  done
}
# Evidence for L2 triple faults: after an SVM shutdown intercept KVM loads
# the reset state, so the VMM's register dump says nothing, but the kvm_exit
# tracepoint still carries the guest's rip at the shutdown. By default only
# shutdown exits are traced, and a poller prints each as a
# `[lab-trace]` line with the kernel symbol at that address (L1 boots the
# same kernel with nokaslr, so the name is right for an L2 that does too).
# With /lab-trace-history (RVIRT_LAB_TRACE=history) every KVM event goes
# into a ring that stops at the shutdown, and the report prints its end.
# The ring is polled, not read through trace_pipe, which held back the last
# event until another came.
T=/sys/kernel/tracing
lab_symbol() {
  awk -v r="$1" '($1 "") > (r "") {exit} $2 ~ /^[Tt]$/ {s = $3; a = $1} END {if (s != "") print s, a}' /proc/kallsyms |
    { read -r s a && printf '%s+0x%x' "$s" $((0x$1 - 0x$a)); }
}
lab_trace_line() {
  rip=$(echo "$1" | sed -n 's/.* rip 0x\([0-9a-f]*\).*/\1/p')
  case $rip in
    ffffffff8*) echo "[lab-trace] $1 (kernel symbol, if L2 has nokaslr: $(lab_symbol $rip))" ;;
    *) echo "[lab-trace] $1" ;;
  esac
}
# How many shutdown lines were printed (a file: the poller is a subshell).
echo 0 > /run/lab-traced
lab_trace_report() {
  [ -f $T/trace ] || return 0
  if [ -f /lab-trace-history ]; then
    [ "$(cat $T/tracing_on)" = 0 ] || return 0
    echo "[lab-trace] KVM events before the L2 shutdown (last 400):"
    tail -n 400 $T/trace | sed 's/^/[lab-trace]   /'
    grep 'reason shutdown' $T/trace | tail -n 1 | while read -r l; do lab_trace_line "$l"; done
    echo > $T/trace
    echo 1 > $T/tracing_on
  else
    n=$(grep -c 'reason shutdown' $T/trace) done=$(cat /run/lab-traced)
    [ "$n" -gt "$done" ] || return 0
    grep 'reason shutdown' $T/trace | tail -n $((n - done)) | while read -r l; do lab_trace_line "$l"; done
    echo $n > /run/lab-traced
  fi
}
if mount -t tracefs tracefs $T 2>/dev/null && [ -d $T/events/kvm ]; then
  if [ -f /lab-trace-history ]; then
    echo 4096 > $T/buffer_size_kb
    echo 'traceoff if exit_reason == 127' > $T/events/kvm/kvm_exit/trigger && echo 1 > $T/events/kvm/enable
  elif echo 'exit_reason == 127' > $T/events/kvm/kvm_exit/filter; then
    echo 1 > $T/events/kvm/kvm_exit/enable
  fi
  # The poller is the only reporter: asked to stop, it reports once more and
  # ends, so no line is printed twice or lost.
  (while [ ! -f /run/lab-trace-stop ]; do sleep 1; lab_trace_report; done; lab_trace_report) &
  lab_trace_poller=$!
fi
lab_watch &
cd /
sh /test.sh
rc=$?
[ -n "$lab_trace_poller" ] && touch /run/lab-trace-stop && wait $lab_trace_poller
echo "@@L1-DONE=$rc"
poweroff -f
"#;

/// What to run in L1.
pub struct L1Spec {
    /// Name, for logs (`target/lab-logs/NAME.log`).
    pub name: String,
    /// Shell script run by L1's init; print `@@KEY=VALUE` lines for [`LabOutput::value`].
    pub script: String,
    /// Host files copied into L1: (source, destination relative to /).
    pub files: Vec<(PathBuf, String)>,
    /// Generated files: (destination, contents).
    pub blobs: Vec<(String, Vec<u8>)>,
    /// Dynamically linked host programs copied with their libraries: (source, destination).
    pub binaries: Vec<(PathBuf, String)>,
    /// L1 RAM in MiB.
    pub l1_memory_mib: u32,
    /// Wall-clock limit for the whole L1 run.
    pub timeout: Duration,
    /// A run whose console prints nothing for this long is considered stalled.
    pub stall_timeout: Duration,
    /// Whether an L2 triple fault retries the run (tests); a benchmark
    /// counts it as a result instead.
    pub retry_l2_crash: bool,
}

impl L1Spec {
    /// A spec running `script`, with 3 GiB of L1 RAM and a 10-minute limit.
    pub fn new(name: &str, script: &str) -> Self {
        Self {
            name: name.into(),
            script: script.into(),
            files: Vec::new(),
            blobs: Vec::new(),
            binaries: Vec::new(),
            l1_memory_mib: 3072,
            timeout: Duration::from_secs(600),
            stall_timeout: Duration::from_secs(90),
            retry_l2_crash: true,
        }
    }

    /// Copies host file `src` to `dest` in L1.
    pub fn file(mut self, src: impl Into<PathBuf>, dest: &str) -> Self {
        self.files.push((src.into(), dest.into()));
        self
    }

    /// Copies host program `src` (with the libraries it links) to `dest` in L1.
    pub fn binary(mut self, src: impl Into<PathBuf>, dest: &str) -> Self {
        self.binaries.push((src.into(), dest.into()));
        self
    }

    /// Puts `bytes` at `dest` in L1.
    pub fn blob(mut self, dest: &str, bytes: Vec<u8>) -> Self {
        self.blobs.push((dest.into(), bytes));
        self
    }
}

/// One L2 shutdown exit as L1's KVM traced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L2Shutdown {
    /// The L1 thread that ran the vCPU, as the trace names it (`TASK-PID`):
    /// rvirt-vmm's are `vcpuN-PID`, QEMU's `qemu-system-x86-PID`.
    pub thread: String,
    /// The guest's instruction pointer at the shutdown.
    pub rip: u64,
    /// The kernel symbol at `rip` (`name+0xoffset`), from L1's own symbol
    /// table: right only for an L2 kernel booted with `nokaslr`.
    pub symbol: Option<String>,
    /// The vector of the event the CPU was delivering when it gave up
    /// (e.g. 14 for a page fault), when SVM recorded one.
    pub delivering: Option<u8>,
}

impl std::fmt::Display for L2Shutdown {
    /// `RIP (SYMBOL if nokaslr), delivering vector N, in THREAD`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x} ({})", self.rip, self.symbol.as_deref().map_or("not a kernel address".into(), |n| format!("{n} if nokaslr")))?;
        if let Some(v) = self.delivering {
            write!(f, ", delivering vector {v}")?;
        }
        write!(f, ", in {}", self.thread)
    }
}

/// What an L1 run printed.
#[derive(Debug)]
pub struct LabOutput {
    /// L1's whole console (its kernel, its script, and any L2 console on stdio).
    pub console: String,
    /// Wall-clock time of the run.
    pub elapsed: Duration,
    /// Whether the run was killed at its time limit.
    pub timed_out: bool,
    /// Whether the run was killed because its console went silent.
    pub stalled: bool,
    /// QEMU's own stderr.
    pub qemu_stderr: String,
}

impl LabOutput {
    /// The value of the first `@@KEY=VALUE` line.
    pub fn value(&self, key: &str) -> Option<String> {
        self.values().remove(key)
    }

    /// Every `@@KEY=VALUE` line (first occurrence wins).
    pub fn values(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        for line in self.console.lines() {
            // Markers may follow terminal escape codes on the same line.
            if let Some(rest) = line.find("@@").map(|i| line[i + 2..].trim()) {
                if let Some((k, v)) = rest.split_once('=') {
                    m.entry(k.to_string()).or_insert_with(|| v.to_string());
                }
            }
        }
        m
    }

    /// The lines between `@@BEGIN-NAME` and `@@END-NAME`.
    pub fn section(&self, name: &str) -> Option<String> {
        let begin = format!("@@BEGIN-{name}");
        let end = format!("@@END-{name}");
        let start = self.console.find(&begin)? + begin.len();
        let stop = self.console[start..].find(&end).map(|i| start + i).unwrap_or(self.console.len());
        Some(self.console[start..stop].trim_start_matches('\n').to_string())
    }

    /// Whether the script said an L2 guest stopped making progress: by the
    /// lab tests' convention a value whose name says `STALLED` (`@@A-STALLED=1`,
    /// `@@STALLED-BOOT=1`), printed when a guest's count stops. A guest whose
    /// console goes to a file stalls there unseen by the console watch.
    pub fn l2_stalled(&self) -> bool {
        self.values().keys().any(|k| k.contains("STALLED"))
    }

    /// Whether L1's own kernel panicked (its script never reported
    /// `@@L1-DONE`): TCG's emulated SVM occasionally corrupts L1's state in
    /// its KVM exit path (docs/design.md, "Known lab issues").
    pub fn l1_panicked(&self) -> bool {
        self.value("L1-DONE").is_none() && self.console.contains("Kernel panic - not syncing")
    }

    /// Whether an L2 guest crashed with a triple fault: rvirt-vmm said so on
    /// the console, or L1's trace shows the shutdown (a VMM whose stderr
    /// goes to a file says nothing on the console).
    pub fn l2_triple_faulted(&self) -> bool {
        self.console.lines().any(|l| l.contains("guest crashed:") && l.contains("triple fault")) || !self.l2_shutdowns().is_empty()
    }

    /// The L2 shutdowns (triple faults) L1's KVM traced, in order (see
    /// `L1_INIT`): what is known about a triple fault on AMD, where the
    /// VMM's own register dump shows only the reset state.
    pub fn l2_shutdowns(&self) -> Vec<L2Shutdown> {
        self.console
            .lines()
            // The annotated line, not the raw copy in a history dump (indented).
            .filter_map(|l| l.split_once("[lab-trace] ").map(|(_, rest)| rest))
            .filter(|l| !l.starts_with(' ') && l.contains("kvm_exit:") && l.contains(L2_SHUTDOWN_TRACED))
            .filter_map(|l| {
                let hex = l.split_once(" rip 0x")?.1.split_whitespace().next()?;
                let rip = u64::from_str_radix(hex, 16).ok()?;
                let symbol = l.split_once("nokaslr: ").map(|(_, s)| s.trim_end_matches(')').to_string());
                // SVM's EXITINTINFO: bit 31 valid, bits 0-7 the vector.
                let info = l.split_once(" intr_info 0x").and_then(|(_, r)| u32::from_str_radix(r.split_whitespace().next()?, 16).ok());
                let delivering = info.filter(|i| i & 0x8000_0000 != 0).map(|i| i as u8);
                let thread = l.split_whitespace().next()?.to_string();
                Some(L2Shutdown { thread, rip, symbol, delivering })
            })
            .collect()
    }

    /// Fails with the tail of the console if L1 did not finish its script with KVM available.
    pub fn check_l1(&self) -> Result<()> {
        if self.timed_out || self.stalled {
            bail!("L1 {}; console tail:\n{}", if self.stalled { "stalled" } else { "timed out" }, self.tail(60));
        }
        if self.value("L1-KVM").as_deref() != Some("yes") {
            bail!("kvm-amd did not give L1 a /dev/kvm; console tail:\n{}\nqemu: {}", self.tail(60), self.qemu_stderr);
        }
        if self.value("L1-DONE").is_none() {
            bail!("L1 script did not finish; console tail:\n{}", self.tail(60));
        }
        Ok(())
    }

    /// The last `n` lines of the console.
    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// A directory tree packed into a gzip'd newc cpio archive: an initramfs.
pub struct Initramfs {
    root: PathBuf,
}

impl Initramfs {
    /// Starts an empty tree at `root`.
    pub fn new(root: &Path) -> Result<Self> {
        let _ = std::fs::remove_dir_all(root);
        for d in ["bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "etc", "lib/modules"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        Ok(Self { root: root.to_path_buf() })
    }

    /// Adds static busybox and a link for every applet.
    pub fn add_busybox(&mut self) -> Result<()> {
        self.add_file(Path::new("/bin/busybox"), "bin/busybox")?;
        let list = Command::new("/bin/busybox").arg("--list-full").output().context("busybox --list-full")?;
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            let applet = applet.trim();
            // Linking busybox to itself would make a symlink loop.
            if applet.is_empty() || applet.ends_with("/busybox") {
                continue;
            }
            let dest = self.root.join(applet);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)?;
            }
            if !dest.exists() {
                std::os::unix::fs::symlink("/bin/busybox", &dest)?;
            }
        }
        Ok(())
    }

    /// Copies `src` to `dest` (relative to the root).
    pub fn add_file(&mut self, src: &Path, dest: &str) -> Result<()> {
        let d = self.root.join(dest.trim_start_matches('/'));
        if let Some(p) = d.parent() {
            std::fs::create_dir_all(p)?;
        }
        replace_link(&d)?;
        std::fs::copy(src, &d).with_context(|| format!("copying {} into the initramfs", src.display()))?;
        Ok(())
    }

    /// Copies a dynamically linked binary and the libraries `ldd` names.
    pub fn add_binary(&mut self, src: &Path, dest: &str) -> Result<()> {
        self.add_file(src, dest)?;
        let out = Command::new("ldd").arg(src).output().context("ldd")?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = line.split("=>").last().unwrap_or("").split_whitespace().next().unwrap_or("");
            if path.starts_with('/') {
                let p = Path::new(path);
                if !self.root.join(path.trim_start_matches('/')).exists() {
                    self.add_file(&std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()), path)?;
                }
            }
        }
        Ok(())
    }

    /// Writes `bytes` to `dest` with `mode`.
    pub fn add_bytes(&mut self, bytes: &[u8], dest: &str, mode: u32) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let d = self.root.join(dest.trim_start_matches('/'));
        if let Some(p) = d.parent() {
            std::fs::create_dir_all(p)?;
        }
        replace_link(&d)?;
        std::fs::write(&d, bytes)?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    }

    /// Packs the tree into `out` (newc cpio, gzip).
    pub fn pack(&self, out: &Path) -> Result<()> {
        let st = Command::new("sh")
            .arg("-c")
            .arg("cd \"$1\" && find . | cpio -o -H newc --quiet | gzip -1 > \"$2\"")
            .arg("sh")
            .arg(&self.root)
            .arg(out)
            .status()
            .context("cpio")?;
        if !st.success() {
            bail!("packing initramfs failed ({st})");
        }
        Ok(())
    }
}

/// Removes an applet link at `dest` before a file is written there: the
/// links point at `/bin/busybox`, an absolute name, so writing through one
/// would overwrite the host's busybox instead of the tree's.
fn replace_link(dest: &Path) -> Result<()> {
    if dest.symlink_metadata().map(|m| m.file_type().is_symlink()).unwrap_or(false) {
        std::fs::remove_file(dest).with_context(|| format!("replacing the link {}", dest.display()))?;
    }
    Ok(())
}

/// Shell lines that load `modules` from where [`l2_initramfs`] puts them,
/// in order; a module that fails prints `@@L2-INSMOD-FAILED=NAME`.
pub fn insmod_lines(modules: &[PathBuf]) -> String {
    modules
        .iter()
        .filter_map(|m| m.file_name())
        .map(|n| {
            let n = n.to_string_lossy();
            format!("insmod /lib/modules/{n} || echo \"@@L2-INSMOD-FAILED={n}\"\n")
        })
        .collect()
}

/// A busybox initramfs for L2 guests: `init` is the given script, and the
/// given kernel modules are placed in /lib/modules for it to `insmod`.
pub fn l2_initramfs(init_script: &str, modules: &[PathBuf]) -> Result<Vec<u8>> {
    let work = tempdir("l2")?;
    let mut fs = Initramfs::new(&work.join("root"))?;
    fs.add_busybox()?;
    for m in modules {
        let name = m.file_name().context("module name")?.to_string_lossy().into_owned();
        fs.add_file(m, &format!("lib/modules/{name}"))?;
    }
    fs.add_bytes(init_script.as_bytes(), "init", 0o755)?;
    let out = work.join("l2.cpio.gz");
    fs.pack(&out)?;
    let bytes = std::fs::read(&out)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(bytes)
}

/// Compiles the C program `src` into the static binary `out`: L2 initramfs
/// images carry busybox and no C library, so guest-side helpers (disk I/O,
/// CPUID dumps) are linked statically.
pub fn static_c_program(src: &Path, out: &Path) -> Result<()> {
    let st = Command::new("gcc")
        .args(["-O2", "-static", "-o"])
        .arg(out)
        .arg(src)
        .status()
        .with_context(|| format!("running gcc for {}", src.display()))?;
    if !st.success() {
        bail!("compiling {} failed ({st})", src.display());
    }
    Ok(())
}

/// Static guest-side programs, built by [`static_c_program`] from C sources
/// under `crates/lab/` into a scratch directory that is removed on drop;
/// each binary is named after its source (`benches/guest/tcpio.c` -> `tcpio`).
pub struct GuestPrograms {
    dir: PathBuf,
    paths: Vec<PathBuf>,
}

impl GuestPrograms {
    /// Compiles each source (a path relative to `crates/lab/`).
    pub fn build(sources: &[&str]) -> Result<Self> {
        let mut built = Self { dir: tempdir("programs")?, paths: Vec::new() };
        for s in sources {
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(s);
            let name = src.file_stem().with_context(|| format!("{s}: no file name"))?;
            let out = built.dir.join(name);
            static_c_program(&src, &out)?;
            built.paths.push(out);
        }
        Ok(built)
    }

    /// Every built binary, in the order of the sources.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// The binary built from the source named `name` (without `.c`).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for GuestPrograms {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Decompresses the ELF vmlinux inside a bzImage (payload located through
/// the setup header; gzip, xz, zstd and LZ4 payloads are handled).
pub fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<()> {
    let img = std::fs::read(bzimage)?;
    if img.len() < 0x250 || &img[0x202..0x206] != b"HdrS" {
        bail!("{} is not a bzImage", bzimage.display());
    }
    let setup_sects = match img[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let u32_at = |o: usize| u32::from_le_bytes([img[o], img[o + 1], img[o + 2], img[o + 3]]) as usize;
    let start = (setup_sects + 1) * 512 + u32_at(0x248);
    let len = u32_at(0x24c);
    let payload = img.get(start..start + len).context("payload outside the image")?;
    let tool: &[&str] = match payload {
        [0x1f, 0x8b, ..] => &["gzip", "-dc"],
        [0xfd, b'7', b'z', b'X', b'Z', ..] => &["xz", "-dc"],
        [0x28, 0xb5, 0x2f, 0xfd, ..] => &["zstd", "-dcq"],
        [0x02, 0x21, 0x4c, 0x18, ..] => &["lz4", "-dc"],
        _ => bail!("unknown kernel compression"),
    };
    let mut child = Command::new(tool[0])
        .args(&tool[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("running {}", tool[0]))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let data = payload.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let output = child.wait_with_output()?;
    let _ = feeder.join();
    // Decompressors may complain about the size trailer the kernel appends;
    // what matters is that a whole ELF came out.
    if output.stdout.len() < 4 || &output.stdout[..4] != b"\x7fELF" {
        bail!("{} did not yield an ELF kernel", tool[0]);
    }
    std::fs::write(out, &output.stdout)?;
    Ok(())
}

fn tempdir(tag: &str) -> Result<PathBuf> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("rvirt-lab-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writing_over_an_applet_link_replaces_the_link_not_its_target() {
        let dir = tempdir("link-test").unwrap();
        let target = dir.join("outside");
        std::fs::write(&target, b"keep").unwrap();
        let mut fs = Initramfs::new(&dir.join("root")).unwrap();
        std::os::unix::fs::symlink(&target, dir.join("root/sbin/init")).unwrap();
        fs.add_bytes(b"#!/bin/sh\n", "sbin/init", 0o755).unwrap();
        std::os::unix::fs::symlink(&target, dir.join("root/bin/sh")).unwrap();
        fs.add_file(&dir.join("root/sbin/init"), "bin/sh").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert_eq!(std::fs::read(dir.join("root/sbin/init")).unwrap(), b"#!/bin/sh\n");
        assert!(!dir.join("root/bin/sh").symlink_metadata().unwrap().file_type().is_symlink());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn guest_programs_are_named_after_their_sources_and_removed_on_drop() {
        let p = GuestPrograms::build(&["examples/guest/cpuid.c", "benches/guest/tcpio.c"]).unwrap();
        assert_eq!(p.paths(), [p.path("cpuid"), p.path("tcpio")]);
        assert!(p.paths().iter().all(|b| b.is_file()));
        let dir = p.dir.clone();
        drop(p);
        assert!(!dir.exists());
        let err = GuestPrograms::build(&["examples/guest/missing.c"]).err().expect("a missing source fails").to_string();
        assert!(err.contains("missing.c"), "{err}");
    }

    #[test]
    fn static_c_program_builds_a_static_binary_and_names_a_broken_source() {
        let dir = tempdir("static-c").unwrap();
        let out = dir.join("cpuid");
        static_c_program(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/guest/cpuid.c"), &out).unwrap();
        let elf = std::fs::read(&out).unwrap();
        assert_eq!(&elf[..4], b"\x7fELF");
        let bad = dir.join("bad.c");
        std::fs::write(&bad, "int main(void) { return }").unwrap();
        let err = static_c_program(&bad, &dir.join("bad")).unwrap_err().to_string();
        assert!(err.contains("bad.c") && err.contains("failed"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn trace_mode_is_history_or_unset() {
        assert!(!trace_history(None).unwrap());
        assert!(!trace_history(Some("")).unwrap());
        assert!(trace_history(Some("history")).unwrap());
        let e = trace_history(Some("histroy")).unwrap_err().to_string();
        assert!(e.contains("RVIRT_LAB_TRACE=histroy") && e.contains("want history"), "{e}");
    }

    #[test]
    fn finds_the_annotated_shutdown_lines_only() {
        let out = LabOutput {
            console: "[lab-trace]   rvirt-vmm-1 [001] 5.0: kvm_exit: vcpu 0 reason shutdown rip 0x1 info1 0x0 intr_info 0x80000306\n\
                      [lab-trace] rvirt-vmm-1 [001] 5.0: kvm_exit: vcpu 0 reason shutdown rip 0x100207 info1 0x0 intr_info 0x80000306\n\
                      [lab-trace] x [000] 9.0: kvm_exit: vcpu 1 reason shutdown rip 0xffffffff81001234 info1 0x0 intr_info 0x0 \
                      (kernel symbol, if L2 has nokaslr: asm_exc_page_fault+0x4)\n\
                      [lab-trace] x [000] 9.5: kvm_exit: vcpu 1 reason npf rip 0x5 info1 0x0\n"
                .into(),
            elapsed: Duration::ZERO,
            timed_out: false,
            stalled: false,
            qemu_stderr: String::new(),
        };
        assert_eq!(
            out.l2_shutdowns(),
            vec![
                L2Shutdown { thread: "rvirt-vmm-1".into(), rip: 0x100207, symbol: None, delivering: Some(6) },
                L2Shutdown { thread: "x".into(), rip: 0xffff_ffff_8100_1234, symbol: Some("asm_exc_page_fault+0x4".into()), delivering: None },
            ]
        );
        let shown: Vec<String> = out.l2_shutdowns().iter().map(L2Shutdown::to_string).collect();
        assert_eq!(
            shown,
            [
                "0x100207 (not a kernel address), delivering vector 6, in rvirt-vmm-1",
                "0xffffffff81001234 (asm_exc_page_fault+0x4 if nokaslr), in x"
            ]
        );
    }

    #[test]
    fn parses_values_and_sections() {
        let out = LabOutput {
            console: "noise\n\x1b[2J@@A=1\n@@BEGIN-L2\nhello\nworld\n@@END-L2\n@@A=2\n@@B=x=y\n".into(),
            elapsed: Duration::ZERO,
            timed_out: false,
            stalled: false,
            qemu_stderr: String::new(),
        };
        assert_eq!(out.value("A").as_deref(), Some("1"));
        assert_eq!(out.value("B").as_deref(), Some("x=y"));
        assert!(!out.l2_stalled());
        let stalled = LabOutput { console: "@@L1-DONE=0\n@@TWO-STALLED=1\n".into(), elapsed: Duration::ZERO, timed_out: false, stalled: false, qemu_stderr: String::new() };
        assert!(stalled.l2_stalled());
        assert_eq!(out.section("L2").as_deref(), Some("hello\nworld\n"));
        assert!(out.section("L3").is_none());
        assert!(out.check_l1().is_err());
    }
}
