"""Layers shared by every model family: RMSNorm, the SwiGLU MLP, 2-D RoPE and attention.

ARPG and LlamaGen (and PAR, which is LlamaGen with another sequence) are built from the same
math; each family keeps its own module names around these pieces so that published checkpoints
load with strict key checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def swiglu_hidden_dim(dim: int, multiple_of: int = 256, multiplier: Optional[float] = None) -> int:
    """SwiGLU width of the published models: 2/3 * 4 * dim (times `multiplier`), rounded up to `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 for stability under bf16, as the published models do.
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def published_init_(model: nn.Module, std: float) -> None:
    """The published initialisation of every family: N(0, std) for Linear and Embedding weights,
    ones for RMSNorm weights (each family then zeroes its output head)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class FeedForward(nn.Module):
    """SwiGLU MLP without biases: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


# ---------------------------------------------------------------------------------------------
# 2-D rotary position embedding
# ---------------------------------------------------------------------------------------------

def rope_2d(rows: Tensor, cols: Tensor, head_dim: int, base: float = 10000.0) -> Tensor:
    """Rotation table for grid positions: (...,) rows and cols -> (..., head_dim // 2, 2) (cos, sin).

    The first head_dim/4 rotation slots turn with the row index, the last head_dim/4 with the
    column index, at frequencies base^(-2m / (head_dim/2)) for m < head_dim/4. Positions are
    plain numbers, so a grid larger than the training grid (outpainting) simply gets larger
    angles, and fractional positions (resolution expansion) fall between the integer ones.
    """
    half = head_dim // 2
    freqs = base ** (-torch.arange(0, half, 2, device=rows.device, dtype=torch.float32) / half)  # (head_dim/4,)
    angles = torch.cat([rows.float()[..., None] * freqs, cols.float()[..., None] * freqs], dim=-1)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def raster_rope(positions: Tensor, grid_width: int, head_dim: int, base: float = 10000.0) -> Tensor:
    """`rope_2d` of raster positions r = row * grid_width + col: (...,) -> (..., head_dim // 2, 2)."""
    return rope_2d(positions // grid_width, positions % grid_width, head_dim, base)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x (B, T, H, D) by rope (B or 1, T, D/2, 2)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    cos, sin = rope[:, :, None, :, 0], rope[:, :, None, :, 1]
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2).type_as(x)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

def split_heads(x: Tensor, n_head: int) -> Tensor:
    """(B, T, dim) -> (B, T, H, D)."""
    return x.unflatten(-1, (n_head, -1))


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, D) -> (B, T, H * D)."""
    return x.transpose(1, 2).flatten(2)


def write_cache(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, start: int) -> tuple[Tensor, Tensor]:
    """Write k, v (B, H, n, D) at [start, start + n) of the preallocated (B, H, S, D) caches in place
    and return the filled prefix of each, (B, H, start + n, D)."""
    end = start + k.shape[2]
    k_cache[:, :, start:end] = k
    v_cache[:, :, start:end] = v
    return k_cache[:, :, :end], v_cache[:, :, :end]


def attention(q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False, attn_mask: Optional[Tensor] = None,
              dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(D)) v for q (B, H, Tq, D), k/v (B, H, Tk, D); a bool `attn_mask`
    (Tq, Tk) or (B, 1, Tq, Tk) is True where attending is allowed. Returns (B, H, Tq, D)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p)


def block_causal_mask(block_sizes: Sequence[int], causal_within: bool = False,
                      device: torch.device | str | None = None) -> Tensor:
    """(L, L) bool, L = sum(block_sizes): position i may attend to position j when j lies in an
    earlier block than i, or in the same block (both directions, or only j <= i with
    `causal_within`). Blocks of one position give the plain causal mask."""
    block = torch.repeat_interleave(torch.arange(len(block_sizes), device=device),
                                    torch.tensor(block_sizes, device=device), output_size=sum(block_sizes))  # (L,)
    same_block = block[None, :] == block[:, None]
    if causal_within:
        same_block &= torch.ones_like(same_block).tril()
    return (block[None, :] < block[:, None]) | same_block
