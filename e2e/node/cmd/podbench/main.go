// Command podbench measures, on the local node, what each mode costs a pod: the
// time from the Pod's creation to the app's first successful query, and the
// pod's memory, the proxy sidecar (Proxy mode) against the in-process connector
// (Connector mode). It reports and never asserts: no figure passes or fails.
//
// On a cluster directory with a Ready node (tools/cluster-up.sh, tools/node-up.sh)
// it starts Google's side (the fixtures and PostgreSQL), builds and loads the
// test images, installs the chart with the operator image, declares one instance
// and two namespaces bound to it, one per mode, then creates the Pods one at a
// time, the modes interleaved, and measures each from outside:
//
//	t0  the client's clock just before the create call
//	t1  the CRI timestamp of the app's log line announcing its first query
//	    (the kubelet's logs with timestamps=true)
//	memory  the kubelet's stats summary (working set per pod and per container),
//	        read once every Pod is up and idle, holding its pool
//
// It writes every sample and the summary as JSON, and regenerates the table
// between the markers of bench/README.md from that JSON. bench/pods.sh runs it
// on a cluster of its own (make bench-pods); bench/README.md says how to read it.
//
//	podbench -cluster-dir D -operator-image I -helm H -proxy P [-pods 20] [-out F.json] [-update-readme README.md]
//	podbench -from-json F.json -update-readme README.md     # the summary and the table again from the samples, no run
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

type config struct {
	clusterDir, repo       string
	operatorImage, helmBin string
	proxyBin               string
	pods                   int
	settle, podTimeout     time.Duration
	out, readme, fromJSON  string
	keep                   bool
}

func main() {
	var c config
	flag.StringVar(&c.clusterDir, "cluster-dir", os.Getenv("CLOUDSQL_BINDER_CLUSTER_DIR"), "the cluster directory (tools/cluster-up.sh, tools/node-up.sh)")
	flag.StringVar(&c.repo, "repo", "", "the repository's root (default: found above the working directory)")
	flag.StringVar(&c.operatorImage, "operator-image", os.Getenv("OPERATOR_IMAGE"), "the operator image, already loaded into the node (make image, tools/node-load-image.sh)")
	flag.StringVar(&c.helmBin, "helm", os.Getenv("HELM"), "helm (tools/build-controlplane.sh)")
	flag.StringVar(&c.proxyBin, "proxy", os.Getenv("CLOUD_SQL_PROXY"), "the cloud-sql-proxy binary (tools/build-proxy.sh)")
	flag.IntVar(&c.pods, "pods", 20, "Pods per mode, created one at a time")
	flag.DurationVar(&c.settle, "settle", 30*time.Second, "idle time after the last Pod's first query before memory is read")
	flag.DurationVar(&c.podTimeout, "pod-timeout", 3*time.Minute, "give up on one Pod's first query after this long (reported, not failed)")
	flag.StringVar(&c.out, "out", "", "results file (default bench/results/pods-<date>.json)")
	flag.StringVar(&c.readme, "update-readme", "", "rewrite the table between the pods markers in this file")
	flag.StringVar(&c.fromJSON, "from-json", "", "no run: recompute this results file's summary from its samples and regenerate the README table")
	flag.BoolVar(&c.keep, "keep", false, "leave the release, namespaces and Pods after the run")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	if err := run(ctx, c); err != nil {
		fmt.Fprintln(os.Stderr, "podbench:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, c config) error {
	if c.fromJSON != "" {
		if c.readme == "" {
			return errors.New("-from-json needs -update-readme")
		}
		raw, err := os.ReadFile(c.fromJSON)
		if err != nil {
			return err
		}
		var r Result
		if err := json.Unmarshal(raw, &r); err != nil {
			return fmt.Errorf("%s: %w", c.fromJSON, err)
		}
		// The samples are what was measured; the summary is derived from them
		// (again, so a figure added since is in the file and the table).
		r.Summary = summarize(r.Modes, r.Samples)
		if err := writeJSON(c.fromJSON, &r); err != nil {
			return err
		}
		shown := c.fromJSON
		if repo, err := findRepo(); c.repo == "" && err == nil {
			shown = relTo(repo, c.fromJSON)
		} else if c.repo != "" {
			shown = relTo(c.repo, c.fromJSON)
		}
		return updateReadme(c.readme, &r, shown)
	}
	if c.pods < 1 {
		return fmt.Errorf("-pods %d: at least one Pod per mode", c.pods)
	}
	for _, f := range []struct{ name, value, hint string }{
		{"-cluster-dir", c.clusterDir, "or CLOUDSQL_BINDER_CLUSTER_DIR"},
		{"-operator-image", c.operatorImage, "or OPERATOR_IMAGE: the image make image wrote, loaded into the node"},
		{"-helm", c.helmBin, "or HELM: $(tools/build-controlplane.sh)/helm"},
		{"-proxy", c.proxyBin, "or CLOUD_SQL_PROXY: what tools/build-proxy.sh prints"},
	} {
		if f.value == "" {
			return fmt.Errorf("%s is not set (%s); bench/pods.sh sets them all", f.name, f.hint)
		}
	}
	if c.repo == "" {
		repo, err := findRepo()
		if err != nil {
			return err
		}
		c.repo = repo
	}
	started := time.Now().UTC()
	if c.out == "" {
		c.out = filepath.Join(c.repo, "bench", "results", "pods-"+started.Format("2006-01-02T15-04-05Z")+".json")
	}

	r := &Result{
		Bench: "pods", Started: started, Command: strings.Join(os.Args, " "),
		Settings: Settings{
			PodsPerMode: c.pods, Order: "interleaved, one Pod at a time (proxy, connector; then connector, proxy; ...)",
			SettleSeconds: c.settle.Seconds(), PodTimeoutSeconds: c.podTimeout.Seconds(),
			OperatorImage: c.operatorImage,
		},
	}
	b, err := setUp(ctx, c, r)
	if b != nil {
		defer b.tearDown(c.keep)
	}
	if err != nil {
		return fmt.Errorf("set-up: %w", err)
	}
	measureErr := b.measure(ctx, c, r)
	r.Finished = time.Now().UTC()
	r.DurationSeconds = r.Finished.Sub(r.Started).Seconds()
	r.Machine.LoadAverageEnd = loadAverage()
	r.Complete = measureErr == nil
	if measureErr != nil {
		r.NotMeasured = append(r.NotMeasured, "the run stopped early: "+measureErr.Error())
	}
	r.Summary = summarize(r.Modes, r.Samples)
	if err := writeJSON(c.out, r); err != nil {
		return err
	}
	fmt.Printf("podbench: wrote %s\n", c.out)
	fmt.Print(markdown(r, relTo(c.repo, c.out)))
	if measureErr != nil {
		return fmt.Errorf("%w (what was measured is in %s; the README is left alone)", measureErr, c.out)
	}
	if c.readme != "" {
		if err := updateReadme(c.readme, r, relTo(c.repo, c.out)); err != nil {
			return err
		}
		fmt.Printf("podbench: updated the table in %s\n", c.readme)
	}
	return nil
}

// findRepo walks up from the working directory to the repository's root.
func findRepo() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "tools", "oci-image.py")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no repository root (with tools/oci-image.py) above the working directory: pass -repo")
		}
		dir = parent
	}
}

func relTo(base, path string) string {
	if rel, err := filepath.Rel(base, path); err == nil && !strings.HasPrefix(rel, "..") {
		return rel
	}
	return path
}

func writeJSON(path string, r *Result) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	raw, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(raw, '\n'), 0o644)
}
