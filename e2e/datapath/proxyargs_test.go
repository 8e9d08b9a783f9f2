package datapath

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"
)

// renderedManifests returns the rendered testdata/proxyargs inputs: every input must
// have its rendered output in $PROXYARGS_MANIFESTS (run.sh renders them with
// `cloudsql-binder render -f`).
func renderedManifests(t *testing.T) []string {
	t.Helper()
	dir := os.Getenv("PROXYARGS_MANIFESTS")
	if dir == "" {
		t.Fatal("PROXYARGS_MANIFESTS is not set: point it at a directory holding `cloudsql-binder render -f testdata/proxyargs/NAME.yaml` as NAME.yaml (e2e/datapath/run.sh does)")
	}
	inputs, err := filepath.Glob("testdata/proxyargs/*.yaml")
	if err != nil || len(inputs) == 0 {
		t.Fatalf("no inputs in testdata/proxyargs (%v)", err)
	}
	var files []string
	for _, in := range inputs {
		out := filepath.Join(dir, filepath.Base(in))
		if _, err := os.Stat(out); err != nil {
			t.Fatalf("%s is not rendered: %v", in, err)
		}
		files = append(files, out)
	}
	return files
}

func proxyBinary(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("CLOUD_SQL_PROXY")
	if bin == "" {
		t.Fatal("CLOUD_SQL_PROXY is not set: point it at the binary tools/build-proxy.sh prints")
	}
	return bin
}

// renderedProxies reads every bound pod of the rendered manifests and its proxies.
func renderedProxies(t *testing.T) (pods []*RenderedPod, proxies map[*RenderedPod][]*ProxyUnderTest) {
	t.Helper()
	proxies = map[*RenderedPod][]*ProxyUnderTest{}
	for _, file := range renderedManifests(t) {
		found, err := LoadRenderedPods(file)
		if err != nil {
			t.Fatal(err)
		}
		if len(found) == 0 {
			t.Fatalf("%s: no bound workload", file)
		}
		for _, pod := range found {
			if len(pod.Proxies) == 0 {
				t.Fatalf("%s: no proxy was injected", pod)
			}
			for _, c := range pod.Proxies {
				p, err := ReadProxy(pod, c)
				if err != nil {
					t.Fatal(err)
				}
				proxies[pod] = append(proxies[pod], p)
			}
			pods = append(pods, pod)
		}
	}
	return pods, proxies
}

// checkRenderedPod checks what holds before anything runs: the proxies' ports collide
// with nothing else in the pod (its network namespace is shared), a regular-container
// proxy can be told to quit and a native one cannot, --private-ip and --psc never
// come together, and an app container finds each proxy's listener in its env.
func checkRenderedPod(t *testing.T, pod *RenderedPod, proxies []*ProxyUnderTest) {
	t.Helper()
	ports := map[string]string{}
	claim := func(port, owner string) {
		if port == "" {
			return
		}
		if other, taken := ports[port]; taken {
			t.Errorf("%s: port %s is used by %s and by %s", pod, port, other, owner)
		}
		ports[port] = owner
	}
	for _, app := range pod.Apps {
		for _, p := range app.Ports {
			claim(fmt.Sprint(p.ContainerPort), "container "+app.Name)
		}
	}
	for _, p := range proxies {
		name := "proxy " + p.C.Name
		claim(p.HTTPPort, name+" --http-port")
		claim(p.AdminPort, name+" --admin-port")
		if !p.Unix {
			claim(p.Listen, name+" --port")
		}
		if p.HTTPPort == "" || !p.Has("--health-check") {
			t.Errorf("%s: proxy %s has no health endpoints (--health-check, --http-port)", pod, p.C.Name)
		}
		if p.Has("--private-ip") && p.Has("--psc") {
			t.Errorf("%s: proxy %s has both --private-ip and --psc, which the proxy refuses", pod, p.C.Name)
		}
		if want := p.BindingNetwork(); want != "" && p.Network() != want {
			t.Errorf("%s: proxy %s: its flags ask for the %s address, its binding for %s", pod, p.C.Name, p.Network(), want)
		}
		native := pod.Native[p.C.Name]
		if quits := p.Has("--quitquitquit") && p.AdminPort != ""; quits == native {
			t.Errorf("%s: proxy %s: native sidecar %v, --quitquitquit with --admin-port %v; want exactly one", pod, p.C.Name, native, quits)
		}

		// The app's env leads to the listener: the socket path under the same volume,
		// or 127.0.0.1 and the port.
		reached := false
		for _, app := range pod.Apps {
			var values []string
			for _, e := range app.Env {
				values = append(values, e.Value)
			}
			if p.Unix {
				want := p.Listen + "/" + p.Instance.ConnectionName()
				if slices.Contains(values, want) && sameVolumeAt(app.Container, p.C.Container, p.Listen) {
					reached = true
				}
			} else if slices.Contains(values, "127.0.0.1") && slices.Contains(values, p.Listen) {
				reached = true
			}
		}
		if !reached {
			t.Errorf("%s: no app container's env leads to proxy %s (listening on %s)", pod, p.C.Name, p.Listen)
		}
	}
}

// sameVolumeAt reports whether both containers mount one volume at dir.
func sameVolumeAt(a, b Container, dir string) bool {
	for _, ma := range a.VolumeMounts {
		for _, mb := range b.VolumeMounts {
			if ma.Name == mb.Name && ma.MountPath == dir && mb.MountPath == dir {
				return true
			}
		}
	}
	return false
}

// podDir is a short temporary root (Unix socket paths are limited to 107 bytes)
// holding the pod's volumes as the kubelet would create them.
func podDir(t *testing.T, pod *RenderedPod) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "proxyargs-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	for _, c := range append(slices.Clone(pod.Proxies), pod.Apps...) {
		for _, m := range c.VolumeMounts {
			if err := os.MkdirAll(filepath.Join(dir, m.Name), 0o755); err != nil {
				t.Fatal(err)
			}
		}
	}
	return dir
}

// TestProxyAcceptsEveryModeWeGenerate starts the real proxy with exactly the args the
// operator rendered, for every variant in testdata/proxyargs, all proxies of a pod at
// once: each must answer /startup with 200 and listen where the app's env says, carry
// a connection to the server-side endpoint of the IP type its flags ask for (public,
// private or PSC, as its binding's spec.network says; not checked with
// --auto-iam-authn, see below), and exit 0 when
// stopped as it would be in its pod.
func TestProxyAcceptsEveryModeWeGenerate(t *testing.T) {
	bin := proxyBinary(t)
	pods, proxies := renderedProxies(t)
	seen := map[string]bool{}
	for _, pod := range pods {
		t.Run(strings.TrimSuffix(filepath.Base(pod.File), ".yaml")+"/"+pod.Kind, func(t *testing.T) {
			ps := proxies[pod]
			checkRenderedPod(t, pod, ps)
			dir := podDir(t, pod)

			var running []*RunningProxy
			for k, p := range ps {
				r, err := StartRendered(p, bin, dir, AddrsFor(k+1))
				if err != nil {
					t.Fatalf("%s: proxy %s: %v", pod, p.C.Name, err)
				}
				t.Cleanup(r.Stop)
				running = append(running, r)
			}
			start := time.Now()
			for _, r := range running {
				if err := r.WaitServing(30 * time.Second); err != nil {
					t.Fatalf("proxy %s with args %q: %v", r.C.Name, r.Args, err)
				}
				t.Logf("proxy %s serving %s after %s; args %q", r.C.Name, r.Listener, time.Since(start).Round(time.Millisecond), r.Args)
			}
			for _, r := range running {
				if r.Has("--auto-iam-authn") {
					// --login-token is a bare token without an expiry, so the connector
					// caps its client certificate at the zero time, finds it expired on
					// every dial and waits out its refresh rate limit (30s) before
					// dialing. In a pod the token comes from the metadata server with an
					// expiry; here starting and serving is what is checked.
					t.Logf("proxy %s (--auto-iam-authn): not connected through, its stand-in login token has no expiry", r.C.Name)
					continue
				}
				want := r.BindingNetwork()
				if want == "" {
					t.Errorf("proxy %s: no single binding of %s in the manifest says which network", r.C.Name, r.Instance.ConnectionName())
					continue
				}
				got, err := r.ConnectThrough(20 * time.Second)
				switch {
				case err != nil:
					t.Errorf("proxy %s: a connection to %s: %v", r.C.Name, r.Listener, err)
				case got != want:
					t.Errorf("proxy %s: a connection reached the instance's %s address; its binding asks for %s", r.C.Name, got, want)
				default:
					t.Logf("proxy %s: a connection reached the instance's %s address", r.C.Name, got)
				}
			}
			for _, r := range running {
				if exited, err := r.Exited(); exited {
					t.Fatalf("proxy %s exited while serving (%v):\n%s", r.C.Name, err, tail(r.Proxy.LogPath, 10))
				}
			}
			for _, r := range running {
				how := "SIGTERM"
				if r.Has("--quitquitquit") {
					how = "/quitquitquit"
				}
				if err := r.Quit(); err != nil {
					t.Errorf("proxy %s on %s: %v; want exit status 0", r.C.Name, how, err)
				} else {
					t.Logf("proxy %s on %s: exit status 0", r.C.Name, how)
				}
			}

			for _, p := range ps {
				native := pod.Native[p.C.Name]
				seen["Unix socket"] = seen["Unix socket"] || p.Unix
				seen["TCP"] = seen["TCP"] || !p.Unix
				seen["native sidecar"] = seen["native sidecar"] || native
				seen["regular container with --quitquitquit and --admin-port"] =
					seen["regular container with --quitquitquit and --admin-port"] || !native && p.Has("--quitquitquit") && p.AdminPort != ""
				seen["public IP"] = seen["public IP"] || p.Network() == "PUBLIC"
				for _, flag := range []string{"--auto-iam-authn", "--private-ip", "--psc"} {
					seen[flag] = seen[flag] || p.Has(flag)
				}
			}
			seen["two proxies on one pod"] = seen["two proxies on one pod"] || len(ps) >= 2
		})
	}

	var missing []string
	for _, v := range []string{
		"Unix socket", "TCP", "native sidecar", "regular container with --quitquitquit and --admin-port",
		"public IP", "--auto-iam-authn", "--private-ip", "--psc", "two proxies on one pod",
	} {
		if !seen[v] {
			missing = append(missing, v)
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("testdata/proxyargs covers no proxy with: %s", strings.Join(missing, ", "))
	}
}

// withArgs returns p with extra args inserted before its instance.
func withArgs(p *ProxyUnderTest, extra ...string) *ProxyUnderTest {
	q := *p
	args := p.C.Args
	q.C.Args = append(append(append([]string(nil), args[:len(args)-1]...), extra...), args[len(args)-1])
	return &q
}

// refusedAtStartup runs p and returns the proxy's command-line error; it fails the
// test if the proxy starts serving instead.
func refusedAtStartup(t *testing.T, p *ProxyUnderTest) string {
	t.Helper()
	pod := p.Pod
	r, err := StartRendered(p, proxyBinary(t), podDir(t, pod), AddrsFor(1))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Stop()
	err = r.WaitServing(15 * time.Second)
	if err == nil {
		t.Fatalf("proxy %s started serving with args %q", p.C.Name, r.Args)
	}
	if exited, status := r.Exited(); !exited || status == nil {
		t.Fatalf("proxy %s did not exit with an error: %v", p.C.Name, err)
	}
	return err.Error()
}

// TestProxyRejectsPrivateIPWithPSCAndWeNeverGenerateIt: the proxy refuses --private-ip
// together with --psc at startup; no rendered proxy asks for both (a binding's network
// is one value), and forcing --private-ip into our PSC proxy makes it refuse.
func TestProxyRejectsPrivateIPWithPSCAndWeNeverGenerateIt(t *testing.T) {
	pods, proxies := renderedProxies(t)
	var psc *ProxyUnderTest
	for _, pod := range pods {
		for _, p := range proxies[pod] {
			if p.Has("--private-ip") && p.Has("--psc") {
				t.Errorf("%s: proxy %s was rendered with both --private-ip and --psc", pod, p.C.Name)
			}
			if psc == nil && p.Has("--psc") {
				psc = p
			}
		}
	}
	if psc == nil {
		t.Fatal("no rendered proxy has --psc")
	}
	msg := refusedAtStartup(t, withArgs(psc, "--private-ip"))
	if want := "cannot specify --private-ip, --psc"; !strings.Contains(msg, want) {
		t.Errorf("the proxy refused --private-ip with --psc, but not saying %q: %s", want, msg)
	}
	t.Logf("with --private-ip added: %s", msg)
}

// TestProxyRejectsAFlagItDoesNotKnow shows a flag error fails the run: an unknown
// flag added to a rendered proxy makes it exit at startup.
func TestProxyRejectsAFlagItDoesNotKnow(t *testing.T) {
	pods, proxies := renderedProxies(t)
	msg := refusedAtStartup(t, withArgs(proxies[pods[0]][0], "--no-such-flag"))
	if want := "unknown flag: --no-such-flag"; !strings.Contains(msg, want) {
		t.Errorf("the proxy refused the unknown flag, but not saying %q: %s", want, msg)
	}
}
