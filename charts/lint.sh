#!/usr/bin/env bash
# `make chart-lint`: lints and renders the Helm chart with the project-built
# helm, checks that its values schema rejects wrong values with a clear
# message, that its CRDs are the generated ones in crds/, and that its
# appVersion (the default image tag) is the crate version.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
chart="$here/cloudsql-binder"
helm="$(bash "$repo/tools/build-controlplane.sh")/helm"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

fail() { echo "chart-lint: $*" >&2; exit 1; }
step() { echo "chart-lint: $*" >&2; }

step "CRDs: $chart/crds/cloudsql.dev_crds.yaml is crds/cloudsql.dev_crds.yaml"
cmp -s "$repo/crds/cloudsql.dev_crds.yaml" "$chart/crds/cloudsql.dev_crds.yaml" \
  || fail "the chart's CRDs differ from crds/cloudsql.dev_crds.yaml; run: cp crds/cloudsql.dev_crds.yaml charts/cloudsql-binder/crds/"

# The chart's appVersion is the image tag it defaults to, and `make image` and
# the release workflow tag the image with the crate version: the two are one.
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -1)"
app_version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$chart/Chart.yaml")"
step "appVersion: Chart.yaml's $app_version is Cargo.toml's $version"
[[ -n "$version" && "$app_version" == "$version" ]] \
  || fail "Chart.yaml appVersion '$app_version' is not the crate version '$version' (Cargo.toml): set appVersion: \"$version\""

for values in "" "$chart/ci/full-values.yaml"; do
  name="${values:+$(basename "$values")}"; name="${name:-default values}"
  args=(); [[ -n "$values" ]] && args=(-f "$values")
  step "helm lint --strict ($name)"
  "$helm" lint --strict "$chart" "${args[@]}" >"$out/lint.log" 2>&1 || { cat "$out/lint.log" >&2; fail "helm lint failed with $name"; }
  step "helm template ($name)"
  "$helm" template csb "$chart" --namespace cloudsql-binder "${args[@]}" >"$out/rendered.yaml" 2>"$out/template.log" \
    || { cat "$out/template.log" >&2; fail "helm template failed with $name"; }
  for kind in ServiceAccount ClusterRole ClusterRoleBinding Role RoleBinding Deployment Service; do
    grep -q "^kind: $kind\$" "$out/rendered.yaml" || fail "helm template with $name renders no $kind"
  done
done

# The image: the published repository at the crate version by default;
# image.repository, image.tag and image.digest override it.
image_of() { # --set-arguments...
  "$helm" template csb "$chart" "$@" | sed -n 's/^ *image: "\(.*\)"$/\1/p' | sort -u
}
expect_image() { # expected --set-arguments...
  local expected="$1" got; shift
  got="$(image_of "$@")" || fail "helm template $* failed"
  [[ "$got" == "$expected" ]] || fail "helm template ${*:-(defaults)} renders image '$got', not '$expected'"
  step "image ${*:-(defaults)}: $got"
}
digest=sha256:$(printf '%064d' 0)
expect_image "ghcr.io/cloudsql-binder/cloudsql-binder:$version"
expect_image "ghcr.io/cloudsql-binder/cloudsql-binder:dev" --set image.tag=dev
expect_image "registry.example/csb:1.2.3" --set image.repository=registry.example/csb --set image.tag=1.2.3
expect_image "ghcr.io/cloudsql-binder/cloudsql-binder@$digest" --set image.digest="$digest"

step "helm template (webhook and leader election off, 1 replica)"
"$helm" template csb "$chart" --set webhook.enabled=false --set leaderElection.enabled=false --set replicas=1 >"$out/rendered.yaml" \
  || fail "helm template failed with the webhook and leader election off"
! grep -Eq '^kind: (MutatingWebhookConfiguration|ValidatingWebhookConfiguration|Role|PodDisruptionBudget)$' "$out/rendered.yaml" \
  || fail "webhook.enabled=false / leaderElection.enabled=false / replicas=1 still render a webhook, Role or PDB"

# Each wrong value must be refused, naming the value's path and what is wrong.
reject() { # --set-argument expected-message-part...
  local set="$1"; shift
  if "$helm" template csb "$chart" --set "$set" >/dev/null 2>"$out/reject.log"; then
    fail "the values schema accepted --set $set"
  fi
  for part in "$@"; do
    grep -qF -- "$part" "$out/reject.log" || { cat "$out/reject.log" >&2; fail "rejecting --set $set did not say '$part'"; }
  done
  step "schema rejects --set $set: $(grep -F -- "$1" "$out/reject.log" | head -1 | sed 's/^[- ]*//')"
}
reject 'replicas=two' "/replicas" "want integer"
reject 'logFormat=xml' "/logFormat" "'json', 'text'"
reject 'webhook.port=70000' "/webhook/port" "maximum"
reject 'webhook.enabled=yes' "/webhook/enabled" "want boolean"
reject 'serviceAccount.gcpServiceAccount=operator' "/serviceAccount/gcpServiceAccount" "does not match pattern"
reject 'replica=3' "additional properties 'replica' not allowed"

echo "chart-lint: ok" >&2
