"""`fssam deploy`: export -> time the graphs on every runtime -> repository with the fastest that passed
its gate -> serve the ensemble -> parity with eager, cache, overheads, throughput (fssam.serving.deploy)."""

from __future__ import annotations

from fssam.commands.common import add_model_options, at_least, install_sigterm, model_options


def _levels(text: str) -> tuple:
    import argparse

    try:
        levels = tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of client counts >= 1, e.g. 1,2,4,8")
    return levels


def register(subparsers) -> None:
    from fssam.serving import DEFAULT_CACHE_MB

    deploy = subparsers.add_parser("deploy", help="export the graphs -> gate and time every runtime and precision of "
                                                   "this machine -> serve the fastest that passed per graph -> parity, "
                                                   "latency and throughput")
    add_model_options(deploy)
    deploy.add_argument("--shots", type=int, default=1)
    deploy.add_argument("--out", required=True, help="folder for artifacts/, repository/ and deploy.json")
    deploy.add_argument("--runs", type=int, default=3, help="at least this many timed episodes per latency figure "
                                                            "(more until the median is stable; default 3)")
    deploy.add_argument("--budget-s", type=float, default=12.0,
                        help="seconds of timed episodes per latency mode before it stops (default 12)")
    deploy.add_argument("--calibration", help="int8 calibration: a folder of images/ and masks/ pairs (default: "
                                              "synthetic episodes, said so in the manifest)")
    deploy.add_argument("--threads", type=at_least(1), help="CPU threads of the ONNX Runtime / OpenVINO runs in the plan")
    deploy.add_argument("--cache-mb", type=int, default=DEFAULT_CACHE_MB, help="the server's response cache")
    deploy.add_argument("--clients", type=_levels, default=None, help="throughput at these client counts "
                                                                      "(default 1,2,4,8 up to the number of cores, at least "
                                                                      "2: 1,2 on two cores)")
    deploy.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where the served graphs and the eager baselines run (default auto: the GPU when torch "
                             "sees one; there the candidates are AOTInductor CUDA packages at bf16, fp16 and fp32, "
                             "served by python-torch)")
    deploy.add_argument("--precisions", default=None,
                        help="the AOTInductor precisions tried, a comma list of bf16, fp16, fp32: with --device cuda "
                             "(default all three; fewer compile faster); with --device cpu, packages (fp32, bf16 on a "
                             "CPU with native bf16) served by python-torch instead of the graph plan")
    deploy.add_argument("--no-progress", action="store_true")
    deploy.set_defaults(func=handle)


def handle(args) -> int:
    from fssam.serving.deploy import deploy

    install_sigterm()
    options = model_options(args)
    deploy(args.config, out=args.out, shots=args.shots, runs=args.runs, budget_s=args.budget_s,
           progress=not args.no_progress, cache_mb=args.cache_mb, clients=args.clients,
           calibration=args.calibration, threads=args.threads, device=args.device,
           precisions=args.precisions, **options)
    return 0
