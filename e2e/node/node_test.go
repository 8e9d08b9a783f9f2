package node

// The scenarios, in the order they run: the last two disturb the operator (its
// leader is killed, then the chart is upgraded), so they come after the others.

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

func TestOperatorPodsAreReadyOneLeadsAndTheyServeTheWebhook(t *testing.T) {
	s := theSuite(t)
	ctx := context.Background()

	pods, err := s.OperatorPods(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(pods) != 2 {
		t.Fatalf("want the chart's 2 operator pods, found %d\n%s", len(pods), s.Cluster.Report(ctx, s.ReleaseNS, OperatorLabel))
	}
	var names, ips []string
	for i := range pods {
		p := &pods[i]
		c := appContainer(p, "operator")
		st := containerStatus(p, "operator")
		if c == nil || st == nil {
			t.Fatalf("pod %s has no operator container", p.Name)
		}
		if c.ReadinessProbe == nil || c.ReadinessProbe.HTTPGet == nil || c.StartupProbe == nil || c.LivenessProbe == nil {
			t.Errorf("pod %s: the operator container lacks its startup/readiness/liveness probes", p.Name)
		}
		if p.Status.Phase != corev1.PodRunning || !podReady(p) || !st.Ready || st.Started == nil || !*st.Started {
			t.Errorf("pod %s: phase %s, Ready %t, container ready %t: want Running and Ready\n%s",
				p.Name, p.Status.Phase, podReady(p), st.Ready, s.Cluster.Report(ctx, s.ReleaseNS, OperatorLabel))
		}
		t.Logf("operator pod %s (%s): Running, Ready through its probes (readiness GET %s :%s), restarts %d, image %s",
			p.Name, p.Status.PodIP, c.ReadinessProbe.HTTPGet.Path, c.ReadinessProbe.HTTPGet.Port.String(), st.RestartCount, c.Image)
		names, ips = append(names, p.Name), append(ips, p.Status.PodIP)
	}

	// One leader: the Lease names one of the two pods, which keeps renewing it.
	lease, err := s.Lease(ctx)
	if err != nil {
		t.Fatalf("the operator's Lease %s/%s: %v", s.ReleaseNS, ReleaseName, err)
	}
	leader := holder(lease)
	if !slices.Contains(names, leader) {
		t.Fatalf("Lease %s/%s is held by %q, not by one of the operator pods %v", s.ReleaseNS, ReleaseName, leader, names)
	}
	first := renewed(lease)
	s.waitFor(t, "the leader renewing its Lease", 20*time.Second, s.ReleaseNS, OperatorLabel, func() (bool, string, error) {
		l, err := s.Lease(ctx)
		if err != nil {
			return false, "", err
		}
		return holder(l) == leader && renewed(l).After(first), fmt.Sprintf("holder %q renewed %s", holder(l), renewed(l)), nil
	})
	for i := range pods {
		logs := s.logs(t, &pods[i], "operator")
		leads := strings.Contains(logs, "became the leader")
		if leads != (pods[i].Name == leader) {
			t.Errorf("pod %s: logged %q: %t; holds the Lease: %t", pods[i].Name, "became the leader", leads, pods[i].Name == leader)
		}
	}
	t.Logf("exactly one leader: %s holds Lease %s/%s (transitions %d); the other pod's log has no %q",
		leader, s.ReleaseNS, ReleaseName, ptrInt(lease.Spec.LeaseTransitions), "became the leader")

	// The webhook: the API server calls the chart's Service, which resolves to the pods.
	mwc, err := s.Cluster.Kube.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, ReleaseName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range mwc.Webhooks {
		if w.Name != "pods.cloudsql.dev" {
			continue
		}
		svc := w.ClientConfig.Service
		if svc == nil || svc.Namespace != s.ReleaseNS || svc.Name != ReleaseName || len(w.ClientConfig.CABundle) == 0 {
			t.Fatalf("webhook pods.cloudsql.dev: clientConfig %+v (caBundle %d bytes): want the Service %s/%s and the operator's CA",
				w.ClientConfig.Service, len(w.ClientConfig.CABundle), s.ReleaseNS, ReleaseName)
		}
		t.Logf("webhook pods.cloudsql.dev calls Service %s/%s:%d%s (caBundle %d bytes, failurePolicy %s)",
			svc.Namespace, svc.Name, ptrInt(svc.Port), ptrString(svc.Path), len(w.ClientConfig.CABundle), *w.FailurePolicy)
	}
	slices_, err := s.Cluster.Kube.DiscoveryV1().EndpointSlices(s.ReleaseNS).List(ctx, metav1.ListOptions{LabelSelector: "kubernetes.io/service-name=" + ReleaseName})
	if err != nil {
		t.Fatal(err)
	}
	var endpoints []string
	for _, sl := range slices_.Items {
		for _, e := range sl.Endpoints {
			if e.Conditions.Ready != nil && *e.Conditions.Ready {
				endpoints = append(endpoints, e.Addresses...)
			}
		}
	}
	slices.Sort(endpoints)
	sortedIPs := slices.Sorted(slices.Values(ips))
	if !slices.Equal(endpoints, sortedIPs) {
		t.Errorf("Service %s/%s has ready endpoints %v, want the operator pods' IPs %v", s.ReleaseNS, ReleaseName, endpoints, sortedIPs)
	}

	ns := s.Namespace(t, "webhook", nil)
	v := s.vars(ns)
	s.Database(t, &v, "webhook")
	before := map[string]float64{}
	for i, ip := range ips {
		n, err := AdmissionCounter(ctx, ip, "mutate-pods", "patched")
		if err != nil {
			t.Fatal(err)
		}
		before[names[i]] = n
	}
	applied := s.ApplyScenario(t, "webhook.yaml", v)
	pod := toPod(t, applied["Pod/bare"])
	proxy := initContainer(pod, ProxyContainer)
	app := appContainer(pod, "app")
	if proxy == nil || proxy.RestartPolicy == nil || *proxy.RestartPolicy != corev1.ContainerRestartPolicyAlways {
		t.Fatalf("the bare Pod as created has no native proxy sidecar: init containers %v, annotations %v",
			containerNames(pod.Spec.InitContainers), pod.Annotations)
	}
	socket, _ := envValue(app, "INSTANCE_UNIX_SOCKET")
	poolMax, _ := envValue(app, "DB_POOL_MAX_CONNS")
	if want := "/cloudsql/" + s.Google.Instance.ConnectionName(); socket != want {
		t.Errorf("app env INSTANCE_UNIX_SOCKET=%q, want %q", socket, want)
	}
	if !strings.Contains(pod.Annotations["cloudsql.dev/admitted"], "bare-pods") {
		t.Errorf("pod annotation cloudsql.dev/admitted=%q does not name the binding bare-pods", pod.Annotations["cloudsql.dev/admitted"])
	}
	var servedBy []string
	for i, ip := range ips {
		n, err := AdmissionCounter(ctx, ip, "mutate-pods", "patched")
		if err != nil {
			t.Fatal(err)
		}
		if n > before[names[i]] {
			servedBy = append(servedBy, fmt.Sprintf("%s (%s): patched %v -> %v", names[i], ip, before[names[i]], n))
		}
	}
	if len(servedBy) == 0 {
		t.Fatalf("the Pod was injected, but no operator pod counted a patched mutate-pods admission (before: %v)", before)
	}
	t.Logf("bare Pod injected at creation by the in-cluster webhook, served by %s: proxy %s (restartPolicy Always), INSTANCE_UNIX_SOCKET=%s DB_POOL_MAX_CONNS=%s",
		strings.Join(servedBy, ", "), proxy.Image, socket, poolMax)

	done := s.waitPod(t, ns, "app=bare", "the bare Pod to run its app to completion", 2*time.Minute, func(p *corev1.Pod) (bool, string) {
		if p.Status.Phase == corev1.PodFailed {
			return false, "Failed"
		}
		if p.Status.Phase != corev1.PodSucceeded {
			return false, "phase " + string(p.Status.Phase)
		}
		return true, ""
	})
	t.Logf("bare Pod %s: %s; app: %s", done.Name, done.Status.Phase, line(s.logs(t, done, "app"), "gormapp: ok"))
}

func TestGormAppRunsInAPodThroughTheNativeProxySidecar(t *testing.T) {
	s := theSuite(t)
	ns := s.Namespace(t, "gorm", nil)
	v := s.vars(ns)
	s.Database(t, &v, "gorm")
	s.ApplyScenario(t, "gorm-deployment.yaml", v)
	grant := s.Granted(t, ns, "orders-api")

	pod := s.waitPod(t, ns, "app=orders-api", "an injected orders-api pod whose app finished its grant check", 3*time.Minute,
		func(p *corev1.Pod) (bool, string) {
			if !injectedWithProxy(p) {
				return false, "not injected (the operator patches the template, then the Deployment rolls)"
			}
			return s.logsHave(p, "app", "gormapp: grant check:")
		})
	logs := s.logs(t, pod, "app")
	t.Logf("pod %s (%s), app log:\n%s", pod.Name, pod.Status.PodIP, indent(logs))

	// The injection: a native sidecar capped at the grant, the app told the grant.
	proxy, app := initContainer(pod, ProxyContainer), appContainer(pod, "app")
	if proxy == nil || proxy.RestartPolicy == nil || *proxy.RestartPolicy != corev1.ContainerRestartPolicyAlways {
		t.Fatalf("the proxy is not a native sidecar (an init container with restartPolicy Always): init %v, containers %v",
			containerNames(pod.Spec.InitContainers), containerNames(pod.Spec.Containers))
	}
	if poolMax, _ := envValue(app, "DB_POOL_MAX_CONNS"); poolMax != fmt.Sprint(grant) {
		t.Errorf("app env DB_POOL_MAX_CONNS=%q, binding status.pool.grantedPerPod=%d", poolMax, grant)
	}
	if !hasArg(proxy, fmt.Sprintf("--max-connections=%d", grant)) || !hasArg(proxy, "--unix-socket=/cloudsql") {
		t.Errorf("proxy args %q: want --unix-socket=/cloudsql and --max-connections=%d", proxy.Args, grant)
	}

	// The proxy started before the app.
	ps, as := containerStatus(pod, ProxyContainer), containerStatus(pod, "app")
	if ps == nil || ps.State.Running == nil || ps.Started == nil || !*ps.Started || as == nil || as.State.Running == nil {
		t.Fatalf("proxy and app must both be running and the proxy started (its startup probe passed)\n%s", s.Cluster.Report(context.Background(), ns, "app=orders-api"))
	}
	proxyAt, appAt := ps.State.Running.StartedAt.Time, as.State.Running.StartedAt.Time
	if appAt.Before(proxyAt) {
		t.Errorf("the app started at %s, before the proxy (%s)", appAt, proxyAt)
	}
	startLine := line(logs, "socket present at start:")
	if !strings.Contains(startLine, "socket present at start: true") {
		t.Errorf("the app did not find the proxy's socket when it started: %q", startLine)
	}
	if as.RestartCount != 0 {
		var last string
		if term := as.LastTerminationState.Terminated; term != nil {
			last = fmt.Sprintf("exit %d (%s) at %s", term.ExitCode, term.Reason, term.FinishedAt.Format(time.TimeOnly))
		}
		previous, err := s.Cluster.Kube.CoreV1().Pods(ns).GetLogs(pod.Name,
			&corev1.PodLogOptions{Container: "app", Previous: true}).DoRaw(context.Background())
		if err != nil {
			previous = []byte(err.Error())
		}
		proxyLog, _ := s.Cluster.Logs(context.Background(), pod, ProxyContainer, 20)
		t.Errorf("the app restarted %d times; its last run: %s; its log:\n%s\nthe proxy's log:\n%s",
			as.RestartCount, last, indent(string(previous)), indent(proxyLog))
	}
	t.Logf("proxy started at %s (startup probe passed), app at %s; app: %q",
		proxyAt.Format(time.TimeOnly), appAt.Format(time.TimeOnly), startLine)

	// Its queries went through the Admin API fixture and the TLS fixture.
	if ok := line(logs, "gormapp: ok "); ok != fmt.Sprintf("gormapp: ok %s@%s rows=3 concurrent=%d maxOpenConns=%d", v.User, v.DB, 2*grant, grant) {
		t.Errorf("app: %q", ok)
	}
	calls := s.Google.AdminCallsFrom(pod.Status.PodIP)
	if !HasCall(calls, "GET", "/connectSettings") || !HasCall(calls, "POST", ":generateEphemeralCert") {
		t.Errorf("Admin API fixture calls from the pod %s: %q; want connectSettings and generateEphemeralCert", pod.Status.PodIP, calls)
	}
	tlsFrom := s.Google.TLS.AcceptedFrom()[pod.Status.PodIP]
	if tlsFrom < grant {
		t.Errorf("server-side TLS fixture: %d verified connections from the pod %s, want at least %d", tlsFrom, pod.Status.PodIP, grant)
	}
	t.Logf("crossed the fixtures: Admin API calls from %s: %q; server-side TLS connections from it: %d", pod.Status.PodIP, calls, tlsFrom)

	// 2 x grant at once: exactly grant get through.
	check := line(logs, "gormapp: grant check:")
	want := fmt.Sprintf("gormapp: grant check: %d of %d concurrent connections got through, %d refused (DB_POOL_MAX_CONNS=%d)", grant, 2*grant, grant, grant)
	if check != want {
		t.Errorf("app: %q\nwant: %q", check, want)
	}
}

func TestConnectorAppSizesItsPoolFromTheInjectedEnv(t *testing.T) {
	s := theSuite(t)
	ns := s.Namespace(t, "connector", nil)
	v := s.vars(ns)
	s.Database(t, &v, "connector")
	s.ApplyScenario(t, "connector-deployment.yaml", v)
	grant := s.Granted(t, ns, "billing")

	pod := s.waitPod(t, ns, "app=billing", "a billing pod whose connector app ran its queries", 3*time.Minute,
		func(p *corev1.Pod) (bool, string) {
			app := appContainer(p, "app")
			if _, ok := envValue(app, "INSTANCE_CONNECTION_NAME"); !ok {
				return false, "not injected yet"
			}
			return s.logsHave(p, "app", "connectorapp: ok")
		})
	logs := s.logs(t, pod, "app")
	t.Logf("pod %s (%s), app log:\n%s", pod.Name, pod.Status.PodIP, indent(logs))

	if injectedWithProxy(pod) {
		t.Errorf("Connector mode injected a proxy container")
	}
	app := appContainer(pod, "app")
	for name, want := range map[string]string{
		"INSTANCE_CONNECTION_NAME": s.Google.Instance.ConnectionName(),
		"DB_NAME":                  v.DB,
		"DB_USER":                  v.User,
		"DB_POOL_MAX_CONNS":        fmt.Sprint(grant),
	} {
		if got, _ := envValue(app, name); got != want {
			t.Errorf("app env %s=%q, want %q", name, got, want)
		}
	}
	want := fmt.Sprintf("connectorapp: ok %s@%s poolMaxConns=%d concurrent=%d peakConns=%d", v.User, v.DB, grant, 2*grant, grant)
	if got := line(logs, "connectorapp: ok"); got != want {
		t.Errorf("app: %q\nwant: %q", got, want)
	}
	calls := s.Google.AdminCallsFrom(pod.Status.PodIP)
	if !HasCall(calls, "GET", "/connectSettings") || !HasCall(calls, "POST", ":generateEphemeralCert") {
		t.Errorf("Admin API fixture calls from the pod %s: %q; want connectSettings and generateEphemeralCert", pod.Status.PodIP, calls)
	}
	tlsFrom := s.Google.TLS.AcceptedFrom()[pod.Status.PodIP]
	if tlsFrom < 1 || tlsFrom > grant {
		t.Errorf("server-side TLS fixture: %d verified connections from the pod, want 1 to %d (the pool's size)", tlsFrom, grant)
	}
	t.Logf("crossed the fixtures: Admin API calls from %s: %q; server-side TLS connections from it: %d (pool of %d)",
		pod.Status.PodIP, calls, tlsFrom, grant)
}

// waitJob waits for the Job's Complete condition, failing at once on Failed.
func (s *Suite) waitJob(t *testing.T, ns, name string, timeout time.Duration) {
	t.Helper()
	s.waitFor(t, "Job "+name+" to complete", timeout, ns, "", func() (bool, string, error) {
		j, err := s.Cluster.Kube.BatchV1().Jobs(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return false, "", err
		}
		for _, c := range j.Status.Conditions {
			if c.Status != corev1.ConditionTrue {
				continue
			}
			switch c.Type {
			case "Complete":
				return true, "", nil
			case "Failed":
				return false, "", stop("Job %s failed: %s %s\n%s", name, c.Reason, c.Message, s.Cluster.Report(context.Background(), ns, ""))
			}
		}
		return false, fmt.Sprintf("active %d succeeded %d failed %d", j.Status.Active, j.Status.Succeeded, j.Status.Failed), nil
	})
}

func (s *Suite) jobPod(t *testing.T, ns, job string) *corev1.Pod {
	t.Helper()
	list, err := s.Cluster.Kube.CoreV1().Pods(ns).List(context.Background(), metav1.ListOptions{LabelSelector: "job-name=" + job})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Items) != 1 {
		t.Fatalf("Job %s has %d pods, want 1\n%s", job, len(list.Items), s.Cluster.Report(context.Background(), ns, ""))
	}
	return &list.Items[0]
}

func TestJobWithTheNativeSidecarCompletes(t *testing.T) {
	s := theSuite(t)
	ns := s.Namespace(t, "job-native", nil)
	v := s.vars(ns)
	s.Database(t, &v, "jobnative")
	s.ApplyScenario(t, "job-native.yaml", v)
	s.waitJob(t, ns, "nightly-report", 3*time.Minute)

	pod := s.jobPod(t, ns, "nightly-report")
	proxy := initContainer(pod, ProxyContainer)
	if proxy == nil || proxy.RestartPolicy == nil || *proxy.RestartPolicy != corev1.ContainerRestartPolicyAlways {
		t.Fatalf("the Job's pod has no native proxy sidecar: init containers %v", containerNames(pod.Spec.InitContainers))
	}
	logs := s.logs(t, pod, "app")
	if !strings.Contains(logs, fmt.Sprintf("gormapp: ok %s@%s rows=3", v.User, v.DB)) {
		t.Errorf("app log:\n%s", logs)
	}
	ps, as := containerStatus(pod, ProxyContainer), containerStatus(pod, "app")
	if pod.Status.Phase != corev1.PodSucceeded || as.State.Terminated == nil || as.State.Terminated.ExitCode != 0 {
		t.Errorf("pod %s: phase %s, app %s; want Succeeded, exit 0", pod.Name, pod.Status.Phase, stateString(as.State))
	}
	if ps.State.Terminated == nil || ps.State.Terminated.ExitCode != 0 {
		t.Errorf("proxy after the app finished: %s; want stopped by the kubelet, exit 0 (--exit-zero-on-sigterm)", stateString(ps.State))
	}
	t.Logf("Job nightly-report Complete; pod %s %s; app %s (%s); proxy sidecar %s",
		pod.Name, pod.Status.Phase, stateString(as.State), line(logs, "gormapp: ok"), stateString(ps.State))
}

// QuitQuitQuitURL is where an app reaches the proxy's admin server: the operator
// gives a proxy in a regular container --quitquitquit and --admin-port=9091
// (src/plan: DEFAULT_ADMIN_PORT, moved up only if the pod already uses 9091), and
// the admin server listens on localhost, which the pod's containers share.
const QuitQuitQuitURL = "http://127.0.0.1:9091/quitquitquit"

func TestJobWithTheProxyAsARegularContainerCompletesAfterQuitQuitQuit(t *testing.T) {
	s := theSuite(t)
	ns := s.Namespace(t, "job-container", nil)
	v := s.vars(ns)
	v.QuitURL = QuitQuitQuitURL
	s.Database(t, &v, "jobcontainer")
	s.ApplyScenario(t, "job-container.yaml", v)

	pod := s.waitPod(t, ns, "job-name=nightly-export", "the nightly-export Job's pod", time.Minute,
		func(p *corev1.Pod) (bool, string) { return true, "" })
	proxy := appContainer(pod, ProxyContainer)
	if proxy == nil {
		t.Fatalf("the Job's pod has no regular proxy container: containers %v, init containers %v",
			containerNames(pod.Spec.Containers), containerNames(pod.Spec.InitContainers))
	}
	if !hasArg(proxy, "--quitquitquit") || !hasArg(proxy, "--admin-port=9091") {
		t.Fatalf("proxy args %q: the app posts to %s, so the proxy needs --quitquitquit and --admin-port=9091", proxy.Args, QuitQuitQuitURL)
	}
	s.waitJob(t, ns, "nightly-export", 3*time.Minute)

	pod = s.jobPod(t, ns, "nightly-export")
	appLogs, proxyLogs := s.logs(t, pod, "app"), s.logs(t, pod, ProxyContainer)
	ps, as := containerStatus(pod, ProxyContainer), containerStatus(pod, "app")
	if pod.Status.Phase != corev1.PodSucceeded {
		t.Errorf("pod %s: phase %s, want Succeeded", pod.Name, pod.Status.Phase)
	}
	if as.State.Terminated == nil || as.State.Terminated.ExitCode != 0 || ps.State.Terminated == nil || ps.State.Terminated.ExitCode != 0 {
		t.Errorf("app %s, proxy %s: want both exit 0", stateString(as.State), stateString(ps.State))
	}
	if !strings.Contains(appLogs, fmt.Sprintf("gormapp: ok %s@%s rows=3", v.User, v.DB)) || !strings.Contains(appLogs, "POST "+QuitQuitQuitURL+": 200 OK") {
		t.Errorf("app log:\n%s", appLogs)
	}
	if !strings.Contains(proxyLogs, "/quitquitquit received request") {
		t.Errorf("proxy log has no /quitquitquit:\n%s", proxyLogs)
	}
	t.Logf("Job nightly-export Complete; app %s: %q, %q; proxy %s: %q", stateString(as.State),
		line(appLogs, "gormapp: ok"), line(appLogs, "quitquitquit"), stateString(ps.State), line(proxyLogs, "/quitquitquit received request"))
}

func TestInjectedPodsRunUnderPodSecurityRestricted(t *testing.T) {
	s := theSuite(t)
	ctx := context.Background()
	ns := s.Namespace(t, "restricted", map[string]string{
		"pod-security.kubernetes.io/enforce":         "restricted",
		"pod-security.kubernetes.io/enforce-version": "latest",
	})

	// First, that the namespace really enforces: a Pod without the restricted
	// security context is refused (a dry run).
	bad := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "unrestricted", Namespace: ns},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: GormAppImage}}},
	}
	_, err := s.Cluster.Kube.CoreV1().Pods(ns).Create(ctx, bad, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
	if err == nil || !strings.Contains(err.Error(), "violates PodSecurity") {
		t.Fatalf("a Pod without a restricted security context was not refused in %s (err: %v): Pod Security admission does not enforce here", ns, err)
	}
	t.Logf("the namespace enforces restricted: %v", err)

	v := s.vars(ns)
	s.Database(t, &v, "restricted")
	s.ApplyScenario(t, "restricted.yaml", v)
	pod := s.waitPod(t, ns, "app=ledger", "an injected ledger pod running and Ready, its first query done", 3*time.Minute,
		func(p *corev1.Pod) (bool, string) {
			if !injectedWithProxy(p) {
				return false, "not injected yet"
			}
			if !podReady(p) {
				return false, "phase " + string(p.Status.Phase) + ", not Ready"
			}
			return s.logsHave(p, "app", "gormapp: ok")
		})
	ps, as := containerStatus(pod, ProxyContainer), containerStatus(pod, "app")
	if ps.State.Running == nil || as.State.Running == nil {
		t.Errorf("proxy %s, app %s: want both running", stateString(ps.State), stateString(as.State))
	}
	logs := s.logs(t, pod, "app")
	if want := fmt.Sprintf("gormapp: ok %s@%s rows=3", v.User, v.DB); !strings.Contains(logs, want) {
		t.Errorf("app log has no %q:\n%s", want, logs)
	}
	// Pods the ReplicaSets could not create (refused by Pod Security) show as events.
	evs, err := s.Cluster.Kube.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "reason=FailedCreate"})
	if err == nil && len(evs.Items) > 0 {
		t.Errorf("pod creations refused in %s: %s", ns, evs.Items[0].Message)
	}
	t.Logf("pod %s runs under restricted: proxy %s, app %s; %q", pod.Name, stateString(ps.State), stateString(as.State), line(logs, "gormapp: ok"))
}

func TestKillingTheLeaderHandsTheLeaseToTheOtherPod(t *testing.T) {
	s := theSuite(t)
	ctx := context.Background()

	// 1. The leader's process dies (SIGKILL, no chance to release the Lease): the
	// kubelet restarts the container, and a leader renews the Lease again.
	leaderPod := s.currentLeader(t)
	restarts := containerStatus(leaderPod, "operator").RestartCount
	killed := time.Now()
	s.killOperator(t, leaderPod)
	var renewedBy string
	var renewedAfter time.Duration
	s.waitFor(t, "a leader renewing the Lease after the leader's process was killed", 60*time.Second, s.ReleaseNS, OperatorLabel,
		func() (bool, string, error) {
			l, err := s.Lease(ctx)
			if err != nil {
				return false, "", err
			}
			if holder(l) != "" && renewed(l).After(killed) {
				renewedBy, renewedAfter = holder(l), time.Since(killed)
				return true, "", nil
			}
			return false, fmt.Sprintf("holder %q last renewed %s", holder(l), renewed(l).Format(time.StampMicro)), nil
		})
	s.waitPod(t, s.ReleaseNS, OperatorLabel, "the kubelet to restart the killed operator container and the pod to be Ready again", 2*time.Minute,
		func(p *corev1.Pod) (bool, string) {
			if p.Name != leaderPod.Name {
				return false, "another pod"
			}
			st := containerStatus(p, "operator")
			return st.RestartCount > restarts && podReady(p), fmt.Sprintf("restarts %d, ready %t", st.RestartCount, podReady(p))
		})
	readyAfter := time.Since(killed)
	who := "the restarted pod itself (same identity)"
	if renewedBy != leaderPod.Name {
		who = "the other pod"
	}
	t.Logf("leader %s SIGKILLed: Lease renewed %.1fs later by %s, %s; pod restarted by the kubelet and Ready after %.1fs",
		leaderPod.Name, renewedAfter.Seconds(), renewedBy, who, readyAfter.Seconds())
	fmt.Printf("FIGURE leader_process_killed_lease_renewed_seconds=%.1f\n", renewedAfter.Seconds())
	fmt.Printf("FIGURE leader_process_killed_pod_ready_seconds=%.1f\n", readyAfter.Seconds())

	// 2. The leader's pod goes with its process (SIGKILL, then the pod deleted
	// with grace period 0, as a lost node would take it): nothing releases the
	// Lease, so the other pod takes over when it expires (15 s after the last
	// renewal), and the ReplicaSet's replacement becomes Ready. A delete with
	// grace 0 alone gives the process SIGTERM and the kubelet's 2 s minimum to
	// release the Lease, which it does or not depending on how fast its
	// controllers stop (up to 3 s): the takeover then takes 2 or 15 s.
	h := s.deleteLeader(t, ptr(int64(0)), true)
	if h.newHolder != h.survivor {
		t.Errorf("the Lease went to %s, not to the surviving pod %s", h.newHolder, h.survivor)
	}
	t.Logf("leader %s killed and deleted (grace 0), its last renewal %.1fs before: %s took the Lease after %.1fs (holders: %s); replacement %s Ready after %.1fs",
		h.old, h.lastRenewal.Seconds(), h.newHolder, h.takeover.Seconds(), strings.Join(h.seen, " -> "), h.replacement, h.replacementReady.Seconds())
	fmt.Printf("FIGURE leader_takeover_seconds=%.1f\n", h.takeover.Seconds())
	fmt.Printf("FIGURE leader_replacement_ready_seconds=%.1f\n", h.replacementReady.Seconds())

	// 3. The leader's pod is deleted the ordinary way (SIGTERM, its grace period):
	// it releases the Lease as it stops, and another pod takes it without waiting
	// for it to expire.
	h = s.deleteLeader(t, nil, false)
	t.Logf("leader %s deleted (grace %ds): %s took the Lease after %.1fs (holders: %s); replacement %s Ready after %.1fs",
		h.old, h.grace, h.newHolder, h.takeover.Seconds(), strings.Join(h.seen, " -> "), h.replacement, h.replacementReady.Seconds())
	fmt.Printf("FIGURE leader_graceful_handover_seconds=%.1f\n", h.takeover.Seconds())
}

// handover is what deleting the leader's pod led to.
type handover struct {
	old, survivor, newHolder, replacement string
	grace                                 int64
	lastRenewal                           time.Duration // before the deletion
	takeover, replacementReady            time.Duration // after it
	seen                                  []string      // the Lease's holders, as they changed
}

// deleteLeader deletes the pod holding the Lease (with the given grace period,
// or the pod's own; SIGKILLing its process first when kill is set) once both
// replicas are Ready, and waits until another pod holds the Lease and a
// replacement pod is Ready, timing both from the deletion.
func (s *Suite) deleteLeader(t *testing.T, grace *int64, kill bool) handover {
	t.Helper()
	ctx := context.Background()
	if err := s.waitOperatorRolledOut(ctx, 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	leader := s.currentLeader(t)
	pods, err := s.OperatorPods(ctx)
	if err != nil {
		t.Fatal(err)
	}
	h := handover{old: leader.Name}
	for _, p := range pods {
		if p.Name != leader.Name {
			h.survivor = p.Name
		}
	}
	h.grace = ptrInt(leader.Spec.TerminationGracePeriodSeconds)
	if grace != nil {
		h.grace = *grace
	}
	l, err := s.Lease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	deleted := time.Now()
	h.lastRenewal = deleted.Sub(renewed(l))
	if kill {
		s.killOperator(t, leader)
	}
	if err := s.Cluster.Kube.CoreV1().Pods(s.ReleaseNS).Delete(ctx, leader.Name, metav1.DeleteOptions{GracePeriodSeconds: grace}); err != nil {
		t.Fatal(err)
	}
	what := fmt.Sprintf("another pod to take the Lease from %s (deleted, grace %ds) and a replacement pod to be Ready", leader.Name, h.grace)
	s.waitFor(t, what, 90*time.Second, s.ReleaseNS, OperatorLabel, func() (bool, string, error) {
		l, err := s.Lease(ctx)
		if err != nil {
			return false, "", err
		}
		holder := holder(l)
		if len(h.seen) == 0 || !strings.HasPrefix(h.seen[len(h.seen)-1], fmt.Sprintf("%q", holder)) {
			h.seen = append(h.seen, fmt.Sprintf("%q at +%.1fs", holder, time.Since(deleted).Seconds()))
		}
		if h.takeover == 0 && holder != "" && holder != leader.Name {
			h.newHolder, h.takeover = holder, time.Since(deleted)
		}
		list, err := s.Cluster.Kube.CoreV1().Pods(s.ReleaseNS).List(ctx, metav1.ListOptions{LabelSelector: OperatorLabel})
		if err != nil {
			return false, "", err
		}
		ready := 0
		for i := range list.Items {
			p := &list.Items[i]
			if p.Name == leader.Name || p.DeletionTimestamp != nil || !podReady(p) {
				continue
			}
			ready++
			if p.Name != h.survivor && h.replacementReady == 0 {
				h.replacement, h.replacementReady = p.Name, time.Since(deleted)
			}
		}
		return h.takeover > 0 && h.replacementReady > 0,
			fmt.Sprintf("holders seen: %s; %d ready pods besides %s", strings.Join(h.seen, " -> "), ready, leader.Name), nil
	})
	return h
}

func ptr[T any](v T) *T { return &v }

// killOperator SIGKILLs the operator process of pod through the node's containerd.
func (s *Suite) killOperator(t *testing.T, pod *corev1.Pod) {
	t.Helper()
	id := strings.TrimPrefix(containerStatus(pod, "operator").ContainerID, "containerd://")
	if out, err := exec.Command("ctr", "--address", s.Cluster.Containerd, "-n", "k8s.io", "task", "kill", "--signal", "SIGKILL", id).CombinedOutput(); err != nil {
		t.Fatalf("killing the operator's process (container %s of %s): %v\n%s", id, pod.Name, err, out)
	}
}

// currentLeader returns the operator pod holding the Lease.
func (s *Suite) currentLeader(t *testing.T) *corev1.Pod {
	t.Helper()
	ctx := context.Background()
	l, err := s.Lease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	p, err := s.Cluster.Kube.CoreV1().Pods(s.ReleaseNS).Get(ctx, holder(l), metav1.GetOptions{})
	if err != nil {
		t.Fatalf("the Lease holder %q: %v", holder(l), err)
	}
	return p
}

// The loop of pod creations during the upgrade: about loopWorkers/loopInterval
// creations a second (the more, the likelier a roll's brief webhook outage is
// seen).
const (
	loopWorkers  = 4
	loopInterval = 200 * time.Millisecond
)

// creation is one pod created by the loop during the upgrade.
type creation struct {
	at       time.Time
	err      error
	name     string
	injected bool
}

func TestHelmUpgradeRollsTheOperatorWithoutFailingPodCreations(t *testing.T) {
	s := theSuite(t)
	ctx := context.Background()
	ns := s.Namespace(t, "upgrade", nil)
	v := s.vars(ns)
	s.Database(t, &v, "loop")
	s.ApplyScenario(t, "upgrade-loop.yaml", v)
	objs, err := Render("upgrade-loop.yaml", v)
	if err != nil {
		t.Fatal(err)
	}
	var tmpl corev1.Pod
	for _, o := range objs {
		if o.GetKind() == "Pod" {
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &tmpl); err != nil {
				t.Fatal(err)
			}
		}
	}

	// From now until the roll is over, loopWorkers creators each create a Pod
	// every loopInterval (and delete it at once).
	var mu sync.Mutex
	var created []creation
	stopLoop := make(chan struct{})
	var loop sync.WaitGroup
	for range loopWorkers {
		loop.Add(1)
		go func() {
			defer loop.Done()
			zero := int64(0)
			tick := time.NewTicker(loopInterval)
			defer tick.Stop()
			for {
				select {
				case <-stopLoop:
					return
				case <-tick.C:
				}
				c := creation{at: time.Now()}
				cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
				got, err := s.Cluster.Kube.CoreV1().Pods(ns).Create(cctx, tmpl.DeepCopy(), metav1.CreateOptions{})
				cancel()
				c.err = err
				if err == nil {
					c.name, c.injected = got.Name, injectedWithProxy(got)
					_ = s.Cluster.Kube.CoreV1().Pods(ns).Delete(ctx, got.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
				}
				mu.Lock()
				created = append(created, c)
				mu.Unlock()
			}
		}()
	}
	stopped := false
	stopIt := func() {
		if !stopped {
			stopped = true
			close(stopLoop)
			loop.Wait()
		}
	}
	defer stopIt()

	time.Sleep(3 * time.Second)
	mu.Lock()
	warm := slices.Clone(created)
	mu.Unlock()
	for _, c := range warm {
		if c.err != nil || !c.injected {
			t.Fatalf("before the upgrade, the loop's pod creation already fails or is not injected (%v, injected %t): fix that first", c.err, c.injected)
		}
	}

	oldPods, err := s.OperatorPods(ctx)
	if err != nil {
		t.Fatal(err)
	}
	roll := fmt.Sprintf("podAnnotations:\n  e2e.cloudsql.dev/rolled-at: %q\n", time.Now().UTC().Format(time.RFC3339))
	rollValues := s.Dir + "/roll.yaml"
	if err := writeFile(rollValues, roll); err != nil {
		t.Fatal(err)
	}
	rollStart := time.Now()
	if _, err := s.Helm.Run(ctx, "upgrade", ReleaseName, s.Chart, "--namespace", s.ReleaseNS,
		"-f", s.ValuesFile, "-f", rollValues); err != nil {
		t.Fatalf("%v\n(Helm 4 upgrades by server-side apply: a field that both the chart and the operator set, with different values, is a conflict)", err)
	}
	if err := s.waitOperatorRolledOut(ctx, 4*time.Minute); err != nil {
		t.Fatal(err)
	}
	s.waitFor(t, "the old operator pods to be gone", 2*time.Minute, s.ReleaseNS, OperatorLabel, func() (bool, string, error) {
		list, err := s.Cluster.Kube.CoreV1().Pods(s.ReleaseNS).List(ctx, metav1.ListOptions{LabelSelector: OperatorLabel})
		if err != nil {
			return false, "", err
		}
		var left []string
		for _, p := range list.Items {
			for _, o := range oldPods {
				if p.Name == o.Name {
					left = append(left, p.Name)
				}
			}
		}
		return len(left) == 0, fmt.Sprintf("old pods left: %v", left), nil
	})
	rollEnd := time.Now()
	time.Sleep(3 * time.Second)
	stopIt()

	newPods, err := s.OperatorPods(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range newPods {
		if p.Annotations["e2e.cloudsql.dev/rolled-at"] == "" {
			t.Errorf("operator pod %s is not from the upgraded template", p.Name)
		}
	}

	var failures, missed, during int
	var problems []string
	for _, c := range created {
		if !c.at.Before(rollStart) && !c.at.After(rollEnd) {
			during++
		}
		rel := fmt.Sprintf("+%.1fs", c.at.Sub(rollStart).Seconds())
		switch {
		case c.err != nil:
			failures++
			problems = append(problems, fmt.Sprintf("%s creation failed: %v", rel, c.err))
		case !c.injected:
			missed++
			problems = append(problems, fmt.Sprintf("%s pod %s created without the injection (the webhook was not reached: failurePolicy Ignore)", rel, c.name))
		}
	}
	rollSeconds := rollEnd.Sub(rollStart).Seconds()
	t.Logf("helm upgrade rolled the operator (%v -> %v) in %.1fs; %d pods created in the loop (%d during the roll): %d failed, %d not injected",
		podNames(oldPods), podNames(newPods), rollSeconds, len(created), during, failures, missed)
	fmt.Printf("FIGURE upgrade_roll_seconds=%.1f\n", rollSeconds)
	fmt.Printf("FIGURE upgrade_pod_creations=%d\n", len(created))
	fmt.Printf("FIGURE upgrade_pod_creations_during_roll=%d\n", during)
	fmt.Printf("FIGURE upgrade_pod_creation_failures=%d\n", failures)
	fmt.Printf("FIGURE upgrade_pods_not_injected=%d\n", missed)
	if len(problems) > 0 {
		if len(problems) > 20 {
			problems = append(problems[:20], fmt.Sprintf("... and %d more", len(problems)-20))
		}
		t.Errorf("pod creations during the roll (roll from +0s to +%.1fs):\n  %s", rollSeconds, strings.Join(problems, "\n  "))
	}
}

func podNames(pods []corev1.Pod) []string {
	var out []string
	for _, p := range pods {
		out = append(out, p.Name)
	}
	return out
}

func containerNames(cs []corev1.Container) []string {
	var out []string
	for _, c := range cs {
		out = append(out, c.Name)
	}
	return out
}

func indent(s string) string {
	return "    " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n    ")
}

func ptrInt[T ~int32 | ~int64](p *T) T {
	if p == nil {
		return 0
	}
	return *p
}

func ptrString(p *string) string {
	if p == nil {
		return ""
	}
	return *p
}

func writeFile(path, content string) error { return os.WriteFile(path, []byte(content), 0o644) }
