//! A cgroup (v2) per running domain: `<memtune>` and `<cputune>` limits,
//! and a cap on the VMM's threads. The VMM is moved in before it runs (from
//! the child side of the fork), so every thread it makes is counted.
//!
//! Hosts on cgroup v1, or whose v2 hierarchy lacks the memory, cpu and pids
//! controllers (a hybrid layout leaves them to v1), run domains without a
//! cgroup; a domain that asks for limits there is refused with the reason.

use std::path::{Path, PathBuf};

use rvirt_domain::Tuning;

/// `statfs` type of a cgroup2 mount.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// Controllers rvirt's groups use.
const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
/// Threads (and processes) a VMM's group may hold: vCPUs (at most 254),
/// device workers and the API's few, with room to spare.
pub const PIDS_MAX: u32 = 1024;

fn is_cgroup2(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: statfs writes into the struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path we own, and a struct statfs fills.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC }
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn v2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"].into_iter().map(PathBuf::from).find(|p| is_cgroup2(p))
}

/// The controllers the v2 root offers.
fn controllers(root: &Path) -> Vec<String> {
    std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default().split_whitespace().map(str::to_string).collect()
}

/// cgroup v1 `cpu.shares` (libvirt's `<shares>`) as a v2 `cpu.weight`,
/// the conversion systemd and libvirt use (2..262144 onto 1..10000).
pub fn weight_from_shares(shares: u64) -> u64 {
    1 + (shares.clamp(2, 262_144) - 2) * 9_999 / 262_142
}

/// The limit files a domain's group gets, as (file, value).
pub fn limit_files(t: &Tuning) -> Vec<(&'static str, String)> {
    let mut v = vec![("pids.max", PIDS_MAX.to_string())];
    if let Some(h) = t.hard_limit_kib {
        v.push(("memory.max", (h.saturating_mul(1024)).to_string()));
    }
    if let Some(s) = t.soft_limit_kib {
        v.push(("memory.high", (s.saturating_mul(1024)).to_string()));
    }
    if let Some(sw) = t.swap_hard_limit_kib {
        // libvirt's swap_hard_limit is memory plus swap; v2 counts swap alone.
        let swap = sw.saturating_sub(t.hard_limit_kib.unwrap_or(0));
        v.push(("memory.swap.max", (swap.saturating_mul(1024)).to_string()));
    }
    if let Some(s) = t.shares {
        v.push(("cpu.weight", weight_from_shares(s).to_string()));
    }
    if t.period_us.is_some() || t.quota_us.is_some() {
        let period = t.period_us.unwrap_or(100_000);
        let quota = match t.quota_us {
            Some(q) if q > 0 => q.to_string(),
            _ => "max".into(),
        };
        v.push(("cpu.max", format!("{quota} {period}")));
    }
    v
}

/// A domain's group, ready for its VMM.
#[derive(Clone, Debug)]
pub struct DomainCgroup {
    /// The group's directory.
    pub path: PathBuf,
}

impl DomainCgroup {
    /// The file the VMM writes its pid into to join.
    pub fn procs(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("writing '{value}' to {}: {e}", path.display()))
}

/// Makes (afresh) the group of domain `name` under `root` with `t`'s limits.
/// `None` when the host has no usable cgroup v2 and `t` asks for no limit.
pub fn prepare(root: Option<&Path>, name: &str, t: &Tuning) -> Result<Option<DomainCgroup>, String> {
    let usable = root.filter(|r| {
        let have = controllers(r);
        CONTROLLERS.iter().all(|c| have.iter().any(|h| h == c))
    });
    let Some(root) = usable else {
        if t.has_cgroup_limits() {
            let what = match root {
                Some(r) => format!("its cgroup v2 hierarchy at {} offers [{}]", r.display(), controllers(r).join(" ")),
                None => "it has no cgroup v2 hierarchy".into(),
            };
            return Err(format!(
                "<memtune>/<cputune> limits need cgroup v2 with the memory, cpu and pids controllers, and {what} \
                 (a hybrid cgroup v1 host: boot with systemd.unified_cgroup_hierarchy=1); remove the limits to run it here"
            ));
        }
        return Ok(None);
    };
    let enable = CONTROLLERS.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(" ");
    let base = root.join("rvirt");
    // The root is exempt from "no processes in inner groups"; rvirt's own group holds none.
    let _ = write(&root.join("cgroup.subtree_control"), &enable);
    std::fs::create_dir_all(&base).map_err(|e| format!("creating {}: {e}", base.display()))?;
    write(&base.join("cgroup.subtree_control"), &enable)?;
    let group = base.join(name);
    if group.exists() {
        // Left by the domain's previous run (kept so its counters, such as
        // memory.events, can be read after it ends).
        std::fs::remove_dir(&group).map_err(|e| format!("removing the previous run's cgroup {}: {e}", group.display()))?;
    }
    std::fs::create_dir(&group).map_err(|e| format!("creating {}: {e}", group.display()))?;
    for (file, value) in limit_files(t) {
        write(&group.join(file), &value)?;
    }
    Ok(Some(DomainCgroup { path: group }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_map_to_cgroup_v2_files() {
        let t = Tuning {
            hard_limit_kib: Some(256 << 10),
            soft_limit_kib: Some(128 << 10),
            swap_hard_limit_kib: Some(512 << 10),
            shares: Some(1024),
            period_us: Some(50_000),
            quota_us: Some(25_000),
            ..Tuning::default()
        };
        let f = limit_files(&t);
        let get = |k: &str| f.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("memory.max"), Some("268435456"));
        assert_eq!(get("memory.high"), Some("134217728"));
        assert_eq!(get("memory.swap.max"), Some("268435456"));
        assert_eq!(get("cpu.weight"), Some("39"), "1024 shares, systemd's conversion");
        assert_eq!(get("cpu.max"), Some("25000 50000"));
        assert_eq!(get("pids.max"), Some("1024"));
        assert_eq!(weight_from_shares(2), 1);
        assert_eq!(weight_from_shares(262_144), 10_000);
        let unlimited = Tuning { quota_us: Some(-1), ..Tuning::default() };
        assert_eq!(limit_files(&unlimited).iter().find(|(n, _)| *n == "cpu.max").map(|(_, v)| v.as_str()), Some("max 100000"));
    }

    #[test]
    fn limits_without_cgroup_v2_are_refused_with_the_reason() {
        let t = Tuning { hard_limit_kib: Some(1 << 20), ..Tuning::default() };
        let e = prepare(None, "d", &t).unwrap_err();
        assert!(e.contains("cgroup v2") && e.contains("no cgroup v2 hierarchy"), "{e}");
        assert!(prepare(None, "d", &Tuning::default()).unwrap().is_none(), "no limits: runs without a group");
    }
}
