#!/usr/bin/env bash
# Stops exactly the processes tools/cluster-up.sh and tools/node-up.sh started
# (by pid file, checked against the process's command line) and removes the
# cluster's state. The node goes first, with what it left outside the cluster
# directory: its pods' processes and container shims, their mounts and network
# namespaces, the bridge, the pods' cgroups and the CNI plugins' cache entries.
#
#   tools/cluster-down.sh [--node-only]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
state="${CLOUDSQL_BINDER_CLUSTER_DIR:-$repo/.cluster}"

stop() { # component
  local pidfile="$state/$1.pid" pid
  [[ -f "$pidfile" ]] || return 0
  pid="$(cat "$pidfile")"
  if [[ "$pid" =~ ^[0-9]+$ && -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$state/"; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      [[ -e "/proc/$pid" ]] || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

node_only=false
[[ "${1:-}" == "--node-only" ]] && node_only=true

# --- the node (tools/node-up.sh)
node="$state/node"
netenv="$state/network.env"
if [[ -f "$netenv" ]]; then
  # shellcheck source=/dev/null
  source "$netenv"
fi
stop kubelet
stop kube-scheduler
shim_sockets=()
task_ids=()
if [[ -d "$node/containerd/state" ]]; then
  while IFS= read -r f; do
    addr="$(cat "$f" 2>/dev/null || true)"
    shim_sockets+=("${addr#unix://}")
    task_ids+=("$(basename "$(dirname "$f")")")
  done < <(find "$node/containerd/state" -name address -path '*io.containerd.runtime.v2.task*' 2>/dev/null)
  # Sandboxes known to the CRI, running or not (their CNI cache entries).
  for d in "$node"/containerd/root/io.containerd.grpc.v1.cri/sandboxes/*/; do
    [[ -d "$d" ]] && task_ids+=("$(basename "$d")")
  done
fi
# Pod processes outlive the kubelet (their shims keep them): kill every process
# in this node's cgroups, then the shims started by this node's containerd.
node_cgroups=()
if [[ -n "${NODE_CGROUP:-}" ]]; then
  # tools/node-up.sh made the root at the top of each hierarchy (v1) or of the
  # unified one (v2).
  for d in /sys/fs/cgroup/"$NODE_CGROUP" /sys/fs/cgroup/*/"$NODE_CGROUP"; do
    [[ -d "$d" ]] && node_cgroups+=("$d")
  done
fi
if ((${#node_cgroups[@]})); then
  for _ in 1 2 3; do
    pids="$(find "${node_cgroups[@]}" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u || true)"
    [[ -z "$pids" ]] && break
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    sleep 0.3
  done
fi
for pid in $(pgrep -f "containerd-shim.* -address $node/containerd.sock" 2>/dev/null || true); do
  kill -9 "$pid" 2>/dev/null || true
done
stop containerd
for sock in "${shim_sockets[@]}"; do
  [[ "$sock" == /run/containerd/s/* ]] && rm -f "$sock"
done
# Mounts under the node (container root filesystems, network namespaces, the
# kubelet's volumes), deepest first.
if [[ -d "$node" ]]; then
  awk -v p="$node/" 'index($5, p) == 1 {print $5}' /proc/self/mountinfo | sort -r | while IFS= read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
fi
if [[ -n "${NODE_BRIDGE:-}" ]] && ip link show "$NODE_BRIDGE" >/dev/null 2>&1; then
  ip link del "$NODE_BRIDGE" 2>/dev/null || true
fi
if ((${#node_cgroups[@]})); then
  find "${node_cgroups[@]}" -depth -type d 2>/dev/null | while IFS= read -r d; do
    rmdir "$d" 2>/dev/null || true
  done
fi
# libcni's result cache (outside any configurable directory in containerd 1.6):
# entries of this node's network, and of the loopback network of its sandboxes.
if [[ -d /var/lib/cni/results ]]; then
  [[ -n "${NODE_NETWORK:-}" ]] && find /var/lib/cni/results -maxdepth 1 -name "$NODE_NETWORK-*" -delete 2>/dev/null
  for id in "${task_ids[@]}"; do rm -f "/var/lib/cni/results/cni-loopback-$id-lo"; done
fi
rm -rf "$node"
rm -f "$state"/{kubelet,kube-scheduler,containerd}.pid

# Nothing of the node may survive it: say what did, and fail.
left=()
pgrep -f -- "$node/" >/dev/null 2>&1 && left+=("processes: $(pgrep -f -- "$node/" | tr '\n' ' ')")
grep -qF -- " $node/" /proc/self/mountinfo && left+=("mounts under $node")
[[ -n "${NODE_BRIDGE:-}" ]] && ip link show "$NODE_BRIDGE" >/dev/null 2>&1 && left+=("bridge $NODE_BRIDGE")
for d in "${node_cgroups[@]}"; do
  [[ -d "$d" ]] && { left+=("cgroup $d"); break; }
done
for id in "${task_ids[@]}"; do
  [[ -e "/var/lib/cni/results/cni-loopback-$id-lo" ]] && { left+=("CNI cache entries"); break; }
done
node_clean=true
if ((${#left[@]})); then
  echo "cluster-down: the node of $state left behind: ${left[*]}" >&2
  node_clean=false
fi
if $node_only; then
  $node_clean || exit 1
  echo "cluster-down: stopped and removed the node of $state" >&2
  exit 0
fi

for c in kube-controller-manager kube-apiserver etcd; do stop "$c"; done
if [[ -d "$state" ]]; then
  rm -rf "$state"
fi
echo "cluster-down: stopped and removed $state" >&2
$node_clean || exit 1
