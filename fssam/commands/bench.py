"""`fssam bench`: latency / throughput of eager, compiled and exported modes on the same inputs,
as ratios to the eager baselines; the bench itself is fssam.bench.run."""

from __future__ import annotations


from fssam.bench.run import DEFAULT_MODES, GRAPH_MODES, INT8_MODES, MODES
from fssam.commands.common import add_model_options, at_least, shot_list

PARSER_DEFAULTS = {"config": "small", "iterations": 10, "warmup": 2, "shots": "1,5", "modes": ",".join(DEFAULT_MODES)}
QUICK = {"config": "tiny", "iterations": 3, "warmup": 1, "shots": "1", "modes": "eager_fp32,eager_bf16,onnxruntime"}


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="latency/throughput of eager, compiled and exported modes on the same inputs")
    add_model_options(bench)
    bench.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="where eager, eager_bf16 and compile run (auto: cuda when available)")
    bench.add_argument("--artifacts", help="an export folder to reuse (its config and shots, and --num-refine, "
                       "--refine-version, --scma-mode when given, must match)")
    bench.add_argument("--url", help="triton mode: a running fssam server (host:port of fssam serve's front, or of "
                       "a tritonserver with --protocol grpc); default: start one")
    bench.add_argument("--protocol", default="http", choices=("http", "grpc"),
                       help="with --url: http (default: the front of fssam serve) or grpc (a tritonserver itself)")
    bench.add_argument("--modes", default=PARSER_DEFAULTS["modes"],
                       help=f"comma list of {', '.join(MODES)} (eager_fp32 and eager_bf16, the baselines, always run; "
                            f"default: {', '.join(DEFAULT_MODES)}). {', '.join(GRAPH_MODES)}: the two deployable graphs "
                            "of the export's graph plan (`fssam export --plan`; the bench's own export makes one): "
                            "the graphs it chose, its ONNX Runtime int8 graphs (dynamic; static QDQ), its OpenVINO int8 "
                            "graphs; an int8 mode is "
                            "skipped, with the reason, where the plan kept no such int8 graph (failed its gate, or "
                            "not gated: slower than a candidate that passed)")
    bench.add_argument("--calibration", metavar="DIR",
                       help=f"{', '.join(INT8_MODES)}: calibration images for the int8 quantization of the export "
                            "the bench makes (default: a synthetic set)")
    bench.add_argument("--threads", type=at_least(1), metavar="N",
                       help="threads of the ONNX Runtime and OpenVINO modes (default: the runtime's own)")
    bench.add_argument("--shots", type=shot_list, default=PARSER_DEFAULTS["shots"], help="comma list, e.g. 1,5")
    bench.add_argument("--iterations", type=at_least(1), default=PARSER_DEFAULTS["iterations"], help="timed runs per mode")
    bench.add_argument("--warmup", type=at_least(0), default=PARSER_DEFAULTS["warmup"])
    bench.add_argument("--quick", action="store_true", help="tiny config, 3 runs: checks the pipeline, not the timings")
    bench.add_argument("--out", required=True, help="results folder (JSON, markdown, PNG plots)")
    bench.add_argument("--no-progress", action="store_true")
    bench.set_defaults(func=handle, config=PARSER_DEFAULTS["config"])


def handle(args) -> int:
    from fssam.bench.report import markdown
    from fssam.bench.run import run_bench

    if args.quick:
        parse = {"shots": shot_list}  # argparse parsed these defaults too
        for key, value in QUICK.items():
            convert = parse.get(key, lambda text: text)
            if getattr(args, key) == convert(PARSER_DEFAULTS[key]):
                setattr(args, key, convert(value))
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.shot_list = list(args.shots)
    result = run_bench(args)
    print(markdown(result))
    print(f"wrote {result['files']['json']}, {result['files']['markdown']} and {len(result['files']['plots'])} plots")
    if result.get("failed_checks"):
        from fssam.errors import FSSAMError

        raise FSSAMError(f"{', '.join(result['failed_checks'])} failed the output check against eager fp32 on the "
                         f"bench episode (the timings are written, marked so)")
    return 0
