"""Where and how work runs: device names, and seeds derived from tuples of ints."""

from __future__ import annotations

import numpy as np
import torch

from arpg.errors import require


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """A device from a setting: "auto" (CUDA when available, else the CPU), "cpu", "cuda" (this
    process's GPU, `local_rank`) or "cuda:N"."""
    require(name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit()),
            f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    require(name == "cpu" or torch.cuda.is_available(), f"device={name} but CUDA is not available here")
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from a tuple of non-negative ints (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)
