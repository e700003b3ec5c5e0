#!/usr/bin/env bash
# JobSet (sigs.k8s.io/jobset, pinned in hack/versions.env) beside the local stack: an optional piece,
# started by `hack/stack.sh jobset` (tests marked jobset) and stopped by `hack/stack.sh down`.
#
#   hack/jobset.sh up     build it if needed (hack/build-stack.sh jobset), install its CRD, RBAC and webhooks, start it
#   hack/jobset.sh down   remove its webhook configurations, stop it, delete its CRD (and so every JobSet)
#
# Everything comes from the Go module the binary was built from: the CRD is the module's
# config/components/crd/bases, the webhooks its config/components/webhook/manifests.yaml (with the pod
# webhooks' objectSelector of its kustomize patches), the controller's ClusterRole its config/components/rbac/
# role.yaml. Nothing else is downloaded. As for Kueue (hack/kueue.sh), the apiserver reaches the webhooks on
# 127.0.0.1 through URL-based client configs, served with a certificate generated here, and JobSet's own
# certificate management is off (it issues certificates for a Service name no DNS here resolves).
# The controller runs as its own user (a client certificate of the stack's CA), bound to that ClusterRole
# only, not as the stack's admin.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/lib.sh
. "$here/lib.sh"

JOBSET_WEBHOOK_PORT=${JOBSET_WEBHOOK_PORT:-29453}
JOBSET_HEALTH_PORT=${JOBSET_HEALTH_PORT:-29454}
RUN="$STACK_RUN/jobset"
PID_FILE="$PIDS/jobset"
LOG="$STACK_LOGS/jobset.log"
USER_NAME=lora-jobs:jobset
CRD=jobsets.jobset.x-k8s.io
WEBHOOKS=(mutatingwebhookconfigurations/lora-jobs-jobset-mutating validatingwebhookconfigurations/lora-jobs-jobset-validating)

gen_certs() {  # the webhooks' CA and serving certificate (127.0.0.1), and the controller's client certificate
  [ -f "$RUN/certs/.complete" ] && return 0
  rm -rf "$RUN/certs"; mkdir -p "$RUN/certs"
  serving_certs "$RUN/certs" lora-jobs-jobset-ca
  (
    cd "$RUN/certs"
    openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj "/CN=$USER_NAME" 2>/dev/null
    openssl x509 -req -in client.csr -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial -CAserial "$RUN/certs/pki.srl" \
      -out client.crt -days 3650 2>/dev/null
    chmod 600 ./*.key
  )
  cat > "$RUN/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "https://127.0.0.1:$API_PORT", certificate-authority: $PKI/ca.crt}
users:
- name: jobset
  user: {client-certificate: $RUN/certs/client.crt, client-key: $RUN/certs/client.key}
contexts:
- name: jobset
  context: {cluster: local, user: jobset}
current-context: jobset
EOF
  chmod 600 "$RUN/kubeconfig"
  touch "$RUN/certs/.complete"
}

# manifests MODULE_DIR: the controller's ClusterRole and binding, and its webhook configurations pointed at
# https://127.0.0.1:PORT with our CA. The role is the module's own, less the webhook-configuration rule that
# only its (disabled) certificate rotation uses. The pod webhooks see only a JobSet's pods, as in JobSet's
# own kustomize patches: a stopped JobSet never blocks the stack's other pods (its webhooks fail closed).
manifests() {
  local py; py="$("$here/venv.sh")/bin/python"  # the test venv: it has PyYAML
  MOD="$1" CA="$RUN/certs/ca.crt" OUT="$RUN" PORT="$JOBSET_WEBHOOK_PORT" USER_NAME="$USER_NAME" "$py" - <<'EOF'
import base64, os, yaml

mod, out = os.environ["MOD"], os.environ["OUT"]
labels = {"app.kubernetes.io/part-of": "lora-jobs-stack"}
role = yaml.safe_load(open(f"{mod}/config/components/rbac/role.yaml"))
role["metadata"] = {"name": "lora-jobs:jobset", "labels": labels}
role["rules"] = [r for r in role["rules"] if "admissionregistration.k8s.io" not in r["apiGroups"]]
binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
           "metadata": {"name": "lora-jobs:jobset", "labels": labels},
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "lora-jobs:jobset"},
           "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": os.environ["USER_NAME"]}]}
for doc in (role, binding):
    with open(os.path.join(out, doc["kind"] + ".yaml"), "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)

ca = base64.b64encode(open(os.environ["CA"], "rb").read()).decode()
names = {"MutatingWebhookConfiguration": "lora-jobs-jobset-mutating",
         "ValidatingWebhookConfiguration": "lora-jobs-jobset-validating"}
for doc in yaml.safe_load_all(open(f"{mod}/config/components/webhook/manifests.yaml")):
    if not doc:
        continue
    for hook in doc["webhooks"]:
        path = hook["clientConfig"]["service"]["path"]
        hook["clientConfig"] = {"url": f"https://127.0.0.1:{os.environ['PORT']}{path}", "caBundle": ca}
        if path.endswith("-v1-pod"):
            hook["objectSelector"] = {"matchExpressions": [{"key": "jobset.sigs.k8s.io/jobset-name",
                                                            "operator": "Exists"}]}
    doc["metadata"] = {"name": names[doc["kind"]], "labels": labels}
    with open(os.path.join(out, doc["kind"] + ".yaml"), "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
EOF
}

cmd_up() {
  [ -f "$PKI/admin.token" ] || fail "the local stack is not up" /dev/null "run hack/stack.sh up first"
  "$here/build-stack.sh" jobset
  local jobset; jobset=$(piece_bin jobset "$JOBSET_VERSION" jobset)
  # the module the binary was built from is in the Go module cache: its config/ has the CRD, RBAC and webhooks
  local mod; mod=$(go mod download -json "sigs.k8s.io/jobset@$JOBSET_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  [ -d "$mod/config/components/crd/bases" ] || fail "JobSet's module has no config/" /dev/null \
    "check the Go module cache: go mod download -json sigs.k8s.io/jobset@$JOBSET_VERSION"
  mkdir -p "$RUN" "$STACK_RUN/pids"
  gen_certs
  manifests "$mod"

  say "installing JobSet $JOBSET_VERSION's CRD and the controller's ClusterRole (from $mod/config)"
  apply /apis/apiextensions.k8s.io/v1/customresourcedefinitions "$CRD" "$mod/config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml"
  apply /apis/rbac.authorization.k8s.io/v1/clusterroles lora-jobs:jobset "$RUN/ClusterRole.yaml"
  apply /apis/rbac.authorization.k8s.io/v1/clusterrolebindings lora-jobs:jobset "$RUN/ClusterRoleBinding.yaml"
  wait_established "$CRD" v1alpha2

  cat > "$RUN/config.yaml" <<EOF
apiVersion: config.jobset.x-k8s.io/v1alpha1
kind: Configuration
leaderElection: {leaderElect: false}
internalCertManagement: {enable: false}
webhook: {host: 127.0.0.1, port: $JOBSET_WEBHOOK_PORT, certDir: $RUN/certs}
health: {healthProbeBindAddress: "127.0.0.1:$JOBSET_HEALTH_PORT"}
metrics: {bindAddress: "0"}
EOF
  if ! running jobset; then
    say "starting JobSet $JOBSET_VERSION (webhooks on https://127.0.0.1:$JOBSET_WEBHOOK_PORT; log: $LOG)"
    # metrics off ("0"): its secure server would want tokenreviews and subjectaccessreviews, which nothing reads
    KUBECONFIG="$RUN/kubeconfig" setsid "$jobset" --config "$RUN/config.yaml" >"$LOG" 2>&1 </dev/null &
    echo $! > "$PID_FILE"
  fi
  wait_serving jobset "http://127.0.0.1:$JOBSET_HEALTH_PORT/readyz" "$LOG" \
    "are ports $JOBSET_WEBHOOK_PORT-$JOBSET_HEALTH_PORT free?"
  # the webhooks last: registered before JobSet serves them, they would refuse every JobSet
  apply /apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations lora-jobs-jobset-mutating \
    "$RUN/MutatingWebhookConfiguration.yaml"
  apply /apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations lora-jobs-jobset-validating \
    "$RUN/ValidatingWebhookConfiguration.yaml"
  cat > "$RUN/env" <<EOF
export STACK_JOBSET_PID_FILE=$PID_FILE
EOF
  say "JobSet is up"
}

cmd_down() {
  delete_webhooks "${WEBHOOKS[@]}"  # first: with JobSet gone they would refuse its pods
  stop_daemon jobset
  # Unlike Kueue's, the CRD goes too: a served jobsets resource is what the launcher's `multinode_workload: auto`
  # takes for "JobSet is installed", and without the controller a JobSet would never start.
  if [ -f "$PKI/admin.token" ]; then
    api DELETE "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/$CRD" >/dev/null 2>&1 || true
  fi
  rm -f "$RUN/env"
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  *) echo "usage: hack/jobset.sh up | down" >&2; exit 2 ;;
esac
