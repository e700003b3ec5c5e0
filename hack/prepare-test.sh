#!/usr/bin/env bash
# What `make test` needs before the stack starts, in three parallel lanes, since only one of them keeps
# the CPU busy: the Go builds (hack/build-stack.sh: CPU); the Debian packages, the base image, dockerd
# and the trainer and launcher images (apt-get, debootstrap, pip inside the builds: mostly the network);
# the Python environment, the small model, and the tools that some tests run from their own
# environments, MLflow's server and checkov (pip: the network; the GGUF conversion). On a fresh machine
# that is about the Go builds' time, not the sum; on a warm one each lane finds its pieces cached and
# returns in seconds (the image builds are all cache hits).
#
# dockerd starts here, recorded like every daemon of the stack, so `hack/stack.sh up` finds it running
# and `hack/stack.sh down` stops it.
#
# Usage: hack/prepare-test.sh MODEL_DIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
model_dir=${1:?usage: hack/prepare-test.sh MODEL_DIR}
command -v go >/dev/null || fail "Go is not installed" /dev/null "install Go >= 1.24 (the stack's binaries are built from source)"

"$here/build-stack.sh" & go_lane=$!
{ "$here/install-system.sh" && "$here/base-image.sh" --rootfs-only && "$here/stack.sh" docker \
    && "$here/build-images.sh" launcher trainer; } & system_lane=$!
{ venv=$("$here/venv.sh") && cd "$REPO_ROOT" && PYTHONPATH=$REPO_ROOT "$venv/bin/python" -m jobs convert-gguf "$model_dir" >/dev/null \
    && "$here/mlflow.sh" >/dev/null && "$here/checkov.sh" >/dev/null; } &
python_lane=$!

failed=()
wait "$go_lane" || failed+=("the Go builds (hack/build-stack.sh)")
wait "$system_lane" || failed+=("the system packages, the base image or the trainer and launcher images (hack/install-system.sh, hack/base-image.sh, hack/build-images.sh)")
wait "$python_lane" || failed+=("the Python environment, the small model, MLflow or checkov (hack/venv.sh, python -m jobs convert-gguf, hack/mlflow.sh, hack/checkov.sh)")
if [ ${#failed[@]} -gt 0 ]; then
  printf '\033[31merror:\033[0m %s did not finish; its own error is printed above\n' "${failed[@]}" >&2
  exit 1
fi
