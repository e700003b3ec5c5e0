#!/usr/bin/env bash
# Builds every Go binary of the local stack once, pinned by hack/versions.env,
# into $STACK_CACHE/<piece>-<version>/bin. A piece already built is not rebuilt,
# so only a fresh machine pays for the compile (about 25 min on 2 cores).
#
# Usage: hack/build-stack.sh [piece ...]   (pieces: kube etcd kwok helm minio)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/lib.sh
. "$here/lib.sh"

build_go() {  # build_go PIECE VERSION -- go-install-args...
  local piece=$1 version=$2; shift 3
  local dest; dest=$(piece_dir "$piece" "$version")
  if [ -f "$dest/.complete" ]; then return 0; fi
  local log="$STACK_LOGS/build-$piece.log"
  say "building $piece $version (log: $log)"
  rm -rf "$dest"; mkdir -p "$dest/bin"
  if ! GOBIN="$dest/bin" CGO_ENABLED=0 "$@" >"$log" 2>&1; then
    fail "$piece $version did not build" "$log" \
      "check that the Go module proxy is reachable (go env GOPROXY) and that $(go version) is new enough"
  fi
  touch "$dest/.complete"
}

build_kube() {
  # k8s.io/kubernetes pins its staging modules with replace => ./staging, which
  # 'go install pkg@version' refuses. A wrapper module replaces each of them with
  # the published v0.X.Y of the same release instead.
  local dest; dest=$(piece_dir kube "$KUBE_VERSION")
  if [ -f "$dest/.complete" ]; then return 0; fi
  local log="$STACK_LOGS/build-kube.log" work="$STACK_CACHE/src/kube-wrapper-$KUBE_VERSION"
  say "building kube-apiserver, kube-controller-manager, kube-scheduler $KUBE_VERSION (log: $log; the longest step, ~15-20 min on 2 cores)"
  rm -rf "$dest" "$work"; mkdir -p "$dest/bin" "$work"
  local staging="v0.${KUBE_VERSION#v1.}"
  (
    set -e
    cd "$work"
    go mod init local/kube-wrapper
    go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" > kube.json
    local kdir; kdir=$(sed -n 's/.*"Dir": "\(.*\)".*/\1/p' kube.json)
    {
      echo "require k8s.io/kubernetes $KUBE_VERSION"
      echo "replace ("
      sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\t\1 => \1 '"$staging"'#p' "$kdir/go.mod"
      echo ")"
    } >> go.mod
    cat > tools.go <<'EOF'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
EOF
    go mod tidy -e
    local v="k8s.io/component-base/version" cv="k8s.io/client-go/pkg/version"
    local minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
    local ld="-s -w"
    for p in "$v" "$cv"; do
      ld="$ld -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
    done
    CGO_ENABLED=0 GOBIN="$dest/bin" go install -trimpath -ldflags "$ld" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler
  ) >"$log" 2>&1 || fail "kubernetes $KUBE_VERSION did not build" "$log" \
      "the wrapper module in $work pins staging modules to $staging; if 'go mod tidy' complains of one, it is missing from k8s.io/kubernetes's go.mod replace list"
  touch "$dest/.complete"
}

pieces=("$@")
[ ${#pieces[@]} -gt 0 ] || pieces=(helm kwok etcd minio kube)
for piece in "${pieces[@]}"; do
  case $piece in
    kube) build_kube ;;
    etcd) build_go etcd "$ETCD_VERSION" -- go install -trimpath -ldflags "-s -w" "go.etcd.io/etcd/server/v3@$ETCD_VERSION" ;;
    kwok) build_go kwok "$KWOK_VERSION" -- go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" ;;
    helm) build_go helm "$HELM_VERSION" -- go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" ;;
    minio) build_go minio "$MINIO_VERSION" -- go install -trimpath -ldflags "-s -w" "github.com/minio/minio@$MINIO_VERSION" ;;
    *) echo "unknown piece: $piece (expected kube etcd kwok helm minio)" >&2; exit 2 ;;
  esac
done
say "stack binaries ready under $STACK_CACHE"
