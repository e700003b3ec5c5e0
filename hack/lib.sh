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

# Daemons of the stack: one pid file each under $PIDS.
PIDS="$STACK_RUN/pids"

running() {  # a zombie is not running: killed daemons may never be reaped where PID 1 does not reap
  local pid
  [ -f "$PIDS/$1" ] || return 1
  pid=$(cat "$PIDS/$1")
  kill -0 "$pid" 2>/dev/null || return 1
  [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != "Z" ]
}

start() {  # start NAME LOGFILE CMD...: a daemon in its own session, pid recorded
  local name=$1 log=$2; shift 2
  if running "$name"; then return 0; fi
  mkdir -p "$PIDS"
  setsid "$@" >"$log" 2>&1 < /dev/null &
  echo $! > "$PIDS/$name"
}

wait_for() {  # wait_for WHAT SECONDS LOG FIX CMD...
  local what=$1 secs=$2 log=$3 fix=$4; shift 4
  local i
  for ((i = 0; i < secs * 4; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.25
  done
  fail "$what did not become ready within ${secs}s" "$log" "$fix"
}

stop_daemon() {  # stop_daemon NAME: TERM, up to 10 s, then KILL
  if running "$1"; then
    kill "$(cat "$PIDS/$1")" 2>/dev/null || true
    for _ in $(seq 40); do running "$1" || break; sleep 0.25; done
    running "$1" && kill -9 "$(cat "$PIDS/$1")" 2>/dev/null || true
  fi
  rm -f "$PIDS/$1"
}
