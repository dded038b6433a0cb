//go:build tools

// The Kubernetes API server, kubectl and etcd, at one release, for the test that runs
// docs/install.md's kubectl lines against a real API server (no nodes: nothing is scheduled,
// but every object is validated and stored as a cluster would). scripts/test.sh builds them
// once, outside the clone. k8s.io/kubernetes is not meant to be imported, so go.mod pins each
// of its staging modules (v0.0.0 in its go.mod) to the release's tag.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
