package datapath

// The whole data path for one test run:
//
//	app (env from the manifest) -> Unix socket -> cloud-sql-proxy (args from the manifest)
//	  -> HTTPS: SQLAdminFixture (stands in for the Cloud SQL Admin API)
//	  -> mTLS on 127.0.0.1:3307: ServerSideTLS (stands in for the instance's server side)
//	  -> PostgreSQL on loopback

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// FixtureDatabaseVersion is what the Admin API fixture reports; the proxy only looks
// at the POSTGRES prefix (it makes the socket a directory holding .s.PGSQL.5432).
// It matches e2e/datapath/testdata/input.yaml, whatever the local server's major is.
const FixtureDatabaseVersion = "POSTGRES_16"

// Stack is the running data path.
type Stack struct {
	Dir      string    // temporary root; pod volumes live under Dir/<volume name>
	Workload *Workload // what the operator rendered
	AppEnv   []string  // the app container's env, re-rooted: all the app gets
	Socket   string    // INSTANCE_UNIX_SOCKET, re-rooted
	DBName   string
	DBUser   string
	PoolMax  int    // DB_POOL_MAX_CONNS
	Health   string // base URL of the proxy's health endpoints, if --health-check

	Postgres *Postgres
	Admin    *SQLAdminFixture
	TLS      *ServerSideTLS
	Proxy    *Proxy

	stops []func()
}

// StartStack brings the data path up from a rendered manifest and a proxy binary.
func StartStack(manifest, proxyBin string) (s *Stack, err error) {
	w, err := LoadWorkload(manifest)
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "datapath-") // short: Unix socket paths are limited to 107 bytes
	if err != nil {
		return nil, err
	}
	s = &Stack{Dir: dir, Workload: w}
	s.stops = append(s.stops, func() { _ = os.RemoveAll(dir) })
	defer func() {
		if err != nil {
			s.Stop()
			s = nil
		}
	}()
	if err := os.Chmod(dir, 0o755); err != nil { // the postgres user must reach its data dir
		return s, err
	}

	// The pod's volumes, as the kubelet would create them (the emptyDir at /cloudsql).
	for _, m := range append(w.Proxy.VolumeMounts, w.App.VolumeMounts...) {
		if err := os.MkdirAll(filepath.Join(dir, m.Name), 0o755); err != nil {
			return s, err
		}
	}
	if s.AppEnv, err = w.AppEnv(dir); err != nil {
		return s, err
	}
	for _, name := range []string{"INSTANCE_UNIX_SOCKET", "DB_NAME", "DB_USER", "DB_POOL_MAX_CONNS"} {
		if Getenv(s.AppEnv, name) == "" {
			return s, fmt.Errorf("%s: app container %q has no env %s", manifest, w.App.Name, name)
		}
	}
	s.Socket, s.DBName, s.DBUser = Getenv(s.AppEnv, "INSTANCE_UNIX_SOCKET"), Getenv(s.AppEnv, "DB_NAME"), Getenv(s.AppEnv, "DB_USER")
	if s.PoolMax, err = strconv.Atoi(Getenv(s.AppEnv, "DB_POOL_MAX_CONNS")); err != nil || s.PoolMax < 1 {
		return s, fmt.Errorf("%s: DB_POOL_MAX_CONNS=%q is not a positive number", manifest, Getenv(s.AppEnv, "DB_POOL_MAX_CONNS"))
	}
	// The socket is DIR/PROJECT:REGION:INSTANCE; the fixture serves that instance.
	parts := strings.Split(filepath.Base(s.Socket), ":")
	if len(parts) != 3 {
		return s, fmt.Errorf("%s: INSTANCE_UNIX_SOCKET %q does not end in PROJECT:REGION:INSTANCE", manifest, s.Socket)
	}
	inst := Instance{Project: parts[0], Region: parts[1], Name: parts[2], DatabaseVersion: FixtureDatabaseVersion, IP: "127.0.0.1"}

	if s.Postgres, err = StartPostgres(dir, 4*s.PoolMax+20); err != nil {
		return s, err
	}
	s.stops = append(s.stops, s.Postgres.Stop)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.Postgres.CreateDatabase(ctx, s.DBName, s.DBUser); err != nil {
		return s, err
	}

	if s.Admin, err = NewSQLAdminFixture(inst); err != nil {
		return s, err
	}
	s.stops = append(s.stops, s.Admin.Close)
	caFile := filepath.Join(dir, "fixture-sqladmin-ca.pem")
	if err := os.WriteFile(caFile, s.Admin.APICA.PEM(), 0o644); err != nil {
		return s, err
	}
	if s.TLS, err = NewServerSideTLS(s.Admin, inst.IP, s.Postgres.Addr()); err != nil {
		return s, err
	}
	s.stops = append(s.stops, s.TLS.Close)

	for _, a := range w.rawArgs() {
		if strings.HasPrefix(a, "--enable-builtin-metrics") && a != "--enable-builtin-metrics=false" {
			return s, fmt.Errorf("%s: proxy arg %q would export metrics to Cloud Monitoring, which this test does not stand in", manifest, a)
		}
	}
	// The operator's args, verbatim but for the volume path and the local ports,
	// plus the two flags that point the proxy at the fixture instead of Google.
	ports := map[string]string{}
	for _, flag := range []string{"--http-port", "--admin-port"} {
		p, err := freePort()
		if err != nil {
			return s, err
		}
		ports[flag] = strconv.Itoa(p)
	}
	args := append(w.ProxyArgs(dir, ports), "--sqladmin-api-endpoint="+s.Admin.URL, "--token="+s.Admin.Token)
	env, err := w.ProxyEnv(dir)
	if err != nil {
		return s, err
	}
	env = append(env,
		"HOME="+dir,
		"SSL_CERT_FILE="+caFile, // trust the fixture's HTTPS certificate
		// Cloud Monitoring is Google's side too, and this test stands in no metrics
		// backend: turn off the built-in metrics export (on by default since proxy
		// 2.27; it also probes the GCE metadata server) so nothing leaves loopback.
		"CSQL_PROXY_ENABLE_BUILTIN_METRICS=false",
	)
	if s.Proxy, err = StartProxy(proxyBin, args, env, filepath.Join(dir, "cloud-sql-proxy.log")); err != nil {
		return s, err
	}
	s.stops = append(s.stops, func() { _ = s.Proxy.Stop() })
	healthURL := ""
	if w.HasFlag("--health-check") && w.HasFlag("--http-port") {
		s.Health = "http://127.0.0.1:" + ports["--http-port"]
		healthURL = s.Health + "/startup"
	}
	if err := s.Proxy.WaitForSocket(filepath.Join(s.Socket, ".s.PGSQL.5432"), healthURL, 60*time.Second); err != nil {
		return s, err
	}
	return s, nil
}

// Stop tears everything down in reverse order.
func (s *Stack) Stop() {
	for i := len(s.stops) - 1; i >= 0; i-- {
		s.stops[i]()
	}
	s.stops = nil
}
