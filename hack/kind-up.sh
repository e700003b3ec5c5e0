#!/usr/bin/env bash
# The laptop flow (`make kind-up`): a kind cluster, our images loaded into it, the
# chart with development MinIO, the demo data uploaded, and a sample run submitted.
# Each step is skipped when already done, so re-running is cheap. docs/kind.md.
#
# Environment:
#   KIND              kind binary (default: kind on PATH)
#   KIND_CLUSTER      cluster name (default: lora-jobs)
#   KIND_NODE_IMAGE   node image (default: kind v0.33.0's own default)
#   KIND_GPU=1        the cluster has a GPU worker (kind-config.yaml says how): the
#                     sample run asks for a GPU; otherwise it runs on the CPU, shortened
#   NAMESPACE         where the chart goes (default: lora-jobs)
#   MODEL_DIR         base model folder to upload (default: the one `make demo` converts)
#   BASE_IMAGE, TRAINER_BASE_IMAGE   bases of the images (hack/build-images.sh);
#                     here they default to debian:bookworm-slim (a laptop reaches registries)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
REPO_ROOT=$(cd "$here/.." && pwd)
KIND_VERSION=v0.33.0
KIND=${KIND:-kind}
CLUSTER=${KIND_CLUSTER:-lora-jobs}
NODE_IMAGE=${KIND_NODE_IMAGE:-kindest/node:v1.37.0@sha256:a1ed56cfb0e7b93589bdf97c8cd566405a265939e3620fc4f5de89adff580ae5}
NAMESPACE=${NAMESPACE:-lora-jobs}
MODEL_DIR=${MODEL_DIR:-$HOME/.cache/lora-jobs/models/smollm2-135m-instruct}
DOCKER=${DOCKER:-docker}
STATE=$REPO_ROOT/.stack/kind
VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$REPO_ROOT/pyproject.toml" | head -n1)

say() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die() { printf '\033[31merror:\033[0m %s\n  fix: %s\n' "$1" "$2" >&2; exit 1; }

# --- 1. tools ------------------------------------------------------------------
command -v "$DOCKER" >/dev/null || die "docker is not installed" "install Docker (kind runs its nodes as containers)"
command -v "$KIND" >/dev/null || die "kind is not installed (looked for '$KIND')" \
  "go install sigs.k8s.io/kind@$KIND_VERSION (puts kind in \$(go env GOPATH)/bin), or your package manager's kind"
command -v kubectl >/dev/null || die "kubectl is not installed" "install kubectl matching Kubernetes ${NODE_IMAGE%%@*}"
HELM=${HELM:-$(command -v helm || true)}
[ -n "$HELM" ] || die "helm is not installed" "install helm v3, or run hack/build-stack.sh and set HELM"
"$DOCKER" info >/dev/null 2>&1 || die "the Docker engine is not reachable" "start Docker (Docker Desktop, or systemctl start docker)"
say "using $("$KIND" version 2>/dev/null | head -n1)"

# --- 2. the node image: the one thing a machine without registry access lacks ------
if ! "$DOCKER" image inspect "$NODE_IMAGE" >/dev/null 2>&1; then
  say "pulling the kind node image $NODE_IMAGE"
  if ! "$DOCKER" pull "$NODE_IMAGE" >&2; then
    die "the kind node image $NODE_IMAGE is not here and cannot be pulled (no registry reachable?)" \
      "on a machine that has it: docker save $NODE_IMAGE | ssh <this machine> docker load; or set KIND_NODE_IMAGE to a node image you have. (On the CI machine no node image can be had: the chart is tested against the local stack instead, see docs/kind.md.)"
  fi
fi

# --- 3. the cluster ------------------------------------------------------------
mkdir -p "$STATE"
KUBECONFIG_FILE=$STATE/kubeconfig
if "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  say "kind cluster $CLUSTER exists"
else
  say "creating kind cluster $CLUSTER (kind-config.yaml)"
  "$KIND" create cluster --name "$CLUSTER" --config "$REPO_ROOT/kind-config.yaml" --image "$NODE_IMAGE" --wait 180s \
    || die "kind create cluster failed" "read kind's message above; 'kind delete cluster --name $CLUSTER' and retry"
fi
"$KIND" get kubeconfig --name "$CLUSTER" >"$KUBECONFIG_FILE"
export KUBECONFIG=$KUBECONFIG_FILE

# --- 4. images -------------------------------------------------------------------
export BASE_IMAGE=${BASE_IMAGE:-debian:bookworm-slim}
"$here/build-images.sh"
for image in "lora-jobs/trainer:$VERSION" "lora-jobs/launcher:$VERSION"; do
  say "kind load docker-image $image"
  "$KIND" load docker-image --name "$CLUSTER" "$image"
done

# --- 5. the chart, with development MinIO ---------------------------------------
kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl label namespace "$NAMESPACE" --overwrite \
  pod-security.kubernetes.io/enforce=restricted pod-security.kubernetes.io/enforce-version=latest >/dev/null
say "helm upgrade --install lora-jobs (namespace $NAMESPACE, development MinIO)"
"$HELM" upgrade --install lora-jobs "$REPO_ROOT/charts/lora-jobs" --namespace "$NAMESPACE" \
  --set minio.enabled=true --set 'minio.extraBuckets={models,datasets,runs}' \
  --set images.trainer.pullPolicy=Never --set images.launcher.pullPolicy=Never \
  --wait --timeout 5m
"$HELM" test lora-jobs --namespace "$NAMESPACE" --logs

# --- 6. demo data into MinIO, through a port-forward ----------------------------
kubectl -n "$NAMESPACE" port-forward svc/lora-jobs-minio 19000:9000 >"$STATE/port-forward.log" 2>&1 &
echo $! >"$STATE/port-forward.pid"
trap 'kill "$(cat "$STATE/port-forward.pid")" 2>/dev/null || true' EXIT
for _ in $(seq 30); do (exec 3<>/dev/tcp/127.0.0.1/19000) 2>/dev/null && break; sleep 1; done
creds() { kubectl -n "$NAMESPACE" get secret lora-jobs-s3 -o "jsonpath={.data.$1}" | base64 -d; }
uploads=(-v "$REPO_ROOT/examples/demo:/upload/datasets/support:ro")
if [ -d "$MODEL_DIR" ]; then
  uploads+=(-v "$MODEL_DIR:/upload/models/smollm2-135m-instruct:ro")
else
  say "no base model at $MODEL_DIR: the run will stop at fetch (exit 12). 'make demo' converts one there"
fi
say "uploading the demo data (and base model) to MinIO"
"$DOCKER" run --rm --network host --user "$(id -u):$(id -g)" "${uploads[@]}" \
  -e AWS_ENDPOINT_URL=http://127.0.0.1:19000 -e AWS_REGION=us-east-1 \
  -e AWS_ACCESS_KEY_ID="$(creds AWS_ACCESS_KEY_ID)" -e AWS_SECRET_ACCESS_KEY="$(creds AWS_SECRET_ACCESS_KEY)" \
  --entrypoint python "lora-jobs/launcher:$VERSION" -c '
import os, boto3
s3 = boto3.client("s3")
for bucket in os.listdir("/upload"):
    for root, _, files in os.walk(f"/upload/{bucket}"):
        for f in files:
            key = os.path.relpath(os.path.join(root, f), f"/upload/{bucket}")
            s3.upload_file(os.path.join(root, f), bucket, key)
            print(f"s3://{bucket}/{key}")'

# --- 7. a sample run, submitted by the launcher image with this cluster's kubeconfig
sets=()
if [ "${KIND_GPU:-0}" != 1 ]; then
  # No GPU worker: a short CPU run of the same spec.
  sets=(--set resources.gpus=0 --set resources.cpu=2 --set resources.memory=6Gi --set resources.scratch=10Gi
        --set training.max_steps=5 --set training.max_seq_length=128 --set merge.enabled=false)
fi
say "launcher submit examples/spec.yaml ${sets[*]}"
if command -v launcher >/dev/null; then
  LAUNCHER_NAMESPACE=$NAMESPACE launcher submit "$REPO_ROOT/examples/spec.yaml" "${sets[@]}"
else
  # The launcher image; --network host reaches kind's API server on 127.0.0.1.
  "$DOCKER" run --rm --network host -v "$KUBECONFIG_FILE:/kubeconfig:ro" -v "$REPO_ROOT/examples:/examples:ro" \
    -e LAUNCHER_KUBECONFIG=/kubeconfig -e LAUNCHER_NAMESPACE="$NAMESPACE" \
    "lora-jobs/launcher:$VERSION" submit /examples/spec.yaml "${sets[@]}"
fi

cat >&2 <<EOF

Cluster $CLUSTER is up. Next:
  export KUBECONFIG=$KUBECONFIG_FILE LAUNCHER_NAMESPACE=$NAMESPACE
  launcher status support-bot          # or: kubectl -n $NAMESPACE get jobs,pods
  launcher logs support-bot -f
  make kind-down                       # delete the cluster
EOF
