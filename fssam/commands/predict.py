"""`fssam predict`: segment a query image given support images and masks, in process (eager
PyTorch) or on a Triton server (--url)."""

from __future__ import annotations

import os
import sys
import time

from fssam.commands.common import add_model_options, install_sigterm, model_options


def register(subparsers) -> None:
    predict = subparsers.add_parser("predict", help="segment a query image given support images and masks")
    add_model_options(predict)
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
    predict.add_argument("--url", help="run on a server (host:port: fssam serve's front, or a tritonserver) instead "
                         "of in-process eager PyTorch; "
                         "the served model is fixed (no --checkpoint, --num-refine, --refine-version, --scma-mode, --seed, "
                         "--precision, --device)")
    predict.add_argument("--protocol", default="http", choices=["http", "grpc"],
                         help="with --url: HTTP (default, port 8000: fssam serve's front) or gRPC (8001: a "
                              "tritonserver itself, e.g. fssam serve --no-front)")
    predict.add_argument("--api-key", default=os.environ.get("FSSAM_API_KEY"),
                         help="with --url: the front's API key (default $FSSAM_API_KEY); an https:// --url speaks TLS")
    predict.add_argument("--cacert", default=None, metavar="PEM",
                         help="with an https:// --url: the CA certificate(s) that the front's certificate is checked "
                              "against (default: the system's CAs), e.g. fssam serve's own self-signed --tls-cert")
    predict.add_argument("--precision", default=None,
                         help="eager: fp32 (default) or bf16 (the fp32 model under torch.autocast bf16, as the "
                         "official test; logits float32)")
    predict.add_argument("--device", default=None,
                         help="eager: auto (default: cuda when available) | cpu | cuda")
    predict.set_defaults(func=handle)


def handle(args) -> int:
    from fssam.data.preprocess import load_episode
    from fssam.device import resolve_device, synchronize
    from fssam.eval import precision as eager
    from fssam.model import build, describe_weights, get_config

    install_sigterm()  # SIGTERM as Ctrl-C: the PNGs' temp files are removed
    _check_outputs(args)
    if args.url:
        return _predict_remote(args)
    if args.cacert:
        from fssam.errors import ConfigError

        raise ConfigError("--cacert checks a server's certificate: it needs an https:// --url")
    args.config = args.config or "small"
    cfg = get_config(args.config)  # fail fast on an unknown config, before reading files
    precision = eager.check_eager_precision(args.precision)
    device = resolve_device(args.device or "auto")
    query, supports, masks, query_rgb = load_episode(args.support, args.support_mask, args.query, cfg.image_size)
    model = build(args.config, **model_options(args)).to(device)
    print(describe_weights(model), file=sys.stderr)
    start = time.perf_counter()
    logits = eager.eager_forward(model, query, supports, masks, device.type, precision)
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
    with RemoteFSSAM(args.url, protocol=args.protocol, api_key=args.api_key, ca_file=args.cacert) as remote:
        size = int(remote.metadata()["inputs"][0]["shape"][-1])  # the served config's image size
        if wanted is not None and wanted != size:
            raise ConfigError(
                f"--config {args.config} is a {wanted} px model but the server at {args.url} serves a {size} px "
                f"one: the server's model is fixed when it is exported; drop --config or serve {args.config}"
            )
        query, supports, masks, query_rgb = load_episode(args.support, args.support_mask, args.query, size)
        before = remote.cache_stats()
        start = time.perf_counter()
        logits = remote.infer(query, supports, masks)
        elapsed = time.perf_counter() - start
        after = remote.cache_stats()
        weights = remote.served_weights()
    # the served weights, as eager predict states its own: random weights are never presented as trained
    print(weights or f"weights: not reported by the server's {remote.model!r} model (not an fssam repository's "
                     "ensemble?): its masks may come from untrained weights", file=sys.stderr)
    # Triton's own counters: a hit means this support set was encoded before (by any client)
    note = "support from the server's response cache" if after["hits"] > before["hits"] else "support encoded"
    _write_prediction(args, torch.as_tensor(logits), query_rgb, f"Triton {args.protocol} {args.url}, {note}", elapsed)
    return 0


def _check_outputs(args) -> None:
    """Before any work: --out and its overlay may be written (new, or PNGs predict wrote: never an
    input or a user's file)."""
    from fssam.data.preprocess import written_by_predict
    from fssam.files import check_output_file

    check_output_file(args.out, written_by_predict, "--out")
    check_output_file(_overlay_path(args.out), written_by_predict, "--out's overlay")


def _overlay_path(out: str) -> str:
    stem, _ = os.path.splitext(out)
    return stem + "_overlay.png"


def _write_prediction(args, logits, query_rgb, where: str, elapsed: float) -> None:
    from fssam.data.preprocess import PNG_SOFTWARE, logits_to_mask, overlay, write_pngs

    mask = logits_to_mask(logits, *query_rgb.shape[:2])
    write_pngs({args.out: mask * 255, _overlay_path(args.out): overlay(query_rgb, mask)}, PNG_SOFTWARE)
    print(
        f"wrote {args.out} (mask, 0/255, {query_rgb.shape[1]}x{query_rgb.shape[0]}, "
        f"foreground {mask.mean():.1%}) and {_overlay_path(args.out)}; "
        f"{len(args.support)}-shot episode in {elapsed:.2f} s ({where})"
    )
