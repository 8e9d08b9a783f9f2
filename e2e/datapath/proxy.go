package datapath

// The real Cloud SQL Auth Proxy binary, run with the operator's args.

import (
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Proxy is a running cloud-sql-proxy process.
type Proxy struct {
	Args    []string
	LogPath string
	cmd     *exec.Cmd
	done    chan error
	stop    sync.Once
	exit    error
}

// StartProxy starts bin with args and env (nothing is inherited from the test's own
// environment), logging to logPath.
func StartProxy(bin string, args, env []string, logPath string) (*Proxy, error) {
	if st, err := os.Stat(bin); err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
		return nil, fmt.Errorf("cloud-sql-proxy binary %q is missing or not executable (build it with tools/build-proxy.sh)", bin)
	}
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &Proxy{Args: args, LogPath: logPath, cmd: cmd, done: make(chan error, 1)}
	go func() { p.done <- cmd.Wait() }()
	return p, nil
}

// WaitForSocket waits until the proxy has created the Unix socket at path, and,
// when healthURL is set, until that health endpoint answers 200. (It does not
// connect: every connection to the socket makes the proxy dial the instance.)
func (p *Proxy) WaitForSocket(path, healthURL string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		st, err := os.Stat(path)
		if err == nil && st.Mode()&os.ModeSocket != 0 && (healthURL == "" || httpOK(healthURL)) {
			return nil
		}
		select {
		case err := <-p.done:
			p.done <- err // for Stop
			return fmt.Errorf("cloud-sql-proxy exited at startup (%v):\n%s", err, p.startupLog())
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cloud-sql-proxy not serving %s after %s:\n%s", path, timeout, tail(p.LogPath, 15))
		}
	}
}

// startupLog is the command-line error (e.g. "Error: unknown flag: --x") when the
// proxy printed one before its usage text, else the end of its log.
func (p *Proxy) startupLog() string {
	b, _ := os.ReadFile(p.LogPath)
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "Error: ") {
			return line
		}
	}
	return tail(p.LogPath, 15)
}

func httpOK(url string) bool {
	resp, err := (&http.Client{Timeout: time.Second}).Get(url)
	if err != nil {
		return false
	}
	_ = resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// Stop sends SIGTERM (what the kubelet sends) and returns the exit status; later
// calls return the same.
func (p *Proxy) Stop() error {
	p.stop.Do(func() {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case p.exit = <-p.done:
		case <-time.After(15 * time.Second):
			_ = p.cmd.Process.Kill()
			p.exit = errors.Join(errors.New("did not exit within 15s of SIGTERM"), <-p.done)
		}
	})
	return p.exit
}
