import os
import sys

import numpy as np
import pytest
import torch


def _choose_triton_interpreter() -> None:
    """TRITON_INTERPRET must be decided before triton is imported (`@triton.jit` reads it then).

    FSSAM_TRITON_INTERPRET=1 / 0 asks for the interpreter / the compiler explicitly; otherwise a
    TRITON_INTERPRET already in the environment is the user's choice, and without either the
    interpreter is used only where there is no CUDA device: on a GPU the kernels run compiled."""
    asked = os.environ.get("FSSAM_TRITON_INTERPRET")
    if asked is not None:
        if asked not in ("", "0"):
            os.environ["TRITON_INTERPRET"] = "1"
        else:
            os.environ.pop("TRITON_INTERPRET", None)
    elif "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:
        import warnings

        warnings.warn("triton was imported before tests/conftest.py chose TRITON_INTERPRET: kernels already "
                      "decorated keep the mode they were decorated in", stacklevel=1)


_choose_triton_interpreter()
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


def shared_export(tmp_path_factory, name: str, make):
    """(folder, manifest) of an export that test files read and never change (a test that changes
    one copies it first), made by `make(folder)`. Under scripts/test.sh (FSSAM_TEST_ARTIFACTS) it
    is made once per suite: by the first test process that needs it, while the others that need
    it wait on its lock (the export is written whole or not at all, so a process that died half way
    leaves it to the next); else once per test process, under its tmp."""
    import fcntl

    from fssam.export import load_manifest

    shared = os.environ.get("FSSAM_TEST_ARTIFACTS")
    if not shared:
        out = str(tmp_path_factory.mktemp(name) / "tiny")
        return out, make(out)
    out = os.path.join(shared, name)
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(os.path.join(out, "manifest.json")):
            return out, load_manifest(out)
        return out, make(out)


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory):
    """The tiny config exported (1-shot, fp32: stage files and graphs) for every test that needs ONNX artifacts."""
    from fssam.export import export

    return shared_export(tmp_path_factory, "tiny", lambda out: export("tiny", out=out, shots=1, precision="fp32",
                                                                        progress=False))


@pytest.fixture(scope="session")
def tiny_plan(tmp_path_factory):
    """tiny's two graphs with a graph plan in which every candidate is gated (no pruning by time)
    and reduced precision is held to the gate's rule (2x eager bf16 autocast's error) without the
    selection margin, so the int8 graphs that keep to the rule can be served and benched."""
    from fssam.export import export

    return shared_export(tmp_path_factory, "tiny-plan",
                         lambda out: export("tiny", out=out, stages=False, plan=True, progress=False,
                                            plan_options={"prune": False, "margin": 1.0}))


# ---------------------------------------------------------------- a synthetic PASCAL fold (eval, serving)

H, W = 60, 90  # synthetic images: not square, not the model size, so resizing matters


def _label(rng, classes):
    """Rectangles of the given classes (each >= 2048 px so the official list filter keeps it), 255 border."""
    label = np.zeros((H, W), np.uint8)
    for n, c in enumerate(classes):
        top, left = int(rng.integers(2, 8)), 2 + n * 44 + int(rng.integers(0, 2))
        label[top : top + 50, left : left + 42] = c
    label[:2], label[-2:], label[:, :2], label[:, -2:] = 255, 255, 255, 255
    return label


@pytest.fixture(scope="session")
def pascal(tmp_path_factory):
    """A synthetic PASCAL-5i fold 0 in the official layout:
    <top>/data/VOCdevkit2012/VOC2012/{JPEGImages,SegmentationClassAug}, lists as the official ones
    (paths prefixed ../data/VOCdevkit2012/VOC2012) under <top>/lists/pascal/fss_list/val."""
    import cv2

    top = tmp_path_factory.mktemp("voc")
    root = top / "data" / "VOCdevkit2012" / "VOC2012"
    lists = top / "lists" / "pascal"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    lists.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = {f"2008_{c}{k:05d}": [c] for c in range(1, 6) for k in range(3)}
    names["2009_000001"] = [2, 3]
    names["2009_000002"] = [1, 7]  # a base class next to a novel one
    with open(lists / "val.txt", "w") as f:
        for name, classes in names.items():
            image = (rng.random((H, W, 3)) * 255).astype(np.uint8)
            cv2.imwrite(str(root / "JPEGImages" / f"{name}.jpg"), image)
            cv2.imwrite(str(root / "SegmentationClassAug" / f"{name}.png"), _label(rng, classes))
            f.write(f"JPEGImages/{name}.jpg SegmentationClassAug/{name}.png\n")
    from fssam.data import scan_fold, write_fold

    write_fold(scan_fold("pascal", str(root), str(lists / "val.txt"), 0, progress=False), str(lists))
    return str(root), str(lists)


def imported_modules(path) -> set:
    """The top-level modules a Python file imports (the repositories' model.py files are checked with it)."""
    import ast

    modules = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add((node.module or "").split(".")[0])
    return modules
