#!/usr/bin/env bash
# Restarts one component of a control plane started by tools/cluster-up.sh, with
# exactly the command it was started with (<cluster dir>/<component>.cmd): same
# ports, same etcd data dir, same certificates. For tests that restart
# kube-apiserver or etcd under a running operator (tests/it/convergence.rs).
#
#   tools/cluster-restart.sh etcd|kube-apiserver|kube-controller-manager [--kill]
#
# --kill: SIGKILL instead of SIGTERM (a crash, not a shutdown). Only the process
# the pid file names is stopped, and only when its command line is this
# cluster's. Restarting a shared cluster breaks every test using it: the tests
# restart components only of a cluster of their own (CLOUDSQL_BINDER_CLUSTER_DIR).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
state="${CLOUDSQL_BINDER_CLUSTER_DIR:-$repo/.cluster}"
c="${1:-}"
signal=TERM
[[ "${2:-}" == "--kill" ]] && signal=KILL

fail() { echo "cluster-restart: $*" >&2; exit 1; }

case "$c" in
  etcd | kube-apiserver | kube-controller-manager) ;;
  *) fail "usage: tools/cluster-restart.sh etcd|kube-apiserver|kube-controller-manager [--kill]" ;;
esac
[[ -f "$state/$c.cmd" ]] || fail "$state/$c.cmd is missing: was this cluster started by tools/cluster-up.sh?"
mapfile -t cmd <"$state/$c.cmd"
# cluster-up.sh starts the controller manager on kubeconfig.tmp, renamed at its end.
cmd=("${cmd[@]//"$state/kubeconfig.tmp"/"$state/kubeconfig"}")

exec 9>"$state.lock"
flock 9

pidfile="$state/$c.pid"
if [[ -f "$pidfile" ]]; then
  pid="$(cat "$pidfile")"
  if [[ "$pid" =~ ^[0-9]+$ && -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$state/"; then
    kill "-$signal" "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
      [[ -e "/proc/$pid" ]] || break
      sleep 0.1
    done
    [[ -e "/proc/$pid" ]] && kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      [[ -e "/proc/$pid" ]] || break
      sleep 0.1
    done
  fi
fi

echo "--- restarted $(date -u +%Y-%m-%dT%H:%M:%SZ) (SIG$signal)" >>"$state/logs/$c.log"
setsid "${cmd[@]}" >>"$state/logs/$c.log" 2>&1 </dev/null 9>&- &
echo $! >"$pidfile"

# Ready again: etcd answers /health, the apiserver /readyz, the controller manager /healthz.
deadline=$((SECONDS + 120))
healthy() {
  case "$c" in
    etcd)
      local url
      url="$(printf '%s\n' "${cmd[@]}" | sed -n 's/^--listen-client-urls=//p')"
      curl -sf "$url/health" >/dev/null 2>&1
      ;;
    kube-apiserver) KUBECONFIG="$state/kubeconfig" kubectl get --raw /readyz >/dev/null 2>&1 ;;
    kube-controller-manager)
      local port
      port="$(printf '%s\n' "${cmd[@]}" | sed -n 's/^--secure-port=//p')"
      curl -skf "https://127.0.0.1:$port/healthz" >/dev/null 2>&1
      ;;
  esac
}
until healthy; do
  ((SECONDS < deadline)) || fail "$c did not become healthy again within 120s; see $state/logs/$c.log"
  sleep 0.2
done
echo "cluster-restart: $c restarted" >&2
