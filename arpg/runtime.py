"""Where and how work runs: device names, loader workers, bf16 and CPU thread policies, and seeds
derived from tuples of ints."""

from __future__ import annotations

import functools
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


@functools.cache
def fast_bf16(device_type: str) -> bool:
    """Whether bfloat16 matmuls beat float32 on this machine's `device_type` ("cuda" or "cpu"):
    a CUDA GPU that supports bf16, or a CPU with AVX512-BF16 or AMX instructions. (A CPU without
    them converts bf16 to float32 around every multiply: on an AVX2 processor bf16 matmuls ran
    30 to 50 times slower than float32.) The answer is logged once per device type."""
    if device_type == "cuda":
        fast, why = torch.cuda.is_available() and torch.cuda.is_bf16_supported(), "CUDA bf16 support"
    elif device_type == "cpu":
        avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        fast = avx512_bf16 or amx
        why = f"CPU {torch.backends.cpu.get_cpu_capability()}, AVX512-BF16 {avx512_bf16}, AMX {amx}"
    else:
        fast, why = False, "not a CUDA or CPU device"
    log.info("bf16 on %s: %s (%s); amp=false / runtime.mixed_precision=no switch it off", device_type,
             "fast, used where the setting is auto" if fast else "slow, auto settings stay float32", why)
    return fast


def use_bf16(setting: Optional[bool], device: torch.device) -> bool:
    """Resolve a bf16 setting for `device`: None (auto) means `fast_bf16`; True or False forces it."""
    return fast_bf16(device.type) if setting is None else setting


def set_cpu_threads(threads: int) -> int:
    """Set torch's CPU intra-op threads and return the number in use.

    threads >= 1 sets it; 0 keeps the current setting (torch's default: one per core, unless
    OMP_NUM_THREADS says otherwise). Small models gain little from a second thread, and several
    OpenMP threads that share their cores with another busy process spin against each other
    (the digits training fell from about 37 to 1-3 steps/s that way); one thread per process
    is the robust choice for them.
    """
    require(isinstance(threads, int) and threads >= 0, f"threads must be an int >= 0 (0: torch's default), got {threads!r}")
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
