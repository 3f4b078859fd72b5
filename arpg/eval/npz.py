"""Image sets as `.npz` files in the layout of ADM's evaluation suite (openai/guided-diffusion):
uint8 images (N, H, W, 3) under `arr_0`, which `NpzImages` streams batch by batch, so 50k 256x256
samples (about 10 GB) never have to sit in memory at once."""

from __future__ import annotations

import math
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

import numpy as np


class NpzImages:
    """The uint8 images (N, H, W, 3) stored under `key` of an `.npz`, read in batches on demand.

    Only the `.npy` header is read on construction, which validates the entry's dtype and shape.
    """

    def __init__(self, path: str | Path, key: str = "arr_0"):
        self.path = require_file(path, "images .npz")
        self.key = key
        keys = npz_keys(self.path)
        if key not in keys:
            raise ValueError(f"{self.path} has no '{key}' entry (images); its entries are {sorted(keys)}")
        with self._open() as file:
            self.shape, dtype = _read_npy_header(file, f"{self.path}['{key}']")
        if dtype != np.uint8 or len(self.shape) != 4 or self.shape[-1] != 3:
            raise ValueError(f"{self.path}['{key}'] must be uint8 images of shape (N, H, W, 3), "
                             f"got {dtype} {self.shape}")

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yield consecutive uint8 batches (B, H, W, 3), the last one possibly smaller."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        image_bytes = math.prod(self.shape[1:])
        with self._open() as file:
            _read_npy_header(file, f"{self.path}['{self.key}']")
            for start in range(0, len(self), batch_size):
                count = min(batch_size, len(self) - start)
                data = file.read(count * image_bytes)
                if len(data) != count * image_bytes:
                    raise ValueError(f"{self.path}['{self.key}'] is truncated: images {start}..{start + count - 1} "
                                     f"of {len(self)} are incomplete")
                # A writable copy: torch refuses to wrap read-only buffers without a warning.
                yield np.frombuffer(data, dtype=np.uint8).reshape(count, *self.shape[1:]).copy()

    @contextmanager
    def _open(self) -> Iterator[IO[bytes]]:
        with zipfile.ZipFile(self.path) as archive, archive.open(f"{self.key}.npy") as member:
            yield member


def npz_keys(path: str | Path) -> list[str]:
    """The entry names of an `.npz` archive, without loading any array."""
    path = require_file(path, ".npz")
    try:
        with zipfile.ZipFile(path) as archive:
            return [name.removesuffix(".npy") for name in archive.namelist()]
    except zipfile.BadZipFile as error:
        raise ValueError(f"{path} is not an .npz archive (not a zip file)") from error


def _read_npy_header(file: IO[bytes], what: str) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(file)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read_header is None:
        raise ValueError(f"{what} has .npy format version {version}; supported are 1.0 and 2.0")
    shape, fortran_order, dtype = read_header(file)
    if fortran_order:
        raise ValueError(f"{what} is stored in Fortran order; save it C-contiguous (np.ascontiguousarray)")
    return shape, dtype


def require_file(path: str | Path, what: str) -> Path:
    """`path` (with ~ expanded) if it is a file, else a FileNotFoundError naming `what` it should be."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    return path
