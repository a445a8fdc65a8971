#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60) with cargo-fuzz on
# nightly, keeps only the corpus entries that add coverage (cargo fuzz cmin),
# and prints executions, speed and coverage per target. Inputs that crash
# are left in crates/*/fuzz/artifacts/; copy them to fuzz/regressions/ so
# `cargo test` replays them.
#   scripts/fuzz-report.sh [SECONDS]
set -uo pipefail
secs=${1:-60}
root=$(cd "$(dirname "$0")/.." && pwd)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
rustup toolchain list | grep -q nightly || { echo "needs a nightly toolchain (rustup toolchain install nightly)"; exit 1; }
targets="block:qcow2_header block:qcow2_image virtio-devices:virtio_blk_queue virtio-devices:virtio_chains
virtio-devices:virtio_net_rx domain:domain_xml domain:storage_xml domain:rvirtd_request api:control_request scsi:scsi_commands
vmm:vm_state"
printf "%-18s %12s %9s %7s %7s %8s %s\n" target executions exec/s cov ft corpus crashes
for spec in $targets; do
  crate=${spec%%:*} t=${spec#*:} dir=$root/crates/$crate/fuzz
  mkdir -p "$dir/corpus/$t"
  seeds=()
  # Real libvirt definitions are seeds for the XML target when the shared corpus is beside the repository.
  [ "$t" = domain_xml ] && [ -d "$root/../shared/libvirt-xml-corpus" ] && seeds=("$root/../shared/libvirt-xml-corpus")
  log=$(mktemp)
  (cd "$dir" && cargo +nightly fuzz run "$t" "corpus/$t" "${seeds[@]}" -- -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048) >"$log" 2>&1
  (cd "$dir" && cargo +nightly fuzz cmin "$t" "corpus/$t") >/dev/null 2>&1
  execs=$(grep -o 'number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
  speed=$(grep -o 'average_exec_per_sec: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
  last=$(grep -E '^#[0-9]+' "$log" | tail -1)
  cov=$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.*ft: \([0-9]*\).*/\1/p' <<<"$last")
  corpus=$(ls "$dir/corpus/$t" | wc -l)
  crashes=$(ls "$dir/artifacts/$t" 2>/dev/null | wc -l)
  printf "%-18s %12s %9s %7s %7s %8s %s\n" "$t" "${execs:-?}" "${speed:-?}" "${cov:-?}" "${ft:-?}" "$corpus" "$crashes"
  rm -f "$log"
done
