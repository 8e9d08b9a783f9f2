#!/usr/bin/env bash
# `make demo`: from nothing to bound workloads on a local control plane.
#   1. starts the control plane (tools/cluster-up.sh; built on first use);
#   2. starts the local node (tools/node-up.sh); when it cannot, says why and
#      goes on without pods;
#   3. builds the operator: with the node, its image (`make image`), loaded
#      into the node;
#   4. installs the Helm chart's CRDs, then the chart: with the node, the real
#      thing (2 replicas in pods, the webhook served from them); without, 0
#      replicas and no webhook, and the operator runs out of cluster as the
#      chart's ServiceAccount (a TokenRequest token), in the background,
#      logging to <cluster dir>/logs/operator.log;
#   5. applies examples/ in namespace `shop` and waits for every binding to be
#      Ready, then shows the budget and what was injected into orders-api;
#   6. with the node: Google's side for the examples' instance (the Admin API
#      and server-side TLS fixtures of e2e/, and PostgreSQL; e2e/node/cmd/google),
#      and the GORM app in a pod beside its injected proxy, whose query result
#      it shows.
# `make demo-down` (`tools/demo.sh down`): stops that operator, the fixtures
# and the cluster (with its node).
# Running `make demo` twice is harmless: the operator is restarted, the rest
# re-applied. CLOUDSQL_BINDER_CLUSTER_DIR picks another cluster directory.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
state="${CLOUDSQL_BINDER_CLUSTER_DIR:-$repo/.cluster}"
logs="$state/logs"
pidfile="$state/operator.pid"
operator_kubeconfig="$state/operator.kubeconfig"
chart="$repo/charts/cloudsql-binder"
release=cloudsql-binder
operator_ns=cloudsql-binder
app_ns=shop
identity=cloudsql-binder-demo

say() { echo "demo: $*" >&2; }
fail() { echo "demo: $*" >&2; exit 1; }

# The recorded operator counts as ours only when it is alive, runs our binary,
# and uses this cluster's operator kubeconfig: never stop someone else's process.
operator_pid() {
  [[ -f "$pidfile" ]] || return 1
  local pid; pid="$(cat "$pidfile")"
  [[ "$pid" =~ ^[0-9]+$ && -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "cloudsql-binder run" || return 1
  tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx -- "KUBECONFIG=$operator_kubeconfig" || return 1
  echo "$pid"
}

stop_operator() {
  local pid
  if pid="$(operator_pid)"; then
    # SIGTERM: the operator stops its controllers and releases its Lease.
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 200); do
      [[ -e "/proc/$pid" ]] || break
      sleep 0.1
    done
    if [[ -e "/proc/$pid" ]]; then
      say "the operator (pid $pid) ignored SIGTERM for 20s; killing it"
      kill -9 "$pid" 2>/dev/null || true
    fi
    say "stopped the operator (pid $pid)"
  fi
  rm -f "$pidfile"
}

google_pidfile="$state/google.pid"
# Google's side (e2e/node/cmd/google), ours when its command line names this cluster.
stop_google() {
  local pid
  pid="$(cat "$google_pidfile" 2>/dev/null)" || return 0
  if [[ "$pid" =~ ^[0-9]+$ && -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$state/"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
      [[ -e "/proc/$pid" ]] || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$google_pidfile"
}

if [[ "${1:-}" == "down" ]]; then
  stop_operator
  stop_google
  bash "$here/cluster-down.sh"
  exit 0
fi
[[ $# -eq 0 ]] || fail "usage: tools/demo.sh [down]"

started=$SECONDS
command -v kubectl >/dev/null || fail "kubectl is needed"
command -v python3 >/dev/null || fail "python3 is needed"

# A healthy control plane is used as it is, checked as tools/cluster-up.sh
# checks it: that script takes a lock which the components it starts inherit
# and keep, so run against a running cluster it would wait forever.
cluster_running() {
  [[ -f "$state/kubeconfig" ]] || return 1
  local c pid
  for c in etcd kube-apiserver kube-controller-manager; do
    pid="$(cat "$state/$c.pid" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ && -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$state/" || return 1
  done
  KUBECONFIG="$state/kubeconfig" kubectl get --raw /readyz >/dev/null 2>&1
}
if cluster_running; then
  say "the local control plane in $state is running"
  export KUBECONFIG="$state/kubeconfig"
else
  say "starting the local control plane in $state (the first run builds it: several minutes)"
  # shellcheck disable=SC1090 # prints `export KUBECONFIG=...`
  eval "$(bash "$here/cluster-up.sh")"
fi
helm="$(bash "$here/build-controlplane.sh")/helm"

say "starting the local node (tools/node-up.sh; the first run builds the kubelet: a few minutes)"
node=false
if node_out="$(bash "$here/node-up.sh" 2>&1)"; then
  node=true
  say "${node_out##*$'\n'}"
else
  say "no local node, so no container starts (${node_out##*$'\n'}); the operator runs out of cluster"
fi

say "building the operator"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
release_bin="$target_dir/release/cloudsql-binder"
profile=debug
if [[ -x "$release_bin" && -z "$(find "$repo/src" "$repo/Cargo.toml" "$repo/Cargo.lock" -newer "$release_bin" -print -quit)" ]]; then
  profile=release
fi
if $node; then
  archive="$(IMAGE_PROFILE=$profile bash "$here/image.sh" 2>"$logs/image.log")" \
    || { tail -20 "$logs/image.log" >&2; fail "make image failed; see $logs/image.log"; }
  bash "$here/node-load-image.sh" "$archive" >/dev/null || fail "loading $archive into the node failed"
  image="$(python3 -c 'import json, sys, tarfile; t = tarfile.open(sys.argv[1]); print(json.load(t.extractfile("index.json"))["manifests"][0]["annotations"]["io.containerd.image.name"])' "$archive")" \
    || fail "$archive names no image"
  say "the operator's image $image ($profile build) is loaded into the node"
elif [[ $profile == release ]]; then
  bin="$release_bin"
else
  (cd "$repo" && cargo build --quiet --bin cloudsql-binder) || fail "cargo build failed"
  bin="$target_dir/debug/cloudsql-binder"
fi

say "installing the CRDs (server-side apply: how an upgrade installs them too)"
kubectl apply --server-side --force-conflicts --field-manager=cloudsql-binder-demo \
  -f "$chart/crds/" >/dev/null
knative_crd="$(bash "$here/knative-crd.sh")" || fail "fetching the Knative Service CRD failed"
say "installing the Knative Serving Service CRD (for examples/40-cloud-run-service.yaml)"
kubectl apply --server-side --force-conflicts --field-manager=cloudsql-binder-demo -f "$knative_crd" >/dev/null
# Poll rather than `kubectl wait`: a CRD created a moment ago has `status.conditions: null`,
# which kubectl wait reports as an error instead of waiting.
for crd in cloudsqlinstances.cloudsql.dev cloudsqlbindings.cloudsql.dev services.serving.knative.dev; do
  deadline=$((SECONDS + 60))
  until [[ "$(kubectl get crd "$crd" -o jsonpath='{.status.conditions[?(@.type=="Established")].status}' 2>/dev/null)" == True ]]; do
    ((SECONDS < deadline)) || fail "CRD $crd did not become Established within 60s"
    sleep 0.5
  done
done

kubectl create namespace "$operator_ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
if $node; then
  # Only one operator at a time: the in-cluster one replaces an earlier run's
  # out-of-cluster one.
  stop_operator
  source "$state/network.env"
  api_port="$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')"
  api_port="${api_port##*:}"
  say "installing the chart (release $release in namespace $operator_ns: 2 replicas in pods, the webhook served from them)"
  # No kube-proxy on this node: the pods reach the API server at the node's address.
  "$helm" upgrade --install "$release" "$chart" --namespace "$operator_ns" \
    --set image.repository="${image%:*}" --set image.tag="${image##*:}" --set image.pullPolicy=Never \
    --set "extraEnv[0].name=KUBERNETES_SERVICE_HOST" --set "extraEnv[0].value=$NODE_GATEWAY" \
    --set "extraEnv[1].name=KUBERNETES_SERVICE_PORT" --set-string "extraEnv[1].value=$api_port" \
    >"$logs/helm.log" 2>&1 || { cat "$logs/helm.log" >&2; fail "helm upgrade --install failed"; }
  if ! kubectl rollout status deployment -n "$operator_ns" -l "app.kubernetes.io/instance=$release" --timeout=180s >/dev/null 2>&1; then
    kubectl get pods -n "$operator_ns" -o wide >&2 || true
    fail "the operator's pods did not become Ready within 180s (kubectl describe pods -n $operator_ns)"
  fi
else
  say "installing the chart (release $release in namespace $operator_ns; 0 replicas, no webhook: no node runs pods)"
  "$helm" upgrade --install "$release" "$chart" --namespace "$operator_ns" \
    --set replicas=0 --set webhook.enabled=false >"$logs/helm.log" 2>&1 \
    || { cat "$logs/helm.log" >&2; fail "helm upgrade --install failed"; }
  sa="$(kubectl get serviceaccount -n "$operator_ns" -l "app.kubernetes.io/instance=$release" -o jsonpath='{.items[0].metadata.name}')"
  [[ -n "$sa" ]] || fail "the chart created no ServiceAccount"

  say "running the operator out of cluster as system:serviceaccount:$operator_ns:$sa"
  token="$(kubectl create token "$sa" -n "$operator_ns" --duration=24h)"
  server="$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')"
  ca="$(mktemp)"
  kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}' | base64 -d >"$ca"
  rm -f "$operator_kubeconfig.tmp"
  KUBECONFIG="$operator_kubeconfig.tmp" kubectl config set-cluster local --server="$server" \
    --certificate-authority="$ca" --embed-certs=true >/dev/null
  KUBECONFIG="$operator_kubeconfig.tmp" kubectl config set-credentials "$sa" --token="$token" >/dev/null
  KUBECONFIG="$operator_kubeconfig.tmp" kubectl config set-context operator --cluster=local --user="$sa" \
    --namespace="$operator_ns" >/dev/null
  KUBECONFIG="$operator_kubeconfig.tmp" kubectl config use-context operator >/dev/null
  rm -f "$ca"
  stop_operator
  mv "$operator_kubeconfig.tmp" "$operator_kubeconfig"
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')"
  mkdir -p "$logs"
  echo "--- $(date -u +%Y-%m-%dT%H:%M:%SZ) $bin (metrics on 127.0.0.1:$port)" >>"$logs/operator.log"
  # setsid: the operator outlives this script; it is stopped through its pid file.
  KUBECONFIG="$operator_kubeconfig" POD_NAME="$identity" POD_NAMESPACE="$operator_ns" NO_COLOR=1 \
    setsid "$bin" run --metrics-addr="127.0.0.1:$port" \
    >>"$logs/operator.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  echo "127.0.0.1:$port" >"$state/operator.metrics"
  for _ in $(seq 1 300); do
    operator_pid >/dev/null || { tail -20 "$logs/operator.log" >&2; fail "the operator exited; see $logs/operator.log"; }
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
    sleep 0.2
  done
  curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 \
    || fail "the operator's caches did not sync within 60s; see $logs/operator.log"
fi

operator_log_tail() {
  if $node; then
    kubectl logs -n "$operator_ns" -l "app.kubernetes.io/instance=$release" --tail=10 --prefix 2>/dev/null || true
  else
    tail -20 "$logs/operator.log"
  fi
}
operator_log_where() {
  if $node; then
    echo "the operator's logs: kubectl logs -n $operator_ns -l app.kubernetes.io/instance=$release"
  else
    echo "the operator's log is $logs/operator.log"
  fi
}

say "applying examples/ in namespace $app_ns"
kubectl create namespace "$app_ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
# --force-conflicts for a second run: Knative's CRD declares a Service's
# `containers` an atomic list, so the operator's injected env makes it the
# owner of the whole list; the user's re-apply takes it back and the operator
# injects again.
kubectl apply --server-side --force-conflicts --field-manager=demo-user -n "$app_ns" -f "$repo/examples/" >/dev/null

expected="$(cat "$repo"/examples/*.yaml | grep -c '^kind: CloudSqlBinding$')"
say "waiting for the $expected bindings to be Ready"
deadline=$((SECONDS + 90))
while :; do
  # The examples' bindings (an earlier run's orders-live is not one of them).
  ready="$(kubectl get sqlbindings -n "$app_ns" \
    -o jsonpath='{range .items[*]}{.metadata.name} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' \
    | grep -v '^orders-live ' | grep -c ' True$' || true)"
  ((ready == expected)) && break
  if ((SECONDS >= deadline)); then
    kubectl get sqlbindings -n "$app_ns" >&2 || true
    kubectl get sqlbindings -n "$app_ns" -o jsonpath='{range .items[*]}{.metadata.name}: {range .status.conditions[*]}{.type}={.status} {.reason} {.message}; {end}{"\n"}{end}' >&2 || true
    operator_log_tail >&2
    fail "only $ready of $expected bindings became Ready within 90s; $(operator_log_where)"
  fi
  sleep 0.5
done

echo
echo "\$ kubectl get sqlinstances,sqlbindings -A"
kubectl get sqlinstances,sqlbindings -A
echo
echo "What the operator injected into Deployment $app_ns/orders-api (its pod template):"
DEPLOYMENT_JSON="$(kubectl get deployment orders-api -n "$app_ns" -o json)" python3 - <<'PY'
import json, os
template = json.loads(os.environ["DEPLOYMENT_JSON"])["spec"]["template"]
meta, spec = template["metadata"], template["spec"]
print("  pod template annotations:")
for key, value in sorted((meta.get("annotations") or {}).items()):
    if key.startswith("cloudsql.dev/"):
        print(f"    {key}: {value}")
for where in ("initContainers", "containers"):
    for c in spec.get(where) or []:
        if not c["name"].startswith("cloud-sql-proxy"):
            continue
        how = "native sidecar (initContainers, restartPolicy: Always)" if where == "initContainers" else "sidecar container"
        print(f"  {c['name']}: {how}")
        print(f"    image: {c['image']}")
        print("    args: " + " ".join(c.get("args") or []))
for c in spec["containers"]:
    if c["name"].startswith("cloud-sql-proxy"):
        continue
    print(f"  container {c['name']}:")
    for e in c.get("env") or []:
        print(f"    env {e['name']}={e.get('value', '<valueFrom>')}")
    for m in c.get("volumeMounts") or []:
        print(f"    volumeMount {m['name']} at {m['mountPath']}")
for v in spec.get("volumes") or []:
    source = {k: v[k] for k in v if k != "name"}
    print(f"  volume {v['name']}: {json.dumps(source)}")
PY
if $node; then
  connection="$(sed -n 's/^  connectionName: //p' "$repo/examples/00-instance.yaml")"
  echo
  say "starting Google's side for $connection: the fixtures of e2e/ and PostgreSQL (log $logs/google.log)"
  stop_google
  proxy_bin="$(bash "$here/build-proxy.sh")" || fail "building the Cloud SQL Auth Proxy failed (tools/build-proxy.sh)"
  # A fresh database each run (the previous one stopped with its process).
  rm -rf "$state/google.env" "$state/google"
  (cd "$repo/e2e/node" && go build -o "$state/google-fixtures" ./cmd/google) >"$logs/google.log" 2>&1 \
    || { tail -20 "$logs/google.log" >&2; fail "building e2e/node/cmd/google failed; see $logs/google.log"; }
  (cd "$repo/e2e/node" && exec setsid "$state/google-fixtures" -repo "$repo" -cluster-dir "$state" -dir "$state/google" \
    -connection-name "$connection" -database orders -user orders-app -proxy-bin "$proxy_bin" \
    -env-out "$state/google.env" >>"$logs/google.log" 2>&1 </dev/null) &
  echo $! >"$google_pidfile"
  deadline=$((SECONDS + 300))
  until [[ -f "$state/google.env" ]]; do
    [[ -e "/proc/$(cat "$google_pidfile")" ]] || { tail -20 "$logs/google.log" >&2; fail "Google's side exited; see $logs/google.log"; }
    ((SECONDS < deadline)) || fail "Google's side was not up within 300s; see $logs/google.log"
    sleep 1
  done
  # shellcheck source=/dev/null
  source "$state/google.env"

  say "running the GORM app (e2e/datapath/cmd/gormapp) as Deployment $app_ns/orders-live, bound to instance orders"
  # Each run rolls a new pod (this run's label), against this run's fixtures.
  run="$(date +%s)"
  kubectl apply --server-side --force-conflicts --field-manager=demo-user -n "$app_ns" -f - >/dev/null <<MANIFEST
apiVersion: cloudsql.dev/v1alpha1
kind: CloudSqlBinding
metadata:
  name: orders-live
spec:
  instanceRef: { name: orders }
  workloads:
    - kind: Deployment
      name: orders-live
  database: { name: orders, user: orders-app }
  # The real proxy, in an image pointed at the Admin API fixture (e2e/node).
  proxy: { image: "$PROXY_IMAGE" }
  pool: { maxPerPod: 4, minPerPod: 1 }
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: orders-live
spec:
  replicas: 1
  selector:
    matchLabels: { app: orders-live }
  template:
    metadata:
      labels: { app: orders-live, demo-run: "$run" }
    spec:
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        seccompProfile: { type: RuntimeDefault }
      containers:
        - name: app
          image: "$GORM_IMAGE"
          imagePullPolicy: Never
          args: ["-startup-report", "-grant-check", "-serve"]
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: { drop: [ALL] }
MANIFEST
  deadline=$((SECONDS + 180))
  live="app=orders-live,demo-run=$run"
  until kubectl logs -n "$app_ns" -l "$live" -c app 2>/dev/null | grep -q '^gormapp: serving'; do
    if ((SECONDS >= deadline)); then
      kubectl get pods -n "$app_ns" -l "$live" -o wide >&2 || true
      kubectl logs -n "$app_ns" -l "$live" --all-containers --tail=20 >&2 || true
      fail "the GORM app did not get through its queries within 180s (kubectl describe pods -n $app_ns -l app=orders-live)"
    fi
    sleep 1
  done
  echo
  echo "\$ kubectl get pods -n $operator_ns -o wide"
  kubectl get pods -n "$operator_ns" -o wide
  echo
  echo "\$ kubectl get pods -n $app_ns -l $live -o wide"
  kubectl get pods -n "$app_ns" -l "$live" -o wide
  echo "(the examples' own pods stay in ErrImagePull: their images, example.com/..., are placeholders)"
  echo
  echo "\$ kubectl logs -n $app_ns -l $live -c app"
  kubectl logs -n "$app_ns" -l "$live" -c app
  echo
  say "done in $((SECONDS - started))s. The operator runs in pods (kubectl logs -n $operator_ns -l app.kubernetes.io/instance=$release); Google's side is pid $(cat "$google_pidfile"), log $logs/google.log."
  say "try: KUBECONFIG=$KUBECONFIG kubectl describe sqlbinding -n $app_ns orders-live; stop everything with: make demo-down"
else
  echo
  say "done in $((SECONDS - started))s. The operator keeps running (pid $(cat "$pidfile"), metrics at http://127.0.0.1:$port/metrics, log $logs/operator.log)."
  say "try: KUBECONFIG=$KUBECONFIG kubectl describe sqlbinding -n $app_ns orders-api; stop everything with: make demo-down"
fi
