"""Layers shared by every model family: RMSNorm, the SwiGLU MLP, 2-D RoPE and attention.

ARPG and LlamaGen (and PAR, which is LlamaGen with another sequence) are built from the same
math; each family keeps its own module names around these pieces so that published checkpoints
load with strict key checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Optional

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
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / rms(x) * weight over the last dim, normalised in float32 (for stability under bf16, as
    the published models do), cast back to x's dtype, then scaled."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True).add_(eps))).type_as(x) * weight


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
        return self.ffn_dropout(swiglu(x, self.w1.weight, self.w3.weight, self.w2.weight))


def swiglu(x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """w2(silu(w1 x) * w3 x). w1 and w3 stay two matmuls: faster on the CPU at decode shapes
    (docs/benchmarks.md, "Sampling speed")."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


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


class Rotation(NamedTuple):
    """A RoPE table (B, T, D/2, 2) as one unit complex number cos + i sin per channel pair, so
    that rotating the pair (a, b) to (a cos - b sin, b cos + a sin) is the complex product
    (a + ib)(cos + i sin): one kernel instead of six. Build it once per decode (`rotation`) and
    slice it per step (`Rotation.slice`)."""

    turns: Tensor  # (B, T, D/2) complex

    def slice(self, start: int, end: int) -> Rotation:
        """Positions [start, end) of the table."""
        return Rotation(self.turns[:, start:end])


def rotation(rope: Tensor) -> Rotation:
    """The `Rotation` of a RoPE table (B, T, D/2, 2) (cos, sin)."""
    return Rotation(torch.view_as_complex(rope.float().contiguous()))


def rotate(x: Tensor, rot: Rotation) -> Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x (B|1, T|1, ..., D) by `rot` (B, T, D/2), in
    float32 at least (the published precision) -> (B, T, ..., D) float32 (float64 for float64 x)."""
    turns = rot.turns
    shape = turns.shape[:2] + (1,) * (x.ndim - 3) + turns.shape[-1:]
    pairs = torch.view_as_complex(x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * turns.view(shape)).flatten(-2)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x (B, T, H, D) by rope (B or 1, T, D/2, 2)."""
    return rotate(x, rotation(rope)).type_as(x)


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


def write_cache_at(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Write k, v (B, H, n, D) at positions `index` (n,) (a device tensor) of the (B, H, S, D) caches
    in place and return the whole caches: the static-shape form of `write_cache`."""
    k_cache.index_copy_(2, index, k)
    v_cache.index_copy_(2, index, v)
    return k_cache, v_cache


# On the CPU, PyTorch's flash attention costs about twice what three plain kernels (q k^T,
# softmax, p v) cost when there are only a few queries per head, as in a decode step.
FEW_QUERIES = 4


def attention(q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False, attn_mask: Optional[Tensor] = None,
              dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(D)) v for q (B, H, Tq, D), k/v (B, H, Tk, D); a bool `attn_mask`
    (Tq, Tk) or (B, 1, Tq, Tk) is True where attending is allowed. Returns (B, H, Tq, D).

    The kernel is chosen by shape: SDPA, except on the CPU for at most `FEW_QUERIES` queries
    without causal mask or dropout, where batched matmuls are faster (eager only)."""
    if (not torch.compiler.is_compiling()  # compiled: one graph for every query count
            and q.device.type == "cpu" and q.shape[-2] <= FEW_QUERIES and not is_causal and dropout_p == 0.0):
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)  # (B, H, Tq, Tk)
        if attn_mask is not None:
            scores = scores.masked_fill_(~attn_mask, float("-inf"))
        return torch.matmul(scores.softmax(dim=-1).type_as(v), v)
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
