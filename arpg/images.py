"""Images in [-1, 1] as pictures: PIL conversion and PNG grids."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from arpg.errors import require
from arpg.files import atomic_write


def images_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, C, H, W) images in [-1, 1] with C in {1, 3} -> list of PIL images (mode L or RGB).

    Uses the reference sampler's mapping clamp(127.5 * x + 128, 0, 255), truncated to uint8.
    """
    require(images.ndim == 4 and images.shape[1] in (1, 3),
            f"images must have shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
    pixels = (127.5 * images.detach().float() + 128).clamp(0, 255).to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)
    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, padding: int = 2, scale: int = 1,
              pad_value: float = 1.0) -> Path:
    """Write images (B, C, H, W) in [-1, 1] (C = 1 or 3) as one PNG grid, `nrow` images per row,
    each enlarged `scale` times (nearest neighbour, for tiny images). Returns the path."""
    require(images.ndim == 4 and images.shape[1] in (1, 3),
            f"images must have shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
    require(nrow >= 1 and padding >= 0 and scale >= 1,
            f"need nrow >= 1, padding >= 0, scale >= 1, got {nrow}, {padding}, {scale}")
    images = images.detach().float().cpu()
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    B, C, H, W = images.shape
    cols, rows = min(nrow, B), math.ceil(B / nrow)
    grid = torch.full((C, rows * (H + padding) + padding, cols * (W + padding) + padding), pad_value)
    for i, image in enumerate(images):
        top, left = padding + (i // cols) * (H + padding), padding + (i % cols) * (W + padding)
        grid[:, top:top + H, left:left + W] = image
    picture = images_to_pil(grid[None])[0]
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
