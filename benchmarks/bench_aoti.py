"""AOTInductor packages (`fssam export --aoti`) against eager PyTorch, same inputs, same device, one run.

    python benchmarks/bench_aoti.py --artifacts ART [--precisions fp32,bf16,fp16] [--batches 1,8]
                                    [--runs 20] [--warmup 3] [--out OUT]

For each batch (episodes per call) and each precision the export has packages for (on the device
they were built for): the two deployable graphs through the `torch` runtime (CUDA: replayed from
CUDA graphs), eager fp32 (IEEE, no TF32) and eager bf16 autocast, interleaved run by run; the
median episode time, episodes/s and the speed-up over both baselines. Prints a table and writes
results.json (with the machine: CPU model and flags, GPU name) and aoti.png under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fssam.bench.report import machine  # noqa: E402
from fssam.model import build  # noqa: E402
from fssam.runtime import open_runner  # noqa: E402
from fssam.runtime.manifest import load_manifest  # noqa: E402
from fssam.runtime.parity import ieee_fp32, sample_episode  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--precisions", default=None, help="default: every precision the export has packages for")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/aoti")
    args = parser.parse_args(argv)
    manifest = load_manifest(args.artifacts)
    packages = {p: e for p, e in manifest.get("aoti", {}).items() if e.get("graphs")}
    precisions = args.precisions.split(",") if args.precisions else sorted(packages)
    if not precisions or any(p not in packages for p in precisions):
        sys.exit(f"bench_aoti: {args.artifacts} has gated AOTInductor packages for {sorted(packages) or 'nothing'}; "
                 "export them with `fssam export --aoti P`")
    device = packages[precisions[0]]["device"]
    cfg = manifest["config"]
    model = build(cfg["name"], seed=0, num_refine=cfg["num_refine"], refine_version=cfg["refine_version"],
                  scma_mode=cfg["scma_mode"]).to(device).eval()  # the timing does not depend on the weights
    runners = {p: open_runner("torch", args.artifacts, precision=p) for p in precisions}
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        query, supports, masks = (t.to(device) for t in sample_episode(model.config, int(manifest["shots"]),
                                                                        batch=batch, seed=5))
        pixels = (query.round().to(torch.uint8), supports.round().to(torch.uint8), masks.to(torch.uint8))

        def eager(autocast: bool):
            def call():
                with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                    return model(query, supports, masks)
            return call

        modes = {"eager fp32": eager(False), "eager bf16 autocast": eager(True)}
        for precision, runner in runners.items():
            modes[f"aoti {precision}"] = (lambda r=runner: r.run_graphs(*pixels))
        times = {name: [] for name in modes}
        with ieee_fp32():
            for _ in range(args.warmup):
                for call in modes.values():
                    call()
            for run in range(args.runs):
                names = list(modes)
                for name in names[run % len(names):] + names[:run % len(names)]:  # rotating order
                    _sync(device)
                    start = time.perf_counter()
                    modes[name]()
                    _sync(device)
                    times[name].append(1000 * (time.perf_counter() - start))
        base = {name: statistics.median(times[name]) for name in ("eager fp32", "eager bf16 autocast")}
        for name, values in times.items():
            median = statistics.median(values)
            rows.append({"batch": batch, "mode": name, "ms": median, "episodes_per_s": 1000 * batch / median,
                         "vs_eager_fp32": base["eager fp32"] / median,
                         "vs_eager_bf16": base["eager bf16 autocast"] / median, "runs": len(values)})
    print(f"AOTInductor packages vs eager ({cfg['name']}, {manifest['shots']}-shot, {device}; median of "
          f"{args.runs} runs)")
    print("| batch | mode | ms / call | episodes/s | vs eager fp32 | vs eager bf16 autocast |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['batch']} | {row['mode']} | {row['ms']:.2f} | {row['episodes_per_s']:.1f} | "
              f"{row['vs_eager_fp32']:.2f}x | {row['vs_eager_bf16']:.2f}x |")
    os.makedirs(args.out, exist_ok=True)
    result = {"config": cfg["name"], "shots": manifest["shots"], "device": device,
              "packages": {p: {k: packages[p].get(k) for k in ("device", "torch", "gpu", "cuda")} for p in precisions},
              "rows": rows, "machine": machine()}
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    batches = sorted({row["batch"] for row in rows})
    names = list(dict.fromkeys(row["mode"] for row in rows))
    width = 0.8 / len(names)
    for index, name in enumerate(names):
        values = [next(r["episodes_per_s"] for r in rows if r["batch"] == b and r["mode"] == name) for b in batches]
        axis.bar([i + index * width for i in range(len(batches))], values, width, label=name)
    axis.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(batches))], [f"batch {b}" for b in batches])
    axis.set_ylabel("episodes / s")
    axis.set_title(f"AOTInductor vs eager, {cfg['name']} {manifest['shots']}-shot, {result['machine'].get('gpu') or 'CPU'}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(os.path.join(args.out, "aoti.png"), dpi=120)
    print(f"wrote {args.out}/results.json and aoti.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
