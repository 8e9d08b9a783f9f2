# shellcheck shell=bash
# The local node's network, sourced by tools/cluster-up.sh (which records it in
# <cluster dir>/network.env before the apiserver's certificate is made) and read
# by tools/node-up.sh and tools/cluster-down.sh.
#
# Each cluster directory gets its own bridge and /24 (the demo's .cluster and
# the tests' .cluster-test run side by side), derived from a hash of its path:
# 10.(64..127).(0..255).0/24, skipping any /24 a route of this machine already
# covers. The gateway (.1) is the node's address: the kubelet's node IP, and
# the address pods reach this machine's services at.

choose_node_network() { # cluster-dir -> NODE_* assignments on stdout
  local dir="$1" h a b i subnet
  h="$(printf '%s' "$dir" | sha256sum | cut -c1-8)"
  for ((i = 0; i < 64; i++)); do
    a=$(((16#${h:0:4} + i) % 64 + 64))
    b=$((16#${h:4:2}))
    subnet="10.$a.$b.0/24"
    if ! ip -4 route show 2>/dev/null | awk '{print $1}' | grep -qx -- "$subnet" \
      && [[ -z "$(ip -4 route show to match "10.$a.$b.1" 2>/dev/null | grep -v '^default')" ]]; then
      echo "NODE_ID=${h:0:6}"
      echo "NODE_BRIDGE=csb${h:0:6}"
      echo "NODE_NETWORK=cloudsql-binder-${h:0:6}"
      echo "NODE_SUBNET=$subnet"
      echo "NODE_GATEWAY=10.$a.$b.1"
      echo "NODE_CGROUP=cloudsql-binder-${h:0:6}"
      return 0
    fi
  done
  return 1
}
