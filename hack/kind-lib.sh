# Shared by hack/kind-up.sh, hack/kind-down.sh and hack/kind-node-image.sh.
# shellcheck shell=bash

# Some sandboxes (this project's CI machine) withhold CAP_SYS_RESOURCE from root. `docker run
# --privileged`, which kind uses for every node, asks runc for every capability and fails there:
#   runc create failed: unable to start container process: unable to apply caps: operation not permitted
# (and Docker ignores --cap-drop next to --privileged). The fix: a Docker runtime "lora-runc", a
# wrapper of runc that drops CAP_SYS_RESOURCE from what a container asks for, registered in
# /etc/docker/daemon.json (runtimes are reloaded on SIGHUP, nothing restarts), and a `docker` shim
# on kind's PATH that adds --runtime lora-runc to `docker run`. Only where the capability is missing.
kind_needs_runtime() {
  local bnd; bnd=$(awk '/^CapBnd:/ {print $2}' /proc/self/status)
  (( (16#$bnd >> 24) & 1 )) && return 1 || return 0
}

kind_runtime_setup() {  # kind_runtime_setup SHIMDIR: registers lora-runc and writes the shim into SHIMDIR
  local shimdir=$1 dir="$STACK_CACHE/kind-runtime" real_docker
  real_docker=$(command -v "${DOCKER:-docker}")
  mkdir -p "$dir" "$shimdir"
  cat > "$dir/runc.tmp" <<'PY'
#!/usr/bin/env python3
# runc, less CAP_SYS_RESOURCE in what a container or an exec asks for (hack/kind-lib.sh says why).
import json, os, shutil, sys
args = sys.argv[1:]
def strip(path):
    with open(path) as f:
        spec = json.load(f)
    caps = spec.get("process", spec).get("capabilities") or {}
    for key, value in caps.items():
        if isinstance(value, list):
            caps[key] = [c for c in value if c != "CAP_SYS_RESOURCE"]
    with open(path, "w") as f:
        json.dump(spec, f)
def option(names):
    for i, a in enumerate(args):
        if a in names and i + 1 < len(args):
            return args[i + 1]
        for n in names:
            if a.startswith(n + "="):
                return a.split("=", 1)[1]
    return None
command = next((a for a in args if a in ("create", "run", "exec")), None)
if command in ("create", "run"):
    strip(os.path.join(option(("--bundle", "-b")) or ".", "config.json"))
elif command == "exec" and option(("--process", "-p")):
    strip(option(("--process", "-p")))
runc = shutil.which("runc", path="/usr/sbin:/usr/bin:/sbin:/bin")
os.execv(runc, ["runc"] + args)
PY
  chmod 755 "$dir/runc.tmp" && mv "$dir/runc.tmp" "$dir/runc"
  if ! docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"lora-runc"'; then
    say "registering the Docker runtime lora-runc ($dir/runc: runc without CAP_SYS_RESOURCE, which this sandbox withholds)"
    mkdir -p /etc/docker
    python3 - "$dir/runc" <<'PY'
import json, os, sys
path = "/etc/docker/daemon.json"
conf = json.load(open(path)) if os.path.exists(path) and os.path.getsize(path) else {}
conf.setdefault("runtimes", {})["lora-runc"] = {"path": sys.argv[1]}
json.dump(conf, open(path + ".tmp", "w"), indent=2)
os.replace(path + ".tmp", path)
PY
    local pid; pid=$(pidof dockerd) || fail "dockerd is not running here; cannot register the runtime" /dev/null "start the stack: hack/stack.sh up"
    kill -HUP $pid
    for _ in $(seq 20); do docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"lora-runc"' && break; sleep 0.5; done
    docker info --format '{{json .Runtimes}}' | grep -q '"lora-runc"' \
      || fail "dockerd did not load the lora-runc runtime from /etc/docker/daemon.json" /dev/null "check dockerd's log; restart dockerd"
  fi
  cat > "$shimdir/docker" <<SH
#!/bin/sh
# kind's docker: 'docker run' gets --runtime lora-runc (hack/kind-lib.sh)
if [ "\$1" = run ]; then shift; exec "$real_docker" run --runtime lora-runc "\$@"; fi
exec "$real_docker" "\$@"
SH
  chmod 755 "$shimdir/docker"
}
