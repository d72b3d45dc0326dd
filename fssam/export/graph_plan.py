"""The graph plan of an export: per deployable graph, the fastest (runtime, precision) of this
machine that passes the gate.

Candidates (`candidates()`), each a runtime and precision this CPU can run:
* ONNX Runtime fp32: the exported graph as it is;
* ONNX Runtime int8: `onnxruntime.quantization.quantize_dynamic` of the MatMul/Gemm nodes with
  constant weights (QInt8 weights, activations quantized per call), written to onnxruntime/int8/;
* ONNX Runtime int8-static: `quantize_static` in the QDQ format, the same nodes (per-channel QInt8
  weights, QUInt8 activations with min/max ranges from the calibration episodes), written to
  onnxruntime/int8-static/: where it is faster than dynamic int8, the timing says so (on the
  avx512_vnni EPYC of the results it was not: small support_encoder 1.95-2.07 s vs 1.53 s);
  `fssam deploy` leaves it out (its calibration and quantization cost about 40 s a small graph
  on two cores), `fssam export --plan` tries it;
* OpenVINO fp32 (f32 pinned), and bf16 (its bf16 hint) on a CPU with native bf16;
* OpenVINO int8: NNCF post-training quantization of the graph (model type TRANSFORMER, so
  SmoothQuant runs on the matrix products; OverflowFix on every layer where the CPU has no VNNI,
  against u8 saturation), IR written to openvino/int8/.
The torch AOTInductor CPU package is no candidate yet: the GPU issue that brings its `torch` runtime
is open (the CPU runtime exists, but a small graph's package compiles for minutes on two cores,
measured 1.10x eager on the small support_encoder: far behind OpenVINO bf16 and outside deploy's time).

Gate (the rule of fssam.runtime.parity): fp32 candidates against eager fp32 at the fp32 limit on
the first gate episode (the same arithmetic: one episode decides); bf16 and int8 candidates on
every gate episode (GATE_EPISODES synthetic episodes, seeds seed + 7 ...), each error within 2x
eager bf16 autocast's, all measured against eager fp32, and within SELECTION_MARGIN of that limit
(the margin that kept the OpenVINO bf16 plans passing on fresh episodes). Where the whole int8
graph fails, the quantization falls back inside the graph with the libraries' own mechanisms,
part by part (FALLBACK: ONNX Runtime `nodes_to_exclude`, NNCF `ignored_scope`), before the
candidate is given up.

Each candidate is timed on this machine (adaptive median of the graph's call on the gate
episode's inputs); per graph the fastest that passed is chosen; the two graphs may run on
different runtimes. The chosen pair is then checked end to end on every gate episode (eager
bf16 autocast's limits as soon as either graph is reduced); a failure steps the reduced graph
furthest over its limits down to its next-fastest passing candidate. manifest["graph_plan"]
records every candidate tried (gate figures, fall-backs, time), what was skipped and why, and
the choice.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import time

import torch

from fssam.bench.harness import adaptive_median
from fssam.errors import ConfigError
from fssam.runtime import as_torch, cpu
from fssam.runtime.contract import GRAPH_ORDER, binary_masks, run_graphs, to_uint8
from fssam.export.openvino import SELECTION_MARGIN, file_entry
from fssam.runtime.parity import (Baseline, MemoBaseline, ParityError, check_end_to_end, check_stage, ieee_fp32,
                                  limit_ratio, sample_episode, stage_samples)

GATE_EPISODES = 3  # bf16 / int8 candidates: every error within SELECTION_MARGIN of its limit on each
INT8_FOLDER = "int8"
STATIC = "int8-static"  # ONNX Runtime's static QDQ int8 (a precision label of its own: its own files)
CALIBRATION_EPISODES = 2  # graph inputs NNCF collects its statistics on (synthetic unless --calibration)
CALIBRATION_SEED = 500  # synthetic calibration episodes: seeds far from the gate's
TIME_BUDGET_S = 6.0  # per candidate and graph: enough runs for a stable median, not more
SLOWER_BY = 1.5  # a candidate this many times slower than the fastest timed so far is timed once
# Fall-back inside a graph whose int8 fails: the parts (the exporter's top-level module scopes)
# left quantized, fewer at each level: everything; only the two image backbones (DINOv2, Hiera),
# SAM 2's memory attention (SCMA), mask decoder and memory encoder in float; only DINOv2, most of
# the compute of an episode. (Keeping only the memory attention in float changed nothing on tiny.)
BACKBONES = ("model.dino", "model.sam2.image_encoder")
FALLBACK = (
    ("whole graph", lambda part: True),
    ("int8: image backbones only", lambda part: part in BACKBONES),
    ("int8: DINOv2 only", lambda part: part == "model.dino"),
)
ORDER = (("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("onnxruntime", STATIC), ("openvino", "fp32"),
         ("openvino", "bf16"), ("openvino", "int8"))
BACKENDS = {"onnxruntime": "python-ort", "openvino": "python-openvino"}
RANK = {"fp32": 0, "bf16": 1, "int8": 2, STATIC: 2}


def is_int8(precision: str) -> bool:
    return RANK[precision] == RANK["int8"]


def baseline(precisions) -> str:
    """The gate's reference for graphs at `precisions`: eager fp32 when every one is fp32, else
    eager bf16 autocast (the official precision), whose error bounds bf16 and int8."""
    return "fp32" if all(precision == "fp32" for precision in precisions) else "bf16_autocast"


def label(runtime: str, precision: str) -> str:
    return f"{runtime} {precision}"


def candidates(info: dict | None = None) -> tuple[list[tuple[str, str]], dict]:
    """([(runtime, precision)] this CPU runs, {label: why skipped})."""
    info = info or cpu.cpu_info()
    chosen, skipped = [], {}
    for runtime, precision in ORDER:
        if runtime == "openvino" and precision == "bf16" and not cpu.native_bf16(info):
            skipped[label(runtime, precision)] = f"no native bf16 on this CPU ({cpu.describe(info)})"
            continue
        chosen.append((runtime, precision))
    skipped["torch aoti"] = ("not a candidate until the GPU issue lands: its CPU package compiles for minutes "
                             "(small support_encoder: 70 s at 1.10x eager)")
    return chosen, skipped


def plan_candidates(only=None, leave_out: dict | None = None) -> tuple[list[tuple[str, str]], dict]:
    """candidates() narrowed to the labels in `only` (None: all) and without those of `leave_out`
    ({label: why}, recorded among the skipped): what a plan tries. ConfigError for a label that is
    no candidate."""
    available, skipped = candidates()
    known = {label(*c) for c in ORDER}
    for key, why in (leave_out or {}).items():
        if key not in known:
            raise ConfigError(f"graph plan: cannot leave out {key!r}: not a candidate")
        if key in {label(*c) for c in available}:
            skipped[key] = why
    if only is not None:
        unknown = sorted(set(only) - known)
        if unknown:
            raise ConfigError(f"graph plan: unknown candidate(s) {', '.join(unknown)}: expected some of "
                              f"{', '.join(label(*c) for c in ORDER)}")
    return [c for c in available if label(*c) not in (leave_out or {})
            and (only is None or label(*c) in only)], skipped


def has_vnni(info: dict | None = None) -> bool:
    info = info or cpu.cpu_info()
    return any(flag in info["flags"] for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


# ---------------------------------------------------------------- the parts of a graph

def node_parts(onnx_model) -> dict[str, str]:
    """{node name: its top-level module ("model.dino", "model.sam2.image_encoder", ...; "" outside
    any module)} from the exporter's scope metadata."""
    import ast

    parts = {}
    for node in onnx_model.graph.node:
        part = ""
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes":
                try:
                    scopes = ast.literal_eval(prop.value)
                except (ValueError, SyntaxError):
                    scopes = []
                if len(scopes) > 1 and str(scopes[1]).startswith("model."):
                    part = scopes[1]
        parts[node.name] = part
    return parts


def excluded_nodes(onnx_model, level: int, op_types=None, patch_embedding: bool = False) -> list[str]:
    """The nodes kept in float at fall-back `level` (0: none; only `op_types` where given);
    `patch_embedding`: the backbones' patch-embedding convolutions too, at every level."""
    keep = FALLBACK[level][1]
    parts = node_parts(onnx_model)
    return [node.name for node in onnx_model.graph.node
            if (op_types is None or node.op_type in op_types)
            and (not keep(parts.get(node.name, "")) or (patch_embedding and _patch_embedding(node)))]


def _patch_embedding(node) -> bool:
    return node.op_type == "Conv" and any(prop.key == "pkg.torch.onnx.name_scopes" and "patch_embed" in prop.value
                                          for prop in node.metadata_props)


def fallback_label(level: int) -> str:
    return FALLBACK[level][0]


# ---------------------------------------------------------------- int8 files

ORT_OPS = ("MatMul", "Gemm")


def quantize_onnxruntime(source: str, target: str, level: int = 0) -> dict:
    """ONNX Runtime dynamic int8 of `source` (MatMul/Gemm with constant weights, QInt8) -> `target`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    exclude = excluded_nodes(onnx.load(source, load_external_data=False), level, ORT_OPS)
    root = logging.getLogger()
    saved = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process the model is not for this graph's users
    try:
        quantize_dynamic(source, target, op_types_to_quantize=list(ORT_OPS), weight_type=QuantType.QInt8,
                         nodes_to_exclude=exclude, extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(saved)
    return {"method": "onnxruntime quantize_dynamic (MatMul/Gemm, constant weights, QInt8)",
            "fallback": fallback_label(level), "nodes_in_float": len(exclude)}


def quantize_onnxruntime_static(source: str, target: str, items: list[dict], level: int = 0) -> dict:
    """ONNX Runtime static int8 of `source` in the QDQ format (MatMul/Gemm with constant weights:
    per-channel QInt8 weights, QUInt8 activations, min/max ranges over `items`, the graph inputs of
    the calibration episodes) -> `target`."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Items(CalibrationDataReader):
        def __init__(self):
            self.rest = iter(items)

        def get_next(self):
            return next(self.rest, None)

    exclude = excluded_nodes(onnx.load(source, load_external_data=False), level, ORT_OPS)
    root = logging.getLogger()
    saved = root.level
    root.setLevel(logging.ERROR)  # as quantize_onnxruntime
    try:
        quantize_static(source, target, Items(), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(ORT_OPS),
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude,
                        extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(saved)
    return {"method": "onnxruntime quantize_static, QDQ (MatMul/Gemm, constant weights; per-channel QInt8 weights, "
                      "QUInt8 activations, min/max ranges)", "calibration_items": len(items),
            "fallback": fallback_label(level), "nodes_in_float": len(exclude)}


def quantize_openvino(source: str, target: str, items: list[dict], level: int = 0, vnni: bool = True,
                      bias_correction: bool = True) -> dict:
    """NNCF int8 of the ONNX graph `source` calibrated on `items` (graph inputs), IR at `target`
    (.xml). `bias_correction`: NNCF's fast bias correction (a sub-model compiled and run per
    quantized layer: about 13 s of a small graph's minute on two cores; `fssam deploy` leaves it
    out to fit its time, the gate decides either way)."""
    import nncf
    import onnx
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    nncf.set_log_level(logging.ERROR)  # its progress bars and notes would bury ours
    model = ov.Core().read_model(source)
    names = set(excluded_nodes(onnx.load(source, load_external_data=False), level, patch_embedding=True))
    # OpenVINO names an operator after its ONNX node (a node split in several: "<node>/<part>")
    friendly = [op.get_friendly_name() for op in model.get_ordered_ops()
                if op.get_friendly_name() in names or op.get_friendly_name().split("/")[0] in names]
    ignored = nncf.IgnoredScope(names=friendly, validate=False) if friendly else None
    sink = io.StringIO()  # NNCF draws progress bars of its own on the terminal: ours says what runs
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        quantized = nncf.quantize(
            model, nncf.Dataset(items), subset_size=len(items), model_type=nncf.ModelType.TRANSFORMER,
            ignored_scope=ignored,
            advanced_parameters=AdvancedQuantizationParameters(
                overflow_fix=OverflowFix.FIRST_LAYER if vnni else OverflowFix.ENABLE,
                activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX,
                disable_bias_correction=not bias_correction),
        )
    ov.save_model(quantized, target, compress_to_fp16=False)
    return {"method": "NNCF post-training int8 (TRANSFORMER: SmoothQuant; min/max activation ranges; patch "
                      "embeddings in float)",
            "overflow_fix": "first layer" if vnni else "every layer (no VNNI)", "calibration_items": len(items),
            "bias_correction": "fast" if bias_correction else "none",
            "fallback": fallback_label(level), "operators_in_float": len(friendly)}


AHEAD_WORKERS = 2  # int8 quantizations at a time before the plan's timing (Planner.quantize_ahead)
AHEAD_MIN_BYTES = 64 << 20  # graphs smaller than this are quantized one by one, as they come


def make_int8(folder: str, source: str, runtime: str, precision: str, name: str, level: int, items, vnni: bool,
              bias_correction: bool) -> tuple[str, dict]:
    """One int8 file of graph `name` (its fp32 ONNX `source`, relative to `folder`) at fall-back
    `level`: (file relative to `folder`, what made it). `items`: the graph's calibration inputs
    (NNCF and static QDQ; None for dynamic). A plain function: worker processes run it too."""
    os.makedirs(os.path.join(folder, runtime, precision), exist_ok=True)
    source = os.path.join(folder, source)
    if precision == STATIC:
        relative = os.path.join(runtime, precision, f"{name}.onnx")
        info = quantize_onnxruntime_static(source, os.path.join(folder, relative), items, level)
    elif runtime == "onnxruntime":
        relative = os.path.join(runtime, INT8_FOLDER, f"{name}.onnx")
        info = quantize_onnxruntime(source, os.path.join(folder, relative), level)
    else:
        relative = os.path.join(runtime, INT8_FOLDER, f"{name}.xml")
        info = quantize_openvino(source, os.path.join(folder, relative), items, level, vnni, bias_correction)
    return relative, info


# ---------------------------------------------------------------- episodes and calibration data

def gate_episodes(cfg, shots: int, seed: int) -> list[tuple]:
    """The synthetic gate episodes, pixels whole numbers as the uint8 graphs see them."""
    out = []
    for index in range(GATE_EPISODES):
        query, supports, masks = sample_episode(cfg, shots, batch=1, seed=seed + 7 + index)
        out.append((query.round(), supports.round(), binary_masks(masks)))
    return out


def calibration_items(episodes, support_runner) -> dict[str, list[dict]]:
    """{graph: [{input name: numpy array}]} from calibration episodes; the query graph's support
    tensors come from `support_runner` (the fp32 graph), as a server would compute them."""
    items = {name: [] for name in GRAPH_ORDER}
    for query, supports, masks in episodes:
        images, binary = to_uint8(supports).numpy(), to_uint8(binary_masks(masks)).numpy()
        items["support_encoder"].append({"support_images": images, "support_masks": binary})
        features, memory, pointers = support_runner.support_encoder(images, binary)
        items["query_segmenter"].append({"query": to_uint8(query).numpy(), "support_features": features,
                                         "support_memory": memory, "support_pointers": pointers,
                                         "support_masks": binary})
    return items


def _calibration_episodes(cfg, shots: int, seed: int, calibration: str | None) -> tuple[list, dict]:
    if calibration is None:
        episodes = [sample_episode(cfg, shots, batch=1, seed=seed + CALIBRATION_SEED + i)
                    for i in range(CALIBRATION_EPISODES)]
        return episodes, {"source": "synthetic", "episodes": len(episodes),
                          "seeds": [seed + CALIBRATION_SEED + i for i in range(CALIBRATION_EPISODES)]}
    from fssam.export import calibration as calib

    pairs = calib.read_set(calibration, cfg.image_size, shots)
    episodes, held_out = calib.episodes(pairs, shots)
    return episodes + [held_out], {**calib.describe(calibration, "user"), "episodes": len(episodes) + 1}


# ---------------------------------------------------------------- timing

# ---------------------------------------------------------------- the plan

class GraphPair:
    """The two graphs on (possibly) two runners: `support_encoder` of one, `query_segmenter` of the
    other, torch in and out (the plan composed)."""

    def __init__(self, runners: dict):
        self.runners = runners

    def support_encoder(self, *args):
        return self.runners["support_encoder"].support_encoder(*args)

    def query_segmenter(self, *args):
        return self.runners["query_segmenter"].query_segmenter(*args)


def open_candidate(folder: str, runtime: str, precision: str, files: dict, threads=None):
    """A torch-facing runner of both graphs at one candidate, from `files` ({graph: relative file})."""
    if runtime == "onnxruntime":
        from fssam.runtime.runners.onnxruntime import OnnxRuntimeRunner

        runner = OnnxRuntimeRunner(folder, "fp32", threads=threads, verify=False, files=files)
    else:
        from fssam.runtime.runners.openvino import OpenVINORunner

        stages = {name: {"precision": precision, "file": file} for name, file in files.items()}
        runner = OpenVINORunner(folder, precision="fp32" if is_int8(precision) else precision, threads=threads,
                                verify=False, stages=stages, cache=False)
    return as_torch(runner)


def open_plan(artifacts: str, manifest: dict, threads=None) -> GraphPair:
    """The plan's chosen graphs in process (each on its runtime and precision), torch in and out."""
    if "graph_plan" not in manifest:
        raise ConfigError(f"{artifacts!r} has no graph plan: export it with `fssam export --plan` (or `fssam deploy`)")
    return GraphPair({name: open_candidate(artifacts, entry["runtime"], entry["precision"], {name: entry["file"]},
                                           threads)
                      for name, entry in manifest["graph_plan"]["chosen"].items()})


class Planner:
    def __init__(self, folder, manifest, model, seed, threads, calibration, progress, margin=SELECTION_MARGIN,
                 budget_s: float | None = None, bias_correction: bool = True, prune: bool = True):
        self.margin, self.bias_correction = margin, bias_correction
        self.prune = prune  # a failing gate stops at its first failing episode
        self.deadline = time.perf_counter() + budget_s if budget_s else None
        self.folder, self.manifest, self.model, self.threads, self.progress = folder, manifest, model, threads, progress
        shots = manifest["shots"]
        self.info = cpu.cpu_info()
        self.vnni = has_vnni(self.info)
        self.episodes = gate_episodes(model.config, shots, seed)
        self.records = []  # per episode: {graph: [(args, outputs)]}
        with ieee_fp32():
            for episode in self.episodes:
                self.records.append(stage_samples(model, *episode, units=GRAPH_ORDER))
        self.fp32 = Baseline(model, "fp32", "fp32")
        self.low = MemoBaseline(model, "fp32", "bf16_autocast")
        self.low_logits = {}
        self.calibration, self.calibration_source = calibration, None
        self.seed = seed
        self._items = None
        self.ahead = {}  # (runtime, precision, graph): (file, info) of level 0, quantized before the timing

    def note(self, text: str) -> None:
        if self.progress is not None:
            self.progress.set_postfix_str(text)

    def items(self) -> dict:
        if self._items is None:
            episodes, self.calibration_source = _calibration_episodes(self.model.config, self.manifest["shots"],
                                                                      self.seed, self.calibration)
            fp32 = open_candidate(self.folder, "onnxruntime", "fp32",
                                  {"support_encoder": self.manifest["graphs"]["support_encoder"]["file"]}).runner
            self._items = calibration_items(episodes, fp32)
        return self._items

    def gate(self, runner, name: str, precision: str) -> dict:
        """One graph of one candidate against its records: {"passed", "within_limits", "worst", ...}."""
        episodes = self.records[:1] if precision == "fp32" else self.records
        baseline = self.fp32 if precision == "fp32" else self.low
        failures, worst, outputs, gated = [], 0.0, {}, 0
        with ieee_fp32():
            for index, records in enumerate(episodes):
                got, failed = check_stage(runner, name, records[name], baseline)
                gated += 1
                failures += [f"gate episode {index}: {f}" for f in failed]
                for key, stats in got.items():
                    ratio = limit_ratio(stats)
                    if ratio >= worst:
                        worst, outputs[key] = ratio, {k: stats[k] for k in ("max_abs", "limit", "max_rel") if k in stats}
                if self.prune and (failures or (precision != "fp32" and worst > self.margin)):
                    break  # decided: the remaining episodes cannot make it pass
        eligible = precision == "fp32" or worst <= self.margin
        return {"passed": not failures and eligible, "within_limits": not failures, "worst": round(worst, 4),
                "episodes": gated, "outputs": outputs, "failures": failures[:4]}

    def time(self, runner, name: str, give_up_above_ms: float | None = None) -> tuple[float, int]:
        args = self.records[0][name][0][0]
        limit = give_up_above_ms / 1000 if give_up_above_ms else None
        with torch.inference_mode():
            seconds, runs = adaptive_median(lambda: getattr(runner, name)(*args), TIME_BUDGET_S, give_up_above=limit)
        return 1000 * seconds, runs

    def int8_args(self, runtime: str, precision: str, name: str, level: int) -> tuple:
        """make_int8's arguments for one int8 file (calibration items only where the method takes them)."""
        items = self.items()[name] if runtime == "openvino" or precision == STATIC else None
        return (self.folder, self.manifest["graphs"][name]["file"], runtime, precision, name, level, items, self.vnni,
                self.bias_correction)

    def int8_file(self, runtime: str, name: str, level: int, precision: str = "int8") -> tuple[str, dict]:
        if level == 0 and (runtime, precision, name) in self.ahead:
            return self.ahead.pop((runtime, precision, name))
        return make_int8(*self.int8_args(runtime, precision, name, level))

    def quantize_ahead(self, int8: list) -> None:
        """The first quantization (level 0) of every int8 candidate of both graphs, made before the
        timing starts, AHEAD_WORKERS at a time in worker processes: each is mostly single-threaded
        Python (NNCF: about 1.2 cores busy on average), and nothing else runs meanwhile, so no
        timing is disturbed. Only for graphs of at least AHEAD_MIN_BYTES (below, a worker's start
        costs more than it saves). Where workers cannot start, they are quantized here as they come."""
        import concurrent.futures
        import concurrent.futures.process
        import multiprocessing

        jobs = [(runtime, precision, name) for runtime, precision in int8 for name in GRAPH_ORDER]
        sizes = [os.path.getsize(os.path.join(self.folder, self.manifest["graphs"][name]["file"])) for name in GRAPH_ORDER]
        if len(jobs) < 2 or min(sizes) < AHEAD_MIN_BYTES:
            return
        self.note(f"quantizing {len(jobs)} int8 candidates, {AHEAD_WORKERS} at a time")
        pool = concurrent.futures.ProcessPoolExecutor(min(AHEAD_WORKERS, len(jobs)),
                                                      mp_context=multiprocessing.get_context("spawn"))
        try:
            # NNCF first: the longest
            pending = {job: pool.submit(make_int8, *self.int8_args(*job, 0)) for job in jobs}
            for job, future in pending.items():
                self.ahead[job] = future.result()
        except concurrent.futures.process.BrokenProcessPool:
            pass  # workers cannot start here (e.g. a `python -` main): the rest is quantized in this process
        finally:
            processes = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:  # an error or an interrupt: no worker outlives the plan
                if process.is_alive():
                    process.terminate()
                process.join()

    def prepare(self, runtime: str, precision: str, name: str, level: int | None = None,
                attempts: list | None = None, fastest_ms: float | None = None) -> dict:
        """One graph at one candidate, timed, not yet gated (int8: quantized at fall-back `level`).
        `fastest_ms`: the fastest candidate of this graph timed so far; one SLOWER_BY times slower
        than that is timed once."""
        self.note(f"{name}: {label(runtime, precision)}" + (f" ({fallback_label(level)})" if level else ""))
        if level is None:
            relative = self.manifest["graphs"][name]["file"]
            entry = {"file": relative}
        else:
            relative, info = self.int8_file(runtime, name, level, precision)
            entry = {**file_entry(self.folder, relative), **info, "level": level, "attempts": attempts or []}
        runner = open_candidate(self.folder, runtime, precision, {name: relative}, self.threads)
        ms, runs = self.time(runner, name, SLOWER_BY * fastest_ms if fastest_ms else None)
        del runner  # opened again if it is gated: one compiled model at a time
        gc.collect()
        return {"runtime": runtime, "precision": precision, **entry, "ms": round(ms, 2), "timed_runs": runs,
                "gated": False, "passed": False, "within_limits": None, "worst": None, "failures": []}

    def check(self, name: str, entry: dict) -> dict:
        """Gate a prepared candidate; a failing int8 is prepared again at its next fall-back level
        (returned ungated), the attempt recorded."""
        self.note(f"{name}: {label(entry['runtime'], entry['precision'])} gate")
        runner = open_candidate(self.folder, entry["runtime"], entry["precision"], {name: entry["file"]}, self.threads)
        entry.update(gated=True, **self.gate(runner, name, entry["precision"]))
        if entry["passed"]:
            entry["runner"] = runner  # may be chosen: kept
        del runner
        gc.collect()
        if is_int8(entry["precision"]):
            entry["attempts"].append({key: entry[key] for key in ("fallback", "ms", "passed", "within_limits", "worst")})
            if not entry["passed"] and entry["level"] + 1 < len(FALLBACK):
                if self.deadline is not None and time.perf_counter() > self.deadline:
                    entry["note"] = (f"fall-back to {fallback_label(entry['level'] + 1)} not tried: the plan's time "
                                     "budget was spent")
                    return entry
                return self.prepare(entry["runtime"], entry["precision"], name, entry["level"] + 1, entry["attempts"])
        return entry

    def gate_fastest(self, name: str, entries: dict, prune: bool, rank: int | None = None) -> None:
        """Gate the candidates of one graph in order of their time until one passes (all of them
        without `prune`); with `rank`, only those of a precision above it (a step up)."""
        while True:
            open_ = [k for k, e in entries.items() if not e["gated"] and (rank is None or RANK[e["precision"]] < rank)]
            done = any(e["passed"] for e in entries.values() if rank is None or RANK[e["precision"]] < rank)
            if not open_ or (prune and done):
                break
            key = min(open_, key=lambda k: entries[k]["ms"])
            entries[key] = self.check(name, entries[key])
        best = choose(entries)
        for key, entry in entries.items():
            if not entry["gated"] and best is not None:
                entry["note"] = (f"not gated: {entry['ms']:.1f} ms, no faster than {best} "
                                 f"({entries[best]['ms']:.1f} ms), which passed")

    def compose(self, chosen: dict) -> tuple[dict, list[str], str]:
        """The chosen pair end to end on every gate episode: (worst end-to-end stats, failures, baseline)."""
        kind = baseline(entry["precision"] for entry in chosen.values())
        reduced = kind != "fp32"
        pair = GraphPair({name: entry["runner"] for name, entry in chosen.items()})
        ends, failures = [], []
        with ieee_fp32(), torch.no_grad():
            for index, episode in enumerate(self.episodes if reduced else self.episodes[:1]):
                reference = self.records[index]["query_segmenter"][0][1][0]  # eager fp32 logits
                if reduced and index not in self.low_logits:
                    self.low_logits[index] = self.low.episode(*episode)
                low = self.low_logits.get(index) if reduced else None
                got = run_graphs(pair, *episode).float()
                end, failed = check_end_to_end(got, reference, low, kind)
                ends.append({**end, "episode": index})
                failures += [f"gate episode {index}: {f}" for f in failed]
        worst = max(ends, key=lambda end: max(limit_ratio(end), end["min_iou"] / max(end["mask_iou"], 1e-12)))
        return {**worst, "episodes": len(ends)}, failures, kind


def _public(entry: dict) -> dict:
    return {key: value for key, value in entry.items() if key not in ("runner", "level")}


def choose(tried: dict) -> str | None:
    """The label of the fastest candidate that passed (ties: the earlier one), None if none passed."""
    passed = [(entry["ms"], index, name) for index, (name, entry) in enumerate(tried.items()) if entry["passed"]]
    return min(passed)[2] if passed else None


def step_down(chosen: dict, tried: dict) -> tuple[str, str | None] | None:
    """After an end-to-end failure of the `chosen` pair ({graph: label}): (the reduced graph
    furthest over its limits, its fastest passing candidate of a higher precision, or None when
    there is none), or None when no graph is reduced."""
    reduced = [n for n, key in chosen.items() if tried[n][key]["precision"] != "fp32"]
    if not reduced:
        return None
    worst = max(reduced, key=lambda n: tried[n][chosen[n]]["worst"])
    rank = RANK[tried[worst][chosen[worst]]["precision"]]
    return worst, choose({k: v for k, v in tried[worst].items() if v["passed"] and RANK[v["precision"]] < rank})


def plan_graphs(folder: str, manifest: dict, model, seed: int = 0, threads=None, calibration: str | None = None,
                only=None, progress=None, margin: float = SELECTION_MARGIN, prune: bool = True,
                budget_s: float | None = None, bias_correction: bool = True, leave_out: dict | None = None) -> dict:
    """manifest["graph_plan"] (files of int8 candidates written under `folder`). `only`: a subset
    of candidate labels (default: every candidate of this CPU); `margin`: the fraction of its limits
    a reduced-precision candidate may reach; `prune`: a candidate no faster than one that passed is
    not gated, and a failing gate stops at its first failing episode (False: every candidate is
    gated on every episode, for tests and reports); `budget_s`: past this many
    seconds no further int8 fall-back is quantized (each is a new NNCF / ONNX Runtime quantization;
    the entry says so), what `fssam deploy` uses to bound its time, as `bias_correction=False`
    (NNCF int8 without its fast bias correction; each entry records which); `leave_out`: {candidate
    label: why} not tried, recorded with the reason among the skipped."""
    available, skipped = plan_candidates(only, leave_out)
    begin = time.perf_counter()
    planner = Planner(folder, manifest, model, seed, threads, calibration, progress, margin, budget_s, bias_correction,
                      prune)
    tried = {name: {} for name in GRAPH_ORDER}
    planner.quantize_ahead(sorted((c for c in available if is_int8(c[1])), key=lambda c: c[0] != "openvino"))
    # every candidate timed first (the gate then goes fastest first), the lowest precisions first:
    # usually the fastest, so the float candidates that are far slower are timed once
    for runtime, precision in sorted(available, key=lambda c: -RANK[c[1]]):
        for name in GRAPH_ORDER:
            fastest = min((e["ms"] for e in tried[name].values()), default=None) if prune else None
            tried[name][label(runtime, precision)] = planner.prepare(runtime, precision, name,
                                                                     0 if is_int8(precision) else None,
                                                                     fastest_ms=fastest)
        if progress is not None:
            progress.update()
    tried = {name: {label(*c): entries[label(*c)] for c in available} for name, entries in tried.items()}
    for name in GRAPH_ORDER:
        planner.gate_fastest(name, tried[name], prune)
    chosen = {}
    for name in GRAPH_ORDER:
        pick = choose(tried[name])
        if pick is None:
            raise ParityError(f"graph plan: no candidate of {name} passed its gate: "
                              + "; ".join(f"{k}: {', '.join(v['failures'][:2]) or 'outside the margin'}"
                                          for k, v in tried[name].items()), {"passed": False})
        chosen[name] = tried[name][pick]
    steps = []
    while True:
        end, failures, kind = planner.compose(chosen)
        if not failures:
            break
        step = step_down({n: label(e["runtime"], e["precision"]) for n, e in chosen.items()}, tried)
        if step is None:
            break
        worst, pick = step
        if pick is None and prune:  # the float candidates were not gated (slower): gate them now
            planner.gate_fastest(worst, tried[worst], prune, RANK[chosen[worst]["precision"]])
            worst, pick = step_down({n: label(e["runtime"], e["precision"]) for n, e in chosen.items()}, tried)
        steps.append(f"{worst}: {label(chosen[worst]['runtime'], chosen[worst]['precision'])} -> {pick} "
                     f"(end to end failed: {'; '.join(failures[:2])})")
        if pick is None:
            break
        chosen[worst] = tried[worst][pick]
    if failures:
        raise ParityError("graph plan: the chosen graphs fail end to end: " + "; ".join(failures), {"passed": False})
    result = {
        "cpu": {"model": planner.info["model"], "flags": planner.info["reported"], "vnni": planner.vnni},
        "rule": {"fp32": "eager fp32 limit on the first gate episode",
                 "reduced": f"2x eager bf16 autocast's error on {GATE_EPISODES} episodes, within {margin} "
                            "of the limit"},
        "gate_seeds": [seed + 7 + i for i in range(GATE_EPISODES)],
        "skipped": skipped,
        "candidates": {name: {k: _public(v) for k, v in entries.items()} for name, entries in tried.items()},
        "chosen": {name: {"runtime": entry["runtime"], "precision": entry["precision"], "file": entry["file"],
                          "backend": BACKENDS[entry["runtime"]], "ms": entry["ms"]}
                   for name, entry in chosen.items()},
        "end_to_end": {**end, "baseline": kind, "passed": True},
        "stepped_down": steps,
        "wall_s": round(time.perf_counter() - begin, 1),
    }
    if planner.calibration_source is not None:
        result["calibration"] = planner.calibration_source
    _drop_unused(folder, result)
    result["int8_files"] = {f"{entry['runtime']}/{name}": {k: entry[k] for k in ("file", "sha256", "weights") if k in entry}
                            for name, entries in result["candidates"].items() for entry in entries.values()
                            if entry["precision"] == "int8" and entry["passed"]}
    return result


def _drop_unused(folder: str, result: dict) -> None:
    """int8 files of candidates that failed their gate are removed (nothing can run them)."""
    for entries in result["candidates"].values():
        for entry in entries.values():
            if is_int8(entry["precision"]) and not entry["passed"] and "file" in entry:
                for relative in (entry["file"], entry.get("weights", {}).get("file")):
                    if relative and os.path.exists(os.path.join(folder, relative)):
                        os.remove(os.path.join(folder, relative))
                entry.pop("sha256", None)
                entry.pop("weights", None)
                entry["file"] = None


def describe(plan: dict) -> list[str]:
    """Lines for the terminal: every candidate's gate and time, and the choice."""
    lines = []
    for name, entries in plan["candidates"].items():
        lines.append(f"  {name}:")
        chosen = plan["chosen"][name]
        for key, entry in entries.items():
            if not entry.get("gated", True):
                gate = "not gated"
            else:
                gate = "passed" if entry["passed"] else ("outside margin" if entry["within_limits"] else "FAILED")
            worst = f"worst {entry['worst']:.2f} of limit" if entry["worst"] is not None else "slower: not gated"
            extra = ""
            if is_int8(entry["precision"]):
                failed = [a["fallback"] for a in entry.get("attempts", []) if not a["passed"]]
                extra = f" ({entry['fallback']}" + (f"; failed its gate at: {', '.join(failed)}" if failed else "") + ")"
            mark = " <- chosen" if (chosen["runtime"], chosen["precision"]) == (entry["runtime"], entry["precision"]) else ""
            lines.append(f"    {key:23s} {gate:15s} {worst:24s} {entry['ms']:9.1f} ms{extra}{mark}")
    for key, why in plan["skipped"].items():
        lines.append(f"  skipped {key}: {why}")
    return lines


__all__ = ["plan_graphs", "open_plan", "candidates", "plan_candidates", "describe", "GraphPair", "choose"]
