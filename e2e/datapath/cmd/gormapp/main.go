// Command gormapp is a typical Go app bound by cloudsql-binder: it knows nothing but
// the env the operator injects (INSTANCE_UNIX_SOCKET, DB_NAME, DB_USER,
// DB_POOL_MAX_CONNS) and connects the way Google's samples do, through the proxy's
// Unix socket with GORM's PostgreSQL driver.
//
// Without flags it migrates, writes and reads, runs 2 × DB_POOL_MAX_CONNS queries
// through its pool, prints one "gormapp: ok ..." line and exits (the data-path test,
// e2e/datapath). The flags are for running it in a pod (e2e/node):
//
//	-startup-report  first print whether the socket was there when the app started
//	                 (with a native sidecar it must be: the proxy starts first) and
//	                 how long the first query took
//	-wait-socket D   wait up to D for the socket first (a proxy in a regular
//	                 container starts alongside the app, not before it)
//	-grant-check     then open 2 × DB_POOL_MAX_CONNS connections at once, bypassing
//	                 the pool, and print how many got through (the proxy's
//	                 --max-connections must let exactly DB_POOL_MAX_CONNS through)
//	-quitquitquit U  last, POST to U (the proxy's http://127.0.0.1:ADMIN/quitquitquit)
//	                 so a proxy in a regular container exits and the Job completes
//	-serve           then stay up until SIGTERM (a Deployment's app)
//	-hold            right after the first query, stay up until SIGTERM with the
//	                 pool open and idle (the pod bench, e2e/node/cmd/podbench)
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"
)

// Order is the table the app migrates.
type Order struct {
	ID   uint `gorm:"primaryKey"`
	Item string
	Qty  int
}

type options struct {
	startupReport bool
	waitSocket    time.Duration
	grantCheck    bool
	quitURL       string
	serve         bool
	hold          bool
}

func main() {
	var o options
	flag.BoolVar(&o.startupReport, "startup-report", false, "print whether the socket existed at start and the first query's latency")
	flag.DurationVar(&o.waitSocket, "wait-socket", 0, "wait up to this long for the proxy's socket")
	flag.BoolVar(&o.grantCheck, "grant-check", false, "open 2 x DB_POOL_MAX_CONNS connections at once and report how many got through")
	flag.StringVar(&o.quitURL, "quitquitquit", "", "POST here when done (the proxy's /quitquitquit)")
	flag.BoolVar(&o.serve, "serve", false, "stay up until SIGTERM when done")
	flag.BoolVar(&o.hold, "hold", false, "after the first query, stay up until SIGTERM with the pool open and idle")
	flag.Parse()
	err := run(o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "gormapp:", err)
	}
	if o.quitURL != "" { // also after a failure: the Job must end either way
		if qerr := quit(o.quitURL); qerr != nil {
			fmt.Fprintln(os.Stderr, "gormapp:", qerr)
			err = errors.Join(err, qerr)
		}
	}
	if err != nil {
		os.Exit(1)
	}
	if o.serve {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		fmt.Println("gormapp: serving until SIGTERM")
		<-sig
	}
}

func mustEnv(name string) (string, error) {
	v := os.Getenv(name)
	if v == "" {
		return "", fmt.Errorf("env %s is not set", name)
	}
	return v, nil
}

func run(o options) error {
	start := time.Now()
	var socket, name, user, poolMax string
	for _, e := range []struct {
		dst  *string
		name string
	}{{&socket, "INSTANCE_UNIX_SOCKET"}, {&name, "DB_NAME"}, {&user, "DB_USER"}, {&poolMax, "DB_POOL_MAX_CONNS"}} {
		v, err := mustEnv(e.name)
		if err != nil {
			return err
		}
		*e.dst = v
	}
	maxConns, err := strconv.Atoi(poolMax)
	if err != nil {
		return fmt.Errorf("DB_POOL_MAX_CONNS: %w", err)
	}

	// PostgreSQL's socket file inside the directory the proxy makes per instance.
	sockFile := filepath.Join(socket, ".s.PGSQL.5432")
	presentAtStart := exists(sockFile)
	if o.waitSocket > 0 && !presentAtStart {
		deadline := time.Now().Add(o.waitSocket)
		for !exists(sockFile) {
			if time.Now().After(deadline) {
				return fmt.Errorf("the proxy's socket %s did not appear within %s", sockFile, o.waitSocket)
			}
			time.Sleep(100 * time.Millisecond)
		}
		fmt.Printf("gormapp: waited %dms for the socket\n", time.Since(start).Milliseconds())
	}

	dsn := fmt.Sprintf("host=%s user=%s dbname=%s sslmode=disable", socket, user, name)
	db, err := gorm.Open(postgres.Open(dsn), &gorm.Config{Logger: logger.Discard})
	if err != nil {
		return fmt.Errorf("open: %w", err)
	}
	sqlDB, err := db.DB()
	if err != nil {
		return err
	}
	defer sqlDB.Close()
	sqlDB.SetMaxOpenConns(maxConns)

	// The first query, made once without a retry: with a native sidecar the socket
	// is there before the app starts.
	firstStart := time.Now()
	// Pods of one Deployment may start together (a rollout's old and new pod):
	// PostgreSQL's CREATE TABLE IF NOT EXISTS is not safe against a concurrent
	// one, so the migration holds a transaction-scoped advisory lock, as
	// migration tools do.
	migrate := func(tx *gorm.DB) error {
		if err := tx.Exec("SELECT pg_advisory_xact_lock(7246)").Error; err != nil {
			return err
		}
		return tx.AutoMigrate(&Order{})
	}
	if err := db.Transaction(migrate); err != nil {
		return fmt.Errorf("migrate (the first query): %w", err)
	}
	if o.startupReport {
		fmt.Printf("gormapp: socket present at start: %t; first query ok in %dms\n",
			presentAtStart, time.Since(firstStart).Milliseconds())
	}
	if o.hold {
		// The pod bench measures this pod idle, holding its pool (and so its
		// connection through the proxy), until it is deleted.
		fmt.Println("gormapp: holding the pool until SIGTERM")
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
		return nil
	}
	orders := []Order{{Item: "coffee", Qty: 2}, {Item: "bagel", Qty: 1}, {Item: "tea", Qty: 3}}
	if err := db.Create(&orders).Error; err != nil {
		return fmt.Errorf("insert: %w", err)
	}
	var got []Order
	if err := db.Where("id IN ?", []uint{orders[0].ID, orders[1].ID, orders[2].ID}).Order("id").Find(&got).Error; err != nil {
		return fmt.Errorf("select: %w", err)
	}
	if len(got) != len(orders) || got[2].Item != "tea" {
		return fmt.Errorf("read back %+v, want the %d rows just written", got, len(orders))
	}

	// Twice as many concurrent queries as the pool allows: the pool queues them, so
	// the proxy, capped at the same number, never has to refuse one.
	var wg sync.WaitGroup
	errs := make(chan error, 2*maxConns)
	for range 2 * maxConns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- db.Exec("select pg_sleep(0.2)").Error
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			return fmt.Errorf("concurrent query: %w", err)
		}
	}

	var who string
	if err := db.Raw("select current_user || '@' || current_database()").Scan(&who).Error; err != nil {
		return err
	}
	fmt.Printf("gormapp: ok %s rows=%d concurrent=%d maxOpenConns=%d\n",
		who, len(got), 2*maxConns, sqlDB.Stats().MaxOpenConnections)

	if o.grantCheck {
		// The pool's idle connections count against the proxy's limit: close them
		// and give the proxy a moment to see them go.
		_ = sqlDB.Close()
		time.Sleep(2 * time.Second)
		ok, refused, firstRefusal := grantCheck(dsn, 2*maxConns)
		fmt.Printf("gormapp: grant check: %d of %d concurrent connections got through, %d refused (DB_POOL_MAX_CONNS=%d)\n",
			ok, 2*maxConns, refused, maxConns)
		if firstRefusal != nil {
			fmt.Printf("gormapp: first refusal: %v\n", firstRefusal)
		}
	}
	return nil
}

// grantCheck opens n connections at once, each holding its connection (and a
// one-second query) until every attempt has either connected or been refused.
func grantCheck(dsn string, n int) (ok, refused int, firstRefusal error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	release := make(chan struct{})
	connected := make(chan error, n)
	var held sync.WaitGroup
	for range n {
		held.Add(1)
		go func() {
			defer held.Done()
			conn, err := pgx.Connect(ctx, dsn+" connect_timeout=20")
			if err == nil {
				_, err = conn.Exec(ctx, "select pg_sleep(1)")
				defer conn.Close(context.Background())
			}
			connected <- err
			if err == nil {
				<-release
			}
		}()
	}
	for range n {
		if err := <-connected; err != nil {
			refused++
			if firstRefusal == nil {
				firstRefusal = err
			}
		} else {
			ok++
		}
	}
	close(release)
	held.Wait()
	return ok, refused, firstRefusal
}

// quit asks the proxy to exit (its admin server's /quitquitquit).
func quit(url string) error {
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Post(url, "text/plain", nil)
	if err != nil {
		return fmt.Errorf("POST %s: %w", url, err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("POST %s: %s", url, resp.Status)
	}
	fmt.Printf("gormapp: POST %s: %s\n", url, resp.Status)
	return nil
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
