"""Every benched mode's output on the bench episode, checked against eager fp32 with the export
gate's end-to-end rule (fssam.runtime.parity.check_end_to_end): a speed figure is reported with
whether the mode computed the right answer on the inputs it was timed on.

The rule follows what the mode computes: fp32 modes (torch.compile, fp32 exports, OpenVINO fp32,
the served fp32 graphs) the fp32 limits; fp16 exports 2x eager fp16's error; bf16 exports and
OpenVINO's bf16 / int8 plans 2x eager bf16 autocast's error, that eager run on the mode's own
device (CPU autocast for CPU runtimes, as their export gated them). The two eager baselines are the
references themselves and are not checked. A failing mode is reported, not hidden: results.json
(`check`), its row in results.md marked, the reason on stderr, and `fssam bench` exits 1 once the
results are written (the gate passed on its own episode; the bench episode is another one).
"""

from __future__ import annotations

import torch

from fssam.runtime.parity import Baseline, check_end_to_end, ieee_fp32


def check_modes(modes, model, inputs) -> dict:
    """{mode name: end-to-end check} for every mode that declares a `baseline` (the rule: its
    runner's, "fp32" for torch.compile; `export_precision` too where it is fp16) and has a `logits`
    method, or an `unchecked` reason ("passed": None). The eager references declare neither."""
    import copy

    query, supports, masks = inputs
    device = next(model.parameters()).device
    with torch.inference_mode(), ieee_fp32():
        reference = model(*(t.to(device) for t in inputs)).float().cpu()
    models = {device.type: model}  # the low-precision run on the mode's device, as its gate ran it
    lows = {}
    checks = {}
    for mode in modes:
        if getattr(mode, "unchecked", None):
            checks[mode.name] = {"passed": None, "reason": mode.unchecked}
            continue
        kind = getattr(mode, "baseline", None)
        if kind is None:
            continue
        precision = getattr(mode, "export_precision", "fp32")  # fp16 exports name theirs (same_dtype)
        where = torch.device(getattr(mode, "device", "cpu")).type
        key = (kind, precision, where)
        if kind != "fp32" and key not in lows:
            if where not in models:
                models[where] = copy.deepcopy(model).to(where)
            lows[key] = Baseline(models[where], precision, kind).episode(*(t.to(where) for t in inputs)).float().cpu()
        low = lows.get(key)
        end, failures = check_end_to_end(mode.logits(query, supports, masks).float().cpu(), reference, low, kind)
        checks[mode.name] = {"baseline": kind, "max_abs": end["max_abs"], "limit": end["limit"],
                             "mask_iou": end["mask_iou"], "min_iou": end["min_iou"], "passed": not failures,
                             "failures": failures}
    return checks


def describe(checks: dict) -> str:
    """'compile passed (max abs 1.2e-07, limit 0.00021; mask IoU 1.0000, at least 0.9990; fp32 rule); ...'"""
    return "; ".join(f"{name} not checked ({c['reason']})" if c["passed"] is None else
                     f"{name} {'passed' if c['passed'] else 'FAILED'} (max abs {c['max_abs']:.2g}, limit "
                     f"{c['limit']:.2g}; mask IoU {c['mask_iou']:.4f}, at least {c['min_iou']:.4f}; "
                     f"{c['baseline'].replace('_', ' ')} rule)" for name, c in checks.items())
