"""`fssam compare` on the shared tiny export (a random-init one): it says which weights it gated,
on stderr and in --json, and its --episode-seed has the seed range. The gate itself is tested
with the export (test_export.py)."""

import json
import subprocess
import sys

import pytest

from fssam.runtime.manifest import weights_line


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fssam.cli", *args], capture_output=True, text=True, timeout=600)


def test_a_random_init_export_is_never_presented_as_trained(tiny_artifacts, tmp_path):
    artifacts, manifest = tiny_artifacts
    assert manifest["weights"]["source"].startswith("random")
    report = tmp_path / "report.json"
    result = run_cli("compare", "--artifacts", artifacts, "--json", str(report), "--episode-seed", str(2**63 - 1))
    assert result.returncode == 0, result.stderr
    assert "PASSED" in result.stdout
    line = manifest["weights"]["note"]
    assert "RANDOM-INIT" in line and line in result.stderr.splitlines()
    assert json.loads(report.read_text())["weights"] == line


def test_the_weights_line_of_a_checkpoint_export_names_its_files(tiny_artifacts):
    manifest = {**tiny_artifacts[1], "weights": {"source": "checkpoint", "checkpoints": [
        {"file": "best.pth", "format": "fssam", "sha256": "ab" * 32}]}}
    assert weights_line(manifest) == "weights: fssam checkpoint best.pth (sha256 abababababab)"
    old = {**tiny_artifacts[1], "weights": {"source": "random-init seed 3", "checkpoints": []}}  # no note recorded
    assert weights_line(old) == "RANDOM-INIT export (random-init seed 3): outputs are not meaningful"


@pytest.mark.parametrize("seed", [str(2**63), str(2**70), "-5"])
def test_an_episode_seed_out_of_range_is_one_usage_line(tmp_path, seed):
    result = run_cli("compare", "--artifacts", str(tmp_path), "--episode-seed", seed)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(
        f"argument --episode-seed: {seed}: expected a seed, 0 <= seed < 2**63")
