#!/usr/bin/env bash
# Installs the Debian packages the project needs (FUSE for pcache, headers to build pyfuse3,
# iproute2 for network-namespace tests, chromium for the dashboard test, systemd for
# `systemd-analyze verify` of the units, s3fs as the second FUSE client on a bucket pcache writes,
# rsync for the mount's workflow tests). Idempotent: does nothing when all are present.
set -euo pipefail
PKGS=(fuse3 libfuse3-dev pkg-config iproute2 chromium systemd s3fs rsync)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-system-deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1
  fi
fi
echo "install-system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
