"""torch (AOTInductor): the `.pt2` packages of `fssam export --aoti` for the two deployable graphs.

A package runs only where it was built: the same torch version and the same device kind (and, for
CUDA, the same GPU model); anything else is one ConfigError line naming both. CPU packages take a
dynamic batch; CUDA packages are static per batch bucket (1, 2, 4, 8 episodes): a call is padded up
to the smallest bucket that holds it, replayed from a CUDA graph captured on first use (static
input and output buffers on the device), and cut back. Only the graphs run here (no stages).
"""

from __future__ import annotations

import contextlib
import os

import torch

from fssam.errors import ConfigError, first_line
from fssam.runtime.contract import GRAPH_ORDER
from fssam.runtime.parity import ieee_fp32
from fssam.runtime.runner import StageRunner

PRECISIONS = ("fp32", "bf16", "fp16")


def build_record(device: str) -> dict:
    """Where packages are built: what a runner compares before loading them."""
    record = {"device": device, "torch": torch.__version__}
    if device == "cuda":
        record["gpu"] = torch.cuda.get_device_name()
        record["cuda"] = torch.version.cuda
    return record


def check_where(entry: dict, precision: str, device: str | None = None) -> str:
    """The device to run on; ConfigError (one line) when this machine is not where the packages were built."""
    built = entry.get("device", "cpu")
    if device is not None and device != built:
        raise ConfigError(f"the AOTInductor {precision} packages were built for {built}, not {device}: export them "
                          f"again with `fssam export --aoti {precision} --device {device}`")
    if entry.get("torch") != torch.__version__:
        raise ConfigError(f"the AOTInductor {precision} packages were built with torch {entry.get('torch')}, this is "
                          f"torch {torch.__version__}: a package loads only with the torch that built it; export again here")
    if built == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"the AOTInductor {precision} packages were built for CUDA ({entry.get('gpu')}) and this "
                              "machine has no CUDA GPU")
        if entry.get("gpu") and torch.cuda.get_device_name() != entry["gpu"]:
            raise ConfigError(f"the AOTInductor {precision} packages were built on a {entry['gpu']}, this GPU is a "
                              f"{torch.cuda.get_device_name()}: export again on this GPU")
    return built


class _Replay:
    """One static-shape CUDA package replayed from a CUDA graph (captured on the first call). A
    capture that fails (an operation the package makes that a graph cannot hold) leaves the package
    called directly from then on, with the reason in `error` (the runner's describe() says so)."""

    def __init__(self, package):
        self.package, self.graph, self.inputs, self.outputs, self.error = package, None, None, None, None

    def _capture(self, args) -> None:
        with torch.inference_mode(False):  # static inputs that a later call outside inference mode can copy into
            self.inputs = [a.clone() for a in args]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up (autotuned kernels, allocator) before capture
                self.package(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph, pool = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle()
        with recover_failed_capture(pool):
            with torch.cuda.graph(graph, pool=pool):
                self.outputs = self.package(*self.inputs)
        self.graph = graph

    def __call__(self, *args):
        if self.graph is None and self.error is None:
            try:
                self._capture(args)
            except RuntimeError as error:
                self.error = capture_error(error)
                self.inputs = self.outputs = None
                torch.cuda.synchronize()
        if self.graph is None:
            return self.package(*args)
        for target, source in zip(self.inputs, args):
            target.copy_(source)
        self.graph.replay()
        outputs = self.outputs if isinstance(self.outputs, (tuple, list)) else (self.outputs,)
        return tuple(o.clone() for o in outputs)


@contextlib.contextmanager
def recover_failed_capture(pool):
    """Around `torch.cuda.graph(graph, pool=pool)`: where the capture raises, put back what its exit
    skipped (the caller's stream; the allocator's capture into `pool`, which left open makes every
    later empty_cache and capture in the process fail; a failed graph cannot name its pool), then
    re-raise. The served python-torch model (serving/templates/graph_model.py, which imports no
    fssam) writes the same steps out in TorchStage._capture."""
    stream = torch.cuda.current_stream()
    try:
        yield
    except RuntimeError:
        torch.cuda.set_stream(stream)
        try:
            torch._C._cuda_endAllocateToPool(stream.device.index, pool)
        except RuntimeError:
            pass  # the capture got as far as ending it (the graph releases the pool)
        else:
            torch._C._cuda_releasePool(stream.device.index, pool)
        raise


def capture_error(error: BaseException) -> str:
    """One line for a failed capture: the operation that broke it (CUDA reports the capture's end
    failing "due to a previous error", with the cause as the exception's context) and that end."""
    cause = error.__context__
    return f"{first_line(cause)} (then: {first_line(error)})" if cause is not None else first_line(error)


def load_package(path: str, device: str):
    """A package loaded to run on `device`; CUDA ones single-threaded (one model instance, no
    polling of its last run's event), which a CUDA graph capture needs."""
    if device == "cuda":
        return torch._inductor.aoti_load_package(path, run_single_threaded=True)
    return torch._inductor.aoti_load_package(path)


class TorchRunner(StageRunner):
    name = "torch"
    tensors = "torch"

    def __init__(self, artifacts: str, precision: str | None = None, threads: int | None = None, verify: bool = True,
                 device: str | None = None, cuda_graphs: bool = True):
        super().__init__(artifacts, precision or "fp32", verify)
        packages = self.manifest.get("aoti", {})
        if self.precision not in packages:
            raise ConfigError(f"this export has no AOTInductor {self.precision} packages: export them with "
                              f"`fssam export --aoti {self.precision}`")
        self.entry = packages[self.precision]
        if not self.entry.get("graphs"):
            raise ConfigError(f"the AOTInductor {self.precision} packages failed their gate at export: nothing to run")
        self.device = check_where(self.entry, self.precision, device)
        if threads and self.device == "cpu":
            torch.set_num_threads(int(threads))
        self.cuda_graphs = cuda_graphs
        self.loaded: dict = {}

    def describe(self) -> str:
        text = f"torch AOTInductor {self.precision} ({self.device})"
        replays = [p for p in self.loaded.values() if isinstance(p, _Replay)]
        failed = sorted({p.error for p in replays if p.error})
        if failed:
            return f"{text}, CUDA graphs off where capture failed: {failed[0]}"
        return f"{text}, replayed from CUDA graphs" if replays else text

    def _package(self, name: str, key: str):
        if (name, key) not in self.loaded:
            entry = self.entry["graphs"][name]["files"][key]
            package = load_package(os.path.join(self.artifacts, entry["file"]), self.device)
            self.loaded[(name, key)] = _Replay(package) if self.device == "cuda" and self.cuda_graphs else package
        return self.loaded[(name, key)]

    def run_stage(self, name: str, *tensors):
        if name not in GRAPH_ORDER:
            raise ConfigError(f"the torch runtime runs the deployable graphs ({', '.join(GRAPH_ORDER)}), not stage {name}")
        self.check_inputs(name, tensors)
        dtype = torch.float16 if self.precision == "fp16" else torch.float32
        args = [t.to(self.device, dtype=dtype if t.is_floating_point() else t.dtype).contiguous() for t in tensors]
        files = self.entry["graphs"][name]["files"]
        # as gated: no TF32 (ATen convolutions and matmuls in a package read the flags when they run,
        # and a CUDA graph keeps those of its capture)
        with ieee_fp32(), torch.no_grad():
            if "dynamic" in files:
                out = self._package(name, "dynamic")(*args)
            else:
                out = self._bucketed(name, files, args)
        out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return out if len(out) > 1 else out[0]

    def _bucketed(self, name: str, files: dict, args: list):
        """Static CUDA packages: pad the batch up to a bucket (repeating the last item), run, cut back."""
        batch = int(args[0].shape[0])
        sizes = sorted(int(k) for k in files)
        results = []
        start = 0
        while start < batch:
            take = min(batch - start, sizes[-1])
            size = next(s for s in sizes if s >= take)
            chunk = [a[start:start + take] for a in args]
            if take < size:
                chunk = [torch.cat([c, c[-1:].expand(size - take, *c.shape[1:])]) for c in chunk]
            out = self._package(name, str(size))(*chunk)
            out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
            results.append(tuple(o[:take] for o in out))
            start += take
        return tuple(torch.cat(parts) for parts in zip(*results))


RUNNER = TorchRunner
