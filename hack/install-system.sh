#!/usr/bin/env bash
# Installs the Debian packages the local stack needs, when missing: the Docker
# engine (docker.io), debootstrap for the base image, curl and openssl for the
# stack scripts. Go and Python 3.11 are expected on the machine already.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
need=()
command -v dockerd >/dev/null || need+=(docker.io)
[ -x /usr/bin/docker ] || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v curl >/dev/null || need+=(curl)
command -v openssl >/dev/null || need+=(openssl)
command -v iptables >/dev/null || need+=(iptables)
if [ ${#need[@]} -gt 0 ]; then
  log="$STACK_LOGS/apt.log"
  say "installing ${need[*]} with apt-get (log: $log)"
  [ "$(id -u)" = 0 ] || fail "installing ${need[*]} needs root" /dev/null "run as root or install them yourself"
  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}"; } >"$log" 2>&1 \
    || fail "apt-get could not install ${need[*]}" "$log" "check that Debian's mirror is reachable"
fi
command -v go >/dev/null || fail "Go is not installed" /dev/null "install Go >= 1.24 (the stack's binaries are built from source)"
