//go:build tools

// Package tools pins the main packages this builder module compiles, so that
// `go mod tidy` keeps their dependencies in go.mod/go.sum.  It is never built.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	// The single-node test cluster (hack/ensure-cluster-binaries.sh, tests/harness/cluster.py).
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
