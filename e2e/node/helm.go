package node

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"
)

// Helm runs the pinned helm binary (tools/build-controlplane.sh) against the cluster.
type Helm struct {
	Bin, Kubeconfig string
}

// Run runs helm with args and returns its combined output.
func (h *Helm) Run(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, h.Bin, append(args, "--kubeconfig", h.Kubeconfig)...)
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+os.TempDir()+"/e2e-node-helm-cache",
		"HELM_CONFIG_HOME="+os.TempDir()+"/e2e-node-helm-config", "HELM_DATA_HOME="+os.TempDir()+"/e2e-node-helm-data")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("helm %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// Release is one entry of `helm list -o json`.
type Release struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace"`
	Chart     string `json:"chart"`
	Status    string `json:"status"`
}

// Releases lists the releases in every namespace.
func (h *Helm) Releases(ctx context.Context) ([]Release, error) {
	out, err := h.Run(ctx, "list", "--all-namespaces", "--deployed", "--failed", "--pending", "--uninstalling", "-o", "json")
	if err != nil {
		return nil, err
	}
	var rs []Release
	if err := json.Unmarshal([]byte(out), &rs); err != nil {
		return nil, fmt.Errorf("helm list: %w: %s", err, out)
	}
	return rs, nil
}

// OperatorValues are the chart values the test installs with: the image loaded
// into the node (never pulled), two replicas, and the API server's address as pods
// reach it (no kube-proxy: the `kubernetes` Service's ClusterIP leads nowhere).
func OperatorValues(image, gateway, apiPort string) (string, error) {
	i := strings.LastIndex(image, ":")
	if i < 0 || strings.Contains(image[i:], "/") {
		return "", fmt.Errorf("operator image %q has no tag", image)
	}
	return fmt.Sprintf(`replicas: 2
image:
  repository: %s
  tag: %q
  pullPolicy: Never
extraEnv:
  - name: KUBERNETES_SERVICE_HOST
    value: %q
  - name: KUBERNETES_SERVICE_PORT
    value: %q
`, image[:i], image[i+1:], gateway, apiPort), nil
}
