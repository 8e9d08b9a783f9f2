#!/usr/bin/env bash
# Loads OCI image archives (tools/oci-image.py, `make image`) into the local
# node's containerd, namespace k8s.io, where the kubelet finds them. Nothing is
# ever pulled: pods name these images with IfNotPresent.
#
#   tools/node-load-image.sh ARCHIVE.tar...
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
state="${CLOUDSQL_BINDER_CLUSTER_DIR:-$repo/.cluster}"
sock="$state/node/containerd.sock"

[[ -S "$sock" ]] || { echo "node-load-image: no node in $state: run make node-up first" >&2; exit 1; }
(($#)) || { echo "usage: tools/node-load-image.sh ARCHIVE.tar..." >&2; exit 2; }
for archive in "$@"; do
  [[ -f "$archive" ]] || { echo "node-load-image: $archive: no such file" >&2; exit 1; }
  if ! out="$(ctr --address "$sock" -n k8s.io images import "$archive" 2>&1)"; then
    echo "node-load-image: importing $archive failed: ${out//$'\n'/ }" >&2
    exit 1
  fi
  echo "$out"
done
