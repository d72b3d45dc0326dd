"""The `repository`, `serve` and `deploy` sub-commands of `fssam` (registered by fssam.cli)."""

from __future__ import annotations

import signal
import sys


def cmd_repository(args) -> int:
    from fssam.serving.repository import write_repository

    info = write_repository(
        args.artifacts, args.out, stage_backend=args.stage_backend, support_cache_size=args.cache_size,
        stage_instances=args.stage_instances, pipeline_instances=args.pipeline_instances, threads=args.threads,
        queue_delay_us=args.max_queue_delay_us, precision=args.precision,
    )
    print(f"wrote Triton model repository {args.out}: {len(info['models']) - 1} stage models ({args.stage_backend}, "
          f"{_stage_precisions(info)}) "
          f"+ {info['pipeline']['model']} (BLS, support cache {args.cache_size}); {info['config']}, "
          f"{info['shots']}-shot, {info['image_size']}x{info['image_size']}, {info['precision']} export; weights: {info['weights']}")
    if info.get("openvino_gated") is False:
        print(f"note: this export has no gated OpenVINO {info['stage_precision']} plan: every stage runs "
              f"{info['stage_precision']} unchecked; export with --openvino {info['stage_precision']} to gate it",
              file=sys.stderr)
    if args.stage_backend in NATIVE_NOTES:
        print(f"note: {NATIVE_NOTES[args.stage_backend]} (see docs/serving.md)", file=sys.stderr)
    return 0


NATIVE_NOTES = {
    "onnxruntime": "native ONNX Runtime configs are for an NGC tritonserver container on a GPU server",
    "tensorrt": "native TensorRT configs are for an NGC tritonserver container on the GPU server that built the engines",
    "openvino": "native OpenVINO configs are for an NGC tritonserver container (its OpenVINO backend, CPU; it cannot pin "
                "f32, see the docs); the nvidia-pytriton wheel's server has no OpenVINO backend: use python-openvino there",
}


def _stage_precisions(info: dict) -> str:
    """'fp32', or 'bf16: prior fp32' for a mixed OpenVINO plan."""
    asked = info["stage_precision"]
    other = [f"{name} {entry['precision']}" for name, entry in info["stages"].items() if entry["precision"] != asked]
    return asked + (f": {', '.join(other)}" if other else "")


def _install_sigterm():
    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def cmd_serve(args) -> int:
    from fssam.serving.repository import read_repository
    from fssam.serving.server import TritonServer

    info = read_repository(args.repository)
    server = TritonServer(args.repository, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, log_path=args.log, verbose=args.verbose_server)
    _install_sigterm()
    try:
        print(f"starting tritonserver on {args.repository} ({info['config']}, {info['stage_backend']}) ...", flush=True)
        server.start(timeout=args.timeout)
        print(f"ready: gRPC {server.grpc_url}  HTTP http://{server.http_url}  model {info['pipeline']['model']}  "
              f"(log {server.log_path}); Ctrl-C to stop", flush=True)
        if info["weights"].startswith("random"):
            print(f"note: {info['weights']} weights: predictions are not a trained model's", file=sys.stderr)
        while server.process.poll() is None:
            try:
                server.process.wait(timeout=1.0)
            except Exception:
                pass
        from fssam.serving import ServingError

        raise ServingError(f"tritonserver exited with code {server.process.returncode}; log {server.log_path}:\n"
                           f"{server.log_tail()}")
    except KeyboardInterrupt:
        print("stopping tritonserver ...", file=sys.stderr, flush=True)
        code = server.stop()
        print(f"tritonserver stopped (exit code {code})", file=sys.stderr)
        return 0
    finally:
        server.stop()


def cmd_deploy(args) -> int:
    from fssam.serving.deploy import deploy

    _install_sigterm()
    deploy(args.config, out=args.out, checkpoint=args.checkpoint, shots=args.shots, seed=args.seed,
           runs=args.runs, progress=not args.no_progress, int8=args.int8, calibration=args.calibration)
    return 0


def register(subparsers) -> None:
    from fssam.runtime.runners.openvino import PRECISIONS
    from fssam.serving.repository import BACKENDS

    repository = subparsers.add_parser("repository", help="write a Triton model repository from an export folder")
    repository.add_argument("--artifacts", required=True, help="folder written by fssam export")
    repository.add_argument("--out", required=True, help="repository folder to write (replaced atomically)")
    repository.add_argument("--stage-backend", default="python-ort", choices=BACKENDS,
                            help="python-ort / python-openvino: ONNX Runtime / OpenVINO in the Python backend (CPU, "
                                 "nvidia-pytriton's tritonserver); onnxruntime / tensorrt: native GPU backends, openvino: "
                                 "native OpenVINO backend (CPU) of NGC tritonserver containers")
    repository.add_argument("--precision", default=None, choices=PRECISIONS,
                            help="python-openvino / openvino: the export's gated OpenVINO plan to serve (default fp32; "
                                 "bf16 needs a CPU with native bf16 for python-openvino; int8 needs "
                                 "`fssam export --openvino int8`); other backends serve the export's own precision")
    repository.add_argument("--cache-size", type=int, default=64, help="support-set cache entries (0: no cache)")
    repository.add_argument("--stage-instances", type=int, default=1, help="instances per stage model")
    repository.add_argument("--pipeline-instances", type=int, default=1,
                            help="pipeline instances (each has its own support cache)")
    repository.add_argument("--threads", type=int, default=0, help="ONNX Runtime / OpenVINO inference threads per stage "
                                                                          "(0: the runtime's default, all cores)")
    repository.add_argument("--max-queue-delay-us", type=int, default=500, help="dynamic batching delay of the pipeline")
    repository.set_defaults(func=cmd_repository)

    serve = subparsers.add_parser("serve", help="run tritonserver on a model repository (Ctrl-C stops it)")
    serve.add_argument("--repository", required=True, help="folder written by fssam repository")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server)")
    serve.add_argument("--http-port", type=int, default=8000, help="0: a free port")
    serve.add_argument("--grpc-port", type=int, default=8001, help="0: a free port")
    serve.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics port (default: metrics off)")
    serve.add_argument("--log", default=None, help="server log file (default: a temporary file)")
    serve.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server to be ready")
    serve.add_argument("--verbose-server", action="store_true", help="tritonserver --log-verbose=1")
    serve.set_defaults(func=cmd_serve)

    deploy = subparsers.add_parser("deploy", help="export -> time every runtime -> repository with the fastest that "
                                                   "passed its gate -> serve -> check against eager -> latency")
    deploy.add_argument("--config", default="small", help="tiny | small | base_plus | large")
    deploy.add_argument("--checkpoint", action="append", help="checkpoint file(s); without: seeded random init")
    deploy.add_argument("--seed", type=int, default=0)
    deploy.add_argument("--shots", type=int, default=1)
    deploy.add_argument("--out", required=True, help="folder for artifacts/ and repository/")
    deploy.add_argument("--runs", type=int, default=5, help="timed requests per latency figure")
    deploy.add_argument("--int8", action="store_true",
                        help="also export, time and consider OpenVINO int8 (NNCF; slower export)")
    deploy.add_argument("--calibration", default=None, help="int8 calibration folder (image/mask pairs; with --int8)")
    deploy.add_argument("--no-progress", action="store_true")
    deploy.set_defaults(func=cmd_deploy)
