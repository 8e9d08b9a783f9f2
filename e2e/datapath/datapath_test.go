package datapath

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// The stack is started once, by the first test that needs it, and stopped by TestMain.
var (
	stackOnce sync.Once
	stack     *Stack
	stackErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if stack != nil {
		fmt.Printf("cloud-sql-proxy on SIGTERM: %s\n", exitStatus(stack.Proxy.Stop()))
		fmt.Printf("Admin API fixture calls: %q\n", stack.Admin.Calls())
		stack.Stop()
	}
	os.Exit(code)
}

func exitStatus(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

// dataPath returns the running stack or fails the test with a one-line reason.
func dataPath(t *testing.T) *Stack {
	t.Helper()
	stackOnce.Do(func() {
		manifest, bin := os.Getenv("DATAPATH_MANIFEST"), os.Getenv("CLOUD_SQL_PROXY")
		switch {
		case manifest == "":
			stackErr = errors.New("DATAPATH_MANIFEST is not set: point it at `cloudsql-binder render -f testdata/input.yaml` output (e2e/datapath/run.sh does)")
		case bin == "":
			stackErr = errors.New("CLOUD_SQL_PROXY is not set: point it at the binary tools/build-proxy.sh prints")
		default:
			start := time.Now()
			stack, stackErr = StartStack(manifest, bin)
			if stackErr == nil {
				t.Logf("data path up in %s; proxy args: %q", time.Since(start).Round(time.Millisecond), stack.Proxy.Args)
			}
		}
	})
	if stackErr != nil {
		t.Fatalf("data path not available: %v", stackErr)
	}
	return stack
}

// through asserts that fn reached the database through the server-side TLS endpoint.
func through(t *testing.T, s *Stack, fn func()) {
	t.Helper()
	before := s.TLS.Accepted()
	fn()
	if s.TLS.Accepted() == before {
		t.Errorf("no connection passed the server-side TLS endpoint")
	}
}

func TestGormAppConnectsThroughTheUnixSocket(t *testing.T) {
	s := dataPath(t)
	bin := filepath.Join(t.TempDir(), "gormapp")
	if out, err := exec.Command("go", "build", "-o", bin, "./cmd/gormapp").CombinedOutput(); err != nil {
		t.Fatalf("building cmd/gormapp: %v\n%s", err, out)
	}
	through(t, s, func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin)
		cmd.Env = s.AppEnv // exactly the injected env, nothing else
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("gormapp with env %q: %v\n%s\nproxy log:\n%s", s.AppEnv, err, out, tail(s.Proxy.LogPath, 10))
		}
		want := fmt.Sprintf("gormapp: ok %s@%s rows=3 concurrent=%d maxOpenConns=%d", s.DBUser, s.DBName, 2*s.PoolMax, s.PoolMax)
		if got := strings.TrimSpace(string(out)); got != want {
			t.Fatalf("gormapp printed %q, want %q", got, want)
		}
		t.Log(strings.TrimSpace(string(out)))
	})
}

func TestPsqlConnectsThroughTheUnixSocket(t *testing.T) {
	s := dataPath(t)
	psql, err := exec.LookPath("psql")
	if err != nil {
		t.Fatal("psql not found (apt-get install postgresql-client)")
	}
	through(t, s, func() {
		cmd := exec.Command("sh", "-c",
			`psql "host=$INSTANCE_UNIX_SOCKET dbname=$DB_NAME user=$DB_USER" -XAt -c "select current_user || '@' || current_database()"`)
		cmd.Env = append([]string{"PATH=" + filepath.Dir(psql) + ":/usr/bin:/bin"}, s.AppEnv...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("psql: %v\n%s", err, out)
		}
		if got, want := strings.TrimSpace(string(out)), s.DBUser+"@"+s.DBName; got != want {
			t.Fatalf("psql printed %q, want %q", got, want)
		}
	})
}

func TestProxyRefusesConnectionsPastTheGrant(t *testing.T) {
	s := dataPath(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	super, err := s.Postgres.Superuser(ctx, "postgres") // direct, not through the proxy
	if err != nil {
		t.Fatal(err)
	}
	defer super.Close(ctx)
	sessions := func() (n int) {
		err := super.QueryRow(ctx, "select count(*) from pg_stat_activity where usename = $1", s.DBUser).Scan(&n)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	for deadline := time.Now().Add(10 * time.Second); sessions() != 0; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions of %s still open before the test", sessions(), s.DBUser)
		}
	}

	grant, extra := s.PoolMax, 5
	dsn := fmt.Sprintf("host=%s user=%s dbname=%s sslmode=disable connect_timeout=20", s.Socket, s.DBUser, s.DBName)
	release := make(chan struct{})
	connected := make(chan error, grant+extra)
	var held sync.WaitGroup
	var mu sync.Mutex
	var queryErrs []error
	for range grant + extra {
		held.Add(1)
		go func() {
			defer held.Done()
			conn, err := pgx.Connect(ctx, dsn)
			connected <- err
			if err != nil {
				return
			}
			defer conn.Close(ctx)
			if _, err := conn.Exec(ctx, "select pg_sleep(1)"); err != nil {
				mu.Lock()
				queryErrs = append(queryErrs, err)
				mu.Unlock()
			}
			<-release
		}()
	}
	var ok, refused int
	var firstRefusal error
	for range grant + extra {
		if err := <-connected; err != nil {
			refused++
			if firstRefusal == nil {
				firstRefusal = err
			}
		} else {
			ok++
		}
	}

	// While the granted connections are held, count what the database sees.
	peak := 0
	for end := time.Now().Add(1500 * time.Millisecond); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		peak = max(peak, sessions())
	}
	if s.Health != "" {
		if resp, err := http.Get(s.Health + "/readiness"); err == nil {
			t.Logf("proxy /readiness while the grant is in use: %s", resp.Status)
			_ = resp.Body.Close()
		}
	}
	close(release)
	held.Wait()

	t.Logf("grant %d: %d connected, %d refused (first refusal: %v); database peak %d sessions",
		grant, ok, refused, firstRefusal, peak)
	if ok != grant || refused != extra {
		t.Errorf("%d of %d connections succeeded and %d were refused; want %d and %d (proxy --max-connections must equal DB_POOL_MAX_CONNS)",
			ok, grant+extra, refused, grant, extra)
	}
	if peak != grant {
		t.Errorf("database saw at most %d sessions of %s; want exactly the grant, %d", peak, s.DBUser, grant)
	}
	if len(queryErrs) > 0 {
		t.Errorf("held connections failed their query: %v", queryErrs)
	}
}
