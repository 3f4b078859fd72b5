"""Putting files on disk so that no reader ever sees half of one, and reading torch files safely.

* `atomic_write(path, write_fn)` is the one way this package writes a file that must never be seen
  half-written (weights, training states, shards, settings, PNGs, reports).
* `read_torch_file(path)` loads a `.pt` file with `weights_only=True` and turns the many errors
  torch raises for a damaged or foreign file into one `ValueError` naming the file.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def atomic_write(path: str | Path, write_fn: Callable[[Path], Any]) -> Path:
    """Call `write_fn(tmp_path)`, fsync the result and rename it to `path`.

    A reader therefore sees either the previous complete file or the new complete one, never a
    partial write, even if the process dies midway (the temporary file is removed on error).
    The file gets the permissions a plain `open()` would give it (0666 & ~umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_fn(tmp)
        # Set the mode after writing: some writers (safetensors) replace the file with their own 0600 one.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_torch_file(path: str | Path, mmap: bool = False) -> Any:
    """Load a `.pt` file safely (`weights_only=True`, on the CPU), with a one-line error for files
    that are missing, truncated, corrupt or not torch.save output."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        # Published training checkpoints pickle their argparse Namespace under "args".
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises several unrelated types for damaged files
        # torch's own message may advise weights_only=False, i.e. running the file's code: not shown.
        raise ValueError(f"{path} is not a readable PyTorch file: truncated, corrupt, not written by torch.save, "
                         f"or holding objects other than tensors and plain data ({type(err).__name__})") from None
