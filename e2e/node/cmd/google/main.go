// Command google plays Google's side for `make demo` on the local node, until
// SIGTERM: PostgreSQL behind the server-side TLS fixture and the Cloud SQL Admin
// API fixture, listening on the node's gateway (the fixtures of e2e/datapath, as
// the node test starts them), for one instance named by flags. It builds and
// loads into the node the images a demo pod needs: the fixture proxy image (the
// real cloud-sql-proxy pointed at the Admin API fixture) and the GORM app. When
// everything is up it writes -env-out (KEY=value lines), last, and waits.
//
//	go run ./cmd/google -cluster-dir .cluster -dir .cluster/google \
//	    -connection-name my-project:asia-northeast3:orders -database orders -user orders-app \
//	    -proxy-bin "$(tools/build-proxy.sh)" -env-out .cluster/google.env
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/cloudsql-binder/e2e/datapath"
	"github.com/cloudsql-binder/e2e/node"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "google:", err)
		os.Exit(1)
	}
}

func run() error {
	var repoDir, clusterDir, dir, connection, database, user, proxyBin, envOut string
	flag.StringVar(&repoDir, "repo", "../..", "the repository root (tools/ and e2e/)")
	flag.StringVar(&clusterDir, "cluster-dir", os.Getenv("CLOUDSQL_BINDER_CLUSTER_DIR"), "the cluster directory (with a node)")
	flag.StringVar(&dir, "dir", "", "where PostgreSQL's data, binaries and archives go")
	flag.StringVar(&connection, "connection-name", "", "PROJECT:REGION:INSTANCE the fixture serves")
	flag.StringVar(&database, "database", "", "a database to create, owned by -user")
	flag.StringVar(&user, "user", "", "the database's login role")
	flag.StringVar(&proxyBin, "proxy-bin", "", "the cloud-sql-proxy binary (tools/build-proxy.sh)")
	flag.StringVar(&envOut, "env-out", "", "the file written when ready")
	flag.Parse()
	parts := strings.Split(connection, ":")
	if len(parts) != 3 || dir == "" || database == "" || user == "" || proxyBin == "" || envOut == "" {
		return fmt.Errorf("usage: google -cluster-dir DIR -dir DIR -connection-name P:R:I -database DB -user USER -proxy-bin BIN -env-out FILE")
	}
	_ = os.Remove(envOut)
	c, err := node.OpenCluster(clusterDir)
	if err != nil {
		return err
	}
	repo, err := filepath.Abs(repoDir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}

	node.FixtureInstance = datapath.Instance{
		Project: parts[0], Region: parts[1], Name: parts[2],
		DatabaseVersion: datapath.FixtureDatabaseVersion,
	}
	g, err := node.StartGoogle(dir, c.Gateway)
	if err != nil {
		return fmt.Errorf("starting the fixtures on %s: %w", c.Gateway, err)
	}
	defer g.Stop()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := g.CreateDatabase(ctx, database, user); err != nil {
		return fmt.Errorf("creating database %s for %s: %w", database, user, err)
	}

	b := &node.ImageBuilder{Repo: repo, ClusterDir: clusterDir, Dir: dir}
	gorm, err := b.GoBinary(ctx, filepath.Join(repo, "e2e", "datapath"), "./cmd/gormapp", "gormapp")
	if err != nil {
		return err
	}
	if err := b.GormImage(ctx, gorm); err != nil {
		return err
	}
	if err := b.ProxyImage(ctx, proxyBin, g.APICAFile, g.Admin.URL, g.Admin.Token); err != nil {
		return err
	}

	env := fmt.Sprintf("CONNECTION_NAME=%s\nPROXY_IMAGE=%s\nGORM_IMAGE=%s\nSQLADMIN_URL=%s\nSERVER_SIDE_TLS=%s:%s\nPOSTGRES=%s\n",
		connection, node.ProxyFixtureImage, node.GormAppImage, g.Admin.URL, c.Gateway, datapath.ServerSideProxyPort, g.Postgres.Addr())
	if err := os.WriteFile(envOut+".tmp", []byte(env), 0o644); err != nil {
		return err
	}
	if err := os.Rename(envOut+".tmp", envOut); err != nil {
		return err
	}
	fmt.Printf("google: serving %s on %s until SIGTERM\n", connection, c.Gateway)
	<-ctx.Done()
	fmt.Println("google: stopping")
	return nil
}
