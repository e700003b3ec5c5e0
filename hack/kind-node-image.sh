#!/usr/bin/env bash
# Builds a kind node image here, for machines that reach no container registry (no kindest/node
# to pull): lora-jobs/kind-node:<KUBE_VERSION>. Everything comes from this machine:
#   - the Debian base (hack/base-image.sh) with systemd, containerd, runc, the CNI plugins and
#     iptables from Debian's packages (docker/kind-node/Dockerfile);
#   - kubelet, kubeadm, kubectl and the control plane from our pinned build (hack/build-stack.sh);
#   - the control-plane images (kube-apiserver, kube-controller-manager, kube-scheduler,
#     kube-proxy, etcd, CoreDNS, pause), each a binary of ours on the Debian base, tagged
#     lora-jobs/<name>:<version> and loaded into the node's containerd, as `kind build node-image`
#     does with the images it pulls. hack/kind-up.sh points kubeadm at them (imageRepository).
# Cached: the node image carries a hash of its inputs and is rebuilt only when they change.
# Prints the image name on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/lib.sh
. "$here/lib.sh"
# shellcheck source=hack/kind-lib.sh
. "$here/kind-lib.sh"
export DOCKER_BUILDKIT=1
# The 20.10 client speaks BuildKit to dockerd itself (as in hack/build-images.sh); a newer one needs buildx.
if [ -z "${DOCKER:-}" ]; then if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi; fi
export DOCKER
docker() { "$DOCKER" "$@"; }
ctx=$REPO_ROOT/docker/kind-node
node_image=lora-jobs/kind-node:$KUBE_VERSION
pause_image=lora-jobs/pause:3.10
base=${BASE_IMAGE:-lora-jobs/debian:$DEBIAN_SUITE}
docker info >/dev/null 2>&1 || fail "the Docker engine is not reachable" /dev/null "start it: hack/stack.sh up"

# component image name -> binary, its piece, extra Debian packages
components=(
  "kube-apiserver kube-apiserver kube"
  "kube-controller-manager kube-controller-manager kube"
  "kube-scheduler kube-scheduler kube"
  "kube-proxy kube-proxy kube-proxy iptables,conntrack"
  "etcd etcd etcd"
  "coredns coredns coredns"
)
version_of() { case $1 in etcd) echo "$ETCD_VERSION" ;; coredns) echo "$COREDNS_VERSION" ;; *) echo "$KUBE_VERSION" ;; esac; }
bin_of() {  # bin_of PIECE BINARY: the built binary (etcd's wrapper build names it "server")
  case $1 in etcd) piece_bin etcd "$ETCD_VERSION" server ;; coredns) piece_bin coredns "$COREDNS_PIECE_VERSION" coredns ;;
    *) piece_bin "$1" "$KUBE_VERSION" "$2" ;; esac
}

inputs_hash=$( { cat "$here/versions.env"; find "$ctx" -type f | sort | xargs cat; cat "$here/node/pause.c" "$here/coredns/main.go" "$0"; } | sha256sum | cut -c1-16)
if [ "$(docker image inspect -f '{{index .Config.Labels "lora-jobs.kind-node.inputs"}}' "$node_image" 2>/dev/null)" = "$inputs_hash" ]; then
  say "kind node image $node_image is up to date"
  echo "$node_image"; exit 0
fi

"$here/build-stack.sh" kube kubelet kube-proxy kubeadm etcd coredns
docker image inspect "$base" >/dev/null 2>&1 || "$here/base-image.sh"
log=$STACK_LOGS/kind-node-image.log
: > "$log"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT

images=()
for c in "${components[@]}"; do
  read -r name binary piece packages <<<"$c"
  tag="lora-jobs/$name:$(version_of "$name")"
  mkdir -p "$work/$name/bin"
  cp "$(bin_of "$piece" "$binary")" "$work/$name/bin/$name"
  say "building $tag (log: $log)"
  docker build --progress=plain -f "$ctx/component.Dockerfile" --build-arg "BASE_IMAGE=$base" \
    --build-arg "BINARY=$name" --build-arg "PACKAGES=${packages//,/ }" -t "$tag" "$work/$name" >>"$log" 2>&1 \
    || fail "docker build of $tag failed" "$log" "read the log (apt needs the machine's Debian mirror, which the base image names)"
  images+=("$tag")
done

# The pod sandbox: the static pause of hack/node/pause.c (as the real node's), no registry involved.
say "building $pause_image"
gcc -static -O2 -o "$work/pause" "$here/node/pause.c"
tar -C "$work" -c pause | docker import --change 'ENTRYPOINT ["/pause"]' --change 'USER 65535:65535' - "$pause_image" >/dev/null
images+=("$pause_image")

say "building the node's base layer lora-jobs/kind-node-base:$KUBE_VERSION (log: $log)"
mkdir -p "$work/node/bin"
cp -r "$ctx/files" "$work/node/files"
sed -i "s#@PAUSE_IMAGE@#$pause_image#" "$work/node/files/containerd.toml"
for b in kubelet kubeadm kubectl; do
  case $b in kubelet) p=kubelet ;; *) p=kubeadm ;; esac
  cp "$(piece_bin "$p" "$KUBE_VERSION" "$b")" "$work/node/bin/"
done
docker build --progress=plain -f "$ctx/Dockerfile" --build-arg "BASE_IMAGE=$base" --build-arg "KUBE_VERSION=$KUBE_VERSION" \
  -t "lora-jobs/kind-node-base:$KUBE_VERSION" "$work/node" >>"$log" 2>&1 \
  || fail "docker build of the kind node base failed" "$log" "read the log"

# Load the images into the node's containerd: a privileged container of the base, its containerd
# started by hand, `ctr images import`, then docker commit with kind's entrypoint and init.
run_args=(--privileged)
if kind_needs_runtime; then kind_runtime_setup "$STACK_RUN/kind/bin"; run_args+=(--runtime lora-runc); fi
builder=lora-jobs-kind-node-build
docker rm -f "$builder" >/dev/null 2>&1 || true
docker run -d --name "$builder" "${run_args[@]}" --entrypoint sleep "lora-jobs/kind-node-base:$KUBE_VERSION" infinity >/dev/null
trap 'docker rm -f "$builder" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
docker exec "$builder" bash -c 'nohup containerd >/var/log/containerd-build.log 2>&1 &
  for _ in $(seq 60); do ctr version >/dev/null 2>&1 && exit 0; sleep 0.5; done; cat /var/log/containerd-build.log; exit 1' >>"$log" 2>&1 \
  || fail "containerd did not start inside the node image" "$log" "read the log"
say "loading ${images[*]} into the node's containerd"
docker save "${images[@]}" | docker exec -i "$builder" ctr -n k8s.io images import --all-platforms --no-unpack - >>"$log" 2>&1 \
  || fail "ctr images import into the node failed" "$log" "read the log"
# Pinned, as kind pins its own: the kubelet's image garbage collection never removes them.
docker exec "$builder" bash -c 'for ref in $(ctr -n k8s.io images ls -q); do
  ctr -n k8s.io images label "$ref" io.cri-containerd.pinned=pinned >/dev/null; echo "$ref"; done' >>"$log" 2>&1 \
  || fail "could not pin the node's images" "$log" "read the log"
docker exec "$builder" bash -c 'kill $(pidof containerd); for _ in $(seq 40); do pidof containerd >/dev/null || exit 0; sleep 0.25; done; exit 1'
docker commit --change 'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]' --change 'CMD []' \
  --change "LABEL lora-jobs.kind-node.inputs=$inputs_hash" "$builder" "$node_image" >/dev/null
docker rm -f "$builder" >/dev/null
docker rmi "lora-jobs/kind-node-base:$KUBE_VERSION" >/dev/null 2>&1 || true
say "built $node_image ($(( $(docker image inspect -f '{{.Size}}' "$node_image") / 1024 / 1024 )) MiB)"
echo "$node_image"
