#!/usr/bin/env python3
"""Writes a single-layer container image as an OCI image archive, without Docker.

The archive is a tar of an OCI image layout (oci-layout, index.json,
blobs/sha256/...), loadable by `ctr -n k8s.io images import`, `podman load`,
`skopeo copy oci-archive:...` and Docker 25 or newer. Standard library only.

    tools/oci-image.py --name ghcr.io/cloudsql-binder/cloudsql-binder:0.1.0 \\
        --out image.tar --file target/release/cloudsql-binder:/cloudsql-binder:0755 \\
        --dir /tmp:1777 --user 65532:65532 --entrypoint '["/cloudsql-binder"]'

    --file SRC:DEST[:MODE[:UID:GID]]  a regular file (a symlink SRC is followed)
    --dir DEST[:MODE[:UID:GID]]       a directory (parents are added as 0755 root)
    --symlink DEST:TARGET             a symbolic link
    --owner UID:GID                   the owner of --file/--dir entries without
                                      one of their own (default 0:0)

The layer is reproducible: entries sorted, parents first, mtime 0, numeric
owners without names, no pax timestamps, gzip without a name or a date, and a
fixed creation date (1970-01-01) in the config. The same inputs give the same
digests. The name is stored fully qualified (`x/y:1` as `docker.io/x/y:1`, the
name the CRI looks up) in the index's io.containerd.image.name annotation, and
its tag in org.opencontainers.image.ref.name. The sizes (compressed: layer +
config + manifest, and the uncompressed layer) are printed on stderr.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import stat
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import PurePosixPath

CREATED = "1970-01-01T00:00:00Z"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


class UsageError(Exception):
    """A wrong argument: reported on one line, exit status 2."""


class HashingWriter:
    """Passes writes through to `target`, counting and hashing the bytes."""

    def __init__(self, target):
        self.target = target
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data):
        self.sha256.update(data)
        self.size += len(data)
        return self.target.write(data)

    def tell(self):
        return self.size

    def flush(self):
        self.target.flush()

    @property
    def digest(self):
        return "sha256:" + self.sha256.hexdigest()


def parse_owner(text, what):
    try:
        uid, gid = text.split(":")
        return int(uid), int(gid)
    except ValueError:
        raise UsageError(f"{what}: the owner must be UID:GID in numbers, got {text!r}") from None


def parse_mode(text, what):
    try:
        mode = int(text, 8)
    except ValueError:
        raise UsageError(f"{what}: the mode must be octal (e.g. 0755), got {text!r}") from None
    if not 0 <= mode <= 0o7777:
        raise UsageError(f"{what}: the mode {text!r} is not between 0 and 7777")
    return mode


def layer_path(dest, what):
    """An absolute path in the image, as the layer stores it (no leading slash)."""
    path = PurePosixPath(dest)
    if not path.is_absolute():
        raise UsageError(f"{what}: {dest!r} must be an absolute path in the image")
    parts = [p for p in path.parts[1:] if p not in ("", ".")]
    if not parts or ".." in parts:
        raise UsageError(f"{what}: {dest!r} must name something below / without '..'")
    return "/".join(parts)


@dataclass
class Entry:
    kind: str  # "file", "dir" or "symlink"
    path: str  # in the layer: relative, no leading slash
    mode: int
    owner: tuple
    source: str = None  # file: read from here (a symlink is followed)
    target: str = None  # symlink: points here


def collect_entries(args):
    """Every entry of the layer, parents included, keyed by path."""
    default_owner = parse_owner(args.owner, "--owner") if args.owner else (0, 0)
    entries = {}

    def add(entry, what):
        if entry.path in entries:
            raise UsageError(f"{what}: /{entry.path} is already in the image")
        entries[entry.path] = entry

    for spec in args.file:
        what = f"--file {spec}"
        fields = spec.split(":")
        if len(fields) not in (2, 3, 5):
            raise UsageError(f"{what}: expected SRC:DEST[:MODE[:UID:GID]]")
        source, dest = fields[0], fields[1]
        if not os.path.isfile(source):
            raise UsageError(f"{what}: {source!r} is not a regular file")
        if len(fields) >= 3 and fields[2]:
            mode = parse_mode(fields[2], what)
        else:
            mode = 0o755 if os.stat(source).st_mode & stat.S_IXUSR else 0o644
        owner = parse_owner(":".join(fields[3:]), what) if len(fields) == 5 else default_owner
        add(Entry("file", layer_path(dest, what), mode, owner, source=source), what)

    for spec in args.dir:
        what = f"--dir {spec}"
        fields = spec.split(":")
        if len(fields) not in (1, 2, 4):
            raise UsageError(f"{what}: expected DEST[:MODE[:UID:GID]]")
        mode = parse_mode(fields[1], what) if len(fields) >= 2 and fields[1] else 0o755
        owner = parse_owner(":".join(fields[2:]), what) if len(fields) == 4 else default_owner
        add(Entry("dir", layer_path(fields[0], what), mode, owner), what)

    for spec in args.symlink:
        what = f"--symlink {spec}"
        dest, sep, target = spec.partition(":")
        if not sep or not target:
            raise UsageError(f"{what}: expected DEST:TARGET")
        add(Entry("symlink", layer_path(dest, what), 0o777, (0, 0), target=target), what)

    for path in list(entries):
        parent = PurePosixPath(path).parent
        while str(parent) != ".":
            known = entries.get(str(parent))
            if known is None:
                entries[str(parent)] = Entry("dir", str(parent), 0o755, (0, 0))
            elif known.kind != "dir":
                raise UsageError(f"/{parent} is a {known.kind} in the image, but /{path} is below it")
            parent = parent.parent
    return entries


def write_layer(entries, out):
    """Writes the gzipped layer to `out`; returns (diff_id, digest, size, uncompressed size)."""
    compressed = HashingWriter(out)
    # No file name and mtime 0 in the gzip header: the same tar gives the same blob.
    with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=9) as gz:
        uncompressed = HashingWriter(gz)
        with tarfile.open(fileobj=uncompressed, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(entries, key=lambda p: PurePosixPath(p).parts):
                entry = entries[path]
                if entry.kind == "dir":
                    tar.addfile(tar_info(path, tarfile.DIRTYPE, entry.mode, owner=entry.owner))
                elif entry.kind == "symlink":
                    info = tar_info(path, tarfile.SYMTYPE, entry.mode, owner=entry.owner)
                    info.linkname = entry.target
                    tar.addfile(info)
                else:
                    with open(entry.source, "rb") as f:
                        size = os.fstat(f.fileno()).st_size
                        tar.addfile(tar_info(path, tarfile.REGTYPE, entry.mode, size, entry.owner), f)
    return uncompressed.digest, compressed.digest, compressed.size, uncompressed.size


def qualified_name(name):
    """`name` as the CRI normalizes it (docker.io/library/... for short names), and its tag."""
    if "@" in name:
        raise UsageError(f"--name {name!r}: give a tag, not a digest")
    repository, tag = name, "latest"
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        repository, tag = name.rsplit(":", 1)
    if not repository or not tag:
        raise UsageError(f"--name {name!r}: expected [REGISTRY/]REPOSITORY[:TAG]")
    first = repository.split("/", 1)[0]
    if "/" not in repository:
        repository = "docker.io/library/" + repository
    elif not ("." in first or ":" in first or first == "localhost"):
        repository = "docker.io/" + repository
    return f"{repository}:{tag}", tag


def json_array(text, what):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{what}: not JSON ({err})") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{what}: expected a JSON array of strings, e.g. '[\"/app\", \"run\"]'")
    return value


def key_values(items, what):
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} {item!r}: expected KEY=VALUE")
        pairs[key] = value
    return pairs


def canonical(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def descriptor(media_type, blob, **extra):
    return {
        "mediaType": media_type,
        "digest": "sha256:" + hashlib.sha256(blob).hexdigest(),
        "size": len(blob),
        **extra,
    }


def tar_info(name, kind, mode, size=0, owner=(0, 0)):
    """A reproducible tar header: mtime 0, numeric owner without names."""
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.mtime = kind, mode, size, 0
    info.uid, info.gid = owner
    info.uname = info.gname = ""
    return info


def add_bytes(tar, name, data):
    tar.addfile(tar_info(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))


def write_archive(path, index, config, manifest, layer, layer_digest, layer_size):
    """The OCI layout as one tar: oci-layout, index.json, then the blobs by digest."""
    with tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT) as archive:
        add_bytes(archive, "oci-layout", canonical({"imageLayoutVersion": "1.0.0"}))
        add_bytes(archive, "index.json", index)
        blobs = {
            layer_digest: None,
            descriptor(MEDIA_CONFIG, config)["digest"]: config,
            descriptor(MEDIA_MANIFEST, manifest)["digest"]: manifest,
        }
        for directory in ("blobs", "blobs/sha256"):
            archive.addfile(tar_info(directory, tarfile.DIRTYPE, 0o755))
        for digest in sorted(blobs):
            blob_name = "blobs/sha256/" + digest.split(":", 1)[1]
            if blobs[digest] is not None:
                add_bytes(archive, blob_name, blobs[digest])
                continue
            layer.seek(0)
            archive.addfile(tar_info(blob_name, tarfile.REGTYPE, 0o644, layer_size), layer)


def build(args):
    name, tag = qualified_name(args.name)
    entries = collect_entries(args)
    image_config = {}
    if args.user:
        image_config["User"] = args.user
    if args.env:
        # Env keeps the order given; a later KEY wins, as in a Dockerfile.
        image_config["Env"] = [f"{k}={v}" for k, v in key_values(args.env, "--env").items()]
    if args.entrypoint is not None:
        image_config["Entrypoint"] = json_array(args.entrypoint, "--entrypoint")
    if args.cmd is not None:
        image_config["Cmd"] = json_array(args.cmd, "--cmd")
    if args.workdir:
        image_config["WorkingDir"] = args.workdir
    if args.label:
        image_config["Labels"] = key_values(args.label, "--label")

    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryFile(dir=out_dir) as layer:
        diff_id, layer_digest, layer_size, uncompressed_size = write_layer(entries, layer)
        config = canonical({
            "architecture": "amd64",
            "os": "linux",
            "created": CREATED,
            "config": image_config,
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": CREATED, "created_by": "tools/oci-image.py", "comment": name}],
        })
        manifest = canonical({
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": descriptor(MEDIA_CONFIG, config),
            "layers": [{"mediaType": MEDIA_LAYER, "digest": layer_digest, "size": layer_size}],
        })
        index = canonical({
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [descriptor(
                MEDIA_MANIFEST, manifest,
                platform={"architecture": "amd64", "os": "linux"},
                annotations={
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": tag,
                },
            )],
        })

        partial = args.out + ".partial"
        try:
            write_archive(partial, index, config, manifest, layer, layer_digest, layer_size)
        except BaseException:
            if os.path.exists(partial):
                os.unlink(partial)
            raise
        os.replace(partial, args.out)

    total = layer_size + len(config) + len(manifest)
    print(
        f"oci-image: {name} ({descriptor(MEDIA_MANIFEST, manifest)['digest']}): "
        f"{total} bytes compressed ({total / 1e6:.1f} MB: layer {layer_size}, "
        f"config {len(config)}, manifest {len(manifest)}), "
        f"{uncompressed_size} bytes uncompressed ({uncompressed_size / 1e6:.1f} MB), "
        f"{len(entries)} entries -> {args.out}",
        file=sys.stderr,
    )


def main(argv):
    parser = argparse.ArgumentParser(
        prog="oci-image.py",
        description="Write a single-layer OCI image archive (see the module docstring).",
    )
    parser.add_argument("--name", required=True, help="[REGISTRY/]REPOSITORY[:TAG]")
    parser.add_argument("--out", required=True, help="the archive to write")
    parser.add_argument("--file", action="append", default=[], metavar="SRC:DEST[:MODE[:UID:GID]]")
    parser.add_argument("--dir", action="append", default=[], metavar="DEST[:MODE[:UID:GID]]")
    parser.add_argument("--symlink", action="append", default=[], metavar="DEST:TARGET")
    parser.add_argument("--owner", metavar="UID:GID", help="owner of --file/--dir entries (default 0:0)")
    parser.add_argument("--user", help="config.User, e.g. 65532:65532")
    parser.add_argument("--entrypoint", metavar="JSON", help='e.g. \'["/app"]\'')
    parser.add_argument("--cmd", metavar="JSON", help='e.g. \'["run"]\'')
    parser.add_argument("--env", action="append", default=[], metavar="K=V")
    parser.add_argument("--workdir", help="config.WorkingDir")
    parser.add_argument("--label", action="append", default=[], metavar="K=V")
    args = parser.parse_args(argv)
    try:
        build(args)
    except UsageError as err:
        print(f"oci-image: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"oci-image: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
