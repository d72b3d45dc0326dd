"""`fssam repository`: a self-contained Triton model repository (the `fssam` ensemble) from an export folder."""

from __future__ import annotations

import sys

from fssam.commands.common import at_least

NATIVE_NOTES = {
    "onnxruntime": "native ONNX Runtime configs are for an official tritonserver container",
    "tensorrt": "native TensorRT configs are for an official tritonserver container on the GPU that built the engines",
    "openvino": "native OpenVINO configs are for an official tritonserver container (its OpenVINO backend, CPU; it "
                "cannot pin f32, see the docs); the nvidia-pytriton wheel's server has no OpenVINO backend: use "
                "python-openvino there",
    "torch-aoti": "torch_aoti configs are for an official tritonserver container from 26.05 (its PyTorch backend, "
                  "beta: one episode per request) whose torch is the one that built the packages; the "
                  "nvidia-pytriton wheel's server has no PyTorch backend: use python-torch there",
}


def register(subparsers) -> None:
    from fssam.serving.repository import BACKENDS, DEFAULT_MAX_BATCH

    repository = subparsers.add_parser("repository", help="write a Triton model repository (ensemble fssam) from an "
                                                          "export folder")
    repository.add_argument("--artifacts", required=True, help="folder written by fssam export")
    repository.add_argument("--out", required=True, help="repository folder to write (replaced atomically, only over "
                                                         "an earlier fssam repository)")
    repository.add_argument("--backend", default="python-ort", choices=BACKENDS,
                            help="what runs the two graphs: plan (each graph on the runtime and precision the export's "
                                 "graph plan chose, `fssam export --plan`); python-ort / python-openvino (ONNX Runtime / "
                                 "OpenVINO in the Python backend, CPU, this machine's tritonserver); python-torch (the "
                                 "AOTInductor packages of `fssam export --aoti` on torch in the Python backend, CPU or "
                                 "GPU); onnxruntime, tensorrt, openvino, torch-aoti: Triton's native backends "
                                 "(official containers)")
    repository.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16", "int8"),
                            help="python-openvino / openvino: OpenVINO precision of the graphs (default fp32; bf16 needs "
                                 "a CPU with native bf16 for python-openvino; int8: the graph plan's NNCF int8 IR); "
                                 "python-ort / onnxruntime: int8 serves the graph plan's ONNX Runtime int8 graphs; "
                                 "python-torch / torch-aoti: the AOTInductor packages of `fssam export --aoti` (fp32, "
                                 "bf16, fp16; default fp32); otherwise the export's own")
    repository.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                            help=f"episodes per request and per dynamic batch (default {DEFAULT_MAX_BATCH})")
    repository.add_argument("--instances", type=at_least(1), default=1, help="instances per graph model")
    repository.add_argument("--threads", type=at_least(0), default=0, help="ONNX Runtime / OpenVINO / torch threads per graph instance "
                                                                    "(0: the runtime's default, all cores)")
    repository.add_argument("--max-queue-delay-us", type=at_least(0), default=500, help="dynamic batching delay")
    repository.add_argument("--no-cache", action="store_true",
                            help="no response cache on support_encoder (every support set is encoded)")
    repository.add_argument("--device", default="gpu", choices=("gpu", "cpu"),
                            help="--backend onnxruntime: instance kind (default gpu)")
    repository.add_argument("--accelerator", default=None, choices=("tensorrt",),
                            help="--backend onnxruntime on a GPU: ONNX Runtime's TensorRT execution accelerator")
    repository.set_defaults(func=handle)


def handle(args) -> int:
    from fssam.serving.repository import write_repository

    info = write_repository(
        args.artifacts, args.out, backend=args.backend, precision=args.precision, max_batch=args.max_batch,
        instances=args.instances, threads=args.threads, queue_delay_us=args.max_queue_delay_us,
        cache=not args.no_cache, device=args.device, accelerator=args.accelerator,
    )
    graphs = ", ".join(f"{name} {entry['backend']} {entry['precision']}" if args.backend == "plan"
                       else f"{name} {entry['precision']}" for name, entry in info["graphs"].items())
    size = info["image_size"]
    print(f"wrote Triton model repository {args.out}: ensemble {info['ensemble']['model']} = validate -> "
          f"support_encoder -> query_segmenter ({args.backend}: {graphs}; support cache: "
          f"{'Triton response cache' if info['support_cache'] else 'off'}); {info['config']}, {info['shots']}-shot, "
          f"{size}x{size}, {info['export_precision']} export; weights: {info['weights']}")
    if info.get("openvino_gated") is False:
        print(f"note: this export has no gated OpenVINO {info['precision']} graphs: they run {info['precision']} "
              f"unchecked; export with --openvino {info['precision']} to gate them", file=sys.stderr)
    if args.backend in NATIVE_NOTES:
        print(f"note: {NATIVE_NOTES[args.backend]} (see docs/serving.md)", file=sys.stderr)
    return 0
