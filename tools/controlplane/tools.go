//go:build tools

// Package tools records the commands this module builds so `go mod tidy` keeps them:
// the control plane (tools/build-controlplane.sh) and the local node
// (tools/build-node.sh), all from one pinned k8s.io/kubernetes.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
