package datapath

// A real PostgreSQL server (Debian's postgresql package) on loopback, with its own
// temporary data directory, started and stopped by the test.

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// Postgres is a running server; Superuser DSNs bypass the proxy.
type Postgres struct {
	Port    int
	SockDir string
	cmd     *exec.Cmd
	done    chan error
	logPath string
}

// findPostgresBin returns the newest /usr/lib/postgresql/*/bin holding postgres.
func findPostgresBin() (string, error) {
	found, _ := filepath.Glob("/usr/lib/postgresql/*/bin/postgres")
	if len(found) == 0 {
		return "", fmt.Errorf("PostgreSQL server not found under /usr/lib/postgresql/*/bin (apt-get install postgresql)")
	}
	sort.Slice(found, func(i, j int) bool { return pgMajor(found[i]) < pgMajor(found[j]) })
	return filepath.Dir(found[len(found)-1]), nil
}

func pgMajor(path string) int {
	n, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(path))))
	return n
}

// asPostgresUser makes cmd run as the postgres system user when we are root:
// PostgreSQL refuses to run as root.
func asPostgresUser(cmd *exec.Cmd) error {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGINT}
	if os.Geteuid() != 0 {
		return nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return fmt.Errorf("running as root needs the postgres system user to run PostgreSQL: %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	return nil
}

// ownByPostgres hands dir to the postgres user when we are root.
func ownByPostgres(dir string) error {
	if os.Geteuid() != 0 {
		return nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return err
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return os.Chown(dir, uid, gid)
}

// StartPostgres runs initdb (trust auth, superuser "postgres") in base/pgdata and
// starts the server on 127.0.0.1 on a free port, with its socket in base/pgsock.
func StartPostgres(base string, maxConnections int) (*Postgres, error) {
	bin, err := findPostgresBin()
	if err != nil {
		return nil, err
	}
	data, sock := filepath.Join(base, "pgdata"), filepath.Join(base, "pgsock")
	for _, d := range []string{data, sock} {
		if err := os.Mkdir(d, 0o700); err != nil {
			return nil, err
		}
		if err := ownByPostgres(d); err != nil {
			return nil, err
		}
	}
	logPath := filepath.Join(base, "postgres.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logFile.Close()

	initdb := exec.Command(filepath.Join(bin, "initdb"), "-D", data, "-U", "postgres",
		"--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync")
	initdb.Dir, initdb.Stdout, initdb.Stderr = base, logFile, logFile
	if err := asPostgresUser(initdb); err != nil {
		return nil, err
	}
	if err := initdb.Run(); err != nil {
		return nil, fmt.Errorf("initdb failed (%v); see %s", err, logPath)
	}

	port, err := freePort()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(filepath.Join(bin, "postgres"), "-D", data, "-k", sock, "-p", strconv.Itoa(port),
		"-c", "listen_addresses=127.0.0.1", "-c", "max_connections="+strconv.Itoa(maxConnections),
		"-c", "fsync=off", "-c", "shared_buffers=16MB")
	cmd.Dir, cmd.Stdout, cmd.Stderr = base, logFile, logFile
	if err := asPostgresUser(cmd); err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &Postgres{Port: port, SockDir: sock, cmd: cmd, done: make(chan error, 1), logPath: logPath}
	go func() { p.done <- cmd.Wait() }()

	deadline := time.Now().Add(30 * time.Second)
	for {
		conn, err := p.Superuser(context.Background(), "postgres")
		if err == nil {
			_ = conn.Close(context.Background())
			return p, nil
		}
		select {
		case werr := <-p.done:
			return nil, fmt.Errorf("postgres exited during startup (%v); see %s", werr, logPath)
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.Stop()
			return nil, fmt.Errorf("postgres not ready after 30s (%v); see %s", err, logPath)
		}
	}
}

// Superuser connects directly (not through the proxy) as the superuser.
func (p *Postgres) Superuser(ctx context.Context, dbname string) (*pgx.Conn, error) {
	return pgx.Connect(ctx, fmt.Sprintf("host=%s port=%d user=postgres dbname=%s sslmode=disable connect_timeout=5",
		p.SockDir, p.Port, dbname))
}

// CreateDatabase creates a login role and a database it owns.
func (p *Postgres) CreateDatabase(ctx context.Context, dbname, role string) error {
	conn, err := p.Superuser(ctx, "postgres")
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	r, d := pgx.Identifier{role}.Sanitize(), pgx.Identifier{dbname}.Sanitize()
	for _, stmt := range []string{"CREATE ROLE " + r + " LOGIN", "CREATE DATABASE " + d + " OWNER " + r} {
		if _, err := conn.Exec(ctx, stmt); err != nil {
			return fmt.Errorf("%s: %w", stmt, err)
		}
	}
	return nil
}

// Addr is the TCP address the server-side TLS fixture forwards to.
func (p *Postgres) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(p.Port)) }

// Stop asks for a fast shutdown and waits for it.
func (p *Postgres) Stop() {
	_ = p.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// LogTail returns the end of the server log, for failure messages.
func (p *Postgres) LogTail() string { return tail(p.logPath, 20) }

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
