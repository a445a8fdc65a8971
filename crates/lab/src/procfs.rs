//! What tests read about a process from `/proc`: a status field, its
//! children, the files its descriptors point at.

use std::path::PathBuf;

/// The value of `field` (with its colon, e.g. `"Seccomp:"`) in `/proc/PID/status`, trimmed.
/// Panics, naming the field, when the process or the field is missing (a test helper).
pub fn status_field(pid: u32, field: &str) -> String {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    st.lines().find_map(|l| l.strip_prefix(field)).unwrap_or_else(|| panic!("{field} in {st}")).trim().to_string()
}

/// The processes whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // Fields after the parenthesised name: state, ppid, ...
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok()) == Some(pid)
        })
        .collect()
}

/// Where every descriptor of process `pid` points (`/dev/kvm`, `anon_inode:[eventfd]`, a file's path, ...).
pub fn open_files(pid: u32) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .collect()
}
