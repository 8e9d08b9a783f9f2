#!/usr/bin/env bash
# Stops exactly the processes tools/cluster-up.sh started (by pid file, checked
# against the process's command line) and removes the cluster's state.
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

for c in kube-controller-manager kube-apiserver etcd; do stop "$c"; done
if [[ -d "$state" ]]; then
  rm -rf "$state"
fi
echo "cluster-down: stopped and removed $state" >&2
