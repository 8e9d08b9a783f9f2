package node

// The test's images, built on this machine and loaded into the node's containerd
// (never pulled): single-layer OCI archives written by tools/oci-image.py and
// imported by tools/node-load-image.sh. Names are fully qualified, as the CRI
// looks them up.

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// The images the test builds. The proxy image is the real cloud-sql-proxy binary,
// but configured (in its image env and CA bundle) to talk to the Admin API
// fixture: it is a fixture image, named so.
const (
	ProxyFixtureImage     = "docker.io/cloudsql-binder-test/cloud-sql-proxy:2.28.0-fixture"
	GormAppImage          = "docker.io/cloudsql-binder-test/gormapp:e2e"
	ConnectorFixtureImage = "docker.io/cloudsql-binder-test/connectorapp:e2e-fixture"
)

// ImageBuilder writes and loads images.
type ImageBuilder struct {
	Repo       string // the repository root (tools/)
	ClusterDir string // where the node runs
	Dir        string // where binaries and archives go
}

func (b *ImageBuilder) run(ctx context.Context, dir string, env []string, name string, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return nil
}

// GoBinary builds a static binary (CGO_ENABLED=0: the images have no libc) of pkg
// in the module at dir.
func (b *ImageBuilder) GoBinary(ctx context.Context, dir, pkg, name string) (string, error) {
	out := filepath.Join(b.Dir, name)
	err := b.run(ctx, dir, []string{"CGO_ENABLED=0"}, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, pkg)
	return out, err
}

// Image writes an archive for name (tools/oci-image.py arguments after --name and
// --out) and loads it into the node.
func (b *ImageBuilder) Image(ctx context.Context, name string, args ...string) error {
	base := strings.NewReplacer("/", "_", ":", "_").Replace(name)
	archive := filepath.Join(b.Dir, base+".oci.tar")
	all := append([]string{filepath.Join(b.Repo, "tools", "oci-image.py"), "--name", name, "--out", archive}, args...)
	if err := b.run(ctx, b.Repo, nil, "python3", all...); err != nil {
		return err
	}
	return b.run(ctx, b.Repo, []string{"CLOUDSQL_BINDER_CLUSTER_DIR=" + b.ClusterDir},
		"bash", filepath.Join(b.Repo, "tools", "node-load-image.sh"), archive)
}

// ProxyImage is the real proxy binary with the fixture's API CA as the system CA
// bundle and, in its env (CSQL_PROXY_<FLAG> is read for every flag), the fixture's
// endpoint and token. Built-in metrics are off: they go to Cloud Monitoring, which
// has no stand-in. The operator's args are left exactly as injected.
func (b *ImageBuilder) ProxyImage(ctx context.Context, proxyBin, apiCAFile, endpoint, token string) error {
	return b.Image(ctx, ProxyFixtureImage,
		"--file", proxyBin+":/cloud-sql-proxy:0755",
		"--file", apiCAFile+":/etc/ssl/certs/ca-certificates.crt:0644",
		"--user", "65532:65532",
		"--entrypoint", `["/cloud-sql-proxy"]`,
		"--env", "CSQL_PROXY_SQLADMIN_API_ENDPOINT="+endpoint,
		"--env", "CSQL_PROXY_TOKEN="+token,
		"--env", "CSQL_PROXY_ENABLE_BUILTIN_METRICS=false",
		"--label", "org.opencontainers.image.description=cloud-sql-proxy 2.28.0 pointed at the test's Admin API fixture",
	)
}

// GormImage is cmd/gormapp of e2e/datapath.
func (b *ImageBuilder) GormImage(ctx context.Context, bin string) error {
	return b.Image(ctx, GormAppImage,
		"--file", bin+":/gormapp:0755",
		"--user", "65532:65532",
		"--entrypoint", `["/gormapp"]`,
	)
}

// ConnectorImage is cmd/connectorapp with where the Admin API fixture is.
func (b *ImageBuilder) ConnectorImage(ctx context.Context, bin, apiCAFile, endpoint, token string) error {
	return b.Image(ctx, ConnectorFixtureImage,
		"--file", bin+":/connectorapp:0755",
		"--file", apiCAFile+":/etc/fixture/sqladmin-ca.pem:0644",
		"--user", "65532:65532",
		"--entrypoint", `["/connectorapp"]`,
		"--env", "FIXTURE_SQLADMIN_API_ENDPOINT="+endpoint,
		"--env", "FIXTURE_SQLADMIN_TOKEN="+token,
		"--env", "FIXTURE_SQLADMIN_CA_FILE=/etc/fixture/sqladmin-ca.pem",
	)
}
