#!/usr/bin/env bash
# Prints the path of the pinned mlflow binary (the tracking server of tests marked `mlflow`),
# installing it when missing. It has its own virtualenv (mlflow pins pandas, scikit-learn,
# sqlalchemy, ... that would fight the test venv's), in the machine's cache keyed by version and
# Python, so fresh clones (CI) reuse it. The package index is whatever pip is configured with here.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/lib.sh
. "$here/lib.sh"
py=${PYTHON:-python3}
key=$( (echo "$MLFLOW_VERSION"; "$py" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-12)
venv="$STACK_CACHE/../mlflow-$MLFLOW_VERSION-$key"
exec 9>"$STACK_CACHE/../.mlflow.lock"
flock 9  # one installer at a time; later callers find it complete
if [ ! -f "$venv/.complete" ]; then
  log="$STACK_LOGS/mlflow-install.log"
  say "installing mlflow $MLFLOW_VERSION into $venv (~2 min, ~850 MB the first time; log: $log)"
  rm -rf "$venv"
  "$py" -m venv "$venv" >"$log" 2>&1 || fail "python venv could not be created" "$log" "install python3-venv"
  "$venv/bin/pip" install "mlflow==$MLFLOW_VERSION" >>"$log" 2>&1 \
    || fail "pip could not install mlflow $MLFLOW_VERSION" "$log" "check that the package index is reachable; the log names the package"
  "$venv/bin/mlflow" --version >>"$log" 2>&1 || fail "mlflow $MLFLOW_VERSION does not start" "$log" "see the log"
  touch "$venv/.complete"
fi
echo "$venv/bin/mlflow"
