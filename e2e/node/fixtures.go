package node

// Google's side, played by the fixtures of e2e/datapath, listening where pods reach
// this machine: the node's gateway address on its bridge.
//
//	pod ── HTTPS ──▶ Admin API fixture      GATEWAY:random  (fixture_sqladmin.go)
//	pod ── mTLS ───▶ server-side TLS fixture GATEWAY:3307   (fixture_serverside_tls.go)
//	                   └── plain ──▶ PostgreSQL 127.0.0.1:random (Debian's package)

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/cloudsql-binder/e2e/datapath"
)

// FixtureInstance is the one Cloud SQL instance the fixtures serve.
var FixtureInstance = datapath.Instance{
	Project: "e2e-project", Region: "us-central1", Name: "orders",
	DatabaseVersion: datapath.FixtureDatabaseVersion,
}

// Google is the running stand-in for Google's side, and the real database.
type Google struct {
	Instance datapath.Instance
	Admin    *datapath.SQLAdminFixture
	TLS      *datapath.ServerSideTLS
	Postgres *datapath.Postgres
	// The Admin API fixture's CA (PEM), which the proxy and connector images trust.
	APICAFile string

	stops []func()
}

// StartGoogle starts PostgreSQL under dir and the two fixtures on gateway.
func StartGoogle(dir, gateway string) (g *Google, err error) {
	g = &Google{Instance: FixtureInstance}
	g.Instance.IP = gateway
	defer func() {
		if err != nil {
			g.Stop()
			g = nil
		}
	}()
	if err := os.Chmod(dir, 0o755); err != nil { // the postgres user must reach its data dir
		return g, err
	}
	if g.Postgres, err = datapath.StartPostgres(dir, 300); err != nil {
		return g, err
	}
	g.stops = append(g.stops, g.Postgres.Stop)
	if g.Admin, err = datapath.NewSQLAdminFixtureAt(g.Instance, net.JoinHostPort(gateway, "0")); err != nil {
		return g, err
	}
	g.stops = append(g.stops, g.Admin.Close)
	g.APICAFile = filepath.Join(dir, "fixture-sqladmin-ca.pem")
	if err := os.WriteFile(g.APICAFile, g.Admin.APICA.PEM(), 0o644); err != nil {
		return g, err
	}
	if g.TLS, err = datapath.NewServerSideTLS(g.Admin, gateway, g.Postgres.Addr()); err != nil {
		return g, err
	}
	g.stops = append(g.stops, g.TLS.Close)
	return g, nil
}

// Stop stops everything, last started first.
func (g *Google) Stop() {
	for i := len(g.stops) - 1; i >= 0; i-- {
		g.stops[i]()
	}
	g.stops = nil
}

// CreateDatabase makes a database owned by a login role of the same scenario.
func (g *Google) CreateDatabase(ctx context.Context, db, user string) error {
	return g.Postgres.CreateDatabase(ctx, db, user)
}

// AdminCallsFrom lists the Admin API calls made from ip ("METHOD /path -> status").
func (g *Google) AdminCallsFrom(ip string) []string {
	var out []string
	for _, r := range g.Admin.Requests() {
		if r.Remote == ip {
			out = append(out, r.String())
		}
	}
	return out
}

// HasCall says whether calls holds a successful call whose path ends with suffix.
func HasCall(calls []string, method, suffix string) bool {
	for _, c := range calls {
		if strings.HasPrefix(c, method+" ") && strings.Contains(c, suffix+" -> 200") {
			return true
		}
	}
	return false
}

// TLSPeers describes the server-side TLS fixture's verified connections by client.
func (g *Google) TLSPeers() string {
	from := g.TLS.AcceptedFrom()
	ips := make([]string, 0, len(from))
	for ip := range from {
		ips = append(ips, ip)
	}
	sort.Strings(ips)
	var parts []string
	for _, ip := range ips {
		parts = append(parts, fmt.Sprintf("%s:%d", ip, from[ip]))
	}
	return strings.Join(parts, " ")
}
