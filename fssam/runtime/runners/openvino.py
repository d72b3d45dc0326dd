"""OpenVINO (CPU): the same exported ONNX files, or int8 IR from `fssam export --openvino int8`.

Precisions are OpenVINO's inference precision per stage:
* fp32: every stage at f32 (pinned: OpenVINO defaults to bf16 on AVX512_BF16/AMX CPUs).
* bf16: the bf16 precision hint; refused on a CPU without amx_bf16 or avx512_bf16, naming the
  flags found (no silent fall-back to something else).
* int8: NNCF-quantized IR where it passed the gate, the other stages in the precision the gate
  chose; needs the plan an `fssam export --openvino int8` wrote into the manifest.
bf16 and int8 run the per-stage plan the export gated (manifest["openvino"][precision]): no
reduced precision runs ungated. fp32 runs that plan where the export has one, else every stage.
Compiled models are cached in $FSSAM_OPENVINO_CACHE (default ~/.cache/fssam/openvino), so a second start is fast.
"""

from __future__ import annotations

import os

import numpy as np

from fssam.errors import ConfigError
from fssam.runtime import cpu
from fssam.runtime.manifest import int8_graph_files
from fssam.runtime.runner import StageRunner

PRECISIONS = ("fp32", "bf16", "int8")
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8 IR: the float parts stay f32
CACHE_ENV = "FSSAM_OPENVINO_CACHE"


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "fssam", "openvino")


def require_native_bf16(info: dict | None = None) -> None:
    info = info or cpu.cpu_info()
    if not cpu.native_bf16(info):
        raise ConfigError(
            f"OpenVINO bf16 needs a CPU with native bf16 ({' or '.join(cpu.NATIVE_BF16_FLAGS)}); this one has neither: "
            f"{cpu.describe(info)}. Use --precision fp32 or int8"
        )


def compile_properties(stage_precision: str, threads: int | None = None, cache: str | None = None) -> dict:
    """The compile_model properties of one stage (also written into Triton configs)."""
    properties = {"INFERENCE_PRECISION_HINT": HINTS[stage_precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        properties["INFERENCE_NUM_THREADS"] = int(threads)
    if cache:
        properties["CACHE_DIR"] = cache
    return properties


def plan(manifest: dict, precision: str) -> dict:
    """{stage or graph: {"precision", "file"}}: the gated plan of the export (bf16 and int8 need
    one), or every stage at fp32. The deployable graphs run whole in the precision their own gate
    chose (bf16 or fp32); at int8 they are the graph plan's NNCF int8 IR (`fssam export --plan`),
    where it passed its gate."""
    gated = manifest.get("openvino", {}).get(precision)
    int8_graphs = int8_graph_files(manifest, "openvino") if precision == "int8" else {}
    if precision == "int8" and not int8_graphs and not gated:
        raise ConfigError("this export has no OpenVINO int8 plan: export it with `fssam export --plan` (int8 "
                          "graphs) or `fssam export --openvino int8` (int8 stages); both are NNCF quantization gated "
                          "against eager bf16 autocast")
    if gated:
        units = {name: {"precision": entry["precision"], "file": entry["file"]} for name, entry in gated["stages"].items()}
    elif precision == "bf16":
        raise ConfigError("this export has no OpenVINO bf16 plan: export it with `fssam export --openvino bf16` "
                          "(each stage bf16 where it passes the gate against eager bf16 autocast, else fp32)")
    elif precision == "int8":
        units = {}
    else:
        units = {name: {"precision": precision, "file": spec["file"]} for name, spec in manifest["stages"].items()}
    graph_precision = (gated or {}).get("graphs", {}).get("precision") if gated else precision
    if graph_precision and precision != "int8":
        units.update({name: {"precision": graph_precision, "file": spec["file"]}
                      for name, spec in manifest.get("graphs", {}).items()})
    units.update({name: {"precision": "int8", "file": file} for name, file in int8_graphs.items()})
    return units


class OpenVINORunner(StageRunner):
    name = "openvino"

    def __init__(self, artifacts: str, precision: str | None = None, threads: int | None = None, verify: bool = True,
                 stages: dict | None = None, cache: bool = True):
        """`stages` overrides the plan ({stage: {"precision", "file"}}), as the export's gate does."""
        import openvino as ov

        super().__init__(artifacts, precision or "fp32", verify)
        if self.manifest["dtype"] != "float32":
            raise ConfigError(f"OpenVINO runs fp32 exports (its precision is a compile hint); this export is "
                              f"{self.manifest['precision']}: export with --precision fp32")
        if self.precision == "bf16":
            require_native_bf16()  # this machine first: without it no plan helps
        self.plan = stages or plan(self.manifest, self.precision)
        if any(entry["precision"] == "bf16" for entry in self.plan.values()):
            require_native_bf16()
        self.threads, self.cache = threads, cache
        self.core = ov.Core()
        self.compiled, self.requests, self.output_ports = {}, {}, {}  # compiled on first use

    def compile(self, name: str):
        """The compiled model of one stage or graph (compiled once, on first use)."""
        if name not in self.compiled:
            if name not in self.plan:
                raise ConfigError(f"OpenVINO {self.precision} has no plan for {name}"
                                  + (": export int8 graphs with `fssam export --plan`, int8 stages with "
                                     "`--openvino int8`" if self.precision == "int8" else ""))
            entry = self.plan[name]
            properties = compile_properties(entry["precision"], self.threads, cache_dir() if self.cache else None)
            compiled = self.core.compile_model(os.path.join(self.artifacts, entry["file"]), "CPU", properties)
            self.output_ports[name] = [self._port(compiled, name, spec["name"]) for spec in self.specs[name]["outputs"]]
            self.requests[name] = compiled.create_infer_request()
            self.compiled[name] = compiled
        return self.compiled[name]

    @staticmethod
    def _port(compiled, stage: str, tensor: str) -> int:
        for index, port in enumerate(compiled.outputs):
            if tensor in port.get_names():
                return index
        raise ConfigError(f"stage {stage}: the OpenVINO model has no output {tensor!r} (found "
                          f"{[sorted(p.get_names()) for p in compiled.outputs]}): re-export")

    def describe(self) -> str:
        used = {n: e for n, e in self.plan.items() if n in self.compiled} or self.plan
        kinds = sorted({entry["precision"] for entry in used.values()})
        detail = "" if len(kinds) == 1 else " (" + ", ".join(f"{n} {e['precision']}" for n, e in used.items()) + ")"
        return f"OpenVINO {self.precision}{detail}"

    def run_stage(self, name: str, *arrays):
        self.check_inputs(name, arrays)
        self.compile(name)
        feeds = {entry["name"]: np.ascontiguousarray(array, dtype=np.dtype(entry["dtype"]))
                 for array, entry in zip(arrays, self.specs[name]["inputs"])}
        request = self.requests[name]
        request.infer(feeds)
        outputs = [request.get_output_tensor(index).data.copy() for index in self.output_ports[name]]
        return tuple(outputs) if len(outputs) > 1 else outputs[0]


RUNNER = OpenVINORunner
