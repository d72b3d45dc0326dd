"""The parity gate: exported stages vs the eager model on the same inputs.

Per stage and end to end: max abs / max rel error per output (and where the max abs occurs),
and the final-mask IoU. Tolerances:
* fp32: logits max abs <= 1e-3 and mask IoU >= 0.999 end to end; each stage output within
  1e-3 x max(1, max |reference|) (outputs differ in scale: features, memories, logits).
* fp16 / bf16: each error against the fp32 eager reference must be at most 2x the error of
  eager PyTorch run in the same dtype on the same inputs (plus 1e-6 for outputs eager
  reproduces exactly), the flash-attention rule; the mask IoU against fp32 must be at least
  the eager low-precision IoU minus 0.01.
"""

from __future__ import annotations

import copy

import torch

from fssam.errors import FSSAMError
from fssam.export.stages import STAGE_ORDER, stage_samples
from fssam.model.episode import binary_masks

FP32_LOGITS_ATOL = 1e-3
FP32_MIN_IOU = 0.999
FP32_STAGE_RTOL = 1e-3
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_FLOOR = 1e-6
LOW_PRECISION_IOU_SLACK = 0.01
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ParityError(FSSAMError):
    """The exported artifacts do not match eager PyTorch within the gate."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def error_stats(got: torch.Tensor, reference: torch.Tensor) -> dict:
    got, reference = got.detach().double(), reference.detach().double()
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
    a, b = logits.float() > 0, reference.float() > 0
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def sample_episode(cfg, shots: int, batch: int = 1, seed: int = 1234):
    """A deterministic synthetic episode at the config's size: noise images, rectangle masks."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.image_size
    query = torch.rand(batch, 3, s, s, generator=g) * 255
    supports = torch.rand(batch, shots, 3, s, s, generator=g) * 255
    masks = torch.zeros(batch, shots, s, s)
    for b in range(batch):
        for k in range(shots):
            top, left = torch.randint(0, s // 2, (2,), generator=g).tolist()
            height, width = torch.randint(s // 8, s // 2, (2,), generator=g).tolist()
            masks[b, k, top : top + height, left : left + width] = 1
    return query, supports, masks


def _cast(args, dtype):
    return tuple(a.to(dtype) if a.is_floating_point() else a for a in args)


def parity_report(model, runner, precision: str = "fp32", episode=None, stages=STAGE_ORDER) -> dict:
    """Compare `runner` (anything with the six stage methods taking torch tensors, returning
    tensors in the runner's dtype) with the fp32 eager `model`. Returns the report with "passed"."""
    dtype = DTYPES[precision]
    cfg = model.config
    query, supports, masks = episode if episode is not None else sample_episode(cfg, shots=1)
    masks = binary_masks(masks)
    records = stage_samples(model, query, supports, masks)
    eager_low = None
    if dtype != torch.float32:
        eager_low = copy.deepcopy(model).to_dtype(dtype)
    report = {"precision": precision, "stages": {}, "end_to_end": {}, "failures": []}
    for name in stages:
        outputs = {}
        for args, expected in records[name]:
            with torch.no_grad():
                got = getattr(runner, name)(*_cast(args, dtype))
                got = got if isinstance(got, tuple) else (got,)
                low = None
                if eager_low is not None:
                    low = getattr(eager_low, name)(*_cast(args, dtype))
                    low = low if isinstance(low, tuple) else (low,)
            for index, (out, ref) in enumerate(zip(got, expected)):
                stats = error_stats(out, ref)
                if low is not None:
                    stats["eager_same_dtype_max_abs"] = error_stats(low[index], ref)["max_abs"]
                key = f"output{index}"
                previous = outputs.get(key)
                if previous is None or stats["max_abs"] > previous["max_abs"]:
                    outputs[key] = stats
        for key, stats in outputs.items():
            if dtype == torch.float32:
                limit = FP32_STAGE_RTOL * max(1.0, stats.get("reference_max_abs", 0.0))
            else:
                limit = LOW_PRECISION_FACTOR * stats["eager_same_dtype_max_abs"] + LOW_PRECISION_FLOOR
            stats["limit"] = limit
            if not stats["max_abs"] <= limit:
                report["failures"].append(f"{name}.{key}: max abs {stats['max_abs']:.3g} > {limit:.3g}")
        report["stages"][name] = outputs
    with torch.no_grad():
        reference = model(query, supports, masks)
        got = runner(*_cast((query, supports, masks), dtype)).float()
    end = error_stats(got, reference)
    end["mask_iou"] = mask_iou(got, reference)
    if dtype == torch.float32:
        end["limit"] = FP32_LOGITS_ATOL
        end["min_iou"] = FP32_MIN_IOU
    else:
        with torch.no_grad():
            low = eager_low(*_cast((query, supports, masks), dtype)).float()
        end["eager_same_dtype_max_abs"] = error_stats(low, reference)["max_abs"]
        end["eager_same_dtype_mask_iou"] = mask_iou(low, reference)
        end["limit"] = LOW_PRECISION_FACTOR * end["eager_same_dtype_max_abs"] + LOW_PRECISION_FLOOR
        end["min_iou"] = end["eager_same_dtype_mask_iou"] - LOW_PRECISION_IOU_SLACK
    if not end["max_abs"] <= end["limit"]:
        report["failures"].append(f"end_to_end.logits: max abs {end['max_abs']:.3g} > {end['limit']:.3g}")
    if not end["mask_iou"] >= end["min_iou"]:
        report["failures"].append(f"end_to_end.mask_iou {end['mask_iou']:.5f} < {end['min_iou']:.5f}")
    report["end_to_end"] = end
    report["passed"] = not report["failures"]
    return report


def format_report(report: dict, specs: dict | None = None) -> str:
    """A Polygraphy-style table: stage, output, max abs, max rel, where, limit."""
    lines = [f"parity vs eager PyTorch fp32 ({report['precision']}):"]
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
