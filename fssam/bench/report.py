"""Benchmark output: machine record, JSON, markdown table with ratios to eager fp32, PNG plots."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata

import torch

from fssam.runtime.contract import STAGE_ORDER

PACKAGES = ("torch", "onnxruntime", "onnx", "sam2", "timm", "triton", "tritonclient", "nvidia-pytriton", "tensorrt")


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "", False
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
        "git_commit": commit + ("-dirty" if dirty else ""),
    }


def markdown(result: dict) -> str:
    lines = []
    for shots, runs in result["runs"].items():
        base = runs["modes"].get("eager_fp32")
        lines.append(f"### {result['config']}, {shots}-shot, batch 1 ({result['iterations']} runs after {result['warmup']} warm-up, interleaved)\n")
        gpu = any("gpu_peak_mb" in mode for mode in runs["modes"].values())
        lines.append("| mode | episode median ms | p90 | p99 | speed-up vs eager fp32 | cached-support query ms | speed-up vs eager episode | peak RSS MB | working MB |"
                     + (" GPU peak MB |" if gpu else ""))
        lines.append("|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""))
        for name, mode in runs["modes"].items():
            episode, cached = mode["episode"], mode["cached_support"]
            ratio = base["episode"]["median_ms"] / episode["median_ms"] if base else float("nan")
            cached_ratio = base["episode"]["median_ms"] / cached["median_ms"] if base else float("nan")
            lines.append(
                f"| {name} | {episode['median_ms']:.1f} | {episode['p90_ms']:.1f} | {episode['p99_ms']:.1f} | {ratio:.2f}x | "
                f"{cached['median_ms']:.1f} | {cached_ratio:.2f}x | {mode['peak_rss_mb']:.0f} | {mode['working_mb']:.0f} |"
                + (f" {mode['gpu_peak_mb']:.0f} |" if "gpu_peak_mb" in mode else "")
            )
        staged = [name for name, mode in runs["modes"].items() if mode["stages"]]
        if staged:
            lines.append("\nPer stage, median ms per episode (all calls of the stage summed):\n")
            lines.append("| stage | " + " | ".join(staged) + " |")
            lines.append("|---|" + "---|" * len(staged))
            for stage in STAGE_ORDER:
                cells = [f"{runs['modes'][name]['stages'][stage]['median_ms']:.1f}" for name in staged]
                lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        if runs.get("concurrency"):
            lines.append("\nServer, client-measured, concurrency sweep:\n")
            lines.append("| concurrency | requests | failures | median ms | throughput episodes/s |")
            lines.append("|---|---|---|---|---|")
            for row in runs["concurrency"]:
                lines.append(f"| {row['concurrency']} | {row['requests']} | {row['failures']} | {row['median_ms']:.1f} | {row['throughput']:.2f} |")
        lines.append("")
    m = result["machine"]
    lines.append(f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}; torch {m['packages'].get('torch')}, "
                 f"onnxruntime {m['packages'].get('onnxruntime')}; commit {m['git_commit']}. Weights: {result['weights']}.")
    return "\n".join(lines) + "\n"


def plots(result: dict, folder: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for shots, runs in result["runs"].items():
        staged = [name for name, mode in runs["modes"].items() if mode["stages"]]
        fig, ax = plt.subplots(figsize=(10, 4.5))
        width = 0.8 / max(1, len(staged))
        for i, name in enumerate(staged):
            values = [runs["modes"][name]["stages"][stage]["median_ms"] for stage in STAGE_ORDER]
            ax.bar([x + i * width for x in range(len(STAGE_ORDER))], values, width, label=name)
        ax.set_xticks([x + width * (len(staged) - 1) / 2 for x in range(len(STAGE_ORDER))], STAGE_ORDER, rotation=15)
        ax.set_ylabel("median ms per episode")
        ax.set_yscale("log")
        ax.set_title(f"FSSAM {result['config']} {shots}-shot: latency per stage ({result['machine']['cpu']})")
        ax.legend()
        written.append(_save(fig, os.path.join(folder, f"latency_stages_{shots}shot.png")))

        fig, ax = plt.subplots(figsize=(8, 4.5))
        if runs.get("concurrency"):
            rows = runs["concurrency"]
            ax.plot([r["concurrency"] for r in rows], [r["throughput"] for r in rows], marker="o", label="server")
            ax.set_xlabel("concurrent clients")
            ax.set_title(f"Server throughput vs concurrency ({shots}-shot)")
        else:
            names = list(runs["modes"])
            full = [1000 / runs["modes"][n]["episode"]["median_ms"] for n in names]
            cached = [1000 / runs["modes"][n]["cached_support"]["median_ms"] for n in names]
            xs = range(len(names))
            ax.bar([x - 0.2 for x in xs], full, 0.4, label="full episode")
            ax.bar([x + 0.2 for x in xs], cached, 0.4, label="query with cached support")
            ax.set_xticks(list(xs), names)
            ax.set_title(f"Throughput at batch 1 ({shots}-shot)")
        ax.set_ylabel("episodes / s")
        ax.legend()
        written.append(_save(fig, os.path.join(folder, f"throughput_{shots}shot.png")))
    return written


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(result: dict, folder: str) -> dict:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    with open(os.path.join(folder, "results.md"), "w") as handle:
        handle.write(markdown(result))
    return {"json": os.path.join(folder, "results.json"), "markdown": os.path.join(folder, "results.md"), "plots": plots(result, folder)}
