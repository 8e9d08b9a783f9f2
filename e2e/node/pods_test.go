package node

// Reading pods: finding the one a scenario is about, its containers, env and
// logs, and the operator's Lease and metrics.

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
)

// ProxyContainer is the name of the container the operator injects.
const ProxyContainer = "cloud-sql-proxy"

// waitPod waits for a pod of ns matching selector (not being deleted) for which
// ok holds, and returns it.
func (s *Suite) waitPod(t *testing.T, ns, selector, what string, timeout time.Duration, ok func(*corev1.Pod) (bool, string)) *corev1.Pod {
	t.Helper()
	ctx := context.Background()
	var found *corev1.Pod
	s.waitFor(t, what, timeout, ns, selector, func() (bool, string, error) {
		list, err := s.Cluster.Kube.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
		if err != nil {
			return false, "", err
		}
		var states []string
		for i := range list.Items {
			p := &list.Items[i]
			if p.DeletionTimestamp != nil {
				continue
			}
			// The scenarios tell a pod's traffic at the fixtures by its IP: the
			// kubelet may report the IP after the app has already logged.
			if p.Status.PodIP == "" {
				states = append(states, p.Name+": no pod IP reported yet")
				continue
			}
			done, state := ok(p)
			if done {
				found = p
				return true, "", nil
			}
			states = append(states, p.Name+": "+state)
		}
		if len(states) == 0 {
			return false, "no pod yet", nil
		}
		return false, strings.Join(states, "; "), nil
	})
	return found
}

// initContainer returns the init container named name, or nil.
func initContainer(p *corev1.Pod, name string) *corev1.Container {
	for i := range p.Spec.InitContainers {
		if p.Spec.InitContainers[i].Name == name {
			return &p.Spec.InitContainers[i]
		}
	}
	return nil
}

// appContainer returns the (regular) container named name, or nil.
func appContainer(p *corev1.Pod, name string) *corev1.Container {
	for i := range p.Spec.Containers {
		if p.Spec.Containers[i].Name == name {
			return &p.Spec.Containers[i]
		}
	}
	return nil
}

// containerStatus returns the status of the container (init or regular) named name.
func containerStatus(p *corev1.Pod, name string) *corev1.ContainerStatus {
	for _, list := range [][]corev1.ContainerStatus{p.Status.InitContainerStatuses, p.Status.ContainerStatuses} {
		for i := range list {
			if list[i].Name == name {
				return &list[i]
			}
		}
	}
	return nil
}

func envValue(c *corev1.Container, name string) (string, bool) {
	for _, e := range c.Env {
		if e.Name == name {
			return e.Value, true
		}
	}
	return "", false
}

func hasArg(c *corev1.Container, arg string) bool {
	for _, a := range c.Args {
		if a == arg {
			return true
		}
	}
	return false
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// injectedWithProxy says whether the operator put its proxy into the pod, as a
// native sidecar or as a regular container.
func injectedWithProxy(p *corev1.Pod) bool {
	return initContainer(p, ProxyContainer) != nil || appContainer(p, ProxyContainer) != nil
}

// logsHave waits for nothing: it reads the container's whole log and says whether
// it holds want, with the log as the state for a timeout message.
func (s *Suite) logsHave(p *corev1.Pod, container, want string) (bool, string) {
	logs, err := s.Cluster.Logs(context.Background(), p, container, 0)
	if err != nil {
		return false, err.Error()
	}
	if strings.Contains(logs, want) {
		return true, ""
	}
	return false, fmt.Sprintf("phase %s, %s log has no %q yet (last: %q)", p.Status.Phase, container, want, lastLine(logs))
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return lines[len(lines)-1]
}

// line returns the first log line holding prefix.
func line(logs, prefix string) string {
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, prefix) {
			return strings.TrimSpace(l)
		}
	}
	return ""
}

func (s *Suite) logs(t *testing.T, p *corev1.Pod, container string) string {
	t.Helper()
	logs, err := s.Cluster.Logs(context.Background(), p, container, 0)
	if err != nil {
		t.Fatal(err)
	}
	return logs
}

// toPod converts what the server returned for an applied Pod.
func toPod(t *testing.T, u *unstructured.Unstructured) *corev1.Pod {
	t.Helper()
	var p corev1.Pod
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &p); err != nil {
		t.Fatal(err)
	}
	return &p
}

// Lease reads the operator's Lease (the chart's leaderElection.leaseName).
func (s *Suite) Lease(ctx context.Context) (*coordinationv1.Lease, error) {
	return s.Cluster.Kube.CoordinationV1().Leases(s.ReleaseNS).Get(ctx, ReleaseName, metav1.GetOptions{})
}

func holder(l *coordinationv1.Lease) string {
	if l == nil || l.Spec.HolderIdentity == nil {
		return ""
	}
	return *l.Spec.HolderIdentity
}

func renewed(l *coordinationv1.Lease) time.Time {
	if l == nil || l.Spec.RenewTime == nil {
		return time.Time{}
	}
	return l.Spec.RenewTime.Time
}

// AdmissionCounter reads cloudsql_binder_admission_requests_total{webhook,outcome}
// from an operator pod's /metrics (the metrics port, reached at the pod's IP).
func AdmissionCounter(ctx context.Context, podIP, webhook, outcome string) (float64, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	url := "http://" + net.JoinHostPort(podIP, "8080") + "/metrics"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if strings.HasPrefix(l, "cloudsql_binder_admission_requests_total{") &&
			strings.Contains(l, `webhook="`+webhook+`"`) && strings.Contains(l, `outcome="`+outcome+`"`) {
			f := strings.Fields(l)
			return strconv.ParseFloat(f[len(f)-1], 64)
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("%s has no cloudsql_binder_admission_requests_total{webhook=%q,outcome=%q}", url, webhook, outcome)
}
