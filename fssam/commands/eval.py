"""`fssam eval`: few-shot mIoU / FB-IoU on PASCAL-5i or COCO-20i (official episodes) through any
backend; the evaluation itself is fssam.eval."""

from __future__ import annotations

import argparse
import os
import sys

from fssam.commands.common import add_model_options, install_sigterm, model_options, seed_type
from fssam.errors import ConfigError


def register(subparsers) -> None:
    from fssam.data.episodes import EPISODES, VAL_SEED, WORKERS
    from fssam.eval import BACKENDS

    p = subparsers.add_parser(
        "eval",
        help="few-shot mIoU / FB-IoU on PASCAL-5i or COCO-20i (official episodes) through any backend",
        description="Evaluate FSSAM on the official few-shot episodes of one fold; every backend gets the "
        "same episodes, so their results (and masks, with --compare-with) compare one to one.",
    )
    data = p.add_argument_group("data")
    data.add_argument("--dataset", required=True, choices=("pascal", "coco"))
    data.add_argument("--root", required=True,
                      help="data root: the folder holding JPEGImages/ and SegmentationClassAug/ (PASCAL) or "
                      "train2014/, val2014/, annotations/ (COCO); the official configs' data_root")
    data.add_argument("--list-root", default=None,
                      help="folder holding fss_list/val/ (the official lists/<dataset>); default: lists/<dataset> "
                      "under the current folder, as in the official repository")
    data.add_argument("--list-prefix", default=None,
                      help="path prefix the lists use for the data root (default: the official "
                      "../data/VOCdevkit2012/VOC2012 or ../data/MSCOCO2014); '' for paths relative to --root")
    data.add_argument("--fold", type=int, default=0, help="the official split, 0..3")
    data.add_argument("--shots", type=int, default=1, help="support images per episode (K)")
    data.add_argument("--episodes", type=int, default=EPISODES, help=f"episodes (official: {EPISODES})")
    data.add_argument("--episode-seed", type=seed_type("a whole number 0 <= seed < 2**63"), default=VAL_SEED,
                      help=f"episode seed, 0 <= seed < 2**63 (official: {VAL_SEED})")
    data.add_argument("--workers", type=int, default=WORKERS,
                      help=f"DataLoader workers whose draws are replayed (official configs: {WORKERS}); "
                      "it changes which episodes are drawn, not the speed")
    data.add_argument("--use-split-coco", action="store_true",
                      help="COCO-20i class split of the official COCO configs (every 4th class); "
                      "needs lists generated with it")
    model = p.add_argument_group(
        "backend",
        "eager builds the model from the model options (--config default small); onnx / openvino / tensorrt "
        "run the export's model: --config, when given, must match the export's and --checkpoint is checked "
        "against the checkpoints its manifest records (--num-refine, --refine-version, --scma-mode: eager only, "
        "exports carry the settings they were exported with); triton: --config names the served config "
        "(default small)",
    )
    model.add_argument("--backend", default="eager", choices=BACKENDS)
    add_model_options(model)
    model.add_argument("--init-seed", type=int, dest="seed", action=_RenamedSeed, default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)
    model.add_argument("--artifacts", help="onnx / openvino / tensorrt: folder written by `fssam export`")
    model.add_argument("--precision", default=None,
                       help="eager: fp32 (default) | bf16 (the fp32 model under torch.autocast bf16, as the "
                       "official test); onnx / openvino / tensorrt: the runtime's precision (default: the export's); "
                       "openvino: fp32 | bf16 | int8 (bf16 / int8 need their gated plans: `fssam export --openvino bf16,int8`); "
                       "not for triton")
    model.add_argument("--url", help="triton: server address, e.g. localhost:8000")
    model.add_argument("--protocol", default="http", choices=("http", "grpc"), help="triton protocol")
    model.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"),
                       help="eager / onnx: where to run (default auto: cuda when available); not for triton")
    out = p.add_argument_group("output")
    out.add_argument("--out", default=None,
                     help="result JSON (default: eval_<dataset>_fold<F>_<K>shot_<backend>.json here)")
    out.add_argument("--save-masks", metavar="DIR",
                     help="also write every predicted mask (packed bits, npz) to DIR, for mask agreement")
    out.add_argument("--compare-with", metavar="JSON",
                     help="result JSON of another run on the same episodes: report mask agreement with it")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=handle, config=None)  # config: small (eager, triton) or the artifacts' (onnx, ...)


class _RenamedSeed(argparse.Action):
    """--init-seed, the old name of --seed (the random-init seed) in eval: still read, with a note."""

    def __call__(self, parser, namespace, values, option_string=None):
        print("fssam eval: note: --init-seed is now --seed (and the episode seed is --episode-seed)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _out_path(args) -> str:
    return args.out or f"eval_{args.dataset}_fold{args.fold}_{args.shots}shot_{args.backend}.json"


def handle(args) -> int:
    from fssam.data import load_fold, sample_episodes
    from fssam.eval import compare, load_result, make_backend, run_eval, save_masks, write_json
    from fssam.eval.agreement import format_agreement
    from fssam.eval.results import format_table, header, unmeasured_note

    _check_args(args)
    install_sigterm()  # SIGTERM as Ctrl-C: the result's and the masks' temporary files are removed
    other = load_result(args.compare_with) if args.compare_with else None  # fail before the long work
    list_root = args.list_root if args.list_root is not None else os.path.join("lists", args.dataset)
    fold = load_fold(args.dataset, args.root, list_root, args.fold, mode="val", use_split_coco=args.use_split_coco,
                     official_root=args.list_prefix)
    specs = sample_episodes(fold, shot=args.shots, episodes=args.episodes, seed=args.episode_seed,
                            workers=args.workers)
    backend = make_backend(args.backend, config=args.config, shots=args.shots, artifacts=args.artifacts, url=args.url,
                           protocol=args.protocol, precision=args.precision, device=args.device or "auto",
                           **model_options(args))
    print(backend.weights, file=sys.stderr)
    result, masks = run_eval(backend, specs, fold.classes, fold.root, args.dataset, progress=not args.no_progress)
    result.update(
        dataset=args.dataset, fold=args.fold, shots=args.shots, seed=args.episode_seed, workers=args.workers,
        use_split_coco=args.use_split_coco, root=os.path.abspath(args.root), list_root=os.path.abspath(list_root),
    )  # "seed": the episode seed (the result format predates --episode-seed)
    result = {**header(), **result}
    out = _out_path(args)
    if other is not None:  # before anything is written: a mismatch fails with no file left
        result["agreement"] = compare(result, masks, other, args.compare_with)
    if args.save_masks:
        result["masks_file"] = save_masks(args.save_masks, _stem(out), masks, result)
    write_json(out, result)
    print(format_table(result))
    note = unmeasured_note(result)
    if note:
        print(note, file=sys.stderr)
    if "agreement" in result:
        print(format_agreement(result["agreement"]))
    print(f"wrote {out}" + (f" and {result['masks_file']}" if args.save_masks else ""))
    if backend.random_init:
        print("note: random-init weights: these figures are not a trained model's", file=sys.stderr)
    return 0


def _check_args(args) -> None:
    from fssam.eval import check_eager_precision
    from fssam.eval.backends import RUNTIMES

    if args.shots < 1 or args.episodes < 1 or args.workers < 0:
        raise ConfigError(f"need --shots >= 1, --episodes >= 1, --workers >= 0; got {args.shots}, "
                          f"{args.episodes}, {args.workers}")
    if args.backend in RUNTIMES and not args.artifacts:
        raise ConfigError(f"--backend {args.backend} needs --artifacts DIR (a folder written by `fssam export`)")
    if args.backend == "triton" and not args.url:
        raise ConfigError("--backend triton needs --url (the Triton server, e.g. localhost:8000)")
    if args.backend not in RUNTIMES and args.artifacts:
        raise ConfigError(f"--artifacts is for the {', '.join(RUNTIMES)} backends, not {args.backend}")
    if args.precision is not None and args.backend not in RUNTIMES:
        if args.backend != "eager":
            raise ConfigError(f"--precision is for the eager, {', '.join(RUNTIMES)} backends, not {args.backend} "
                              f"(the server's model is fixed when it is exported)")
        check_eager_precision(args.precision)
    if args.device is not None and args.backend == "triton":
        raise ConfigError(f"--device is for the eager, {', '.join(RUNTIMES)} backends, not triton "
                          f"(the server runs where it was started)")
    overrides = [flag for flag, value in (("--num-refine", args.num_refine), ("--refine-version", args.refine_version),
                                          ("--scma-mode", args.scma_mode)) if value is not None]
    if overrides and args.backend != "eager":
        raise ConfigError(f"{', '.join(overrides)}: eager only (exports carry the settings they were exported with)")
    from fssam.eval.results import FORMAT
    from fssam.files import check_output_file, json_with

    check_output_file(_out_path(args), json_with("format", FORMAT), "--out")
    if args.save_masks:
        _check_masks_path(args)


def _check_masks_path(args) -> None:
    """Before the work, as --out: the masks file may be written (its folder exists and is writable,
    and it is new or an npz an earlier --save-masks wrote), so no run ends in a traceback or
    replaces a user's file. ConfigError naming the path otherwise."""
    from fssam.errors import InputError
    from fssam.eval.agreement import is_masks_file, masks_path
    from fssam.files import check_output_file

    if not os.path.isdir(args.save_masks):
        raise ConfigError(f"--save-masks folder not found: {args.save_masks}")
    try:
        check_output_file(masks_path(args.save_masks, _stem(_out_path(args))), is_masks_file, "--save-masks")
    except InputError as error:
        raise ConfigError(str(error)) from None


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]
