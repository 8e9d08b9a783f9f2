#!/usr/bin/env bash
# Builds the local node's Kubernetes parts, kubelet and kube-scheduler, from the
# same pinned k8s.io/kubernetes module as the control plane (tools/controlplane),
# and the sandbox ("pause") binary from tools/node/pause.c, into a cache outside
# the repo. Prints the bin directory. A stamp file written last marks a finished
# build, so an interrupted one is redone. containerd, runc and the CNI plugins
# come from Debian's packages (tools/node-up.sh checks them).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/versions.env"

cache_root="${CLOUDSQL_BINDER_CACHE:-$HOME/.cache/cloudsql-binder}"
bin="$cache_root/node-k8s-$KUBE_VERSION/bin"
stamp="$bin/.complete"
# The pause source is part of the cache key: an edit rebuilds it.
pause_sum="$(sha256sum "$here/node/pause.c" | cut -c1-12)"

if [[ -f "$stamp" && "$(cat "$stamp")" == *"pause=$pause_sum"* ]]; then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null 2>&1 || { echo "build-node: the Go toolchain is missing (install Go 1.24 or newer)" >&2; exit 1; }
command -v gcc >/dev/null 2>&1 || { echo "build-node: gcc is missing (apt-get install gcc libc6-dev)" >&2; exit 1; }

mkdir -p "$bin"
tmp="$(mktemp -d "$bin/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
log="$cache_root/build-node.log"
: >"$log"

export CGO_ENABLED=0 GOFLAGS=-mod=mod

# shellcheck source=kube-ldflags.sh
source "$here/kube-ldflags.sh"

for cmd in kubelet kube-scheduler; do
  if [[ -x "$bin/$cmd" && -f "$stamp" ]]; then
    cp "$bin/$cmd" "$tmp/$cmd"
    continue
  fi
  echo "build-node: building $cmd (k8s.io/kubernetes/cmd/$cmd $KUBE_VERSION)" >&2
  if ! (cd "$here/controlplane" && go build -trimpath -ldflags "$kube_ldflags" -o "$tmp/$cmd" "k8s.io/kubernetes/cmd/$cmd") >>"$log" 2>&1; then
    echo "build-node: building $cmd failed; see $log" >&2
    tail -20 "$log" >&2
    exit 1
  fi
done

echo "build-node: building pause (tools/node/pause.c)" >&2
if ! gcc -Os -static -o "$tmp/pause" "$here/node/pause.c" >>"$log" 2>&1; then
  echo "build-node: building pause failed (static glibc: apt-get install libc6-dev); see $log" >&2
  exit 1
fi
strip "$tmp/pause" 2>/dev/null || true

mv "$tmp"/kubelet "$tmp"/kube-scheduler "$tmp"/pause "$bin/"
echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ) pause=$pause_sum" >"$stamp"
echo "$bin"
