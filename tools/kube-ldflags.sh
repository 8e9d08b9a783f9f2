# shellcheck shell=bash
# The -ldflags of every Kubernetes command we build (tools/build-controlplane.sh,
# tools/build-node.sh): stripped, and stamped with KUBE_VERSION so `/version` and
# `kubelet --version` say the pinned release. Needs KUBE_VERSION (versions.env);
# sets kube_ldflags.
kube_major="${KUBE_VERSION#v}"; kube_major="${kube_major%%.*}"
kube_minor="${KUBE_VERSION#v*.}"; kube_minor="${kube_minor%%.*}"
kube_build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
kube_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kube_ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=$kube_major -X $pkg.gitMinor=$kube_minor"
  kube_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$kube_build_date -X $pkg.gitCommit=release-$KUBE_VERSION"
done
