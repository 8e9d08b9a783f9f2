# syntax=docker/dockerfile:1
# The operator's image: `docker build -t ghcr.io/cloudsql-binder/cloudsql-binder:0.1.0 .`
# (the tag is the crate version, which the chart's appVersion equals).
# `make image` assembles the same runtime layout without Docker (tools/image.sh).

# Bookworm, like the runtime below: the binary links against glibc 2.36.
# rust-version in Cargo.toml is 1.91; the project is tested on 1.95.
ARG RUST_VERSION=1.95.0

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the registry and the target directory between builds;
# the binary is copied out of the cache in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin cloudsql-binder \
    && cp target/release/cloudsql-binder /cloudsql-binder

# glibc, libgcc_s, CA certificates (/etc/ssl/certs/ca-certificates.crt), the
# user nonroot (65532) and a 1777 /tmp; no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /cloudsql-binder /cloudsql-binder
USER 65532:65532
# The chart passes the subcommand and its flags (`run --metrics-addr=...`).
ENTRYPOINT ["/cloudsql-binder"]
