// Command connectorapp is a Go app bound in Connector mode: no sidecar, it dials
// the instance in-process with the Cloud SQL Go connector
// (cloud.google.com/go/cloudsqlconn), the way Google's pgx sample does.
//
// It reads only the env the operator injects:
//
//	INSTANCE_CONNECTION_NAME  PROJECT:REGION:INSTANCE
//	DB_NAME, DB_USER          the database and its user
//	DB_POOL_MAX_CONNS         the pool's size (pgxpool MaxConns)
//
// and, because Google's side is played by a fixture here, where that fixture is
// (set in the test's image, never injected):
//
//	FIXTURE_SQLADMIN_API_ENDPOINT  the Admin API fixture's base URL
//	FIXTURE_SQLADMIN_TOKEN         the bearer token it accepts
//	FIXTURE_SQLADMIN_CA_FILE       the CA of its HTTPS certificate
//
// It runs a query, then 2 × DB_POOL_MAX_CONNS queries at once, and prints one
// line with the pool's size and the most connections it ever held. With -serve it
// then stays up until SIGTERM. With -hold it stays up right after the first query
// instead, its pool open and idle (the pod bench, cmd/podbench).
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	"cloud.google.com/go/cloudsqlconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/oauth2"
)

// holdPool is -hold: after the first query, stay up until SIGTERM with the pool open.
var holdPool bool

func main() {
	serve := flag.Bool("serve", false, "stay up until SIGTERM when done")
	flag.BoolVar(&holdPool, "hold", false, "after the first query, stay up until SIGTERM with the pool open and idle")
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "connectorapp:", err)
		os.Exit(1)
	}
	if *serve {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		fmt.Println("connectorapp: serving until SIGTERM")
		<-sig
	}
}

func env(names ...string) (map[string]string, error) {
	out := map[string]string{}
	for _, n := range names {
		v := os.Getenv(n)
		if v == "" {
			return nil, fmt.Errorf("env %s is not set", n)
		}
		out[n] = v
	}
	return out, nil
}

// fixtureClient is the Admin API's HTTP client: it trusts only the fixture's CA
// and sends the fixture's token.
func fixtureClient(caFile string, ts oauth2.TokenSource) (*http.Client, error) {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s holds no PEM certificate", caFile)
	}
	base := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}}
	return &http.Client{Transport: &oauth2.Transport{Source: ts, Base: base}, Timeout: 30 * time.Second}, nil
}

func run() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	e, err := env("INSTANCE_CONNECTION_NAME", "DB_NAME", "DB_USER", "DB_POOL_MAX_CONNS",
		"FIXTURE_SQLADMIN_API_ENDPOINT", "FIXTURE_SQLADMIN_TOKEN", "FIXTURE_SQLADMIN_CA_FILE")
	if err != nil {
		return err
	}
	poolMax, err := strconv.Atoi(e["DB_POOL_MAX_CONNS"])
	if err != nil || poolMax < 1 {
		return fmt.Errorf("DB_POOL_MAX_CONNS=%q is not a positive number", e["DB_POOL_MAX_CONNS"])
	}

	ts := oauth2.StaticTokenSource(&oauth2.Token{AccessToken: e["FIXTURE_SQLADMIN_TOKEN"]})
	client, err := fixtureClient(e["FIXTURE_SQLADMIN_CA_FILE"], ts)
	if err != nil {
		return err
	}
	dialer, err := cloudsqlconn.NewDialer(ctx,
		cloudsqlconn.WithAdminAPIEndpoint(e["FIXTURE_SQLADMIN_API_ENDPOINT"]),
		cloudsqlconn.WithTokenSource(ts),
		cloudsqlconn.WithHTTPClient(client),
		// Metrics go to Cloud Monitoring, which has no stand-in here.
		cloudsqlconn.WithBuiltInMetrics(false),
	)
	if err != nil {
		return fmt.Errorf("cloudsqlconn.NewDialer: %w", err)
	}
	defer dialer.Close()

	// As in Google's pgx sample: no host, every connection dialled by the connector.
	cfg, err := pgxpool.ParseConfig(fmt.Sprintf("user=%s dbname=%s sslmode=disable", e["DB_USER"], e["DB_NAME"]))
	if err != nil {
		return err
	}
	cfg.MaxConns = int32(poolMax)
	icn := e["INSTANCE_CONNECTION_NAME"]
	cfg.ConnConfig.DialFunc = func(ctx context.Context, _, _ string) (net.Conn, error) {
		return dialer.Dial(ctx, icn)
	}
	firstStart := time.Now()
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer pool.Close()

	var who string
	if err := pool.QueryRow(ctx, "select current_user || '@' || current_database()").Scan(&who); err != nil {
		return fmt.Errorf("first query: %w", err)
	}
	if holdPool {
		// The pod bench measures this pod idle, holding its pool (and so its
		// connection), until it is deleted.
		fmt.Printf("connectorapp: first query ok as %s in %dms; holding the pool until SIGTERM\n",
			who, time.Since(firstStart).Milliseconds())
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
		return nil
	}

	// Twice the pool's size at once: the pool queues them and never opens more
	// than DB_POOL_MAX_CONNS connections.
	var wg sync.WaitGroup
	errs := make(chan error, 2*poolMax)
	var peak int32
	var mu sync.Mutex
	for range 2 * poolMax {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := pool.Exec(ctx, "select pg_sleep(0.3)")
			mu.Lock()
			peak = max(peak, pool.Stat().TotalConns())
			mu.Unlock()
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			return fmt.Errorf("concurrent query: %w", err)
		}
	}
	peak = max(peak, pool.Stat().TotalConns())
	fmt.Printf("connectorapp: ok %s poolMaxConns=%d concurrent=%d peakConns=%d\n",
		who, pool.Config().MaxConns, 2*poolMax, peak)
	return nil
}
