package datapath

// FIXTURE: this file plays Google's side. It stands in for the server-side proxy in
// front of a Cloud SQL instance: a TLS 1.3 endpoint on port 3307 (the port
// cloudsqlconn always dials) that requires a client certificate issued through
// generateEphemeralCert and forwards the plain database bytes to PostgreSQL.

import (
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
)

// ServerSideProxyPort is the port cloudsqlconn dials on the instance's IP.
const ServerSideProxyPort = "3307"

// ServerSideTLS terminates the connector's mutual TLS and forwards to the database.
type ServerSideTLS struct {
	ln       net.Listener
	backend  string
	accepted atomic.Int64 // connections whose client certificate verified
	wg       sync.WaitGroup

	mu    sync.Mutex
	peers map[string]int64 // verified connections by the client's IP address
}

// NewServerSideTLS listens on ip:3307 with a server certificate from the fixture's
// server CA and forwards verified connections to backend (host:port).
//
// The certificate carries CN "project:instance" (no DNS SAN): with the legacy CA
// mode and no dnsName in connectSettings, cloudsqlconn verifies the chain against
// serverCaCert and then the CN (internal/cloudsql/tls_verify.go: verifyCn).
func NewServerSideTLS(f *SQLAdminFixture, ip, backend string) (*ServerSideTLS, error) {
	cert, err := f.ServerCA.leaf(&x509.Certificate{
		Subject:     pkix.Name{CommonName: f.inst.Project + ":" + f.inst.Name},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return nil, err
	}
	addr := net.JoinHostPort(ip, ServerSideProxyPort)
	ln, err := tls.Listen("tcp", addr, &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    f.ClientCA.Pool(),
		MinVersion:   tls.VersionTLS13,
	})
	if errors.Is(err, syscall.EADDRINUSE) {
		return nil, fmt.Errorf("%s is already in use on this machine; the Cloud SQL connector always dials port %s, so the test needs it free", addr, ServerSideProxyPort)
	}
	if err != nil {
		return nil, err
	}
	s := &ServerSideTLS{ln: ln, backend: backend, peers: map[string]int64{}}
	s.wg.Add(1)
	go s.serve()
	return s, nil
}

// Accepted counts connections that completed the mutual TLS handshake.
func (s *ServerSideTLS) Accepted() int64 { return s.accepted.Load() }

// AcceptedFrom counts, by the client's IP address, the connections that completed
// the mutual TLS handshake.
func (s *ServerSideTLS) AcceptedFrom() map[string]int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]int64, len(s.peers))
	for ip, n := range s.peers {
		out[ip] = n
	}
	return out
}

// Close stops accepting; connections in flight end with their peers.
func (s *ServerSideTLS) Close() {
	_ = s.ln.Close()
	s.wg.Wait()
}

func (s *ServerSideTLS) serve() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		go s.forward(c.(*tls.Conn))
	}
}

func (s *ServerSideTLS) forward(c *tls.Conn) {
	defer c.Close()
	if err := c.Handshake(); err != nil {
		return // no verified client certificate: nothing reaches the database
	}
	s.accepted.Add(1)
	if ip, _, err := net.SplitHostPort(c.RemoteAddr().String()); err == nil {
		s.mu.Lock()
		s.peers[ip]++
		s.mu.Unlock()
	}
	db, err := net.Dial("tcp", s.backend)
	if err != nil {
		return
	}
	defer db.Close()
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		done <- struct{}{}
	}
	go pipe(db, c)
	go pipe(c, db)
	<-done // either side closing ends the connection
}
