"""Latency, throughput and memory of every backend on the same inputs, interleaved.

Each mode is a "runner" with the six stage methods (eager model, autocast, torch.compile,
ONNX Runtime, ...) or a whole-episode callable (a served model). Iterations run mode after mode
(A B C A B C ...), so drift of the machine hits all modes alike. A mode on a GPU gets its inputs
on that device before the clock starts, and the clock is read only after the GPU has finished
(torch.cuda.synchronize), per stage and per episode.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time

import torch

from fssam.device import synchronize
from fssam.runtime.contract import STAGE_ORDER, binary_masks, encode_support, run_episode, segment, to_uint8


class TimedStages:
    """Wraps a stage runner: every stage call is timed (summed per stage over one episode)."""

    def __init__(self, runner, context=contextlib.nullcontext, device=torch.device("cpu")):
        self.runner = runner
        self.context = context
        self.device = device
        self.times: dict[str, float] = {}

    def __getattr__(self, name):
        if name not in STAGE_ORDER:
            raise AttributeError(name)
        method = getattr(self.runner, name)

        def call(*args):
            synchronize(self.device)
            start = time.perf_counter()
            with self.context():
                out = method(*args)
            synchronize(self.device)
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
            return out

        return call


class StageMode:
    """A mode whose runner exposes the six stages: per-stage times, full and cached-support episodes.

    `runtime` describes an exported runtime's set-up (e.g. the per-stage precisions of an OpenVINO
    int8 plan) for the report."""

    per_stage = True

    def __init__(self, name: str, runner, context=contextlib.nullcontext, device="cpu", runtime: str | None = None):
        self.name = name
        self.runtime = runtime
        self.device = torch.device(device)
        self.timed = TimedStages(runner, context, self.device)
        self.support = None

    def _on_device(self, *tensors):
        return tuple(t.to(self.device) for t in tensors)

    def episode(self, query, supports, masks) -> tuple[float, dict]:
        query, supports, masks = self._on_device(query, supports, masks)
        self.timed.times = {}
        synchronize(self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            run_episode(self.timed, query, supports, masks)
        synchronize(self.device)
        return time.perf_counter() - start, dict(self.timed.times)

    def logits(self, query, supports, masks) -> torch.Tensor:
        """One untimed episode's logits (the output check of fssam.bench.checks)."""
        query, supports, masks = self._on_device(query, supports, masks)
        with torch.inference_mode(), self.timed.context():
            return run_episode(self.timed.runner, query, supports, masks)

    def cached(self, query, supports, masks) -> float:
        query, supports, masks = self._on_device(query, supports, masks)
        with torch.inference_mode():
            if self.support is None:
                self.support = encode_support(self.timed, supports, masks)
            synchronize(self.device)
            start = time.perf_counter()
            segment(self.timed, query, self.support)
            synchronize(self.device)
        return time.perf_counter() - start


class GraphMode:
    """A mode whose runner exposes the two deployable graphs (an exported runtime, or the eager
    model's own support_encoder / query_segmenter): what a server runs, in process.
    Episode: both graphs; cached support: query_segmenter alone on the support tensors of the
    first call. Times per graph."""

    per_stage = True

    def __init__(self, name: str, runner, context=contextlib.nullcontext, device="cpu", runtime: str | None = None):
        self.name, self.runner, self.context, self.runtime = name, runner, context, runtime
        self.device = torch.device(device)
        self.support = None

    def _inputs(self, query, supports, masks):
        masks = to_uint8(binary_masks(masks))
        return tuple(to_uint8(t).to(self.device) for t in (query, supports)) + (masks.to(self.device),)

    def _timed(self, times, name, *args):
        synchronize(self.device)
        start = time.perf_counter()
        with self.context():
            out = getattr(self.runner, name)(*args)
        synchronize(self.device)
        times[name] = time.perf_counter() - start
        return out

    def episode(self, query, supports, masks) -> tuple[float, dict]:
        query, supports, masks = self._inputs(query, supports, masks)
        times = {}
        with torch.inference_mode():
            support = self._timed(times, "support_encoder", supports, masks)
            self._timed(times, "query_segmenter", query, *support, masks)
        return sum(times.values()), times

    def logits(self, query, supports, masks) -> torch.Tensor:
        """One untimed episode's logits through both graphs (the output check of fssam.bench.checks)."""
        query, supports, masks = self._inputs(query, supports, masks)
        with torch.inference_mode(), self.context():
            support = self.runner.support_encoder(supports, masks)
            return self.runner.query_segmenter(query, *support, masks)

    def cached(self, query, supports, masks) -> float:
        query, supports, masks = self._inputs(query, supports, masks)
        with torch.inference_mode():
            if self.support is None:
                self.support = self.runner.support_encoder(supports, masks)
            times = {}
            self._timed(times, "query_segmenter", query, *self.support, masks)
        return times["query_segmenter"]


class EpisodeMode:
    """A mode that only runs whole episodes (a served model): no per-stage times.

    `call(query, supports, masks)` runs one episode; the cached figure is a second call with the
    same support set, which a server with a support cache answers without re-encoding it.
    """

    per_stage = False
    device = torch.device("cpu")  # the client side: the server's devices are its own
    runtime = None

    def __init__(self, name: str, call):
        self.name = name
        self.call = call

    def episode(self, query, supports, masks):
        start = time.perf_counter()
        self.call(query, supports, masks, cache=False)
        return time.perf_counter() - start, {}

    def cached(self, query, supports, masks) -> float:
        start = time.perf_counter()
        self.call(query, supports, masks, cache=True)
        return time.perf_counter() - start

    def logits(self, query, supports, masks) -> torch.Tensor:
        """The served logits for these very inputs (the support set as the cached calls send it)."""
        return torch.as_tensor(self.call(query, supports, masks, cache=True))


class RssSampler:
    """Peak resident set size (MB) of this process while a block runs, sampled every 2 ms."""

    def __init__(self):
        self.peak = 0.0
        self._stop = threading.Event()

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def __enter__(self):
        self.start = self.peak = self.rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss_mb())


def summary(samples: list[float]) -> dict:
    """Median, p90, p99 in milliseconds."""
    ordered = sorted(samples)

    def pct(p):
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] * 1000

    return {"median_ms": statistics.median(ordered) * 1000, "p90_ms": pct(90), "p99_ms": pct(99), "n": len(ordered)}


def run_interleaved(modes, inputs, iterations: int, warmup: int, progress=None) -> dict:
    """{mode: {"episode": summary, "cached_support": summary, "stages": {stage: summary}, "peak_rss_mb", ...}}:
    every mode `iterations` times after `warmup` runs, mode after mode."""
    return run_adaptive(modes, inputs, min_runs=iterations, max_runs=iterations, budget_s=float("inf"),
                        warmup=warmup, progress=progress)


def stable(samples: list[float], spread: float) -> bool:
    """Whether the median moved less than `spread` (a fraction) with the last sample."""
    if len(samples) < 2:
        return False
    median = statistics.median(samples)
    return abs(median - statistics.median(samples[:-1])) <= spread * median


def adaptive_median(call, budget_s: float, min_runs: int = 3, max_runs: int = 20, spread: float = 0.03,
                    give_up_above: float | None = None) -> tuple[float, int]:
    """(median seconds, runs) of `call()` after one warm-up: at least `min_runs`, then until the
    median is stable (`stable`) or the budget is spent. `give_up_above` (seconds): a first timed
    run slower than that ends the timing there (one run: too slow to matter)."""
    call()
    samples, start = [], time.perf_counter()
    while len(samples) < max_runs:
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
        if give_up_above is not None and len(samples) == 1 and samples[0] > give_up_above:
            break
        if len(samples) >= min_runs and (stable(samples, spread) or time.perf_counter() - start > budget_s):
            break
    return statistics.median(samples), len(samples)


def run_adaptive(modes, inputs, min_runs: int = 3, max_runs: int = 15, budget_s: float = 20.0, warmup: int = 1,
                 once=(), spread: float = 0.03, progress=None, warm=()) -> dict:
    """As run_interleaved, but each mode runs until its median is stable (moves less than `spread`
    with a new run, after `min_runs`), its time budget is spent, or `max_runs`; rounds stay
    interleaved among the modes still running. Modes named in `once` run one timed episode and no
    warm-up (eager bf16 emulated on a CPU without bf16, about a minute an episode): their entries
    say "runs": 1. Modes named in `warm` have already run this episode in this process (the same
    runner or server): no warm-up either. Every entry records its "runs"."""
    raw = {
        m.name: {"episode": [], "cached": [], "stages": {}, "peak_rss_mb": 0.0, "working_mb": 0.0, "gpu_peak_mb": 0.0,
                 "device": str(m.device), "runtime": m.runtime, "spent": 0.0, "done": False, "seen": 0}
        for m in modes
    }
    cuda = torch.cuda.is_available()
    while not all(entry["done"] for entry in raw.values()):
        for mode in modes:
            entry = raw[mode.name]
            if entry["done"]:
                continue
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with RssSampler() as rss:
                seconds, stages = mode.episode(*inputs)
                cached = mode.cached(*inputs)
            entry["peak_rss_mb"] = max(entry["peak_rss_mb"], rss.peak)
            entry["working_mb"] = max(entry["working_mb"], rss.peak - rss.start)
            if cuda:
                entry["gpu_peak_mb"] = max(entry["gpu_peak_mb"], torch.cuda.max_memory_allocated() / 2**20)
            entry["seen"] += 1
            if entry["seen"] > (0 if mode.name in once or mode.name in warm else warmup):
                entry["spent"] += time.perf_counter() - start
                entry["episode"].append(seconds)
                entry["cached"].append(cached)
                for stage, value in stages.items():
                    entry["stages"].setdefault(stage, []).append(value)
                runs = len(entry["episode"])
                entry["done"] = (mode.name in once or runs >= max_runs
                                 or (runs >= min_runs and (entry["spent"] > budget_s or
                                                           (stable(entry["episode"], spread)
                                                            and stable(entry["cached"], spread)))))
            if progress is not None:
                progress.update()
    return {
        name: {
            "episode": summary(entry["episode"]),
            "cached_support": summary(entry["cached"]),
            "stages": {stage: summary(values) for stage, values in entry["stages"].items()},
            "device": entry["device"],
            "runs": len(entry["episode"]),
            **({"runtime": entry["runtime"]} if entry["runtime"] else {}),
            "peak_rss_mb": round(entry["peak_rss_mb"], 1),  # the whole process, all modes loaded
            "working_mb": round(entry["working_mb"], 1),  # RSS growth during one episode of this mode
            # torch allocator peak during this mode's episode (TensorRT's own engine memory is not in it)
            **({"gpu_peak_mb": round(entry["gpu_peak_mb"], 1)} if cuda else {}),
        }
        for name, entry in raw.items()
    }
