"""manifest.json: the one contract between export, runtimes, serving and benchmarks.

Every `{"file": ..., "sha256": ...}` entry anywhere in the manifest (ONNX stages, the TensorRT
head, OpenVINO IR and its weights, TensorRT engines) is checked on load.
"""

from __future__ import annotations

import hashlib
import json
import os

from fssam.errors import InputError
from fssam.files import read_json

MANIFEST = "manifest.json"
FORMAT = "fssam-export/1"
REQUIRED = ("format", "config", "shots", "precision", "dtype", "weights", "stages", "pipeline")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str, manifest: dict) -> str:
    path = os.path.join(folder, MANIFEST)
    with open(path, "w") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=False)
        handle.write("\n")
    return path


def listed_files(node, where: str = "") -> list[tuple[str, dict]]:
    """(where, entry) of every {"file", "sha256"} entry in a manifest, depth first."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("file"), str) and "sha256" in node:
            found.append((where, node))
        for key, value in node.items():
            found += listed_files(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += listed_files(value, f"{where}[{index}]")
    return found


def load_manifest(folder: str, verify: bool = True) -> dict:
    """Read and check a manifest; with `verify`, every listed file must exist with its sha256."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise InputError(f"no {MANIFEST} in {folder!r}: not an fssam export folder (run `fssam export` first)")
    try:
        manifest = read_json(path, FORMAT)
    except ValueError as reason:
        raise InputError(f"{path!r} is {reason}") from None
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise InputError(f"{path!r} is not an {FORMAT} manifest (missing: {', '.join(missing)})")
    if verify:
        checked = set()
        for where, entry in listed_files(manifest):
            if where.startswith("weights") or (entry["file"], entry["sha256"]) in checked:
                continue  # source checkpoints are recorded by hash, not kept in the folder
            checked.add((entry["file"], entry["sha256"]))
            file = os.path.join(folder, entry["file"])
            if not os.path.isfile(file):
                raise InputError(f"{where}: {file!r} is listed in the manifest but missing")
            if file_sha256(file) != entry["sha256"]:
                raise InputError(f"{where}: {file!r} does not match its sha256 in the manifest (modified?)")
    return manifest


def int8_graph_files(manifest: dict, runtime: str) -> dict:
    """{graph: relative file} of `runtime`'s int8 graphs that passed the graph plan's gate
    (manifest["graph_plan"]["int8_files"], keyed "runtime/graph"); empty when there are none."""
    return {key.split("/", 1)[1]: entry["file"]
            for key, entry in manifest.get("graph_plan", {}).get("int8_files", {}).items()
            if key.split("/", 1)[0] == runtime}


def weights_line(manifest: dict) -> str:
    """The export's weights in one line, as predict, eval and bench word them (`fssam compare` prints
    it, a repository's ensemble serves it to clients): a random-init export is never presented as
    trained (its manifest's note, or RANDOM-INIT with its source)."""
    weights = manifest["weights"]
    if weights["source"].startswith("random"):
        note = weights.get("note", "")
        return note if "RANDOM" in note.upper() else f"RANDOM-INIT export ({weights['source']}): outputs are not meaningful"
    return "weights: " + ", ".join(f"{e.get('format', '?')} checkpoint {e.get('file', '?')} (sha256 {e['sha256'][:12]})"
                                   for e in weights.get("checkpoints", []))
