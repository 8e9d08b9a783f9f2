#!/usr/bin/env bash
# Proves an OCI archive (tools/oci-image.py, `make image`) loads and runs in
# containerd, as the node will run it: a private containerd (root, state and
# sockets in a temporary directory, no CRI) imports it into namespace k8s.io,
# lists it, and runs COMMAND (default: the image's own entrypoint and cmd)
# with a read-only root filesystem as the image's user; then stops and removes
# everything it started. Needs root and Debian's containerd and runc.
#
#   tools/oci-image-check.sh ARCHIVE [COMMAND ARG...]
#   tools/oci-image-check.sh "$(make -s image)" /cloudsql-binder version
set -euo pipefail

(($#)) || { echo "usage: tools/oci-image-check.sh ARCHIVE [COMMAND ARG...]" >&2; exit 2; }
archive="$1"; shift
[[ -f "$archive" ]] || { echo "oci-image-check: $archive: no such file" >&2; exit 1; }
for tool in containerd ctr runc; do
  command -v "$tool" >/dev/null || { echo "oci-image-check: $tool is missing (apt-get install containerd runc)" >&2; exit 1; }
done

dir="$(mktemp -d /tmp/oci-image-check.XXXXXX)"
sock="$dir/containerd.sock"
pid=""
cleanup() {
  if [[ -n "$pid" ]]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  # Whatever containerd left mounted under its root (nothing, normally).
  findmnt -rn -o TARGET | grep "^$dir/" | sort -r | xargs -r umount -l 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

cat >"$dir/config.toml" <<EOF
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$dir/containerd-ttrpc.sock"
EOF
containerd --config "$dir/config.toml" >"$dir/containerd.log" 2>&1 &
pid=$!
ctr=(ctr --address "$sock" -n k8s.io)
for _ in $(seq 50); do
  "${ctr[@]}" version >/dev/null 2>&1 && break
  sleep 0.2
done
"${ctr[@]}" version >/dev/null 2>&1 || { tail -5 "$dir/containerd.log" >&2; echo "oci-image-check: containerd did not start" >&2; exit 1; }

imported="$("${ctr[@]}" images import "$archive")"
echo "$imported"
name="$(sed -n 's/^unpacking \([^ ]*\) (.*/\1/p' <<<"$imported" | head -1)"
[[ -n "$name" ]] || { echo "oci-image-check: ctr named no image (no io.containerd.image.name annotation?)" >&2; exit 1; }
"${ctr[@]}" images ls "name==$name"
"${ctr[@]}" run --rm --read-only "$name" "oci-image-check-$$" "$@"
