#!/usr/bin/env bash
# Builds Google's cloud-sql-proxy-operator (the version pinned in go.mod next to
# this script) from its Go module into a cache outside the repo, and prints the
# directory holding:
#   bin/cloud-sql-proxy-operator   the manager binary (main package at the module root)
#   crds/                          its CustomResourceDefinition (AuthProxyWorkload)
#
# The published module does not contain what its Makefile generates with
# controller-gen (zz_generated.deepcopy.go, config/crd/bases/): `go build` of the
# module as downloaded fails with "*AuthProxyWorkload does not implement
# runtime.Object (missing method DeepCopyObject)". So, exactly as its Makefile's
# ctrl_generate and ctrl_manifests targets do, we run controller-gen (the version
# its Makefile pins, from the Go module proxy) on a writable copy of the module,
# then build. A stamp file written last marks a finished build.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
module=github.com/GoogleCloudPlatform/cloud-sql-proxy-operator
version="$(sed -nE "s#^(require)?[[:space:]]*${module//./\\.} (v[^[:space:]]+).*#\2#p" "$here/go.mod" | head -1)"
[[ -n "$version" ]] || { echo "google-operator: cannot read the version from $here/go.mod" >&2; exit 1; }
# The version of controller-gen the operator's Makefile pins (CONTROLLER_TOOLS_VERSION).
controller_tools="${CONTROLLER_TOOLS_VERSION:-v0.17.3}"

cache_root="${CLOUDSQL_BINDER_CACHE:-$HOME/.cache/cloudsql-binder}"
out="$cache_root/google-operator-$version"
stamp="$out/.complete"
if [[ -f "$stamp" && -x "$out/bin/cloud-sql-proxy-operator" ]]; then
  echo "$out"
  exit 0
fi
command -v go >/dev/null 2>&1 || { echo "google-operator: the Go toolchain is missing" >&2; exit 1; }

mkdir -p "$out"
rm -f "$stamp"
log="$out/build.log"
: >"$log"
fail() { echo "google-operator: $*; see $log" >&2; tail -15 "$log" >&2; exit 1; }

echo "google-operator: downloading $module@$version" >&2
dir="$(cd "$here" && GOFLAGS=-mod=mod go mod download -json "$module@$version" 2>>"$log" \
  | sed -nE 's/^[[:space:]]*"Dir": "(.*)",?$/\1/p')"
[[ -n "$dir" && -d "$dir" ]] || fail "go mod download $module@$version failed"

echo "google-operator: building controller-gen $controller_tools" >&2
GOBIN="$out/tools" GOFLAGS= go install "sigs.k8s.io/controller-tools/cmd/controller-gen@$controller_tools" >>"$log" 2>&1 \
  || fail "building controller-gen $controller_tools failed"

src="$out/src"
rm -rf "$src"
cp -r "$dir" "$src"
chmod -R u+w "$src"
echo "google-operator: generating deepcopy code and CRDs (controller-gen)" >&2
(cd "$src" && "$out/tools/controller-gen" object:headerFile=hack/boilerplate.go.txt paths=./internal/api/... \
  && "$out/tools/controller-gen" crd paths=./internal/api/... output:crd:artifacts:config=config/crd/bases) >>"$log" 2>&1 \
  || fail "controller-gen failed"

echo "google-operator: building the manager" >&2
mkdir -p "$out/bin" "$out/crds"
(cd "$src" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath \
  -ldflags "-s -w -X main.version=${version#v} -X main.buildID=cloudsql-binder-bench" \
  -o "$out/bin/cloud-sql-proxy-operator.tmp" .) >>"$log" 2>&1 || fail "go build of $module failed"
mv "$out/bin/cloud-sql-proxy-operator.tmp" "$out/bin/cloud-sql-proxy-operator"
cp "$src"/config/crd/bases/*.yaml "$out/crds/"
echo "$version" >"$out/version"
date -u +%Y-%m-%dT%H:%M:%SZ >"$stamp"
echo "$out"
