#!/usr/bin/env bash
# Prints the path of the Knative Serving `Service` CRD from the pinned
# knative.dev/serving Go module (downloaded through the Go module proxy).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/versions.env"
dir="$(cd "$here/controlplane" && go mod download -json "knative.dev/serving@$KNATIVE_SERVING_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')" \
  || { echo "knative-crd: downloading knative.dev/serving@$KNATIVE_SERVING_VERSION failed" >&2; exit 1; }
echo "$dir/config/core/300-resources/service.yaml"
