#!/usr/bin/env bash
# Makes the Debian base image that our Dockerfiles start FROM, without a
# registry: debootstrap a minimal bookworm root and 'docker import' it.
# The rootfs tarball is cached under $STACK_CACHE, so a re-run only re-imports.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
# Usage: hack/base-image.sh [--rootfs-only]   (--rootfs-only: make the cached root tarball, import nothing:
# hack/prepare-test.sh runs that beside the Go builds, before dockerd is up)
image=${BASE_IMAGE:-lora-jobs/debian:$DEBIAN_SUITE}
rootfs_only=false; [ "${1:-}" = --rootfs-only ] && rootfs_only=true
if ! $rootfs_only && docker image inspect "$image" >/dev/null 2>&1; then say "base image $image present"; exit 0; fi
tarball="$(piece_dir debian-rootfs "$DEBIAN_SUITE")/rootfs.tar"

# The Debian mirror this machine's apt is set up with (DEBIAN_MIRROR overrides): the repository
# of the suite's main component, else of any Debian suite's main (the pool serves every suite).
debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  command -v apt-get >/dev/null || return 0
  local targets
  targets=$(apt-get indextargets --no-release-info --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' 2>/dev/null | sort -u)
  { awk -v s="$DEBIAN_SUITE" '$2 == s && $3 == "main" {print $1}' <<<"$targets"
    awk '$3 == "main" && $2 !~ /-(security|updates|backports)$/ && $1 !~ /security/ {print $1}' <<<"$targets"
  } | sed -n '1{s:/*$::;p;}'  # sed reads every line: head would close the pipe early (SIGPIPE under pipefail)
}

if [ ! -f "$tarball" ]; then
  DEBIAN_MIRROR=$(debian_mirror)
  [ -n "$DEBIAN_MIRROR" ] || fail "no Debian mirror found in this machine's apt configuration" /dev/null \
    "set DEBIAN_MIRROR to a Debian mirror URL (e.g. the one in /etc/apt/sources.list.d/debian.sources)"
  command -v debootstrap >/dev/null || fail "debootstrap is not installed" /dev/null "apt-get install -y debootstrap (hack/install-system.sh does it)"
  log="$STACK_LOGS/debootstrap.log" root="$STACK_CACHE/src/debian-rootfs"
  say "debootstrap $DEBIAN_SUITE minbase from $DEBIAN_MIRROR (log: $log, ~3 min)"
  rm -rf "$root"; mkdir -p "$root" "$(dirname "$tarball")"
  debootstrap --variant=minbase --include=ca-certificates "$DEBIAN_SUITE" "$root" "$DEBIAN_MIRROR" >"$log" 2>&1 \
    || fail "debootstrap of $DEBIAN_SUITE failed" "$log" "check that $DEBIAN_MIRROR is reachable (apt-get update works)"
  # apt caches and lists make the image bigger and go stale; builds run apt-get update.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
  rm -rf "$root"
fi
$rootfs_only && exit 0
say "docker import $image"
docker import "$tarball" "$image" >/dev/null
