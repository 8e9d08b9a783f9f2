package main

// The results: every sample and the summary as JSON, and the markdown table of
// bench/README.md, regenerated from that JSON between its markers.

import (
	"fmt"
	"math"
	"os"
	"slices"
	"strings"
	"time"
)

// The markers around the generated section of bench/README.md.
const (
	readmeBegin = "<!-- bench:pods:begin -->"
	readmeEnd   = "<!-- bench:pods:end -->"
)

// Result is the JSON file: what was run where, every sample, the summary.
type Result struct {
	Bench           string    `json:"bench"`
	Started         time.Time `json:"started"`
	Finished        time.Time `json:"finished"`
	DurationSeconds float64   `json:"duration_seconds"`
	// False when the run stopped early (an interruption): the README is then left alone.
	Complete bool     `json:"complete"`
	Command  string   `json:"command"`
	Machine  Machine  `json:"machine"`
	Settings Settings `json:"settings"`
	Modes    []*Mode  `json:"modes"`
	// When the kubelet's stats summary was read (every Pod up and idle).
	MemoryReadAt time.Time     `json:"memory_read_at"`
	Summary      []ModeSummary `json:"summary"`
	Samples      []Sample      `json:"samples"`
	NotMeasured  []string      `json:"not_measured,omitempty"`
}

// Machine is where the figures were taken.
type Machine struct {
	CPUs             int     `json:"cpus"`
	CPUModel         string  `json:"cpu_model"`
	MemoryGiB        float64 `json:"memory_gib"`
	Kernel           string  `json:"kernel"`
	Kubelet          string  `json:"kubelet"`
	ContainerRuntime string  `json:"container_runtime"`
	Cgroups          string  `json:"cgroups"`
	LoadAverageStart string  `json:"load_average_start"`
	LoadAverageEnd   string  `json:"load_average_end"`
}

// Settings are the run's parameters.
type Settings struct {
	PodsPerMode       int     `json:"pods_per_mode"`
	Order             string  `json:"order"`
	SettleSeconds     float64 `json:"settle_seconds"`
	PodTimeoutSeconds float64 `json:"pod_timeout_seconds"`
	OperatorImage     string  `json:"operator_image"`
	ProxyImage        string  `json:"proxy_image"`
}

// Sample is one Pod.
type Sample struct {
	Mode  string `json:"mode"`
	Index int    `json:"index"`
	Pod   string `json:"pod"`
	// t0: the client's clock just before the create call.
	Created time.Time `json:"created"`
	// The create call's round trip (admission, so the webhook, included).
	CreateCallMS float64 `json:"create_call_ms"`
	// t1: the CRI timestamp of the app's first-query line, and t1 - t0.
	FirstQuery        time.Time `json:"first_query,omitzero"`
	FirstQuerySeconds float64   `json:"first_query_seconds,omitempty"`
	// Proxy mode: the CRI timestamp of the proxy's "ready for new connections", less t0.
	ProxyReadySeconds *float64 `json:"proxy_ready_seconds,omitempty"`
	// The app's line, and the time it says its first query took ("in Nms": the
	// GORM app from opening its pool to the end of AutoMigrate, the connector app
	// from making its pool, so with its first dial, to the first row).
	AppLine         string     `json:"app_line,omitempty"`
	AppFirstQueryMS *float64   `json:"app_first_query_ms,omitempty"`
	Memory          *PodMemory `json:"memory,omitempty"`
	// Why this Pod has no figures (it is left out of the summary).
	Error string `json:"error,omitempty"`
}

// PodMemory is the kubelet's stats summary for one Pod.
type PodMemory struct {
	At              time.Time                  `json:"at"`
	WorkingSetBytes uint64                     `json:"working_set_bytes"`
	RSSBytes        uint64                     `json:"rss_bytes"`
	Containers      map[string]ContainerMemory `json:"containers"`
}

// ContainerMemory is one container's part of it.
type ContainerMemory struct {
	WorkingSetBytes uint64 `json:"working_set_bytes"`
	RSSBytes        uint64 `json:"rss_bytes"`
}

// Figure is a distribution over the Pods of one mode.
type Figure struct {
	N      int     `json:"n"`
	Median float64 `json:"median"`
	P90    float64 `json:"p90"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
}

// ModeSummary is what the table shows for one mode.
type ModeSummary struct {
	Mode              string  `json:"mode"`
	Pods              int     `json:"pods"`
	Failed            int     `json:"failed"`
	FirstQuerySeconds *Figure `json:"first_query_seconds"`
	ProxyReadySeconds *Figure `json:"proxy_ready_seconds,omitempty"`
	// Proxy mode: from the proxy's ready line to the app's first-query line (the
	// startup probe, the app container's start, the query).
	ProxyReadyToFirstQuerySeconds *Figure `json:"proxy_ready_to_first_query_seconds,omitempty"`
	CreateCallMS                  *Figure `json:"create_call_ms"`
	AppFirstQueryMS               *Figure `json:"app_first_query_ms"`
	PodWorkingSetMiB              *Figure `json:"pod_working_set_mib"`
	PodRSSMiB                     *Figure `json:"pod_rss_mib"`
	// By container name: "app", and "cloud-sql-proxy" in Proxy mode.
	ContainerWorkingSetMiB map[string]*Figure `json:"container_working_set_mib"`
	ContainerRSSMiB        map[string]*Figure `json:"container_rss_mib"`
	// The Pod's cgroup less its containers' (the sandbox and the Pod's own pages).
	PodOverheadMiB *Figure `json:"pod_overhead_mib"`
}

func summarize(modes []*Mode, samples []Sample) []ModeSummary {
	const mib = 1 << 20
	var out []ModeSummary
	for _, m := range modes {
		sum := ModeSummary{Mode: m.Name, ContainerWorkingSetMiB: map[string]*Figure{}, ContainerRSSMiB: map[string]*Figure{}}
		var first, proxy, proxyToFirst, create, appMS, podWS, podRSS, overhead []float64
		ws, rss := map[string][]float64{}, map[string][]float64{}
		for _, s := range samples {
			if s.Mode != m.Name {
				continue
			}
			sum.Pods++
			if s.Error != "" {
				sum.Failed++
				continue
			}
			first = append(first, s.FirstQuerySeconds)
			create = append(create, s.CreateCallMS)
			if s.ProxyReadySeconds != nil {
				proxy = append(proxy, *s.ProxyReadySeconds)
				proxyToFirst = append(proxyToFirst, s.FirstQuerySeconds-*s.ProxyReadySeconds)
			}
			if s.AppFirstQueryMS != nil {
				appMS = append(appMS, *s.AppFirstQueryMS)
			}
			if s.Memory == nil {
				continue
			}
			podWS = append(podWS, float64(s.Memory.WorkingSetBytes)/mib)
			podRSS = append(podRSS, float64(s.Memory.RSSBytes)/mib)
			var containers float64
			for name, c := range s.Memory.Containers {
				ws[name] = append(ws[name], float64(c.WorkingSetBytes)/mib)
				rss[name] = append(rss[name], float64(c.RSSBytes)/mib)
				containers += float64(c.WorkingSetBytes) / mib
			}
			overhead = append(overhead, float64(s.Memory.WorkingSetBytes)/mib-containers)
		}
		sum.FirstQuerySeconds, sum.ProxyReadySeconds, sum.CreateCallMS = figure(first), figure(proxy), figure(create)
		sum.AppFirstQueryMS, sum.ProxyReadyToFirstQuerySeconds = figure(appMS), figure(proxyToFirst)
		sum.PodWorkingSetMiB, sum.PodRSSMiB, sum.PodOverheadMiB = figure(podWS), figure(podRSS), figure(overhead)
		for name, v := range ws {
			sum.ContainerWorkingSetMiB[name] = figure(v)
			sum.ContainerRSSMiB[name] = figure(rss[name])
		}
		out = append(out, sum)
	}
	return out
}

// figure is the median (the mean of the middle two for an even count) and the
// nearest-rank 90th percentile, as bench/stats.rs takes them; nil without values.
func figure(values []float64) *Figure {
	if len(values) == 0 {
		return nil
	}
	v := slices.Clone(values)
	slices.Sort(v)
	n := len(v)
	median := v[n/2]
	if n%2 == 0 {
		median = (v[n/2-1] + v[n/2]) / 2
	}
	rank := int(math.Ceil(0.9 * float64(n)))
	return &Figure{N: n, Median: median, P90: v[max(rank, 1)-1], Min: v[0], Max: v[n-1]}
}

// markdown is the generated section of bench/README.md, from the results alone.
func markdown(r *Result, jsonPath string) string {
	var b strings.Builder
	m := r.Machine
	fmt.Fprintf(&b, "Measured %s by `make bench-pods` (`bench/pods.sh`, then `podbench -pods %d`; podbench took %.0f s, set-up included; the full command is in the JSON).\n",
		r.Started.Format(time.RFC3339), r.Settings.PodsPerMode, r.DurationSeconds)
	fmt.Fprintf(&b, "Machine: %d cores (%s), %.1f GiB, kernel %s; the node: kubelet %s, %s, %s; load average %s at the start, %s at the end.\n",
		m.CPUs, m.CPUModel, m.MemoryGiB, m.Kernel, m.Kubelet, m.ContainerRuntime, m.Cgroups, m.LoadAverageStart, m.LoadAverageEnd)
	fmt.Fprintf(&b, "%d Pods per mode, created one at a time, the modes interleaved; the operator image `%s`. Figures: median / p90 [min–max] over the Pods. JSON with every Pod: `%s`.\n\n",
		r.Settings.PodsPerMode, r.Settings.OperatorImage, jsonPath)

	byMode := map[string]ModeSummary{}
	for _, s := range r.Summary {
		byMode[s.Mode] = s
	}
	p, c := byMode["proxy"], byMode["connector"]
	b.WriteString("| | Proxy mode: GORM app + cloud-sql-proxy (native sidecar, Unix socket) | Connector mode: connector app (cloudsqlconn, pgxpool) |\n")
	b.WriteString("|---|---|---|\n")
	row := func(label, proxy, connector string) { fmt.Fprintf(&b, "| %s | %s | %s |\n", label, proxy, connector) }
	row("Pods measured (without figures)", fmt.Sprintf("%d (%d)", p.Pods-p.Failed, p.Failed), fmt.Sprintf("%d (%d)", c.Pods-c.Failed, c.Failed))
	row("**creation → first successful query (s)**", cell(p.FirstQuerySeconds, 2), cell(c.FirstQuerySeconds, 2))
	row("creation → the proxy ready (s)", cell(p.ProxyReadySeconds, 2), "no proxy")
	row("the proxy ready → first successful query (s)", cell(p.ProxyReadyToFirstQuerySeconds, 2), "no proxy")
	row("the first query as the app timed it (ms)", "GORM app: "+cell(p.AppFirstQueryMS, 0), "connector app: "+cell(c.AppFirstQueryMS, 0))
	row("the create call, admission included (ms)", cell(p.CreateCallMS, 1), cell(c.CreateCallMS, 1))
	row("**Pod working set (MiB)**", cell(p.PodWorkingSetMiB, 1), cell(c.PodWorkingSetMiB, 1))
	row("proxy container alone (MiB)", cell(p.ContainerWorkingSetMiB[proxyContainer], 1), "no proxy")
	row("app container alone (MiB)", "GORM app: "+cell(p.ContainerWorkingSetMiB[appContainer], 1), "connector app: "+cell(c.ContainerWorkingSetMiB[appContainer], 1))
	row("the Pod less its containers (MiB)", cell(p.PodOverheadMiB, 1), cell(c.PodOverheadMiB, 1))
	row("Pod RSS (MiB)", cell(p.PodRSSMiB, 1), cell(c.PodRSSMiB, 1))
	if pm, cm := modeNamed(r.Modes, "proxy"), modeNamed(r.Modes, "connector"); pm != nil && cm != nil {
		fmt.Fprintf(&b, "\nWhen the memory was read (%s), PostgreSQL had %d connections open to the Proxy mode's database and %d to the Connector mode's: the idle Pods' pools (`grantedPerPod` %d and %d).\n",
			r.MemoryReadAt.Format(time.TimeOnly), pm.OpenConnections, cm.OpenConnections, pm.GrantedPerPod, cm.GrantedPerPod)
	}
	if pf, cf := p.FirstQuerySeconds, c.FirstQuerySeconds; pf != nil && cf != nil && cf.Median > 0 {
		fmt.Fprintf(&b, "\nMedians, Proxy mode against Connector mode: first query %+.2f s (%.2f×)", pf.Median-cf.Median, pf.Median/cf.Median)
		if pw, cw := p.PodWorkingSetMiB, c.PodWorkingSetMiB; pw != nil && cw != nil && cw.Median > 0 {
			fmt.Fprintf(&b, ", Pod working set %+.1f MiB (%.2f×)", pw.Median-cw.Median, pw.Median/cw.Median)
		}
		b.WriteString(".\n")
	}
	if len(r.NotMeasured) > 0 {
		b.WriteString("\nNot measured, and why:\n\n")
		for _, n := range r.NotMeasured {
			fmt.Fprintf(&b, "- %s\n", n)
		}
	}
	for _, s := range r.Samples {
		if s.Error != "" {
			fmt.Fprintf(&b, "- %s %s has no figures: %s\n", s.Mode, s.Pod, firstLine(s.Error))
		}
	}
	return b.String()
}

func cell(f *Figure, decimals int) string {
	if f == nil {
		return "—"
	}
	// A difference of two readings can be a hair below zero: no "-0.0".
	v := func(x float64) string {
		s := fmt.Sprintf("%.*f", decimals, x)
		if strings.Trim(s, "-0.") == "" {
			s = strings.TrimPrefix(s, "-")
		}
		return s
	}
	return fmt.Sprintf("%s / %s [%s–%s]", v(f.Median), v(f.P90), v(f.Min), v(f.Max))
}

func modeNamed(modes []*Mode, name string) *Mode {
	for _, m := range modes {
		if m.Name == name {
			return m
		}
	}
	return nil
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}

// updateReadme replaces what is between the markers of path with the table.
func updateReadme(path string, r *Result, jsonPath string) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	updated, err := replaceSection(string(raw), markdown(r, jsonPath))
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return os.WriteFile(path, []byte(updated), 0o644)
}

func replaceSection(text, section string) (string, error) {
	begin, end := strings.Index(text, readmeBegin), strings.Index(text, readmeEnd)
	if begin < 0 || end < 0 || end < begin {
		return "", fmt.Errorf("no %s … %s markers in order", readmeBegin, readmeEnd)
	}
	return text[:begin] + readmeBegin + "\n" + section + text[end:], nil
}
