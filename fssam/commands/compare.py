"""`fssam compare`: the parity gate on an export folder against eager PyTorch, the model rebuilt
from the manifest (its --checkpoint files must be the ones the export recorded): the six stages
and, where the export has them, the two deployable graphs a server runs."""

from __future__ import annotations

import os
import sys

from fssam.commands.common import at_least, seed


def register(subparsers) -> None:
    compare = subparsers.add_parser("compare", help="run the parity gate on an export folder against eager PyTorch")
    compare.add_argument("--artifacts", required=True, help="folder written by fssam export")
    compare.add_argument("--backend", default="onnxruntime", help="a runtime: onnxruntime | openvino | tensorrt")
    compare.add_argument("--precision", help="the runtime's precision (default: the export's); openvino: fp32 | bf16 | int8")
    compare.add_argument("--threads", type=at_least(1), help="CPU threads of the runtime (default: the runtime's own)")
    compare.add_argument("--device", default="cpu",
                         help="onnxruntime: cpu (default), cuda or cuda:N (its TensorRT and CUDA providers, "
                              "IO binding; refused where this onnxruntime has no CUDA provider)")
    compare.add_argument("--batch", type=at_least(1), default=1, help="episodes per call")
    compare.add_argument("--episode-seed", type=seed, default=2024, help="seed of the synthetic episode, 0 <= seed < 2**63")
    compare.add_argument("--json", help="also write the report as JSON here")
    compare.add_argument("--checkpoint", action="append",
                         help="a checkpoint the export was made from (repeat the flag); its sha256 must match the "
                              "manifest's. Needed for exports of checkpoints, not for random-init exports")
    compare.set_defaults(func=handle)


REPORT_FORMAT = "fssam-parity-report/1"  # the --json file: a later compare may replace it, nothing else


def handle(args) -> int:
    from fssam.errors import ConfigError
    from fssam.export import ParityError, format_report, load_manifest, parity_report
    from fssam.model import build
    from fssam.runtime import as_torch, open_runner
    from fssam.runtime.contract import GRAPH_ORDER
    from fssam.runtime.manifest import weights_line
    from fssam.runtime.parity import sample_episode

    if args.json:
        from fssam.files import check_output_file, json_with

        check_output_file(args.json, json_with("format", REPORT_FORMAT), "--json")
    manifest = load_manifest(args.artifacts)
    cfg = manifest["config"]
    checkpoints = _checkpoints(args, manifest)
    init_seed = int(manifest["weights"]["source"].rsplit(" ", 1)[-1]) if manifest["weights"]["source"].startswith("random") else 0
    runner = as_torch(open_runner(args.backend, args.artifacts, precision=args.precision, threads=args.threads,
                                  **_device_option(args)))
    if getattr(runner.runner, "note", None):  # asked for a GPU provider it does not have: not a GPU gate
        raise ConfigError(f"--device {args.device}: {runner.runner.note.split(': ran on')[0]}: nothing to gate "
                          "on the GPU (pip install onnxruntime-gpu)")
    model = build(cfg["name"], checkpoint=checkpoints or None, seed=init_seed, num_refine=cfg["num_refine"],
                  refine_version=cfg["refine_version"], scma_mode=cfg["scma_mode"])
    episode = sample_episode(model.config, manifest["shots"], batch=args.batch, seed=args.episode_seed)
    weights = weights_line(manifest)  # never presented as trained when random; printed once the runtime is
    print(weights, file=sys.stderr)  # open, so that a refusal above stays one error line
    stages, graphs = _units(manifest, args.backend, runner.precision)
    if stages:
        report = parity_report(model, runner, runner.precision, episode)
        print(format_report(report, manifest["stages"]))
    else:  # a lean export (fssam deploy) or the graph plan's int8 graphs: the graphs alone
        report = {"passed": True, "failures": [], "stages": {}}
    if graphs:  # what a server runs
        graphs = report["graphs"] = parity_report(model, runner, runner.precision, episode, stages=GRAPH_ORDER,
                                                  baseline=_graph_baseline(manifest, args.backend, runner.precision))
        print("deployable graphs, " + format_report(graphs, manifest["graphs"]))
        report["failures"] = report["failures"] + [f"graphs: {failure}" for failure in graphs["failures"]]
        report["passed"] = report["passed"] and graphs["passed"]
    report["runtime"] = runner.describe()  # the providers that ran
    report["weights"] = weights
    print(f"runtime: {report['runtime']}")
    if args.json:
        from fssam.files import write_json

        write_json(args.json, {"format": REPORT_FORMAT, **report})
    if not report["passed"]:
        raise ParityError("parity gate failed", report)
    return 0


def _units(manifest: dict, backend: str, precision: str) -> tuple[bool, bool]:
    """(gate the six stages, gate the two graphs) of this export on `backend` at `precision`: int8
    stages are OpenVINO's per-stage plan, int8 graphs the graph plan's."""
    from fssam.runtime.contract import GRAPH_ORDER
    from fssam.runtime.manifest import int8_graph_files

    if precision == "int8":
        stages = backend == "openvino" and "int8" in manifest.get("openvino", {})
        graphs = set(int8_graph_files(manifest, backend)) == set(GRAPH_ORDER)
    else:
        stages, graphs = bool(manifest["stages"]), bool(manifest.get("graphs"))
    return stages, graphs


def _device_option(args) -> dict:
    """open_runner's device option: ONNX Runtime's providers follow it; the other runtimes have one place."""
    from fssam.errors import ConfigError

    if args.backend == "onnxruntime":
        return {"device": args.device}
    if args.device != "cpu" and args.backend == "openvino":
        raise ConfigError(f"--device {args.device}: OpenVINO runs on the CPU here (--device is for onnxruntime)")
    return {}


def _graph_baseline(manifest: dict, backend: str, precision: str) -> str | None:
    """An OpenVINO plan whose graphs fell back to fp32 runs them at fp32: the fp32 rule, as its gate."""
    graphs = manifest.get("openvino", {}).get(precision, {}).get("graphs", {}) if backend == "openvino" else {}
    return "fp32" if graphs.get("precision") == "fp32" else None


def _checkpoints(args, manifest: dict) -> list[str]:
    """The --checkpoint files, which must be exactly the ones the export recorded (by sha256)."""
    from fssam.errors import ConfigError
    from fssam.model.checkpoint import file_sha256

    recorded = manifest["weights"].get("checkpoints", [])
    given = args.checkpoint or []
    if recorded and not given:
        names = ", ".join(f"{e.get('file', '?')} (sha256 {e['sha256'][:12]})" for e in recorded)
        raise ConfigError(f"the export in {args.artifacts} was made from checkpoint(s) {names}: give them with "
                          "--checkpoint (repeat the flag) to rebuild the eager model")
    hashes = {}
    for path in given:
        if not os.path.isfile(path):
            raise ConfigError(f"checkpoint not found: {path}")
        hashes[path] = file_sha256(path)
    wanted = {e["sha256"] for e in recorded}
    foreign = [path for path, digest in hashes.items() if digest not in wanted]
    if foreign:
        raise ConfigError(f"--checkpoint {', '.join(foreign)}: not among the checkpoints the export in "
                          f"{args.artifacts} was made from ({manifest['weights']['source']}; sha256 differs)")
    missing = [e for e in recorded if e["sha256"] not in set(hashes.values())]
    if missing:
        raise ConfigError("the export was also made from " + ", ".join(
            f"{e.get('file', '?')} (sha256 {e['sha256'][:12]})" for e in missing) + ": give it with --checkpoint too")
    return given
