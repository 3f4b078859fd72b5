"""Where and how work runs: device names, loader workers, bf16 and CPU thread policies, and seeds
derived from tuples of ints."""

from __future__ import annotations

import functools
import logging
import os
from contextlib import contextmanager
from typing import Iterator, Optional

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


# "1" or "0": act as a CPU with (or without) fast bf16 instead of probing the real one. The test
# suite sets it so that one machine runs what the other kind of CPU would (`tests/conftest.py`).
CPU_BF16_ENV = "ARPG_CPU_FAST_BF16"


@functools.cache
def _cpu_bf16_instructions() -> tuple[bool, str]:
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return avx512_bf16 or amx, f"CPU {torch.backends.cpu.get_cpu_capability()}, AVX512-BF16 {avx512_bf16}, AMX {amx}"


def fast_bf16(device_type: str) -> bool:
    """Whether bfloat16 matmuls beat float32 on this machine's `device_type` ("cuda" or "cpu"):
    a CUDA GPU that supports bf16, or a CPU with AVX512-BF16 or AMX instructions (without them a
    CPU converts bf16 to float32 around every multiply, many times slower). `ARPG_CPU_FAST_BF16`
    ("1" / "0") replaces the CPU probe. This only informs speed reports and warnings: the default
    precision never depends on it (see `use_bf16`)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        forced = os.environ.get(CPU_BF16_ENV)
        require(forced in (None, "0", "1"), f"{CPU_BF16_ENV} must be 0 or 1 (or unset: probe the CPU), got {forced!r}")
        return _cpu_bf16_instructions()[0] if forced is None else forced == "1"
    return False


def cpu_description() -> str:
    """The CPU's vector capability and bf16 instructions (the real probe), for reports and messages."""
    forced = os.environ.get(CPU_BF16_ENV)
    return _cpu_bf16_instructions()[1] + (f"; fast bf16 taken as {forced == '1'} ({CPU_BF16_ENV}={forced})"
                                           if forced is not None else "")


def use_bf16(setting: Optional[bool], device: torch.device) -> bool:
    """Resolve a bf16 setting for `device`. None (the default): bf16 on a CUDA GPU that supports it,
    float32 on a CPU, so that a call gives the same tokens on every CPU (the convention of PyTorch
    and transformers). True: bf16 on any device (on a CPU without fast bf16 it warns once that it
    will be slow). False: float32."""
    if setting is None:
        return device.type == "cuda" and fast_bf16("cuda")
    if setting and device.type == "cpu" and not fast_bf16("cpu"):
        _warn_slow_cpu_bf16()
    return setting


def training_precision(setting: str, device: torch.device) -> str:
    """accelerate's `mixed_precision` for a `runtime.mixed_precision` setting on `device`: "auto"
    is "bf16" on a CUDA GPU with bf16 and "no" (float32) on a CPU; "bf16" is kept on any device
    (with the same once-only warning as `use_bf16` on a CPU without fast bf16)."""
    if setting in ("auto", "bf16"):
        return "bf16" if use_bf16(None if setting == "auto" else True, device) else "no"
    return setting


@contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Inside the block, float32 matmuls (cuBLAS) and convolutions (cuDNN) on CUDA run in TF32
    (10-bit mantissa, tensor cores) when `enabled`, in true float32 otherwise; the previous flags
    are restored after it. PyTorch's own defaults differ between the two (matmuls float32,
    convolutions TF32), so callers state their policy: training follows `runtime.tf32`, FID
    features are true float32. bf16 math and everything on a CPU are unaffected."""
    matmul, convolution = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, convolution


@functools.cache
def _warn_slow_cpu_bf16() -> None:
    log.warning("bf16 asked for on a CPU without AVX512-BF16 or AMX (%s): it runs many times slower than "
                "float32 here", cpu_description())


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
