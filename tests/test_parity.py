"""The parity gate itself (fssam.runtime.parity) at its real tolerances: a runner is eager fp32
plus a planted error on one call of one stage; the gate must fail it just over the limit that
call has (2x eager bf16 autocast's error there) and pass it just under."""

import copy

import pytest
import torch

from fssam.model import build
from fssam.runtime.parity import parity_report, sample_episode


class PlantedError:
    """The eager fp32 stages, with `error` added to output 0 of call `call` of stage `name` (every
    call, the end-to-end episode's too, when `call` is None)."""

    def __init__(self, model, name: str, call: int, error: float):
        self.model, self.name, self.call, self.error, self.calls = model, name, call, error, 0

    def __getattr__(self, stage):
        method = getattr(self.model, stage)
        if stage != self.name:
            return method

        def run(*args):
            out = method(*args)
            planted = self.call is None or self.calls == self.call
            self.calls += 1
            if not planted:
                return out
            first = (out[0] if isinstance(out, tuple) else out) + self.error
            return (first, *out[1:]) if isinstance(out, tuple) else first

        return run

    def __call__(self, query, supports, masks):
        from fssam.runtime.contract import run_episode

        return run_episode(self, query, supports, masks)


@pytest.fixture(scope="module")
def tiny():
    model = build("tiny", seed=0)
    return model, sample_episode(model.config, 1, seed=5)


def _memory_failures(report):
    return [f for f in report["failures"] if f.startswith("memory_encoder.output0")]


@pytest.mark.parametrize("call", [0, 1])  # memory_encoder's support call and its query call (both encodings)
def test_gate_fails_an_error_just_over_its_calls_limit_and_passes_one_under(tiny, call):
    model, episode = tiny
    probe = parity_report(model, PlantedError(model, "memory_encoder", call, 1e-9), "bf16", episode,
                          baseline="bf16_autocast")
    stats = probe["stages"]["memory_encoder"]["output0"]
    assert stats["call"] == call and stats["calls"] == 2 and not _memory_failures(probe)
    limit = stats["limit"]  # 2x eager autocast's error on this call's output, + 1e-6
    assert limit == pytest.approx(2 * stats["baseline_max_abs"] + 1e-6)
    over = parity_report(model, PlantedError(model, "memory_encoder", call, 1.05 * limit), "bf16", episode,
                         baseline="bf16_autocast")
    assert not over["passed"] and _memory_failures(over) == [
        f"memory_encoder.output0 (call {call}): max abs {1.05 * limit:.3g} > {limit:.3g}"]
    assert over["stages"]["memory_encoder"]["output0"]["failed_calls"] == 1
    under = parity_report(model, PlantedError(model, "memory_encoder", call, 0.95 * limit), "bf16", episode,
                          baseline="bf16_autocast")
    assert not _memory_failures(under)


def test_fp32_gate_fails_a_logits_error_over_its_limit(tiny, monkeypatch):
    """fp32: each output within 2e-4 x its own max |reference| + 1e-6 (tiny's random-init logits
    reach only about 0.2, so the limit is about 4e-5); the mask IoU check stands on its own."""
    import fssam.runtime.parity as parity

    model, episode = tiny
    exact = parity_report(model, PlantedError(model, "head", None, 0.0), "fp32", episode)
    assert exact["passed"] and exact["end_to_end"]["max_abs"] == 0.0
    end = exact["end_to_end"]
    limit = end["limit"]
    assert limit == pytest.approx(2e-4 * end["reference_max_abs"] + 1e-6) and limit < 1e-4
    under = parity_report(model, PlantedError(model, "head", None, 0.9 * limit), "fp32", episode)
    assert not [f for f in under["failures"] if "logits" in f or f.startswith("head.")], under["failures"]
    over = parity_report(model, PlantedError(model, "head", None, 1.1 * limit), "fp32", episode)
    assert {f.split(":")[0] for f in over["failures"] if "iou" not in f} == {"end_to_end.logits", "head.output0 (call 0)"}
    # logits within a loosened limit, but near-zero pixels flip sign: the mask IoU check fails it
    monkeypatch.setattr(parity, "FP32_RTOL", 1e-1)
    near = parity_report(model, PlantedError(model, "head", None, 9e-4), "fp32", episode)
    assert near["failures"] == [f"end_to_end.mask_iou {near['end_to_end']['mask_iou']:.5f} < 0.99900"]


def test_fp32_gate_fails_a_model_whose_weights_were_rounded_to_fp16(tiny):
    """What "tight" buys: an fp32 export that silently stored fp16-rounded weights (a 4.6e-4
    relative error end to end on tiny) fails the fp32 gate, while the fp32 runtimes' own rounding
    (up to 5.1e-5 relative, measured) passes it."""
    model, episode = tiny
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in rounded.parameters():
            parameter.copy_(parameter.half().float())
    report = parity_report(model, rounded, "fp32", episode)
    end = report["end_to_end"]
    assert not report["passed"] and "end_to_end.logits" in " ".join(report["failures"])
    assert end["max_abs"] > end["limit"] and end["mask_iou"] >= 0.999  # only the tight logits limit catches it


def test_a_missing_output_fails(tiny):
    from fssam.runtime.parity import Baseline, check_stage, stage_samples

    model, episode = tiny

    class Dropping:
        def memory_encoder(self, *args):
            return model.memory_encoder(*args)[0]  # the memory, not the pointer

    records = stage_samples(model, *episode)["memory_encoder"]
    _, failures = check_stage(Dropping(), "memory_encoder", records, Baseline(model, "fp32", "fp32"))
    assert failures and all("1 outputs, expected 2" in f for f in failures)


def test_ieee_fp32_restores_tf32_flags():
    from fssam.runtime.parity import ieee_fp32

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    with ieee_fp32():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_each_call_is_held_to_its_own_limit():
    """Call 0: error 0.015 on outputs up to 100 (fp32 limit 0.02, passes); call 1: error 0.01 on
    outputs up to 1 (limit 2.01e-4, fails). Checking only the call with the largest error would pass."""
    from fssam.runtime.parity import Baseline, check_stage

    big, small = torch.full((4,), 100.0), torch.full((4,), 1.0)
    calls = [((big,), (big,)), ((small,), (small,))]
    errors = {100.0: 0.015, 1.0: 0.01}

    class Offset:
        def stage(self, x):
            return x + errors[float(x[0])]

    outputs, failures = check_stage(Offset(), "stage", calls, Baseline(None, "fp32", "fp32"))
    assert failures == ["stage.output0 (call 1): max abs 0.01 > 0.000201"]
    assert outputs["output0"]["call"] == 1 and outputs["output0"]["failed_calls"] == 1
