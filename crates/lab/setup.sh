#!/usr/bin/env bash
# Prepares the nested KVM lab on a Debian 12 host; safe to run again (a
# second run only checks). Usage: setup.sh CACHE_DIR
#  - installs qemu-system-x86 together with the matching qemu-utils (installing
#    it alone would remove qemu-img/qemu-io), busybox-static, cpio, lz4, and
#    gcc with libc6-dev for the static guest-side helpers (static_c_program),
#    seabios (the firmware rvirt-vmm boots disks through), syslinux,
#    mtools, dosfstools and e2fsprogs (the firmware tests' bootable disks),
#    and xorriso, genisoimage (isoinfo) and isolinux (CD images and their
#    independent readers);
#  - downloads Debian's cloud kernel package once and unpacks the kernel and
#    the modules the lab needs into CACHE_DIR/kernel.
set -euo pipefail
cache=${1:?usage: setup.sh CACHE_DIR}
mkdir -p "$cache"

have_pkgs() {
  command -v qemu-system-x86_64 >/dev/null && command -v qemu-img >/dev/null &&
    command -v qemu-io >/dev/null && command -v cpio >/dev/null && command -v lz4 >/dev/null &&
    [ -x /bin/busybox ] && dpkg -s busybox-static >/dev/null 2>&1 &&
    command -v gcc >/dev/null && dpkg -s libc6-dev >/dev/null 2>&1 &&
    [ -f /usr/share/seabios/bios-256k.bin ] && command -v syslinux >/dev/null &&
    [ -f /usr/lib/syslinux/mbr/mbr.bin ] && command -v mcopy >/dev/null && command -v mkfs.fat >/dev/null &&
    command -v mke2fs >/dev/null && command -v xorriso >/dev/null && command -v isoinfo >/dev/null &&
    [ -f /usr/lib/ISOLINUX/isohdpfx.bin ]
}

apt_updated=
apt_update() { [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }; }

if ! have_pkgs; then
  if [ "$(id -u)" != 0 ]; then
    echo "lab setup: missing packages and not root; install qemu-system-x86 qemu-utils busybox-static cpio lz4 gcc libc6-dev seabios syslinux syslinux-common mtools dosfstools e2fsprogs xorriso genisoimage isolinux" >&2
    exit 1
  fi
  apt_update
  v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --allow-downgrades \
    "qemu-system-x86=$v" "qemu-utils=$v" busybox-static cpio lz4 gcc libc6-dev seabios \
    syslinux syslinux-common mtools dosfstools e2fsprogs xorriso genisoimage isolinux >/dev/null
fi

kdir="$cache/kernel"
if [ ! -s "$kdir/vmlinuz" ]; then
  apt_update
  pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  [ -n "$pkg" ] || { echo "lab setup: cannot find Debian's cloud kernel package" >&2; exit 1; }
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && apt-get download -qq "$pkg")
  dpkg-deb -x "$tmp"/*.deb "$tmp/x"
  rm -rf "$kdir.new" && mkdir -p "$kdir.new/modules"
  cp "$tmp"/x/boot/vmlinuz-* "$kdir.new/vmlinuz"
  cp "$tmp"/x/boot/config-* "$kdir.new/config"
  ver=$(basename "$tmp"/x/lib/modules/*)
  echo "$ver" > "$kdir.new/version"
  m="$tmp/x/lib/modules/$ver/kernel"
  for ko in arch/x86/kvm/kvm.ko arch/x86/kvm/kvm-amd.ko virt/lib/irqbypass.ko drivers/acpi/button.ko \
            drivers/input/evdev.ko; do
    cp "$m/$ko" "$kdir.new/modules/"
  done
  # Keep the whole driver tree too: later guests load virtio and network modules from it.
  mkdir -p "$kdir.new/modules/tree" && cp -r "$m"/. "$kdir.new/modules/tree/"
  rm -rf "$kdir" && mv "$kdir.new" "$kdir"
fi
echo "lab setup: kernel $(cat "$kdir/version") in $kdir"
