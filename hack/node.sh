#!/usr/bin/env bash
# The real node of the local stack, next to kwok's fake GPU nodes: a kubelet and kube-proxy built
# from the control plane's own k8s.io/kubernetes, Debian's containerd + runc, a CNI bridge, and an
# image registry (distribution) that the node pulls from by name. CPU only.
#
#   host (loopback only)                      netns lora-node (made here; node IP 10.250.0.2)
#   kube-apiserver 127.0.0.1:$API_PORT  <--unix socket-->  127.0.0.1:$API_PORT   kubelet, containerd
#   registry       127.0.0.1:$REGISTRY_PORT <--unix socket--> 127.0.0.1:$REGISTRY_PORT
#   MinIO          127.0.0.1:$MINIO_PORT <--unix socket-->  10.251.0.1:$MINIO_PORT (pods' S3 endpoint)
#   apiserver --> kubelet 10.250.0.2:10250 over a veth pair (logs, exec)
#   CoreDNS (cluster.local only) on 10.251.0.1:53 for the pods
#   kube-proxy (iptables, masquerading every Service connection) for Service ClusterIPs (10.96.0.0/16)
#
# Nothing leaves the machine: the node's namespace has no default route, the pods' bridge
# (10.251.0.0/24) lives inside it, and every hop to a host service is a unix socket (socat),
# so host services stay on loopback. The node is tainted lora-jobs.dev/real-node=true:NoSchedule;
# a namespace whose annotations carry that toleration and the node selector
# lora-jobs.dev/node-pool=real (the PodNodeSelector and PodTolerationRestriction admission
# plugins) sends its pods there, as a dedicated node pool would.
#
# Usage: hack/node.sh up | down | status | push IMAGE... | stop-kubelet | start-kubelet
#        hack/node.sh rmi IMAGE...  drop images from the node's containerd (as on a node that never pulled them)
#        hack/node.sh exec CMD...   CMD in the node's network namespace (as a process on the node:
#                                   pod IPs and Service ClusterIPs answer; used by tests/ to reach
#                                   what the chart runs as pods, like its dev MinIO)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/lib.sh
. "$here/lib.sh"

MINIO_PORT=${MINIO_PORT:-29000}
REGISTRY_PORT=${REGISTRY_PORT:-25002}
NODE_NAME=${NODE_NAME:-lora-node-0}
NETNS=${NODE_NETNS:-lora-node}
HOST_IP=10.250.0.1 NODE_IP=10.250.0.2 POD_CIDR=10.251.0.0/24 POD_GW=10.251.0.1
SERVICE_CIDR=10.96.0.0/16  # the apiserver's --service-cluster-ip-range (hack/stack.sh)
TAINT_KEY=lora-jobs.dev/real-node
PAUSE_IMAGE=127.0.0.1:$REGISTRY_PORT/lora-jobs/pause:3.10

NODE_RUN=$STACK_RUN/node          # per stack: sockets, configs, kubelet root, runtime state
NODE_CACHE=$STACK_CACHE/node      # per machine: containerd's images and the registry's blobs
KUBELET=$(piece_bin kubelet "$KUBE_VERSION" kubelet)
REGISTRY=$(piece_bin registry "$REGISTRY_VERSION" registry)
COREDNS=$(piece_bin coredns "$COREDNS_PIECE_VERSION" coredns)
KUBE_PROXY=$(piece_bin kube-proxy "$KUBE_VERSION" kube-proxy)
CTR_SOCK=$NODE_RUN/containerd.sock
in_ns() { nsenter --net="/run/netns/$NETNS" -- "$@"; }  # the network namespace only: mounts stay shared
ctr_() { ctr --address "$CTR_SOCK" -n k8s.io "$@"; }

need_tools() {
  local t missing=()
  for t in containerd runc socat nsenter ip gcc skopeo iptables; do command -v "$t" >/dev/null || missing+=("$t"); done
  [ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
  [ ${#missing[@]} -eq 0 ] || fail "the real node needs ${missing[*]}" /dev/null "run hack/install-system.sh"
  [ -x "$KUBELET" ] || fail "the kubelet is not built" "$STACK_LOGS/build-kubelet.log" "run hack/build-stack.sh kubelet"
  [ -x "$REGISTRY" ] || fail "the registry is not built" "$STACK_LOGS/build-registry.log" "run hack/build-stack.sh registry"
  [ -x "$COREDNS" ] || fail "CoreDNS is not built" "$STACK_LOGS/build-coredns.log" "run hack/build-stack.sh coredns"
  [ -x "$KUBE_PROXY" ] || fail "kube-proxy is not built" "$STACK_LOGS/build-kube-proxy.log" "run hack/build-stack.sh kube-proxy"
  [ -f "$PKI/node.crt" ] || fail "the node's certificates are missing" /dev/null "start the control plane first: hack/stack.sh up"
}

up_registry() {
  mkdir -p "$NODE_CACHE/registry" "$NODE_RUN"
  cat > "$NODE_RUN/registry.yml" <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: $NODE_CACHE/registry}
  delete: {enabled: true}
http: {addr: "127.0.0.1:$REGISTRY_PORT"}
EOF
  if ! running registry; then  # blobs of images no tag names any more (an older trainer), while it is stopped
    "$REGISTRY" garbage-collect --delete-untagged "$NODE_RUN/registry.yml" >"$STACK_LOGS/registry-gc.log" 2>&1 || true
  fi
  say "starting the image registry $REGISTRY_VERSION on 127.0.0.1:$REGISTRY_PORT"
  start registry "$STACK_LOGS/registry.log" "$REGISTRY" serve "$NODE_RUN/registry.yml"
  wait_for registry 30 "$STACK_LOGS/registry.log" "is port $REGISTRY_PORT free? (REGISTRY_PORT=... to move it)" \
    curl -fsS "http://127.0.0.1:$REGISTRY_PORT/v2/"
}

in_registry() {  # in_registry REPO TAG
  curl -fs -o /dev/null -I -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://127.0.0.1:$REGISTRY_PORT/v2/$1/manifests/$2"
}

push_pause() {
  in_registry lora-jobs/pause 3.10 && return 0
  command -v docker >/dev/null && docker info >/dev/null 2>&1 \
    || fail "the pause image needs the Docker engine once" /dev/null "start the stack with Docker: hack/stack.sh up"
  say "building the pod sandbox image $PAUSE_IMAGE (static pause from hack/node/pause.c)"
  local dir; dir=$(mktemp -d)
  gcc -static -O2 -o "$dir/pause" "$here/node/pause.c"
  tar -C "$dir" -c pause | docker import --change 'ENTRYPOINT ["/pause"]' --change 'USER 65535:65535' - \
    lora-jobs/pause:3.10 >/dev/null
  rm -rf "$dir"
  cmd_push lora-jobs/pause:3.10
}

up_netns() {
  if [ ! -e "/run/netns/$NETNS" ]; then
    say "creating network namespace $NETNS (node IP $NODE_IP)"
    ip netns add "$NETNS"
  fi
  in_ns ip link set lo up
  if ! ip link show lora-veth0 >/dev/null 2>&1; then
    ip link add lora-veth0 type veth peer name lora-veth1
    ip link set lora-veth1 netns "$NETNS"
    ip addr add "$HOST_IP/30" dev lora-veth0
    in_ns ip addr add "$NODE_IP/30" dev lora-veth1
  fi
  ip link set lora-veth0 up
  in_ns ip link set lora-veth1 up
  # The pods' bridge, made before the first pod so that cluster DNS can listen on its gateway address;
  # the CNI bridge plugin takes it over as it is.
  if ! in_ns ip link show lora0 >/dev/null 2>&1; then
    in_ns ip link add lora0 type bridge
    in_ns ip addr add "$POD_GW/${POD_CIDR#*/}" dev lora0
  fi
  in_ns ip link set lora0 up
  # A route for Service ClusterIPs, so that a process of the node itself (not only a pod) gets as far
  # as kube-proxy's OUTPUT rules: the namespace has no default route, and without one connect() fails
  # before any rule sees the packet. Pods route through their gateway and are DNATed on the way in.
  in_ns ip route replace "$SERVICE_CIDR" dev lora0 src "$POD_GW"
}

client_cert() {  # client_cert NAME CN [O]: a client certificate of the stack's CA, once
  [ -f "$PKI/$1.crt" ] && return 0
  openssl req -newkey rsa:2048 -nodes -keyout "$PKI/$1.key" -out "$PKI/$1.csr" -subj "${3:+/O=$3}/CN=$2" 2>/dev/null
  openssl x509 -req -in "$PKI/$1.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -out "$PKI/$1.crt" -days 3650 2>/dev/null
  chmod 600 "$PKI/$1.key"
}

kubeconfig_for() {  # kubeconfig_for NAME: a kubeconfig (inside the node's namespace) with NAME's certificate
  cat > "$NODE_RUN/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "https://127.0.0.1:$API_PORT", certificate-authority: $PKI/ca.crt}
users:
- name: $1
  user: {client-certificate: $PKI/$1.crt, client-key: $PKI/$1.key}
contexts:
- name: $1
  context: {cluster: local, user: $1}
current-context: $1
EOF
}

# Cluster DNS for the node's pods (Service names, and a multi-node run's <job>-0.<job>): CoreDNS's
# kubernetes plugin on the bridge's gateway, with read-only RBAC of its own and no upstream, so a
# name outside cluster.local is answered by nobody.
up_dns() {
  client_cert coredns system:coredns
  kubeconfig_for coredns
  api PUT /apis/rbac.authorization.k8s.io/v1/clusterroles/lora-jobs:coredns '{
    "apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRole","metadata":{"name":"lora-jobs:coredns"},
    "rules":[{"apiGroups":[""],"resources":["services","endpoints","pods","namespaces"],"verbs":["list","watch"]},
             {"apiGroups":["discovery.k8s.io"],"resources":["endpointslices"],"verbs":["list","watch"]}]}' >/dev/null
  api PUT /apis/rbac.authorization.k8s.io/v1/clusterrolebindings/lora-jobs:coredns '{
    "apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRoleBinding","metadata":{"name":"lora-jobs:coredns"},
    "roleRef":{"apiGroup":"rbac.authorization.k8s.io","kind":"ClusterRole","name":"lora-jobs:coredns"},
    "subjects":[{"apiGroup":"rbac.authorization.k8s.io","kind":"User","name":"system:coredns"}]}' >/dev/null
  cat > "$NODE_RUN/Corefile" <<EOF
.:53 {
    bind $POD_GW
    errors
    ready 127.0.0.1:18181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $NODE_RUN/coredns.kubeconfig coredns
        pods insecure
    }
    cache 5
}
EOF
  say "starting CoreDNS $COREDNS_VERSION on $POD_GW:53 (cluster.local only)"
  start node-coredns "$STACK_LOGS/node-coredns.log" \
    nsenter --net="/run/netns/$NETNS" -- "$COREDNS" -conf "$NODE_RUN/Corefile"
  wait_for "cluster DNS" 60 "$STACK_LOGS/node-coredns.log" "see CoreDNS's log" \
    in_ns curl -fsS http://127.0.0.1:18181/ready
}

# Service ClusterIPs for the node's pods: kube-proxy in iptables mode, in the node's namespace, as the
# built-in user system:kube-proxy (the bootstrap ClusterRoleBinding system:node-proxier gives it just
# the read access it needs). masqueradeAll: a pod reaching a Service whose endpoint sits on the same
# bridge gets its replies through the gateway even where br_netfilter is not loaded. It changes no
# sysctl outside the namespace (conntrack sizing off) and asks for no negative oom_score_adj, which
# this machine refuses.
up_proxy() {
  client_cert kube-proxy system:kube-proxy
  kubeconfig_for kube-proxy
  cat > "$NODE_RUN/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $NODE_RUN/kube-proxy.kubeconfig}
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
mode: iptables
clusterCIDR: $POD_CIDR
detectLocalMode: ClusterCIDR
iptables: {masqueradeAll: true, localhostNodePorts: false, syncPeriod: 30s, minSyncPeriod: 1s}
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
nodePortAddresses: [$NODE_IP/32]
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
oomScoreAdj: 0
EOF
  say "starting kube-proxy $KUBE_VERSION (iptables) in $NETNS"
  start node-kube-proxy "$STACK_LOGS/node-kube-proxy.log" \
    nsenter --net="/run/netns/$NETNS" -- "$KUBE_PROXY" --config "$NODE_RUN/kube-proxy.yaml"
  wait_for "kube-proxy" 60 "$STACK_LOGS/node-kube-proxy.log" "see kube-proxy's log" \
    in_ns curl -fsS http://127.0.0.1:10256/healthz
}

# bridge NAME NS_LISTEN HOST_PORT: NS_LISTEN (inside the node's namespace) -> unix socket -> 127.0.0.1:HOST_PORT
bridge() {
  local name=$1 listen=$2 port=$3 sock=$NODE_RUN/$1.sock
  rm -f "$sock"
  start "bridge-$name-host" "$STACK_LOGS/bridge-$name.log" socat "UNIX-LISTEN:$sock,fork,mode=600" "TCP:127.0.0.1:$port"
  start "bridge-$name-node" "$STACK_LOGS/bridge-$name-node.log" \
    nsenter --net="/run/netns/$NETNS" -- socat "TCP-LISTEN:${listen##*:},bind=${listen%:*},fork,reuseaddr" "UNIX-CONNECT:$sock"
}

write_configs() {
  mkdir -p "$NODE_RUN/cni/net.d" "$NODE_RUN/cni/ipam" "$NODE_RUN/certs.d/127.0.0.1:$REGISTRY_PORT" \
    "$NODE_CACHE/containerd" "$NODE_RUN/containerd-state" "$NODE_RUN/kubelet"
  cat > "$NODE_RUN/cni/net.d/10-lora.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "lora-pods", "plugins": [
  {"type": "bridge", "bridge": "lora0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$NODE_RUN/cni/ipam",
            "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$POD_GW"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
  cat > "$NODE_RUN/certs.d/127.0.0.1:$REGISTRY_PORT/hosts.toml" <<EOF
server = "http://127.0.0.1:$REGISTRY_PORT"
[host."http://127.0.0.1:$REGISTRY_PORT"]
  capabilities = ["pull", "resolve"]
EOF
  # Our own containerd beside Docker's: own root, state, sockets. restrict_oom_score_adj: this
  # machine refuses a negative oom_score_adj, and runc fails every sandbox without it.
  cat > "$NODE_RUN/containerd.toml" <<EOF
version = 2
root = "$NODE_CACHE/containerd"
state = "$NODE_RUN/containerd-state"
[grpc]
  address = "$CTR_SOCK"
[ttrpc]
  address = "$CTR_SOCK.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$NODE_CACHE/containerd-opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE_RUN/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$NODE_RUN/certs.d"
EOF
  echo "nameserver 127.0.0.1" > "$NODE_RUN/resolv.conf"  # no DNS leaves the node
  local ca; ca=$(base64 -w0 < "$PKI/ca.crt")
  cat > "$NODE_RUN/kubelet.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "https://127.0.0.1:$API_PORT", certificate-authority-data: $ca}
users:
- name: node
  user: {client-certificate: $PKI/node.crt, client-key: $PKI/node.key}
contexts:
- name: node
  context: {cluster: local, user: node}
current-context: node
EOF
  # cgroup v1 (this machine) needs failCgroupV1: false; cgroupfs because there is no systemd.
  # Eviction and image GC are relaxed: the node shares a disk with everything else here.
  cat > "$NODE_RUN/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://$CTR_SOCK
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
registerWithTaints:
- {key: $TAINT_KEY, value: "true", effect: NoSchedule}
resolvConf: $NODE_RUN/resolv.conf
clusterDNS: [$POD_GW]
clusterDomain: cluster.local
evictionHard: {memory.available: "200Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
maxPods: 30
containerLogMaxSize: 50Mi
shutdownGracePeriod: 0s
nodeLeaseDurationSeconds: 10
EOF
}

start_kubelet() {
  say "starting kubelet $KUBE_VERSION as node $NODE_NAME ($NODE_IP)"
  start node-kubelet "$STACK_LOGS/node-kubelet.log" \
    nsenter --net="/run/netns/$NETNS" -- "$KUBELET" --config "$NODE_RUN/kubelet.yaml" \
    --kubeconfig "$NODE_RUN/kubelet.kubeconfig" --root-dir "$NODE_RUN/kubelet" --cert-dir "$NODE_RUN/kubelet/pki" \
    --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" \
    --node-labels "lora-jobs.dev/node-pool=real,type=real"
  wait_for "node $NODE_NAME Ready" 90 "$STACK_LOGS/node-kubelet.log" "see the kubelet's log" node_ready
}

up_node() {
  need_tools
  up_registry
  push_pause
  up_netns
  bridge api "127.0.0.1:$API_PORT" "$API_PORT"
  bridge registry "127.0.0.1:$REGISTRY_PORT" "$REGISTRY_PORT"
  bridge minio "0.0.0.0:$MINIO_PORT" "$MINIO_PORT"
  write_configs
  say "starting containerd $(containerd --version | awk '{print $3}') in $NETNS"
  start node-containerd "$STACK_LOGS/node-containerd.log" \
    nsenter --net="/run/netns/$NETNS" -- containerd --config "$NODE_RUN/containerd.toml"
  wait_for containerd 30 "$STACK_LOGS/node-containerd.log" "see the log" ctr_ version
  up_dns
  start_kubelet
  up_proxy
  cat > "$NODE_RUN/env" <<EOF
export STACK_NODE_NAME=$NODE_NAME
export STACK_NODE_TAINT=$TAINT_KEY
export STACK_REGISTRY=127.0.0.1:$REGISTRY_PORT
export STACK_POD_S3_ENDPOINT=http://$POD_GW:$MINIO_PORT
export STACK_NODE_KUBELET_PID_FILE=$PIDS/node-kubelet
EOF
  say "node $NODE_NAME is Ready (pods: $POD_CIDR, S3 for pods: http://$POD_GW:$MINIO_PORT, registry 127.0.0.1:$REGISTRY_PORT)"
}

node_ready() {
  api GET "/api/v1/nodes/$NODE_NAME" \
    | python3 -c 'import json, sys; n = json.load(sys.stdin)
sys.exit(0 if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"]) else 1)'
}

down_node() {
  local name
  if running node-kubelet; then stop_daemon node-kubelet; fi
  stop_daemon node-kube-proxy  # its rules go with the namespace
  stop_daemon node-coredns
  if running node-containerd; then
    # Every pod's containers and sandbox, so that no shim, mount or pod network outlives the node.
    local id
    for id in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s KILL "$id" >/dev/null 2>&1 || true; done
    for _ in $(seq 20); do [ -z "$(ctr_ tasks ls -q 2>/dev/null)" ] && break; sleep 0.25; done
    for id in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$id" >/dev/null 2>&1 || true; done
    for id in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$id" >/dev/null 2>&1 || true; done
    stop_daemon node-containerd
  fi
  for name in api registry minio; do
    stop_daemon "bridge-$name-node"; stop_daemon "bridge-$name-host"
  done
  stop_daemon registry
  # Mounts the kubelet and containerd made (volumes, rootfs, sandbox shm), deepest first.
  if [ -d "$NODE_RUN" ]; then
    findmnt -rn -o TARGET | grep -F "$NODE_RUN/" | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  fi
  for name in $(ip netns list 2>/dev/null | awk '/^cni-/{print $1}'); do ip netns delete "$name" 2>/dev/null || true; done
  ip link delete lora-veth0 2>/dev/null || true
  [ -e "/run/netns/$NETNS" ] && ip netns delete "$NETNS" 2>/dev/null || true
  rm -rf "$NODE_RUN"
}

# push IMAGE...: a local Docker image into the registry under the same name, unless the registry
# already holds that very image (the Docker image ID pushed last is kept per tag). skopeo instead of
# `docker push`: zstd level 1 compresses the trainer's ~6 GB in seconds where docker's gzip takes
# many minutes on 2 cores; containerd pulls zstd layers.
cmd_push() {
  local img repo tag id have
  command -v skopeo >/dev/null || fail "pushing images needs skopeo" /dev/null "run hack/install-system.sh"
  for img in "$@"; do
    repo=${img%:*} tag=${img##*:}
    id=$(docker image inspect -f '{{.Id}}' "$img") || fail "no local image $img" /dev/null "build it: hack/build-images.sh"
    # The registry stores an OCI config (another digest), so the last pushed image ID is kept beside it.
    have=$(cat "$NODE_CACHE/pushed/$repo/$tag" 2>/dev/null || true)
    in_registry "$repo" "$tag" || have=""
    if [ "$id" = "$have" ]; then say "$img is in the registry already"; continue; fi
    say "pushing $img to 127.0.0.1:$REGISTRY_PORT (log: $STACK_LOGS/push.log)"
    skopeo copy -q --dest-tls-verify=false --dest-compress-format zstd --dest-compress-level 1 \
      "docker-daemon:$img" "docker://127.0.0.1:$REGISTRY_PORT/$img" >>"$STACK_LOGS/push.log" 2>&1 \
      || fail "could not push $img" "$STACK_LOGS/push.log" "is the registry up? hack/node.sh status"
    mkdir -p "$NODE_CACHE/pushed/$repo" && echo "$id" > "$NODE_CACHE/pushed/$repo/$tag"
  done
}

case ${1:-} in
  up) up_node ;;
  down) down_node ;;
  status)
    for name in registry node-containerd node-coredns node-kubelet node-kube-proxy; do
      if running "$name"; then echo "$name: running (pid $(cat "$PIDS/$name"))"; else echo "$name: stopped"; fi
    done ;;
  push) shift; cmd_push "$@" ;;
  rmi) shift; for img in "$@"; do ctr_ images rm --sync "$img" >/dev/null 2>&1 || true; done ;;
  exec) shift; [ -e "/run/netns/$NETNS" ] || fail "the node is not up" /dev/null "hack/node.sh up"; in_ns "$@" ;;
  # fault tests: the node goes away (its pods' containers run on) and comes back
  stop-kubelet) stop_daemon node-kubelet ;;
  start-kubelet) start_kubelet ;;
  *) echo "usage: hack/node.sh up | down | status | push IMAGE... | rmi IMAGE... | exec CMD... | stop-kubelet | start-kubelet" >&2; exit 2 ;;
esac
