#!/usr/bin/env bash
# Kueue (sigs.k8s.io/kueue, pinned in hack/versions.env) beside the local stack: an optional piece,
# started by `hack/stack.sh kueue` (tests marked kueue) and stopped by `hack/stack.sh down`.
#
#   hack/kueue.sh up     build it if needed (hack/build-stack.sh kueue), install its CRDs and webhooks, start it
#   hack/kueue.sh down   remove its webhook configurations, then stop it (its CRDs stay: harmless without it)
#
# Everything comes from the Go module the binary was built from: the CRDs are the module's
# config/components/crd/bases, the webhooks its config/components/webhook/manifests.yaml. Nothing else is
# downloaded. The apiserver reaches the webhooks on 127.0.0.1 through URL-based client configs, served
# with a certificate generated here (IP SAN 127.0.0.1); Kueue's own certificate management is off, since
# it issues certificates for a Service name (<svc>.<ns>.svc) that no DNS here resolves.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/lib.sh
. "$here/lib.sh"

KUEUE_WEBHOOK_PORT=${KUEUE_WEBHOOK_PORT:-29443}
KUEUE_HEALTH_PORT=${KUEUE_HEALTH_PORT:-29444}
KUEUE_METRICS_PORT=${KUEUE_METRICS_PORT:-29445}
API_PORT=${API_PORT:-26443}
RUN="$STACK_RUN/kueue"
PID_FILE="$STACK_RUN/pids/kueue"
LOG="$STACK_LOGS/kueue.log"
PKI="$STACK_RUN/pki"
KCFG="$STACK_RUN/kubeconfig"
NS=kueue-system
WEBHOOKS=(mutatingwebhookconfigurations/lora-jobs-kueue-mutating validatingwebhookconfigurations/lora-jobs-kueue-validating)

api() {  # api METHOD PATH [CONTENT-TYPE FILE]: a raw call to the API server as admin
  local token; token=$(cat "$PKI/admin.token")
  curl -fsS --cacert "$PKI/ca.crt" -H "Authorization: Bearer $token" -X "$1" "https://127.0.0.1:$API_PORT$2" \
    ${3:+-H "Content-Type: $3" --data-binary "@$4"}
}

apply() {  # apply API-PATH NAME FILE: server-side apply of one object (YAML), idempotent
  api PATCH "$1/$2?fieldManager=lora-jobs-stack&force=true" application/apply-patch+yaml "$3" >/dev/null
}

kueue_running() {
  [ -f "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null \
    && [ "$(awk '{print $3}' "/proc/$(cat "$PID_FILE")/stat" 2>/dev/null)" != "Z" ]
}

gen_certs() {  # a CA and a serving certificate for 127.0.0.1, once per stack
  [ -f "$RUN/certs/.complete" ] && return 0
  rm -rf "$RUN/certs"; mkdir -p "$RUN/certs"
  (
    cd "$RUN/certs"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj "/CN=lora-jobs-kueue-ca" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout tls.key -out tls.csr -subj "/CN=127.0.0.1" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > san.ext
    openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out tls.crt -days 3650 -extfile san.ext 2>/dev/null
    chmod 600 ./*.key
  )
  touch "$RUN/certs/.complete"
}

# webhooks MODULE_DIR: Kueue's webhook configurations, only the ones for batch/v1 Jobs, JobSets and Kueue's
# own objects, pointed at https://127.0.0.1:PORT with our CA. The Job and JobSet webhooks see only objects
# that name a queue: with manageJobsWithoutQueueName off (the default) Kueue ignores the others anyway, and
# this way a stopped Kueue never blocks the Jobs and JobSets of the stack's other tests (its webhooks fail
# closed).
webhooks() {
  local py; py="$("$here/venv.sh")/bin/python"  # the test venv: it has PyYAML
  KUEUE_MANIFESTS="$1/config/components/webhook/manifests.yaml" CA="$RUN/certs/ca.crt" OUT="$RUN" \
    PORT="$KUEUE_WEBHOOK_PORT" "$py" - <<'EOF'
import base64, os, yaml

ca = base64.b64encode(open(os.environ["CA"], "rb").read()).decode()
names = {"MutatingWebhookConfiguration": "lora-jobs-kueue-mutating",
         "ValidatingWebhookConfiguration": "lora-jobs-kueue-validating"}
for doc in yaml.safe_load_all(open(os.environ["KUEUE_MANIFESTS"])):
    if not doc:
        continue
    keep = []
    for hook in doc["webhooks"]:
        path = hook["clientConfig"]["service"]["path"]
        queued = "-batch-v1-job" in path or "-jobset-x-k8s-io-" in path
        if not (queued or "-kueue-x-k8s-io-" in path):
            continue
        hook["clientConfig"] = {"url": f"https://127.0.0.1:{os.environ['PORT']}{path}", "caBundle": ca}
        if queued:
            hook["objectSelector"] = {"matchExpressions": [{"key": "kueue.x-k8s.io/queue-name", "operator": "Exists"}]}
        keep.append(hook)
    doc["metadata"] = {"name": names[doc["kind"]], "labels": {"app.kubernetes.io/part-of": "lora-jobs-stack"}}
    doc["webhooks"] = keep
    with open(os.path.join(os.environ["OUT"], doc["kind"] + ".yaml"), "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
EOF
}

cmd_up() {
  [ -f "$PKI/admin.token" ] || fail "the local stack is not up" /dev/null "run hack/stack.sh up first"
  "$here/build-stack.sh" kueue
  local kueue; kueue=$(piece_bin kueue "$KUEUE_VERSION" kueue)
  # the module the binary was built from is in the Go module cache: its config/ has the CRDs and webhooks
  local mod; mod=$(go mod download -json "sigs.k8s.io/kueue@$KUEUE_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  [ -d "$mod/config/components/crd/bases" ] || fail "Kueue's module has no config/" /dev/null \
    "check the Go module cache: go mod download -json sigs.k8s.io/kueue@$KUEUE_VERSION"
  mkdir -p "$RUN" "$STACK_RUN/pids"
  gen_certs

  say "installing Kueue $KUEUE_VERSION's CRDs (from $mod/config)"
  printf 'apiVersion: v1\nkind: Namespace\nmetadata: {name: %s}\n' "$NS" > "$RUN/namespace.yaml"
  apply /api/v1/namespaces "$NS" "$RUN/namespace.yaml"
  local crd name
  for crd in "$mod"/config/components/crd/bases/*.yaml; do
    name=$(awk '/^metadata:/{m=1; next} m && /^  name:/{print $2; exit}' "$crd")
    apply /apis/apiextensions.k8s.io/v1/customresourcedefinitions "$name" "$crd"
  done
  for name in clusterqueues localqueues resourceflavors workloads; do
    for _ in $(seq 120); do
      api GET "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/$name.kueue.x-k8s.io" 2>/dev/null \
        | grep -q '"type": "Established"' && break
      sleep 0.25
    done
  done

  cat > "$RUN/config.yaml" <<EOF
apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
namespace: $NS
manageJobsWithoutQueueName: false
leaderElection: {leaderElect: false}
internalCertManagement: {enable: false}
webhook: {host: 127.0.0.1, port: $KUEUE_WEBHOOK_PORT, certDir: $RUN/certs}
health: {healthProbeBindAddress: "127.0.0.1:$KUEUE_HEALTH_PORT"}
metrics: {bindAddress: "127.0.0.1:$KUEUE_METRICS_PORT"}
# JobSets (launcher setting multinode_workload): Kueue waits for their API to be served (hack/jobset.sh).
integrations: {frameworks: [batch/job, jobset.x-k8s.io/jobset]}
EOF
  if ! kueue_running; then
    say "starting Kueue $KUEUE_VERSION (webhooks on https://127.0.0.1:$KUEUE_WEBHOOK_PORT; log: $LOG)"
    # With its certificate management off, Kueue v0.17 reads its metrics certificate from the fixed path
    # /etc/kueue/metrics/certs (cmd/kueue/main.go). It gets that path in a mount namespace of its own, as
    # an overlay on /etc, so nothing is written to the machine's /etc. VisibilityOnDemand (an aggregated
    # API on 0.0.0.0:8082) is off: nothing here registers its APIService.
    rm -rf "$RUN/etc"; mkdir -p "$RUN/etc/upper" "$RUN/etc/work"
    KUBECONFIG="$KCFG" setsid unshare --mount --propagation private sh -c '
      mount -t overlay overlay -o "lowerdir=/etc,upperdir=$0/etc/upper,workdir=$0/etc/work" /etc &&
      mkdir -p /etc/kueue/metrics/certs && cp "$0/certs/tls.crt" "$0/certs/tls.key" /etc/kueue/metrics/certs/ &&
      exec "$1" --config "$0/config.yaml" --feature-gates VisibilityOnDemand=false' "$RUN" "$kueue" \
      >"$LOG" 2>&1 </dev/null &
    echo $! > "$PID_FILE"
  fi
  local i
  for ((i = 0; i < 240; i++)); do
    curl -fsS "http://127.0.0.1:$KUEUE_HEALTH_PORT/readyz" >/dev/null 2>&1 && break
    kueue_running || fail "Kueue exited" "$LOG" "see the log"
    sleep 0.25
  done
  curl -fsS "http://127.0.0.1:$KUEUE_HEALTH_PORT/readyz" >/dev/null 2>&1 \
    || fail "Kueue did not become ready within 60s" "$LOG" "are ports $KUEUE_WEBHOOK_PORT-$KUEUE_METRICS_PORT free?"
  # the webhooks last: registered before Kueue serves them, they would refuse every queued Job
  webhooks "$mod"
  apply /apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations lora-jobs-kueue-mutating \
    "$RUN/MutatingWebhookConfiguration.yaml"
  apply /apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations lora-jobs-kueue-validating \
    "$RUN/ValidatingWebhookConfiguration.yaml"
  cat > "$RUN/env" <<EOF
export STACK_KUEUE_NAMESPACE=$NS
export STACK_KUEUE_PID_FILE=$PID_FILE
EOF
  say "Kueue is up"
}

cmd_down() {
  local hook
  if [ -f "$PKI/admin.token" ]; then  # first the webhooks: with Kueue gone they would refuse queued Jobs
    for hook in "${WEBHOOKS[@]}"; do
      api DELETE "/apis/admissionregistration.k8s.io/v1/$hook" >/dev/null 2>&1 || true
    done
  fi
  if kueue_running; then
    kill "$(cat "$PID_FILE")" 2>/dev/null || true
    for _ in $(seq 40); do kueue_running || break; sleep 0.25; done
    kueue_running && kill -9 "$(cat "$PID_FILE")" 2>/dev/null || true
  fi
  rm -f "$PID_FILE" "$RUN/env"
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  *) echo "usage: hack/kueue.sh up | down" >&2; exit 2 ;;
esac
