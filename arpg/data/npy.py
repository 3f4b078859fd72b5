"""The published per-image .npy layout (ARPG / RandAR): reading it and converting it into shards."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from arpg.data.shards import ShardWriter
from arpg.files import FolderLock

# The published ImageNet codes were made with VQ-16 loaded from this file (identity string as
# VQTokenizer.from_checkpoint("vq_ds16_c2i.pt").identity gives it).
PUBLISHED_VQ16_IDENTITY = "vq16[vq_ds16_c2i.pt]"


def list_npy_folder(src: str | Path) -> list[tuple[Path, int]]:
    """(file, label) for the published layout: `src/<class id>/<image>.npy`, sorted.

    Each file holds one image's codes as (1, augmentations, h*w) integers.
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"token folder {src} not found")
    class_dirs = [d for d in src.iterdir() if d.is_dir()]
    not_ids = [d.name for d in class_dirs if not d.name.isdigit()]
    if not_ids:
        raise ValueError(f"{src}: class folders must be named by their integer class id, got {not_ids[:5]}")
    files = [(f, int(d.name)) for d in sorted(class_dirs, key=lambda d: int(d.name))
             for f in sorted(d.glob("*.npy"))]
    if not files:
        raise ValueError(f"{src} holds no <class id>/<image>.npy files")
    return files


_NPY_MAGIC = b"\x93NUMPY"


def read_npy_codes(path: str | Path, codebook_size: int | None = None) -> np.ndarray:
    """One image's codes from the published layout as (augmentations, h*w); every error names the
    file. Pickled (object) arrays are refused, never loaded."""
    with open(path, "rb") as f:
        magic = f.read(len(_NPY_MAGIC))
    if not magic:
        raise ValueError(f"{path}: the file is empty (zero bytes)")
    if magic != _NPY_MAGIC:
        raise ValueError(f"{path}: not a .npy file (no NumPy header)")
    try:
        codes = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "Object arrays" in str(err):
            raise ValueError(f"{path}: holds pickled Python objects, not an integer array; such files are "
                             f"refused (loading them would run their code)") from None
        raise ValueError(f"{path}: a damaged .npy file ({err})") from None
    except (EOFError, OSError) as err:
        raise ValueError(f"{path}: a truncated or damaged .npy file ({type(err).__name__})") from None
    if codes.ndim == 3 and codes.shape[0] == 1:
        codes = codes[0]
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"{path}: expected integer codes of shape (1, augmentations, h*w), "
                         f"got {codes.dtype} {codes.shape}")
    if codebook_size is not None and codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"{path}: token ids must be in [0, {codebook_size - 1}], got values in "
                         f"[{codes.min()}, {codes.max()}]")
    return codes


def convert_npy_folder(src: str | Path, dst: str | Path, *, codebook_size: int = 16384,
                       grid_size: tuple[int, int] | None = None, num_classes: int | None = None,
                       tokenizer: str = PUBLISHED_VQ16_IDENTITY, shard_size: int = 10000) -> dict:
    """Convert the published per-image layout (`list_npy_folder`) into our shards at `dst`.

    `grid_size` defaults to the square grid of the stored length, `num_classes` to the largest
    class id + 1. Resumable like `extract_codes`. Returns the manifest.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    files = list_npy_folder(src)
    augmentations, length = read_npy_codes(files[0][0], codebook_size).shape
    if grid_size is None:
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(f"{files[0][0]} holds {length} tokens per image, not a square grid; pass grid_size")
        grid_size = (side, side)
    num_shards = math.ceil(len(files) / shard_size)
    with FolderLock(dst, "code conversion"), tqdm(total=len(files), desc="convert", unit="img") as progress:
        writer = ShardWriter(dst, grid_size=grid_size, codebook_size=codebook_size, tokenizer=tokenizer,
                             augmentations=augmentations,
                             num_classes=num_classes or max(label for _, label in files) + 1,
                             source={"npy_folder": str(Path(src).resolve()), "files": len(files),
                                     "shard_size": shard_size})
        for index in range(num_shards):
            chunk = files[index * shard_size:(index + 1) * shard_size]
            if writer.has_shard(index):
                progress.update(len(chunk))
                continue
            codes = []
            for path, _ in chunk:
                item = read_npy_codes(path, codebook_size)
                if item.shape != (augmentations, length):
                    raise ValueError(f"{path}: codes have shape {item.shape}, the first file has "
                                     f"{(augmentations, length)}")
                codes.append(item)
                progress.update(1)
            writer.write_shard(index, np.stack(codes), np.array([label for _, label in chunk]))
        manifest = writer.finish()
    print(f"converted {manifest['count']} images into {len(manifest['shards'])} shards at {dst}")
    return manifest
