#!/usr/bin/env bash
# Installs pcache's system integration for an existing installation of the package:
#   /sbin/mount.pcache            -> the mount helper (mount -t pcache, /etc/fstab, .mount units)
#   /etc/systemd/system/pcache-worker.service
#   /etc/pcache/pcache.toml       (example, only when absent) and /etc/pcache/env (mode 600)
# Usage: deploy/pcache/install.sh [--bin DIR] [--root DESTDIR]
#   --bin   where the pcache and mount.pcache scripts are (default: the directory of `pcache`)
#   --root  install under DESTDIR instead of / (packaging, tests); systemd is not reloaded then
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="" root=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin="$2"; shift 2 ;;
    --root) root="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$bin" ]; then
  pcache_path="$(command -v pcache || true)"
  [ -n "$pcache_path" ] || { echo "install.sh: pcache is not on PATH; pass --bin DIR" >&2; exit 2; }
  bin="$(dirname "$(readlink -f "$pcache_path")")"
fi
for tool in pcache mount.pcache; do
  [ -x "$bin/$tool" ] || { echo "install.sh: $bin/$tool is missing (pip install the package)" >&2; exit 2; }
done
install -d "$root/sbin" "$root/etc/systemd/system" "$root/etc/pcache"
ln -sfn "$bin/mount.pcache" "$root/sbin/mount.pcache"
sed "s|@PCACHE_BIN@|$bin|g" "$here/../systemd/pcache-worker.service" \
  > "$root/etc/systemd/system/pcache-worker.service"
[ -e "$root/etc/pcache/pcache.toml" ] || install -m 644 "$here/pcache.toml.example" "$root/etc/pcache/pcache.toml"
if [ ! -e "$root/etc/pcache/env" ]; then
  (umask 077; printf '# PCACHE_TOKEN=...\n' > "$root/etc/pcache/env")
fi
echo "installed: $root/sbin/mount.pcache -> $bin/mount.pcache, pcache-worker.service, /etc/pcache"
if [ -z "$root" ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  echo "next: edit /etc/pcache/pcache.toml and /etc/pcache/env, then systemctl enable --now pcache-worker"
fi
