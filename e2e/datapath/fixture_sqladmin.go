package datapath

// FIXTURE: this file plays Google's side. It stands in for the Cloud SQL Admin API
// (sqladmin.googleapis.com), answering exactly the two calls the Cloud SQL Auth Proxy
// (through its Go connector, cloud.google.com/go/cloudsqlconn) makes to connect:
//
//	GET  /sql/v1beta4/projects/{project}/instances/{instance}/connectSettings
//	POST /sql/v1beta4/projects/{project}/instances/{instance}:generateEphemeralCert
//
// (cloudsqlconn internal/cloudsql/refresh.go: fetchMetadata, fetchEphemeralCert).

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"time"
)

// ca is a certificate authority generated in-process for one test run.
type ca struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newCA(name string) (*ca, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	return &ca{cert: cert, key: key}, err
}

// PEM returns the CA certificate in PEM form.
func (c *ca) PEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.cert.Raw})
}

// Pool returns a pool trusting only this CA.
func (c *ca) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(c.cert)
	return p
}

// sign issues a leaf certificate for pub from tmpl's subject, names and usages.
func (c *ca) sign(tmpl *x509.Certificate, pub any, validFor time.Duration) ([]byte, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return nil, err
	}
	tmpl.SerialNumber = serial
	tmpl.NotBefore = time.Now().Add(-time.Minute)
	tmpl.NotAfter = time.Now().Add(validFor)
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment
	return x509.CreateCertificate(rand.Reader, tmpl, c.cert, pub, c.key)
}

// leaf issues a certificate with a fresh key, ready to serve with crypto/tls.
func (c *ca) leaf(tmpl *x509.Certificate) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	der, err := c.sign(tmpl, &key.PublicKey, 24*time.Hour)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// Instance is what the fixture knows about the one Cloud SQL instance it serves.
type Instance struct {
	Project, Region, Name string
	DatabaseVersion       string // e.g. POSTGRES_16
	IP                    string // PRIMARY address; the connector dials IP:3307
}

// ConnectionName returns PROJECT:REGION:INSTANCE.
func (i Instance) ConnectionName() string {
	return i.Project + ":" + i.Region + ":" + i.Name
}

// SQLAdminFixture is an HTTPS server playing the Cloud SQL Admin API, on 127.0.0.1
// or on the address given to NewSQLAdminFixtureAt.
type SQLAdminFixture struct {
	URL   string // base URL to pass as --sqladmin-api-endpoint
	Token string // the only bearer token accepted (pass as --token)

	APICA    *ca // signs the fixture's own HTTPS certificate (trusted via SSL_CERT_FILE)
	ServerCA *ca // the instance's server CA, returned as serverCaCert
	ClientCA *ca // signs ephemeral client certificates

	inst   Instance
	server *httptest.Server

	mu       sync.Mutex
	requests []Request
}

// Request is one call the fixture received.
type Request struct {
	Method, Path string
	Status       int
	Remote       string // the caller's IP address
}

func (r Request) String() string { return fmt.Sprintf("%s %s -> %d", r.Method, r.Path, r.Status) }

// NewSQLAdminFixture starts the fixture for inst on 127.0.0.1, on a free port.
func NewSQLAdminFixture(inst Instance) (*SQLAdminFixture, error) {
	return NewSQLAdminFixtureAt(inst, "127.0.0.1:0")
}

// NewSQLAdminFixtureAt starts the fixture for inst listening on addr (IP:PORT, port 0
// for a free one); its HTTPS certificate names that IP, so clients elsewhere (pods
// on a node's bridge) reach it at the same address it listens on.
func NewSQLAdminFixtureAt(inst Instance, addr string) (*SQLAdminFixture, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("fixture listen address %q: %w", addr, err)
	}
	ip := net.ParseIP(host)
	if ip == nil {
		return nil, fmt.Errorf("fixture listen address %q: %q is not an IP address", addr, host)
	}
	f := &SQLAdminFixture{inst: inst, Token: "fixture-token-" + randomHex(8)}
	if f.APICA, err = newCA("fixture sqladmin API CA"); err != nil {
		return nil, err
	}
	if f.ServerCA, err = newCA("fixture Cloud SQL server CA"); err != nil {
		return nil, err
	}
	if f.ClientCA, err = newCA("fixture Cloud SQL client CA"); err != nil {
		return nil, err
	}
	serving, err := f.APICA.leaf(&x509.Certificate{
		Subject:     pkix.Name{CommonName: ip.String()},
		IPAddresses: []net.IP{ip},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return nil, err
	}

	mux := http.NewServeMux()
	mux.HandleFunc("GET /sql/v1beta4/projects/{project}/instances/{instance}/connectSettings", f.connectSettings)
	// The method is part of the last segment ("orders:generateEphemeralCert").
	mux.HandleFunc("POST /sql/v1beta4/projects/{project}/instances/{call}", f.generateEphemeralCert)

	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("Admin API fixture: %w", err)
	}
	f.server = httptest.NewUnstartedServer(f.authorize(mux))
	_ = f.server.Listener.Close() // httptest's own 127.0.0.1 listener
	f.server.Listener = ln
	f.server.TLS = &tls.Config{Certificates: []tls.Certificate{serving}, MinVersion: tls.VersionTLS12}
	f.server.StartTLS()
	f.URL = f.server.URL + "/"
	return f, nil
}

// Close stops the server.
func (f *SQLAdminFixture) Close() { f.server.Close() }

// Calls returns "METHOD /path -> status" for every request received so far.
func (f *SQLAdminFixture) Calls() []string {
	var calls []string
	for _, r := range f.Requests() {
		calls = append(calls, r.String())
	}
	return calls
}

// Requests returns every request received so far, oldest first.
func (f *SQLAdminFixture) Requests() []Request {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]Request(nil), f.requests...)
}

type recorder struct {
	http.ResponseWriter
	status int
}

func (r *recorder) WriteHeader(code int) { r.status = code; r.ResponseWriter.WriteHeader(code) }

// authorize checks the bearer token and records every call.
func (f *SQLAdminFixture) authorize(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := &recorder{ResponseWriter: w, status: http.StatusOK}
		defer func() {
			remote, _, _ := net.SplitHostPort(r.RemoteAddr)
			f.mu.Lock()
			f.requests = append(f.requests, Request{Method: r.Method, Path: r.URL.Path, Status: rec.status, Remote: remote})
			f.mu.Unlock()
		}()
		if r.Header.Get("Authorization") != "Bearer "+f.Token {
			googleError(rec, http.StatusUnauthorized, "UNAUTHENTICATED", "missing or wrong bearer token")
			return
		}
		next.ServeHTTP(rec, r)
	})
}

func (f *SQLAdminFixture) known(w http.ResponseWriter, project, instance string) bool {
	if project != f.inst.Project || instance != f.inst.Name {
		googleError(w, http.StatusNotFound, "NOT_FOUND", fmt.Sprintf("instance %s:%s does not exist", project, instance))
		return false
	}
	return true
}

// connectSettings answers with the fields fetchMetadata reads: region (must match
// the connection name), backendType SECOND_GEN, databaseVersion, a PRIMARY IP (the
// public-IP default), serverCaCert. No dnsName and the legacy CA mode, so the
// connector checks the server certificate's CN against "project:instance". No
// mdxProtocolSupport, so no metadata exchange is sent ahead of the database bytes.
func (f *SQLAdminFixture) connectSettings(w http.ResponseWriter, r *http.Request) {
	if !f.known(w, r.PathValue("project"), r.PathValue("instance")) {
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"kind":            "sql#connectSettings",
		"connectionName":  f.inst.ConnectionName(),
		"region":          f.inst.Region,
		"databaseVersion": f.inst.DatabaseVersion,
		"backendType":     "SECOND_GEN",
		"ipAddresses":     []map[string]string{{"type": "PRIMARY", "ipAddress": f.inst.IP}},
		"serverCaCert":    map[string]string{"kind": "sql#sslCert", "cert": string(f.ServerCA.PEM())},
		"serverCaMode":    "GOOGLE_MANAGED_INTERNAL_CA",
	})
}

// generateEphemeralCert signs the client's public key (field public_key, PEM) with
// the client CA and returns it as ephemeralCert.cert.
func (f *SQLAdminFixture) generateEphemeralCert(w http.ResponseWriter, r *http.Request) {
	instance, method, _ := strings.Cut(r.PathValue("call"), ":")
	if method != "generateEphemeralCert" {
		googleError(w, http.StatusNotFound, "NOT_FOUND", "unknown method "+method)
		return
	}
	if !f.known(w, r.PathValue("project"), instance) {
		return
	}
	var req struct {
		PublicKey string `json:"public_key"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		googleError(w, http.StatusBadRequest, "INVALID_ARGUMENT", "bad JSON: "+err.Error())
		return
	}
	block, _ := pem.Decode([]byte(req.PublicKey))
	if block == nil {
		googleError(w, http.StatusBadRequest, "INVALID_ARGUMENT", "public_key is not PEM")
		return
	}
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		googleError(w, http.StatusBadRequest, "INVALID_ARGUMENT", "public_key: "+err.Error())
		return
	}
	der, err := f.ClientCA.sign(&x509.Certificate{
		Subject:     pkix.Name{CommonName: "Google Cloud SQL Client"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, pub, time.Hour)
	if err != nil {
		googleError(w, http.StatusInternalServerError, "INTERNAL", err.Error())
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"ephemeralCert": map[string]string{
			"kind":     "sql#sslCert",
			"cert":     string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})),
			"instance": instance,
		},
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json; charset=UTF-8")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// googleError writes the error shape Google APIs use.
func googleError(w http.ResponseWriter, code int, status, msg string) {
	writeJSON(w, code, map[string]any{"error": map[string]any{"code": code, "status": status, "message": msg}})
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return fmt.Sprintf("%x", b)
}
