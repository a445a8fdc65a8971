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
fn missing_required_argument_is_a_usage_error() {
    let (code, stderr) = vmm(&["--cpus", "2"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--kernel"), "{stderr}");
}

#[test]
fn help_and_version_succeed() {
    let (code, _) = vmm(&["--version"]);
    assert_eq!(code, 0);
    let out = Command::new(env!("CARGO_BIN_EXE_rvirt-vmm")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--kernel", "--initrd", "--cmdline", "--cpus", "--memory", "--serial", "--api-socket", "--on-reboot"] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}
