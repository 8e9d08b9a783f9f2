package main

// The set-up, as the node test does it: Google's side on the node's gateway, the
// test images loaded into the node, the chart installed with the operator image,
// one instance, and one namespace per mode with its own database and binding.

import (
	"bytes"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"text/template"
	"time"

	node "github.com/cloudsql-binder/e2e/node"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
)

//go:embed bench.yaml
var benchYAML string

var objects = template.Must(template.New("bench.yaml").Option("missingkey=error").Parse(benchYAML))

const (
	// BenchLabel marks the namespaces and the instance podbench creates, so a
	// later run on the same cluster removes what an interrupted one left.
	BenchLabel = "bench.cloudsql.dev/pods"
	releaseNS  = "podbench-operator"
	release    = "cloudsql-binder"
	instance   = "podbench"
	// proxyContainer is the container the operator injects in Proxy mode.
	proxyContainer = "cloud-sql-proxy"
	appContainer   = "app"
)

var instanceGVK = schema.GroupVersionKind{Group: "cloudsql.dev", Version: "v1alpha1", Kind: "CloudSqlInstance"}

// Mode is one side of the comparison: a namespace, its binding and its app.
type Mode struct {
	Name      string   `json:"name"` // proxy | connector
	Binding   string   `json:"binding_mode"`
	App       string   `json:"app"`
	Image     string   `json:"image"`
	Args      []string `json:"args"`
	Namespace string   `json:"namespace"`
	// The mode's own database, and how many connections PostgreSQL had open
	// to it when the memory was read (the idle Pods' pools).
	Database        string `json:"database"`
	OpenConnections int    `json:"open_connections_at_memory_read"`
	// The binding's status.pool.grantedPerPod (the app's DB_POOL_MAX_CONNS).
	GrantedPerPod int64 `json:"granted_per_pod"`
	// The line the app prints after its first successful query.
	FirstQueryLine string `json:"first_query_line"`
}

func modes(runID string) []*Mode {
	return []*Mode{
		{
			Name: "proxy", Binding: "Proxy", Image: node.GormAppImage,
			App:            "GORM app (e2e/datapath/cmd/gormapp) through the cloud-sql-proxy 2.28.0 native sidecar, Unix socket",
			Args:           []string{"-startup-report", "-hold"},
			Namespace:      "podbench-proxy-" + runID,
			FirstQueryLine: "first query ok",
		},
		{
			Name: "connector", Binding: "Connector", Image: node.ConnectorFixtureImage,
			App:            "connector app (e2e/node/cmd/connectorapp, cloud.google.com/go/cloudsqlconn + pgxpool), no sidecar",
			Args:           []string{"-hold"},
			Namespace:      "podbench-connector-" + runID,
			FirstQueryLine: "first query ok",
		},
	}
}

type bench struct {
	cluster *node.Cluster
	apply   *node.Applier
	google  *node.Google
	helm    *node.Helm
	dir     string
	modes   []*Mode
	vars    map[string]any
	// What tearDown removes.
	namespaces []string
	installed  bool
}

// render executes one template of bench.yaml into an object.
func render(name string, data map[string]any) (*unstructured.Unstructured, error) {
	var buf bytes.Buffer
	if err := objects.ExecuteTemplate(&buf, name, data); err != nil {
		return nil, err
	}
	dec := utilyaml.NewYAMLOrJSONDecoder(&buf, 4096)
	for {
		var m map[string]any
		if err := dec.Decode(&m); errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("bench.yaml %q: no object", name)
		} else if err != nil {
			return nil, fmt.Errorf("bench.yaml %q: %w", name, err)
		}
		if len(m) > 0 {
			return &unstructured.Unstructured{Object: m}, nil
		}
	}
}

func (b *bench) data(extra map[string]any) map[string]any {
	out := map[string]any{}
	for k, v := range b.vars {
		out[k] = v
	}
	for k, v := range extra {
		out[k] = v
	}
	return out
}

func setUp(ctx context.Context, c config, r *Result) (*bench, error) {
	cl, err := node.OpenCluster(c.clusterDir)
	if err != nil {
		return nil, err
	}
	b := &bench{cluster: cl, helm: &node.Helm{Bin: c.helmBin, Kubeconfig: cl.Kubeconfig}}
	n, err := cl.Kube.CoreV1().Nodes().Get(ctx, node.NodeName, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("node %s: %w: run tools/node-up.sh", node.NodeName, err)
	}
	if reason := notReady(n); reason != "" {
		return nil, fmt.Errorf("node %s is not Ready (%s): see %s/logs", node.NodeName, reason, cl.Dir)
	}
	r.Machine = machine(n)
	fmt.Printf("podbench: node %s Ready: %s, kubelet %s, %s, %d CPUs; load average %s\n", n.Name,
		r.Machine.ContainerRuntime, r.Machine.Kubelet, r.Machine.Cgroups, r.Machine.CPUs, r.Machine.LoadAverageStart)
	if b.apply, err = node.NewApplier(cl); err != nil {
		return nil, err
	}
	// Short: PostgreSQL's Unix socket path must stay under 108 bytes.
	if b.dir, err = os.MkdirTemp("", "podbench-"); err != nil {
		return nil, err
	}
	runID := time.Now().UTC().Format("150405")
	b.modes = modes(runID)
	r.Modes = b.modes

	step := func(what string, fn func() error) error {
		start := time.Now()
		if err := fn(); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		fmt.Printf("podbench: %s (%.1fs)\n", what, time.Since(start).Seconds())
		return nil
	}
	if err := step("removed what earlier runs left", func() error { return b.removeEarlierRuns(ctx) }); err != nil {
		return b, err
	}
	if err := step("fixtures and PostgreSQL up on "+cl.Gateway, func() (err error) {
		b.google, err = node.StartGoogle(b.dir, cl.Gateway)
		return err
	}); err != nil {
		return b, err
	}
	images := &node.ImageBuilder{Repo: c.repo, ClusterDir: cl.Dir, Dir: b.dir}
	if err := step("images built and loaded into the node", func() error {
		gorm, err := images.GoBinary(ctx, filepath.Join(c.repo, "e2e", "datapath"), "./cmd/gormapp", "gormapp")
		if err != nil {
			return err
		}
		connector, err := images.GoBinary(ctx, filepath.Join(c.repo, "e2e", "node"), "./cmd/connectorapp", "connectorapp")
		if err != nil {
			return err
		}
		g := b.google
		return errors.Join(
			images.ProxyImage(ctx, c.proxyBin, g.APICAFile, g.Admin.URL, g.Admin.Token),
			images.GormImage(ctx, gorm),
			images.ConnectorImage(ctx, connector, g.APICAFile, g.Admin.URL, g.Admin.Token),
		)
	}); err != nil {
		return b, err
	}
	r.Settings.ProxyImage = node.ProxyFixtureImage

	values, err := node.OperatorValues(c.operatorImage, cl.Gateway, cl.APIServerPort)
	if err != nil {
		return b, err
	}
	valuesFile := filepath.Join(b.dir, "values.yaml")
	if err := os.WriteFile(valuesFile, []byte(values), 0o644); err != nil {
		return b, err
	}
	if err := step("chart installed ("+c.operatorImage+") and its Deployment available", func() error {
		if err := b.createNamespace(ctx, releaseNS); err != nil {
			return err
		}
		b.installed = true
		if _, err := b.helm.Run(ctx, "install", release, filepath.Join(c.repo, "charts", "cloudsql-binder"),
			"--namespace", releaseNS, "-f", valuesFile); err != nil {
			return err
		}
		return b.waitDeployment(ctx, releaseNS, release, 3*time.Minute)
	}); err != nil {
		return b, err
	}

	b.vars = map[string]any{
		"Instance": instance, "ConnectionName": b.google.Instance.ConnectionName(),
		"ProxyImage": node.ProxyFixtureImage,
	}
	if err := step("CloudSqlInstance "+instance+" Ready", func() error {
		obj, err := render("instance", b.data(nil))
		if err != nil {
			return err
		}
		if _, err := b.apply.Apply(ctx, obj); err != nil {
			return err
		}
		return node.Poll(ctx, time.Minute, 200*time.Millisecond, func() (bool, string, error) {
			got, err := b.apply.Get(ctx, obj)
			if err != nil {
				return false, "", err
			}
			st := node.ConditionStatus(got, "Ready")
			return st == "True", "Ready=" + st, nil
		})
	}); err != nil {
		return b, err
	}
	for _, m := range b.modes {
		if err := step(m.Binding+" mode: namespace "+m.Namespace+", its database, its binding reconciled and injecting", func() error {
			return b.bind(ctx, m)
		}); err != nil {
			return b, err
		}
	}
	return b, nil
}

// bind makes a mode's namespace, database and binding, waits until the operator
// has reconciled the binding, then until the webhook injects a dry-run Pod (until
// the API server has the webhook and the operator's index the binding, Pods pass
// uninjected).
func (b *bench) bind(ctx context.Context, m *Mode) error {
	if err := b.createNamespace(ctx, m.Namespace); err != nil {
		return err
	}
	db := "bench_" + m.Name
	m.Database = db
	if err := b.google.CreateDatabase(ctx, db, db+"-app"); err != nil {
		return err
	}
	binding, err := render("binding", b.data(map[string]any{"Namespace": m.Namespace, "Mode": m.Binding, "DB": db, "User": db + "-app"}))
	if err != nil {
		return err
	}
	applied, err := b.apply.Apply(ctx, binding)
	if err != nil {
		return err
	}
	if err := node.Poll(ctx, time.Minute, 200*time.Millisecond, func() (bool, string, error) {
		got, err := b.apply.Get(ctx, applied)
		if err != nil {
			return false, "", err
		}
		observed, _, _ := unstructured.NestedInt64(got.Object, "status", "observedGeneration")
		granted, _, _ := unstructured.NestedInt64(got.Object, "status", "pool", "grantedPerPod")
		m.GrantedPerPod = granted
		resolved := node.ConditionStatus(got, "InstanceResolved")
		return observed == got.GetGeneration() && resolved == "True" && granted > 0,
			fmt.Sprintf("observedGeneration %d of %d, InstanceResolved=%s, grantedPerPod=%d", observed, got.GetGeneration(), resolved, granted), nil
	}); err != nil {
		return fmt.Errorf("binding %s/%s: %w", m.Namespace, applied.GetName(), err)
	}
	return node.Poll(ctx, time.Minute, 200*time.Millisecond, func() (bool, string, error) {
		pod, err := b.pod(m, "dry-run")
		if err != nil {
			return false, "", node.Stop(err)
		}
		got, err := b.cluster.Kube.CoreV1().Pods(m.Namespace).Create(ctx, pod, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		if err != nil {
			return false, "", err
		}
		return injected(m, got), "a dry-run Pod came back uninjected", nil
	})
}

// pod is the mode's Pod named name, as created (before admission).
func (b *bench) pod(m *Mode, name string) (*corev1.Pod, error) {
	args := `["` + strings.Join(m.Args, `", "`) + `"]`
	obj, err := render("pod", b.data(map[string]any{"Namespace": m.Namespace, "Pod": name, "AppImage": m.Image, "Args": args}))
	if err != nil {
		return nil, err
	}
	pod := &corev1.Pod{}
	if err := fromUnstructured(obj, pod); err != nil {
		return nil, err
	}
	return pod, nil
}

// injected says whether the webhook injected the Pod for its mode: the proxy as
// a native sidecar, or (Connector mode) the connector's env.
func injected(m *Mode, p *corev1.Pod) bool {
	if m.Binding == "Proxy" {
		for _, c := range p.Spec.InitContainers {
			if c.Name == proxyContainer && c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways {
				return true
			}
		}
		return false
	}
	for _, c := range p.Spec.Containers {
		if c.Name != appContainer {
			continue
		}
		for _, e := range c.Env {
			if e.Name == "INSTANCE_CONNECTION_NAME" {
				return true
			}
		}
	}
	return false
}

func (b *bench) createNamespace(ctx context.Context, name string) error {
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{BenchLabel: "true"}}}
	if _, err := b.cluster.Kube.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
		return err
	}
	b.namespaces = append(b.namespaces, name)
	return nil
}

// removeEarlierRuns uninstalls the release and deletes the namespaces and the
// instance an interrupted run left, and waits until the namespaces are gone (their
// Pods would take the node's time and memory).
func (b *bench) removeEarlierRuns(ctx context.Context) error {
	if _, err := b.helm.Run(ctx, "status", release, "--namespace", releaseNS); err == nil {
		if _, err := b.helm.Run(ctx, "uninstall", release, "--namespace", releaseNS, "--wait", "--timeout", "2m"); err != nil {
			return err
		}
	}
	sel := metav1.ListOptions{LabelSelector: BenchLabel + "=true"}
	nss, err := b.cluster.Kube.CoreV1().Namespaces().List(ctx, sel)
	if err != nil {
		return err
	}
	for _, ns := range nss.Items {
		if err := b.cluster.Kube.CoreV1().Namespaces().Delete(ctx, ns.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return err
		}
	}
	if gvr, err := b.apply.Resource(instanceGVK); err == nil {
		if err := b.cluster.Dynamic.Resource(gvr).DeleteCollection(ctx, metav1.DeleteOptions{}, sel); err != nil && !apierrors.IsNotFound(err) {
			return err
		}
	}
	return node.Poll(ctx, 3*time.Minute, 200*time.Millisecond, func() (bool, string, error) {
		left, err := b.cluster.Kube.CoreV1().Namespaces().List(ctx, sel)
		if err != nil {
			return false, "", err
		}
		return len(left.Items) == 0, fmt.Sprintf("%d namespaces still terminating", len(left.Items)), nil
	})
}

// tearDown removes what the run made (unless keep), then stops Google's side.
func (b *bench) tearDown(keep bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	switch {
	case keep:
		fmt.Printf("podbench: -keep: left release %s/%s and namespaces %v; the fixtures stop now, so the Pods' connections will fail\n",
			releaseNS, release, b.namespaces)
	default:
		for _, ns := range b.namespaces {
			if ns == releaseNS {
				continue
			}
			_ = b.cluster.Kube.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{})
		}
		if b.installed {
			if _, err := b.helm.Run(ctx, "uninstall", release, "--namespace", releaseNS, "--timeout", "2m"); err != nil {
				fmt.Printf("podbench: teardown: %v\n", err)
			}
			_ = b.cluster.Kube.CoreV1().Namespaces().Delete(ctx, releaseNS, metav1.DeleteOptions{})
		}
		if gvr, err := b.apply.Resource(instanceGVK); err == nil {
			_ = b.cluster.Dynamic.Resource(gvr).Delete(ctx, instance, metav1.DeleteOptions{})
		}
	}
	if b.google != nil {
		b.google.Stop()
	}
	if b.dir != "" {
		_ = os.RemoveAll(b.dir)
	}
}

// waitDeployment waits until a Deployment has rolled out: every replica updated,
// Ready and available.
func (b *bench) waitDeployment(ctx context.Context, ns, name string, timeout time.Duration) error {
	err := node.Poll(ctx, timeout, 200*time.Millisecond, func() (bool, string, error) {
		d, err := b.cluster.Kube.AppsV1().Deployments(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, "", err
		}
		st, want := d.Status, *d.Spec.Replicas
		return st.ObservedGeneration == d.Generation && st.UpdatedReplicas == want && st.Replicas == want &&
				st.ReadyReplicas == want && st.AvailableReplicas == want,
			fmt.Sprintf("replicas %d updated %d ready %d available %d (want %d)", st.Replicas, st.UpdatedReplicas, st.ReadyReplicas, st.AvailableReplicas, want), nil
	})
	if err != nil {
		return fmt.Errorf("Deployment %s/%s: %w\n%s", ns, name, err, b.cluster.Report(ctx, ns, ""))
	}
	return nil
}

func notReady(n *corev1.Node) string {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			if c.Status == corev1.ConditionTrue {
				return ""
			}
			return fmt.Sprintf("%s: %s", c.Reason, c.Message)
		}
	}
	return "no Ready condition yet"
}

// machine describes where the figures were taken: this machine and the node.
func machine(n *corev1.Node) Machine {
	m := Machine{
		CPUs: runtime.NumCPU(), CPUModel: cpuModel(), MemoryGiB: memoryGiB(),
		Kernel: n.Status.NodeInfo.KernelVersion, Kubelet: n.Status.NodeInfo.KubeletVersion,
		ContainerRuntime: strings.Replace(n.Status.NodeInfo.ContainerRuntimeVersion, "://", " ", 1),
		Cgroups:          "cgroups v1 (cgroupfs driver)",
		LoadAverageStart: loadAverage(),
	}
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		m.Cgroups = "cgroups v2 (cgroupfs driver)"
	}
	return m
}

func cpuModel() string {
	raw, _ := os.ReadFile("/proc/cpuinfo")
	for _, l := range strings.Split(string(raw), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

func memoryGiB() float64 {
	raw, _ := os.ReadFile("/proc/meminfo")
	var kb float64
	for _, l := range strings.Split(string(raw), "\n") {
		if strings.HasPrefix(l, "MemTotal:") {
			_, _ = fmt.Sscanf(strings.TrimPrefix(l, "MemTotal:"), "%f", &kb)
		}
	}
	return kb / (1 << 20)
}

func loadAverage() string {
	raw, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(raw))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}
