"""Where eager work runs: `--device auto|cpu|cuda`."""

from __future__ import annotations

import torch

from fssam.errors import ConfigError

CHOICES = ("auto", "cpu", "cuda")


def resolve_device(choice: str = "auto") -> torch.device:
    """auto: cuda when a CUDA device is present, else cpu; cuda without one is a ConfigError."""
    if choice not in CHOICES:
        raise ConfigError(f"device {choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: this machine has no CUDA device")
    return torch.device(choice)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on CPU): call before reading a wall clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
