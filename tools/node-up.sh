#!/usr/bin/env bash
# Adds a real node to the local control plane (run after tools/cluster-up.sh;
# running it twice is harmless): containerd, runc and the CNI plugins from
# Debian's packages, a kubelet and a kube-scheduler built from the control
# plane's pinned k8s.io/kubernetes (tools/build-node.sh). The node registers as
# a real Node and runs pods. Images are never pulled: tools/node-load-image.sh
# loads OCI archives into containerd's k8s.io namespace, starting with the
# sandbox ("pause") image built here.
#
# Every process and all state live under <cluster dir>/node; what the kernel
# keeps elsewhere (the bridge, the pods' cgroups, their network namespaces and
# mounts, container shims) is named after the cluster directory, and
# tools/cluster-down.sh removes exactly that.
#
# On failure it prints one line, the reason and the log to read, and exits 1.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
state="${CLOUDSQL_BINDER_CLUSTER_DIR:-$repo/.cluster}"
node="$state/node"
logs="$state/logs"
kubeconfig="$state/kubeconfig"
node_name="${CLOUDSQL_BINDER_NODE_NAME:-cloudsql-binder-node}"

fail() { # reason [log]
  echo "node-up: $1${2:+ (see $2)}" >&2
  exit 1
}

[[ -f "$kubeconfig" && -f "$state/network.env" ]] \
  || fail "no control plane in $state: run make cluster-up first"
# shellcheck source=/dev/null
source "$state/network.env"
[[ $(id -u) -eq 0 ]] || fail "the node needs root (containerd, runc, the bridge and cgroups)"

exec 9>"$state.node.lock"
flock 9

ours() { # component -> 0 when its recorded process is alive and ours
  local pidfile="$state/$1.pid" pid
  [[ -f "$pidfile" ]] || return 1
  pid="$(cat "$pidfile")"
  [[ "$pid" =~ ^[0-9]+$ && -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$state/" || return 1
}

node_ready() {
  [[ "$(KUBECONFIG="$kubeconfig" kubectl get node "$node_name" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]
}

if ours containerd && ours kubelet && ours kube-scheduler && node_ready; then
  echo "node-up: node $node_name already Ready" >&2
  exit 0
fi

# A half-started node (a crash, an interrupted run): take it down and start clean.
"$here/cluster-down.sh" --node-only >/dev/null 2>&1 || true

# --- what the machine must have
missing=()
for tool in containerd ctr runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
cni_bin=/usr/lib/cni
for plugin in bridge host-local loopback; do [[ -x "$cni_bin/$plugin" ]] || missing+=("cni:$plugin"); done
if ((${#missing[@]})); then
  fail "missing ${missing[*]}: apt-get install containerd runc containernetworking-plugins"
fi
command -v ip >/dev/null || fail "ip is missing: apt-get install iproute2"
grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || true
grep -qw overlay /proc/filesystems || fail "the kernel has no overlay filesystem (containerd's snapshotter needs it)"
[[ -d /sys/fs/cgroup ]] || fail "no /sys/fs/cgroup"

bin="$("$here/build-node.sh" 2>>"$logs/build-node.log")" \
  || fail "building kubelet, kube-scheduler or pause failed" "$logs/build-node.log"

mkdir -p "$node"/{containerd/root,containerd/state,runc,cni/net.d,cni/ipam,cni/cache,kubelet,pod-logs,images} "$logs"
node_log() { echo "$logs/$1.log"; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}
kubelet_port="$(free_port)"; kubelet_healthz="$(free_port)"; sched_port="$(free_port)"

start() { # component args...
  local c="$1"; shift
  setsid "$@" >"$(node_log "$c")" 2>&1 </dev/null 9>&- &
  echo $! >"$state/$c.pid"
}

wait_for() { # seconds command...
  local secs="$1"; shift
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.3
  done
}

# --- the bridge: the node's address is its gateway, so it exists before the
# kubelet (which refuses a node IP no interface carries) and the CNI bridge
# plugin finds it ready.
if ! ip link show "$NODE_BRIDGE" >/dev/null 2>&1; then
  ip link add "$NODE_BRIDGE" type bridge || fail "creating the bridge $NODE_BRIDGE failed (ip link add ... type bridge)"
fi
ip addr replace "$NODE_GATEWAY/${NODE_SUBNET#*/}" dev "$NODE_BRIDGE" \
  || fail "giving $NODE_BRIDGE the address $NODE_GATEWAY failed"
ip link set "$NODE_BRIDGE" up || fail "bringing $NODE_BRIDGE up failed"

cat >"$node/cni/net.d/10-$NODE_NETWORK.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$NODE_NETWORK",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$NODE_BRIDGE",
      "isGateway": true,
      "isDefaultGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{ "subnet": "$NODE_SUBNET", "gateway": "$NODE_GATEWAY" }]],
        "dataDir": "$node/cni/ipam"
      }
    }
  ]
}
EOF

# --- cgroups (v1 hierarchies here; v2 where the machine is unified): the
# kubelet puts every pod under this root, which must exist first.
cgroup_dirs=()
if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
  cgroup_dirs+=("/sys/fs/cgroup/$NODE_CGROUP")
else
  for d in /sys/fs/cgroup/*/; do
    d="${d%/}"
    [[ "$(basename "$d")" == unified ]] && continue
    [[ -f "$d/cgroup.procs" ]] || continue
    cgroup_dirs+=("$d/$NODE_CGROUP")
  done
fi
for d in "${cgroup_dirs[@]}"; do
  mkdir -p "$d" || fail "creating the cgroup $d failed"
  if [[ -f "$d/cpuset.cpus" && -z "$(cat "$d/cpuset.cpus")" ]]; then
    cat "$(dirname "$d")/cpuset.cpus" >"$d/cpuset.cpus"
    cat "$(dirname "$d")/cpuset.mems" >"$d/cpuset.mems"
  fi
done

# --- containerd, private to this node: its own socket, root, state and runc root.
cat >"$node/containerd.toml" <<EOF
version = 2
root = "$node/containerd/root"
state = "$node/containerd/state"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "$node/containerd.sock"

[ttrpc]
  address = "$node/containerd.sock.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/cloudsql-binder/pause:local"
  # This VM refuses a negative oom_score_adj even to root: without this every
  # sandbox fails with "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  max_container_log_line_size = 16384
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$node/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$cni_bin"
    conf_dir = "$node/cni/net.d"
    max_conf_num = 1
EOF

start containerd containerd --config "$node/containerd.toml" --log-level warn
wait_for 30 ctr --address "$node/containerd.sock" version \
  || fail "containerd did not start" "$(node_log containerd)"

# The sandbox image, loaded before any pod.
"$here/oci-image.py" --name docker.io/cloudsql-binder/pause:local --out "$node/images/pause.oci.tar" \
  --file "$bin/pause:/pause:0755" --user 65535:65535 --entrypoint '["/pause"]' 2>/dev/null \
  || fail "writing the pause image failed"
"$here/node-load-image.sh" "$node/images/pause.oci.tar" >/dev/null \
  || fail "loading the pause image into containerd failed" "$(node_log containerd)"

# --- kubelet
cat >"$node/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_GATEWAY
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $kubelet_healthz
authentication:
  anonymous: { enabled: false }
  webhook: { enabled: true }
  x509: { clientCAFile: $state/pki/ca.crt }
authorization:
  mode: Webhook
containerRuntimeEndpoint: unix://$node/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: /$NODE_CGROUP
# cgroups v1 (this VM is hybrid): still supported by kubelet 1.34 when asked.
failCgroupV1: false
failSwapOn: false
podLogsDir: $node/pod-logs
clusterDomain: cluster.local
staticPodPath: ""
registerNode: true
serializeImagePulls: false
# Loaded images are never pulled again: image GC must never remove them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 100Mi
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
maxPods: 110
EOF
start kubelet "$bin/kubelet" --config="$node/kubelet.yaml" --kubeconfig="$kubeconfig" \
  --root-dir="$node/kubelet" --cert-dir="$node/kubelet/pki" \
  --node-ip="$NODE_GATEWAY" --hostname-override="$node_name" --v=1

# --- kube-scheduler
start kube-scheduler "$bin/kube-scheduler" --kubeconfig="$kubeconfig" \
  --authentication-kubeconfig="$kubeconfig" --authorization-kubeconfig="$kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$sched_port" --leader-elect=false \
  --cert-dir="$node/scheduler" --v=1
wait_for 60 curl -skf "https://127.0.0.1:$sched_port/healthz" \
  || fail "kube-scheduler did not become healthy" "$(node_log kube-scheduler)"

wait_for 120 node_ready || {
  ours kubelet || fail "the kubelet exited" "$(node_log kubelet)"
  fail "node $node_name did not become Ready in 120s" "$(node_log kubelet)"
}
echo "node-up: node $node_name Ready at $NODE_GATEWAY (bridge $NODE_BRIDGE, pods $NODE_SUBNET; logs in $logs)" >&2
