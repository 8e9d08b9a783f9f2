package node

// The shared set-up of the node scenarios, done once by the first test that needs
// it: the fixtures on the node's gateway, the test images loaded into the node,
// the chart installed with the operator image and the instance declared.

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

const (
	// NodeTestLabel marks every namespace and instance the test creates, so the
	// next run removes what a failed one left.
	NodeTestLabel = "e2e.cloudsql.dev/node-test"
	// ReleaseName is the chart's release; its namespace is per run.
	ReleaseName = "cloudsql-binder"
	// OperatorLabel selects the operator's pods (the chart's selector labels).
	OperatorLabel = "app.kubernetes.io/name=cloudsql-binder,app.kubernetes.io/instance=" + ReleaseName
)

// Suite is what every scenario shares.
type Suite struct {
	Cluster *Cluster
	Apply   *Applier
	Google  *Google
	Helm    *Helm

	RunID         string
	Repo          string
	Dir           string
	OperatorImage string
	ValuesFile    string
	Chart         string // charts/cloudsql-binder, or E2E_NODE_CHART
	ReleaseNS     string // the operator's namespace (also the Lease's)
	Instance      string // the CloudSqlInstance's name

	mu         sync.Mutex
	namespaces []string
}

// Vars are what the testdata templates fill in.
type Vars struct {
	Namespace, Instance, ConnectionName   string
	ProxyImage, GormImage, ConnectorImage string
	DB, User                              string
	QuitURL                               string
}

var (
	suiteOnce sync.Once
	suite     *Suite
	suiteErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if suite != nil {
		suite.teardown()
	}
	os.Exit(code)
}

// theSuite returns the shared set-up, or fails the test with why it is missing.
func theSuite(t *testing.T) *Suite {
	t.Helper()
	suiteOnce.Do(func() {
		start := time.Now()
		suite, suiteErr = setUp(t)
		if suiteErr == nil {
			t.Logf("set-up done in %s", time.Since(start).Round(time.Second))
			fmt.Printf("FIGURE setup_seconds=%.1f\n", time.Since(start).Seconds())
		}
	})
	if suiteErr != nil {
		t.Fatalf("node test set-up failed: %v", suiteErr)
	}
	return suite
}

func env(name, hint string) (string, error) {
	v := os.Getenv(name)
	if v == "" {
		return "", fmt.Errorf("%s is not set: %s", name, hint)
	}
	return v, nil
}

func setUp(t *testing.T) (*Suite, error) {
	ctx := context.Background()
	s := &Suite{RunID: randomID()}
	var err error
	c, err := OpenCluster(os.Getenv("CLOUDSQL_BINDER_CLUSTER_DIR"))
	if err != nil {
		return nil, err
	}
	s.Cluster = c
	if err := s.nodeReady(ctx); err != nil {
		return nil, err
	}
	if s.Repo, err = filepath.Abs("../.."); err != nil {
		return nil, err
	}
	s.Chart = filepath.Join(s.Repo, "charts", "cloudsql-binder")
	if chart := os.Getenv("E2E_NODE_CHART"); chart != "" {
		s.Chart = chart
		t.Logf("E2E_NODE_CHART: installing the chart at %s instead of charts/cloudsql-binder", chart)
	}
	hint := "e2e/node/run.sh sets it"
	helmBin, err := env("HELM", hint+" (the helm of tools/build-controlplane.sh)")
	if err != nil {
		return nil, err
	}
	proxyBin, err := env("CLOUD_SQL_PROXY", hint+" (tools/build-proxy.sh prints it)")
	if err != nil {
		return nil, err
	}
	if s.OperatorImage, err = env("OPERATOR_IMAGE", hint+" (the image `make image` wrote, loaded into the node)"); err != nil {
		return nil, err
	}
	s.Helm = &Helm{Bin: helmBin, Kubeconfig: c.Kubeconfig}
	if s.Apply, err = NewApplier(c); err != nil {
		return nil, err
	}
	// Short: Unix socket paths (PostgreSQL's) are limited to 107 bytes.
	if s.Dir, err = os.MkdirTemp("", "e2e-node-"); err != nil {
		return nil, err
	}

	step := func(what string, fn func() error) error {
		start := time.Now()
		if err := fn(); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		t.Logf("set-up: %s (%s)", what, time.Since(start).Round(100*time.Millisecond))
		return nil
	}
	if err := step("removed what earlier runs left", func() error { return s.removeEarlierRuns(ctx) }); err != nil {
		return nil, err
	}
	if err := step("fixtures and PostgreSQL up on "+c.Gateway, func() (err error) {
		s.Google, err = StartGoogle(s.Dir, c.Gateway)
		return err
	}); err != nil {
		return nil, err
	}
	images := &ImageBuilder{Repo: s.Repo, ClusterDir: c.Dir, Dir: s.Dir}
	if err := step("test images built and loaded into the node", func() error {
		gorm, err := images.GoBinary(ctx, filepath.Join(s.Repo, "e2e", "datapath"), "./cmd/gormapp", "gormapp")
		if err != nil {
			return err
		}
		connector, err := images.GoBinary(ctx, filepath.Join(s.Repo, "e2e", "node"), "./cmd/connectorapp", "connectorapp")
		if err != nil {
			return err
		}
		g := s.Google
		return errors.Join(
			images.ProxyImage(ctx, proxyBin, g.APICAFile, g.Admin.URL, g.Admin.Token),
			images.GormImage(ctx, gorm),
			images.ConnectorImage(ctx, connector, g.APICAFile, g.Admin.URL, g.Admin.Token),
		)
	}); err != nil {
		return nil, err
	}

	s.ReleaseNS = "e2e-operator-" + s.RunID
	s.Instance = "e2e-node-" + s.RunID
	values, err := OperatorValues(s.OperatorImage, c.Gateway, c.APIServerPort)
	if err != nil {
		return nil, err
	}
	s.ValuesFile = filepath.Join(s.Dir, "values.yaml")
	if err := os.WriteFile(s.ValuesFile, []byte(values), 0o644); err != nil {
		return nil, err
	}
	if err := step("chart installed ("+s.OperatorImage+") and its Deployment available", func() error {
		if err := s.createNamespace(ctx, s.ReleaseNS, nil); err != nil {
			return err
		}
		if _, err := s.Helm.Run(ctx, "install", ReleaseName, s.Chart,
			"--namespace", s.ReleaseNS, "-f", s.ValuesFile); err != nil {
			return err
		}
		return s.waitOperatorRolledOut(ctx, 3*time.Minute)
	}); err != nil {
		return nil, err
	}
	if err := step("CloudSqlInstance "+s.Instance+" Ready", func() error {
		objs, err := Render("instance.yaml", s.vars(""))
		if err != nil {
			return err
		}
		if _, err := s.Apply.Apply(ctx, objs[0]); err != nil {
			return err
		}
		return Poll(ctx, time.Minute, 250*time.Millisecond, func() (bool, string, error) {
			got, err := s.Apply.Get(ctx, objs[0])
			if err != nil {
				return false, "", err
			}
			st := ConditionStatus(got, "Ready")
			return st == "True", "Ready=" + st, nil
		})
	}); err != nil {
		return nil, err
	}
	return s, nil
}

func randomID() string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return fmt.Sprintf("%x", b)
}

func (s *Suite) vars(ns string) Vars {
	return Vars{
		Namespace: ns, Instance: s.Instance, ConnectionName: s.Google.Instance.ConnectionName(),
		ProxyImage: ProxyFixtureImage, GormImage: GormAppImage, ConnectorImage: ConnectorFixtureImage,
	}
}

// nodeReady fails unless the node is registered and Ready: the test never skips.
func (s *Suite) nodeReady(ctx context.Context) error {
	n, err := s.Cluster.Kube.CoreV1().Nodes().Get(ctx, NodeName, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("node %s: %v: run make node-up", NodeName, err)
	}
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			if c.Status != corev1.ConditionTrue {
				return fmt.Errorf("node %s is not Ready (%s: %s): see the kubelet log under %s/logs", NodeName, c.Reason, c.Message, s.Cluster.Dir)
			}
			return nil
		}
	}
	return fmt.Errorf("node %s has no Ready condition yet", NodeName)
}

// removeEarlierRuns uninstalls releases and deletes namespaces and instances that
// earlier runs left (a failed or interrupted run keeps them for inspection).
func (s *Suite) removeEarlierRuns(ctx context.Context) error {
	releases, err := s.Helm.Releases(ctx)
	if err != nil {
		return err
	}
	for _, r := range releases {
		if strings.HasPrefix(r.Namespace, "e2e-operator-") {
			if _, err := s.Helm.Run(ctx, "uninstall", r.Name, "--namespace", r.Namespace, "--wait", "--timeout", "2m"); err != nil {
				return err
			}
		}
	}
	sel := metav1.ListOptions{LabelSelector: NodeTestLabel + "=true"}
	nss, err := s.Cluster.Kube.CoreV1().Namespaces().List(ctx, sel)
	if err != nil {
		return err
	}
	for _, ns := range nss.Items {
		if err := IgnoreNotFound(s.Cluster.Kube.CoreV1().Namespaces().Delete(ctx, ns.Name, metav1.DeleteOptions{})); err != nil {
			return err
		}
	}
	gvr, err := s.Apply.Resource(instanceGVK)
	if err != nil {
		return nil // no CRD yet: no instance either
	}
	return IgnoreNotFound(s.Cluster.Dynamic.Resource(gvr).DeleteCollection(ctx, metav1.DeleteOptions{}, sel))
}

func (s *Suite) createNamespace(ctx context.Context, name string, labels map[string]string) error {
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{NodeTestLabel: "true"}}}
	for k, v := range labels {
		ns.Labels[k] = v
	}
	if _, err := s.Cluster.Kube.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
		return err
	}
	s.mu.Lock()
	s.namespaces = append(s.namespaces, name)
	s.mu.Unlock()
	return nil
}

// Namespace creates the scenario's own namespace, e2e-<base>-<run id>.
func (s *Suite) Namespace(t *testing.T, base string, labels map[string]string) string {
	t.Helper()
	name := "e2e-" + base + "-" + s.RunID
	if err := s.createNamespace(context.Background(), name, labels); err != nil {
		t.Fatalf("creating namespace %s: %v", name, err)
	}
	return name
}

// Database creates the scenario's own database and user.
func (s *Suite) Database(t *testing.T, v *Vars, base string) {
	t.Helper()
	v.DB, v.User = base, base+"-app"
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.Google.CreateDatabase(ctx, v.DB, v.User); err != nil {
		t.Fatalf("creating database %s: %v", v.DB, err)
	}
}

// teardown removes what the run made unless E2E_NODE_KEEP is set (then it says
// what is left), and stops the fixtures.
func (s *Suite) teardown() {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if os.Getenv("E2E_NODE_KEEP") != "" {
		fmt.Printf("E2E_NODE_KEEP: left release %s in %s, namespaces %v; the fixtures stop now, so the pods' database connections will fail\n",
			ReleaseName, s.ReleaseNS, s.namespaces)
	} else {
		if _, err := s.Helm.Run(ctx, "uninstall", ReleaseName, "--namespace", s.ReleaseNS, "--wait", "--timeout", "2m"); err != nil {
			fmt.Printf("teardown: %v\n", err)
		}
		for _, ns := range s.namespaces {
			_ = s.Cluster.Kube.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{})
		}
		if gvr, err := s.Apply.Resource(instanceGVK); err == nil {
			_ = s.Cluster.Dynamic.Resource(gvr).Delete(ctx, s.Instance, metav1.DeleteOptions{})
		}
	}
	fmt.Printf("Admin API fixture: %d calls; server-side TLS fixture: %d verified connections by client: %s\n",
		len(s.Google.Admin.Requests()), s.Google.TLS.Accepted(), s.Google.TLSPeers())
	s.Google.Stop()
	_ = os.RemoveAll(s.Dir)
}

func stop(format string, args ...any) error { return Stop(fmt.Errorf(format, args...)) }

// waitFor polls cond for up to timeout; on failure it fails the test with what was
// waited for, the last state, and the report of the namespace's pods (states,
// logs) and events.
func (s *Suite) waitFor(t *testing.T, what string, timeout time.Duration, ns, selector string, cond func() (bool, string, error)) {
	t.Helper()
	start := time.Now()
	if err := Poll(context.Background(), timeout, 250*time.Millisecond, cond); err != nil {
		t.Fatalf("waiting for %s: %v\n%s", what, err, s.Cluster.Report(context.Background(), ns, selector))
	}
	t.Logf("%s (%.1fs)", what, time.Since(start).Seconds())
}

// ApplyScenario applies testdata/<file>: its bindings first, each waited for
// until the operator has reconciled it (so the webhook knows it before any pod
// is created), then the rest. It returns the applied objects by kind/name.
func (s *Suite) ApplyScenario(t *testing.T, file string, v Vars) map[string]*unstructured.Unstructured {
	t.Helper()
	ctx := context.Background()
	objs, err := Render(file, v)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*unstructured.Unstructured{}
	for _, phase := range []bool{true, false} {
		for _, o := range objs {
			if (o.GetKind() == "CloudSqlBinding") != phase || o.GetName() == "" {
				continue
			}
			applied, err := s.Apply.Apply(ctx, o)
			if err != nil {
				t.Fatal(err)
			}
			out[o.GetKind()+"/"+o.GetName()] = applied
			if phase {
				s.waitBindingReconciled(t, applied)
			}
		}
	}
	return out
}

func (s *Suite) waitBindingReconciled(t *testing.T, b *unstructured.Unstructured) {
	t.Helper()
	what := fmt.Sprintf("CloudSqlBinding %s/%s reconciled (instance resolved, pool granted)", b.GetNamespace(), b.GetName())
	s.waitFor(t, what, time.Minute, b.GetNamespace(), "", func() (bool, string, error) {
		got, err := s.Apply.Get(context.Background(), b)
		if err != nil {
			return false, "", err
		}
		observed, _, _ := unstructured.NestedInt64(got.Object, "status", "observedGeneration")
		granted, _, _ := unstructured.NestedInt64(got.Object, "status", "pool", "grantedPerPod")
		resolved := ConditionStatus(got, "InstanceResolved")
		state := fmt.Sprintf("generation %d observed %d, InstanceResolved=%s, grantedPerPod=%d, conditions %s",
			got.GetGeneration(), observed, resolved, granted, conditionsString(got))
		return observed == got.GetGeneration() && resolved == "True" && granted > 0, state, nil
	})
}

// Granted reads a binding's status.pool.grantedPerPod.
func (s *Suite) Granted(t *testing.T, ns, name string) int64 {
	t.Helper()
	b := &unstructured.Unstructured{}
	b.SetGroupVersionKind(bindingGVK)
	b.SetNamespace(ns)
	b.SetName(name)
	got, err := s.Apply.Get(context.Background(), b)
	if err != nil {
		t.Fatal(err)
	}
	g, _, _ := unstructured.NestedInt64(got.Object, "status", "pool", "grantedPerPod")
	return g
}

func conditionsString(o *unstructured.Unstructured) string {
	conds, _, _ := unstructured.NestedSlice(o.Object, "status", "conditions")
	var parts []string
	for _, c := range conds {
		m, _ := c.(map[string]any)
		parts = append(parts, fmt.Sprintf("%v=%v(%v)", m["type"], m["status"], m["reason"]))
	}
	return "[" + strings.Join(parts, " ") + "]"
}

// waitOperatorRolledOut waits until the operator's Deployment has rolled out: all
// replicas updated, Ready and available, no old pod left.
func (s *Suite) waitOperatorRolledOut(ctx context.Context, timeout time.Duration) error {
	err := Poll(ctx, timeout, 250*time.Millisecond, func() (bool, string, error) {
		d, err := s.Cluster.Kube.AppsV1().Deployments(s.ReleaseNS).Get(ctx, ReleaseName, metav1.GetOptions{})
		if err != nil {
			return false, "", err
		}
		st := d.Status
		want := *d.Spec.Replicas
		state := fmt.Sprintf("generation %d observed %d, replicas %d updated %d ready %d available %d (want %d)",
			d.Generation, st.ObservedGeneration, st.Replicas, st.UpdatedReplicas, st.ReadyReplicas, st.AvailableReplicas, want)
		return st.ObservedGeneration == d.Generation && st.UpdatedReplicas == want && st.Replicas == want &&
			st.ReadyReplicas == want && st.AvailableReplicas == want, state, nil
	})
	if err != nil {
		return fmt.Errorf("operator Deployment %s/%s: %v\n%s", s.ReleaseNS, ReleaseName, err, s.Cluster.Report(ctx, s.ReleaseNS, ""))
	}
	return nil
}

// OperatorPods lists the operator's pods that are not being deleted.
func (s *Suite) OperatorPods(ctx context.Context) ([]corev1.Pod, error) {
	list, err := s.Cluster.Kube.CoreV1().Pods(s.ReleaseNS).List(ctx, metav1.ListOptions{LabelSelector: OperatorLabel})
	if err != nil {
		return nil, err
	}
	var out []corev1.Pod
	for _, p := range list.Items {
		if p.DeletionTimestamp == nil {
			out = append(out, p)
		}
	}
	return out, nil
}
