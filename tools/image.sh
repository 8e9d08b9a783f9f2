#!/usr/bin/env bash
# `make image`: the operator's image without Docker. Builds the binary and
# writes the Dockerfile's runtime layout (gcr.io/distroless/cc-debian12:nonroot
# plus /cloudsql-binder) as an OCI image archive with tools/oci-image.py:
#   /cloudsql-binder                     the binary (debug: without debug info)
#   the shared libraries `ldd` names, at the paths it names, and the loader
#   /etc/ssl/certs/ca-certificates.crt   Debian's ca-certificates
#   /etc/passwd, /etc/group              root, nobody, nonroot (65532)
#   /etc/nsswitch.conf, /etc/os-release  hosts from files then DNS; the libraries' Debian release
#   /usr/share/doc/*/copyright           the licences of the packages copied from
#   /tmp (1777), /home/nonroot (0700, 65532)
# Config: user 65532:65532, entrypoint ["/cloudsql-binder"]; the chart passes
# the arguments. The name is ghcr.io/cloudsql-binder/cloudsql-binder:<crate
# version>, which the chart defaults to. Prints the archive's path on stdout;
# `ctr -n k8s.io images import <path>` loads it on a node.
#
#   IMAGE_PROFILE=release (default) | debug   the cargo profile; debug reuses
#                                       the tests' build (target/debug)
#   IMAGE_REPOSITORY, IMAGE_TAG         override the name (default above)
#   CARGO_TARGET_DIR, CARGO             as for cargo and the Makefile (CARGO
#                                       may carry words: "nice cargo")
#
# The libraries come from this machine, so build on Debian 12 (bookworm), the
# Debian release the Dockerfile's images use.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
fail() { echo "image: $*" >&2; exit 1; }

profile="${IMAGE_PROFILE:-release}"
case "$profile" in
  release) cargo_args=(--release) suffix="" ;;
  debug) cargo_args=() suffix="-debug" ;;
  *) fail "IMAGE_PROFILE must be release or debug, not '$profile'" ;;
esac
for tool in ldd python3 objcopy; do
  command -v "$tool" >/dev/null || fail "$tool is missing (Debian: apt-get install libc-bin python3 binutils)"
done
certs=/etc/ssl/certs/ca-certificates.crt
[[ -s "$certs" ]] || fail "$certs is missing (Debian: apt-get install ca-certificates)"

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)"
[[ -n "$version" ]] || fail "no version in Cargo.toml"
name="${IMAGE_REPOSITORY:-ghcr.io/cloudsql-binder/cloudsql-binder}:${IMAGE_TAG:-$version}"
target="${CARGO_TARGET_DIR:-$repo/target}"
[[ "$target" = /* ]] || target="$repo/$target"
out="$target/image/cloudsql-binder-$version$suffix.oci.tar"

cargo_command=(${CARGO:-cargo} build "${cargo_args[@]}" --locked --bin cloudsql-binder)
echo "image: ${cargo_command[*]}" >&2
"${cargo_command[@]}" >&2
binary="$target/$profile/cloudsql-binder"
[[ -x "$binary" ]] || fail "cargo built no $binary"

stage="$(mktemp -d "${TMPDIR:-/tmp}/cloudsql-binder-image.XXXXXX")"
trap 'rm -rf "$stage"' EXIT

if [[ "$profile" == debug ]]; then
  # Debug info is most of a debug binary's size (and of no use in a pod).
  objcopy --strip-debug "$binary" "$stage/cloudsql-binder"
  binary="$stage/cloudsql-binder"
fi

files=(--file "$binary:/cloudsql-binder:0755")
# The libraries at the paths the loader resolved them to here, and the loader
# itself (the binary's PT_INTERP, /lib64/ld-linux-x86-64.so.2): ldd prints
# "name => /path (address)" for the first and "/path (address)" for the second.
libraries="$(ldd "$binary")" || fail "ldd $binary failed: is it a dynamic x86-64 binary?"
if grep -q 'not found' <<<"$libraries"; then
  fail "ldd finds no $(grep 'not found' <<<"$libraries" | awk '{print $1}' | paste -sd, -) for $binary"
fi
packages=()
while read -r path; do
  mode=0644
  if [[ "$path" == */ld-linux* ]]; then mode=0755; fi
  files+=(--file "$path:$path:$mode")
  # dpkg records the unmerged path (/lib/...): the owner of its copyright file.
  package="$(dpkg -S "$path" 2>/dev/null | head -1 | cut -d: -f1)" || true
  if [[ -n "$package" ]]; then packages+=("$package"); fi
done < <(awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$libraries" | sort -u)
files+=(--file "$certs:$certs:0644")
packages+=(ca-certificates base-files)
for package in $(printf '%s\n' "${packages[@]}" | sort -u); do
  copyright="/usr/share/doc/$package/copyright"
  if [[ -f "$copyright" ]]; then
    files+=(--file "$copyright:$copyright:0644")
  else
    echo "image: $copyright is missing here; the image goes without it" >&2
  fi
done
if [[ -f /etc/os-release ]]; then files+=(--file "/etc/os-release:/etc/os-release:0644"); fi

# The users and groups of distroless (root, nobody, nonroot); no shell.
cat >"$stage/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat >"$stage/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
# glibc's lookups: names from /etc/hosts (the kubelet mounts it) and then DNS.
cat >"$stage/nsswitch.conf" <<'EOF'
passwd: files
group: files
hosts: files dns
networks: files
EOF
for file in passwd group nsswitch.conf; do
  files+=(--file "$stage/$file:/etc/$file:0644")
done

mkdir -p "$(dirname "$out")"
python3 tools/oci-image.py --name "$name" --out "$out" "${files[@]}" \
  --dir /tmp:1777 --dir /home/nonroot:0700:65532:65532 \
  --user 65532:65532 --workdir /home/nonroot \
  --entrypoint '["/cloudsql-binder"]' \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env SSL_CERT_FILE="$certs" \
  --label org.opencontainers.image.title=cloudsql-binder \
  --label org.opencontainers.image.version="$version" \
  --label org.opencontainers.image.licenses=Apache-2.0
echo "$out"
