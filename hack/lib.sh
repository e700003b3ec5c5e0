# Shared by the hack/ scripts: pinned versions, cache and log folders, messages.
# shellcheck shell=bash
_lib_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/versions.env
. "$_lib_dir/versions.env"
export REPO_ROOT=${REPO_ROOT:-$(cd "$_lib_dir/.." && pwd)}
# Outside the clone on purpose: CI clones afresh each run, and a compile of the
# stack should be paid once per machine, not once per clone.
export STACK_CACHE=${STACK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lora-jobs/stack}
export STACK_RUN=${STACK_RUN:-$REPO_ROOT/.stack}
export STACK_LOGS=${STACK_LOGS:-$STACK_RUN/logs}
mkdir -p "$STACK_CACHE" "$STACK_LOGS"

say() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }

# fail WHAT LOG FIX: stop with a message naming the piece, its log and the fix.
fail() {
  printf '\033[31merror:\033[0m %s\n  log: %s\n  fix: %s\n' "$1" "$2" "$3" >&2
  if [ -f "$2" ]; then echo "  last lines of the log:" >&2; tail -n 15 "$2" | sed 's/^/    /' >&2; fi
  exit 1
}

piece_dir() { echo "$STACK_CACHE/$1-$2"; }
piece_bin() {  # piece_bin PIECE VERSION BINARY
  echo "$(piece_dir "$1" "$2")/bin/$3"
}
