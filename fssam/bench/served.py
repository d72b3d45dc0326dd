"""A running FSSAM server measured from the client side: latency per episode, throughput under
concurrent clients, request payload. Shared by `fssam bench --modes triton` and `fssam deploy`."""

from __future__ import annotations

import itertools
import statistics
import threading
import time

import numpy as np

from fssam.runtime.contract import binary_masks

CONCURRENCY = (1, 2, 4, 8)
# every support set a process sends as new (Served, concurrency_sweep) has its own number, so that no
# later level or mode repeats one an earlier one sent (which the response cache would answer)
_FRESH = itertools.count(1)


def next_fresh() -> int:
    return next(_FRESH)


def default_levels(cores: int | None = None) -> tuple[int, ...]:
    """The client counts worth measuring on this machine: CONCURRENCY up to its cores (at least
    2). Past that the requests only queue: on two cores 4 clients gave what 2 gave (0.58 and 0.63
    episodes/s cached; new support sets 0.35 at 2 clients, benchmarks/results/cpu-small-1shot-deploy,
    deploy-run5: the earlier 0.43-0.44 counted cache hits)."""
    import os

    cores = cores or os.cpu_count() or 1
    return tuple(level for level in CONCURRENCY if level <= max(2, cores))


class Served:
    """The `fssam` ensemble as a bench mode (fssam.bench.harness.EpisodeMode): `cache=False` sends a
    support set the server has not seen (one pixel changed per call, so Triton's response cache
    misses), `cache=True` repeats the first one (a cache hit on support_encoder)."""

    def __init__(self, url: str, protocol: str = "grpc"):
        from fssam.serving.client import RemoteFSSAM

        self.url, self.protocol = url, protocol
        self.remote = RemoteFSSAM(url, protocol=protocol)

    def __call__(self, query, supports, masks, cache: bool):
        if not cache:
            supports = fresh_support(supports, next_fresh())
        return self.remote.infer(query, supports, masks)

    def close(self) -> None:
        self.remote.close()


def fresh_support(supports, counter: int):
    """The support images with pixels (0, 0), (0, 1) and (0, 2) of the first image's red channel set
    from `counter` (distinct for counters below 2**24): a different cache key, the same work."""
    changed = supports.clone() if hasattr(supports, "clone") else np.array(supports, copy=True)
    for column in range(3):
        changed[..., 0, 0, 0, column] = float(counter // 256 ** column % 256)
    return changed


def payload_bytes(query, supports, masks) -> dict:
    """Request tensor bytes of one episode: as FP32 (what the per-stage pipeline took) and as the
    ensemble's UINT8."""
    elements = sum(int(np.prod(tuple(t.shape))) for t in (query, supports, masks))
    return {"fp32": 4 * elements, "uint8": elements, "ratio": 4.0}


def _cache_stats(url: str, protocol: str) -> dict | None:
    from fssam.serving import ServingError
    from fssam.serving.client import RemoteFSSAM

    try:
        with RemoteFSSAM(url, protocol=protocol) as remote:
            return remote.cache_stats()
    except (ServingError, KeyError, IndexError, ValueError):  # refused, or statistics of another shape
        return None


def concurrency_sweep(url: str, inputs, levels=CONCURRENCY, requests_per_client: int = 5, cached: bool = True,
                      protocol: str = "grpc") -> list[dict]:
    """Client-measured throughput with C clients sending at once (each its own connection).
    `cached`: every request repeats one support set (cache hits after the first); else every
    request has a support set this process never sent before (full episodes). Each row carries
    Triton's own response-cache counts of support_encoder over its level (cache_hits, cache_misses):
    what the figure measured, not what was meant."""
    from fssam.serving.client import RemoteFSSAM

    query, supports, masks = inputs
    masks = binary_masks(masks)
    rows = []
    for level in levels:
        latencies, errors, lock = [], [], threading.Lock()
        before = _cache_stats(url, protocol)

        def client():
            with RemoteFSSAM(url, protocol=protocol) as remote:
                for _ in range(requests_per_client):
                    episode_supports = supports if cached else fresh_support(supports, next_fresh())
                    start = time.perf_counter()
                    try:
                        remote.infer(query, episode_supports, masks)
                    except Exception as error:  # counted and reported, never hidden
                        with lock:
                            errors.append(str(error))
                        continue
                    with lock:
                        latencies.append(time.perf_counter() - start)

        threads = [threading.Thread(target=client) for _ in range(level)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
        after = _cache_stats(url, protocol)
        rows.append({
            "concurrency": level,
            "cached_support": cached,
            "requests": level * requests_per_client,
            "failures": len(errors),
            **({"first_error": errors[0]} if errors else {}),
            "median_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
            "episodes_per_s": len(latencies) / wall,
            # None: the server did not report its statistics
            "cache_hits": after["hits"] - before["hits"] if after and before else None,
            "cache_misses": after["misses"] - before["misses"] if after and before else None,
        })
    return rows
