#!/usr/bin/env bash
# Makes the Debian base image that our Dockerfiles start FROM, without a
# registry: debootstrap a minimal bookworm root and 'docker import' it.
# The rootfs tarball is cached under $STACK_CACHE, so a re-run only re-imports.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
image=${BASE_IMAGE:-lora-jobs/debian:$DEBIAN_SUITE}
if docker image inspect "$image" >/dev/null 2>&1; then say "base image $image present"; exit 0; fi
tarball="$(piece_dir debian-rootfs "$DEBIAN_SUITE")/rootfs.tar"
if [ ! -f "$tarball" ]; then
  command -v debootstrap >/dev/null || fail "debootstrap is not installed" /dev/null "apt-get install -y debootstrap (hack/install-system.sh does it)"
  log="$STACK_LOGS/debootstrap.log" root="$STACK_CACHE/src/debian-rootfs"
  say "debootstrap $DEBIAN_SUITE minbase (log: $log, ~3 min)"
  rm -rf "$root"; mkdir -p "$root" "$(dirname "$tarball")"
  debootstrap --variant=minbase --include=ca-certificates "$DEBIAN_SUITE" "$root" "$DEBIAN_MIRROR" >"$log" 2>&1 \
    || fail "debootstrap of $DEBIAN_SUITE failed" "$log" "check that $DEBIAN_MIRROR is reachable (apt-get update works)"
  # apt caches and lists make the image bigger and go stale; builds run apt-get update.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
  rm -rf "$root"
fi
say "docker import $image"
docker import "$tarball" "$image" >/dev/null
