#!/usr/bin/env python3
"""Wasm filters as OCI images that Istio pulls (standard library only).

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

    python3 scripts/oci_layout.py pack OUT_DIR NAME=PATH.wasm [...] [--tag T]
    python3 scripts/oci_layout.py verify DIR [...]
"""

import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
WASM_MAGIC = b"\0asm"


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def layer_tar(wasm):
    """An uncompressed tar with one entry, plugin.wasm, fixed metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("plugin.wasm")
        info.size = len(wasm)
        info.mode = 0o644
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(wasm))
    return buf.getvalue()


def build(wasm, name, tag):
    """Returns (blobs {hex: bytes}, index dict, manifest hex digest)."""
    if wasm[:4] != WASM_MAGIC:
        raise ValueError(f"{name}: not a wasm module (bad magic)")
    tar = layer_tar(wasm)
    layer = gzip.compress(tar, compresslevel=9, mtime=0)
    config = canonical({
        "architecture": "wasm",
        "os": "wasip1",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sha256(tar)]},
        "history": [{"created_by": f"scripts/package-oci.sh: {name}.wasm as plugin.wasm"}],
    })
    manifest = canonical({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": "sha256:" + sha256(config), "size": len(config)},
        "layers": [{
            "mediaType": LAYER,
            "digest": "sha256:" + sha256(layer),
            "size": len(layer),
            "annotations": {"org.opencontainers.image.title": "plugin.wasm"},
        }],
        "annotations": {
            "module.wasm.image/variant": "compat",
            "org.opencontainers.image.title": name,
        },
    })
    blobs = {sha256(b): b for b in (layer, config, manifest)}
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": MANIFEST,
            "digest": "sha256:" + sha256(manifest),
            "size": len(manifest),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    }
    return blobs, index, sha256(manifest)


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


def read_blob(root, desc):
    algo, _, hexd = desc["digest"].partition(":")
    if algo != "sha256":
        raise ValueError(f"{root}: unsupported digest {desc['digest']}")
    path = os.path.join(root, "blobs", "sha256", hexd)
    with open(path, "rb") as f:
        data = f.read()
    if sha256(data) != hexd:
        raise ValueError(f"{path}: content does not match its digest")
    if len(data) != desc["size"]:
        raise ValueError(f"{path}: size {len(data)} != descriptor size {desc['size']}")
    return data


def verify(root):
    """Checks an image layout as Istio would read it; returns
    {"digest": manifest hex, "wasm_sha256": hex, "tag": ...}."""
    with open(os.path.join(root, "oci-layout")) as f:
        if json.load(f).get("imageLayoutVersion") != "1.0.0":
            raise ValueError(f"{root}: oci-layout: imageLayoutVersion is not 1.0.0")
    with open(os.path.join(root, "index.json")) as f:
        index = json.load(f)
    if index.get("schemaVersion") != 2 or len(index.get("manifests", [])) != 1:
        raise ValueError(f"{root}: index.json must hold exactly one manifest")
    mdesc = index["manifests"][0]
    if mdesc.get("mediaType") != MANIFEST:
        raise ValueError(f"{root}: manifest media type {mdesc.get('mediaType')}")
    manifest = json.loads(read_blob(root, mdesc))
    if manifest.get("mediaType") != MANIFEST or manifest.get("schemaVersion") != 2:
        raise ValueError(f"{root}: not an OCI image manifest")
    config = json.loads(read_blob(root, manifest["config"]))
    layers = manifest.get("layers", [])
    if len(layers) != 1 or layers[0].get("mediaType") != LAYER:
        raise ValueError(f"{root}: Istio's compat variant needs exactly one {LAYER} layer")
    tar = gzip.decompress(read_blob(root, layers[0]))
    if config.get("rootfs", {}).get("diff_ids") != ["sha256:" + sha256(tar)]:
        raise ValueError(f"{root}: config rootfs.diff_ids does not match the layer")
    wasm = None
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        for m in t.getmembers():
            if os.path.basename(m.name) == "plugin.wasm" and m.isfile():
                wasm = t.extractfile(m).read()
                break
    if wasm is None or wasm[:4] != WASM_MAGIC:
        raise ValueError(f"{root}: no valid plugin.wasm in the layer")
    return {
        "digest": sha256(read_blob(root, mdesc)),
        "wasm_sha256": sha256(wasm),
        "tag": mdesc.get("annotations", {}).get("org.opencontainers.image.ref.name", ""),
    }


def main(argv):
    if len(argv) >= 2 and argv[0] == "pack":
        tag = "latest"
        if "--tag" in argv:
            i = argv.index("--tag")
            tag = argv[i + 1]
            argv = argv[:i] + argv[i + 2:]
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
    if len(argv) >= 2 and argv[0] == "verify":
        for root in argv[1:]:
            got = verify(root)
            print(f"{root}: ok, image sha256:{got['digest']}, wasm {got['wasm_sha256']}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
