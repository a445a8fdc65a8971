//! The rvirt-vmm binary's answers to bad input: one clear line on stderr and
//! a non-zero exit, never a panic.

use std::process::Command;

fn vmm(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rvirt-vmm")).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

fn kernel_file() -> std::path::PathBuf {
    // A file that is a valid bzImage header-wise, so argument checks are reached.
    let p = std::env::temp_dir().join(format!("rvirt-cli-kernel-{}", std::process::id()));
    let mut img = vec![0u8; 4096];
    img[0x202..0x206].copy_from_slice(b"HdrS");
    std::fs::write(&p, img).unwrap();
    p
}

fn expect_error(args: &[&str], needle: &str) {
    let (code, stderr) = vmm(args);
    assert_ne!(code, 0, "{args:?} should fail");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(stderr.contains(needle), "{args:?}: expected '{needle}' in:\n{stderr}");
    assert_eq!(lines.len(), 1, "{args:?}: error should be one line:\n{stderr}");
    assert!(lines[0].starts_with("rvirt-vmm: "), "{stderr}");
}

#[test]
fn bad_arguments_get_one_clear_line() {
    let k = kernel_file();
    let k = k.to_str().unwrap();
    expect_error(&["--kernel", "/nonexistent/vmlinuz"], "kernel /nonexistent/vmlinuz: No such file");
    expect_error(&["--kernel", "/etc/hostname"], "not a Linux kernel");
    expect_error(&["--kernel", "/"], "not a regular file");
    expect_error(&["--kernel", k, "--cpus", "0"], "--cpus must be between 1 and 254");
    expect_error(&["--kernel", k, "--cpus", "300"], "--cpus");
    expect_error(&["--kernel", k, "--memory", "lots"], "invalid memory size 'lots'");
    expect_error(&["--kernel", k, "--memory", "1M"], "at least 16 MiB");
    expect_error(&["--kernel", k, "--memory", "20T"], "host has only");
    expect_error(&["--kernel", k, "--initrd", "/nonexistent/initrd"], "initramfs /nonexistent/initrd");
    expect_error(&["--kernel", k, "--serial", "tcp:1"], "invalid --serial 'tcp:1'");
    expect_error(&["--kernel", k, "--on-reboot", "halt"], "invalid --on-reboot 'halt'");
    expect_error(&["--kernel", k, "--api-socket", "/nonexistent/dir/vm.sock"], "API socket /nonexistent/dir/vm.sock");
}

#[test]
fn bad_confinement_arguments_get_one_clear_line() {
    let k = kernel_file();
    let k = k.to_str().unwrap();
    expect_error(&["--kernel", k, "--seccomp", "strict"], "--seccomp must be kill, log or off, not 'strict'");
    for user in ["0:0", "4242", "a:b", "4242:0"] {
        expect_error(&["--kernel", k, "--jail", "--jail-user", user], "--jail-user must be UID:GID with numbers above 0");
    }
    expect_error(&["--kernel", k, "--vcpu-pin", "1:0"], "--vcpu-pin 1: the VM has 1 vCPUs");
    expect_error(&["--kernel", k, "--vcpu-pin", "0"], "--vcpu-pin must be N:CPUS");
    expect_error(&["--kernel", k, "--vcpu-pin", "0:a"], "--vcpu-pin: 'a' is not a list of host CPUs");
    expect_error(&["--kernel", k, "--emulator-pin", "3-1"], "--emulator-pin: '3-1' is not a list of host CPUs");
    expect_error(&["--kernel", k, "--emulator-pin", "5000"], "--emulator-pin: '5000' is not a list of host CPUs");
    expect_error(&["--kernel", k, "--emulator-pin", "1000"], "none this process may run on");
}

#[test]
fn bad_virtio_device_arguments_get_one_clear_line() {
    let k = kernel_file();
    let k = k.to_str().unwrap();
    let dir = std::env::temp_dir().join(format!("rvirt-cli-disks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad_qcow2 = dir.join("bad.qcow2");
    std::fs::write(&bad_qcow2, b"QFI\xfb and then nothing a header needs").unwrap();
    let raw = dir.join("plain.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let disk = |spec: String| ["--kernel".to_string(), k.to_string(), "--disk".to_string(), spec];
    let run = |args: [String; 4], needle: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_error(&args, needle);
    };
    run(disk("path=/nonexistent/d.raw".into()), "--disk: /nonexistent/d.raw: No such file");
    run(disk("/img/a.raw".into()), "invalid --disk '/img/a.raw'");
    run(disk("path=a,cache=none".into()), "unknown key 'cache'");
    run(disk(format!("path={},format=qcow2", bad_qcow2.display())), "not a qcow2 image");
    run(disk(format!("path={},format=qcow2", raw.display())), "not a qcow2 image");
    run(disk(format!("path={},format=qcow2,direct=on", raw.display())), "not a qcow2 image");
    expect_error(&["--kernel", k, "--net", "tap="], "tap=NAME (1-15 characters) is required");
    expect_error(&["--kernel", k, "--net", "tap=t0,mac=01:00:00:00:00:00"], "multicast");
    expect_error(&["--kernel", k, "--net", "tap=t0", "--net", "tap=t0"], "tap 't0' is given to two --net cards");
    expect_error(&["--kernel", k, "--console", "tcp:1"], "invalid --console 'tcp:1'");
    expect_error(&["--kernel", k, "--console", "stdio"], "--console stdio needs --serial");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn kernel_and_firmware_arguments_that_do_not_go_together_are_usage_errors() {
    for (args, needle) in [
        (&["--kernel", "/k", "--firmware", "/f"][..], "--firmware"),
        (&["--initrd", "/i"][..], "--kernel"),
        (&["--cmdline", "quiet"][..], "--kernel"),
        (&["--kernel", "/k", "--reboot-timeout", "5"][..], "--reboot-timeout"),
        (&["--kernel", "/k", "--boot-order", "c"][..], "--boot-order"),
        (&["--kernel", "/k", "--boot-menu", "500"][..], "--boot-menu"),
    ] {
        let (code, stderr) = vmm(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    expect_error(&["--firmware", "/nonexistent/bios.bin"], "firmware /nonexistent/bios.bin");
    expect_error(&["--firmware", "/etc/hostname"], "expected a ROM image");
    expect_error(&["--uuid", "not-a-uuid"], "invalid --uuid 'not-a-uuid'");
    expect_error(&["--boot-order", "cz"], "--boot-order 'cz': 'z' is not a boot device");
}

#[test]
fn a_config_file_is_read_whole_or_refused_with_the_reason() {
    let dir = std::env::temp_dir().join(format!("rvirt-cli-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let k = kernel_file();
    let mut cfg = rvirt_api::config::VmConfig::new(&k);
    cfg.vcpus = 0;
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    // The value is checked as the options are: the same words.
    let zero = write("zero.json", &cfg.to_json().unwrap());
    expect_error(&["--config", &zero], "--cpus must be between 1 and 254");
    cfg.vcpus = 1;
    let json = cfg.to_json().unwrap();
    let unknown = write("unknown.json", &json.replacen("\"rng\"", "\"rgn\"", 1));
    expect_error(&["--config", &unknown], "unknown field `rgn`");
    let truncated = write("truncated.json", &json[..json.len() / 2]);
    expect_error(&["--config", &truncated], "EOF while parsing");
    let huge = write("huge.json", &" ".repeat(2 << 20));
    expect_error(&["--config", &huge], "larger than 1048576 bytes");
    expect_error(&["--config", "/nonexistent/vm.json"], "--config /nonexistent/vm.json: No such file");
    // The file is the whole VM: options describing it too are a usage error.
    let (code, stderr) = vmm(&["--config", &zero, "--cpus", "2"]);
    assert_eq!(code, 2, "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn help_and_version_succeed() {
    let (code, _) = vmm(&["--version"]);
    assert_eq!(code, 0);
    let out = Command::new(env!("CARGO_BIN_EXE_rvirt-vmm")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--kernel", "--initrd", "--cmdline", "--cpus", "--memory", "--serial", "--api-socket", "--on-reboot", "--disk", "--net",
        "--rng", "--balloon", "--console", "--firmware", "--uuid", "--reboot-timeout",
        "--boot-order", "--boot-menu",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}

fn mkfifo(p: &std::path::Path) {
    let _ = std::fs::remove_file(p);
    let status = Command::new("mkfifo").arg(p).status().unwrap();
    assert!(status.success());
}

#[test]
fn fifos_as_kernel_initrd_disk_or_backing_file_are_refused_at_once() {
    // A blocking open of a FIFO with no writer would hang the VMM forever.
    let k = kernel_file();
    let k = k.to_str().unwrap();
    let dir = std::env::temp_dir().join(format!("rvirt-cli-fifos-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    let f = fifo.to_str().unwrap();
    expect_error(&["--kernel", f], "is a FIFO");
    expect_error(&["--kernel", k, "--initrd", f], "is a FIFO");
    expect_error(&["--kernel", k, "--disk", &format!("path={f}")], "is a FIFO");
    // A qcow2 overlay whose backing file is a FIFO (made without opening it).
    let top = dir.join("top.qcow2");
    let out = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", f]).arg(&top).arg("1M").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let spec = format!("path={},format=qcow2", top.display());
    expect_error(&["--kernel", k, "--disk", &spec], "is a FIFO");
    let spec = format!("path={},format=qcow2,backing={f}:raw", top.display());
    expect_error(&["--kernel", k, "--disk", &spec], "is a FIFO");
    std::fs::remove_dir_all(&dir).unwrap();
}
