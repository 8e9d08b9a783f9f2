#!/usr/bin/env bash
# Builds the Cloud SQL Auth Proxy from the pinned Go module under tools/proxy into a
# cache outside the repo, and prints the binary's path. A finished build is marked by
# a stamp file written last, so an interrupted build never counts as present and is
# simply redone.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
version="$(sed -nE 's#^(require)?[[:space:]]*github\.com/GoogleCloudPlatform/cloud-sql-proxy/v2 (v[^[:space:]]+).*#\2#p' "$here/proxy/go.mod")"
if [[ -z "$version" ]]; then
  echo "build-proxy: cannot read the proxy version from $here/proxy/go.mod" >&2
  exit 1
fi

cache_root="${CLOUDSQL_BINDER_CACHE:-$HOME/.cache/cloudsql-binder}"
bin="$cache_root/proxy-$version/bin"
stamp="$bin/.complete"

if [[ -f "$stamp" && -x "$bin/cloud-sql-proxy" ]]; then
  echo "$bin/cloud-sql-proxy"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  echo "build-proxy: the Go toolchain is missing (install Go 1.26 or newer)" >&2
  exit 1
fi

mkdir -p "$bin"
rm -f "$stamp"
tmp="$(mktemp "$bin/.cloud-sql-proxy.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
log="$cache_root/build-proxy.log"
: >"$log"

echo "build-proxy: building cloud-sql-proxy $version" >&2
if ! (cd "$here/proxy" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" \
  -o "$tmp" github.com/GoogleCloudPlatform/cloud-sql-proxy/v2) >>"$log" 2>&1; then
  echo "build-proxy: building cloud-sql-proxy $version failed; see $log" >&2
  exit 1
fi

chmod 0755 "$tmp"
mv "$tmp" "$bin/cloud-sql-proxy"
date -u +%Y-%m-%dT%H:%M:%SZ >"$stamp"
echo "$bin/cloud-sql-proxy"
