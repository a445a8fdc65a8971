//! What the snapshot and migration lab tests share about their counting
//! guest, which prints `%%TICK=N` once a second and `%%SUM=…` (its tmpfs
//! file's checksum) every few seconds: the L1 shell helpers that wait for
//! a count, and the parsers of its serial log. (`%%`, not `@@`, keeps the
//! guest's lines out of the L1 script's values.)

/// L1 shell functions: `ticks LOG` (the last count in LOG) and
/// `wait_tick LOG N` (waits up to 10 minutes for the count N, saying so
/// every 20 s so the lab does not take the wait for a stall).
pub const SHELL: &str = r#"
ticks() { grep -o '%%TICK=[0-9]*' "$1" 2>/dev/null | tail -1 | cut -d= -f2; }
wait_tick() {
  for i in $(seq 1 1200); do
    t=$(ticks "$1"); [ -n "$t" ] && [ "$t" -ge "$2" ] && return 0
    sleep 0.5; [ $((i % 40)) = 0 ] && echo "[lab] $1 at tick ${t:-none}, waiting for $2"
  done
  return 1
}
"#;

/// The numbers after `%%KEY=` in `log`, in order.
pub fn numbers(log: &str, key: &str) -> Vec<u64> {
    let tag = format!("%%{key}=");
    whole_lines(log).filter_map(|l| l.find(&tag).map(|i| &l[i + tag.len()..])).filter_map(|v| v.trim().parse().ok()).collect()
}

/// Every checksum of its tmpfs file the guest printed, in order.
pub fn sums(log: &str) -> Vec<String> {
    words(log, "SUM")
}

/// The words after `%%KEY=` in `log`, in order.
pub fn words(log: &str, key: &str) -> Vec<String> {
    let tag = format!("%%{key}=");
    whole_lines(log).filter_map(|l| l.find(&tag).map(|i| l[i + tag.len()..].trim().to_string())).collect()
}

/// The lines of `log` that ended: a guest stopped while printing leaves
/// its last line cut (`%%TICK=1` of 16), which would read as a wrong value.
fn whole_lines(log: &str) -> std::str::Lines<'_> {
    log[..log.rfind('\n').map_or(0, |i| i + 1)].lines()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_last_line_is_not_read() {
        let log = "%%TICK=15\r\n%%DISK=0c1fad197ab22751\n%%TICK=1";
        assert_eq!(numbers(log, "TICK"), [15]);
        assert_eq!(words(log, "DISK"), ["0c1fad197ab22751"]);
        assert_eq!(numbers("%%TICK=16\n", "TICK"), [16]);
        assert!(numbers("%%TICK=16", "TICK").is_empty());
    }
}
