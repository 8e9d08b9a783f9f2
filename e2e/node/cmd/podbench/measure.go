package main

// The measurement, from outside the Pods: the client's clock before each create
// call, the CRI timestamps of the containers' log lines, and the kubelet's stats
// summary once every Pod is up and idle.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	node "github.com/cloudsql-binder/e2e/node"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
)

// proxyReadyLine is what cloud-sql-proxy 2.x logs once it listens.
const proxyReadyLine = "ready for new connections"

// measure creates the Pods one at a time, modes interleaved (the order flips each
// round, so neither mode always goes first), then reads the memory of all of them.
func (b *bench) measure(ctx context.Context, c config, r *Result) error {
	for i := range c.pods {
		order := b.modes
		if i%2 == 1 {
			order = []*Mode{b.modes[1], b.modes[0]}
		}
		for _, m := range order {
			s := b.sample(ctx, m, i, c.podTimeout)
			r.Samples = append(r.Samples, s)
			if err := ctx.Err(); err != nil {
				return fmt.Errorf("interrupted at %s Pod %d: %w", m.Name, i, err)
			}
			if s.Error != "" {
				fmt.Printf("podbench: %-9s %s/%s: %s\n", m.Name, m.Namespace, s.Pod, s.Error)
				continue
			}
			proxy := ""
			if s.ProxyReadySeconds != nil {
				proxy = fmt.Sprintf(", proxy ready after %.2fs", *s.ProxyReadySeconds)
			}
			fmt.Printf("podbench: %-9s %s/%s: first query %.2fs after the create call%s (create call %.0fms)\n",
				m.Name, m.Namespace, s.Pod, s.FirstQuerySeconds, proxy, s.CreateCallMS)
		}
	}

	fmt.Printf("podbench: every Pod up; idle %s before reading the kubelet's stats summary\n", c.settle)
	idleFrom := time.Now().Add(c.settle)
	select {
	case <-ctx.Done():
		return fmt.Errorf("interrupted while settling: %w", ctx.Err())
	case <-time.After(c.settle):
	}
	read, err := b.readMemory(ctx, r.Samples, idleFrom)
	if err != nil {
		r.NotMeasured = append(r.NotMeasured, "memory: "+err.Error())
	}
	r.MemoryReadAt = read
	if err := b.countConnections(ctx); err != nil {
		r.NotMeasured = append(r.NotMeasured, "open connections: "+err.Error())
	}
	return ctx.Err()
}

// countConnections asks PostgreSQL how many connections each mode's database has
// open: with every Pod idle and holding its pool, at least one per Pod.
func (b *bench) countConnections(ctx context.Context) error {
	conn, err := b.google.Postgres.Superuser(ctx, "postgres")
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	for _, m := range b.modes {
		if err := conn.QueryRow(ctx, "select count(*) from pg_stat_activity where datname = $1", m.Database).Scan(&m.OpenConnections); err != nil {
			return fmt.Errorf("pg_stat_activity for %s: %w", m.Database, err)
		}
	}
	return nil
}

// sample creates one Pod and waits for its app's first-query line.
func (b *bench) sample(ctx context.Context, m *Mode, i int, timeout time.Duration) Sample {
	s := Sample{Mode: m.Name, Index: i, Pod: fmt.Sprintf("pod-%02d", i)}
	fail := func(format string, args ...any) Sample {
		s.Error = fmt.Sprintf(format, args...)
		return s
	}
	pod, err := b.pod(m, s.Pod)
	if err != nil {
		return fail("%v", err)
	}
	pods := b.cluster.Kube.CoreV1().Pods(m.Namespace)

	t0 := time.Now()
	created, err := pods.Create(ctx, pod, metav1.CreateOptions{})
	s.Created = t0.UTC()
	s.CreateCallMS = float64(time.Since(t0).Microseconds()) / 1000
	if err != nil {
		return fail("create: %v", err)
	}
	if !injected(m, created) {
		return fail("not injected by the webhook: init containers %d, the app's env %d variables", len(created.Spec.InitContainers), len(created.Spec.Containers[0].Env))
	}

	var line string
	var at time.Time
	err = node.Poll(ctx, timeout, 200*time.Millisecond, func() (bool, string, error) {
		p, err := pods.Get(ctx, s.Pod, metav1.GetOptions{})
		if err != nil {
			return false, "", err
		}
		st := containerStatus(p, appContainer)
		switch {
		case st == nil || (st.State.Running == nil && st.State.Terminated == nil):
			return false, "app not started: " + podState(p), nil
		case st.RestartCount > 0 || st.State.Terminated != nil:
			logs, _ := b.cluster.Logs(ctx, p, appContainer, 5)
			return false, "", node.Stop(fmt.Errorf("the app exited before its first query (restarts %d): %s", st.RestartCount, strings.TrimSpace(logs)))
		}
		at, line, err = b.timestampedLine(ctx, m.Namespace, s.Pod, appContainer, m.FirstQueryLine)
		if err != nil {
			return false, "", err
		}
		return line != "", "app running, no first-query line yet", nil
	})
	if err != nil {
		return fail("no first query within %s: %v\n%s", timeout, err, b.cluster.Report(context.WithoutCancel(ctx), m.Namespace, ""))
	}
	s.FirstQuery = at
	s.FirstQuerySeconds = at.Sub(t0).Seconds()
	s.AppLine = line
	s.AppFirstQueryMS = appMillis(line)

	if m.Binding == "Proxy" {
		if ready, _, err := b.timestampedLine(ctx, m.Namespace, s.Pod, proxyContainer, proxyReadyLine); err == nil && !ready.IsZero() {
			secs := ready.Sub(t0).Seconds()
			s.ProxyReadySeconds = &secs
		}
	}
	return s
}

// timestampedLine finds the first log line of a container that contains want, and
// its CRI timestamp (the kubelet's logs with timestamps=true: the time containerd
// read the line from the container's stdout). A zero time: not logged yet.
func (b *bench) timestampedLine(ctx context.Context, ns, pod, container, want string) (time.Time, string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	raw, err := b.cluster.Kube.CoreV1().Pods(ns).GetLogs(pod, &corev1.PodLogOptions{Container: container, Timestamps: true}).DoRaw(ctx)
	if err != nil {
		return time.Time{}, "", err
	}
	return findLine(string(raw), want)
}

// findLine returns the first "TIMESTAMP MESSAGE" line whose message contains want.
func findLine(logs, want string) (time.Time, string, error) {
	sc := bufio.NewScanner(strings.NewReader(logs))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		ts, msg, ok := strings.Cut(sc.Text(), " ")
		if !ok || !strings.Contains(msg, want) {
			continue
		}
		at, err := time.Parse(time.RFC3339Nano, ts)
		if err != nil {
			return time.Time{}, "", fmt.Errorf("log line %q: no CRI timestamp: %w", sc.Text(), err)
		}
		return at.UTC(), msg, nil
	}
	return time.Time{}, "", sc.Err()
}

var appMillisRE = regexp.MustCompile(` in (\d+)ms`)

// appMillis reads "in Nms" from an app's first-query line.
func appMillis(line string) *float64 {
	m := appMillisRE.FindStringSubmatch(line)
	if m == nil {
		return nil
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		return nil
	}
	return &v
}

// The kubelet's /stats/summary, only what is read here (the full type is
// k8s.io/kubelet/pkg/apis/stats/v1alpha1).
type statsSummary struct {
	Pods []struct {
		PodRef struct {
			Name      string `json:"name"`
			Namespace string `json:"namespace"`
		} `json:"podRef"`
		Memory     *memoryStats `json:"memory"`
		Containers []struct {
			Name   string       `json:"name"`
			Memory *memoryStats `json:"memory"`
		} `json:"containers"`
	} `json:"pods"`
}

type memoryStats struct {
	Time            time.Time `json:"time"`
	WorkingSetBytes *uint64   `json:"workingSetBytes"`
	RSSBytes        *uint64   `json:"rssBytes"`
	UsageBytes      *uint64   `json:"usageBytes"`
}

// readMemory reads the kubelet's stats summary (through the API server's node
// proxy) until every measured Pod has working-set figures for itself and its
// containers taken after idleFrom, and writes them into the samples.
func (b *bench) readMemory(ctx context.Context, samples []Sample, idleFrom time.Time) (time.Time, error) {
	path := "/api/v1/nodes/" + node.NodeName + "/proxy/stats/summary"
	var missing []string
	var readAt time.Time
	err := node.Poll(ctx, 2*time.Minute, 200*time.Millisecond, func() (bool, string, error) {
		raw, err := b.cluster.Kube.CoreV1().RESTClient().Get().AbsPath(path).DoRaw(ctx)
		if err != nil {
			return false, "", err
		}
		readAt = time.Now().UTC()
		var sum statsSummary
		if err := json.Unmarshal(raw, &sum); err != nil {
			return false, "", node.Stop(fmt.Errorf("%s: %w", path, err))
		}
		byPod := map[string]*PodMemory{}
		for _, p := range sum.Pods {
			if p.Memory == nil || p.Memory.WorkingSetBytes == nil || p.Memory.Time.Before(idleFrom) {
				continue
			}
			pm := &PodMemory{At: p.Memory.Time.UTC(), WorkingSetBytes: *p.Memory.WorkingSetBytes, RSSBytes: deref(p.Memory.RSSBytes),
				Containers: map[string]ContainerMemory{}}
			for _, c := range p.Containers {
				if c.Memory != nil && c.Memory.WorkingSetBytes != nil {
					pm.Containers[c.Name] = ContainerMemory{WorkingSetBytes: *c.Memory.WorkingSetBytes, RSSBytes: deref(c.Memory.RSSBytes)}
				}
			}
			byPod[p.PodRef.Namespace+"/"+p.PodRef.Name] = pm
		}
		missing = missing[:0]
		for i := range samples {
			s := &samples[i]
			if s.Error != "" {
				continue
			}
			ns := b.modeByName(s.Mode).Namespace
			pm := byPod[ns+"/"+s.Pod]
			want := []string{appContainer}
			if s.Mode == "proxy" {
				want = append(want, proxyContainer)
			}
			if pm == nil {
				missing = append(missing, ns+"/"+s.Pod)
				continue
			}
			for _, c := range want {
				if _, ok := pm.Containers[c]; !ok {
					missing = append(missing, ns+"/"+s.Pod+"["+c+"]")
				}
			}
			s.Memory = pm
		}
		return len(missing) == 0, fmt.Sprintf("no idle figures yet for %d: %s", len(missing), strings.Join(first(missing, 5), ", ")), nil
	})
	if err != nil {
		return readAt, fmt.Errorf("the stats summary: %w", err)
	}
	return readAt, nil
}

func (b *bench) modeByName(name string) *Mode {
	for _, m := range b.modes {
		if m.Name == name {
			return m
		}
	}
	return &Mode{}
}

func first(s []string, n int) []string {
	if len(s) > n {
		return append(s[:n:n], fmt.Sprintf("and %d more", len(s)-n))
	}
	return s
}

func deref(p *uint64) uint64 {
	if p == nil {
		return 0
	}
	return *p
}

func containerStatus(p *corev1.Pod, name string) *corev1.ContainerStatus {
	for _, list := range [][]corev1.ContainerStatus{p.Status.ContainerStatuses, p.Status.InitContainerStatuses} {
		for i := range list {
			if list[i].Name == name {
				return &list[i]
			}
		}
	}
	return nil
}

func podState(p *corev1.Pod) string {
	parts := []string{"phase " + string(p.Status.Phase)}
	for _, c := range p.Status.Conditions {
		if c.Status != corev1.ConditionTrue && c.Reason != "" {
			parts = append(parts, fmt.Sprintf("%s=%s (%s)", c.Type, c.Status, c.Reason))
		}
	}
	return strings.Join(parts, ", ")
}

func fromUnstructured(u *unstructured.Unstructured, into any) error {
	return runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, into)
}
