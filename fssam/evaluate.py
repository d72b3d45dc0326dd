"""`fssam eval`: few-shot mIoU / FB-IoU on PASCAL-5i or COCO-20i through any backend.

The episodes are the official test's (fssam.data.sample_episodes: same lists, seed 321, the
DataLoader's 32-worker draws replayed), so every backend sees the same episodes in the same
order and their figures compare one to one. Per episode, as the official test:
query and supports resized to S x S (image bilinear as float32, label nearest), support masks
0/1/255 (255 = ignore, background for the model), logits resized back to the original label
size (bilinear, align_corners=True), sigmoid >= 0.5, IoU over pixels not labelled 255.

Mask agreement between backends: every result JSON lists, per episode, a hash and the
foreground count of the predicted mask; `--save-masks DIR` also writes the masks themselves
(packed bits, compressed npz). `--compare-with OTHER.json` checks that OTHER ran the same
episodes and reports per-episode mask IoU (when OTHER saved its masks) or identical-mask
fraction (from the hashes otherwise).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
import time

import numpy as np

from fssam.errors import ConfigError, DataError, InputError

FORMAT = "fssam-eval/1"
BACKENDS = ("eager", "onnx", "openvino", "tensorrt", "triton")
EAGER_PRECISIONS = ("fp32", "bf16")  # bf16: the fp32 model under torch.autocast, as the official FSSAM test
AGREEMENT_IOU = 0.999  # an episode "agrees" when the two masks' foreground IoU reaches this

PASCAL_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip  (label value c is the c-th COCO category, 1-based)


def class_name(dataset: str, class_id: int) -> str:
    names = PASCAL_CLASSES if dataset == "pascal" else COCO_CLASSES
    return names[class_id - 1] if 1 <= class_id <= len(names) else str(class_id)


# ---------------------------------------------------------------- command line


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `eval` sub-command to an argparse sub-parsers object."""
    from fssam.data.episodes import EPISODES, VAL_SEED, WORKERS

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
    data.add_argument("--seed", type=int, default=VAL_SEED, help=f"episode seed (official: {VAL_SEED})")
    data.add_argument("--workers", type=int, default=WORKERS,
                      help=f"DataLoader workers whose draws are replayed (official configs: {WORKERS}); "
                      "it changes which episodes are drawn, not the speed")
    data.add_argument("--use-split-coco", action="store_true",
                      help="COCO-20i class split of the official COCO configs (every 4th class); "
                      "needs lists generated with it")
    model = p.add_argument_group("backend")
    model.add_argument("--backend", default="eager", choices=BACKENDS)
    model.add_argument("--config", default=None,
                       help="tiny | small | base_plus | large; default small (eager, triton) or the "
                       "artifacts' config (onnx, tensorrt), which must match when given")
    model.add_argument("--checkpoint", action="append",
                       help="eager: official FSSAM training file, or SAM 2 and DINOv2 files (repeat); without "
                       "it the model is a seeded random init and the result says so. onnx/tensorrt: checked "
                       "against the checkpoints recorded in the artifacts' manifest")
    model.add_argument("--init-seed", type=int, default=0, help="eager: seed of the random init")
    model.add_argument("--num-refine", type=int, default=None, help="eager: IMR rounds (config default: 3)")
    model.add_argument("--refine-version", default=None, help="eager: v1 (official default) or v2")
    model.add_argument("--scma-mode", default=None,
                       help="eager: official (default; the released 5-shot FSSAM5s code) or paper (every shot "
                       "calibrates; identical at 1 shot); exports carry the settings they were exported with")
    model.add_argument("--artifacts", help="onnx / openvino / tensorrt: folder written by `fssam export`")
    model.add_argument("--precision", default=None,
                       help="eager: fp32 (default) | bf16 (the fp32 model under torch.autocast bf16, as the "
                       "official test); onnx / openvino / tensorrt: the runtime's precision (default: the export's); "
                       "openvino: fp32 | bf16 | int8 (int8 needs `fssam export --openvino int8`); not for triton")
    model.add_argument("--url", help="triton: server address, e.g. localhost:8000")
    model.add_argument("--protocol", default="http", choices=("http", "grpc"), help="triton protocol")
    model.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="eager / onnx: where to run (auto: cuda when available)")
    out = p.add_argument_group("output")
    out.add_argument("--out", default=None,
                     help="result JSON (default: eval_<dataset>_fold<F>_<K>shot_<backend>.json here)")
    out.add_argument("--save-masks", metavar="DIR",
                     help="also write every predicted mask (packed bits, npz) to DIR, for mask agreement")
    out.add_argument("--compare-with", metavar="JSON",
                     help="result JSON of another run on the same episodes: report mask agreement with it")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args) -> int:
    from fssam.data import load_fold, sample_episodes

    _check_args(args)
    other = load_result(args.compare_with) if args.compare_with else None  # fail before the long work
    list_root = args.list_root if args.list_root is not None else os.path.join("lists", args.dataset)
    fold = load_fold(args.dataset, args.root, list_root, args.fold, mode="val", use_split_coco=args.use_split_coco,
                     official_root=args.list_prefix)
    specs = sample_episodes(fold, shot=args.shots, episodes=args.episodes, seed=args.seed, workers=args.workers)
    backend = make_backend(args)
    print(backend.weights, file=sys.stderr)
    result, masks = run_eval(backend, specs, fold.classes, fold.root, args.dataset, progress=not args.no_progress)
    result.update(
        dataset=args.dataset, fold=args.fold, shots=args.shots, seed=args.seed, workers=args.workers,
        use_split_coco=args.use_split_coco, root=os.path.abspath(args.root), list_root=os.path.abspath(list_root),
    )
    result = {"format": FORMAT, **_header(args), **result}
    out = args.out or f"eval_{args.dataset}_fold{args.fold}_{args.shots}shot_{args.backend}.json"
    if args.save_masks:
        result["masks_file"] = save_masks(args.save_masks, _stem(out), masks, result)
    if other is not None:
        result["agreement"] = compare(result, masks, other, args.compare_with)
    write_json(out, result)
    print(format_table(result))
    if "agreement" in result:
        print(format_agreement(result["agreement"]))
    print(f"wrote {out}" + (f" and {result['masks_file']}" if args.save_masks else ""))
    if backend.random_init:
        print("note: random-init weights: these figures are not a trained model's", file=sys.stderr)
    return 0


def _check_args(args) -> None:
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
    overrides = [flag for flag, value in (("--num-refine", args.num_refine), ("--refine-version", args.refine_version),
                                          ("--scma-mode", args.scma_mode)) if value is not None]
    if overrides and args.backend != "eager":
        raise ConfigError(f"{', '.join(overrides)}: eager only (exports carry the settings they were exported with)")
    if args.save_masks and not os.path.isdir(args.save_masks):
        raise ConfigError(f"--save-masks folder not found: {args.save_masks}")
    out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else os.getcwd()
    if not os.path.isdir(out_dir):
        raise ConfigError(f"--out folder not found: {out_dir}")


def _header(args) -> dict:
    import fssam

    return {
        "fssam_version": fssam.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------- backends


class Backend:
    """A callable (query, supports, masks) -> logits (1, 1, S, S) on the CPU, plus what it is."""

    def __init__(self, name, run, image_size, config, weights, random_init, extra=None):
        self.name = name
        self.run = run
        self.image_size = image_size
        self.config = config  # the config dict (or {"name": ...} when only the name is known)
        self.weights = weights  # one line, as describe_weights
        self.random_init = random_init  # True, False, or None (unknown: remote server)
        self.extra = extra or {}

    def __call__(self, query, supports, masks):
        return self.run(query, supports, masks)


def make_backend(args) -> Backend:
    return _eager(args) if args.backend == "eager" else _triton(args) if args.backend == "triton" else _runtime(args)


def _device(args) -> str:
    from fssam.device import resolve_device

    return resolve_device(args.device).type


def check_eager_precision(precision: str | None) -> str:
    """The eager precision (None: fp32); anything but fp32 | bf16 is a one-line ConfigError."""
    precision = "fp32" if precision is None else precision
    if precision not in EAGER_PRECISIONS:
        raise ConfigError(f"--precision {precision!r} for eager PyTorch: expected one of {', '.join(EAGER_PRECISIONS)}")
    return precision


def eager_forward(model, query, supports, masks, device: str, precision: str):
    """model(query, supports, masks) on `device`, under torch.autocast bf16 for precision bf16 (the model
    stays fp32, as the official FSSAM test); logits are float32 on the CPU."""
    import contextlib

    import torch

    autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        logits = model(query.to(device), supports.to(device), masks.to(device))
    return logits.float().cpu()


def _eager(args) -> Backend:
    from fssam.model import build, describe_weights

    precision = check_eager_precision(args.precision)
    device = _device(args)
    model = build(args.config or "small", checkpoint=args.checkpoint, seed=args.init_seed, num_refine=args.num_refine,
                  refine_version=args.refine_version, scma_mode=args.scma_mode).to(device)

    def run(query, supports, masks):
        return eager_forward(model, query, supports, masks, device, precision)

    return Backend("eager", run, model.config.image_size, model.config.to_dict(), describe_weights(model),
                   model.random_init_seed is not None, {"device": device, "precision": precision})


def _check_manifest(args, manifest: dict, folder: str) -> tuple[str, bool]:
    """Config, shots and checkpoints of an export folder against the request; (weights line, random?)."""
    from fssam.model.checkpoint import file_sha256

    name = manifest["config"].get("name")
    if args.config and args.config != name:
        raise ConfigError(f"the artifacts in {folder} are config {name!r} but --config {args.config} was asked for: "
                          f"export {args.config} or drop --config")
    if manifest["shots"] != args.shots:
        raise ConfigError(f"the artifacts in {folder} are exported for {manifest['shots']}-shot episodes but "
                          f"--shots {args.shots} was asked for: export with --shots {args.shots}")
    weights = manifest["weights"]
    recorded = {entry["sha256"] for entry in weights.get("checkpoints", [])}
    for path in args.checkpoint or []:
        if not os.path.isfile(path):
            raise ConfigError(f"checkpoint not found: {path}")
        if file_sha256(path) not in recorded:
            raise ConfigError(f"--checkpoint {path} is not among the weights of the artifacts in {folder} "
                              f"({weights['source']}); export again with it")
    random_init = weights["source"].startswith("random")
    if "note" in weights:
        line = weights["note"]
    else:
        line = "weights: " + ", ".join(
            f"{e['format']} checkpoint {e.get('file', '?')} (sha256 {e['sha256'][:12]})" for e in weights["checkpoints"]
        )
    if random_init and "RANDOM" not in line.upper():
        line = f"RANDOM-INIT export ({weights['source']}): outputs are not meaningful"
    return f"{line} [{args.backend} artifacts {folder}, {manifest['precision']}]", random_init


RUNTIMES = {"onnx": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}  # backend -> fssam.runtime


def _runtime(args) -> Backend:
    """An export folder on one of fssam.runtime's runners (ONNX Runtime, OpenVINO, TensorRT)."""
    from fssam.runtime import as_torch, load_manifest, open_runner

    runtime = RUNTIMES[args.backend]
    options = {}
    if runtime == "onnxruntime" and _device(args) == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            if args.device == "cuda":
                raise ConfigError(
                    "--device cuda: this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
                )
        else:
            options["providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    manifest = load_manifest(args.artifacts)
    weights, random_init = _check_manifest(args, manifest, args.artifacts)
    stages = as_torch(open_runner(runtime, args.artifacts, precision=args.precision, verify=False, **options))

    def run(query, supports, masks):
        return stages(query, supports, masks).float()

    return Backend(args.backend, run, manifest["config"]["image_size"], manifest["config"], weights, random_init,
                   {"artifacts": os.path.abspath(args.artifacts), "precision": stages.precision,
                    "runtime": stages.describe(), **options})


def _triton(args) -> Backend:
    import torch

    from fssam.model import get_config

    try:
        from fssam.serving.client import predict_remote
    except ImportError as error:
        raise ConfigError(f"--backend triton needs fssam.serving.client.predict_remote, which cannot be imported "
                          f"here ({error}); it needs the fssam serving client and its extra: "
                          f"pip install 'fssam-deploy[serving]'") from None
    cfg = get_config(args.config or "small")
    size = cfg.image_size

    def run(query, supports, masks):
        logits = torch.as_tensor(np.asarray(predict_remote(args.url, query, supports, masks, args.protocol)))
        if tuple(logits.shape) != (1, 1, size, size):
            raise InputError(f"the Triton server at {args.url} returned logits of shape {tuple(logits.shape)}, "
                             f"expected (1, 1, {size}, {size}) for config {cfg.name}: is it serving {cfg.name}?")
        return logits.float()

    weights = (f"remote Triton model at {args.url} ({args.protocol}): weights as deployed on the server, not checked "
               f"by eval (a random-init export stays random-init)")
    return Backend("triton", run, size, {"name": cfg.name, "image_size": size}, weights, None,
                   {"url": args.url, "protocol": args.protocol})


# ---------------------------------------------------------------- the loop


def episode_tensors(episode, size: int):
    """query (1, 3, S, S), supports (1, K, 3, S, S), masks (1, K, S, S) 0/1/255, as the official val transform."""
    import torch

    from fssam.data import resize_pair

    query, _ = resize_pair(episode.query_image, episode.query_label, size)
    pairs = [resize_pair(image, label, size) for image, label in zip(episode.support_images, episode.support_labels)]
    supports = np.stack([image for image, _ in pairs]).transpose(0, 3, 1, 2)  # (K, 3, S, S) float32
    masks = np.stack([label for _, label in pairs]).astype(np.float32)  # (K, S, S)
    return (
        torch.from_numpy(np.ascontiguousarray(query.transpose(2, 0, 1)))[None],
        torch.from_numpy(np.ascontiguousarray(supports))[None],
        torch.from_numpy(masks)[None],
    )


def episodes_fingerprint(specs, root: str) -> str:
    """sha256 of the episode list (paths relative to the data root, so other machines match)."""
    rows = [[s.index, _rel(s.query[0], root), s.class_id, [_rel(p[0], root) for p in s.supports]] for s in specs]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _rel(path: str, root: str) -> str:
    return os.path.relpath(path, root)


def mask_digest(mask: np.ndarray) -> str:
    h = hashlib.sha256(f"{mask.shape[0]}x{mask.shape[1]}:".encode())
    h.update(np.packbits(mask.reshape(-1).astype(bool)).tobytes())
    return h.hexdigest()[:16]


def run_eval(backend: Backend, specs, classes, root: str, dataset: str, progress: bool = True) -> tuple[dict, list]:
    """Run every episode; (result dict, list of (H, W) uint8 0/1 predicted masks in episode order)."""
    from tqdm import tqdm

    from fssam.data import IoUAccumulator, load_episode
    from fssam.data.preprocess import logits_to_mask

    size = backend.image_size
    meter = IoUAccumulator(classes)
    records, masks = [], []
    model_seconds = 0.0
    start = time.perf_counter()
    bar = tqdm(specs, desc=f"eval {backend.name}", unit="episode", disable=not progress, file=sys.stderr)
    for spec in bar:
        episode = load_episode(spec)
        query, supports, support_masks = episode_tensors(episode, size)
        tick = time.perf_counter()
        logits = backend(query, supports, support_masks)
        model_seconds += time.perf_counter() - tick
        if tuple(logits.shape) != (1, 1, size, size):
            raise InputError(f"backend {backend.name} returned logits of shape {tuple(logits.shape)}, "
                             f"expected (1, 1, {size}, {size})")
        label = episode.ori_label
        mask = logits_to_mask(logits, *label.shape)  # (H, W) uint8 0/1
        intersection, union = meter.update(mask, label, spec.class_id)
        masks.append(mask)
        records.append({
            "index": spec.index,
            "class": spec.class_id,
            "query": _rel(spec.query[0], root),
            "supports": [_rel(pair[0], root) for pair in spec.supports],
            "size": list(label.shape),
            "foreground": int(mask.sum()),
            "mask_sha256": mask_digest(mask),
            "intersection": [int(v) for v in intersection],
            "union": [int(v) for v in union],
        })
        if progress and len(records) % 10 == 0:
            bar.set_postfix_str(f"mIoU {meter.result()['miou']:.4f}")
    bar.close()
    elapsed = time.perf_counter() - start
    metrics = meter.result()
    result = {
        "backend": backend.name,
        "backend_details": backend.extra,
        "config": backend.config,
        "weights": backend.weights,
        "random_init": backend.random_init,
        "episodes": len(specs),
        "episodes_sha256": episodes_fingerprint(specs, root),
        "miou": metrics["miou"],
        "fbiou": metrics["fbiou"],
        "piou": metrics["piou"],
        "classes": {
            str(c): {"name": class_name(dataset, c), "iou": metrics["class_iou"][c],
                     "episodes": metrics["class_episodes"][c]}
            for c in classes
        },
        "seconds": {"total": round(elapsed, 3), "model": round(model_seconds, 3),
                    "model_per_episode": round(model_seconds / max(len(specs), 1), 5)},
        "per_episode": records,
    }
    return result, masks


# ---------------------------------------------------------------- masks and agreement


def save_masks(folder: str, stem: str, masks: list, result: dict) -> str:
    """Write the masks as one compressed npz of packed bits; returns its absolute path."""
    packed = [np.packbits(m.reshape(-1).astype(bool)) for m in masks]
    offsets = np.cumsum([0] + [p.size for p in packed]).astype(np.int64)
    path = os.path.abspath(os.path.join(folder, f"{stem}_masks.npz"))
    tmp = path + ".tmp.npz"
    np.savez_compressed(
        tmp,
        bits=np.concatenate(packed) if packed else np.zeros(0, np.uint8),
        offsets=offsets,
        shapes=np.array([m.shape for m in masks], np.int64).reshape(-1, 2),
        indices=np.array([r["index"] for r in result["per_episode"]], np.int64),
        episodes_sha256=np.array(result["episodes_sha256"]),
    )
    os.replace(tmp, path)
    return path


def load_masks(path: str) -> tuple[list, str]:
    """(masks, episodes fingerprint) from a file written by save_masks."""
    if not os.path.isfile(path):
        raise DataError(f"mask file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            bits, offsets, shapes = data["bits"], data["offsets"], data["shapes"]
            fingerprint = str(data["episodes_sha256"])
    except (OSError, KeyError, ValueError) as error:
        raise DataError(f"{path} is not an fssam eval mask file: {error}") from None
    masks = []
    for n, (h, w) in enumerate(shapes):
        flat = np.unpackbits(bits[offsets[n] : offsets[n + 1]], count=int(h * w))
        masks.append(flat.reshape(int(h), int(w)))
    return masks, fingerprint


def load_result(path: str) -> dict:
    from fssam.files import read_json

    try:
        return read_json(path, FORMAT)
    except ValueError as reason:
        raise DataError(f"--compare-with {path}: {reason} (an fssam eval --out result is expected)") from None


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Foreground IoU of two 0/1 masks; two empty masks agree fully (1.0)."""
    union = int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else int(np.logical_and(a, b).sum()) / union


def compare(result: dict, masks: list, other: dict, other_path: str) -> dict:
    """Agreement of this run's masks with another run on the same episodes."""
    keys = ("dataset", "fold", "shots", "seed", "workers", "episodes", "use_split_coco")
    if other.get("episodes_sha256") != result["episodes_sha256"]:
        differing = [f"{k} {other.get(k)!r} vs {result.get(k)!r}" for k in keys if other.get(k) != result.get(k)]
        raise DataError(f"{other_path} ran other episodes than this run "
                        f"({'; '.join(differing) or 'same settings, other lists or data'}): masks cannot be compared")
    mine, theirs = result["per_episode"], other["per_episode"]
    identical = [a["mask_sha256"] == b["mask_sha256"] for a, b in zip(mine, theirs)]
    agreement = {
        "other": os.path.abspath(other_path),
        "other_backend": other.get("backend"),
        "episodes": len(mine),
        "identical_masks": sum(identical),
        "identical_fraction": sum(identical) / max(len(mine), 1),
        "foreground_pixels_differ_max": max((abs(a["foreground"] - b["foreground"]) for a, b in zip(mine, theirs)),
                                            default=0),
        "miou_delta": result["miou"] - other["miou"],
        "fbiou_delta": result["fbiou"] - other["fbiou"],
        "class_iou_delta_max": max(abs(result["classes"][c]["iou"] - other["classes"][c]["iou"])
                                   for c in result["classes"]),
        "mask_iou": None,
    }
    masks_file = other.get("masks_file")
    if masks_file and os.path.isfile(masks_file):
        theirs_masks, fingerprint = load_masks(masks_file)
        if fingerprint != result["episodes_sha256"] or len(theirs_masks) != len(masks):
            raise DataError(f"{masks_file} holds masks of other episodes than {other_path} says")
        ious = np.array([mask_iou(a, b) for a, b in zip(masks, theirs_masks)])
        pixels = np.array([float((a == b).mean()) for a, b in zip(masks, theirs_masks)])
        worst = np.argsort(ious, kind="stable")[:5]
        agreement["mask_iou"] = {
            "mean": float(ious.mean()),
            "min": float(ious.min()),
            "fraction_at_least": {str(AGREEMENT_IOU): float((ious >= AGREEMENT_IOU).mean())},
            "pixel_agreement_mean": float(pixels.mean()),
            "worst": [{"index": int(mine[i]["index"]), "iou": float(ious[i])} for i in worst],
            "per_episode": [round(float(v), 6) for v in ious],
        }
    else:
        agreement["note"] = (f"{other_path} has no saved masks (run it with --save-masks DIR): agreement is from "
                             "mask hashes and foreground counts only")
    return agreement


# ---------------------------------------------------------------- output


def format_table(result: dict) -> str:
    rows = [f"{'class':>5}  {'name':<14} {'episodes':>8}  {'IoU %':>7}"]
    for c, entry in result["classes"].items():
        rows.append(f"{c:>5}  {entry['name']:<14} {entry['episodes']:>8}  {100 * entry['iou']:>7.2f}")
    rows.append(
        f"mIoU {100 * result['miou']:.2f}  FB-IoU {100 * result['fbiou']:.2f}  ({result['episodes']} episodes, "
        f"{result['dataset']} fold {result['fold']}, {result['shots']}-shot, backend {result['backend']}, "
        f"config {result['config'].get('name')}, {result['seconds']['model_per_episode'] * 1000:.1f} ms/episode)"
    )
    rows.append(result["weights"])
    return "\n".join(rows)


def format_agreement(agreement: dict) -> str:
    line = (f"agreement with {agreement['other_backend']} ({agreement['other']}): "
            f"{agreement['identical_masks']}/{agreement['episodes']} identical masks "
            f"({100 * agreement['identical_fraction']:.1f}%)")
    if agreement["mask_iou"]:
        iou = agreement["mask_iou"]
        line += (f", mask IoU mean {iou['mean']:.5f} min {iou['min']:.5f}, "
                 f"{100 * iou['fraction_at_least'][str(AGREEMENT_IOU)]:.1f}% of episodes >= {AGREEMENT_IOU}")
    else:
        line += f"; {agreement['note']}"
    return line + f"; mIoU delta {100 * agreement['miou_delta']:+.3f} points"


def write_json(path: str, result: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(result, handle, indent=1)
        handle.write("\n")
    os.replace(tmp, path)


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


# ---------------------------------------------------------------- stand-alone entry


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fssam", description="fssam eval (stand-alone entry)")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv=None) -> int:
    """`python -m fssam.evaluate eval ...`: the same command as `fssam eval`, one error line on failure."""
    from fssam.cli import run

    return run(make_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
