#!/usr/bin/env bash
# Starts a real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver and
# kube-controller-manager built from the pinned Go modules (tools/build-controlplane.sh).
# No kubelet: pods are created, never started. Writes .cluster/kubeconfig and
# prints `export KUBECONFIG=...`. Running it twice is harmless.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
state="${CLOUDSQL_BINDER_CLUSTER_DIR:-$repo/.cluster}"
logs="$state/logs"
pki="$state/pki"
kubeconfig="$state/kubeconfig"
components=(etcd kube-apiserver kube-controller-manager)

fail() { echo "cluster-up: $*" >&2; exit 1; }

# One start at a time: parallel test processes all call this script.
mkdir -p "$(dirname "$state")"
exec 9>"$state.lock"
flock 9

# A pid file counts only when its process is alive and runs our binary, so a
# stale file (crashed run, reused pid) never makes us touch another process.
# "$state/" with its slash: .cluster must not claim a process of .cluster-test.
ours() { # component -> 0 when its recorded process is alive and ours
  local pidfile="$state/$1.pid" pid
  [[ -f "$pidfile" ]] || return 1
  pid="$(cat "$pidfile")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$state/" || return 1
}

healthy() {
  [[ -f "$kubeconfig" ]] || return 1
  for c in "${components[@]}"; do ours "$c" || return 1; done
  KUBECONFIG="$kubeconfig" kubectl get --raw /readyz >/dev/null 2>&1
}

if healthy; then
  echo "cluster-up: already running" >&2
  echo "export KUBECONFIG=$kubeconfig"
  exit 0
fi

# Something is left over (a crash, a half start): stop what is ours and start clean.
"$here/cluster-down.sh" >/dev/null 2>&1 || true

bin="$("$here/build-controlplane.sh")" || fail "building the control plane failed (see ${CLOUDSQL_BINDER_CACHE:-$HOME/.cache/cloudsql-binder}/build.log)"
for c in "${components[@]}"; do [[ -x "$bin/$c" ]] || fail "$bin/$c is missing"; done
command -v openssl >/dev/null || fail "openssl is needed to create the cluster's certificates"
command -v kubectl >/dev/null || fail "kubectl is needed"

mkdir -p "$logs" "$pki" "$state/etcd"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}
etcd_port="$(free_port)"; etcd_peer_port="$(free_port)"; api_port="$(free_port)"; kcm_port="$(free_port)"

# shellcheck source=node/network.sh
source "$here/node/network.sh"
choose_node_network "$state" >"$state/network.env" || fail "no free private /24 for the node's network (see ip route)"
source "$state/network.env"

# --- certificates: one CA, the apiserver's serving cert, an admin client cert,
# and the service-account signing key.
(
  cd "$pki"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=cloudsql-binder-test-ca" \
    -keyout ca.key -out ca.crt 2>/dev/null
  cat >server.ext <<EXT
subjectAltName=IP:127.0.0.1,IP:10.0.0.1,IP:$NODE_GATEWAY,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth
EXT
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout server.key -out server.csr 2>/dev/null
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile server.ext -out server.crt 2>/dev/null
  echo "extendedKeyUsage=clientAuth" >client.ext
  openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=admin" -keyout admin.key -out admin.csr 2>/dev/null
  openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile client.ext -out admin.crt 2>/dev/null
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
) || fail "creating certificates in $pki failed"

server="https://127.0.0.1:$api_port"
KUBECONFIG="$kubeconfig.tmp" kubectl config set-cluster local --server="$server" \
  --certificate-authority="$pki/ca.crt" --embed-certs=true >/dev/null
KUBECONFIG="$kubeconfig.tmp" kubectl config set-credentials admin \
  --client-certificate="$pki/admin.crt" --client-key="$pki/admin.key" --embed-certs=true >/dev/null
KUBECONFIG="$kubeconfig.tmp" kubectl config set-context local --cluster=local --user=admin >/dev/null
KUBECONFIG="$kubeconfig.tmp" kubectl config use-context local >/dev/null

start() { # component args...
  local c="$1"; shift
  # setsid: the component must outlive this script and be stopped only through its pid file.
  # 9>&-: the lock fd must not be inherited, or the next run waits forever.
  setsid "$bin/$c" "$@" >"$logs/$c.log" 2>&1 </dev/null 9>&- &
  echo $! >"$state/$c.pid"
  # The exact command, for tools/cluster-restart.sh (one argument per line).
  printf '%s\n' "$bin/$c" "$@" >"$state/$c.cmd"
}

wait_for() { # description seconds command...
  local what="$1" secs="$2"; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

start etcd --name=cloudsql-binder-test --data-dir="$state/etcd" \
  --listen-client-urls="http://127.0.0.1:$etcd_port" --advertise-client-urls="http://127.0.0.1:$etcd_port" \
  --listen-peer-urls="http://127.0.0.1:$etcd_peer_port" --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer_port" \
  --initial-cluster="cloudsql-binder-test=http://127.0.0.1:$etcd_peer_port" \
  --unsafe-no-fsync --quota-backend-bytes=8589934592 --log-level=warn
wait_for "etcd" 30 curl -sf "http://127.0.0.1:$etcd_port/health" \
  || fail "etcd did not become healthy; see $logs/etcd.log"

start kube-apiserver \
  --etcd-servers="http://127.0.0.1:$etcd_port" \
  --secure-port="$api_port" --bind-address=0.0.0.0 --advertise-address="$NODE_GATEWAY" \
  --enable-aggregator-routing=true \
  --kubelet-client-certificate="$pki/admin.crt" --kubelet-client-key="$pki/admin.key" \
  --kubelet-preferred-address-types=InternalIP \
  --tls-cert-file="$pki/server.crt" --tls-private-key-file="$pki/server.key" \
  --client-ca-file="$pki/ca.crt" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
  --api-audiences=https://kubernetes.default.svc.cluster.local \
  --service-cluster-ip-range=10.0.0.0/24 --allow-privileged=true \
  --authorization-mode=RBAC --cert-dir="$pki/apiserver" \
  --max-requests-inflight=1000 --max-mutating-requests-inflight=500 \
  --enable-priority-and-fairness=false \
  --profiling=false --v=1
wait_for "kube-apiserver" 120 env KUBECONFIG="$kubeconfig.tmp" kubectl get --raw /readyz \
  || fail "kube-apiserver did not become ready; see $logs/kube-apiserver.log"

start kube-controller-manager \
  --kubeconfig="$kubeconfig.tmp" \
  --authentication-kubeconfig="$kubeconfig.tmp" --authorization-kubeconfig="$kubeconfig.tmp" \
  --bind-address=127.0.0.1 --secure-port="$kcm_port" --cert-dir="$pki/kcm" \
  --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
  --use-service-account-credentials=false --leader-elect=false \
  --controllers='*' --kube-api-qps=200 --kube-api-burst=400 \
  --concurrent-deployment-syncs=10 --concurrent-replicaset-syncs=10 --profiling=false --v=1
wait_for "kube-controller-manager" 60 curl -skf "https://127.0.0.1:$kcm_port/healthz" \
  || fail "kube-controller-manager did not become healthy; see $logs/kube-controller-manager.log"

mv "$kubeconfig.tmp" "$kubeconfig"
echo "cluster-up: kube-apiserver at $server (logs in $logs)" >&2
echo "export KUBECONFIG=$kubeconfig"
