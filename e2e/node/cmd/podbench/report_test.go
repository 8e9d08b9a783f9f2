package main

import (
	"strings"
	"testing"
	"time"
)

func TestFigureTakesTheMedianAndTheNearestRankP90(t *testing.T) {
	var v []float64
	for i := 20; i >= 1; i-- { // 1..20, unsorted
		v = append(v, float64(i))
	}
	f := figure(v)
	if f.N != 20 || f.Median != 10.5 || f.P90 != 18 || f.Min != 1 || f.Max != 20 {
		t.Fatalf("figure(1..20) = %+v, want median 10.5, p90 18 (rank 18 of 20), min 1, max 20", f)
	}
	if f := figure([]float64{3, 1, 2}); f.Median != 2 || f.P90 != 3 {
		t.Fatalf("figure(1,2,3) = %+v, want median 2, p90 3", f)
	}
	if figure(nil) != nil {
		t.Fatal("no values must give no figure")
	}
}

func TestReplaceSectionKeepsWhatIsAroundTheMarkers(t *testing.T) {
	text := "before\n" + readmeBegin + "\nold table\n" + readmeEnd + "\nafter\n"
	got, err := replaceSection(text, "new table\n")
	if err != nil {
		t.Fatal(err)
	}
	if want := "before\n" + readmeBegin + "\nnew table\n" + readmeEnd + "\nafter\n"; got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
	if _, err := replaceSection("no markers", "x"); err == nil {
		t.Fatal("a file without markers must be refused")
	}
}

func TestFindLineReadsTheCRITimestampOfTheFirstMatchingLine(t *testing.T) {
	logs := "2026-12-02T15:44:01.100000000Z connectorapp: starting\n" +
		"2026-12-02T15:44:01.523456789Z connectorapp: first query ok as u@d in 80ms; holding the pool until SIGTERM\n" +
		"2026-12-02T15:44:02.000000000Z connectorapp: first query ok again\n"
	at, line, err := findLine(logs, "first query ok")
	if err != nil {
		t.Fatal(err)
	}
	if want := time.Date(2026, 12, 2, 15, 44, 1, 523456789, time.UTC); !at.Equal(want) || !strings.HasPrefix(line, "connectorapp: first query ok as u@d") {
		t.Fatalf("got %s %q", at, line)
	}
	if at, _, err := findLine("2026-12-02T15:44:01Z something else\n", "first query ok"); err != nil || !at.IsZero() {
		t.Fatalf("no matching line: got %s, %v; want the zero time and no error", at, err)
	}
}

func TestSummaryComparesThePodsOfEachModeWithoutTheFailedOnes(t *testing.T) {
	modes := []*Mode{{Name: "proxy", Binding: "Proxy"}, {Name: "connector", Binding: "Connector"}}
	mem := func(pod, app, proxy uint64) *PodMemory {
		c := map[string]ContainerMemory{appContainer: {WorkingSetBytes: app << 20}}
		if proxy > 0 {
			c[proxyContainer] = ContainerMemory{WorkingSetBytes: proxy << 20}
		}
		return &PodMemory{WorkingSetBytes: pod << 20, Containers: c}
	}
	ready := 1.5
	samples := []Sample{
		{Mode: "proxy", FirstQuerySeconds: 2, ProxyReadySeconds: &ready, Memory: mem(30, 8, 20)},
		{Mode: "connector", FirstQuerySeconds: 1, Memory: mem(15, 14, 0)},
		{Mode: "connector", Pod: "pod-00", Error: "no first query"},
	}
	sum := summarize(modes, samples)
	p, c := sum[0], sum[1]
	if p.Pods != 1 || p.Failed != 0 || c.Pods != 2 || c.Failed != 1 {
		t.Fatalf("counts: proxy %d/%d, connector %d/%d", p.Pods, p.Failed, c.Pods, c.Failed)
	}
	if p.ContainerWorkingSetMiB[proxyContainer].Median != 20 || p.PodOverheadMiB.Median != 2 || c.PodOverheadMiB.Median != 1 {
		t.Fatalf("memory: proxy container %+v, overheads %+v %+v", p.ContainerWorkingSetMiB[proxyContainer], p.PodOverheadMiB, c.PodOverheadMiB)
	}
	if c.ProxyReadySeconds != nil || c.FirstQuerySeconds.N != 1 {
		t.Fatalf("connector: proxy ready %+v, first query %+v", c.ProxyReadySeconds, c.FirstQuerySeconds)
	}
	table := markdown(&Result{Modes: modes, Summary: sum, Samples: samples}, "bench/results/pods-x.json")
	for _, want := range []string{"| Pods measured (without figures) | 1 (0) | 1 (1) |", "connector pod-00 has no figures: no first query"} {
		if !strings.Contains(table, want) {
			t.Errorf("the table lacks %q:\n%s", want, table)
		}
	}
}

func TestAppMillisReadsWhatEachAppSaysItsFirstQueryTook(t *testing.T) {
	for line, want := range map[string]float64{
		"gormapp: socket present at start: true; first query ok in 27ms":               27,
		"connectorapp: first query ok as u@d in 812ms; holding the pool until SIGTERM": 812,
	} {
		if got := appMillis(line); got == nil || *got != want {
			t.Errorf("appMillis(%q) = %v, want %v", line, got, want)
		}
	}
	if appMillis("gormapp: holding the pool until SIGTERM") != nil {
		t.Error("a line without a time must give none")
	}
}
