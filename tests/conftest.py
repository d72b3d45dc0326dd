import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny shapes: one thread is fastest, and immune to a busy machine
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model():
    from fssam.model import build

    return build("tiny", seed=0)


def random_episode(batch=1, shots=1, size=64, seed=0):
    """Images in 0..255 and binary masks with a rectangle of foreground per support."""
    g = torch.Generator().manual_seed(seed)
    query = torch.rand(batch, 3, size, size, generator=g) * 255
    supports = torch.rand(batch, shots, 3, size, size, generator=g) * 255
    masks = torch.zeros(batch, shots, size, size)
    for b in range(batch):
        for k in range(shots):
            top, left = torch.randint(0, size // 2, (2,), generator=g).tolist()
            masks[b, k, top : top + size // 3, left : left + size // 3] = 1
    return query, supports, masks


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory):
    """The tiny config exported once (1-shot, fp32) for every test that needs ONNX artifacts."""
    from fssam.export import export, load_manifest

    shared = os.environ.get("FSSAM_TEST_ARTIFACTS")  # scripts/test.sh: one export for every test process
    out = os.path.join(shared, "tiny") if shared else str(tmp_path_factory.mktemp("export") / "tiny")
    if shared and os.path.isfile(os.path.join(out, "manifest.json")):
        return out, load_manifest(out)
    manifest = export("tiny", out=out, shots=1, precision="fp32", progress=False)
    return out, manifest
