"""The eval result file (`"format": "fssam-eval/1"`): header, reading, writing, the printed table."""

from __future__ import annotations

import datetime

from fssam.errors import DataError

FORMAT = "fssam-eval/1"


def header() -> dict:
    """What every result starts with: format, fssam version, creation time (UTC)."""
    import fssam

    return {
        "format": FORMAT,
        "fssam_version": fssam.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def load_result(path: str) -> dict:
    from fssam.files import read_json

    try:
        return read_json(path, FORMAT)
    except ValueError as reason:
        raise DataError(f"--compare-with {path}: {reason} (an fssam eval --out result is expected)") from None


def write_json(path: str, result: dict) -> None:
    from fssam.files import write_json as write_whole

    write_whole(path, result, indent=1)


def _precision(result: dict) -> str:
    """' bf16 autocast on cuda' / ' fp32': how the figures were computed (eager bf16 on a GPU is the
    official test's precision)."""
    details = result.get("backend_details") or {}
    precision = details.get("precision")
    if precision is None:
        return ""
    if result["backend"] == "eager":
        kind = "bf16 autocast" if precision == "bf16" else "fp32"
        return f" {kind} on {details.get('device', '?')}"
    return f" {precision}"


def _percent(iou) -> str:
    """IoU as the table prints it: percent, or "-" for a class without episodes (it has no IoU)."""
    return "-" if iou is None else f"{100 * iou:.2f}"


def unmeasured_note(result: dict) -> str | None:
    """The note for classes the run drew no episode of (null IoU, left out of mIoU), or None."""
    named = {c: f"{c} {entry['name']}" for c, entry in result["classes"].items()}
    missing = [named[c] for c, entry in result["classes"].items() if entry["iou"] is None]
    if not missing:
        return None
    measured = [named[c] for c, entry in result["classes"].items() if entry["iou"] is not None]
    return (f"note: no episodes of class {', '.join(missing)}: no IoU for them ('-', null in the JSON), and "
            f"mIoU covers only the other classes ({', '.join(measured)}); more --episodes may draw them")


def format_table(result: dict) -> str:
    rows = [f"{'class':>5}  {'name':<14} {'episodes':>8}  {'IoU %':>7}"]
    for c, entry in result["classes"].items():
        rows.append(f"{c:>5}  {entry['name']:<14} {entry['episodes']:>8}  {_percent(entry['iou']):>7}")
    rows.append(
        f"mIoU {100 * result['miou']:.2f}  FB-IoU {100 * result['fbiou']:.2f}  ({result['episodes']} episodes, "
        f"{result['dataset']} fold {result['fold']}, {result['shots']}-shot, backend {result['backend']}"
        f"{_precision(result)}, config {result['config'].get('name')}, "
        f"{result['seconds']['model_per_episode'] * 1000:.1f} ms/episode)"
    )
    rows.append(result["weights"])
    return "\n".join(rows)
