"""Token orders and per-step group sizes for ARPG decoding, as plain data.

Positions are raster positions ``r = row * w + col`` of an ``h x w`` token grid, and an order
is a permutation of them: ``order[k]`` is the position decoded k-th. A decode schedule says
how many tokens of the order are predicted at each step. ``make_plan`` bundles both into a
``DecodePlan`` whose step boundaries are plain Python ints, so a sampler can slice the order
step by step without ever reading a number back from the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Orders


def random_order(
    batch: int,
    num_tokens: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    shared: bool = False,
) -> Tensor:
    """A uniformly random permutation per sample (or one for the whole batch), (B, T) int64.

    The noise is drawn on the generator's device and then moved to ``device``, so a seeded CPU
    generator gives the same orders whatever device the sampler runs on. With ``shared=True``
    the single order is expanded (a view, not a copy) to (B, T).
    """
    noise_device = generator.device if generator is not None else device
    rows = 1 if shared else batch
    # float64 noise: float32 has only 2^24 values, so ties (which bias argsort) are not rare.
    noise = torch.rand(
        rows, num_tokens, generator=generator, device=noise_device, dtype=torch.float64
    )
    order = noise.argsort(dim=-1).to(device)  # (rows, T)
    return order.expand(batch, num_tokens)


def raster_order(h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """Row-major order of an h x w grid, (T,) int64."""
    return torch.arange(h * w, device=device)


def _region_side(h: int, w: int, num_regions: int) -> int:
    """Side s of the s x s grid of regions, checking that the regions tile the h x w grid."""
    allowed = [s * s for s in range(1, min(h, w) + 1) if h % s == 0 and w % s == 0]
    if num_regions not in allowed:
        raise ValueError(
            f"num_regions must be a square s*s with s dividing h={h} and w={w}, "
            f"one of {allowed}, got {num_regions}"
        )
    return math.isqrt(num_regions)


def regions_order(
    h: int, w: int, num_regions: int, device: torch.device | str | None = None
) -> Tensor:
    """PAR-style order: the grid cut into an s x s grid of equal rectangles, (T,) int64.

    For each position p inside a region (raster order within the region), and for each region
    (raster order of regions), the token at p of that region. Decoded with
    ``regions_schedule``, the regions' top-left tokens come one at a time, after which every
    step predicts the same relative position in all regions at once.
    """
    side = _region_side(h, w, num_regions)
    grid = torch.arange(h * w, device=device).view(side, h // side, side, w // side)
    # (region_row, row_in_region, region_col, col_in_region) -> position in region outermost.
    return grid.permute(1, 3, 0, 2).flatten()


def regions_schedule(h: int, w: int, num_regions: int) -> list[int]:
    """The natural group sizes of ``regions_order``: [1] * R + [R] * (T / R - 1)."""
    _region_side(h, w, num_regions)
    return [1] * num_regions + [num_regions] * (h * w // num_regions - 1)


def check_order(order: Tensor, num_tokens: int, batch: int | None = None) -> Tensor:
    """Validate a user-given order and return it as int64.

    ``order`` has shape (T,) or (B, T) and every row is a permutation of 0..T-1. Without
    ``batch`` the shape is kept; with it the result is (batch, T), expanding a (T,) or (1, T)
    order to the whole batch.
    """
    if not isinstance(order, Tensor):
        raise ValueError(f"order must be a torch.Tensor, got {type(order).__name__}")
    if order.dtype.is_floating_point or order.dtype.is_complex or order.dtype == torch.bool:
        raise ValueError(f"order must have an integer dtype, got {order.dtype}")
    if order.dim() not in (1, 2) or order.shape[-1] != num_tokens:
        raise ValueError(
            f"order must have shape (T,) or (B, T) with T={num_tokens}, got {tuple(order.shape)}"
        )
    order = order.long()
    expected = torch.arange(num_tokens, device=order.device)
    is_permutation = (order.sort(dim=-1).values == expected).all(dim=-1)  # () or (B,)
    if not is_permutation.all():
        bad_rows = (~is_permutation).nonzero().flatten().tolist()
        where = f" (rows {bad_rows})" if order.dim() == 2 else ""
        raise ValueError(f"order must be a permutation of 0..{num_tokens - 1}{where}")
    if batch is None:
        return order
    rows = order.reshape(-1, num_tokens)
    if rows.shape[0] not in (1, batch):
        raise ValueError(f"order has {rows.shape[0]} rows but batch={batch}; give 1 or {batch}")
    return rows.expand(batch, num_tokens)


def _radical_inverse(indices: Tensor, base: int) -> Tensor:
    """Van der Corput: the base-`base` digits of each index mirrored behind the point, float64."""
    result = torch.zeros(indices.shape, dtype=torch.float64)
    scale, rest = 1.0 / base, indices.clone()
    while bool(rest.any()):
        result += (rest % base).double() * scale
        rest, scale = rest // base, scale / base
    return result


def halton_order(
    batch: int,
    h: int,
    w: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """A low-discrepancy order per sample, (B, T) int64: every prefix covers the grid evenly.

    The 2-D Halton sequence (base 2 across columns, base 3 down rows), shifted by a random offset
    per sample on the unit torus (a Cranley-Patterson rotation), visits the grid's cells; a cell
    takes the rank of its first visit. 2^a * 3^b points with 2^a >= 2w and 3^b >= 2h hit every
    cell: each cell then contains a whole elementary box of the sequence, which holds one point.
    """
    points = (2 ** math.ceil(math.log2(2 * w))) * (3 ** math.ceil(math.log(2 * h, 3) - 1e-9))
    index = torch.arange(points)
    noise_device = generator.device if generator is not None else device
    shift = torch.rand(batch, 2, generator=generator, device=noise_device, dtype=torch.float64).cpu()
    cols = ((_radical_inverse(index, 2) + shift[:, :1]) % 1.0 * w).long().clamp_(max=w - 1)  # (B, points)
    rows = ((_radical_inverse(index, 3) + shift[:, 1:]) % 1.0 * h).long().clamp_(max=h - 1)
    first_visit = torch.full((batch, h * w), points).scatter_reduce_(
        1, rows * w + cols, index.expand(batch, -1), reduce="amin")  # (B, T)
    return first_visit.argsort(dim=1).to(device)


def locality_order(
    priority: Tensor, h: int, w: int, tokens_per_step: Sequence[int], decoded: Tensor | None = None
) -> Tensor:
    """Spread each step's positions apart and keep them near what is already decoded.

    Greedy, one position at a time: a step takes the open position farthest from the positions
    it already took, up to the step's spacing sqrt(open / n) (n positions spread evenly over the
    open area are about that far apart); among those equally far, the one nearest a decoded
    position (decoded before the step); then the earliest in `priority`. Positions of one step
    thus see little of each other's missing context and much of the decoded one.

    Args:
        priority: (B, T) a permutation per sample (e.g. a random order), the last tie-break.
        tokens_per_step: the steps' sizes, summing to the number of open positions.
        decoded: (B, T) bool, positions known before the first step (editing); None: none.
    Returns:
        (B, N) the N open positions in decoding order.
    """
    B, T = priority.shape
    device = priority.device
    decoded = torch.zeros(B, T, dtype=torch.bool, device=device) if decoded is None else decoded.clone()
    num_open = T if decoded is None else int(T - decoded[0].sum())
    _check_group_sizes(tokens_per_step, num_open, None, "tokens_per_step")
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).view(T, 2)
    distance = torch.cdist(coords.double(), coords.double()).to(device)  # (T, T)
    rank = priority.argsort(dim=1).double() / T  # (B, T) in [0, 1): the last tie-break
    far = torch.finfo(torch.float64).max
    to_decoded = torch.where(decoded[:, :, None], distance, far).amin(dim=1)  # (B, T)
    rows = torch.arange(B, device=device)
    picked = []
    for n in tokens_per_step:
        spacing = math.sqrt((num_open - len(picked)) / n)
        to_step = torch.full((B, T), far, dtype=torch.float64, device=device)
        # Lexicographic: spacing reached (capped), then nearness to decoded, then priority.
        for _ in range(n):
            score = to_step.clamp(max=spacing) * (4 * T) - to_decoded.clamp(max=2 * T) - rank
            position = score.masked_fill(decoded, -far).argmax(dim=1)  # (B,)
            decoded[rows, position] = True
            to_step = torch.minimum(to_step, distance[position])
            picked.append(position)
        to_decoded = torch.minimum(to_decoded, distance[torch.stack(picked[-n:], 1)].amin(dim=1))
    return torch.stack(picked, dim=1)


# Every named order: (batch, h, w, generator, device) -> (B, T) int64.
ORDERS: dict[str, Callable[..., Tensor]] = {
    "random": lambda b, h, w, gen, dev: random_order(b, h * w, gen, dev),
    "random_shared": lambda b, h, w, gen, dev: random_order(b, h * w, gen, dev, shared=True),
    "raster": lambda b, h, w, gen, dev: raster_order(h, w, dev).expand(b, -1),
    "regions4": lambda b, h, w, gen, dev: regions_order(h, w, 4, dev).expand(b, -1),
    "regions16": lambda b, h, w, gen, dev: regions_order(h, w, 16, dev).expand(b, -1),
    "halton": halton_order,
    # a random order here, made locality-aware by `make_plan` once the schedule is known
    "locality": lambda b, h, w, gen, dev: random_order(b, h * w, gen, dev),
}
# Orders that depend on the schedule: refined from the named order's output by `locality_order`.
SCHEDULE_AWARE_ORDERS = ("locality",)

# The region count behind each order with a natural schedule (raster is one region: one token per step).
_REGION_COUNTS = {"raster": 1, "regions4": 4, "regions16": 16}


def make_order(
    order: str | Tensor,
    batch: int,
    h: int,
    w: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """A (B, T) int64 order from a name in ``ORDERS`` or from a user permutation tensor.

    Orders shared across the batch are expanded views; ``.clone()`` one before writing to it.
    """
    if isinstance(order, Tensor):
        return check_order(order, h * w, batch).to(device)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {sorted(ORDERS)} or a tensor, got {order!r}")
    return ORDERS[order](batch, h, w, generator, device)


# ---------------------------------------------------------------------------------------------
# Schedules

# Fraction of the T tokens still masked after step s of n. arccos and cosine are evaluated in
# float64 exactly as the published sampler does, so the rounding of int(T * ratio) matches it.
# linear is exact: in float64, T * (1 - (s+1)/n) can land just below an integer and floor one
# too low, which empties a step (T = steps = 10 would give [..., 2, 0, 1]).
_MASK_RATIOS: dict[str, Callable[[int, int], float | Fraction]] = {
    "arccos": lambda s, n: math.acos((s + 1) / n) / (math.pi / 2),
    "cosine": lambda s, n: math.cos(math.pi / 2 * (s + 1) / n),
    "linear": lambda s, n: Fraction(n - s - 1, n),
}
# Schedules of ours whose steps grow: the fraction decoded after step s is t^p, t = (s+1)/n, so
# the first steps (decoded from the fewest context tokens, with the least to go on) stay small.
# "square" (p = 2) grows the step sizes linearly: 8 steps of 64 tokens are 1, 3, 5, ..., 15.
_GROWTH_POWERS = {"square": 2, "cube": 3}
SCHEDULES = (*_MASK_RATIOS, *_GROWTH_POWERS)


def _growing_schedule(num_tokens: int, steps: int, power: int) -> list[int]:
    """Cumulative counts round(T * t^power) (exact), kept >= 1 per step and leaving >= 1 per remaining step."""
    done, sizes = 0, []
    for step in range(steps):
        fraction = Fraction(step + 1, steps) ** power
        target = math.floor(num_tokens * fraction + Fraction(1, 2))
        target = min(max(target, done + 1), num_tokens - (steps - 1 - step))
        sizes.append(target - done)
        done = target
    return sizes


def _check_group_sizes(
    sizes: Sequence[int], num_tokens: int, steps: int | None, name: str = "schedule"
) -> list[int]:
    """Validate explicit tokens-per-step: ints >= 1 summing to num_tokens, `steps` of them."""
    if not all(isinstance(n, Integral) and not isinstance(n, bool) and n >= 1 for n in sizes):
        raise ValueError(f"{name} must hold ints >= 1 (tokens per step), got {list(sizes)}")
    sizes = [int(n) for n in sizes]
    if sum(sizes) != num_tokens:
        raise ValueError(f"{name} must sum to num_tokens={num_tokens}, got sum {sum(sizes)}")
    if steps is not None and steps != len(sizes):
        raise ValueError(
            f"{name} has {len(sizes)} steps but steps={steps}; pass steps={len(sizes)} or None"
        )
    return sizes


def decode_schedule(
    num_tokens: int, steps: int | None, schedule: str | Sequence[int] = "arccos"
) -> list[int]:
    """Tokens predicted at each of ``steps`` decoding steps; each >= 1, summing to num_tokens.

    A named schedule follows the published ARPG sampler: with ``done`` tokens already
    predicted before step s, mask_len = clamp(int(T * mask_ratio(s)), 1, T - done - 1) and
    num_pred = T - done - mask_len, while the last step takes every remaining token.
    mask_ratio(s) with t = (s+1)/steps is arccos(t)/(pi/2) for "arccos", cos(pi/2 * t) for
    "cosine" and 1 - t (exact rational arithmetic) for "linear". "arccos" and "cosine" give
    the published lists bit for bit, lopsided as they are (arccos over 64 steps puts 28 of 256
    tokens in its last step).

    No step is ever empty for 1 <= steps <= T, so the published rule is used unchanged: all
    three mask ratios are concave in t, hence >= 1 - t, so int(T * mask_ratio(s)) >=
    steps - 1 - s and after every step but the last at least one token stays masked per
    remaining step. (The tests check this for every steps of many T.)

    "square" and "cube" (ours) decode a fraction t^2 or t^3 of the tokens by the end of step
    s, rounded, with at least one token per step: small first steps, growing ones after.

    ``schedule`` may also be an explicit list of tokens per step; ``steps`` then may be None.
    """
    if not isinstance(schedule, str):
        return _check_group_sizes(schedule, num_tokens, steps)
    if schedule not in SCHEDULES:
        raise ValueError(
            f"schedule must be one of {list(SCHEDULES)} or a list of ints, got {schedule!r}"
        )
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if not isinstance(steps, int) or not 1 <= steps <= num_tokens:
        raise ValueError(f"steps must be in [1, {num_tokens}], got {steps}")
    if schedule in _GROWTH_POWERS:
        return _growing_schedule(num_tokens, steps, _GROWTH_POWERS[schedule])
    mask_ratio = _MASK_RATIOS[schedule]
    sizes = []
    done = 0
    for step in range(steps - 1):
        mask_len = min(max(int(num_tokens * mask_ratio(step, steps)), 1), num_tokens - done - 1)
        sizes.append(num_tokens - done - mask_len)
        done += sizes[-1]
    sizes.append(num_tokens - done)
    return sizes


# ---------------------------------------------------------------------------------------------
# Plans


@dataclass(frozen=True, eq=False)
class DecodePlan:
    """Which positions are decoded at which step: step i predicts the next
    ``tokens_per_step[i]`` positions of ``order``. The step sizes are Python ints, fixed up front,
    so a sampler never synchronises with the device to find them."""

    order: Tensor  # (B, T) int64 raster positions in decoding order
    tokens_per_step: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.order.dim() != 2:
            raise ValueError(f"order must have shape (B, T), got {tuple(self.order.shape)}")
        _check_group_sizes(self.tokens_per_step, self.order.shape[1], None, "tokens_per_step")

    @property
    def num_steps(self) -> int:
        return len(self.tokens_per_step)

    @property
    def num_tokens(self) -> int:
        return self.order.shape[1]


@dataclass(frozen=True)
class DecodeRules:
    """How a model family decodes when the sampling options leave order, steps or schedule unset
    (None), and whether it can decode any other way.

    ARPG decodes any order with any schedule; LlamaGen and PAR are trained on one sequence and
    decode only along it (``fixed``): then an order, steps or schedule other than their own is
    an error naming the option.
    """

    order: str
    steps: int | None
    schedule: str | None
    fixed: bool = False
    schedule_text: str = ""  # the family's own schedule in words, for messages (e.g. "one token per step")


def make_plan(
    order: str | Tensor,
    batch: int,
    h: int,
    w: int,
    steps: int | None,
    schedule: str | Sequence[int] | None = "arccos",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    parts: Sequence[tuple[int, torch.Generator | None]] | None = None,
) -> DecodePlan:
    """Build the order (see ``make_order``) and its schedule (see ``decode_schedule``).

    ``parts`` [(rows, generator)] (rows summing to ``batch``, in place of ``generator``) draws a
    named order part by part, e.g. one generator per sample; a schedule-aware order is then
    refined once for the whole batch, not once per part.

    ``schedule=None`` or ``"regions"`` means the order's natural schedule, which only the
    raster and regions orders have: ``regions_schedule``, with R + T/R - 1 steps (raster: R = 1,
    one token per step, as LlamaGen decodes). ``steps`` may be None
    when the schedule fixes the number of steps (natural or explicit schedules).
    """
    if schedule is None or schedule == "regions":
        if not isinstance(order, str) or order not in _REGION_COUNTS:
            got = repr(order) if isinstance(order, str) else "a tensor"
            raise ValueError(
                f"schedule={schedule!r} (the order's natural schedule) needs order in "
                f"{sorted(_REGION_COUNTS)}, got order={got}"
            )
        schedule = regions_schedule(h, w, _REGION_COUNTS[order])
    tokens_per_step = decode_schedule(h * w, steps, schedule)
    if parts is None or isinstance(order, Tensor):
        order_tensor = make_order(order, batch, h, w, generator, device)
    else:
        if sum(rows for rows, _ in parts) != batch:
            raise ValueError(f"parts must cover the batch of {batch} rows, got {[rows for rows, _ in parts]}")
        order_tensor = torch.cat([make_order(order, rows, h, w, g, device) for rows, g in parts])
    if isinstance(order, str) and order in SCHEDULE_AWARE_ORDERS:
        order_tensor = locality_order(order_tensor, h, w, tokens_per_step)
    return DecodePlan(order_tensor, tuple(tokens_per_step))
