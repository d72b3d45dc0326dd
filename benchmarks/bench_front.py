"""The front's cost: `fssam serve`'s aiohttp front vs the loopback tritonserver behind it, on one export.

    python benchmarks/bench_front.py --artifacts ART [--runs 10] [--clients 1 2 4 8] [--requests 2]
                                     [--backend python-ort] [--image 640x480] [--out out/bench_front]

Writes a repository of ART (`fssam repository`, into a temporary folder), starts `fssam serve` on it
(the front on a free loopback port; tritonserver on the loopback port its ready line names) and, at
concurrency 1, with the same episode every time (so the support set is a response-cache hit after
the first call), interleaved run by run in rotating order:

  direct        binary KServe infer (tritonclient.http, keep-alive) straight to tritonserver's port
  front         the same request through the front
  segment-png   POST /v1/segment with the episode as PNG files (a requests.Session, keep-alive)
  segment-jpeg  the same with JPEG files

The binary tensors are decode_episode() of the PNG files, so direct, front and segment-png send the
same pixels. Front overhead = front - direct (medians, and the median of the per-run differences);
"% of the episode" is that over the direct median. /v1/segment also decodes, resizes and checks the
files and encodes the mask PNG at the query's size, which a binary client does itself: the client
side of that (decode_episode + logits_to_mask in this process) is timed too, for comparison.

Throughput: N clients (threads, one tritonclient.http connection each), --requests binary requests
each, through the front, with the cached support set and with a new support set per request (a
counter written into the support image makes every set distinct); episodes/s = requests / wall.

Prints markdown tables; writes results.json (CPU model and flags from /proc/cpuinfo, load average
before and after, the export's config, runs) and front.png under --out. Stops the server it started.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

READY = re.compile(r"^ready: (https?://\S+)\s.*tritonserver on (\S+) behind it")
MODES = ("direct", "front", "segment-png", "segment-jpeg")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", required=True, help="folder written by fssam export (with the two graphs)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per mode at concurrency 1 (after 2 warm-ups)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=2, help="requests per client in the throughput runs")
    parser.add_argument("--backend", default="python-ort", help="fssam repository --backend (default python-ort)")
    parser.add_argument("--image", default="640x480", help="WxH of the query and support files (default 640x480)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server to be ready")
    parser.add_argument("--out", type=Path, default=Path("out/bench_front"))
    return parser.parse_args(argv)


# ---------------------------------------------------------------- machine


def cpu_info() -> dict:
    info = {"model": platform.processor() or "unknown", "flags": [], "logical_cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and info["model"] in ("unknown", platform.processor()):
            info["model"] = value.strip()
        if key.strip() == "flags" and not info["flags"]:
            info["flags"] = value.split()
    return info


def load_average() -> list:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------- inputs


def episode_files(width: int, height: int) -> dict:
    """{'png': {...}, 'jpeg': {...}}: query, support, support_mask file bytes of one synthetic episode
    (the same pixels in both; the mask is always PNG)."""
    from PIL import Image

    rng = np.random.default_rng(0)

    def picture(shift):
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([(x * 255 // width), (y * 255 // height), ((x + y + shift) % 256)], -1).astype(np.uint8)
        noise = rng.integers(0, 32, (height, width, 3), dtype=np.uint8)
        image = base // 2 + noise
        image[height // 4:3 * height // 4, width // 4:3 * width // 4] = (200, 60, 40)
        return image

    mask = np.zeros((height, width), np.uint8)
    mask[height // 4:3 * height // 4, width // 4:3 * width // 4] = 255
    out = {}
    for kind, options in (("png", {}), ("jpeg", {"quality": 90})):
        files = {}
        for name, array in (("query", picture(0)), ("support", picture(37))):
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format=kind.upper(), **options)
            files[name] = buffer.getvalue()
        buffer = io.BytesIO()
        Image.fromarray(mask).save(buffer, format="PNG")
        files["support_mask"] = buffer.getvalue()
        out[kind] = files
    return out


def episode_arrays(files: dict, size: int) -> tuple[dict, np.ndarray]:
    """The binary request's UINT8 arrays from the files, as the front decodes them; and the query image."""
    from fssam.data.preprocess import decode_episode

    query, supports, masks, query_rgb = decode_episode([("support", files["support"])],
                                                       [("support_mask", files["support_mask"])],
                                                       ("query", files["query"]), size)
    arrays = {"query": np.ascontiguousarray(np.rint(query.numpy()).clip(0, 255).astype(np.uint8)),
              "support_images": np.ascontiguousarray(np.rint(supports.numpy()).clip(0, 255).astype(np.uint8)),
              "support_masks": masks.numpy().astype(np.uint8)}
    return arrays, query_rgb


def client_preprocess_ms(files: dict, size: int, runs: int) -> float:
    """Median ms of what a binary client does itself that /v1/segment does for it: decode, resize and
    check the files, and turn the logits into a mask PNG at the query's size."""
    import cv2
    import torch

    from fssam.data.preprocess import logits_to_mask

    times = []
    logits = torch.zeros(1, 1, size, size)
    for _ in range(max(3, runs)):
        start = time.perf_counter()
        _, query_rgb = episode_arrays(files, size)
        mask = logits_to_mask(logits, query_rgb.shape[0], query_rgb.shape[1])
        cv2.imencode(".png", mask * 255)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def distinct(arrays: dict, counter: int) -> dict:
    """The episode with a support image no other request of this run has (4 bytes of the counter)."""
    support = arrays["support_images"].copy()
    support.reshape(-1)[:4] = np.frombuffer(int(counter).to_bytes(4, "little"), np.uint8)
    return {**arrays, "support_images": support}


# ---------------------------------------------------------------- server


class Server:
    """`fssam serve --port 0` on a repository; the front's URL and tritonserver's host:port."""

    def __init__(self, repository: str, timeout: float):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="bench-front-serve-", suffix=".log", delete=False)
        command = [sys.executable, "-c", "import sys; from fssam.cli import main; sys.exit(main())",
                   "serve", "--repository", repository, "--port", "0", "--timeout", str(int(timeout))]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.front = self.triton = None
        deadline = time.monotonic() + timeout + 30
        lines = []
        for line in self.process.stdout:
            lines.append(line)
            match = READY.match(line)
            if match:
                self.front, self.triton = match.group(1), match.group(2)
                break
            if time.monotonic() > deadline:
                break
        if self.front is None:
            self.stop()
            self.log.seek(0)
            raise RuntimeError("fssam serve did not become ready:\n" + "".join(lines) + self.log.read()[-4000:])
        threading.Thread(target=self.process.stdout.read, daemon=True).start()  # drain

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


# ---------------------------------------------------------------- requests


def binary_client(host_port: str):
    import tritonclient.http as http

    return http.InferenceServerClient(host_port, connection_timeout=600, network_timeout=600)


def binary_infer(client, arrays: dict) -> np.ndarray:
    import tritonclient.http as http

    inputs = []
    for name in ("query", "support_images", "support_masks"):
        inputs.append(http.InferInput(name, list(arrays[name].shape), "UINT8"))
        inputs[-1].set_data_from_numpy(arrays[name], binary_data=True)
    result = client.infer("fssam", inputs, outputs=[http.InferRequestedOutput("logits", binary_data=True)])
    return result.as_numpy("logits")


def segment(session, url: str, files: dict, kind: str) -> bytes:
    extension = "png" if kind == "png" else "jpg"
    upload = {"query": (f"q.{extension}", files["query"], f"image/{kind}"),
              "support": (f"s.{extension}", files["support"], f"image/{kind}"),
              "support_mask": ("s.png", files["support_mask"], "image/png")}
    reply = session.post(f"{url}/v1/segment", files=upload, timeout=600)
    if reply.status_code != 200:
        raise RuntimeError(f"/v1/segment answered {reply.status_code}: {reply.text[:300]}")
    return reply.content


def percentile(values, q) -> float:
    return float(np.percentile(np.asarray(values), q))


def latency(server: Server, files: dict, arrays: dict, runs: int) -> dict:
    import requests

    direct, front = binary_client(server.triton), binary_client(server.front.split("://", 1)[1])
    session = requests.Session()
    calls = {"direct": lambda: binary_infer(direct, arrays), "front": lambda: binary_infer(front, arrays),
             "segment-png": lambda: segment(session, server.front, files["png"], "png"),
             "segment-jpeg": lambda: segment(session, server.front, files["jpeg"], "jpeg")}
    same = np.array_equal(calls["direct"](), calls["front"]())
    for _ in range(2):  # warm-up: the support set enters the cache; connections open
        for mode in MODES:
            calls[mode]()
    times = {mode: [] for mode in MODES}
    for run in range(runs):
        order = MODES[run % len(MODES):] + MODES[:run % len(MODES)]
        for mode in order:
            start = time.perf_counter()
            calls[mode]()
            times[mode].append((time.perf_counter() - start) * 1e3)
    direct.close()
    front.close()
    session.close()
    out = {"identical_logits_front_vs_direct": bool(same), "ms": times, "modes": {}}
    base = statistics.median(times["direct"])
    for mode in MODES:
        median = statistics.median(times[mode])
        paired = [a - b for a, b in zip(times[mode], times["direct"])]
        out["modes"][mode] = {"median_ms": median, "p10_ms": percentile(times[mode], 10),
                              "p90_ms": percentile(times[mode], 90), "overhead_ms": median - base,
                              "overhead_paired_median_ms": statistics.median(paired),
                              "overhead_pct_of_direct": 100.0 * (median - base) / base}
    return out


def throughput(server: Server, arrays: dict, clients: list, requests_each: int) -> list:
    host_port = server.front.split("://", 1)[1]
    counter = [1]
    lock = threading.Lock()
    rows = []
    for cached in (True, False):
        for n in clients:
            warm = binary_client(host_port)
            binary_infer(warm, arrays)  # the cached set is in the cache
            warm.close()
            plans = []
            for _ in range(n):
                episodes = []
                for _ in range(requests_each):
                    if cached:
                        episodes.append(arrays)
                    else:
                        with lock:
                            counter[0] += 1
                            episodes.append(distinct(arrays, counter[0]))
                plans.append(episodes)
            times, failures = [], []
            barrier = threading.Barrier(n + 1)

            def work(episodes):
                client = binary_client(host_port)  # tritonclient.http (gevent) clients stay in their thread
                client.is_server_live()  # the connection is open before the clock starts
                barrier.wait()
                for episode in episodes:
                    start = time.perf_counter()
                    try:
                        binary_infer(client, episode)
                        times.append((time.perf_counter() - start) * 1e3)
                    except Exception as error:  # noqa: BLE001 - counted and reported
                        failures.append(str(error)[:200])
                client.close()

            threads = [threading.Thread(target=work, args=(p,)) for p in plans]
            for thread in threads:
                thread.start()
            barrier.wait()
            start = time.perf_counter()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - start
            rows.append({"clients": n, "cached_support": cached, "requests": n * requests_each,
                         "wall_s": wall, "episodes_per_s": len(times) / wall,
                         "median_ms": statistics.median(times) if times else None,
                         "failures": len(failures), "failure_examples": failures[:3]})
            print(f"  throughput: {n} client(s), {'cached' if cached else 'new'} support: "
                  f"{rows[-1]['episodes_per_s']:.2f} episodes/s", flush=True)
    return rows


# ---------------------------------------------------------------- report


def markdown(result: dict) -> str:
    lat = result["latency"]["modes"]
    lines = ["| mode | median ms | p10 ms | p90 ms | vs direct ms (medians) | vs direct ms (paired) | % of direct |",
             "|---|---|---|---|---|---|---|"]
    for mode in MODES:
        m = lat[mode]
        extra = ("—", "—", "—") if mode == "direct" else (
            f"{m['overhead_ms']:+.2f}", f"{m['overhead_paired_median_ms']:+.2f}",
            f"{m['overhead_pct_of_direct']:+.1f}%")
        times = f"{m['median_ms']:.2f} | {m['p10_ms']:.2f} | {m['p90_ms']:.2f}"
        lines.append(f"| {mode} | {times} | " + " | ".join(extra) + " |")
    lines += ["", f"Client-side preprocessing a binary client does itself (decode_episode + mask PNG), "
                  f"median: {result['client_preprocess_ms']:.2f} ms", "",
              "| clients | support | episodes/s | median ms | failures |", "|---|---|---|---|---|"]
    for row in result["throughput"]:
        lines.append(f"| {row['clients']} | {'cached' if row['cached_support'] else 'new'} | "
                     f"{row['episodes_per_s']:.2f} | {row['median_ms']:.1f} | {row['failures']} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = result["latency"]["modes"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    medians = [lat[m]["median_ms"] for m in MODES]
    errors = [[lat[m]["median_ms"] - lat[m]["p10_ms"] for m in MODES],
              [lat[m]["p90_ms"] - lat[m]["median_ms"] for m in MODES]]
    bars = left.bar(MODES, medians, yerr=errors, capsize=4, color=["#777", "#1f77b4", "#2ca02c", "#98df8a"])
    for bar, mode in zip(bars, MODES):
        share = "" if mode == "direct" else f"\n({lat[mode]['overhead_pct_of_direct']:+.1f}%)"
        label = f"{lat[mode]['median_ms']:.1f}{share}"
        left.annotate(label, (bar.get_x() + bar.get_width() / 2, lat[mode]["p90_ms"]), ha="center", va="bottom",
                      fontsize=8, xytext=(0, 2), textcoords="offset points")
    left.set_ylabel("ms per episode (median, p10-p90)")
    left.set_ylim(0, max(lat[m]["p90_ms"] for m in MODES) * 1.25)
    left.set_title(f"concurrency 1, cached support, {result['latency_runs']} runs")
    for cached, style in ((True, "o-"), (False, "s--")):
        rows = [r for r in result["throughput"] if r["cached_support"] == cached]
        right.plot([r["clients"] for r in rows], [r["episodes_per_s"] for r in rows], style,
                   label="cached support" if cached else "new support")
    right.set_xscale("log", base=2)
    right.set_xticks(result["clients"], [str(c) for c in result["clients"]])
    right.set_xlabel("concurrent clients (binary infer through the front)")
    right.set_ylabel("episodes/s")
    right.set_ylim(bottom=0)
    right.legend()
    cfg = result["config"]
    fig.suptitle(f"fssam front vs tritonserver: {cfg['name']} {result['shots']}-shot {cfg['image_size']} px, "
                 f"{result['backend']}, {result['cpu']['model']} x{result['cpu']['logical_cpus']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    from fssam.serving.repository import write_repository

    manifest = json.loads((Path(args.artifacts) / "manifest.json").read_text())
    width, height = (int(v) for v in args.image.lower().split("x"))
    load_before = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-front-") as tmp:
        repository = os.path.join(tmp, "repository")
        description = write_repository(args.artifacts, repository, backend=args.backend)
        size, shots = int(description["image_size"]), int(description["shots"])
        if shots != 1:
            raise SystemExit("bench_front.py sends one support file per episode: give a 1-shot export")
        files = episode_files(width, height)
        arrays, _ = episode_arrays(files["png"], size)
        print(f"starting fssam serve on a {manifest['config']['name']} {shots}-shot repository ({args.backend}) ...",
              flush=True)
        server = Server(repository, args.timeout)
        try:
            print(f"  front {server.front}, tritonserver {server.triton}", flush=True)
            started = time.perf_counter()
            lat = latency(server, files, arrays, args.runs)
            print(f"  latency done in {time.perf_counter() - started:.0f} s", flush=True)
            rows = throughput(server, arrays, args.clients, args.requests)
        finally:
            code = server.stop()
        preprocess = client_preprocess_ms(files["png"], size, args.runs)
    result = {
        "benchmark": "bench_front", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": git_commit(), "python": platform.python_version(), "cpu": cpu_info(),
        "load_average_before": load_before, "load_average_after": load_average(),
        "config": manifest["config"], "shots": shots, "export_precision": manifest["precision"],
        "weights": manifest["weights"].get("source"), "backend": args.backend,
        "repository": {k: description.get(k) for k in ("graphs", "support_cache", "ensemble")},
        "files": {kind: {name: len(data) for name, data in f.items()} for kind, f in files.items()},
        "image_wh": [width, height], "latency_runs": args.runs, "warmups": 2, "latency": lat,
        "client_preprocess_ms": preprocess, "clients": args.clients, "requests_per_client": args.requests,
        "throughput": rows, "serve_exit_code": code,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "front.png")
    table = markdown(result)
    (args.out / "results.md").write_text(table + "\n")
    print(table)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'front.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
