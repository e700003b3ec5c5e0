#!/usr/bin/env bash
# Installs the Debian packages the local stack needs, when missing: the Docker
# engine (docker.io), debootstrap for the base image, curl and openssl for the
# stack scripts, and for the real node (hack/node.sh) containerd, runc, the CNI
# plugins, socat, skopeo, iproute2 and gcc (the static pause binary). Go and Python 3.11
# are expected on the machine already.
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
command -v containerd >/dev/null || need+=(containerd)
command -v runc >/dev/null || need+=(runc)
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
command -v socat >/dev/null || need+=(socat)
command -v skopeo >/dev/null || need+=(skopeo)
command -v ip >/dev/null || need+=(iproute2)
command -v nsenter >/dev/null || need+=(util-linux)
command -v gcc >/dev/null || need+=(gcc libc6-dev)
if [ ${#need[@]} -gt 0 ]; then
  log="$STACK_LOGS/apt.log"
  say "installing ${need[*]} with apt-get (log: $log)"
  [ "$(id -u)" = 0 ] || fail "installing ${need[*]} needs root" /dev/null "run as root or install them yourself"
  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}"; } >"$log" 2>&1 \
    || fail "apt-get could not install ${need[*]}" "$log" "check that Debian's mirror is reachable"
fi
command -v go >/dev/null || fail "Go is not installed" /dev/null "install Go >= 1.24 (the stack's binaries are built from source)"
