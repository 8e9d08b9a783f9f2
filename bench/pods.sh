#!/usr/bin/env bash
# `make bench-pods` (and the last step of `make bench`): Pods on the local node,
# the proxy sidecar against the connector (bench/README.md "Pods on a node").
# On a control plane and node of its own, in bench/work/pods-cluster (never the
# demo's .cluster or the tests' .cluster-test), stopped by tools/cluster-down.sh
# however the script ends. Reports and never asserts: it fails only when it
# cannot measure (the node cannot start, a build fails, the set-up fails).
#
#   bash bench/pods.sh                     # 20 Pods per mode, the JSON and the README table
#   bash bench/pods.sh -pods 5 -update-readme ''   # a quick look; arguments go to podbench
#   IMAGE_PROFILE=debug ...                # the operator's debug build (default: release)
#   CLOUDSQL_BINDER_IMAGE_ARCHIVE=x.tar    # an operator image already built
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
work="$root/bench/work"
export CLOUDSQL_BINDER_CLUSTER_DIR="$work/pods-cluster"
export KUBECONFIG="$CLOUDSQL_BINDER_CLUSTER_DIR/kubeconfig"
started=$SECONDS

say() { echo "bench-pods: $*" >&2; }
fail() { say "$*"; exit 1; }

[[ $(id -u) -eq 0 ]] || fail "run as root: the node needs it (containerd, runc, the bridge, cgroups)"
mkdir -p "$work"

# Whatever happens from here on, the cluster and its node go.
down() {
  local rc=$?
  # cluster-down removes the cluster directory: keep its logs for a failure.
  if ((rc != 0)) && [[ -d "$CLOUDSQL_BINDER_CLUSTER_DIR/logs" ]]; then
    rm -rf "$work/pods-cluster-logs"
    cp -r "$CLOUDSQL_BINDER_CLUSTER_DIR/logs" "$work/pods-cluster-logs" \
      && say "the cluster's logs (those named above) are kept in $work/pods-cluster-logs"
  fi
  say "stopping the bench's cluster ($CLOUDSQL_BINDER_CLUSTER_DIR)"
  bash "$root/tools/cluster-down.sh" >&2 || { say "cluster-down failed: see its output above"; rc=1; }
  say "done in $((SECONDS - started))s"
  exit "$rc"
}
trap down EXIT
trap 'exit 130' INT TERM HUP

# 1. The control plane, then the node; a node that cannot start says why in one line.
say "starting a control plane and a node in $CLOUDSQL_BINDER_CLUSTER_DIR"
bash "$root/tools/cluster-up.sh" >/dev/null || fail "the control plane did not start (see $CLOUDSQL_BINDER_CLUSTER_DIR/logs)"
node_err="$work/pods-node-up.err"
if ! bash "$root/tools/node-up.sh" 2>"$node_err"; then
  reason="$(grep -m1 '^node-up:' "$node_err" || tail -n1 "$node_err")"
  fail "the node cannot start, nothing measured: ${reason:-node-up failed (see $CLOUDSQL_BINDER_CLUSTER_DIR/logs)}"
fi
say "node Ready after $((SECONDS - started))s"

# 2. What podbench needs, as e2e/node/run.sh gets it: PostgreSQL (Debian's
# package), the real proxy, helm, the operator image loaded into the node.
if ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
  say "installing postgresql with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi
CLOUD_SQL_PROXY="$("$root/tools/build-proxy.sh")" || fail "building the proxy failed (tools/build-proxy.sh)"
HELM="$(bash "$root/tools/build-controlplane.sh")/helm"
[[ -x "$HELM" ]] || fail "no helm at $HELM (tools/build-controlplane.sh)"
archive="${CLOUDSQL_BINDER_IMAGE_ARCHIVE:-}"
if [[ -z "$archive" ]]; then
  archive="$(cd "$root" && IMAGE_PROFILE="${IMAGE_PROFILE:-release}" make -s --no-print-directory image | tail -n1)" \
    || fail "make image failed"
fi
[[ -f "$archive" ]] || fail "operator image archive $archive: no such file"
OPERATOR_IMAGE="$(python3 -c 'import json, sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    print(json.load(t.extractfile("index.json"))["manifests"][0]["annotations"]["io.containerd.image.name"])' "$archive")" \
  || fail "$archive: no image name in its index.json"
"$root/tools/node-load-image.sh" "$archive" >/dev/null || fail "loading $archive into the node failed"
say "operator image $OPERATOR_IMAGE ($archive) loaded"

# 3. podbench (e2e/node/cmd/podbench), built once, then run.
(cd "$root/e2e/node" && go build -o "$work/podbench" ./cmd/podbench) || fail "building podbench failed"
"$work/podbench" -repo "$root" -cluster-dir "$CLOUDSQL_BINDER_CLUSTER_DIR" \
  -operator-image "$OPERATOR_IMAGE" -helm "$HELM" -proxy "$CLOUD_SQL_PROXY" \
  -update-readme "$root/bench/README.md" "$@" \
  || fail "podbench could not measure (its output above says why)"
