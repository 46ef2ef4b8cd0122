#!/bin/sh
# Lays out an image's root file system: the binary at /usr/local/bin/<name>, exactly the shared
# libraries it loads (from ldd, at the paths the dynamic loader looks for them), and
# /etc/passwd and /etc/group with one entry, uid/gid 65532 (nonroot). Nothing else.
# Used by `cargo xtask images` (FROM scratch, offline) and by the multi-stage Dockerfiles'
# builder stage, so both produce the same layout.
#   rootfs.sh BINARY NAME OUTDIR [BINARY NAME]...
# Further BINARY NAME pairs go beside the first (the sidecar image also carries bulkhead-probe).
set -eu
bin=$1 name=$2 out=$3
shift 3
rm -rf "$out"
mkdir -p "$out/usr/local/bin" "$out/etc"
add_binary() {
  [ -x "$1" ] || { echo "rootfs.sh: $1 is not an executable" >&2; exit 1; }
  install -m 0755 "$1" "$out/usr/local/bin/$2"
  # Debug info is of no use in the image (a dev-profile binary is mostly debug info).
  if command -v strip >/dev/null; then strip --strip-debug "$out/usr/local/bin/$2"; fi
  # ldd prints "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and, for the loader,
  # "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no file.
  ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u |
  while read -r lib; do
    [ -e "$out$lib" ] && continue
    mkdir -p "$out$(dirname "$lib")"
    # The file itself where the path is a symlink (the loader opens it by this path), with its
    # mode (the dynamic loader must stay executable: the kernel execs it).
    install -m "$(stat -Lc %a "$lib")" "$lib" "$out$lib"
  done
}
add_binary "$bin" "$name"
while [ $# -ge 2 ]; do
  add_binary "$1" "$2"
  shift 2
done
[ $# -eq 0 ] || { echo "rootfs.sh: extra arguments come in BINARY NAME pairs" >&2; exit 1; }
[ -n "$(ls -A "$out/lib64" "$out/lib" 2>/dev/null)" ] || { echo "rootfs.sh: ldd listed no libraries for $bin" >&2; exit 1; }
echo 'nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin' > "$out/etc/passwd"
echo 'nonroot:x:65532:' > "$out/etc/group"
chmod 0644 "$out/etc/passwd" "$out/etc/group"
