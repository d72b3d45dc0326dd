"""The `fssam` command: sub-commands that compose (predict, export, compare, ...)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from fssam.errors import FSSAMError


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="small", help="tiny | small (paper default) | base_plus | large")
    parser.add_argument(
        "--checkpoint",
        action="append",
        help="official FSSAM training file, or SAM 2 and DINOv2 files (repeat the flag); "
        "without it the model is a seeded random init and says so",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init when no checkpoint covers a part")
    parser.add_argument("--num-refine", type=int, default=None, help="IMR rounds (config default: 3)")
    parser.add_argument("--refine-version", default=None, help="v1 (official default) or v2")
    parser.add_argument("--scma-mode", default=None, help="official (default; the released 5-shot code) or paper "
                        "(every shot calibrates); identical at 1 shot")


def _model_options(args) -> dict:
    """The model arguments of _add_model_args, as keywords of `fssam.model.build` / `export`."""
    return dict(checkpoint=args.checkpoint, seed=args.seed, num_refine=args.num_refine,
                refine_version=args.refine_version, scma_mode=args.scma_mode)


def _build_model(args):
    from fssam.model import build

    return build(args.config, **_model_options(args))


def _overlay_path(out: str) -> str:
    stem, _ = os.path.splitext(out)
    return stem + "_overlay.png"


def cmd_predict(args) -> int:
    from fssam.data.preprocess import load_episode
    from fssam.device import resolve_device, synchronize
    from fssam.evaluate import check_eager_precision, eager_forward
    from fssam.model import describe_weights, get_config

    if args.url:
        return _predict_remote(args)
    args.config = args.config or "small"
    cfg = get_config(args.config)  # fail fast on an unknown config, before reading files
    precision = check_eager_precision(args.precision)
    device = resolve_device(args.device or "auto")
    query, supports, masks, query_rgb = load_episode(args.support, args.support_mask, args.query, cfg.image_size)
    model = _build_model(args).to(device)
    print(describe_weights(model), file=sys.stderr)
    start = time.perf_counter()
    logits = eager_forward(model, query, supports, masks, device.type, precision)
    synchronize(device)
    elapsed = time.perf_counter() - start
    where = f"eager, {args.config}, {'CPU' if device.type == 'cpu' else str(device).upper()}, {precision}"
    _write_prediction(args, logits, query_rgb, where, elapsed)
    if model.random_init_seed is not None:
        print("note: random-init weights: this mask is not a trained model's prediction", file=sys.stderr)
    return 0


def _refuse_remote_model_options(args) -> None:
    """--url runs the server's model, fixed when it was exported: refuse the options it cannot honour."""
    from fssam.errors import ConfigError

    given = [flag for flag, value in (("--checkpoint", args.checkpoint), ("--num-refine", args.num_refine),
                                      ("--refine-version", args.refine_version), ("--scma-mode", args.scma_mode),
                                      ("--precision", args.precision), ("--device", args.device))
             if value is not None]
    if args.seed != 0:
        given.append("--seed")
    if given:
        raise ConfigError(
            f"{', '.join(given)} cannot be used with --url: the server's model (weights, config, refinement) "
            f"is fixed when it is exported; export and serve a new model to change it"
        )


def _predict_remote(args) -> int:
    import torch

    from fssam.data.preprocess import load_episode
    from fssam.errors import ConfigError
    from fssam.model import get_config
    from fssam.serving.client import RemoteFSSAM

    _refuse_remote_model_options(args)
    wanted = get_config(args.config).image_size if args.config else None  # unknown name: fails before connecting
    with RemoteFSSAM(args.url, protocol=args.protocol) as remote:
        size = int(remote.metadata()["inputs"][0]["shape"][-1])  # the served config's image size
        if wanted is not None and wanted != size:
            raise ConfigError(
                f"--config {args.config} is a {wanted} px model but the server at {args.url} serves a {size} px "
                f"one: the server's model is fixed when it is exported; drop --config or serve {args.config}"
            )
        query, supports, masks, query_rgb = load_episode(args.support, args.support_mask, args.query, size)
        start = time.perf_counter()
        logits, cached = remote.infer(query, supports, masks)
        elapsed = time.perf_counter() - start
    note = "support cached on the server" if bool(cached[0]) else "support encoded"
    _write_prediction(args, torch.as_tensor(logits), query_rgb, f"Triton {args.protocol} {args.url}, {note}", elapsed)
    return 0


def _write_prediction(args, logits, query_rgb, where: str, elapsed: float) -> None:
    from fssam.data.preprocess import logits_to_mask, overlay, write_png

    mask = logits_to_mask(logits, *query_rgb.shape[:2])
    write_png(args.out, mask * 255)
    write_png(_overlay_path(args.out), overlay(query_rgb, mask))
    print(
        f"wrote {args.out} (mask, 0/255, {query_rgb.shape[1]}x{query_rgb.shape[0]}, "
        f"foreground {mask.mean():.1%}) and {_overlay_path(args.out)}; "
        f"{len(args.support)}-shot episode in {elapsed:.2f} s ({where})"
    )


def cmd_export(args) -> int:
    from fssam.export import ParityError, export, format_report

    try:
        manifest = export(
            args.config,
            out=args.out,
            shots=args.shots,
            precision=args.precision,
            tensorrt=args.tensorrt,
            progress=not args.no_progress,
            scma_node=args.scma_node,
            openvino=args.openvino or (),
            calibration=args.calibration,
            threads=args.threads,
            **_model_options(args),
        )
    except ParityError as error:
        print(str(error), file=sys.stderr)
        raise ParityError(f"parity gate failed: nothing was written to {args.out}", error.report) from None
    print(format_report(manifest["parity"]["onnxruntime"], manifest["stages"]))
    for precision, entry in manifest.get("openvino", {}).items():
        if isinstance(entry, dict) and "parity" in entry:
            print(f"OpenVINO {precision} " + format_report(entry["parity"], manifest["stages"]))
            print(f"  plan: " + ", ".join(f"{name} {stage['precision']}" for name, stage in entry["stages"].items()))
    if "tensorrt" in manifest:
        print("TensorRT " + format_report(manifest["tensorrt"]["parity"], manifest["stages"]))
    weights = manifest["weights"]
    print(f"wrote {len(manifest['stages'])} ONNX files and manifest.json to {args.out} "
          f"({args.config}, {args.shots}-shot, {args.precision}; weights: {weights['source']})")
    if "note" in weights:
        print("note: " + weights["note"], file=sys.stderr)
    return 0


def _compare_checkpoints(args, manifest: dict) -> list[str]:
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


def cmd_compare(args) -> int:
    from fssam.export import ParityError, format_report, load_manifest, parity_report
    from fssam.runtime import as_torch, open_runner
    from fssam.runtime.parity import sample_episode
    from fssam.model import build

    manifest = load_manifest(args.artifacts)
    cfg = manifest["config"]
    checkpoints = _compare_checkpoints(args, manifest)
    seed = int(manifest["weights"]["source"].rsplit(" ", 1)[-1]) if manifest["weights"]["source"].startswith("random") else 0
    model = build(cfg["name"], checkpoint=checkpoints or None, seed=seed, num_refine=cfg["num_refine"],
                  refine_version=cfg["refine_version"], scma_mode=cfg["scma_mode"])
    runner = as_torch(open_runner(args.backend, args.artifacts, precision=args.precision, threads=args.threads))
    episode = sample_episode(model.config, manifest["shots"], batch=args.batch, seed=args.episode_seed)
    report = parity_report(model, runner, runner.precision, episode)
    print(format_report(report, manifest["stages"]))
    if args.json:
        import json

        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    if not report["passed"]:
        raise ParityError("parity gate failed", report)
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fssam", description="FSSAM few-shot segmentation: run, export, serve, measure.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    predict = sub.add_parser("predict", help="segment a query image given support images and masks")
    _add_model_args(predict)
    predict.set_defaults(config=None)  # small in-process; with --url only given to check the server's model
    predict.add_argument("--support", action="append", required=True, help="support image (repeat for K shots)")
    predict.add_argument(
        "--support-mask",
        action="append",
        required=True,
        help="support mask PNG (one per --support): 0 = background, 1 = foreground, 255 = ignore; or two "
        "values 0/k (e.g. 0/255 as predict writes): k = foreground",
    )
    predict.add_argument("--query", required=True, help="query image")
    predict.add_argument("--out", required=True, help="output mask PNG (an overlay PNG is written beside it)")
    predict.add_argument("--url", help="run on a Triton server (host:port) instead of in-process eager PyTorch; "
                         "the served model is fixed (no --checkpoint, --num-refine, --refine-version, --scma-mode, --seed, "
                         "--precision, --device)")
    predict.add_argument("--protocol", default="grpc", choices=["grpc", "http"], help="with --url: gRPC (8001) or HTTP (8000)")
    predict.add_argument("--precision", default=None,
                         help="eager: fp32 (default) or bf16 (the fp32 model under torch.autocast bf16, as the "
                         "official test; logits float32)")
    predict.add_argument("--device", default=None,
                         help="eager: auto (default: cuda when available) | cpu | cuda")
    predict.set_defaults(func=cmd_predict)

    export = sub.add_parser("export", help="export every stage to ONNX (+ TensorRT on a GPU), with a manifest and parity gate")
    _add_model_args(export)
    export.add_argument("--shots", type=int, default=1, help="K support images per episode (fixed in the graphs)")
    export.add_argument("--precision", default="fp32", help="fp32 | fp16 | bf16")
    export.add_argument("--out", default="artifacts", help="output folder (replaced atomically)")
    export.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines (needs a CUDA GPU)")
    export.add_argument(
        "--scma-node",
        default="decomposed",
        help="decomposed (standard ONNX ops, portable; default) or custom (one fssam::SCMA node per layer, "
        "for TensorRT with the fused Triton kernel plugin; needs --tensorrt)",
    )
    export.add_argument("--openvino", help="comma list of fp32, bf16, int8: gate an OpenVINO plan per precision "
                        "(int8: NNCF quantization; bf16 needs a CPU with amx_bf16 or avx512_bf16)")
    export.add_argument("--calibration", help="with --openvino int8: folder of images/ and masks/ pairs "
                        "(default: a synthetic set written into the export folder, and said so)")
    export.add_argument("--threads", type=int, help="CPU threads of the OpenVINO runs in the gate")
    export.add_argument("--no-progress", action="store_true", help="no progress bar")
    export.set_defaults(func=cmd_export)

    compare = sub.add_parser("compare", help="run the parity gate on an export folder against eager PyTorch")
    compare.add_argument("--artifacts", required=True, help="folder written by fssam export")
    compare.add_argument("--backend", default="onnxruntime", help="a runtime: onnxruntime | openvino | tensorrt")
    compare.add_argument("--precision", help="the runtime's precision (default: the export's); openvino: fp32 | bf16 | int8")
    compare.add_argument("--threads", type=int, help="CPU threads of the runtime (default: the runtime's own)")
    compare.add_argument("--batch", type=int, default=1, help="episodes per call")
    compare.add_argument("--episode-seed", type=int, default=2024)
    compare.add_argument("--json", help="also write the report as JSON here")
    compare.add_argument("--checkpoint", action="append",
                         help="a checkpoint the export was made from (repeat the flag); its sha256 must match the "
                              "manifest's. Needed for exports of checkpoints, not for random-init exports")
    compare.set_defaults(func=cmd_compare)

    from fssam.bench.commands import register as register_bench
    from fssam.evaluate import register as register_eval
    from fssam.serving.commands import register as register_serving

    register_serving(sub)

    register_eval(sub)
    register_bench(sub)
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    return run(args)


def run(args) -> int:
    """Run a parsed command: an fssam error is one line on stderr and exit status 1."""
    try:
        return args.func(args)
    except FSSAMError as error:
        print(f"fssam {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fssam {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
