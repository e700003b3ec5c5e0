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
RUN="$STACK_RUN/kueue"
PID_FILE="$PIDS/kueue"
LOG="$STACK_LOGS/kueue.log"
KCFG="$STACK_RUN/kubeconfig"
NS=kueue-system
WEBHOOKS=(mutatingwebhookconfigurations/lora-jobs-kueue-mutating validatingwebhookconfigurations/lora-jobs-kueue-validating)

gen_certs() {  # a CA and a serving certificate for 127.0.0.1, once per stack
  [ -f "$RUN/certs/.complete" ] && return 0
  rm -rf "$RUN/certs"; mkdir -p "$RUN/certs"
  serving_certs "$RUN/certs" lora-jobs-kueue-ca
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
  for name in clusterqueues localqueues resourceflavors workloads; do wait_established "$name.kueue.x-k8s.io" v1beta2; done

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
  if ! running kueue; then
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
  wait_serving kueue "http://127.0.0.1:$KUEUE_HEALTH_PORT/readyz" "$LOG" \
    "are ports $KUEUE_WEBHOOK_PORT-$KUEUE_METRICS_PORT free?"
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
  delete_webhooks "${WEBHOOKS[@]}"  # first: with Kueue gone they would refuse queued Jobs
  stop_daemon kueue
  rm -f "$RUN/env"
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  *) echo "usage: hack/kueue.sh up | down" >&2; exit 2 ;;
esac
