// Package node runs the operator's chart, its injected sidecars and the data path in
// real pods on the local node (tools/node-up.sh). See README.md.
package node

import (
	"bufio"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// NodeName is the Node tools/node-up.sh registers.
const NodeName = "cloudsql-binder-node"

// Cluster is the local control plane plus its node, as tools/cluster-up.sh and
// tools/node-up.sh leave them in the cluster directory.
type Cluster struct {
	Dir        string // CLOUDSQL_BINDER_CLUSTER_DIR
	Kubeconfig string
	// From network.env: pods get addresses in Subnet and reach this machine at
	// Gateway (the node's own address, on Bridge).
	Gateway, Subnet, Bridge string
	// The API server as pods must reach it: there is no kube-proxy, so the
	// `kubernetes` Service's ClusterIP leads nowhere; the server listens on all
	// addresses and its certificate names the gateway.
	APIServerPort string
	// The node's containerd (for ctr, to kill a container's process).
	Containerd string

	Config  *rest.Config
	Kube    kubernetes.Interface
	Dynamic dynamic.Interface
}

// OpenCluster reads the cluster directory; every missing piece is an error naming
// the step that makes it.
func OpenCluster(dir string) (*Cluster, error) {
	if dir == "" {
		return nil, fmt.Errorf("CLOUDSQL_BINDER_CLUSTER_DIR is not set (e2e/node/run.sh sets it; make test uses .cluster-test)")
	}
	c := &Cluster{Dir: dir, Kubeconfig: filepath.Join(dir, "kubeconfig"), Containerd: filepath.Join(dir, "node", "containerd.sock")}
	if _, err := os.Stat(c.Kubeconfig); err != nil {
		return nil, fmt.Errorf("no control plane in %s (%v): run make cluster-up", dir, err)
	}
	netEnv, err := readEnvFile(filepath.Join(dir, "network.env"))
	if err != nil {
		return nil, fmt.Errorf("the node's network is not recorded (%v): run make cluster-up with the node-aware tools/cluster-up.sh", err)
	}
	c.Gateway, c.Subnet, c.Bridge = netEnv["NODE_GATEWAY"], netEnv["NODE_SUBNET"], netEnv["NODE_BRIDGE"]
	if net.ParseIP(c.Gateway) == nil {
		return nil, fmt.Errorf("%s/network.env: NODE_GATEWAY=%q is not an IP address", dir, c.Gateway)
	}
	if _, _, err := net.ParseCIDR(c.Subnet); err != nil {
		return nil, fmt.Errorf("%s/network.env: NODE_SUBNET=%q: %v", dir, c.Subnet, err)
	}
	if _, err := os.Stat(c.Containerd); err != nil {
		return nil, fmt.Errorf("no node in %s (%v): run make node-up", dir, err)
	}
	if c.Config, err = clientcmd.BuildConfigFromFlags("", c.Kubeconfig); err != nil {
		return nil, fmt.Errorf("%s: %w", c.Kubeconfig, err)
	}
	c.Config.QPS, c.Config.Burst = 50, 100
	u, err := url.Parse(c.Config.Host)
	if err != nil || u.Port() == "" {
		return nil, fmt.Errorf("%s: server %q has no port", c.Kubeconfig, c.Config.Host)
	}
	c.APIServerPort = u.Port()
	if c.Kube, err = kubernetes.NewForConfig(c.Config); err != nil {
		return nil, err
	}
	if c.Dynamic, err = dynamic.NewForConfig(c.Config); err != nil {
		return nil, err
	}
	return c, nil
}

// InSubnet says whether ip is a pod address on the node's bridge.
func (c *Cluster) InSubnet(ip string) bool {
	_, n, err := net.ParseCIDR(c.Subnet)
	return err == nil && n.Contains(net.ParseIP(ip))
}

// readEnvFile reads KEY=VALUE lines (the shell's simple assignments).
func readEnvFile(path string) (map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(strings.TrimPrefix(line, "export "), "=")
		if ok {
			out[k] = strings.Trim(v, `"'`)
		}
	}
	return out, sc.Err()
}
