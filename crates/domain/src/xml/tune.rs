//! `<memtune>` and `<cputune>`: memory and CPU limits, which rvirtd applies
//! through the domain's cgroup (v2), and CPU pinning, which the VMM applies
//! to its own threads.

use std::fmt::Write;

use roxmltree::Node;

use super::{elements, memory_kib, Cx, DomainXml, XmlError};

/// Highest host CPU number a set may name.
pub const MAX_HOST_CPU: usize = 4095;

/// A set of host CPUs in libvirt's syntax (`0-3,^2,6`), kept as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuSet {
    /// The text as written.
    pub text: String,
    /// The CPUs, ascending.
    pub cpus: Vec<usize>,
}

impl CpuSet {
    /// Parses `0-3,^2,6`: ranges and single CPUs, `^N` excluding one.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("'{text}' is not a CPU set ({why}; write it as 0-3,^2,6)");
        let mut on = std::collections::BTreeSet::new();
        let mut off = std::collections::BTreeSet::new();
        for part in text.split(',').map(str::trim) {
            let num = |s: &str| -> Result<usize, String> {
                let n: usize = s.trim().parse().map_err(|_| bad("a part is not a number"))?;
                if n > MAX_HOST_CPU {
                    return Err(bad(&format!("CPU {n} is above {MAX_HOST_CPU}")));
                }
                Ok(n)
            };
            if let Some(x) = part.strip_prefix('^') {
                off.insert(num(x)?);
            } else if let Some((a, b)) = part.split_once('-') {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(bad("a range runs backwards"));
                }
                on.extend(a..=b);
            } else {
                on.insert(num(part)?);
            }
        }
        let cpus: Vec<usize> = on.difference(&off).copied().collect();
        if cpus.is_empty() {
            return Err(bad("it names no CPU"));
        }
        Ok(Self { text: text.trim().to_string(), cpus })
    }

    /// The CPUs as a list for `cpuset.cpus` and rvirt-vmm (`0,1,5`).
    pub fn list(&self) -> String {
        self.cpus.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
    }
}

/// What `<memtune>` and `<cputune>` ask for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tuning {
    /// `<memtune><hard_limit>`: the VM's memory use is capped here (cgroup `memory.max`).
    pub hard_limit_kib: Option<u64>,
    /// `<memtune><soft_limit>`: reclaimed first above this (`memory.high`).
    pub soft_limit_kib: Option<u64>,
    /// `<memtune><swap_hard_limit>`: memory plus swap (`memory.swap.max` = this − hard limit).
    pub swap_hard_limit_kib: Option<u64>,
    /// `<cputune><shares>`: relative CPU weight (cgroup v1 shares; `cpu.weight` in v2).
    pub shares: Option<u64>,
    /// `<cputune><period>` in µs.
    pub period_us: Option<u64>,
    /// `<cputune><quota>` in µs per period; negative: unlimited.
    pub quota_us: Option<i64>,
    /// `<cputune><vcpupin vcpu cpuset>`.
    pub vcpupin: Vec<(u32, CpuSet)>,
    /// `<cputune><emulatorpin cpuset>`: the VMM's threads other than vCPUs.
    pub emulatorpin: Option<CpuSet>,
}

impl Tuning {
    /// Whether anything needs the domain's cgroup (pinning does not).
    pub fn has_cgroup_limits(&self) -> bool {
        self.hard_limit_kib.is_some()
            || self.soft_limit_kib.is_some()
            || self.swap_hard_limit_kib.is_some()
            || self.shares.is_some()
            || self.period_us.is_some()
            || self.quota_us.is_some()
    }
}

fn number<T: std::str::FromStr>(cx: &Cx, n: Node, path: &str, range: std::ops::RangeInclusive<T>) -> Result<T, XmlError>
where
    T: PartialOrd + std::fmt::Display + Copy,
{
    let t = cx.text(n, path)?;
    match t.parse::<T>() {
        Ok(v) if range.contains(&v) => Ok(v),
        _ => Err(cx.err(n, path, format!("'{t}' is not a number from {} to {}", range.start(), range.end()))),
    }
}

impl DomainXml {
    /// Reads `<memtune>`.
    pub(super) fn parse_memtune(&mut self, cx: &Cx, n: Node) -> Result<(), XmlError> {
        for c in elements(n) {
            match c.tag_name().name() {
                "hard_limit" => self.tuning.hard_limit_kib = Some(memory_kib(cx, c, "memtune/hard_limit")?),
                "soft_limit" => self.tuning.soft_limit_kib = Some(memory_kib(cx, c, "memtune/soft_limit")?),
                "swap_hard_limit" => self.tuning.swap_hard_limit_kib = Some(memory_kib(cx, c, "memtune/swap_hard_limit")?),
                _ => self.unknown.push(cx.unknown("memtune", c)),
            }
        }
        if let (Some(h), Some(s)) = (self.tuning.hard_limit_kib, self.tuning.swap_hard_limit_kib) {
            if s < h {
                return Err(cx.err(n, "memtune", "swap_hard_limit (memory plus swap) is below hard_limit"));
            }
        }
        Ok(())
    }

    /// Reads `<cputune>`.
    pub(super) fn parse_cputune(&mut self, cx: &Cx, n: Node) -> Result<(), XmlError> {
        for c in elements(n) {
            match c.tag_name().name() {
                "shares" => self.tuning.shares = Some(number(cx, c, "cputune/shares", 2u64..=262_144)?),
                "period" => self.tuning.period_us = Some(number(cx, c, "cputune/period", 1_000u64..=1_000_000)?),
                "quota" => {
                    let q: i64 = number(cx, c, "cputune/quota", -1i64..=17_592_186_044_415)?;
                    if (0..1_000).contains(&q) {
                        return Err(cx.err(c, "cputune/quota", format!("'{q}' is below 1000 µs (-1 means unlimited)")));
                    }
                    self.tuning.quota_us = Some(q);
                }
                "vcpupin" => {
                    let v: u32 = cx.attr(c, "cputune/vcpupin", "vcpu")?.parse().map_err(|_| cx.err(c, "cputune/vcpupin", "vcpu='...' is not a number"))?;
                    let set = CpuSet::parse(cx.attr(c, "cputune/vcpupin", "cpuset")?).map_err(|e| cx.err(c, "cputune/vcpupin", e))?;
                    if self.tuning.vcpupin.iter().any(|(x, _)| *x == v) {
                        return Err(cx.err(c, "cputune/vcpupin", format!("vCPU {v} is pinned twice")));
                    }
                    self.tuning.vcpupin.push((v, set));
                }
                "emulatorpin" => {
                    let set = CpuSet::parse(cx.attr(c, "cputune/emulatorpin", "cpuset")?).map_err(|e| cx.err(c, "cputune/emulatorpin", e))?;
                    self.tuning.emulatorpin = Some(set);
                }
                _ => self.unknown.push(cx.unknown("cputune", c)),
            }
        }
        Ok(())
    }

    /// Checks pins against the vCPU count (known once the whole domain is read).
    pub(super) fn check_tuning(&self, cx: &Cx, root: Node) -> Result<(), XmlError> {
        if let Some((v, _)) = self.tuning.vcpupin.iter().find(|(v, _)| *v >= self.vcpus) {
            return Err(cx.err(root, "cputune/vcpupin", format!("vCPU {v} does not exist (the domain has {})", self.vcpus)));
        }
        Ok(())
    }

    /// `<memtune>` and `<cputune>` as XML (nothing when empty), unknown children kept.
    pub(crate) fn tuning_xml(&self, o: &mut String) {
        let t = &self.tuning;
        let kept = |parent: &str| self.unknown.iter().filter(|u| u.parent == parent).count();
        if t.hard_limit_kib.is_some() || t.soft_limit_kib.is_some() || t.swap_hard_limit_kib.is_some() || kept("memtune") > 0 {
            let _ = writeln!(o, "  <memtune>");
            for (tag, v) in [("hard_limit", t.hard_limit_kib), ("soft_limit", t.soft_limit_kib), ("swap_hard_limit", t.swap_hard_limit_kib)] {
                if let Some(v) = v {
                    let _ = writeln!(o, "    <{tag} unit='KiB'>{v}</{tag}>");
                }
            }
            crate::write::unknown_in(o, &self.unknown, "memtune", "    ");
            let _ = writeln!(o, "  </memtune>");
        }
        let cpu = t.shares.is_some() || t.period_us.is_some() || t.quota_us.is_some() || !t.vcpupin.is_empty() || t.emulatorpin.is_some();
        if cpu || kept("cputune") > 0 {
            let _ = writeln!(o, "  <cputune>");
            if let Some(s) = t.shares {
                let _ = writeln!(o, "    <shares>{s}</shares>");
            }
            if let Some(p) = t.period_us {
                let _ = writeln!(o, "    <period>{p}</period>");
            }
            if let Some(q) = t.quota_us {
                let _ = writeln!(o, "    <quota>{q}</quota>");
            }
            for (v, set) in &t.vcpupin {
                let _ = writeln!(o, "    <vcpupin vcpu='{v}' cpuset='{}'/>", set.text);
            }
            if let Some(set) = &t.emulatorpin {
                let _ = writeln!(o, "    <emulatorpin cpuset='{}'/>", set.text);
            }
            crate::write::unknown_in(o, &self.unknown, "cputune", "    ");
            let _ = writeln!(o, "  </cputune>");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_sets_read_as_libvirt_writes_them() {
        assert_eq!(CpuSet::parse("0-3,^2,6").unwrap().cpus, [0, 1, 3, 6]);
        assert_eq!(CpuSet::parse(" 5 ").unwrap().list(), "5");
        for bad in ["", "a", "3-1", "^1", "0-5000", "1,,2"] {
            assert!(CpuSet::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tuning_round_trips_and_is_checked() {
        let xml = "<domain type='kvm'><name>t</name><memory unit='MiB'>512</memory><vcpu>2</vcpu>\
            <memtune><hard_limit unit='MiB'>300</hard_limit><soft_limit unit='MiB'>200</soft_limit><min_guarantee>1</min_guarantee></memtune>\
            <cputune><shares>2048</shares><period>100000</period><quota>50000</quota><vcpupin vcpu='1' cpuset='0-1,^0'/>\
            <emulatorpin cpuset='0'/><emulator_period>1000</emulator_period></cputune><os><type>hvm</type><kernel>/k</kernel></os></domain>";
        let d = DomainXml::parse(xml).unwrap();
        assert_eq!(d.tuning.hard_limit_kib, Some(300 << 10));
        assert_eq!(d.tuning.quota_us, Some(50_000));
        assert_eq!(d.tuning.vcpupin[0].1.cpus, [1]);
        assert!(d.tuning.has_cgroup_limits());
        let again = DomainXml::parse(&d.to_xml()).unwrap();
        assert_eq!(again.tuning, d.tuning);
        let out = d.to_xml();
        assert!(out.contains("<min_guarantee>1</min_guarantee>") && out.contains("<emulator_period>1000</emulator_period>"), "{out}");
        let e = DomainXml::parse(&xml.replace("vcpu='1'", "vcpu='2'")).unwrap_err().to_string();
        assert!(e.contains("vCPU 2 does not exist"), "{e}");
        let e = DomainXml::parse(&xml.replace("<quota>50000", "<quota>10")).unwrap_err().to_string();
        assert!(e.contains("below 1000"), "{e}");
        let e = DomainXml::parse(&xml.replace("<shares>2048", "<shares>1")).unwrap_err().to_string();
        assert!(e.contains("from 2 to 262144"), "{e}");
    }
}
