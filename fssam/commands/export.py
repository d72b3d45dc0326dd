"""`fssam export`: every stage to ONNX (+ TensorRT on a GPU, + gated OpenVINO plans, + torch
AOTInductor packages), with a manifest and the parity gate."""

from __future__ import annotations

import sys

from fssam.commands.common import add_model_options, at_least, model_options
from fssam.runtime.contract import DEFAULT_MAX_BATCH


def register(subparsers) -> None:
    export = subparsers.add_parser(
        "export", help="export every stage to ONNX (+ TensorRT on a GPU, OpenVINO plans, AOTInductor packages), "
                       "with a manifest and parity gate")
    add_model_options(export)
    export.add_argument("--shots", type=int, default=1, help="K support images per episode (fixed in the graphs)")
    export.add_argument("--precision", default="fp32", help="fp32 | fp16 | bf16 (bf16: opset 22, see the README)")
    export.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="N",
                        help=f"episodes per call the files, TensorRT engines and a served repository admit (default "
                             f"{DEFAULT_MAX_BATCH}; the per-image stages get N*max(K,2) images)")
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
    export.add_argument("--plan", action="store_true",
                        help="the graph plan of this machine: every runtime and precision it runs (ONNX Runtime "
                             "fp32 / int8 / int8-static, OpenVINO fp32 / bf16 / int8) gated and timed per deployable graph, int8 "
                             "graphs written; `fssam repository --backend plan` serves the fastest that passed")
    export.add_argument("--aoti", metavar="PRECISIONS",
                        help="comma list of fp32, bf16, fp16: torch AOTInductor packages (.pt2) of the two deployable "
                             "graphs, gated like every export (`fssam repository --backend python-torch` serves them)")
    export.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="with --aoti: build CPU packages (any machine) or CUDA ones (on the GPU that serves them)")
    export.add_argument("--calibration", help="with --plan or --openvino int8: folder of images/ and masks/ pairs "
                        "(default: synthetic, and said so)")
    export.add_argument("--threads", type=at_least(1), help="CPU threads of the OpenVINO runs in the gate")
    export.add_argument("--no-progress", action="store_true", help="no progress bar")
    export.set_defaults(func=handle)


def handle(args) -> int:
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
            max_batch=args.max_batch,
            plan=args.plan,
            aoti=args.aoti or (),
            aoti_device=args.device,
            **model_options(args),
        )
    except ParityError as error:
        print(str(error), file=sys.stderr)
        raise ParityError(f"parity gate failed: nothing was written to {args.out}", error.report) from None
    print(format_report(manifest["parity"]["onnxruntime"], manifest["stages"]))
    print("graphs " + format_report(manifest["graph_parity"]["onnxruntime"], manifest["graphs"]))
    for precision, entry in manifest.get("openvino", {}).items():
        if isinstance(entry, dict) and "parity" in entry:
            print(f"OpenVINO {precision} " + format_report(entry["parity"], manifest["stages"]))
            print(f"  plan: " + ", ".join(f"{name} {stage['precision']}" for name, stage in entry["stages"].items()))
            if "graphs" in entry:
                graphs = entry["graphs"]
                print(f"OpenVINO {precision} graphs at {graphs['precision']} "
                      + format_report(graphs["parity"], manifest["graphs"]))
    if "graph_plan" in manifest:
        from fssam.export.graph_plan import describe

        print("graph plan of this machine (gate vs eager fp32; time of one call):")
        print("\n".join(describe(manifest["graph_plan"])))
    for precision, entry in manifest.get("aoti", {}).items():
        print(f"AOTInductor {precision} ({entry['device']}, torch {entry['torch']}) graphs "
              + format_report(entry["parity"], manifest["graphs"]))
    if "tensorrt" in manifest:
        print("TensorRT " + format_report(manifest["tensorrt"]["parity"], manifest["stages"]))
        if "graph_parity" in manifest["tensorrt"]:
            print("TensorRT graphs " + format_report(manifest["tensorrt"]["graph_parity"], manifest["graphs"]))
    weights = manifest["weights"]
    packages = [f"{p} ({e['device']})" for p, e in manifest.get("aoti", {}).items() if e.get("graphs")]
    aoti = f", AOTInductor packages of both graphs at {', '.join(packages)} under aoti/," if packages else ""
    print(f"wrote {len(manifest['stages'])} stage and {len(manifest['graphs'])} graph ONNX files{aoti} and manifest.json "
          f"to {args.out} "
          f"({args.config}, {args.shots}-shot, {args.precision}, up to {manifest['max_batch']} episodes per call; "
          f"weights: {weights['source']})")
    if "bf16" in manifest:
        bf16 = manifest["bf16"]
        islands = "; ".join(f"{name}: {', '.join(f'{op} x{n}' for op, n in ops.items())}"
                            for name, ops in bf16["fp32_ops"].items()) or "none"
        print(f"bf16 at opset {bf16['opset']}, traced under autocast; operators cast to fp32 (no bf16 in their ONNX "
              f"schema, or a bf16 input beside fp32 weights): {islands}")
        if bf16["fp32_units"]:
            print(f"computing in fp32 throughout (autocast lowers none of their operators, as in eager): "
                  f"{', '.join(bf16['fp32_units'])}")
        print(f"note: ONNX Runtime's CPU provider {bf16['onnxruntime_cpu']}; its gate ran {bf16['gate']['onnxruntime']}",
              file=sys.stderr)
    if "note" in weights:
        print("note: " + weights["note"], file=sys.stderr)
    return 0
