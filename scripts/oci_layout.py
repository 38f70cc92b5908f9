#!/usr/bin/env python3
"""OCI image layouts for the filters and the sidecar (standard library only).

The filters: Wasm images that Istio pulls.

Format: the *compat* variant of the Wasm image specification, which Istio's
agent reads (pkg/wasm/imagefetcher.go): an OCI image manifest with exactly
one layer of media type `application/vnd.oci.image.layer.v1.tar+gzip` whose
tar holds the module as `plugin.wasm` (what `FROM scratch` + `COPY x.wasm
./plugin.wasm` builds). Istio's other accepted form, the *oci* variant with
`application/vnd.module.wasm.content.layer.v1+wasm`, must have exactly two
layers there, so a single raw-wasm layer would be refused.

Each image is written as an OCI image layout directory (`oci-layout`,
`index.json`, `blobs/sha256/…`), reproducibly: fixed tar metadata and gzip
mtime 0, so the same `.wasm` gives the same digests.

For WasmPlugin / TrafficExtension `sha256` with an `oci://` url, and for
EnvoyFilter `remote.sha256` behind Istio's agent, Istio compares the
**manifest digest** (hex, without `sha256:`), not the module's own hash; the
module's hash is what an `http(s)://` url is checked against.

The sidecar (scripts/package-sidecar.sh): an ordinary linux/amd64 container
image, one tar+gzip layer with the static binary, the migrations and an
/etc/passwd and /etc/group naming the non-root user; the config runs the
binary as that user. Written and verified the same way.

    python3 scripts/oci_layout.py pack OUT_DIR NAME=PATH.wasm [...] [--tag T]
    python3 scripts/oci_layout.py sidecar OUT_DIR BINARY MIGRATIONS_DIR [--tag T]
                                  [--version V] [--source URL]
    python3 scripts/oci_layout.py verify DIR [...]
"""

import gzip
import hashlib
import io
import json
import os
import struct
import sys
import tarfile

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
INDEX = "application/vnd.oci.image.index.v1+json"
WASM_MAGIC = b"\0asm"

# The sidecar's image. k8s/base/sidecar.yaml runs it as this user
# (scripts/check_deploy.py compares); the paths are what sidecar/README.md
# documents.
SIDECAR_UID = SIDECAR_GID = 65532
SIDECAR_USER = "nonroot"
SIDECAR_BIN = "/usr/local/bin/sidecar"
SIDECAR_MIGRATIONS = "/usr/share/access-sidecar/migrations"
SIDECAR_PORTS = (8081, 8082)  # HTTP, the rate limit service (gRPC)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# --------------------------------------------------------------------------
# Writing


def layer_tar(entries):
    """An uncompressed tar of entries {path: (mode, bytes, or None for a
    directory)}, sorted by path (a parent before its children), owned by
    0:0 without names, mtime 0: the same entries give the same bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path in sorted(entries):
            mode, data = entries[path]
            info = tarfile.TarInfo(path.strip("/") + ("/" if data is None else ""))
            info.type = tarfile.DIRTYPE if data is None else tarfile.REGTYPE
            info.size = 0 if data is None else len(data)
            info.mode = mode
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return buf.getvalue()


def image(tar, config, tag, annotations, layer_annotations=None):
    """One image of one tar+gzip layer: (blobs {hex: bytes}, index dict,
    manifest hex digest). `config` is the image config without `rootfs`."""
    layer = gzip.compress(tar, compresslevel=9, mtime=0)
    config = canonical({**config, "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sha256(tar)]}})
    ldesc = {"mediaType": LAYER, "digest": "sha256:" + sha256(layer), "size": len(layer)}
    if layer_annotations:
        ldesc["annotations"] = layer_annotations
    manifest = canonical({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": "sha256:" + sha256(config), "size": len(config)},
        "layers": [ldesc],
        "annotations": annotations,
    })
    blobs = {sha256(b): b for b in (layer, config, manifest)}
    index = {
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [{
            "mediaType": MANIFEST,
            "digest": "sha256:" + sha256(manifest),
            "size": len(manifest),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    }
    return blobs, index, sha256(manifest)


def build(wasm, name, tag):
    """A filter's image: returns (blobs {hex: bytes}, index dict, manifest hex digest)."""
    if wasm[:4] != WASM_MAGIC:
        raise ValueError(f"{name}: not a wasm module (bad magic)")
    config = {
        "architecture": "wasm",
        "os": "wasip1",
        "config": {},
        "history": [{"created_by": f"scripts/package-oci.sh: {name}.wasm as plugin.wasm"}],
    }
    return image(layer_tar({"plugin.wasm": (0o644, wasm)}), config, tag,
                 {"module.wasm.image/variant": "compat", "org.opencontainers.image.title": name},
                 {"org.opencontainers.image.title": "plugin.wasm"})


def sidecar_parts(binary, migrations, version, source):
    """The sidecar image's layer entries (layer_tar) and config (image), for
    sidecar_build, and for check_deploy.py's self-test to break."""
    entries = {}

    def add(path, mode, data=None):
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            entries.setdefault("/".join(parts[:i]), (0o755, None))
        entries["/".join(parts)] = (mode, data)
    add(SIDECAR_BIN, 0o755, binary)
    add(SIDECAR_MIGRATIONS, 0o755)
    for name, data in migrations.items():
        add(f"{SIDECAR_MIGRATIONS}/{name}", 0o644, data)
    add("/etc/passwd", 0o644, (f"root:x:0:0:root:/root:/sbin/nologin\n"
                               f"{SIDECAR_USER}:x:{SIDECAR_UID}:{SIDECAR_GID}:{SIDECAR_USER}:/nonexistent:/sbin/nologin\n").encode())
    add("/etc/group", 0o644, f"root:x:0:\n{SIDECAR_USER}:x:{SIDECAR_GID}:\n".encode())
    add("/tmp", 0o1777)
    labels = {
        "org.opencontainers.image.title": "sidecar",
        "org.opencontainers.image.description": "254Carbon access sidecar: WebSocket fan-out, usage metering, "
                                                "grants, the Envoy rate limit service",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.licenses": "Apache-2.0",
    }
    if source:
        labels["org.opencontainers.image.source"] = source
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": f"{SIDECAR_UID}:{SIDECAR_GID}",
            "Entrypoint": [SIDECAR_BIN],
            "Env": ["PATH=/usr/local/bin"],
            "WorkingDir": "/",
            "ExposedPorts": {f"{p}/tcp": {} for p in SIDECAR_PORTS},
            "Labels": labels,
        },
        "history": [{"created_by": "scripts/package-sidecar.sh: the static sidecar (x86_64-unknown-linux-musl), "
                                   "its migrations, /etc/passwd and /etc/group"}],
    }
    return entries, config, labels


def sidecar_build(binary, migrations, tag, version, source=""):
    """The sidecar's image: (blobs, index, manifest hex digest). `migrations`
    is {file name: bytes}."""
    entries, config, labels = sidecar_parts(binary, migrations, version, source)
    return image(layer_tar(entries), config, tag, labels)


def write_layout(out, blobs, index):
    blob_dir = os.path.join(out, "blobs", "sha256")
    if os.path.isdir(blob_dir):  # drop blobs of an earlier build
        for f in os.listdir(blob_dir):
            if f not in blobs:
                os.remove(os.path.join(blob_dir, f))
    os.makedirs(blob_dir, exist_ok=True)
    for hexd, data in blobs.items():
        with open(os.path.join(blob_dir, hexd), "wb") as f:
            f.write(data)
    with open(os.path.join(out, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


# --------------------------------------------------------------------------
# Reading and verifying


class Layout:
    """An image layout on disk (a directory), or in memory (blobs and index,
    as image() returns them)."""

    def __init__(self, root=None, blobs=None, index=None, name=None):
        self.root, self.blobs = root, blobs
        self.name = name or root or "image"
        if root is not None:
            with open(os.path.join(root, "oci-layout")) as f:
                if json.load(f).get("imageLayoutVersion") != "1.0.0":
                    raise ValueError(f"{root}: oci-layout: imageLayoutVersion is not 1.0.0")
            with open(os.path.join(root, "index.json")) as f:
                index = json.load(f)
        self.index = index

    def blob(self, desc):
        algo, _, hexd = desc["digest"].partition(":")
        if algo != "sha256":
            raise ValueError(f"{self.name}: unsupported digest {desc['digest']}")
        if self.root is None:
            where = f"{self.name}: blob {hexd}"
            if hexd not in self.blobs:
                raise ValueError(f"{where} missing")
            data = self.blobs[hexd]
        else:
            where = os.path.join(self.root, "blobs", "sha256", hexd)
            with open(where, "rb") as f:
                data = f.read()
        if sha256(data) != hexd:
            raise ValueError(f"{where}: content does not match its digest")
        if len(data) != desc["size"]:
            raise ValueError(f"{where}: size {len(data)} != descriptor size {desc['size']}")
        return data

    def image(self):
        """(manifest descriptor, manifest, config, the one layer's tar);
        checks what every image of ours has in common."""
        root, index = self.name, self.index
        if index.get("schemaVersion") != 2 or len(index.get("manifests", [])) != 1:
            raise ValueError(f"{root}: index.json must hold exactly one manifest")
        mdesc = index["manifests"][0]
        if mdesc.get("mediaType") != MANIFEST:
            raise ValueError(f"{root}: manifest media type {mdesc.get('mediaType')}")
        manifest = json.loads(self.blob(mdesc))
        if manifest.get("mediaType") != MANIFEST or manifest.get("schemaVersion") != 2:
            raise ValueError(f"{root}: not an OCI image manifest")
        config = json.loads(self.blob(manifest["config"]))
        layers = manifest.get("layers", [])
        if len(layers) != 1 or layers[0].get("mediaType") != LAYER:
            raise ValueError(f"{root}: want exactly one {LAYER} layer")
        tar = gzip.decompress(self.blob(layers[0]))
        if config.get("rootfs", {}).get("diff_ids") != ["sha256:" + sha256(tar)]:
            raise ValueError(f"{root}: config rootfs.diff_ids does not match the layer")
        return mdesc, manifest, config, tar


def read_blob(root, desc):
    return Layout(root).blob(desc)


def verify(root):
    """Checks a filter's image layout as Istio would read it; returns
    {"digest": manifest hex, "wasm_sha256": hex, "tag": ...}."""
    layout = Layout(root)
    mdesc, _, config, tar = layout.image()
    if (config.get("os"), config.get("architecture")) != ("wasip1", "wasm"):
        raise ValueError(f"{root}: not a Wasm filter image (os/architecture "
                         f"{config.get('os')}/{config.get('architecture')})")
    wasm = None
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        for m in t.getmembers():
            if os.path.basename(m.name) == "plugin.wasm" and m.isfile():
                wasm = t.extractfile(m).read()
                break
    if wasm is None or wasm[:4] != WASM_MAGIC:
        raise ValueError(f"{root}: no valid plugin.wasm in the layer")
    return {
        "digest": sha256(layout.blob(mdesc)),
        "wasm_sha256": sha256(wasm),
        "tag": mdesc.get("annotations", {}).get("org.opencontainers.image.ref.name", ""),
    }


PT_DYNAMIC, PT_INTERP, DT_NEEDED, DT_STRTAB = 2, 3, 1, 5
EM_X86_64 = 62


def elf_linking(data):
    """How an x86-64 ELF executable is linked: {"interp": the PT_INTERP
    loader or None, "needed": [DT_NEEDED libraries]}. A static binary
    (static or static-pie) has neither. Raises ValueError if `data` is not
    a 64-bit little-endian x86-64 executable."""
    if data[:4] != b"\x7fELF" or len(data) < 64:
        raise ValueError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    if e_machine != EM_X86_64 or e_type not in (2, 3):  # ET_EXEC, ET_DYN (PIE)
        raise ValueError(f"not an x86-64 executable (e_type {e_type}, e_machine {e_machine})")
    e_phoff, = struct.unpack_from("<Q", data, 32)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    phdrs = []
    for i in range(e_phnum):
        off = e_phoff + i * e_phentsize
        if off + 56 > len(data):
            raise ValueError("program header table past the end of the file")
        # p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
        phdrs.append(struct.unpack_from("<IIQQQQQQ", data, off))
    interp, needed = None, []
    loads = [(p[3], p[2], p[5]) for p in phdrs if p[0] == 1]  # PT_LOAD: vaddr, offset, filesz

    def at(vaddr):
        for va, off, size in loads:
            if va <= vaddr < va + size:
                return off + vaddr - va
        return None
    for p_type, _, off, _, _, filesz, _, _ in phdrs:
        if p_type == PT_INTERP:
            interp = data[off:off + filesz].split(b"\0")[0].decode(errors="replace")
        elif p_type == PT_DYNAMIC:
            dyn, strtab = [], None
            for o in range(off, off + filesz - 15, 16):
                tag, val = struct.unpack_from("<qQ", data, o)
                if tag == 0:
                    break
                dyn.append((tag, val))
                if tag == DT_STRTAB:
                    strtab = at(val)
            for tag, val in dyn:
                if tag == DT_NEEDED:
                    name = f"#{val}"
                    if strtab is not None:
                        name = data[strtab + val:].split(b"\0")[0].decode(errors="replace")
                    needed.append(name)
    return {"interp": interp, "needed": needed}


def verify_sidecar(layout):
    """Checks the sidecar's image (a Layout, or a directory): linux/amd64,
    a non-root numeric User named in /etc/passwd and /etc/group, the
    Entrypoint a static x86-64 executable in the layer, the migrations there,
    the ports exposed, nothing setuid. Returns {"digest", "tag", "user",
    "entrypoint", "binary_sha256", "migrations": {name: sha256}}."""
    if not isinstance(layout, Layout):
        layout = Layout(layout)
    root = layout.name
    mdesc, _, config, tar = layout.image()
    if (config.get("os"), config.get("architecture")) != ("linux", "amd64"):
        raise ValueError(f"{root}: not a linux/amd64 image ({config.get('os')}/{config.get('architecture')})")
    cfg = config.get("config") or {}
    files, modes = {}, {}
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        for m in t.getmembers():
            path = "/" + m.name.strip("/").removeprefix("./")
            modes[path] = (m.type, m.mode)
            if m.mode & 0o6000:
                raise ValueError(f"{root}: {path} is setuid/setgid")
            if m.isfile():
                files[path] = t.extractfile(m).read()
    user = cfg.get("User", "")
    uid, _, gid = user.partition(":")
    if not (uid.isdigit() and gid.isdigit()):
        raise ValueError(f"{root}: config User {user!r} is not numeric UID:GID "
                         "(Kubernetes' runAsNonRoot can only check a number)")
    if int(uid) == 0 or int(gid) == 0:
        raise ValueError(f"{root}: config User {user!r} is root")

    def names(path, field_id):
        text = files.get(path, b"").decode(errors="replace")
        return {f[field_id]: f[0] for f in (line.split(":") for line in text.splitlines()) if len(f) > field_id}
    if uid not in names("/etc/passwd", 2):
        raise ValueError(f"{root}: /etc/passwd has no user {uid} (config User {user!r})")
    if gid not in names("/etc/group", 2):
        raise ValueError(f"{root}: /etc/group has no group {gid} (config User {user!r})")
    entry = cfg.get("Entrypoint") or []
    if not entry or not entry[0].startswith("/"):
        raise ValueError(f"{root}: config Entrypoint {entry!r} is not an absolute path")
    binary = files.get(entry[0])
    if binary is None:
        raise ValueError(f"{root}: the Entrypoint {entry[0]} is not a file in the layer")
    if modes[entry[0]][1] & 0o111 != 0o111:
        raise ValueError(f"{root}: {entry[0]} is not executable by everyone (mode {modes[entry[0]][1]:o})")
    try:
        link = elf_linking(binary)
    except ValueError as e:
        raise ValueError(f"{root}: {entry[0]}: {e}") from None
    if link["interp"] or link["needed"]:
        raise ValueError(f"{root}: {entry[0]} is not static: loader {link['interp']!r}, "
                         f"needs {link['needed']}")
    prefix = SIDECAR_MIGRATIONS + "/"
    migrations = {p[len(prefix):]: sha256(d) for p, d in files.items()
                  if p.startswith(prefix) and p.endswith(".sql") and "/" not in p[len(prefix):]}
    if not migrations:
        raise ValueError(f"{root}: no migrations (*.sql) under {SIDECAR_MIGRATIONS}")
    ports = set(cfg.get("ExposedPorts") or {})
    missing = [f"{p}/tcp" for p in SIDECAR_PORTS if f"{p}/tcp" not in ports]
    if missing:
        raise ValueError(f"{root}: config ExposedPorts lacks {missing}")
    return {
        "digest": mdesc["digest"].partition(":")[2],
        "tag": mdesc.get("annotations", {}).get("org.opencontainers.image.ref.name", ""),
        "user": user,
        "entrypoint": entry[0],
        "binary_sha256": sha256(binary),
        "migrations": migrations,
    }


def read_migrations(directory):
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".sql"):
            with open(os.path.join(directory, name), "rb") as f:
                out[name] = f.read()
    return out


# --------------------------------------------------------------------------


def _option(argv, name, default):
    if name in argv:
        i = argv.index(name)
        return argv[i + 1], argv[:i] + argv[i + 2:]
    return default, argv


def main(argv):
    if len(argv) >= 2 and argv[0] == "pack":
        tag, argv = _option(argv, "--tag", "latest")
        out = argv[1]
        for spec in argv[2:]:
            name, _, path = spec.partition("=")
            with open(path, "rb") as f:
                wasm = f.read()
            blobs, index, digest = build(wasm, name, tag)
            write_layout(os.path.join(out, name), blobs, index)
            got = verify(os.path.join(out, name))
            assert got["digest"] == digest and got["wasm_sha256"] == sha256(wasm)
            print(f"{name:<13} {os.path.join(out, name)}  tag {tag}")
            print(f"{'':<13} image digest sha256:{digest}   (WasmPlugin/TrafficExtension/EnvoyFilter sha256 for oci://)")
            print(f"{'':<13} wasm sha256  {sha256(wasm)}   (sha256 for an http(s):// url of the bare .wasm)")
        return 0
    if len(argv) >= 2 and argv[0] == "sidecar":
        tag, argv = _option(argv, "--tag", "latest")
        version, argv = _option(argv, "--version", "0.0.0")
        source, argv = _option(argv, "--source", "")
        if len(argv) != 4:
            print(__doc__, file=sys.stderr)
            return 2
        out, binary_path, mig_dir = argv[1:]
        with open(binary_path, "rb") as f:
            binary = f.read()
        migrations = read_migrations(mig_dir)
        blobs, index, digest = sidecar_build(binary, migrations, tag, version, source)
        try:  # refuse before writing: a broken layout never replaces a good one
            verify_sidecar(Layout(blobs=blobs, index=index, name=binary_path))
        except ValueError as e:
            print(f"oci_layout: {e}", file=sys.stderr)
            return 1
        write_layout(out, blobs, index)
        got = verify_sidecar(out)
        assert got["digest"] == digest and got["migrations"] == {n: sha256(d) for n, d in migrations.items()}
        print(f"sidecar       {out}  tag {tag}")
        print(f"{'':<13} image digest sha256:{digest}   (k8s/deploy.json images.digests.sidecar)")
        print(f"{'':<13} binary sha256 {got['binary_sha256']}   ({len(binary)} bytes, static)")
        print(f"{'':<13} user {got['user']}, entrypoint {got['entrypoint']}, "
              f"migrations {', '.join(got['migrations'])}")
        return 0
    if len(argv) >= 2 and argv[0] == "verify":
        for root in argv[1:]:
            if Layout(root).image()[2].get("os") == "linux":
                got = verify_sidecar(root)
                print(f"{root}: ok, image sha256:{got['digest']}, static {got['entrypoint']} "
                      f"{got['binary_sha256']}, user {got['user']}")
            else:
                got = verify(root)
                print(f"{root}: ok, image sha256:{got['digest']}, wasm {got['wasm_sha256']}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
