#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager and helm from the pinned Go
# modules under tools/ into a cache outside the repo, and prints the bin directory.
# A finished build is marked by a stamp file written last, so an interrupted build
# never counts as present and is simply redone.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/versions.env"

cache_root="${CLOUDSQL_BINDER_CACHE:-$HOME/.cache/cloudsql-binder}"
bin="$cache_root/k8s-$KUBE_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION/bin"
stamp="$bin/.complete"

if [[ -f "$stamp" ]]; then
  echo "$bin"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  echo "build-controlplane: the Go toolchain is missing (install Go 1.24 or newer)" >&2
  exit 1
fi

mkdir -p "$bin"
tmp="$(mktemp -d "$bin/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
log="$cache_root/build.log"
: >"$log"

export CGO_ENABLED=0 GOFLAGS=-mod=mod

# shellcheck source=kube-ldflags.sh
source "$here/kube-ldflags.sh"

build() { # dir output package [ldflags]
  local dir="$1" out="$2" pkg="$3" flags="${4:-}"
  echo "build-controlplane: building $out ($pkg)" >&2
  if ! (cd "$here/$dir" && go build -trimpath -ldflags "$flags" -o "$tmp/$out" "$pkg") >>"$log" 2>&1; then
    echo "build-controlplane: building $out failed; see $log" >&2
    tail -20 "$log" >&2
    exit 1
  fi
}

build controlplane etcd go.etcd.io/etcd/server/v3 "-s -w"
build controlplane kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$kube_ldflags"
build controlplane kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$kube_ldflags"
build helm helm helm.sh/helm/v4/cmd/helm "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION"

mv "$tmp"/etcd "$tmp"/kube-apiserver "$tmp"/kube-controller-manager "$tmp"/helm "$bin/"
date -u +%Y-%m-%dT%H:%M:%SZ >"$stamp"
echo "$bin"
