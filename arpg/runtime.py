"""Where and how work runs: device names, loader workers, and seeds derived from tuples of ints."""

from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np
import torch

from arpg.errors import require

log = logging.getLogger(__name__)
MAX_AUTO_WORKERS = 8


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


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and schedulers set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(requested: Optional[int], what: str = "num_workers") -> int:
    """Loader worker processes for a `num_workers` setting, bounded by this process's share of the
    cores (the cores over the launcher's processes on this machine, LOCAL_WORLD_SIZE).

    None: one per core of the share but one (the main process works too), at most 8. A request
    above the share is lowered to it (more processes than cores only contend), with a note.
    """
    cores = max(1, available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if requested is None:
        return max(0, min(MAX_AUTO_WORKERS, cores - 1))
    require(requested >= 0, f"{what} must be >= 0 or null (one per core but one), got {requested}")
    if requested > cores:
        log.info("%s=%d lowered to %d, the cores available here", what, requested, cores)
        return cores
    return requested
