#!/usr/bin/env bash
# The laptop flow (`make kind-up`): a kind cluster, our images loaded into it, the
# chart with development MinIO, the demo data uploaded, and a sample run submitted.
# Each step is skipped when already done, so re-running is cheap. docs/kind.md.
#
# Environment:
#   KIND              kind binary (default: kind on PATH, else the one hack/build-stack.sh kind
#                     builds, built on first use when Go is installed)
#   KIND_CLUSTER      cluster name (default: lora-jobs)
#   KIND_CONFIG       cluster config (default: kind-config.yaml)
#   KIND_NODE_IMAGE   node image (default: kind v0.33.0's own default); "local": the node image that
#                     hack/kind-node-image.sh builds here from our pinned Kubernetes and Debian packages
#   KIND_BUILD_NODE_IMAGE=0  when the default node image cannot be pulled, stop instead of building
#                     the local one (default 1: build it, as on a machine that reaches no registry)
#   KIND_SAMPLE_RUN=0 stop after `helm test`: no trainer image loaded, no run submitted
#   KIND_GPU=1        the cluster has a GPU worker (kind-config.yaml says how): the
#                     sample run asks for a GPU; otherwise it runs on the CPU, shortened
#   NAMESPACE         where the chart goes (default: lora-jobs)
#   MODEL_DIR         base model folder to upload (default: the one `make demo` converts)
#   BASE_IMAGE, TRAINER_BASE_IMAGE   bases of the images (hack/build-images.sh);
#                     here they default to debian:bookworm-slim (a laptop reaches registries)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
REPO_ROOT=$(cd "$here/.." && pwd)
# shellcheck source=hack/versions.env
. "$here/versions.env"  # KIND_VERSION, KUBE_VERSION, HELM_VERSION, MINIO_VERSION
CACHE=${STACK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lora-jobs/stack}
CLUSTER=${KIND_CLUSTER:-lora-jobs}
CONFIG=${KIND_CONFIG:-$REPO_ROOT/kind-config.yaml}
STOCK_NODE_IMAGE=kindest/node:v1.37.0@sha256:a1ed56cfb0e7b93589bdf97c8cd566405a265939e3620fc4f5de89adff580ae5
NODE_IMAGE=${KIND_NODE_IMAGE:-$STOCK_NODE_IMAGE}
LOCAL_NODE=0
[ "$NODE_IMAGE" = local ] && LOCAL_NODE=1
NAMESPACE=${NAMESPACE:-lora-jobs}
MODEL_DIR=${MODEL_DIR:-$HOME/.cache/lora-jobs/models/smollm2-135m-instruct}
DOCKER=${DOCKER:-docker}
STATE=$REPO_ROOT/.stack/kind
VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$REPO_ROOT/pyproject.toml" | head -n1)

say() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die() { printf '\033[31merror:\033[0m %s\n  fix: %s\n' "$1" "$2" >&2; exit 1; }

# --- 1. tools ------------------------------------------------------------------
command -v "$DOCKER" >/dev/null || die "docker is not installed" "install Docker (kind runs its nodes as containers)"
if [ -z "${KIND:-}" ]; then
  KIND=kind
  if ! command -v kind >/dev/null; then  # the one our stack builds (hack/build-stack.sh kind)
    KIND=$CACHE/kind-$KIND_VERSION/bin/kind
    if [ ! -x "$KIND" ] && command -v go >/dev/null; then "$here/build-stack.sh" kind; fi
  fi
fi
command -v "$KIND" >/dev/null || die "kind is not installed (looked for '$KIND')" \
  "go install sigs.k8s.io/kind@$KIND_VERSION (puts kind in \$(go env GOPATH)/bin), or your package manager's kind"
KUBECTL=${KUBECTL:-$(command -v kubectl || true)}
[ -n "$KUBECTL" ] || [ ! -x "$CACHE/kubeadm-$KUBE_VERSION/bin/kubectl" ] || KUBECTL=$CACHE/kubeadm-$KUBE_VERSION/bin/kubectl
[ -n "$KUBECTL" ] || die "kubectl is not installed" "install kubectl matching Kubernetes ${NODE_IMAGE%%@*}"
kubectl() { "$KUBECTL" "$@"; }
HELM=${HELM:-$(command -v helm || true)}
[ -n "$HELM" ] || [ ! -x "$CACHE/helm-$HELM_VERSION/bin/helm" ] || HELM=$CACHE/helm-$HELM_VERSION/bin/helm
[ -n "$HELM" ] || die "helm is not installed" "install helm v3, or run hack/build-stack.sh and set HELM"
"$DOCKER" info >/dev/null 2>&1 || die "the Docker engine is not reachable" "start Docker (Docker Desktop, or systemctl start docker)"
say "using $("$KIND" version 2>/dev/null | head -n1)"

# --- 2. the node image: the one thing a machine without registry access lacks ------
if [ "$LOCAL_NODE" = 0 ] && ! "$DOCKER" image inspect "$NODE_IMAGE" >/dev/null 2>&1; then
  say "pulling the kind node image $NODE_IMAGE"
  if ! "$DOCKER" pull "$NODE_IMAGE" >&2; then
    if [ -z "${KIND_NODE_IMAGE:-}" ] && [ "${KIND_BUILD_NODE_IMAGE:-1}" != 0 ]; then
      say "no registry reachable: building a kind node image here instead (hack/kind-node-image.sh)"
      LOCAL_NODE=1
    else
      die "the kind node image $NODE_IMAGE is not here and cannot be pulled (no registry reachable?)" \
        "on a machine that has it: docker save $NODE_IMAGE | ssh <this machine> docker load; or set KIND_NODE_IMAGE to a node image you have, or KIND_NODE_IMAGE=local to build one here from our pinned Kubernetes (docs/kind.md)"
    fi
  fi
fi
mkdir -p "$STATE"
kind_() { "$KIND" "$@"; }
if [ "$LOCAL_NODE" = 1 ]; then
  # shellcheck source=hack/lib.sh
  . "$here/lib.sh"
  # shellcheck source=hack/kind-lib.sh
  . "$here/kind-lib.sh"
  NODE_IMAGE=$("$here/kind-node-image.sh")
  # Where root lacks CAP_SYS_RESOURCE, kind's `docker run --privileged` needs the lora-runc runtime.
  if kind_needs_runtime; then
    kind_runtime_setup "$STATE/bin"
    kind_() { PATH="$STATE/bin:$PATH" "$KIND" "$@"; }
  fi
  # The node image's control plane is ours (lora-jobs/<component>:<version>, loaded in the image):
  # kubeadm is pointed at it. Machines that refuse a negative oom_score_adj get kube-proxy without one.
  { cat "$CONFIG"
    printf '\n# Added by hack/kind-up.sh for the node image built here (hack/kind-node-image.sh).\n'
    printf 'kubeadmConfigPatches:\n'
    printf '  - |\n    kind: ClusterConfiguration\n    imageRepository: lora-jobs\n'
    printf '    etcd:\n      local:\n        imageTag: %s\n    dns:\n      imageTag: %s\n' "$ETCD_VERSION" "$COREDNS_VERSION"
    printf '  - |\n    kind: KubeletConfiguration\n    failCgroupV1: false\n'
    printf '  - |\n    kind: KubeProxyConfiguration\n    oomScoreAdj: 0\n'
  } > "$STATE/kind-config.yaml"
  CONFIG=$STATE/kind-config.yaml
fi

# --- 3. the cluster ------------------------------------------------------------
KUBECONFIG_FILE=$STATE/kubeconfig
if kind_ get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  say "kind cluster $CLUSTER exists"
else
  say "creating kind cluster $CLUSTER ($(basename "$CONFIG"), node image $NODE_IMAGE)"
  kind_ create cluster --name "$CLUSTER" --config "$CONFIG" --image "$NODE_IMAGE" --wait 180s \
    || die "kind create cluster failed" "read kind's message above; 'kind export logs --name $CLUSTER' has the nodes' journals; 'kind delete cluster --name $CLUSTER' and retry"
fi
kind_ get kubeconfig --name "$CLUSTER" >"$KUBECONFIG_FILE"
export KUBECONFIG=$KUBECONFIG_FILE
# Images go where pods run: the workers, or the only node of a one-node cluster.
load_nodes=$(kind_ get nodes --name "$CLUSTER" | grep -v -- '-control-plane$' | paste -sd, -)
[ -n "$load_nodes" ] || load_nodes=$(kind_ get nodes --name "$CLUSTER" | paste -sd, -)
load() {  # load IMAGE: into those nodes' containerd, unless they got that very image already
  local id stamp; id=$("$DOCKER" image inspect -f '{{.Id}}' "$1"); stamp="$STATE/loaded-${1//[\/:]/_}"
  if [ "$(cat "$stamp" 2>/dev/null)" = "$id" ]; then say "$1 is loaded already"; return 0; fi
  say "kind load docker-image $1 (nodes: $load_nodes)"
  kind_ load docker-image --name "$CLUSTER" --nodes "$load_nodes" "$1"
  echo "$id" > "$stamp"
}

# --- 4. images -------------------------------------------------------------------
minio_sets=()
if [ "$LOCAL_NODE" = 1 ]; then
  # No registry: the local Debian base (hack/base-image.sh), and the dev MinIO built from source.
  [ -n "${BASE_IMAGE:-}" ] || unset BASE_IMAGE
  images=(launcher minio)
  minio_sets=(--set minio.image.repository=lora-jobs/minio --set "minio.image.tag=$MINIO_VERSION"
              --set minio.image.pullPolicy=Never)
else
  export BASE_IMAGE=${BASE_IMAGE:-debian:bookworm-slim}
  images=(launcher)
fi
[ "${KIND_SAMPLE_RUN:-1}" = 0 ] || images+=(trainer)
"$here/build-images.sh" "${images[@]}"
load "lora-jobs/launcher:$VERSION"
[ "$LOCAL_NODE" = 0 ] || load "lora-jobs/minio:$MINIO_VERSION"
if [ "${KIND_SAMPLE_RUN:-1}" != 0 ]; then
  # A node keeps a loaded image about twice (the archive's layers and their unpacked snapshot):
  # say so before the disk fills up, not after.
  size=$("$DOCKER" image inspect -f '{{.Size}}' "lora-jobs/trainer:$VERSION")
  free=$(( $(df -Pk "$("$DOCKER" info -f '{{.DockerRootDir}}')" | awk 'NR == 2 {print $4}') * 1024 ))
  n=$(tr ',' '\n' <<<"$load_nodes" | grep -c .)
  need=$(( size * 2 * n + (1 << 30) ))
  if [ "$free" -lt "$need" ]; then
    die "loading lora-jobs/trainer:$VERSION ($(( size >> 20 )) MiB) into $n kind node(s) needs about $(( need >> 20 )) MiB of free disk; $(( free >> 20 )) MiB are free" \
      "free some disk, or run KIND_SAMPLE_RUN=0 make kind-up to stop after helm test (the cluster stays up)"
  fi
  load "lora-jobs/trainer:$VERSION"
fi

# --- 5. the chart, with development MinIO ---------------------------------------
kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl label namespace "$NAMESPACE" --overwrite \
  pod-security.kubernetes.io/enforce=restricted pod-security.kubernetes.io/enforce-version=latest >/dev/null
say "helm upgrade --install lora-jobs (namespace $NAMESPACE, development MinIO)"
"$HELM" upgrade --install lora-jobs "$REPO_ROOT/charts/lora-jobs" --namespace "$NAMESPACE" \
  --set minio.enabled=true --set 'minio.extraBuckets={models,datasets,runs}' \
  --set images.trainer.pullPolicy=Never --set images.launcher.pullPolicy=Never "${minio_sets[@]}" \
  --wait --timeout 5m
# No --logs: the test pod is deleted once it succeeds (hook-delete-policy), and helm then fails to
# fetch its logs; a failed one stays, and its log is shown.
"$HELM" test lora-jobs --namespace "$NAMESPACE" || {
  kubectl -n "$NAMESPACE" logs pod/lora-jobs-test-s3 >&2 || true
  die "helm test failed: a pod with the jobs' credentials could not reach the bucket" "read the test pod's log above"
}
if [ "${KIND_SAMPLE_RUN:-1}" = 0 ]; then
  say "KIND_SAMPLE_RUN=0: stopping after helm test. Cluster $CLUSTER is up (KUBECONFIG=$KUBECONFIG_FILE); make kind-down removes it"
  exit 0
fi

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
# The jobs' credentials, for the upload and the download below: in the environment, never on a command line.
AWS_ACCESS_KEY_ID=$(creds AWS_ACCESS_KEY_ID) AWS_SECRET_ACCESS_KEY=$(creds AWS_SECRET_ACCESS_KEY)
export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_ENDPOINT_URL=http://127.0.0.1:19000 AWS_REGION=us-east-1
s3_env=(-e AWS_ENDPOINT_URL -e AWS_REGION -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY)
say "uploading the demo data (and base model) to MinIO"
"$DOCKER" run --rm --network host --user "$(id -u):$(id -g)" "${uploads[@]}" "${s3_env[@]}" \
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
  sets=(--set resources.gpus=0 --set resources.cpu=1000m --set resources.memory=6Gi --set resources.scratch=10Gi
        --set training.max_steps=5 --set training.max_seq_length=128 --set merge.enabled=false)
fi
mkdir -p "$STATE/sample"
if command -v launcher >/dev/null; then
  launcher_() { LAUNCHER_KUBECONFIG=$KUBECONFIG_FILE LAUNCHER_NAMESPACE=$NAMESPACE launcher "$@"; }
  sample=$STATE/sample
else
  # The launcher image; --network host reaches kind's API server and the port-forward on 127.0.0.1.
  launcher_() {
    "$DOCKER" run --rm --network host --user "$(id -u):$(id -g)" -v "$KUBECONFIG_FILE:/kubeconfig:ro" \
      -v "$REPO_ROOT/examples:/examples:ro" -v "$STATE/sample:/sample" "${s3_env[@]}" \
      -e LAUNCHER_KUBECONFIG=/kubeconfig -e LAUNCHER_NAMESPACE="$NAMESPACE" "lora-jobs/launcher:$VERSION" "$@"
  }
  sample=/sample
fi
spec_file=$REPO_ROOT/examples/spec.yaml
command -v launcher >/dev/null || spec_file=/examples/spec.yaml
say "launcher submit examples/spec.yaml ${sets[*]}"
launcher_ submit "$spec_file" "${sets[@]}"

# --- 8. the run to its end, and its version downloaded and checked against its manifest
say "launcher wait support-bot (the trainer on the worker; a few minutes on CPU)"
launcher_ wait support-bot --timeout "${KIND_SAMPLE_TIMEOUT:-1800}" || {
  launcher_ logs support-bot --tail 40 >&2 || true
  die "the sample run did not succeed (its status and log are above)" \
    "launcher status support-bot with KUBECONFIG=$KUBECONFIG_FILE; the cluster stays up"
}
rm -rf "${STATE:?}/sample/v"*
launcher_ artifacts support-bot --download "$sample"
say "the sample run's version is in $STATE/sample (verified against its manifest)"

cat >&2 <<EOF

Cluster $CLUSTER is up. Next:
  export KUBECONFIG=$KUBECONFIG_FILE LAUNCHER_NAMESPACE=$NAMESPACE
  launcher status support-bot          # or: kubectl -n $NAMESPACE get jobs,pods
  launcher logs support-bot -f
  make kind-down                       # delete the cluster
EOF
