#!/usr/bin/env bash
# Builds every Go binary of the local stack once, pinned by hack/versions.env,
# into $STACK_CACHE/<piece>-<version>/bin. A piece already built is not rebuilt,
# so only a fresh machine pays for the compile (about 25 min on 2 cores).
#
# Every build compiles without DWARF (-gcflags=all=-dwarf=false: the links strip it anyway, -s -w) and
# runs the compiler with GOGC=400 (fewer collections of its own heap; ~0.5 GB a process at most here).
# Measured on etcd's server from an empty build cache on this 2-core machine: 166 CPU-seconds before,
# 138 after (-17%); the binaries are the same code, only without debug information.
#
# Usage: hack/build-stack.sh [piece ...]   (pieces: kube etcd kwok helm minio kubelet kube-proxy registry coredns)
# Optional pieces, built only when named: s5cmd (benchmarks/s3_download.py's peer),
# mc (the MinIO client the chart's bucket hook runs; tests/integration/test_minio_policy.py),
# kueue (the queue controller: hack/stack.sh kueue; tests marked kueue),
# jobset (the JobSet controller: hack/stack.sh jobset; tests marked jobset),
# kind and kubeadm (kind itself, and kubeadm + kubectl for the kind node image that
# hack/kind-node-image.sh builds where no stock node image can be pulled).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/lib.sh
. "$here/lib.sh"
export GOGC=${GOGC:-400}
GO_FLAGS=(-trimpath -gcflags=all=-dwarf=false)

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

build_wrapped() {
  # build_wrapped PIECE VERSION MODULE DEP_VERSION LDFLAGS PKG...
  # Modules like k8s.io/kubernetes and etcd's server pin their sibling modules with
  # `replace => ./staging/...` or `=> ../api`, which `go install pkg@version` refuses.
  # A wrapper module replaces each such sibling with its published release instead.
  local piece=$1 version=$2 module=$3 dep_version=$4 ldflags=$5; shift 5
  local dest; dest=$(piece_dir "$piece" "$version")
  if [ -f "$dest/.complete" ]; then return 0; fi
  local log="$STACK_LOGS/build-$piece.log" work="$STACK_CACHE/src/$piece-wrapper-$version"
  say "building $piece $version: $* (log: $log)"
  rm -rf "$dest" "$work"; mkdir -p "$dest/bin" "$work"
  (
    set -e
    cd "$work"
    go mod init "local/$piece-wrapper"
    go mod download -json "$module@$version" > module.json
    local mdir; mdir=$(sed -n 's/.*"Dir": "\(.*\)".*/\1/p' module.json)
    {
      echo "require $module $version"
      echo "replace ("
      sed -n 's#^[[:space:]]*\(replace[[:space:]]*\)\{0,1\}\([a-z0-9./-]*\)[[:space:]]*=>[[:space:]]*\.\{1,2\}/.*#\t\2 => \2 '"$dep_version"'#p' <(grep -v FORBIDDEN "$mdir/go.mod")
      echo ")"
    } >> go.mod
    { echo "//go:build tools"; echo; echo "package tools"; echo; echo "import ("
      for p in "$@"; do echo "	_ \"$p\""; done; echo ")"; } > tools.go
    go mod tidy -e
    CGO_ENABLED=0 GOBIN="$dest/bin" go install "${GO_FLAGS[@]}" -ldflags "$ldflags" "$@"
  ) >"$log" 2>&1 || fail "$piece $version did not build" "$log" \
      "the wrapper module in $work pins sibling modules to $dep_version; if 'go mod tidy' names one, it is missing from $module's replace list"
  touch "$dest/.complete"
}

build_main() {
  # build_main PIECE VERSION MODULE@MODULE_VERSION MAIN_GO LDFLAGS: a main package of ours (MAIN_GO) in a module
  # that requires MODULE at its pinned version; `go mod tidy` takes every other dependency at the version
  # MODULE's own go.mod selects.
  local piece=$1 version=$2 module=$3 main=$4 ldflags=$5
  local dest; dest=$(piece_dir "$piece" "$version")
  if [ -f "$dest/.complete" ]; then return 0; fi
  local log="$STACK_LOGS/build-$piece.log" work="$STACK_CACHE/src/$piece-main-$version"
  say "building $piece $version from ${main#"$REPO_ROOT"/} (log: $log)"
  rm -rf "$dest" "$work"; mkdir -p "$dest/bin" "$work"
  (
    set -e
    cd "$work"
    go mod init "local/$piece"
    cp "$main" main.go
    go mod edit -require="$module"
    go mod tidy
    CGO_ENABLED=0 go build "${GO_FLAGS[@]}" -ldflags "$ldflags" -o "$dest/bin/$piece" .
  ) >"$log" 2>&1 || fail "$piece $version did not build" "$log" \
      "check that the Go module proxy is reachable (go env GOPROXY) and that $(go version) is new enough"
  touch "$dest/.complete"
}

kube_ldflags() {
  # Version ldflags so /version reports the real release, as upstream builds do.
  local minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
  local ld="-s -w" p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$ld"
}

# One build of a piece at a time per machine: a second caller of that piece waits for the first, then
# finds it complete. The lock is per piece, so a test that needs mc waits for mc alone, not for the
# background build's later pieces (make test builds mc, jobset and kueue behind the first tests).
pieces=("$@")
[ ${#pieces[@]} -gt 0 ] || pieces=(helm kwok etcd minio kube kubelet kube-proxy registry coredns)
for piece in "${pieces[@]}"; do
  exec 9>"$STACK_CACHE/.build-$piece.lock"
  if ! flock -n 9; then
    say "another build of $piece is running; waiting for it"
    flock 9
  fi
  case $piece in
    kube) build_wrapped kube "$KUBE_VERSION" k8s.io/kubernetes "v0.${KUBE_VERSION#v1.}" "$(kube_ldflags)" \
            k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler ;;
    # The real node's kubelet: same module and version as the control plane, its own cache folder.
    kubelet) build_wrapped kubelet "$KUBE_VERSION" k8s.io/kubernetes "v0.${KUBE_VERSION#v1.}" "$(kube_ldflags)" \
            k8s.io/kubernetes/cmd/kubelet ;;
    # The real node's Service proxy (ClusterIPs for its pods): same module and version again.
    kube-proxy) build_wrapped kube-proxy "$KUBE_VERSION" k8s.io/kubernetes "v0.${KUBE_VERSION#v1.}" "$(kube_ldflags)" \
            k8s.io/kubernetes/cmd/kube-proxy ;;
    # The image registry the real node pulls from (loopback only).
    registry) build_go registry "$REGISTRY_VERSION" -- go install "${GO_FLAGS[@]}" \
            -ldflags "-s -w -X github.com/distribution/distribution/v3/version.version=$REGISTRY_VERSION" \
            "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION" ;;
    # Cluster DNS of the real node's pods.
    # Only the plugins our Corefiles use (hack/coredns/main.go): 30% less compile than the stock main.
    coredns) build_main coredns "$COREDNS_PIECE_VERSION" "github.com/coredns/coredns@$COREDNS_VERSION" \
            "$here/coredns/main.go" "-s -w" ;;
    etcd) build_wrapped etcd "$ETCD_VERSION" go.etcd.io/etcd/server/v3 "$ETCD_VERSION" "-s -w" go.etcd.io/etcd/server/v3 ;;
    kwok) build_go kwok "$KWOK_VERSION" -- go install "${GO_FLAGS[@]}" -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" ;;
    helm) build_go helm "$HELM_VERSION" -- go install "${GO_FLAGS[@]}" -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" ;;
    minio) build_go minio "$MINIO_VERSION" -- go install "${GO_FLAGS[@]}" -ldflags "-s -w" "github.com/minio/minio@$MINIO_VERSION" ;;
    # Through the wrapper module: `go install s5cmd@version` also asks the proxy for the
    # module's version list (deprecation check), which some proxies refuse.
    s5cmd) build_wrapped s5cmd "$S5CMD_VERSION" github.com/peak/s5cmd/v2 "$S5CMD_VERSION" \
            "-s -w -X github.com/peak/s5cmd/v2/version.Version=$S5CMD_VERSION" github.com/peak/s5cmd/v2 ;;
    mc) build_go mc "$MC_VERSION" -- go install "${GO_FLAGS[@]}" -ldflags "-s -w" "github.com/minio/mc@$MC_VERSION" ;;
    # Kueue's controller manager (hack/stack.sh kueue); its CRDs come from the same module's config/.
    kueue) build_go kueue "$KUEUE_VERSION" -- go install "${GO_FLAGS[@]}" \
            -ldflags "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION" "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION" ;;
    # JobSet's controller manager (hack/stack.sh jobset); its CRD and webhooks come from the same module's config/.
    # Through the wrapper module, as s5cmd: the proxy refuses JobSet's version list too.
    jobset) build_wrapped jobset "$JOBSET_VERSION" sigs.k8s.io/jobset "$JOBSET_VERSION" \
            "-s -w -X sigs.k8s.io/jobset/pkg/version.GitVersion=$JOBSET_VERSION" sigs.k8s.io/jobset ;;
    # The kind node image's kubeadm and kubectl (hack/kind-node-image.sh): same module and version again.
    kubeadm) build_wrapped kubeadm "$KUBE_VERSION" k8s.io/kubernetes "v0.${KUBE_VERSION#v1.}" "$(kube_ldflags)" \
            k8s.io/kubernetes/cmd/kubeadm k8s.io/kubernetes/cmd/kubectl ;;
    kind) build_go kind "$KIND_VERSION" -- go install "${GO_FLAGS[@]}" -ldflags "-s -w" "sigs.k8s.io/kind@$KIND_VERSION" ;;
    *) echo "unknown piece: $piece (expected kube etcd kwok helm minio kubelet kube-proxy registry coredns, or s5cmd mc kueue jobset kind kubeadm)" >&2; exit 2 ;;
  esac
  exec 9>&-
done
say "stack binaries ready under $STACK_CACHE"
