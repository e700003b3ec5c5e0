#!/usr/bin/env bash
# The real local stack the tests run against, on loopback ports:
#   MinIO (S3)  ·  etcd + kube-apiserver + kube-controller-manager + kube-scheduler
#   kwok (fake GPU and CPU nodes; pods go through their lifecycle without a kubelet)
#   helm  ·  dockerd (started when not running) with a debootstrapped base image
#   a real node (hack/node.sh): kubelet + containerd + CNI + CoreDNS + kube-proxy in a network namespace
#   of its own, and the image registry it pulls from; needs Docker once (the pause image). `--no-node` skips it.
#   optional: the MLflow tracking server (SQLite, artifacts proxied), with `up --mlflow` or `mlflow`
#   optional: Kueue (hack/kueue.sh), with `kueue`; `down` stops it too
#   optional: JobSet (hack/jobset.sh), with `jobset`; `down` stops it too
#
# Usage: hack/stack.sh up [--no-docker] [--no-node] [--s3-only] [--mlflow] | mlflow | kueue | jobset | docker | down | status | env
# `up` writes $STACK_RUN/env (KUBECONFIG, AWS_*, HELM, ...) for tests and shells:
#   source .stack/env && kubectl-less curl, python -m launcher, pytest ...
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"

ETCD_PORT=${ETCD_PORT:-23790}
API_PORT=${API_PORT:-26443}
KCM_PORT=${KCM_PORT:-20257}
SCHED_PORT=${SCHED_PORT:-20259}
KWOK_PORT=${KWOK_PORT:-20247}
MINIO_PORT=${MINIO_PORT:-29000}
MINIO_CONSOLE_PORT=${MINIO_CONSOLE_PORT:-29001}
TEST_BUCKET=${TEST_BUCKET:-lora-test}
MLFLOW_PORT=${MLFLOW_PORT:-25000}

KCFG="$STACK_RUN/kubeconfig"

bin() { piece_bin "$@"; }
KUBE_BIN=$(piece_dir kube "$KUBE_VERSION")/bin
ETCD=$(bin etcd "$ETCD_VERSION" server)  # go names a /v3 module binary after "server"
KWOK=$(bin kwok "$KWOK_VERSION" kwok)
HELM=$(bin helm "$HELM_VERSION" helm)
MINIO=$(bin minio "$MINIO_VERSION" minio)

gen_pki() {
  [ -f "$PKI/.complete" ] && return 0
  say "generating certificates, service-account keys and the admin token"
  rm -rf "$PKI"; mkdir -p "$PKI"
  (
    cd "$PKI"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj "/CN=lora-jobs-local-ca" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:10.96.0.1\n' > san.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 3650 -extfile san.ext 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
    echo "$token,admin,admin,system:masters" > tokens.csv
    echo "$token" > admin.token
    chmod 600 ./*.key tokens.csv admin.token
  )
  touch "$PKI/.complete"
}

gen_node_pki() {  # the real node's client certificates (hack/node.sh), added to an older PKI too
  [ -f "$PKI/node.crt" ] && return 0
  (
    cd "$PKI"
    # the apiserver's client certificate towards kubelets (logs, exec): a cluster admin
    openssl req -newkey rsa:2048 -nodes -keyout kubelet-client.key -out kubelet-client.csr \
      -subj "/O=system:masters/CN=kube-apiserver-kubelet-client" 2>/dev/null
    openssl x509 -req -in kubelet-client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out kubelet-client.crt -days 3650 2>/dev/null
    # the kubelet's identity: the Node authorizer and NodeRestriction scope it to its own node
    openssl req -newkey rsa:2048 -nodes -keyout node.key -out node.csr \
      -subj "/O=system:nodes/CN=system:node:${NODE_NAME:-lora-node-0}" 2>/dev/null
    openssl x509 -req -in node.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out node.crt -days 3650 2>/dev/null
    chmod 600 ./*.key
  )
}

write_kubeconfig() {
  local token; token=$(cat "$PKI/admin.token")
  cat > "$KCFG" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority: $PKI/ca.crt
users:
- name: admin
  user:
    token: $token
contexts:
- name: local
  context: {cluster: local, user: admin, namespace: default}
current-context: local
EOF
  chmod 600 "$KCFG"
}

create_node() {  # create_node NAME GPUS
  local name=$1 gpus=$2 extra_labels="" taints="[]" alloc
  alloc="\"cpu\":\"64\",\"memory\":\"512Gi\",\"pods\":\"110\",\"ephemeral-storage\":\"2Ti\""
  if [ "$gpus" -gt 0 ]; then
    alloc="$alloc,\"nvidia.com/gpu\":\"$gpus\""
    extra_labels=",\"nvidia.com/gpu.present\":\"true\",\"nvidia.com/gpu.product\":\"NVIDIA-H200\",\"nvidia.com/gpu.count\":\"$gpus\""
    taints='[{"key":"nvidia.com/gpu","value":"present","effect":"NoSchedule"}]'
  fi
  api GET "/api/v1/nodes/$name" >/dev/null 2>&1 && return 0
  api POST /api/v1/nodes "{
    \"apiVersion\":\"v1\",\"kind\":\"Node\",
    \"metadata\":{\"name\":\"$name\",\"annotations\":{\"kwok.x-k8s.io/node\":\"fake\"},
      \"labels\":{\"type\":\"kwok\",\"kubernetes.io/hostname\":\"$name\",\"kubernetes.io/os\":\"linux\",\"kubernetes.io/arch\":\"amd64\"$extra_labels}},
    \"spec\":{\"taints\":$taints},
    \"status\":{\"allocatable\":{$alloc},\"capacity\":{$alloc}}}" >/dev/null
}

up_kube() {
  for b in kube-apiserver kube-controller-manager kube-scheduler; do
    [ -x "$KUBE_BIN/$b" ] || fail "$b is not built" "$STACK_LOGS/build-kube.log" "run hack/build-stack.sh kube"
  done
  gen_pki
  gen_node_pki
  write_kubeconfig
  mkdir -p "$STACK_RUN/etcd"
  say "starting etcd on 127.0.0.1:$ETCD_PORT"
  start etcd "$STACK_LOGS/etcd.log" "$ETCD" --data-dir "$STACK_RUN/etcd" --name local \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 10))" --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 10))" \
    --initial-cluster "local=http://127.0.0.1:$((ETCD_PORT + 10))" --unsafe-no-fsync --quota-backend-bytes 2147483648
  wait_for etcd 30 "$STACK_LOGS/etcd.log" "is port $ETCD_PORT free? (ETCD_PORT=... to move it)" \
    curl -fsS "http://127.0.0.1:$ETCD_PORT/health"

  say "starting kube-apiserver $KUBE_VERSION on https://127.0.0.1:$API_PORT"
  start kube-apiserver "$STACK_LOGS/kube-apiserver.log" "$KUBE_BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" --bind-address 127.0.0.1 --secure-port "$API_PORT" \
    --advertise-address 127.0.0.1 --endpoint-reconciler-type none \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" --client-ca-file "$PKI/ca.crt" \
    --token-auth-file "$PKI/tokens.csv" --authorization-mode Node,RBAC \
    --enable-admission-plugins NodeRestriction,PodNodeSelector,PodTolerationRestriction \
    --kubelet-client-certificate "$PKI/kubelet-client.crt" --kubelet-client-key "$PKI/kubelet-client.key" \
    --kubelet-preferred-address-types InternalIP \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --service-cluster-ip-range 10.96.0.0/16 --allow-privileged=true --profiling=false
  wait_for kube-apiserver 90 "$STACK_LOGS/kube-apiserver.log" "is etcd up and port $API_PORT free?" \
    api GET /readyz

  say "starting kube-controller-manager and kube-scheduler"
  # A node whose heartbeat stops is marked Unknown after 15 s, not v1.34's 50 s (test_real_pods' stopped
  # kubelet waited that out). Every node renews a 10 s lease every 2.5 s (the kubelet: nodeLeaseDurationSeconds
  # in hack/node.sh; kwok: --node-lease-duration-seconds below, besides its status heartbeat every 5 s), so the
  # grace spans 6 renewals, as upstream's 50 s spans 5 of a 40 s lease's. Checked every 2 s instead of 5.
  # An API server down for longer than that (test_faults restarts it) can leave the nodes Unknown for a few
  # seconds after it returns, as it would past 50 s before: pods keep their place (300 s of toleration).
  start kube-controller-manager "$STACK_LOGS/kube-controller-manager.log" "$KUBE_BIN/kube-controller-manager" \
    --kubeconfig "$KCFG" --authentication-kubeconfig "$KCFG" --authorization-kubeconfig "$KCFG" \
    --bind-address 127.0.0.1 --secure-port "$KCM_PORT" --leader-elect=false \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --use-service-account-credentials=false --controllers '*,-nodeipam,-cloud-node-lifecycle' \
    --concurrent-job-syncs 10 --profiling=false --node-monitor-grace-period 15s --node-monitor-period 2s
  start kube-scheduler "$STACK_LOGS/kube-scheduler.log" "$KUBE_BIN/kube-scheduler" \
    --kubeconfig "$KCFG" --authentication-kubeconfig "$KCFG" --authorization-kubeconfig "$KCFG" \
    --bind-address 127.0.0.1 --secure-port "$SCHED_PORT" --leader-elect=false --profiling=false
  wait_for kube-controller-manager 60 "$STACK_LOGS/kube-controller-manager.log" "see the log" \
    curl -fsSk "https://127.0.0.1:$KCM_PORT/healthz"
  wait_for kube-scheduler 60 "$STACK_LOGS/kube-scheduler.log" "see the log" \
    curl -fsSk "https://127.0.0.1:$SCHED_PORT/healthz"

  say "starting kwok $KWOK_VERSION with nodes kwok-gpu-0 (8 x nvidia.com/gpu) and kwok-cpu-0"
  start kwok "$STACK_LOGS/kwok.log" "$KWOK" --kubeconfig "$KCFG" \
    --manage-all-nodes=false --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
    --node-ip 10.244.0.1 --cidr 10.244.0.0/16 --server-address "127.0.0.1:$KWOK_PORT" \
    --config "$here/kwok/stages.yaml" --node-lease-duration-seconds 10
  wait_for kwok 30 "$STACK_LOGS/kwok.log" "see the log" curl -fsS "http://127.0.0.1:$KWOK_PORT/healthz"
  create_node kwok-gpu-0 8
  create_node kwok-cpu-0 0
  wait_for "node kwok-gpu-0 Ready" 60 "$STACK_LOGS/kwok.log" "kwok did not initialise the node; see its log" \
    bash -c "$(declare -f api); PKI=$PKI API_PORT=$API_PORT; api GET /api/v1/nodes/kwok-gpu-0 | grep -q '\"type\": \"Ready\"'"
  # The default ServiceAccount appears once the SA controller runs; pods need it.
  wait_for "default service account" 60 "$STACK_LOGS/kube-controller-manager.log" "see the log" \
    api GET /api/v1/namespaces/default/serviceaccounts/default
}

up_minio() {
  [ -x "$MINIO" ] || fail "minio is not built" "$STACK_LOGS/build-minio.log" "run hack/build-stack.sh minio"
  if [ ! -f "$STACK_RUN/minio.creds" ]; then
    # Fresh random credentials per stack; they live only in the git-ignored .stack/.
    echo "MINIO_ROOT_USER=lora$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$STACK_RUN/minio.creds"
    echo "MINIO_ROOT_PASSWORD=$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')" >> "$STACK_RUN/minio.creds"
    chmod 600 "$STACK_RUN/minio.creds"
  fi
  # shellcheck disable=SC1091
  . "$STACK_RUN/minio.creds"
  mkdir -p "$STACK_RUN/minio-data"
  say "starting MinIO on http://127.0.0.1:$MINIO_PORT"
  start minio "$STACK_LOGS/minio.log" env MINIO_ROOT_USER="$MINIO_ROOT_USER" MINIO_ROOT_PASSWORD="$MINIO_ROOT_PASSWORD" \
    MINIO_BROWSER=off "$MINIO" server --address "127.0.0.1:$MINIO_PORT" \
    --console-address "127.0.0.1:$MINIO_CONSOLE_PORT" "$STACK_RUN/minio-data"
  wait_for MinIO 60 "$STACK_LOGS/minio.log" "is port $MINIO_PORT free? (MINIO_PORT=... to move it)" \
    curl -fsS "http://127.0.0.1:$MINIO_PORT/minio/health/live"
  # MinIO wants x-amz-content-sha256 (here: of the empty body) on signed requests.
  local s3=(curl -fsS --aws-sigv4 "aws:amz:us-east-1:s3" --user "$MINIO_ROOT_USER:$MINIO_ROOT_PASSWORD"
            -H "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
  # /health/live answers before the object layer is up; until then S3 calls get 503
  # ("server not initialized"), so the bucket is created with retries, not once.
  local i
  for ((i = 0; i < 120; i++)); do
    "${s3[@]}" -X PUT "http://127.0.0.1:$MINIO_PORT/$TEST_BUCKET" >/dev/null 2>&1 || true
    "${s3[@]}" -I "http://127.0.0.1:$MINIO_PORT/$TEST_BUCKET" >/dev/null 2>&1 && return 0
    sleep 0.25
  done
  fail "bucket $TEST_BUCKET could not be created within 30s" "$STACK_LOGS/minio.log" "see the MinIO log"
}

up_docker() {
  command -v dockerd >/dev/null || fail "dockerd is not installed" /dev/null "run hack/install-system.sh (apt-get install docker.io)"
  if ! /usr/bin/docker info >/dev/null 2>&1; then
    say "starting dockerd"
    start dockerd "$STACK_LOGS/dockerd.log" dockerd --host unix:///var/run/docker.sock
    wait_for dockerd 60 "$STACK_LOGS/dockerd.log" "dockerd needs root, cgroups and overlayfs; see its log" \
      /usr/bin/docker info
  fi
  "$here/base-image.sh"
}

up_mlflow() {  # the tracking server: SQLite and an artifact folder under .stack, loopback only
  local mlflow; mlflow=$("$here/mlflow.sh")
  mkdir -p "$STACK_RUN/mlflow/artifacts"
  say "starting MLflow $MLFLOW_VERSION on http://127.0.0.1:$MLFLOW_PORT"
  start mlflow "$STACK_LOGS/mlflow.log" "$mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$STACK_RUN/mlflow/mlflow.db" \
    --serve-artifacts --artifacts-destination "$STACK_RUN/mlflow/artifacts"
  # the first start creates the database (~20 s of migrations)
  wait_for MLflow 120 "$STACK_LOGS/mlflow.log" "is port $MLFLOW_PORT free? (MLFLOW_PORT=... to move it)" \
    curl -fsS "http://127.0.0.1:$MLFLOW_PORT/health"
  cat > "$STACK_RUN/mlflow.env" <<EOF
export STACK_MLFLOW_URI=http://127.0.0.1:$MLFLOW_PORT
export STACK_MLFLOW_PID_FILE=$PIDS/mlflow
EOF
}

write_env() {
  # shellcheck disable=SC1091
  . "$STACK_RUN/minio.creds"
  cat > "$STACK_RUN/env" <<EOF
# written by hack/stack.sh up; source it to talk to the local stack
export KUBECONFIG=$KCFG
export STACK_KUBECONFIG=$KCFG
export STACK_BIN_DIR=$KUBE_BIN
export HELM=$HELM
export AWS_ENDPOINT_URL=http://127.0.0.1:$MINIO_PORT
export AWS_ACCESS_KEY_ID=$MINIO_ROOT_USER
export AWS_SECRET_ACCESS_KEY=$MINIO_ROOT_PASSWORD
export AWS_REGION=us-east-1
export STACK_TEST_BUCKET=$TEST_BUCKET
export STACK_KWOK_PORT=$KWOK_PORT
export STACK_MINIO_PID_FILE=$PIDS/minio
export STACK_APISERVER_PID_FILE=$PIDS/kube-apiserver
EOF
  if running mlflow && [ -f "$STACK_RUN/mlflow.env" ]; then cat "$STACK_RUN/mlflow.env" >> "$STACK_RUN/env"; fi
  if running node-kubelet && [ -f "$STACK_RUN/node/env" ]; then cat "$STACK_RUN/node/env" >> "$STACK_RUN/env"; fi
  if [ -f "$STACK_RUN/kueue/env" ]; then cat "$STACK_RUN/kueue/env" >> "$STACK_RUN/env"; fi
  if [ -f "$STACK_RUN/jobset/env" ]; then cat "$STACK_RUN/jobset/env" >> "$STACK_RUN/env"; fi
  chmod 600 "$STACK_RUN/env"
}

cmd_up() {
  local docker=1 kube=1 mlflow=0 node=1 arg
  for arg in "$@"; do
    case $arg in
      --no-docker) docker=0; node=0 ;;
      --no-node) node=0 ;;
      --mlflow) mlflow=1 ;;
      --s3-only) docker=0; kube=0; node=0 ;;
      *) echo "unknown option $arg" >&2; exit 2 ;;
    esac
  done
  if [ $kube = 1 ]; then "$here/build-stack.sh"; else "$here/build-stack.sh" minio helm; fi
  up_minio
  [ $kube = 1 ] && up_kube
  [ $docker = 1 ] && up_docker
  [ $node = 1 ] && API_PORT=$API_PORT MINIO_PORT=$MINIO_PORT "$here/node.sh" up
  [ $mlflow = 1 ] && up_mlflow
  write_env
  "$HELM" version --short >/dev/null || fail "helm does not run" /dev/null "rebuild it: hack/build-stack.sh helm"
  say "stack is up: source $STACK_RUN/env"
}

cmd_down() {
  local name
  if running mlflow; then  # a process group: the server, its uvicorn worker and job consumers
    kill -- "-$(cat "$PIDS/mlflow")" 2>/dev/null || true
    for _ in $(seq 60); do running mlflow || break; sleep 0.25; done
    kill -9 -- "-$(cat "$PIDS/mlflow")" 2>/dev/null || true  # whatever of the group outlived the leader
  fi
  rm -rf "$PIDS/mlflow" "$STACK_RUN/mlflow" "$STACK_RUN/mlflow.env"
  "$here/kueue.sh" down  # before the apiserver: its webhook configurations go first
  "$here/jobset.sh" down  # likewise
  "$here/node.sh" down  # before the apiserver: the kubelet's pods stop with it
  for name in kwok kube-scheduler kube-controller-manager kube-apiserver etcd minio dockerd; do
    if running "$name"; then
      kill "$(cat "$PIDS/$name")" 2>/dev/null || true
      for _ in $(seq 40); do running "$name" || break; sleep 0.25; done
      running "$name" && kill -9 "$(cat "$PIDS/$name")" 2>/dev/null || true
    fi
    rm -f "$PIDS/$name"
  done
  rm -rf "$STACK_RUN/etcd" "$STACK_RUN/minio-data" "$STACK_RUN/env"
  say "stack is down"
}

cmd_status() {
  local name
  for name in minio etcd kube-apiserver kube-controller-manager kube-scheduler kwok dockerd mlflow; do
    if running "$name"; then echo "$name: running (pid $(cat "$PIDS/$name"))"; else echo "$name: stopped"; fi
  done
  "$here/node.sh" status
}

case ${1:-} in
  up) shift; cmd_up "$@" ;;
  mlflow) up_mlflow; if [ -f "$STACK_RUN/env" ]; then write_env; fi ;;  # on demand (tests marked mlflow)
  kueue) "$here/kueue.sh" up; if [ -f "$STACK_RUN/env" ]; then write_env; fi ;;  # on demand (tests marked kueue)
  jobset) "$here/jobset.sh" up; if [ -f "$STACK_RUN/env" ]; then write_env; fi ;;  # on demand (tests marked jobset)
  docker) up_docker ;;  # dockerd and the base image alone (hack/prepare-test.sh builds the images before `up`)
  down) cmd_down ;;
  status) cmd_status ;;
  env) cat "$STACK_RUN/env" ;;
  restart-apiserver)  # used by fault-injection tests
    kill "$(cat "$PIDS/kube-apiserver")"; sleep 1; rm -f "$PIDS/kube-apiserver"; up_kube ;;
  stop-apiserver)  # used by fault-injection tests; `up --no-docker` starts it again
    kill "$(cat "$PIDS/kube-apiserver")"; sleep 1; rm -f "$PIDS/kube-apiserver" ;;
  *) echo "usage: hack/stack.sh up [--no-docker] [--no-node] [--s3-only] [--mlflow] | mlflow | kueue | jobset | docker | down | status | env" >&2; exit 2 ;;
esac
