#!/usr/bin/env bash
# The data-path test (what `make e2e` runs): app -> Unix socket -> real Cloud SQL Auth
# Proxy -> TLS -> real PostgreSQL, with the operator's rendered injection. See README.md.
#
#   CLOUDSQL_BINDER_BIN=target/debug/cloudsql-binder bash e2e/datapath/run.sh   # CI
#   DATAPATH_MANIFEST=e2e/datapath/testdata/rendered-by-hand.yaml bash e2e/datapath/run.sh
#
# With CLOUDSQL_BINDER_BIN it also renders every testdata/proxyargs/*.yaml into a
# temporary directory (PROXYARGS_MANIFESTS) for the proxy-args tests (proxyargs_test.go:
# the real proxy started with every variant of args we generate). Without it, those
# tests run only when PROXYARGS_MANIFESTS is set, and are skipped otherwise.
#
# Needs Go, and PostgreSQL + psql (installed with apt-get when missing).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

say() { echo "datapath: $*" >&2; }

# 1. PostgreSQL server and client (Debian packages).
if ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || ! command -v psql >/dev/null; then
  sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { say "postgresql/psql missing and not root: apt-get install postgresql postgresql-client"; exit 1; }
    sudo=(sudo)
  fi
  say "installing postgresql and postgresql-client with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends postgresql postgresql-client >/dev/null
fi

# 2. The real proxy, pinned to the default image's version.
CLOUD_SQL_PROXY="$("$root/tools/build-proxy.sh")"
export CLOUD_SQL_PROXY

# 3. The operator's injection for testdata/input.yaml.
if [[ -n "${CLOUDSQL_BINDER_BIN:-}" ]]; then
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' EXIT
  DATAPATH_MANIFEST="$out/rendered.yaml"
  if ! "$CLOUDSQL_BINDER_BIN" render -f "$here/testdata/input.yaml" >"$DATAPATH_MANIFEST"; then
    say "$CLOUDSQL_BINDER_BIN render -f e2e/datapath/testdata/input.yaml failed"
    exit 1
  fi
elif [[ -n "${DATAPATH_MANIFEST:-}" ]]; then
  [[ -f "$DATAPATH_MANIFEST" ]] || { say "DATAPATH_MANIFEST=$DATAPATH_MANIFEST: no such file"; exit 1; }
  DATAPATH_MANIFEST="$(cd "$(dirname "$DATAPATH_MANIFEST")" && pwd)/$(basename "$DATAPATH_MANIFEST")"
else
  say "set CLOUDSQL_BINDER_BIN (runs its render on testdata/input.yaml) or DATAPATH_MANIFEST (a rendered manifest)"
  exit 1
fi
export DATAPATH_MANIFEST
say "manifest $DATAPATH_MANIFEST, proxy $CLOUD_SQL_PROXY"

# 4. The operator's injection for every proxy variant (testdata/proxyargs/NAME.yaml ->
# $PROXYARGS_MANIFESTS/NAME.yaml).
go_test_args=(-count=1 -v)
if [[ -n "${CLOUDSQL_BINDER_BIN:-}" ]]; then
  PROXYARGS_MANIFESTS="$out/proxyargs"
  mkdir -p "$PROXYARGS_MANIFESTS"
  for input in "$here"/testdata/proxyargs/*.yaml; do
    if ! "$CLOUDSQL_BINDER_BIN" render -f "$input" >"$PROXYARGS_MANIFESTS/$(basename "$input")"; then
      say "$CLOUDSQL_BINDER_BIN render -f e2e/datapath/testdata/proxyargs/$(basename "$input") failed"
      exit 1
    fi
  done
elif [[ -n "${PROXYARGS_MANIFESTS:-}" ]]; then
  [[ -d "$PROXYARGS_MANIFESTS" ]] || { say "PROXYARGS_MANIFESTS=$PROXYARGS_MANIFESTS: no such directory"; exit 1; }
  PROXYARGS_MANIFESTS="$(cd "$PROXYARGS_MANIFESTS" && pwd)"
else
  say "no CLOUDSQL_BINDER_BIN or PROXYARGS_MANIFESTS: skipping the proxy-args tests (proxyargs_test.go)"
  go_test_args+=(-skip '^TestProxy(AcceptsEveryModeWeGenerate|RejectsPrivateIPWithPSCAndWeNeverGenerateIt|RejectsAFlagItDoesNotKnow)$')
fi
if [[ -n "${PROXYARGS_MANIFESTS:-}" ]]; then
  export PROXYARGS_MANIFESTS
  say "proxy variants rendered in $PROXYARGS_MANIFESTS"
fi

# 5. The tests.
cd "$here"
go test "${go_test_args[@]}" ./...
