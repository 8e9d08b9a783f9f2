package datapath

// Every proxy the operator renders, started as the real binary with exactly its
// generated args (TestProxyAcceptsEveryModeWeGenerate). This file reads the proxies
// out of rendered manifests and runs one of them against its own Admin API fixture
// and server-side TLS endpoints, one per IP type, so a connection shows which
// address the proxy chose.

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// InjectedAnnotation is the pod-template annotation recording what the operator
// injected; its containers and initContainers lists name our proxies.
const InjectedAnnotation = "cloudsql.dev/injected"

// SocketDir is where the socket volume is mounted, in the proxy and the app.
const SocketDir = "/cloudsql"

// PodContainer is a container with its ports.
type PodContainer struct {
	Container `yaml:",inline"`
	Ports     []struct {
		ContainerPort int `yaml:"containerPort"`
	} `yaml:"ports"`
}

type podSpec struct {
	InitContainers []PodContainer `yaml:"initContainers"`
	Containers     []PodContainer `yaml:"containers"`
}

type podTemplate struct {
	Metadata struct {
		Annotations map[string]string `yaml:"annotations"`
	} `yaml:"metadata"`
	Spec podSpec `yaml:"spec"`
}

// renderedDoc holds what is read of any document: a workload's pod template wherever
// its kind keeps it, or a CloudSqlInstance's connection name and database version.
type renderedDoc struct {
	APIVersion string `yaml:"apiVersion"`
	Kind       string `yaml:"kind"`
	Metadata   struct {
		Name        string            `yaml:"name"`
		Annotations map[string]string `yaml:"annotations"`
	} `yaml:"metadata"`
	Spec struct {
		podSpec     `yaml:",inline"` // Pod
		Template    podTemplate      `yaml:"template"` // Deployment, StatefulSet, DaemonSet, ReplicaSet, Job
		JobTemplate struct {
			Spec struct {
				Template podTemplate `yaml:"template"`
			} `yaml:"spec"`
		} `yaml:"jobTemplate"` // CronJob
		ConnectionName  string `yaml:"connectionName"`  // CloudSqlInstance
		DatabaseVersion string `yaml:"databaseVersion"` // CloudSqlInstance
		InstanceRef     struct {
			Name string `yaml:"name"`
		} `yaml:"instanceRef"` // CloudSqlBinding
		Network string `yaml:"network"` // CloudSqlBinding
	} `yaml:"spec"`
	Status struct {
		DatabaseVersion string `yaml:"databaseVersion"`
	} `yaml:"status"`
}

var workloadKinds = map[string]string{
	"Deployment": "apps/v1", "StatefulSet": "apps/v1", "DaemonSet": "apps/v1", "ReplicaSet": "apps/v1",
	"Job": "batch/v1", "CronJob": "batch/v1", "Pod": "v1",
}

// RenderedPod is the pod template of one bound workload in a rendered manifest.
type RenderedPod struct {
	File, Kind, Name string
	Proxies          []PodContainer    // our proxies, in pod order (initContainers first)
	Native           map[string]bool   // proxy name -> native sidecar (initContainer, restartPolicy Always)
	Apps             []PodContainer    // every other container
	Versions         map[string]string // connection name -> database version (the manifest's CloudSqlInstances)
	Networks         map[string]string // connection name -> network of the manifest's bindings of it (one each)
}

// String names the pod for messages.
func (p *RenderedPod) String() string {
	return fmt.Sprintf("%s: %s %s", filepath.Base(p.File), p.Kind, p.Name)
}

// LoadRenderedPods returns the bound workloads of a rendered manifest (the ones whose
// pod template carries the injected annotation).
func LoadRenderedPods(path string) ([]*RenderedPod, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	dec := yaml.NewDecoder(f)
	versions := map[string]string{}
	connections := map[string]string{}       // instance name -> connection name
	networks := map[string]map[string]bool{} // instance name -> its bindings' networks
	var pods []*RenderedPod
	for {
		var d renderedDoc
		err := dec.Decode(&d)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		if d.APIVersion == "cloudsql.dev/v1alpha1" && d.Kind == "CloudSqlInstance" {
			v := d.Spec.DatabaseVersion
			if v == "" {
				v = d.Status.DatabaseVersion
			}
			versions[d.Spec.ConnectionName] = v
			connections[d.Metadata.Name] = d.Spec.ConnectionName
			continue
		}
		if d.APIVersion == "cloudsql.dev/v1alpha1" && d.Kind == "CloudSqlBinding" {
			network := d.Spec.Network
			if network == "" {
				network = "Public"
			}
			if networks[d.Spec.InstanceRef.Name] == nil {
				networks[d.Spec.InstanceRef.Name] = map[string]bool{}
			}
			networks[d.Spec.InstanceRef.Name][network] = true
			continue
		}
		if api, ok := workloadKinds[d.Kind]; !ok || api != d.APIVersion {
			continue
		}
		var tmpl podTemplate
		switch d.Kind {
		case "Pod":
			tmpl.Metadata.Annotations, tmpl.Spec = d.Metadata.Annotations, d.Spec.podSpec
		case "CronJob":
			tmpl = d.Spec.JobTemplate.Spec.Template
		default:
			tmpl = d.Spec.Template
		}
		record, ok := tmpl.Metadata.Annotations[InjectedAnnotation]
		if !ok {
			continue
		}
		var injected struct {
			InitContainers []string `json:"initContainers"`
			Containers     []string `json:"containers"`
		}
		if err := json.Unmarshal([]byte(record), &injected); err != nil {
			return nil, fmt.Errorf("%s: %s %s: annotation %s: %w", path, d.Kind, d.Metadata.Name, InjectedAnnotation, err)
		}
		ours := map[string]bool{}
		for _, n := range append(injected.InitContainers, injected.Containers...) {
			ours[n] = true
		}
		p := &RenderedPod{File: path, Kind: d.Kind, Name: d.Metadata.Name, Native: map[string]bool{}, Versions: versions, Networks: map[string]string{}}
		for _, c := range tmpl.Spec.InitContainers {
			if ours[c.Name] {
				p.Proxies = append(p.Proxies, c)
				p.Native[c.Name] = c.RestartPolicy == "Always"
			}
		}
		for _, c := range tmpl.Spec.Containers {
			if ours[c.Name] {
				p.Proxies = append(p.Proxies, c)
			} else {
				p.Apps = append(p.Apps, c)
			}
		}
		if len(p.Proxies) != len(ours) {
			return nil, fmt.Errorf("%s: %s: the injected record names %d containers, %d found", path, p, len(ours), len(p.Proxies))
		}
		pods = append(pods, p)
	}
	for instance, set := range networks {
		if len(set) == 1 && connections[instance] != "" {
			for network := range set {
				for _, p := range pods {
					p.Networks[connections[instance]] = network
				}
			}
		}
	}
	return pods, nil
}

// ProxyUnderTest is one rendered proxy container, read for running.
type ProxyUnderTest struct {
	Pod       *RenderedPod
	C         PodContainer
	Instance  Instance // from the connection name and the manifest's CloudSqlInstance
	Unix      bool     // --unix-socket, else TCP (--port)
	Listen    string   // as rendered: the socket directory or the port
	HTTPPort  string   // --http-port as rendered
	AdminPort string   // --admin-port as rendered, if any
}

// workload wraps the container so the data-path helpers (args, env) apply.
func (p *ProxyUnderTest) workload() *Workload { return &Workload{Proxy: p.C.Container} }

// Has reports whether the proxy's args contain --name.
func (p *ProxyUnderTest) Has(flag string) bool { return p.workload().HasFlag(flag) }

// Flag returns the value of --name=value (or "--name value"), if present.
func (p *ProxyUnderTest) Flag(name string) string {
	args := p.workload().rawArgs()
	for i, a := range args {
		if v, ok := strings.CutPrefix(a, name+"="); ok {
			return v
		}
		if a == name && i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
			return args[i+1]
		}
	}
	return ""
}

// ReadProxy reads the proxy's instance and listener from its args. Its only
// positional arg must be the connection name, last.
func ReadProxy(pod *RenderedPod, c PodContainer) (*ProxyUnderTest, error) {
	p := &ProxyUnderTest{Pod: pod, C: c}
	args := p.workload().rawArgs()
	if len(args) == 0 || strings.HasPrefix(args[len(args)-1], "-") {
		return nil, fmt.Errorf("%s: proxy %s: the last arg is not an instance: %q", pod, c.Name, args)
	}
	for _, a := range args[:len(args)-1] {
		if !strings.HasPrefix(a, "--") {
			return nil, fmt.Errorf("%s: proxy %s: arg %q is not a --flag or --flag=value (one instance only, last)", pod, c.Name, a)
		}
	}
	conn := args[len(args)-1]
	parts := strings.Split(conn, ":")
	if len(parts) != 3 {
		return nil, fmt.Errorf("%s: proxy %s: %q is not PROJECT:REGION:INSTANCE", pod, c.Name, conn)
	}
	version, ok := pod.Versions[conn]
	if !ok || version == "" {
		return nil, fmt.Errorf("%s: no CloudSqlInstance with connectionName %s and a databaseVersion in the manifest", pod, conn)
	}
	p.Instance = Instance{Project: parts[0], Region: parts[1], Name: parts[2], DatabaseVersion: version}
	if dir := p.Flag("--unix-socket"); dir != "" {
		p.Unix, p.Listen = true, dir
	} else if port := p.Flag("--port"); port != "" {
		p.Listen = port
	} else {
		return nil, fmt.Errorf("%s: proxy %s has neither --unix-socket nor --port", pod, c.Name)
	}
	p.HTTPPort, p.AdminPort = p.Flag("--http-port"), p.Flag("--admin-port")
	return p, nil
}

// BindingNetwork is the IP type the binding of the proxy's instance asks for
// (spec.network: Public, Private, PSC), "" when the manifest does not say.
func (p *ProxyUnderTest) BindingNetwork() string {
	return map[string]string{"Public": "PUBLIC", "Private": "PRIVATE", "PSC": "PSC"}[p.Pod.Networks[p.Instance.ConnectionName()]]
}

// Network is the IP type the proxy's flags ask for.
func (p *ProxyUnderTest) Network() string {
	switch {
	case p.Has("--psc"):
		return "PSC"
	case p.Has("--private-ip"):
		return "PRIVATE"
	default:
		return "PUBLIC"
	}
}

// InstanceAddrs is where one instance answers, per IP type. Each is a distinct
// loopback address with its own server-side TLS endpoint on :3307, so the endpoint a
// connection arrives at shows the IP type the connector chose. 127.0.0.1 is left to
// the data-path stack.
type InstanceAddrs map[string]string

// AddrsFor returns the addresses of the k-th proxy of a pod (k from 1).
func AddrsFor(k int) InstanceAddrs {
	return InstanceAddrs{
		"PUBLIC":  fmt.Sprintf("127.0.%d.2", k),
		"PRIVATE": fmt.Sprintf("127.0.%d.3", k),
		"PSC":     fmt.Sprintf("127.0.%d.4", k),
	}
}

// AdminOverlay serves the Admin API fixture's own answers, adding to connectSettings
// what an instance with a private IP and Private Service Connect reports: a PRIVATE
// address, pscEnabled and its PSC DNS name (here an IP literal, dialed as is).
type AdminOverlay struct {
	URL    string
	server *httptest.Server
}

// NewAdminOverlay starts the overlay in front of f (whose instance's PRIMARY address
// is addrs["PUBLIC"]).
func NewAdminOverlay(f *SQLAdminFixture, addrs InstanceAddrs) (*AdminOverlay, error) {
	serving, err := f.APICA.leaf(&x509.Certificate{
		Subject:     pkix.Name{CommonName: "127.0.0.1"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return nil, err
	}
	inner := f.server.Config.Handler // the fixture itself: token check, call log, answers
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := httptest.NewRecorder()
		inner.ServeHTTP(rec, r)
		body := rec.Body.Bytes()
		if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/connectSettings") && rec.Code == http.StatusOK {
			var settings map[string]any
			if err := json.Unmarshal(body, &settings); err != nil {
				googleError(w, http.StatusInternalServerError, "INTERNAL", "overlay: "+err.Error())
				return
			}
			ips, _ := settings["ipAddresses"].([]any)
			settings["ipAddresses"] = append(ips, map[string]any{"type": "PRIVATE", "ipAddress": addrs["PRIVATE"]})
			settings["pscEnabled"] = true
			settings["dnsName"] = addrs["PSC"] + "."
			body, _ = json.Marshal(settings)
		}
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(rec.Code)
		_, _ = w.Write(body)
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{serving}, MinVersion: tls.VersionTLS12}
	// A proxy stopped mid-refresh resets its connection; that is not worth a log line.
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.StartTLS()
	return &AdminOverlay{URL: srv.URL + "/", server: srv}, nil
}

// Close stops the overlay.
func (o *AdminOverlay) Close() { o.server.Close() }

// RunningProxy is a rendered proxy running locally with its stand-ins.
type RunningProxy struct {
	*ProxyUnderTest
	Proxy     *Proxy
	Args      []string
	Ports     map[string]string         // rendered port flag -> local port
	Listener  string                    // local socket path, or 127.0.0.1:port
	Admin     *SQLAdminFixture          //
	Endpoints map[string]*ServerSideTLS // IP type -> server-side TLS endpoint

	stops []func()
}

// StartRendered runs p with its args re-rooted under dir (paths in its mounts) and
// its port flags on free local ports, pointed at a fresh Admin API fixture for its
// instance (addresses addrs) by --sqladmin-api-endpoint and --token, plus
// --login-token when it has --auto-iam-authn (the proxy refuses --auto-iam-authn
// with --token alone; in a pod the identity comes from the metadata server).
func StartRendered(p *ProxyUnderTest, bin, dir string, addrs InstanceAddrs) (r *RunningProxy, err error) {
	r = &RunningProxy{ProxyUnderTest: p, Ports: map[string]string{}, Endpoints: map[string]*ServerSideTLS{}}
	defer func() {
		if err != nil {
			r.Stop()
			r = nil
		}
	}()
	w := p.workload()
	for _, a := range w.rawArgs() {
		if strings.HasPrefix(a, "--enable-builtin-metrics") && a != "--enable-builtin-metrics=false" {
			return r, fmt.Errorf("proxy %s: arg %q would export metrics to Cloud Monitoring, which this test does not stand in", p.C.Name, a)
		}
	}
	inst := p.Instance
	inst.IP = addrs["PUBLIC"]
	if r.Admin, err = NewSQLAdminFixture(inst); err != nil {
		return r, err
	}
	r.stops = append(r.stops, r.Admin.Close)
	overlay, err := NewAdminOverlay(r.Admin, addrs)
	if err != nil {
		return r, err
	}
	r.stops = append(r.stops, overlay.Close)
	for network, ip := range addrs {
		// Nothing behind the endpoints: a connection counts once its mutual TLS is done.
		tlsEP, err := NewServerSideTLS(r.Admin, ip, "127.0.0.1:1")
		if err != nil {
			return r, fmt.Errorf("server-side TLS endpoint for %s at %s: %w", network, ip, err)
		}
		r.Endpoints[network] = tlsEP
		r.stops = append(r.stops, tlsEP.Close)
	}
	caFile := filepath.Join(dir, p.C.Name+"-sqladmin-ca.pem")
	if err := os.WriteFile(caFile, r.Admin.APICA.PEM(), 0o644); err != nil {
		return r, err
	}

	for _, flag := range []string{"--http-port", "--admin-port", "--port"} {
		if p.Flag(flag) == "" {
			continue
		}
		port, err := freePort()
		if err != nil {
			return r, err
		}
		r.Ports[flag] = strconv.Itoa(port)
	}
	r.Args = append(w.ProxyArgs(dir, r.Ports), "--sqladmin-api-endpoint="+overlay.URL, "--token="+r.Admin.Token)
	if p.Has("--auto-iam-authn") {
		r.Args = append(r.Args, "--login-token="+r.Admin.Token)
	}
	if p.Unix {
		r.Listener = filepath.Join(reroot(p.Listen, p.C.VolumeMounts, dir), inst.ConnectionName())
		if strings.HasPrefix(inst.DatabaseVersion, "POSTGRES") {
			r.Listener = filepath.Join(r.Listener, ".s.PGSQL.5432")
		}
	} else {
		r.Listener = net.JoinHostPort("127.0.0.1", r.Ports["--port"])
	}
	env, err := w.ProxyEnv(dir)
	if err != nil {
		return r, err
	}
	env = append(env, "HOME="+dir, "SSL_CERT_FILE="+caFile, "CSQL_PROXY_ENABLE_BUILTIN_METRICS=false")
	if r.Proxy, err = StartProxy(bin, r.Args, env, filepath.Join(dir, p.C.Name+".log")); err != nil {
		return r, err
	}
	r.stops = append(r.stops, func() { _ = r.Proxy.Stop() })
	return r, nil
}

// Exited reports whether the proxy has exited, and its exit status (without waiting).
func (r *RunningProxy) Exited() (bool, error) {
	select {
	case err := <-r.Proxy.done:
		r.Proxy.done <- err // for Stop and later calls
		return true, err
	default:
		return false, nil
	}
}

// WaitServing waits until /startup answers 200 and, for a Unix socket, the socket
// exists; it fails at once, with the proxy's command-line error, if the proxy exits.
func (r *RunningProxy) WaitServing(timeout time.Duration) error {
	startup := "http://127.0.0.1:" + r.Ports["--http-port"] + "/startup"
	deadline := time.Now().Add(timeout)
	for {
		if exited, err := r.Exited(); exited {
			return fmt.Errorf("exited at startup (%v): %s", err, r.Proxy.startupLog())
		}
		if httpOK(startup) {
			if !r.Unix {
				return nil
			}
			st, err := os.Stat(r.Listener)
			if err == nil && st.Mode()&os.ModeSocket != 0 {
				return nil
			}
			return fmt.Errorf("/startup answers 200 but there is no socket at %s (%v)", r.Listener, err)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not answer 200 within %s:\n%s", startup, timeout, tail(r.Proxy.LogPath, 15))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ConnectThrough opens a connection to the proxy's listener, as the app would, and
// waits until the proxy's mutual TLS reached one of the server-side endpoints;
// it returns that endpoint's IP type.
func (r *RunningProxy) ConnectThrough(timeout time.Duration) (string, error) {
	network := "tcp"
	if r.Unix {
		network = "unix"
	}
	c, err := net.DialTimeout(network, r.Listener, 5*time.Second)
	if err != nil {
		return "", fmt.Errorf("dialing %s %s: %w", network, r.Listener, err)
	}
	defer c.Close()
	deadline := time.Now().Add(timeout)
	for {
		var reached []string
		for ipType, ep := range r.Endpoints {
			if ep.Accepted() > 0 {
				reached = append(reached, ipType)
			}
		}
		switch {
		case len(reached) == 1:
			return reached[0], nil
		case len(reached) > 1:
			return "", fmt.Errorf("connections reached several endpoints: %v", reached)
		case time.Now().After(deadline):
			return "", fmt.Errorf("no connection reached a server-side TLS endpoint within %s:\n%s", timeout, tail(r.Proxy.LogPath, 10))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Quit stops the proxy the way its app would: GET /quitquitquit on the admin port
// (localhost only) when it has --quitquitquit, else SIGTERM as the kubelet does.
// It returns the exit status.
func (r *RunningProxy) Quit() error {
	if !r.Has("--quitquitquit") {
		return r.Proxy.Stop()
	}
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Post("http://localhost:"+r.Ports["--admin-port"]+"/quitquitquit", "text/plain", bytes.NewReader(nil))
	if err != nil {
		return fmt.Errorf("POST /quitquitquit: %w", err)
	}
	_ = resp.Body.Close()
	select {
	case err := <-r.Proxy.done:
		r.Proxy.done <- err
		return err
	case <-time.After(15 * time.Second):
		return fmt.Errorf("still running 15s after /quitquitquit answered %s", resp.Status)
	}
}

// Stop tears everything down in reverse order.
func (r *RunningProxy) Stop() {
	for i := len(r.stops) - 1; i >= 0; i-- {
		r.stops[i]()
	}
	r.stops = nil
}
