"""Eager PyTorch precisions: fp32, or bf16 as the official FSSAM test (the fp32 model under torch.autocast)."""

from __future__ import annotations

from fssam.errors import ConfigError

EAGER_PRECISIONS = ("fp32", "bf16")  # bf16: the fp32 model under torch.autocast, as the official FSSAM test


def check_eager_precision(precision: str | None) -> str:
    """The eager precision (None: fp32); anything but fp32 | bf16 is a one-line ConfigError."""
    precision = "fp32" if precision is None else precision
    if precision not in EAGER_PRECISIONS:
        raise ConfigError(f"--precision {precision!r} for eager PyTorch: expected one of {', '.join(EAGER_PRECISIONS)}")
    return precision


def eager_forward(model, query, supports, masks, device: str, precision: str):
    """model(query, supports, masks) on `device`, under torch.autocast bf16 for precision bf16 (the model
    stays fp32, as the official FSSAM test), else in IEEE fp32 (no TF32 on a GPU, as the exports'
    fp32 gate); logits are float32 on the CPU."""
    import torch

    from fssam.runtime.parity import ieee_fp32

    context = torch.autocast(device_type=device, dtype=torch.bfloat16) if precision == "bf16" else ieee_fp32()
    with torch.inference_mode(), context:
        logits = model(query.to(device), supports.to(device), masks.to(device))
    return logits.float().cpu()
