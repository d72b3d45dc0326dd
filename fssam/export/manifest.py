"""manifest.json: the one contract between export, serving and benchmarks."""

from __future__ import annotations

import json
import os

from fssam.errors import InputError
from fssam.model.checkpoint import file_sha256

MANIFEST = "manifest.json"
FORMAT = "fssam-export/1"
REQUIRED = ("format", "config", "shots", "precision", "dtype", "weights", "stages", "pipeline")


def write_manifest(folder: str, manifest: dict) -> str:
    path = os.path.join(folder, MANIFEST)
    with open(path, "w") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=False)
        handle.write("\n")
    return path


def load_manifest(folder: str, verify: bool = True) -> dict:
    """Read and check a manifest; with `verify`, every listed file must exist with its sha256."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise InputError(f"no {MANIFEST} in {folder!r}: not an fssam export folder (run `fssam export` first)")
    try:
        with open(path) as handle:
            manifest = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path!r} is not valid JSON: {error}") from None
    missing = [key for key in REQUIRED if key not in manifest]
    if missing or manifest.get("format") != FORMAT:
        raise InputError(f"{path!r} is not an {FORMAT} manifest (missing: {', '.join(missing) or 'format'})")
    if verify:
        for name, entry in manifest["stages"].items():
            for listed in (entry, entry.get("tensorrt_onnx")):
                if listed is None:
                    continue
                file = os.path.join(folder, listed["file"])
                if not os.path.isfile(file):
                    raise InputError(f"stage {name}: {file!r} is listed in the manifest but missing")
                if file_sha256(file) != listed["sha256"]:
                    raise InputError(f"stage {name}: {file!r} does not match its sha256 in the manifest (modified?)")
    return manifest
