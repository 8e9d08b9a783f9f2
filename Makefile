# cloudsql-binder — everything a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
# Two local control planes, never shared: `make demo` / `make cluster-up` use
# .cluster/ (or CLOUDSQL_BINDER_CLUSTER_DIR), the tests use .cluster-test/ (or
# CLOUDSQL_BINDER_TEST_CLUSTER_DIR), so an operator left running by the demo
# never fights the operators the tests start.
CLOUDSQL_BINDER_CLUSTER_DIR ?= $(CURDIR)/.cluster
CLOUDSQL_BINDER_TEST_CLUSTER_DIR ?= $(CURDIR)/.cluster-test
# The node test (e2e-node) runs on a control plane and node of its own: the
# integration tests leave their namespaces' pods behind, which a node would
# otherwise try to run.
CLOUDSQL_BINDER_NODE_TEST_CLUSTER_DIR ?= $(CURDIR)/.cluster-test-node
export CLOUDSQL_BINDER_CLUSTER_DIR
# Recursive (=): follows the target-specific cluster directory below.
export KUBECONFIG = $(CLOUDSQL_BINDER_CLUSTER_DIR)/kubeconfig

.PHONY: build test lint e2e e2e-node crds cluster-up cluster-down node-up test-cluster-down demo demo-down chart-lint bench clean controlplane

build:
	$(CARGO) build --release --bin cloudsql-binder

## The operator's image without Docker (README "Image"): an OCI archive of the
## Dockerfile's runtime layout, named ghcr.io/cloudsql-binder/cloudsql-binder:<crate
## version>, written under $(CARGO_TARGET_DIR or target)/image/; prints its path.
## IMAGE_PROFILE=debug reuses the debug build (stripped of its debug info).
IMAGE_PROFILE ?= release
.PHONY: image
image:
	@IMAGE_PROFILE=$(IMAGE_PROFILE) CARGO="$(CARGO)" bash tools/image.sh

## The test command (README and .ci/run): formatting, lints, the chart checks,
## unit and integration tests (against the tests' own control plane in
## .cluster-test/, started by the tests when it is not up), the data path, and
## last the real pods on the local node (e2e-node). A node that cannot start
## fails `make test` with its one-line reason, after everything else has run.
test e2e chart-lint test-cluster-down: CLOUDSQL_BINDER_CLUSTER_DIR = $(CLOUDSQL_BINDER_TEST_CLUSTER_DIR)
e2e-node: CLOUDSQL_BINDER_CLUSTER_DIR = $(CLOUDSQL_BINDER_NODE_TEST_CLUSTER_DIR)
test: lint
	$(MAKE) chart-lint
	$(CARGO) test --workspace --all-targets -- --test-threads=4
	$(MAKE) e2e
	$(MAKE) e2e-node

## Real pods on the local node: the chart with the operator image, the sidecar
## and the data path in pods (e2e/node), on a control plane and node of its
## own (.cluster-test-node/), started here.
e2e-node:
	@bash tools/cluster-up.sh >/dev/null
	@bash tools/node-up.sh
	bash e2e/node/run.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Regenerate crds/ from the Rust types (a test fails when it is stale).
crds:
	@mkdir -p crds
	$(CARGO) run --quiet --bin cloudsql-binder -- crd > crds/cloudsql.dev_crds.yaml
	cp crds/cloudsql.dev_crds.yaml charts/cloudsql-binder/crds/cloudsql.dev_crds.yaml

## Build the pinned control plane (etcd, kube-apiserver, kube-controller-manager, helm) into the cache.
controlplane:
	bash tools/build-controlplane.sh

cluster-up:
	@bash tools/cluster-up.sh

cluster-down:
	@bash tools/cluster-down.sh

## A real node beside the control plane (after cluster-up; idempotent): kubelet
## and kube-scheduler from the same pinned module, containerd, runc and the CNI
## plugins from Debian. `make cluster-down` stops it with everything it started.
node-up:
	@bash tools/node-up.sh

## Stops the tests' control planes (.cluster-test/, and .cluster-test-node/ with its
## node) and removes their state; fails when a node left anything behind.
test-cluster-down:
	@status=0; bash tools/cluster-down.sh || status=1; \
	CLOUDSQL_BINDER_CLUSTER_DIR=$(CLOUDSQL_BINDER_NODE_TEST_CLUSTER_DIR) bash tools/cluster-down.sh || status=1; \
	exit $$status

## The data path: app -> Unix socket -> real Cloud SQL Auth Proxy -> TLS -> PostgreSQL.
e2e:
	$(CARGO) build --bin cloudsql-binder
	CLOUDSQL_BINDER_BIN=$(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/debug/cloudsql-binder bash e2e/datapath/run.sh

demo:
	@bash tools/demo.sh

demo-down:
	@bash tools/demo.sh down

## Benchmarks (bench/README.md): builds the release operator, the bench driver and
## Google's operator, runs every scenario on the bench's own control planes
## (bench/work/, never .cluster/), writes bench/results/<date>.json and the table
## in bench/README.md. Quick runs that leave the README alone (see bench/README.md):
##   cargo run --release -p cloudsql-binder-bench -- --runs 1 --sizes 100
BENCH_ARGS ?=
bench:
	$(CARGO) build --release --bin cloudsql-binder
	$(CARGO) build --release -p cloudsql-binder-bench
	./target/release/cloudsql-binder-bench --binary $(CURDIR)/target/release/cloudsql-binder \
		--update-readme $(CURDIR)/bench/README.md $(BENCH_ARGS)
	$(MAKE) bench-pods

## Pods on a node, the proxy sidecar against the connector (bench/README.md "Pods
## on a node"): creation to first query and memory per Pod, 20 Pods per mode, on
## its own cluster and node in bench/work/pods-cluster (stopped however it ends).
## Writes bench/results/pods-<date>.json and the table. Needs root.
.PHONY: bench-pods
bench-pods:
	bash bench/pods.sh $(BENCH_PODS_ARGS)

## helm lint + template (default and ci/full-values.yaml), schema rejections, CRD copy check.
chart-lint:
	@bash charts/lint.sh

clean: cluster-down test-cluster-down
	$(CARGO) clean
