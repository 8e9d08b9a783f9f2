package node

// Talking to the cluster: applying the scenarios' YAML, reading pod logs, and the
// report printed when a wait times out (pods, container states, logs, events).

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/template"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/restmapper"
)

// FieldManager owns what the test applies.
const FieldManager = "e2e-node"

// The operator's kinds.
var (
	instanceGVK = schema.GroupVersionKind{Group: "cloudsql.dev", Version: "v1alpha1", Kind: "CloudSqlInstance"}
	bindingGVK  = schema.GroupVersionKind{Group: "cloudsql.dev", Version: "v1alpha1", Kind: "CloudSqlBinding"}
)

// Render executes the template testdata/<name> with data and splits the result
// into objects, in file order.
func Render(name string, data any) ([]*unstructured.Unstructured, error) {
	tmpl, err := template.New(name).Option("missingkey=error").ParseFiles(filepath.Join("testdata", name))
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	if err := tmpl.Execute(&buf, data); err != nil {
		return nil, err
	}
	dec := utilyaml.NewYAMLOrJSONDecoder(&buf, 4096)
	var objs []*unstructured.Unstructured
	for {
		var m map[string]any
		if err := dec.Decode(&m); errors.Is(err, io.EOF) {
			return objs, nil
		} else if err != nil {
			return nil, fmt.Errorf("testdata/%s: %w", name, err)
		}
		if len(m) > 0 {
			objs = append(objs, &unstructured.Unstructured{Object: m})
		}
	}
}

// Applier server-side applies unstructured objects of any kind.
type Applier struct {
	c      *Cluster
	mapper *restmapper.DeferredDiscoveryRESTMapper
}

// NewApplier maps kinds to resources through the API server's discovery
// (re-read when a kind is not found: the CRDs arrive with the chart).
func NewApplier(c *Cluster) (*Applier, error) {
	dc, err := discovery.NewDiscoveryClientForConfig(c.Config)
	if err != nil {
		return nil, err
	}
	return &Applier{c: c, mapper: restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))}, nil
}

// Resource returns the resource of a kind.
func (a *Applier) Resource(gvk schema.GroupVersionKind) (schema.GroupVersionResource, error) {
	m, err := a.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if meta.IsNoMatchError(err) {
		a.mapper.Reset()
		m, err = a.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	}
	if err != nil {
		return schema.GroupVersionResource{}, err
	}
	return m.Resource, nil
}

// Apply server-side applies obj and returns what the server stored (for a Pod:
// after admission, so with what the webhook injected).
func (a *Applier) Apply(ctx context.Context, obj *unstructured.Unstructured) (*unstructured.Unstructured, error) {
	gvr, err := a.Resource(obj.GroupVersionKind())
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", obj.GetKind(), obj.GetName(), err)
	}
	var ri = a.c.Dynamic.Resource(gvr)
	out, err := func() (*unstructured.Unstructured, error) {
		opts := metav1.ApplyOptions{FieldManager: FieldManager, Force: true}
		if ns := obj.GetNamespace(); ns != "" {
			return ri.Namespace(ns).Apply(ctx, obj.GetName(), obj, opts)
		}
		return ri.Apply(ctx, obj.GetName(), obj, opts)
	}()
	if err != nil {
		return nil, fmt.Errorf("applying %s %s/%s: %w", obj.GetKind(), obj.GetNamespace(), obj.GetName(), err)
	}
	return out, nil
}

// Get reads an object of the same kind and name as obj.
func (a *Applier) Get(ctx context.Context, obj *unstructured.Unstructured) (*unstructured.Unstructured, error) {
	gvr, err := a.Resource(obj.GroupVersionKind())
	if err != nil {
		return nil, err
	}
	if ns := obj.GetNamespace(); ns != "" {
		return a.c.Dynamic.Resource(gvr).Namespace(ns).Get(ctx, obj.GetName(), metav1.GetOptions{})
	}
	return a.c.Dynamic.Resource(gvr).Get(ctx, obj.GetName(), metav1.GetOptions{})
}

// Logs returns the last lines of a container's log (all of it with tail 0):
// through the API server and the kubelet, or, when that fails, from the file the
// kubelet writes under the node's pod-logs directory.
func (c *Cluster) Logs(ctx context.Context, pod *corev1.Pod, container string, tail int64) (string, error) {
	opts := &corev1.PodLogOptions{Container: container}
	if tail > 0 {
		opts.TailLines = &tail
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	b, apiErr := c.Kube.CoreV1().Pods(pod.Namespace).GetLogs(pod.Name, opts).DoRaw(ctx)
	if apiErr == nil {
		return string(b), nil
	}
	// CRI log format: TIME STREAM P|F MESSAGE.
	files, _ := filepath.Glob(filepath.Join(c.Dir, "node", "pod-logs",
		fmt.Sprintf("%s_%s_%s", pod.Namespace, pod.Name, pod.UID), container, "*.log"))
	if len(files) == 0 {
		return "", fmt.Errorf("logs of %s/%s[%s]: %v (and no log file on the node)", pod.Namespace, pod.Name, container, apiErr)
	}
	sort.Strings(files)
	raw, err := os.ReadFile(files[len(files)-1])
	if err != nil {
		return "", err
	}
	var lines []string
	for _, l := range strings.Split(strings.TrimRight(string(raw), "\n"), "\n") {
		if f := strings.SplitN(l, " ", 4); len(f) == 4 {
			lines = append(lines, f[3])
		}
	}
	if tail > 0 && int64(len(lines)) > tail {
		lines = lines[int64(len(lines))-tail:]
	}
	return strings.Join(lines, "\n") + "\n", nil
}

// Report describes the pods of a namespace (selected by labelSelector, all when
// empty) with their container states and the end of their logs, and the
// namespace's recent events: what a failure message needs.
func (c *Cluster) Report(ctx context.Context, ns, labelSelector string) string {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	var b strings.Builder
	pods, err := c.Kube.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: labelSelector})
	if err != nil {
		fmt.Fprintf(&b, "  (listing pods in %s: %v)\n", ns, err)
	} else {
		if len(pods.Items) == 0 {
			fmt.Fprintf(&b, "  no pods in %s (selector %q)\n", ns, labelSelector)
		}
		for i := range pods.Items {
			b.WriteString(c.podReport(ctx, &pods.Items[i]))
		}
	}
	b.WriteString(c.eventsReport(ctx, ns, 30))
	return b.String()
}

func (c *Cluster) podReport(ctx context.Context, p *corev1.Pod) string {
	var b strings.Builder
	fmt.Fprintf(&b, "  pod %s/%s: phase %s, IP %q", p.Namespace, p.Name, p.Status.Phase, p.Status.PodIP)
	if p.DeletionTimestamp != nil {
		b.WriteString(", terminating")
	}
	b.WriteString("\n")
	for _, cond := range p.Status.Conditions {
		if cond.Status != corev1.ConditionTrue {
			fmt.Fprintf(&b, "    condition %s=%s %s %s\n", cond.Type, cond.Status, cond.Reason, cond.Message)
		}
	}
	statuses := append(append([]corev1.ContainerStatus(nil), p.Status.InitContainerStatuses...), p.Status.ContainerStatuses...)
	for _, s := range statuses {
		fmt.Fprintf(&b, "    container %s: %s, ready=%t, restarts=%d\n", s.Name, stateString(s.State), s.Ready, s.RestartCount)
		if s.LastTerminationState.Terminated != nil {
			fmt.Fprintf(&b, "      last: %s\n", stateString(s.LastTerminationState))
		}
		if s.State.Waiting != nil && s.State.Waiting.Reason == "PodInitializing" {
			continue
		}
		logs, err := c.Logs(ctx, p, s.Name, 15)
		if err != nil {
			fmt.Fprintf(&b, "      (logs: %v)\n", err)
			continue
		}
		for _, l := range strings.Split(strings.TrimRight(logs, "\n"), "\n") {
			if l != "" {
				fmt.Fprintf(&b, "      | %s\n", l)
			}
		}
	}
	return b.String()
}

func stateString(s corev1.ContainerState) string {
	switch {
	case s.Running != nil:
		return "running since " + s.Running.StartedAt.UTC().Format(time.RFC3339)
	case s.Terminated != nil:
		t := s.Terminated
		return fmt.Sprintf("terminated exit %d (%s) %s", t.ExitCode, t.Reason, strings.TrimSpace(t.Message))
	case s.Waiting != nil:
		return fmt.Sprintf("waiting (%s) %s", s.Waiting.Reason, s.Waiting.Message)
	}
	return "no state"
}

func (c *Cluster) eventsReport(ctx context.Context, ns string, last int) string {
	evs, err := c.Kube.CoreV1().Events(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Sprintf("  (events in %s: %v)\n", ns, err)
	}
	items := evs.Items
	when := func(e corev1.Event) time.Time {
		switch {
		case !e.LastTimestamp.IsZero():
			return e.LastTimestamp.Time
		case !e.EventTime.IsZero():
			return e.EventTime.Time
		}
		return e.CreationTimestamp.Time
	}
	sort.SliceStable(items, func(i, j int) bool { return when(items[i]).Before(when(items[j])) })
	if len(items) > last {
		items = items[len(items)-last:]
	}
	var b strings.Builder
	fmt.Fprintf(&b, "  events in %s (last %d):\n", ns, len(items))
	for _, e := range items {
		count := ""
		if e.Count > 1 {
			count = fmt.Sprintf(" (x%d)", e.Count)
		}
		fmt.Fprintf(&b, "    %s %s %s %s/%s: %s%s\n", when(e).UTC().Format("15:04:05"), e.Type, e.Reason,
			e.InvolvedObject.Kind, e.InvolvedObject.Name, strings.TrimSpace(e.Message), count)
	}
	return b.String()
}

// IgnoreNotFound turns a NotFound error into nil.
func IgnoreNotFound(err error) error {
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}
