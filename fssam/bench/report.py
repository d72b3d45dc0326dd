"""Benchmark output: machine record (CPU model and flags), ratios to the two eager baselines,
JSON, markdown table and PNG plots."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib import metadata

import torch

from fssam.bench.checks import describe as describe_checks
from fssam.runtime import cpu
from fssam.runtime.contract import GRAPH_ORDER, STAGE_ORDER

PACKAGES = ("torch", "onnxruntime", "onnx", "openvino", "nncf", "sam2", "timm", "triton", "tritonclient",
            "nvidia-pytriton", "tensorrt")
BASELINES = {"vs_eager_fp32": "eager_fp32", "vs_eager_bf16": "eager_bf16"}  # speed-up key: baseline mode
BASELINE_TITLES = {"vs_eager_fp32": "vs eager fp32", "vs_eager_bf16": "vs eager bf16 autocast"}
KINDS = ("episode", "cached_support")


def machine() -> dict:
    info = cpu.cpu_info()
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
        "cpu_model": info["model"],
        "cpu_flags": info["reported"],  # {flag: bool}: amx_bf16, amx_int8, avx512_bf16, avx512_vnni, ...
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
        "git_commit": commit + ("-dirty" if dirty else ""),
    }


def speedups(modes: dict) -> dict:
    """{mode: {"vs_eager_fp32": {"episode": x, "cached_support": y}, "vs_eager_bf16": {...}}}: the
    baseline's median over the mode's, episode to episode and cached-support query to cached-support
    query (None without the baseline)."""
    def ratio(baseline: str, mode: dict, kind: str):
        base = modes.get(baseline)
        return round(base[kind]["median_ms"] / mode[kind]["median_ms"], 4) if base else None

    return {name: {key: {kind: ratio(baseline, mode, kind) for kind in KINDS} for key, baseline in BASELINES.items()}
            for name, mode in modes.items()}


def _times(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _ratio_headers(kind: str) -> list[str]:
    return [f"{kind} {title}" for title in BASELINE_TITLES.values()]


def _main_table(runs: dict) -> list[str]:
    gpu = any("gpu_peak_mb" in mode for mode in runs["modes"].values())
    header = (["mode", "episode median ms", "p90", "p99", *_ratio_headers("episode"), "cached-support query ms",
               *_ratio_headers("cached"), "peak RSS MB", "working MB"] + (["GPU peak MB"] if gpu else []))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, mode in runs["modes"].items():
        episode, cached, speedup = mode["episode"], mode["cached_support"], runs["speedups"][name]
        failed = (mode.get("check") or {}).get("passed") is False
        cells = [f"{name} (output check FAILED)" if failed else name, f"{episode['median_ms']:.1f}", f"{episode['p90_ms']:.1f}", f"{episode['p99_ms']:.1f}",
                 *(_times(speedup[key]["episode"]) for key in BASELINES), f"{cached['median_ms']:.1f}",
                 *(_times(speedup[key]["cached_support"]) for key in BASELINES),
                 f"{mode['peak_rss_mb']:.0f}", f"{mode['working_mb']:.0f}"]
        cells += [f"{mode['gpu_peak_mb']:.0f}"] if "gpu_peak_mb" in mode else []
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _shots_section(result: dict, shots: str, runs: dict) -> list[str]:
    lines = [f"### {result['config']}, {shots}-shot, batch 1 ({result['iterations']} runs after {result['warmup']} warm-up, interleaved)\n",
             f"Speed-up = baseline median / mode median of the same kind (episode to episode, cached-support query to "
             f"cached-support query); the baselines are eager fp32 and eager bf16 autocast on {result['device']}; "
             f"above 1x is faster.\n"]
    lines += _main_table(runs)
    described = [f"{name}: {mode['runtime']}" for name, mode in runs["modes"].items() if mode.get("runtime")]
    if described:
        lines.append("\nRuntimes: " + "; ".join(described) + ".")
    checked = {name: mode["check"] for name, mode in runs["modes"].items() if mode.get("check")}
    if checked:
        lines.append("\nOutput check on the bench episode against eager fp32 (the export gate's end-to-end rule): "
                     + describe_checks(checked) + ".")
    if runs.get("skipped"):
        lines.append("\nSkipped on this machine:\n")
        lines += [f"- {name}: {reason}" for name, reason in runs["skipped"].items()]
    for units, title in ((STAGE_ORDER, "Per stage, median ms per episode (all calls of the stage summed)"),
                         (GRAPH_ORDER, "Per deployable graph (the graph modes), median ms per episode")):
        timed = _timed_modes(runs, units)
        if timed:
            lines.append(f"\n{title}:\n")
            lines.append(f"| {'stage' if units is STAGE_ORDER else 'graph'} | " + " | ".join(timed) + " |")
            lines.append("|---|" + "---|" * len(timed))
            for unit in units:
                cells = [f"{runs['modes'][name]['stages'][unit]['median_ms']:.1f}" for name in timed]
                lines.append(f"| {unit} | " + " | ".join(cells) + " |")
    if runs.get("concurrency"):
        lines.append("\nServer, client-measured, concurrency sweep:\n")
        lines.append("| concurrency | support | requests | failures | median ms | throughput episodes/s | "
                     "cache hits | cache misses |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for row in runs["concurrency"]:
            support = "cached" if row["cached_support"] else "new"
            lines.append(f"| {row['concurrency']} | {support} | {row['requests']} | {row['failures']} | "
                         f"{row['median_ms']:.1f} | {row['episodes_per_s']:.2f} | {reported(row.get('cache_hits'))} | "
                         f"{reported(row.get('cache_misses'))} |")
    return lines + [""]


def reported(value) -> str:
    """A count the server may not have reported (None)."""
    return "not reported" if value is None else str(value)


def _timed_modes(runs: dict, units) -> list[str]:
    """The modes timed per unit of `units` (the six stages, or the two deployable graphs)."""
    return [name for name, mode in runs["modes"].items() if mode["stages"] and set(mode["stages"]) == set(units)]


def _machine_line(result: dict) -> str:
    m, packages = result["machine"], result["machine"]["packages"]
    versions = ", ".join(f"{name} {packages[name]}" for name in ("torch", "onnxruntime", "openvino", "nncf") if name in packages)
    threads = result.get("threads") or "the runtime's default"
    return (f"Machine: {cpu.describe({'model': m['cpu_model'], 'reported': m['cpu_flags']})}; {m['cores']} cores, "
            f"GPU: {m['gpu'] or 'none'}; {versions}; ONNX Runtime/OpenVINO threads: {threads}; "
            f"commit {m['git_commit']}. Weights: {result['weights']}.")


def markdown(result: dict) -> str:
    lines = []
    for shots, runs in result["runs"].items():
        lines += _shots_section(result, shots, runs)
    lines.append(_machine_line(result))
    return "\n".join(lines) + "\n"


def plot_names(shots) -> tuple[str, str]:
    """The file names of the two plots of a `shots`-shot run."""
    return f"latency_stages_{shots}shot.png", f"throughput_{shots}shot.png"


def plots(result: dict, folder: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for shots, runs in result["runs"].items():
        latency_name, throughput_name = plot_names(shots)
        staged = _timed_modes(runs, STAGE_ORDER)  # the graph modes have no stages: in the table, not here
        fig, ax = plt.subplots(figsize=(10, 4.5))
        width = 0.8 / max(1, len(staged))
        for i, name in enumerate(staged):
            values = [runs["modes"][name]["stages"][stage]["median_ms"] for stage in STAGE_ORDER]
            ax.bar([x + i * width for x in range(len(STAGE_ORDER))], values, width, label=name)
        ax.set_xticks([x + width * (len(staged) - 1) / 2 for x in range(len(STAGE_ORDER))], STAGE_ORDER, rotation=15)
        ax.set_ylabel("median ms per episode")
        ax.set_yscale("log")
        ax.set_title(f"FSSAM {result['config']} {shots}-shot: latency per stage ({result['machine']['cpu_model']})")
        if staged:
            ax.legend()
        written.append(_save(fig, os.path.join(folder, latency_name)))

        fig, ax = plt.subplots(figsize=(8, 4.5))
        if runs.get("concurrency"):
            for cached, label in ((True, "server, cached support"), (False, "server, new support sets")):
                rows = [r for r in runs["concurrency"] if r["cached_support"] == cached]
                ax.plot([r["concurrency"] for r in rows], [r["episodes_per_s"] for r in rows], marker="o", label=label)
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
        written.append(_save(fig, os.path.join(folder, throughput_name)))
    return written


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


RESULTS_FORMAT = "fssam-bench/1"  # results.json: the folder is a bench run's own, which a later run may replace
LEFTOVERS = (r"artifacts-\d+shot", r"\.artifacts-\d+shot\.partial-.*")  # the exports a bench makes first


def check_results_folder(folder: str, what: str = "--out") -> None:
    """Before the work: --out is new, empty, a bench run's own folder, or what an interrupted one left."""
    from fssam.files import check_output_folder, json_with

    check_output_folder(folder, "results.json", json_with("format", RESULTS_FORMAT), what, LEFTOVERS)


OWN_FILES = r"results\.(json|md)|(latency_stages|throughput)_\d+shot\.png"  # what `write` may remove again


def recorded_files(folder: str) -> list[str]:
    """The report files an earlier run recorded in `folder`/results.json ("written_files"): only
    plain names of the kinds `write` writes, so that nothing else is ever taken for its own."""
    from fssam.files import read_json

    try:
        listed = read_json(os.path.join(folder, "results.json"), RESULTS_FORMAT).get("written_files", [])
    except ValueError:
        return []
    if not isinstance(listed, list):
        return []
    return [name for name in listed if isinstance(name, str) and re.fullmatch(OWN_FILES, name)]


def write(result: dict, folder: str) -> dict:
    """results.json (listing the files written, so a later run into this folder knows them), results.md
    and the plots; then the report files an earlier run wrote here that this one did not rewrite
    (e.g. the plots of shot counts it did not run) are removed."""
    os.makedirs(folder, exist_ok=True)
    from fssam.files import write_json, write_text

    earlier = recorded_files(folder)
    result["written_files"] = ["results.json", "results.md",
                               *(name for shots in result["runs"] for name in plot_names(shots))]
    write_json(os.path.join(folder, "results.json"), result)
    write_text(os.path.join(folder, "results.md"), markdown(result))
    written = plots(result, folder)
    for name in sorted(set(earlier) - set(result["written_files"])):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
    return {"json": os.path.join(folder, "results.json"), "markdown": os.path.join(folder, "results.md"), "plots": written}
