"""What this CPU is and which reduced-precision units it has, read from /proc/cpuinfo."""

from __future__ import annotations

import os
import platform

CPUINFO = "/proc/cpuinfo"
REPORTED_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx512_fp16")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # OpenVINO's CPU plugin runs bf16 on either


def cpu_info(path: str | None = None) -> dict:
    """{"model": str, "flags": sorted list of every flag, "reported": {flag: bool} for REPORTED_FLAGS}.

    `path` (or $FSSAM_CPUINFO, for tests) replaces /proc/cpuinfo."""
    path = path or os.environ.get("FSSAM_CPUINFO") or CPUINFO
    model, flags = platform.processor() or "unknown", set()
    try:
        with open(path) as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("unknown", platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": sorted(flags), "reported": {flag: flag in flags for flag in REPORTED_FLAGS}}


def native_bf16(info: dict | None = None) -> bool:
    info = info or cpu_info()
    return any(flag in info["flags"] for flag in NATIVE_BF16_FLAGS)


def describe(info: dict | None = None) -> str:
    """'<model>; amx_bf16 no, avx512_bf16 yes, ...' for messages and reports."""
    info = info or cpu_info()
    flags = ", ".join(f"{flag} {'yes' if present else 'no'}" for flag, present in info["reported"].items())
    return f"{info['model']}; {flags}"
