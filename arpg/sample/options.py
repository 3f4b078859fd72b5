"""`SamplingOptions`: the one place that defines, documents and validates how to sample.

`generate`, `inpaint`, the scripts (`arpg/configs/sampling/`), training's sample grids, FID sampling and
the benchmarks all take one of these; a new sampling setting is added here and nowhere else. A
model carries one as its recipe (`model.sampling`, saved with its weights, `arpg.recipes`): a
decode starts from it unless a whole `SamplingOptions` is given (`resolve_options`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

from torch import Tensor

from arpg.errors import require
from arpg.orders import ORDERS, SCHEDULES
from arpg.sample.positions import SELECTORS

# How a per-step setting (guidance scale, temperature) moves over a decode, from its `value` and
# the number of tokens `determined` (known or decoded) after the step, out of `total`.
RAMPS: dict[str, Callable[[float, int, int], float]] = {
    "constant": lambda value, determined, total: value,
    # published ARPG guidance: from about 1 at the first step up to `value` at the last
    "linear": lambda value, determined, total: 1.0 + (value - 1.0) * determined / total,
    # the reverse: `value` at the start, 1 at the last step
    "falling": lambda value, determined, total: 1.0 + (value - 1.0) * (total - determined) / total,
}
CFG_SCHEDULES = tuple(RAMPS)


@dataclass
class SamplingOptions:
    """How to sample. `None` for `steps`, `schedule` and `order` means the model family's own
    decoding (ARPG: 64 steps, arccos, random order; LlamaGen: raster, one token per step; PAR: its
    regions), the only one LlamaGen and PAR take. docs/sampling.md explains each setting.

    Attributes:
        steps: decoding steps, in [1, T] for T tokens per image.
        schedule: tokens per step: a name of `arpg.orders.SCHEDULES`, "regions" (a regions
            order's own), or a list of ints summing to T.
        order: a name of `arpg.orders.ORDERS`, or (from Python) a permutation tensor (T,) or (B, T).
        cfg: guidance scale s, logits uncond + s * (cond - uncond); None or 1: no guidance, 0: the
            unconditional rows alone.
        cfg_schedule: how s moves over the decode, a name of `RAMPS` ("linear": published ARPG).
        temperature: logits are divided by it; 0 is greedy decoding.
        top_k, top_p: logit filters (`arpg.sample.draw.filter_logits`); 0 and 1 disable them.
        causal_within_step: tokens fed in one step attend causally instead of block-wise
            (published). ARPG only.
        use_cache: False recomputes the whole prefix at every step (same tokens; benchmarks).
        amp: bf16 autocast, cache and decode weights; None: on CUDA only (`arpg.runtime.use_bf16`).
        compile: torch.compile ARPG's fixed-shape decode steps.
        static: fixed-shape decode steps over the whole cache (CUDA graphs with `compile`). ARPG only.
        positions: which open positions a step commits, a rule of `arpg.sample.positions.SELECTORS`:
            "plan" (the order's next ones, published) or "confidence" (the most confident of all
            open positions; ARPG only).
        position_noise: scale of the Gumbel noise on the confidences, annealed to 0.
        temperature_schedule: how the temperature moves over the decode, a name of `RAMPS`.
    """

    steps: Optional[int] = None
    schedule: Any = None
    order: Any = None
    cfg: Optional[float] = 4.0
    cfg_schedule: str = "constant"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    causal_within_step: bool = False
    use_cache: bool = True
    amp: Optional[bool] = None
    compile: bool = False
    static: bool = False
    # decoding strategies (see the docstring)
    positions: str = "plan"
    position_noise: float = 0.0
    temperature_schedule: str = "constant"

    def __post_init__(self) -> None:
        require(self.steps is None or (isinstance(self.steps, int) and not isinstance(self.steps, bool)
                                       and self.steps >= 1),
                f"steps must be an int >= 1 or None (the model's own), got {self.steps!r}")
        require(self.schedule is None or self.schedule in (*SCHEDULES, "regions") or _is_int_list(self.schedule),
                f"schedule must be one of {[*SCHEDULES, 'regions']}, a list of ints or None, got {self.schedule!r}")
        require(self.order is None or isinstance(self.order, Tensor) or self.order in ORDERS,
                f"order must be one of {sorted(ORDERS)}, a permutation tensor or None, got {self.order!r}")
        require(self.cfg is None or self.cfg >= 0, f"cfg must be >= 0 (1 or None: no guidance), got {self.cfg}")
        require(self.cfg_schedule in CFG_SCHEDULES,
                f"cfg_schedule must be one of {CFG_SCHEDULES}, got {self.cfg_schedule!r}")
        require(self.temperature >= 0, f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        require(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        require(0 < self.top_p <= 1, f"top_p must be in (0, 1] (1: off), got {self.top_p}")
        require(self.amp is None or isinstance(self.amp, bool),
                f"amp must be true, false or null (bf16 where it is fast), got {self.amp!r}")
        require(isinstance(self.static, bool), f"static must be true or false, got {self.static!r}")
        require(self.positions in SELECTORS, f"positions must be one of {tuple(SELECTORS)}, got {self.positions!r}")
        require(not ((self.static or self.compile) and self.positions != "plan"),
                f"static=true and compile=true decode a fixed plan of positions; positions={self.positions} queries "
                "every open position (shapes change each step): set static=false and compile=false with it")
        require(self.position_noise >= 0, f"position_noise must be >= 0, got {self.position_noise}")
        require(self.temperature_schedule in RAMPS,
                f"temperature_schedule must be one of {tuple(RAMPS)}, got {self.temperature_schedule!r}")
        require(self.temperature_schedule == "constant" or self.temperature > 0,
                f"temperature must be > 0 with temperature_schedule={self.temperature_schedule!r}, "
                f"got {self.temperature}")

    def ramp(self, name: str, tokens_per_step: Sequence[int], known: int, total: int) -> list[float]:
        """Per-step values of the ramped setting `name` ("cfg" or "temperature") over a decode of
        `tokens_per_step` after `known` context tokens, out of `total` (see `RAMPS`)."""
        ramp, value = RAMPS[getattr(self, f"{name}_schedule")], float(getattr(self, name))
        values, determined = [], known
        for n in tokens_per_step:
            determined += n
            values.append(ramp(value, determined, total))
        return values

    @property
    def guided(self) -> bool:
        """Whether guidance runs (a doubled batch of conditional and unconditional rows)."""
        return self.cfg is not None and self.cfg != 1.0

    def __str__(self) -> str:
        """The settings that differ from the defaults, e.g. "steps=8 schedule=cosine temperature=0.7"."""
        default = SamplingOptions()
        changed = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                   if not isinstance(getattr(self, f.name), Tensor) and getattr(self, f.name) != getattr(default, f.name)]
        return " ".join(changed) or "defaults"

    def replace(self, **overrides: Any) -> SamplingOptions:
        """A copy with `overrides` applied (validated; an unknown name is an error naming it)."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - fields)
        require(not unknown, f"unknown sampling options {unknown}; allowed: {sorted(fields)}")
        return dataclasses.replace(self, **overrides)


def resolve_options(recipe: SamplingOptions, options: Optional[SamplingOptions | Mapping[str, Any]],
                    overrides: Mapping[str, Any]) -> SamplingOptions:
    """The options a decode uses. The rule: a whole `SamplingOptions` is used as it is (it replaces
    the model's recipe); None starts from `recipe` (`model.sampling`); a dict (what the scripts'
    `sampling` settings hold) and the keyword `overrides` replace single fields of that start.
    So `generate(model, labels, steps=8)` keeps the recipe's schedule and guidance."""
    require(options is None or isinstance(options, (SamplingOptions, Mapping)),
            f"options must be a SamplingOptions, a dict of its fields or None, got {type(options).__name__}")
    if isinstance(options, SamplingOptions):
        base, fields = options, dict(overrides)
    else:
        base, fields = recipe, {**(options or {}), **overrides}
    return base.replace(**fields) if fields else base


def _is_int_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
