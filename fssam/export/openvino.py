"""OpenVINO plans of an export: per stage the fastest precision that passes the gate.

`fssam export --openvino fp32,bf16,int8` adds, for each precision P, manifest["openvino"][P]:
{"stages": {stage: {"precision", "inference_precision", "file", "sha256", "tried", "gate", "ms"}},
"parity": report}. The ladder per stage:
* fp32: fp32 (the fp32 gate);
* bf16: bf16, else fp32;
* int8: NNCF int8 IR, bf16 where the CPU has native bf16, fp32.
Reduced precision is tried only for the stages with heavy compute (QUANTIZED_STAGES); `prior` and
`refine` (reductions and element-wise work: OpenVINO bf16 gained nothing on them in the small
benchmark) always run fp32: `prior`'s min-max normalisation amplifies bf16 rounding, and OpenVINO
bf16 there passed the gate episode but exceeded 2x autocast's error on fresh tiny episodes.
Each candidate is checked against eager fp32 on the real stage inputs of GATE_EPISODES synthetic
episodes (the export's gate episode and the next seeds; int8: the calibration set's held-out
episode), every call against its own limits from eager bf16 autocast (fssam.runtime.parity,
baseline "bf16_autocast"), and a reduced-precision rung passes only with every error within
SELECTION_MARGIN of its limit. One episode at the full limit was not enough: tiny's bf16 plan
gated so failed 14 of 40 fresh episodes (object pointer and head up to 1.85x over the limit). The
first rung that passes is chosen, except that int8 is taken only where it pays (faster, measured
here, than the fastest float rung that passes), and int8's float fall-back is the faster of bf16
and fp32. If a composed episode then fails the end-to-end check, the stage furthest over its
limits steps down one rung, until every episode passes; a pipeline that fails with every stage at
fp32 fails the export with the report. The deployable graphs run whole at one precision: bf16
only where every gate episode passes within the margin.

int8 calibrates on real stage inputs recorded from eager episodes of the calibration set
(`--calibration DIR`, or a synthetic set written to <export>/calibration/ and said so), with
min/max activation ranges; the image backbones keep their patch-embedding convolution in float.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from fssam.errors import ConfigError
from fssam.export import calibration as calib
from fssam.runtime import as_torch, cpu
from fssam.runtime.contract import GRAPH_ORDER, STAGE_ORDER
from fssam.runtime.manifest import file_sha256
from fssam.runtime.parity import (
    Baseline,
    MemoBaseline,
    ParityError,
    check_end_to_end,
    check_stage,
    format_report,
    limit_ratio,
    parity_report,
    sample_episode,
    stage_samples,
)
from fssam.runtime.runners.openvino import HINTS, OpenVINORunner, require_native_bf16

PRECISIONS = ("fp32", "bf16", "int8")
QUANTIZED_STAGES = ("prior_backbone", "image_encoder", "memory_encoder", "head")  # heavy compute: bf16/int8 candidates
PATCH_EMBED_STAGES = ("prior_backbone", "image_encoder")  # first convolution = patch embedding, kept in float
IR_FOLDER = "openvino"
GATE_EPISODES = 3  # synthetic episodes (seeds seed + 7, + 8, + 9) every fp32 / bf16 plan and graph must pass
# A reduced-precision rung (bf16, int8) is chosen only with every error within this fraction of its limit on
# every gate episode: a generalisation margin. Where OpenVINO bf16 is about as accurate as autocast the ratio
# is about 0.5 (every stage of the small config, 0.50-0.59); above 0.75 it is 1.5x autocast's error or
# more, and tiny's memory encoder (0.76 on its gate episodes) then failed the limit on 5 of 40 fresh ones.
SELECTION_MARGIN = 0.75


def parse_precisions(text) -> tuple[str, ...]:
    items = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    unknown = [p for p in items if p not in PRECISIONS]
    if unknown:
        raise ConfigError(f"--openvino {', '.join(unknown)}: expected a comma list of {', '.join(PRECISIONS)}")
    if "bf16" in items:
        require_native_bf16()  # fail before the long work
    return tuple(p for p in PRECISIONS if p in items)


def _ladder(stage: str, precision: str, bf16: bool) -> list[str]:
    if precision == "fp32" or (stage in STAGE_ORDER and stage not in QUANTIZED_STAGES):
        return ["fp32"]
    if precision == "bf16":
        return ["bf16", "fp32"]
    return (["int8"] if stage in QUANTIZED_STAGES else []) + (["bf16"] if bf16 else []) + ["fp32"]


# ---------------------------------------------------------------- int8

def _feeds(model, episodes, specs) -> dict[str, list[dict]]:
    """Every stage call of eager fp32 episodes as {input name: float32 array}: the calibration data."""
    feeds = {name: [] for name in QUANTIZED_STAGES}
    for episode in episodes:
        records = stage_samples(model, *episode)
        for name in QUANTIZED_STAGES:
            names = [entry["name"] for entry in specs[name]["inputs"]]
            for args, _ in records[name]:
                feeds[name].append({n: a.detach().float().numpy() for n, a in zip(names, args)})
    return feeds


def _first_convolution(ov_model) -> list[str]:
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() == "Convolution":
            return [op.get_friendly_name()]
    return []


def quantize_stage(onnx_path: str, xml_path: str, items: list[dict], keep_patch_embedding: bool) -> None:
    """NNCF post-training int8 of one stage's ONNX, saved as IR (xml + bin)."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    model = ov.Core().read_model(onnx_path)
    ignored = nncf.IgnoredScope(names=_first_convolution(model)) if keep_patch_embedding else None
    quantized = nncf.quantize(
        model,
        nncf.Dataset(items),
        subset_size=len(items),
        model_type=nncf.ModelType.TRANSFORMER,
        ignored_scope=ignored,
        advanced_parameters=AdvancedQuantizationParameters(
            activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX
        ),
    )
    ov.save_model(quantized, xml_path, compress_to_fp16=False)


def _quantize(folder: str, manifest: dict, model, pairs, progress) -> tuple[dict, tuple]:
    """int8 IR of QUANTIZED_STAGES under openvino/int8/; returns ({stage: entry}, gate episode)."""
    shots = manifest["shots"]
    episodes, held_out = calib.episodes(pairs, shots)
    feeds = _feeds(model, episodes, manifest["stages"])
    os.makedirs(os.path.join(folder, IR_FOLDER, "int8"), exist_ok=True)
    entries = {}
    for name in QUANTIZED_STAGES:
        if progress is not None:
            progress.set_postfix_str(f"{name} -> int8 (NNCF)")
        xml = os.path.join(IR_FOLDER, "int8", f"{name}.xml")
        quantize_stage(os.path.join(folder, manifest["stages"][name]["file"]), os.path.join(folder, xml), feeds[name],
                       keep_patch_embedding=name in PATCH_EMBED_STAGES)
        entries[name] = file_entry(folder, xml)
    return entries, held_out


def file_entry(folder: str, relative: str) -> dict:
    entry = {"file": relative, "sha256": file_sha256(os.path.join(folder, relative))}
    if relative.endswith(".xml"):
        weights = relative[: -len(".xml")] + ".bin"
        entry["weights"] = {"file": weights, "sha256": file_sha256(os.path.join(folder, weights))}
    return entry


# ---------------------------------------------------------------- the ladder

class _Candidates:
    """Compiled runners per candidate precision, each only for the stages that need it."""

    def __init__(self, folder: str, manifest: dict, files: dict, threads):
        self.folder, self.manifest, self.files, self.threads = folder, manifest, files, threads
        self.runners: dict[str, object] = {}

    def runner(self, precision: str, stages):
        key = (precision, tuple(stages))
        if key not in self.runners:
            plan = {name: {"precision": precision, "file": self.files[precision][name]["file"]} for name in stages}
            self.runners[key] = as_torch(OpenVINORunner(self.folder, precision=precision, threads=self.threads,
                                                        verify=False, stages=plan, cache=False))
        return self.runners[key]


def _choose(tried: dict) -> str:
    """The rung of a stage's ladder ({option: {"passed", "ms"}} in ladder order): the first that passes,
    except int8, which is taken only where it pays (faster than the fastest float rung that passes);
    between the float fall-backs of int8, the faster. fp32 is the last resort."""
    floats = [o for o in tried if o != "int8" and tried[o]["passed"]]
    if "int8" in tried:
        best = min(floats, key=lambda o: tried[o]["ms"], default="fp32")
        return "int8" if tried["int8"]["passed"] and tried["int8"]["ms"] < tried.get(best, {"ms": float("inf")})["ms"] else best
    return floats[0] if floats else "fp32"


def _time_stage(runner, name: str, calls, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            for args, _ in calls:
                getattr(runner, name)(*args)
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def _eligible(option: str, worst: float) -> bool:
    """Whether a rung that passed its gate, its errors reaching `worst` of their limits, may be
    chosen: fp32 always, a reduced precision only within SELECTION_MARGIN of them."""
    return option == "fp32" or worst <= SELECTION_MARGIN


def _worst_end(ends: list[dict]) -> dict:
    """The end-to-end stats of the episode nearest (or furthest over) its limits, with "episode" (its
    index) and "episodes" (how many were checked)."""
    def badness(end):
        return max(limit_ratio(end), end["min_iou"] / max(end["mask_iou"], 1e-12))
    index = max(range(len(ends)), key=lambda i: badness(ends[i]))
    return {**ends[index], "episode": index, "episodes": len(ends)}


def plan_precision(folder: str, manifest: dict, model, precision: str, files: dict, episodes, threads,
                   progress=None) -> dict:
    """Choose each stage's precision for `precision` and gate the composed pipeline on every one of
    `episodes` (a list of (query, supports, masks)); the manifest entry."""
    bf16 = cpu.native_bf16()
    records = {name: [] for name in STAGE_ORDER}
    for episode in episodes:  # every call of every episode is held to its own limits
        for name, calls in stage_samples(model, *episode).items():
            records[name] += calls
    candidates = _Candidates(folder, manifest, files, threads)
    kind = "fp32" if precision == "fp32" else "bf16_autocast"
    baseline = MemoBaseline(model, "fp32", kind)
    fp32_baseline = Baseline(model, "fp32", "fp32")
    with torch.no_grad():
        references = [model(*episode) for episode in episodes]
    lows = [baseline.episode(*episode) if kind != "fp32" else None for episode in episodes]
    stages = {}
    for name in STAGE_ORDER:
        if progress is not None:
            progress.set_postfix_str(f"OpenVINO {precision}: {name}")
        tried = {}
        for option in [o for o in _ladder(name, precision, bf16) if name in files.get(o, {})]:
            runner = candidates.runner(option, [name])
            outputs, failures = check_stage(runner, name, records[name], fp32_baseline if option == "fp32" else baseline)
            worst = max(map(limit_ratio, outputs.values()), default=float("inf"))
            tried[option] = {"passed": not failures and _eligible(option, worst),
                             "within_limits": not failures, "failures": failures, "outputs": outputs,
                             "worst": worst, "ms": _time_stage(runner, name, records[name])}
        stages[name] = {"precision": _choose(tried), "tried": tried}
    while True:
        plan = {name: {"precision": entry["precision"], "file": files[entry["precision"]][name]["file"]}
                for name, entry in stages.items()}
        runner = as_torch(OpenVINORunner(folder, precision=precision, threads=threads, verify=False, stages=plan,
                                         cache=False))
        ends, failures = [], []
        for index, (episode, reference, low) in enumerate(zip(episodes, references, lows)):
            with torch.no_grad():
                got = runner(*episode).float()
            end, failed = check_end_to_end(got, reference, low, kind)
            ends.append(end)
            failures += [f"gate episode {index}: {failure}" for failure in failed]
        end = _worst_end(ends)
        reduced = [n for n, e in stages.items() if e["precision"] != "fp32"]
        if not failures or not reduced:
            break
        worst = max(reduced, key=lambda n: stages[n]["tried"][stages[n]["precision"]]["worst"])
        tried = stages[worst]["tried"]
        rest = list(tried)[list(tried).index(stages[worst]["precision"]) + 1:]
        stages[worst]["precision"] = _choose({o: tried[o] for o in rest}) if len(rest) > 1 else "fp32"
        stages[worst]["stepped_down"] = "the end-to-end check failed with this stage furthest over its limits"
    # a stage whose every rung failed (fp32 is the last resort) fails the plan, whatever the end to end says
    failures = [f"{failure} [OpenVINO {entry['precision']}]" for entry in stages.values()
                for failure in entry["tried"][entry["precision"]]["failures"]] + failures
    report = {"precision": precision, "baseline": kind, "failures": failures, "passed": not failures,
              "stages": {n: e["tried"][e["precision"]]["outputs"] for n, e in stages.items()}, "end_to_end": end}
    entries = {}
    for name, entry in stages.items():
        chosen = entry["precision"]
        entries[name] = {
            "precision": chosen,
            "inference_precision": HINTS[chosen],
            **files[chosen][name],
            "ms": round(entry["tried"][chosen]["ms"], 2),
            "tried": {o: {"passed": t["passed"], "within_limits": t["within_limits"], "ms": round(t["ms"], 2),
                          "worst_error_over_limit": round(t["worst"], 4)}
                      for o, t in entry["tried"].items()},
            **({"stepped_down": entry["stepped_down"]} if "stepped_down" in entry else {}),
        }
    return {"stages": entries, "parity": report}


def plan_graphs(folder: str, manifest: dict, model, precision: str, episodes, threads) -> dict:
    """The deployable graphs, each run whole at one precision: `precision`'s rung if the graph
    gate passes on every one of `episodes`, else fp32 (bf16's fall-back). {"precision", "tried":
    {rung: passed}, "parity": the report of the first failing episode, else of the one nearest its
    end-to-end limits, with "episode" and "episodes"}."""
    tried = {}
    for option in _ladder("graphs", precision, cpu.native_bf16()):
        plan = {name: {"precision": option, "file": spec["file"]} for name, spec in manifest["graphs"].items()}
        runner = as_torch(OpenVINORunner(folder, precision=option, threads=threads, verify=False, stages=plan,
                                         cache=False))
        reports = []
        for episode in episodes:
            reports.append(parity_report(model, runner, option, episode, stages=GRAPH_ORDER,
                                         baseline="fp32" if option == "fp32" else "bf16_autocast"))
            if not reports[-1]["passed"]:
                break
        if reports[-1]["passed"]:
            index = _worst_end([r["end_to_end"] for r in reports])["episode"]
        else:
            index = len(reports) - 1
        report = {**reports[index], "episode": index, "episodes": len(reports)}
        worst = max([limit_ratio(stats) for r in reports for outputs in r["stages"].values() for stats in outputs.values()]
                    + [limit_ratio(r["end_to_end"]) for r in reports])
        tried[option] = report["passed"] and _eligible(option, worst)
        if tried[option] or option == "fp32":
            return {"precision": option, "tried": tried, "parity": report}


def gate_openvino(folder: str, manifest: dict, model, precisions, calibration: str | None = None, threads=None,
                  seed: int = 0, progress=None) -> dict:
    """manifest["openvino"] for `precisions`: IR for int8, a gated per-stage plan per precision."""
    import openvino as ov

    info = cpu.cpu_info()
    onnx_files = {name: {"file": spec["file"], "sha256": spec["sha256"]} for name, spec in manifest["stages"].items()}
    files = {"fp32": onnx_files, "bf16": onnx_files}
    result = {"openvino_version": ov.__version__, "cpu": {"model": info["model"], "flags": info["reported"]}}
    episodes = [sample_episode(model.config, manifest["shots"], batch=1, seed=seed + 7 + i) for i in range(GATE_EPISODES)]
    result["gate_episodes"] = {"synthetic_seeds": [seed + 7 + i for i in range(GATE_EPISODES)],
                               **({"int8": "the calibration set's held-out episode"} if "int8" in precisions else {})}
    if "int8" in precisions:
        size, shots = model.config.image_size, manifest["shots"]
        if calibration is None:
            calibration = calib.write_synthetic(os.path.join(folder, "calibration"), size,
                                                max(calib.SYNTHETIC_PAIRS, calib.minimum_pairs(shots)), seed=seed)
            source = "synthetic"
            print("int8: no --calibration given: calibrating on a synthetic set of shapes written to "
                  f"{os.path.basename(folder)}/calibration/ (give real image/mask pairs for real data)", file=sys.stderr)
        else:
            source = "user"
        pairs = calib.read_set(calibration, size, shots)
        result["calibration"] = calib.describe(calibration, source)
        result["calibration"]["held_out"] = shots + 1
        quantized, held_out = _quantize(folder, manifest, model, pairs, progress)
        files["int8"] = quantized
    for precision in precisions:
        gate_episodes = [held_out] if precision == "int8" else episodes
        result[precision] = plan_precision(folder, manifest, model, precision, files, gate_episodes, threads, progress)
        if not result[precision]["parity"]["passed"]:
            raise ParityError("OpenVINO " + format_report(result[precision]["parity"], manifest["stages"]),
                              result[precision]["parity"])
        if precision != "int8" and "graphs" in manifest:
            if progress is not None:
                progress.set_postfix_str(f"OpenVINO {precision}: graphs")
            graphs = result[precision]["graphs"] = plan_graphs(folder, manifest, model, precision, episodes, threads)
            if not graphs["parity"]["passed"]:
                raise ParityError("OpenVINO graphs " + format_report(graphs["parity"], manifest["graphs"]),
                                  graphs["parity"])
        if progress is not None:
            progress.update()
    if "int8" in precisions:  # IR that no plan uses is not kept
        used = {e["file"] for e in result["int8"]["stages"].values()}
        for name, entry in files["int8"].items():
            if entry["file"] not in used:
                for path in (entry["file"], entry["weights"]["file"]):
                    os.remove(os.path.join(folder, path))
    return result
