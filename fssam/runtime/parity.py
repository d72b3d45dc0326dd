"""The comparator: any runner vs the eager fp32 model on the same inputs, per stage and end to end.

Per output: max abs / max rel error and where the max abs occurs; end to end also the final-mask
IoU. Tolerances, by baseline:
* "fp32" (fp32 exports, fp32 runtimes): every output, stage outputs and the final logits alike,
  within 2e-4 x its own max |reference| + 1e-6 (outputs differ in scale), and mask IoU >= 0.999
  end to end. Measured on a 2-core AMD EPYC: ONNX Runtime fp32 reaches up to 5.1e-5 of it (the
  small config's DINOv2 stage; every other output of small and tiny stays under 1.1e-5), OpenVINO
  fp32 up to 1.1e-5; the tiny model with its weights rounded to fp16 is off by 4.6e-4 end to end,
  so an export that lost fp32 weights fails (tests/test_parity.py).
* "same_dtype" (fp16 exports): each error against fp32 at most 2x the error of eager PyTorch run
  in fp16 on the same inputs (plus 1e-6 for outputs eager reproduces exactly), the
  flash-attention rule; mask IoU at least eager's minus 0.01.
* "bf16_autocast" (bf16 exports, traced under autocast; a runtime's bf16 or int8 compute of fp32
  graphs): each error at most 2x that of eager PyTorch under bf16 autocast, the official FSSAM
  test's precision (plus 1e-6); mask IoU at least autocast's minus 0.01.
Every call of a stage (a stage runs several times per episode) is held to its own limit; the
report keeps, per output, the call nearest its limit. The eager fp32 reference runs in IEEE
fp32: TF32 is off for its convolutions and matrix products on a GPU.
"""

from __future__ import annotations

import collections
import contextlib
import copy

import torch

from fssam.errors import FSSAMError
from fssam.runtime.contract import GRAPH_ORDER, STAGE_ORDER, binary_masks, run_episode, run_graphs
from fssam.runtime.runner import default_baseline

FP32_RTOL = 2e-4  # of the output's own max |reference|: about 4x the largest fp32 runtime error measured
FP32_ATOL = 1e-6  # for outputs whose reference is (nearly) all zeros
FP32_MIN_IOU = 0.999
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_FLOOR = 1e-6
# the final mask's IoU may fall this far below the baseline's (a random-init tiny episode flips a
# few dozen near-zero pixels either way; see README, parity gate)
IOU_SLACK = {"same_dtype": 0.01, "bf16_autocast": 0.01}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BASELINES = ("fp32", "same_dtype", "bf16_autocast")


class ParityError(FSSAMError):
    """The exported artifacts do not match eager PyTorch within the gate."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def error_stats(got: torch.Tensor, reference: torch.Tensor) -> dict:
    got, reference = got.detach().cpu().double(), reference.detach().cpu().double()
    if got.shape != reference.shape:
        return {"max_abs": float("inf"), "max_rel": float("inf"), "where": None, "shape_mismatch": [list(got.shape), list(reference.shape)]}
    diff = (got - reference).abs()
    if diff.numel() == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "where": None}
    flat = int(diff.argmax())
    where = list(torch.unravel_index(torch.tensor(flat), diff.shape))
    rel = diff / reference.abs().clamp_min(1e-6)
    finite = bool(torch.isfinite(got).all())
    return {
        "max_abs": float(diff.max()) if finite else float("inf"),
        "max_rel": float(rel.max()) if finite else float("inf"),
        "where": [int(i) for i in where],
        "reference_max_abs": float(reference.abs().max()),
    }


def mask_iou(logits: torch.Tensor, reference: torch.Tensor) -> float:
    a, b = logits.float().cpu() > 0, reference.float().cpu() > 0
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def sample_episode(cfg, shots: int, batch: int = 1, seed: int = 1234):
    """A deterministic synthetic episode at the config's size: noise images (whole numbers 0..255,
    so the uint8 graphs see the same pixels), rectangle masks."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.image_size
    query = torch.randint(0, 256, (batch, 3, s, s), generator=g).float()
    supports = torch.randint(0, 256, (batch, shots, 3, s, s), generator=g).float()
    masks = torch.zeros(batch, shots, s, s)
    for b in range(batch):
        for k in range(shots):
            top, left = torch.randint(0, s // 2, (2,), generator=g).tolist()
            height, width = torch.randint(s // 8, s // 2, (2,), generator=g).tolist()
            masks[b, k, top : top + height, left : left + width] = 1
    return query, supports, masks


class RecordingStages:
    """The eager model's stages (or graphs), recording every call's inputs and outputs."""

    def __init__(self, model, units=STAGE_ORDER):
        self.model = model
        self.records: dict[str, list[tuple[tuple, tuple]]] = {name: [] for name in units}

    def __getattr__(self, name):
        if name == "records" or name not in self.records:
            raise AttributeError(name)

        def run(*args):
            out = getattr(self.model, name)(*args)
            self.records[name].append((args, out if isinstance(out, tuple) else (out,)))
            return out

        return run


def is_graphs(units) -> bool:
    """True for the deployable graphs (composed by contract.run_graphs), False for the stages."""
    units = tuple(units)
    if set(units) <= set(GRAPH_ORDER):
        return True
    if set(units) <= set(STAGE_ORDER):
        return False
    raise FSSAMError(f"parity: {', '.join(units)} mixes stages and graphs")


def stage_samples(model, query, supports, masks, units=STAGE_ORDER) -> dict[str, list[tuple[tuple, tuple]]]:
    """Real inputs/outputs of every stage (or graph) call in one eager episode: {name: [(inputs, outputs), ...]}."""
    recorder = RecordingStages(model, units)
    with torch.no_grad():
        (run_graphs if is_graphs(units) else run_episode)(recorder, query, supports, masks)
    return recorder.records


def _cast(args, dtype):
    return tuple(a.to(dtype) if a.is_floating_point() else a for a in args)


def _tuple(out):
    return out if isinstance(out, tuple) else (out,)


@contextlib.contextmanager
def ieee_fp32():
    """fp32 arithmetic without TF32 (PyTorch's cuDNN default uses TF32 for fp32 convolutions on
    Ampere and newer GPUs); a no-op on the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class Baseline:
    """How the reduced-precision reference runs: eager in the export dtype, or fp32 eager under
    bf16 autocast (on the model's device); `None` model for the fp32 baseline (no second run)."""

    def __init__(self, model, precision: str, baseline: str):
        if baseline not in BASELINES:
            raise FSSAMError(f"parity baseline {baseline!r}: expected one of {', '.join(BASELINES)}")
        self.kind = baseline
        self.input_dtype = DTYPES[precision] if baseline == "same_dtype" else torch.float32
        self.model = None
        if baseline == "same_dtype":
            self.model = copy.deepcopy(model).to_dtype(self.input_dtype)
        elif baseline == "bf16_autocast":
            self.model = model

    def context(self):
        if self.kind == "bf16_autocast":
            device = next(self.model.parameters()).device.type
            return torch.autocast(device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def stage(self, name: str, args) -> tuple:
        with torch.no_grad(), self.context():
            return tuple(o.float() for o in _tuple(getattr(self.model, name)(*_cast(args, self.input_dtype))))

    def episode(self, query, supports, masks):
        with torch.no_grad(), self.context():
            return self.model(*_cast((query, supports, masks), self.input_dtype)).float()


class MemoBaseline(Baseline):
    """A Baseline whose stage outputs are computed once per recorded call (`args` by identity),
    however many candidates are checked against them."""

    def __init__(self, *args):
        super().__init__(*args)
        self.memo = {}

    def stage(self, name, args):
        key = (name, id(args))
        if key not in self.memo:
            self.memo[key] = super().stage(name, args)
        return self.memo[key]


def fp32_limit(reference_max_abs: float) -> float:
    """The fp32 baseline's max abs limit for an output whose reference reaches `reference_max_abs`."""
    return FP32_RTOL * reference_max_abs + FP32_ATOL


def limit_ratio(stats: dict) -> float:
    """How close an output's error is to its limit (above 1: over it)."""
    limit = stats["limit"]
    return stats["max_abs"] / limit if limit > 0 else float("inf")


def check_stage(runner, name: str, calls, baseline: Baseline) -> tuple[dict, list[str]]:
    """One stage of `runner` on the recorded eager calls, each call's outputs held to their own
    limits: ({output key: stats of the call nearest its limit, with "calls" and "failed_calls"},
    failures)."""
    per_output, failures = collections.defaultdict(list), []
    for call, (args, expected) in enumerate(calls):
        with torch.no_grad():
            got = _tuple(getattr(runner, name)(*_cast(args, baseline.input_dtype)))
        if len(got) != len(expected):
            failures.append(f"{name} call {call}: {len(got)} outputs, expected {len(expected)}")
            continue
        low = baseline.stage(name, args) if baseline.model is not None else None
        for index, (out, ref) in enumerate(zip(got, expected)):
            stats = {**error_stats(out, ref), "call": call}
            if low is None:
                stats["limit"] = fp32_limit(stats.get("reference_max_abs", 0.0))
            else:
                stats["baseline_max_abs"] = error_stats(low[index], ref)["max_abs"]
                stats["limit"] = LOW_PRECISION_FACTOR * stats["baseline_max_abs"] + LOW_PRECISION_FLOOR
            if not stats["max_abs"] <= stats["limit"]:
                failures.append(f"{name}.output{index} (call {call}): max abs {stats['max_abs']:.3g} > {stats['limit']:.3g}")
            per_output[f"output{index}"].append(stats)
    outputs = {key: {**max(every, key=limit_ratio), "calls": len(every),
                     "failed_calls": sum(not stats["max_abs"] <= stats["limit"] for stats in every)}
               for key, every in per_output.items()}
    return outputs, failures


def check_end_to_end(got: torch.Tensor, reference: torch.Tensor, baseline_logits=None, kind: str = "fp32") -> tuple[dict, list[str]]:
    """Final logits of a runner vs eager fp32 (and the baseline's logits for reduced precision)."""
    end = error_stats(got, reference)
    end["mask_iou"] = mask_iou(got, reference)
    if baseline_logits is None:
        end["limit"], end["min_iou"] = fp32_limit(end.get("reference_max_abs", 0.0)), FP32_MIN_IOU
    else:
        end["baseline_max_abs"] = error_stats(baseline_logits, reference)["max_abs"]
        end["baseline_mask_iou"] = mask_iou(baseline_logits, reference)
        end["limit"] = LOW_PRECISION_FACTOR * end["baseline_max_abs"] + LOW_PRECISION_FLOOR
        end["min_iou"] = end["baseline_mask_iou"] - IOU_SLACK[kind]
    failures = []
    if not end["max_abs"] <= end["limit"]:
        failures.append(f"end_to_end.logits: max abs {end['max_abs']:.3g} > {end['limit']:.3g}")
    if not end["mask_iou"] >= end["min_iou"]:
        failures.append(f"end_to_end.mask_iou {end['mask_iou']:.5f} < {end['min_iou']:.5f}")
    return end, failures


def parity_report(model, runner, precision: str = "fp32", episode=None, stages=STAGE_ORDER,
                  baseline: str | None = None) -> dict:
    """Compare `runner` (the six stage methods, or with `stages=GRAPH_ORDER` the two deployable
    graphs, on torch tensors) with the fp32 eager `model`. Returns the report with "passed".

    Graphs take uint8 pixels: the episode's pixels are rounded to whole numbers first, and the
    eager reference runs on those same pixels."""
    with ieee_fp32():
        return _parity_report(model, runner, precision, episode, stages, baseline)


def _parity_report(model, runner, precision, episode, stages, baseline) -> dict:
    baseline = Baseline(model, precision, baseline or getattr(runner, "baseline", None) or default_baseline(precision))
    query, supports, masks = episode if episode is not None else sample_episode(model.config, shots=1)
    masks = binary_masks(masks)
    graphs = is_graphs(stages)
    if graphs:
        query, supports = query.round().clamp(0, 255), supports.round().clamp(0, 255)
    records = stage_samples(model, query, supports, masks, units=stages)
    report = {"precision": precision, "baseline": baseline.kind, "units": "graphs" if graphs else "stages",
              "stages": {}, "end_to_end": {}, "failures": []}
    for name in stages:
        report["stages"][name], failures = check_stage(runner, name, records[name], baseline)
        report["failures"] += failures
    with torch.no_grad():
        reference = model(query, supports, masks)
        if graphs:
            got = run_graphs(runner, query, supports, masks).float()
        else:
            got = runner(*_cast((query, supports, masks), baseline.input_dtype)).float()
    low = baseline.episode(query, supports, masks) if baseline.model is not None else None
    report["end_to_end"], failures = check_end_to_end(got, reference, low, baseline.kind)
    report["failures"] += failures
    report["passed"] = not report["failures"]
    return report


def format_report(report: dict, specs: dict | None = None) -> str:
    """A Polygraphy-style table: stage, output, max abs, max rel, where, limit."""
    baseline = report.get("baseline", "fp32")
    lines = [f"parity vs eager PyTorch fp32 ({report['precision']}"
             + (f"; limits from eager {baseline.replace('_', ' ')}" if baseline != "fp32" else "") + "):"]
    lines.append(f"  {'stage.output':34s} {'max abs':>10s} {'max rel':>10s} {'limit':>10s}  where")
    for stage, outputs in report["stages"].items():
        for key, stats in outputs.items():
            label = key
            if specs and stage in specs:
                index = int(key.replace("output", ""))
                label = specs[stage]["outputs"][index]["name"]
            lines.append(
                f"  {stage + '.' + label:34s} {stats['max_abs']:10.3g} {stats['max_rel']:10.3g} {stats['limit']:10.3g}  {stats['where']}"
            )
    end = report["end_to_end"]
    lines.append(
        f"  {'end_to_end.logits':34s} {end['max_abs']:10.3g} {end['max_rel']:10.3g} {end['limit']:10.3g}  {end['where']}"
    )
    lines.append(f"  mask IoU {end['mask_iou']:.5f} (min {end['min_iou']:.5f})")
    lines.append("  PASSED" if report["passed"] else "  FAILED: " + "; ".join(report["failures"]))
    return "\n".join(lines)
