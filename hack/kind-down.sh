#!/usr/bin/env bash
# `make kind-down`: deletes the kind cluster that hack/kind-up.sh made, and its state.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
REPO_ROOT=$(cd "$here/.." && pwd)
. "$here/versions.env"  # KIND_VERSION
if [ -z "${KIND:-}" ]; then  # as hack/kind-up.sh: kind on PATH, else the one hack/build-stack.sh kind built
  KIND=kind
  command -v kind >/dev/null || KIND=${STACK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lora-jobs/stack}/kind-$KIND_VERSION/bin/kind
fi
CLUSTER=${KIND_CLUSTER:-lora-jobs}
STATE=$REPO_ROOT/.stack/kind
command -v "$KIND" >/dev/null || { echo "kind is not installed: nothing to delete" >&2; exit 0; }
if [ -f "$STATE/port-forward.pid" ]; then kill "$(cat "$STATE/port-forward.pid")" 2>/dev/null || true; fi
if "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  "$KIND" delete cluster --name "$CLUSTER"
else
  echo "no kind cluster named $CLUSTER" >&2
fi
rm -rf "$STATE"
