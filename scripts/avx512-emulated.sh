#!/usr/bin/env bash
# Runs gm's convolution tests and its element-wise loops' width test on an emulated AVX-512 CPU,
# so that the 512-bit kernels are executed (and checked bit for bit against the 256-bit ones and
# the baseline) on machines without AVX-512.
#
# Bochs (Debian's build has the EVEX decoder) emulates an Intel Skylake-X; a Debian kernel boots
# from an ISO whose initramfs holds busybox, the test binaries of crates/gm-core/tests/conv.rs and
# tests/simd.rs and the shared libraries they link. Bochs' XSAVES/XSAVEC leaves report sizes the kernel rejects
# (it would then turn AVX off), so the kernel is told to use plain XSAVE; PKU is off for the same
# reason. The guest prints /proc/cpuinfo's AVX-512 flags, runs the tests and powers off; this
# script fails unless they pass and the guest saw avx512f.
#
# Usage: bash scripts/avx512-emulated.sh [test filter ...]   (default: the tiling edge cases and
# the model shapes). Needs root for apt-get when the Debian packages are missing. About two
# minutes of boot plus the tests' emulated time.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=${GM_AVX512_WORK:-$root/target/avx512-emulated}
filters=("$@")
if [ ${#filters[@]} -eq 0 ]; then
  filters=(f32_kernels_match_f64_on_tiling_edge_cases forward_matches_candle_on_model_shapes)
fi

pkgs=(bochs bochsbios vgabios isolinux syslinux-common xorriso busybox-static cpio)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
# Without the emulator or the kernel there is nothing to run: say so loudly and stop, unless
# GM_REQUIRE_AVX512_EMULATION=1 makes that a failure.
skip() {
  echo "avx512-emulated: SKIPPED — $1; the AVX-512 kernels were not executed" >&2
  [ "${GM_REQUIRE_AVX512_EMULATION:-0}" = 1 ] && exit 1
  exit 0
}
if [ ${#missing[@]} -gt 0 ]; then
  echo "avx512-emulated: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq "${missing[@]}"; } >/dev/null ||
    skip "could not install ${missing[*]} (apt-get needs root and Debian's mirrors)"
fi

rm -rf "$work" && mkdir -p "$work/root/bin" "$work/iso/isolinux" "$work/deb"
cd "$work"

# The kernel: Debian's current generic amd64 image.
kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
chmod 777 deb  # apt-get download writes as the _apt user where it can
[ -n "$kpkg" ] || skip "no linux-image-amd64 package known to apt"
(cd deb && apt-get download -qq "$kpkg" >/dev/null && dpkg-deb -x ./*.deb x) ||
  skip "could not download $kpkg"
cp deb/x/boot/vmlinuz-* iso/vmlinuz

# The test binaries, as scripts/test.sh builds them (the dev profile compiles gm-core and every
# dependency at opt-level 3: the guest runs only tens of millions of instructions a second):
# tests/conv.rs (the convolution tiles) and tests/simd.rs (the element-wise loops at every width).
bins=$(cd "$root" && cargo test -p gm-core --test conv --test simd --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("conv", "simd"):
        print(m["target"]["name"], m["executable"])')
bin=$(awk '$1 == "conv" {print $2}' <<<"$bins")
simd_bin=$(awk '$1 == "simd" {print $2}' <<<"$bins")
[ -x "$bin" ] && [ -x "$simd_bin" ] || { echo "avx512-emulated: no test binaries built" >&2; exit 1; }
cp "$bin" root/conv
cp "$simd_bin" root/simd
# Their shared libraries and loader, at the paths they ask for.
for lib in $(ldd "$bin" "$simd_bin" | grep -v ':$' | grep -o '/[^ ]*' | sort -u); do
  mkdir -p "root$(dirname "$lib")" && cp -L "$lib" "root$lib"
done
# Files the tests read by absolute path.
mkdir -p "root$root/crates/gm-core/tests"
cp -r "$root/crates/gm-core/tests/data" "root$root/crates/gm-core/tests/"
cp /bin/busybox root/bin/
mkdir -p root/proc root/sys root/dev root/tmp
{
  echo '#!/bin/busybox sh'
  echo '/bin/busybox --install -s /bin'
  echo 'mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev'
  echo 'echo "GUEST-FLAGS: $(grep -o "avx512[a-z]*" /proc/cpuinfo | sort -u | tr "\n" " ")"'
  echo "cd /tmp && RAYON_NUM_THREADS=1 /conv --test-threads 1 --nocapture ${filters[*]} 2>&1"
  echo 'rc=$?'
  echo 'RAYON_NUM_THREADS=1 /simd --test-threads 1 --nocapture 2>&1 || rc=1'
  echo 'echo "GUEST-RC: $rc"'
  echo 'sleep 1; poweroff -f'
} > root/init
chmod +x root/init
(cd root && find . | cpio -o -H newc 2>/dev/null | gzip -1 > ../iso/initrd.gz)

cp /usr/lib/ISOLINUX/isolinux.bin /usr/lib/syslinux/modules/bios/ldlinux.c32 iso/isolinux/
cat > iso/isolinux/isolinux.cfg <<'EOF'
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL /vmlinuz
  APPEND initrd=/initrd.gz console=ttyS0,115200 loglevel=3 nopku clearcpuid=xsaves,xsavec mitigations=off tsc=reliable
EOF
xorriso -as mkisofs -quiet -o boot.iso -b isolinux/isolinux.bin -c isolinux/boot.cat \
  -no-emul-boot -boot-load-size 4 -boot-info-table iso 2>/dev/null

cat > bochsrc <<EOF
megs: 2048
cpu: model=corei7_skylake_x, count=1, ips=200000000
romimage: file=/usr/share/bochs/BIOS-bochs-latest
vgaromimage: file=/usr/share/bochs/VGABIOS-lgpl-latest
ata0-master: type=cdrom, path=$work/boot.iso, status=inserted
boot: cdrom
display_library: rfb, options="timeout=0"
com1: enabled=1, mode=file, dev=$work/serial.out
log: $work/bochs.log
panic: action=fatal
error: action=ignore
info: action=ignore
clock: sync=none, time0=local
speaker: enabled=0
sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy
EOF

echo "avx512-emulated: booting the emulated Skylake-X (Bochs) with conv ${filters[*]} and simd"
start=$(date +%s)
# Debian's Bochs has its debugger built in: 'c' continues from the first instruction. (The sound
# devices are off: on a machine without a sound card Bochs 2.7's mixer thread can abort the whole
# emulator with glibc's "buffer overflow detected" before the guest boots.)
printf 'c\n' | timeout "${GM_AVX512_TIMEOUT:-1800}" bochs -q -f bochsrc >bochs.out 2>&1 || true
echo "avx512-emulated: guest ran $(( $(date +%s) - start )) s"
tr -d '\r' < serial.out | sed -n '/GUEST-FLAGS/,/GUEST-RC/p'
grep -q 'GUEST-FLAGS:.*avx512f' serial.out || { echo "avx512-emulated: the guest has no avx512f" >&2; exit 1; }
grep -q 'conv kernels here: default avx512, narrow tiles avx2, wide tiles avx512' serial.out || {
  echo "avx512-emulated: the tests did not run the AVX-512 tiles" >&2
  exit 1
}
grep -q 'F32 ops compared bit for bit at \["baseline", "avx2", "avx512"\]' serial.out || {
  echo "avx512-emulated: the element-wise loops' AVX-512 copies did not run" >&2
  exit 1
}
grep -q 'GUEST-RC: 0' serial.out || { echo "avx512-emulated: tests failed in the guest" >&2; exit 1; }
echo "avx512-emulated: passed"
