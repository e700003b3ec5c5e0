# Shared by the hack/ scripts: pinned versions, cache and log folders, messages.
# shellcheck shell=bash
_lib_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/versions.env
. "$_lib_dir/versions.env"
# CoreDNS is built with the plugins of hack/coredns/main.go, not the stock set: its cache folder says so.
COREDNS_PIECE_VERSION=$COREDNS_VERSION-lean
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

# A command that set -e stops on, outside fail(), is named instead of ending the script without a word
# (a fresh machine's `make test` once stopped that way at "starting dockerd": a SIGPIPE under pipefail).
trap 'rc=$?; printf "\033[31merror:\033[0m %s line %s: \"%s\" exited %s\n  fix: read the lines above; bash -x on the script shows each command it ran\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$rc" >&2' ERR

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
  # with no file descriptor of ours but its log: a lock held by whoever started the stack (`flock LOCK make
  # test`) is not held on by the daemons after that command ends
  (
    for fd in /proc/self/fd/*; do
      fd=${fd##*/}
      if [ "$fd" -gt 2 ] 2>/dev/null; then eval "exec $fd>&-" 2>/dev/null || true; fi
    done
    exec setsid "$@"
  ) >"$log" 2>&1 < /dev/null &
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

# ---------------------------------------------------------------- the stack's API server, as its admin
# hack/stack.sh makes the CA and the admin token under $PKI; API_PORT may be moved like every port.
API_PORT=${API_PORT:-26443}
PKI="$STACK_RUN/pki"

api() {  # api METHOD PATH [JSON-BODY | CONTENT-TYPE FILE]: a raw call to the API server as admin
  local method=$1 path=$2 body=()
  shift 2
  case $# in
    0) ;;
    1) body=(-H 'Content-Type: application/json' -d "$1") ;;
    *) body=(-H "Content-Type: $1" --data-binary "@$2") ;;
  esac
  curl -fsS --cacert "$PKI/ca.crt" -H "Authorization: Bearer $(cat "$PKI/admin.token")" \
    -X "$method" "https://127.0.0.1:$API_PORT$path" "${body[@]}"
}

apply() {  # apply API-PATH NAME FILE: server-side apply of one object (YAML), idempotent
  api PATCH "$1/$2?fieldManager=lora-jobs-stack&force=true" application/apply-patch+yaml "$3" >/dev/null
}

# wait_established PLURAL.GROUP VERSION: up to 30 s for the apiserver to serve a CRD just applied, in its
# discovery too: "Established" comes first, and a controller started in between fails on "no matches for
# kind ... in version ..." (Kueue did, on a fresh stack).
wait_established() {
  local i
  for ((i = 0; i < 120; i++)); do
    api GET "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/$1" 2>/dev/null \
      | grep -q '"type": "Established"' \
      && api GET "/apis/${1#*.}/$2" 2>/dev/null | grep -q "\"name\": \"${1%%.*}\"" && return 0
    sleep 0.25
  done
  fail "the apiserver does not serve $1 ($2) 30 s after its CRD was applied" "$STACK_LOGS/kube-apiserver.log" "see the log"
}

# serving_certs DIR CA-NAME: a CA of its own and a serving certificate for 127.0.0.1 (ca.crt, tls.crt,
# tls.key in DIR), for a controller's webhooks that the apiserver reaches by URL (hack/kueue.sh, jobset.sh).
serving_certs() {
  (
    cd "$1"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj "/CN=$2" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout tls.key -out tls.csr -subj "/CN=127.0.0.1" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > san.ext
    openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out tls.crt -days 3650 -extfile san.ext 2>/dev/null
    chmod 600 ./*.key
  )
}

# wait_serving NAME URL LOG FIX: up to 60 s for daemon NAME (a pid file under $PIDS) to answer URL;
# stops at once, with its log, when it exits instead.
wait_serving() {
  local name=$1 url=$2 log=$3 fix=$4 i
  for ((i = 0; i < 240; i++)); do
    curl -fsS "$url" >/dev/null 2>&1 && return 0
    running "$name" || fail "$name exited" "$log" "see the log"
    sleep 0.25
  done
  fail "$name did not become ready within 60s" "$log" "$fix"
}

delete_webhooks() {  # delete_webhooks KIND/NAME...: before their controller stops (they fail closed)
  local hook
  [ -f "$PKI/admin.token" ] || return 0
  for hook in "$@"; do
    api DELETE "/apis/admissionregistration.k8s.io/v1/$hook" >/dev/null 2>&1 || true
  done
}
