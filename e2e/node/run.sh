#!/usr/bin/env bash
# The node test (what `make e2e-node`, and so `make test`, runs after
# `make cluster-up` and `make node-up`): the chart with the operator image, the
# injected sidecar and the data path in real pods on the local node. See
# README.md.
#
#   bash e2e/node/run.sh                      # the cluster in $CLOUDSQL_BINDER_CLUSTER_DIR
#   CLOUDSQL_BINDER_IMAGE_ARCHIVE=x.tar ...   # an operator image already built
#   E2E_NODE_KEEP=1 ...                       # leave the release and namespaces for a look
#   E2E_NODE_RUN=Connector ...                # only matching tests (go test -run)
#   E2E_NODE_CHART=/tmp/chart ...             # install another copy of the chart
#
# It never skips: without a Ready node it fails with the reason. Measured figures
# are printed as `FIGURE name=value` lines.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
export CLOUDSQL_BINDER_CLUSTER_DIR="${CLOUDSQL_BINDER_CLUSTER_DIR:-$root/.cluster}"
dir="$CLOUDSQL_BINDER_CLUSTER_DIR"
started=$SECONDS

say() { echo "e2e-node: $*" >&2; }
fail() { say "FAILED: $*"; exit 1; }

# 1. The node must be there: this test never skips.
[[ -f "$dir/kubeconfig" ]] || fail "no control plane in $dir: run make cluster-up, then make node-up"
[[ -f "$dir/network.env" && -S "$dir/node/containerd.sock" ]] || fail "no node in $dir: run make node-up (its log: $dir/logs)"
ready="$(kubectl --kubeconfig "$dir/kubeconfig" get node cloudsql-binder-node \
  -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>&1)" || true
[[ "$ready" == True ]] || fail "node cloudsql-binder-node is not Ready in $dir ($ready): run make node-up (its log: $dir/logs)"
[[ $(id -u) -eq 0 ]] || fail "run as root: images are loaded into the node's containerd, and the test kills a container's process"
command -v ctr >/dev/null || fail "ctr is missing (apt-get install containerd)"

# 2. PostgreSQL (Debian's packages), behind the server-side TLS fixture.
if ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
  say "installing postgresql with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi

# 3. The real proxy (put into the fixture proxy image by the test) and helm.
CLOUD_SQL_PROXY="$("$root/tools/build-proxy.sh")"
HELM="$(bash "$root/tools/build-controlplane.sh")/helm"
[[ -x "$HELM" ]] || fail "no helm at $HELM (tools/build-controlplane.sh)"
export CLOUD_SQL_PROXY HELM

# 4. The operator image (`make image`), loaded into the node. make test has just
# built the debug binary, so the image reuses it unless IMAGE_PROFILE says otherwise.
archive="${CLOUDSQL_BINDER_IMAGE_ARCHIVE:-}"
if [[ -z "$archive" ]]; then
  image_started=$SECONDS
  archive="$(cd "$root" && IMAGE_PROFILE="${IMAGE_PROFILE:-debug}" make -s --no-print-directory image | tail -n1)" \
    || fail "make image failed"
  say "make image (IMAGE_PROFILE=${IMAGE_PROFILE:-debug}) wrote $archive in $((SECONDS - image_started))s"
fi
[[ -f "$archive" ]] || fail "operator image archive $archive: no such file"
OPERATOR_IMAGE="$(python3 - "$archive" <<'EOF'
import json, sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    index = json.load(t.extractfile("index.json"))
print(index["manifests"][0]["annotations"]["io.containerd.image.name"])
EOF
)" || fail "$archive: no image name in its index.json"
"$root/tools/node-load-image.sh" "$archive" >/dev/null || fail "loading $archive into the node failed"
export OPERATOR_IMAGE
say "operator image $OPERATOR_IMAGE loaded; cluster $dir; proxy $CLOUD_SQL_PROXY"

# 5. The test.
cd "$here"
args=(-count=1 -v -timeout 40m)
[[ -n "${E2E_NODE_RUN:-}" ]] && args+=(-run "$E2E_NODE_RUN")
rc=0
go test "${args[@]}" . || rc=$?
echo "FIGURE e2e_node_total_seconds=$((SECONDS - started))"
((rc == 0)) || fail "the node test failed (exit $rc): the output above names each failure"
say "passed in $((SECONDS - started))s"
