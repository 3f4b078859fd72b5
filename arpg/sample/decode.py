"""The decode loop every model family shares, and `generate`.

    model = load_model("arpg_300m.pt", device="cuda")
    vq = VQTokenizer.from_checkpoint("vq_ds16_c2i.pt").cuda()
    images = generate(model, [207, 360, 387, 974], tokenizer=vq)  # (4, 3, 256, 256), ARPG-L's published recipe
    images = generate(t2i_model, ["a red fox in snow"], cfg=7.5, tokenizer=vq)  # a text-to-image model

How one decode runs (`decode`):

* A `DecodePlan` (arpg.orders) fixes up front, as Python ints, which positions are predicted at
  each step, so the step loop never reads a number back from the device.
* The model's step engine (`model.step_engine(...)`, e.g. `arpg.models.arpg_steps.ARPGStepEngine`) owns the
  forward passes over a KV cache allocated once: called with the tokens chosen at the previous
  step, it returns the logits of this step's positions.
* bf16 (autocast, a bf16 cache and bf16 decode weights) runs where `SamplingOptions.amp` says:
  by default on a CUDA GPU and never on a CPU (the same tokens on every CPU), on any device with
  amp=True, never with amp=False (`arpg.runtime.use_bf16`).
* Classifier-free guidance runs the conditional and the unconditional rows as one doubled batch
  and mixes their logits as uncond + scale * (cond - uncond). The conditions (class ids, captions)
  pass through the model's `condition` (arpg.condition); the loop never looks inside them.
* The tokens are chosen by a `TokenSampler` (arpg.sample.draw) with uniforms drawn once per call:
  per generator part, the order, then one uniform per canvas position (then, for a position
  selector, one per step and canvas position). `generate` and editing share this setup: one
  `Draws` (`prepare_draws`) holds the options, conditions, generators and noise of a call.
* A position selector (`SamplingOptions.positions`, arpg.sample.positions) varies the plan: each
  step queries every open position and commits the step's count of them, chosen after the logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from arpg.errors import SettingError, require
from arpg.orders import SCHEDULES, DecodePlan, DecodeRules, make_plan
from arpg.runtime import use_bf16
from arpg.sample.draw import TokenSampler
from arpg.sample.options import SamplingOptions, resolve_options
from arpg.sample.positions import SELECTORS, PositionSelector, position_selector

# choose(step, slots, logits): the tokens (B, n) for the targets `slots` of step `step` given their
# guided float32 logits (B, n, V), which it may overwrite; `slots` is a slice of the N targets, or
# (B, n) target indices when a position selector queries the open ones. `TokenSampler` is the one
# used for sampling; the golden tests plug in the reference's fixed tokens.
Choose = Callable[[int, slice | Tensor, Tensor], Tensor]
# StepEngine(fed): the float32 logits (rows, n, V) of the next step's positions, given the tokens
# (rows, m) chosen at the previous step (None at the first step). Built with `query_open`, it
# returns an iterator over the logits of all open positions, in chunks along the positions, and
# has `reorder_open` (see ARPGStepEngine).
StepEngine = Callable[[Optional[Tensor]], Tensor | Iterator[Tensor]]
Generators = Optional[torch.Generator | Sequence[torch.Generator]]


# ---------------------------------------------------------------------------------------------
# Randomness and guidance
# ---------------------------------------------------------------------------------------------

def split_generators(generator: Generators, batch: int) -> list[tuple[int, Optional[torch.Generator]]]:
    """[(rows, generator)] covering the batch: one part for one generator, one per sample for a list."""
    if generator is None or isinstance(generator, torch.Generator):
        return [(batch, generator)]
    generators = list(generator)
    require(len(generators) == batch and all(isinstance(g, torch.Generator) for g in generators),
            f"generator must be a torch.Generator, None, or a list of {batch} generators (one per sample), "
            f"got {len(generators)} items")
    return [(1, g) for g in generators]


def draw_uniforms(parts: list[tuple[int, Optional[torch.Generator]]], num: int, device: torch.device) -> Tensor:
    """(B, num) uniforms, each part drawn from its own generator (on the generator's device)."""
    draws = [torch.rand(rows, num, generator=g, device=g.device if g is not None else device) for rows, g in parts]
    return torch.cat(draws).to(device)


def cfg_scales(options: SamplingOptions, tokens_per_step: Sequence[int], known: int, total: int
               ) -> Optional[list[float]]:
    """Guidance scale of each step (`SamplingOptions.cfg_schedule`), or None when there is no
    guidance. "linear" (published ARPG) ramps 1 + (cfg - 1) * (tokens determined after this step) /
    total; with `known` context tokens (editing) those count as determined from the start.
    """
    if not options.guided:
        return None
    return options.ramp("cfg", tokens_per_step, known, total)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def decode(model: nn.Module, conditions: Any, make_engine: Callable[[Any, torch.dtype], StepEngine],
           tokens_per_step: Sequence[int], choose: Choose, scales: Optional[Sequence[float]],
           progress: bool = False, select: Optional[PositionSelector] = None, *, bf16: bool = False) -> Tensor:
    """Decode N = sum(tokens_per_step) targets for each of B samples -> tokens (B, N), one per target
    (the engine's targets, in the plan's order).

    Args:
        conditions: a batch of B conditions of the model's `condition` (checked).
        make_engine: (a batch of rows conditions, cache dtype) -> the model's step engine; rows = 2B
            with guidance (conditional rows, then unconditional ones), else B. Built with
            `query_open` when `select` is given.
        tokens_per_step: how many targets each step commits.
        choose: picks the tokens of each step from the guided logits (see `Choose`).
        scales: guidance scale per step (`cfg_scales`), or None for no guidance.
        select: a position selector (arpg.sample.positions): each step then draws a token for every
            open target and commits the ones `select` puts first; None commits the plan's.
        bf16: autocast, a bf16 cache and bf16 decode weights (`SamplingOptions.amp` decided by
            `arpg.runtime.use_bf16`); False: the model's own dtype.
    """
    condition, device = model.condition, next(model.parameters()).device
    B, N = condition.batch_size(conditions), sum(tokens_per_step)
    guided = scales is not None
    if guided:
        conditions = condition.join(conditions, condition.unconditional(conditions))
    chosen = torch.empty(2 * B if guided else B, N, dtype=torch.long, device=device)  # both halves feed the same
    # decode slot -> target; a selector rearranges the open slots after each step
    arrangement = torch.arange(N, device=device).repeat(B, 1) if select is not None else None

    def guide(logits: Tensor, step: int) -> Tensor:
        """(rows, m, V) -> (B, m, V): uncond + (cond - uncond) * scale, in place in the cond rows."""
        if not guided:
            return logits
        return logits[:B].sub_(logits[B:]).mul_(scales[step]).add_(logits[B:])

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        engine = make_engine(conditions, torch.bfloat16 if bf16 else next(model.parameters()).dtype)
        start, fed = 0, None
        for step, n in enumerate(tqdm(tokens_per_step, desc="decoding", unit="step", leave=False,
                                      disable=not progress)):
            end = start + n
            if select is None:
                tokens = choose(step, slice(start, end), guide(engine(fed), step))  # (B, n)
            else:
                open_targets = arrangement[:, start:]  # (B, N - start)
                drawn, scores, done = [], [], 0
                for logits in engine(fed):  # (rows, m, V) of the next m open targets
                    logits = guide(logits, step)
                    targets = open_targets[:, done:done + logits.shape[1]]
                    drawn.append(choose(step, targets, logits.clone()))  # a token for every open target
                    scores.append(select.score(logits, drawn[-1]))
                    done += logits.shape[1]
                del logits  # one chunk of logits at a time
                order = select(step, n, open_targets, torch.cat(scores, 1))  # (B, N - start), committed first
                arrangement[:, start:] = open_targets.gather(1, order)
                tokens = torch.cat(drawn, 1).gather(1, order[:, :n])
                engine.reorder_open(order)
            chosen[:B, start:end] = tokens
            if guided:
                chosen[B:, start:end] = tokens
            fed = chosen[:, start:end]
            start = end
    if arrangement is None:
        return chosen[:B]
    return torch.empty_like(chosen[:B]).scatter_(1, arrangement, chosen[:B])


def resolve_decoding(rules: DecodeRules, options: SamplingOptions) -> tuple[Any, Optional[int], Any]:
    """(order, steps, schedule): the options', or the family's own where the options leave them
    None. Steps stay None for a schedule that fixes them (an explicit list, "regions")."""
    order = rules.order if options.order is None else options.order
    schedule = rules.schedule if options.schedule is None else options.schedule
    steps = options.steps
    if steps is None and isinstance(schedule, str) and schedule in SCHEDULES:
        steps = rules.steps
    return order, steps, schedule


def decode_plan(model: nn.Module, options: SamplingOptions, batch: int,
                parts: list[tuple[int, Optional[torch.Generator]]], device: torch.device) -> DecodePlan:
    """The plan of a whole-grid decode: the options' order, steps and schedule, or the model
    family's own where they are None (`model.decode_rules`); a random order comes from each
    generator part."""
    rules = model.decode_rules
    h, w = model.grid
    order, steps, schedule = resolve_decoding(rules, options)
    if rules.fixed:
        name = model.system
        require(options.order is None or (isinstance(options.order, str) and options.order == rules.order),
                f"order: {name} decodes only in its own order ({rules.order!r}); leave order unset")
        require(options.schedule is None or options.schedule == rules.schedule,
                f"schedule: {name} decodes with its own schedule ({rules.schedule_text}); leave schedule unset, "
                f"got {options.schedule!r}")
        steps = None  # its schedule fixes them (options.steps is checked against the plan below)
    plan = make_plan(order, batch, h, w, steps, schedule, device=device, parts=parts)
    require(not rules.fixed or options.steps is None or options.steps == plan.num_steps,
            f"steps: {model.system} decodes in {plan.num_steps} steps here; leave steps unset")
    return plan


def check_sampling(model: nn.Module, options: SamplingOptions, what: str = "sampling") -> None:
    """Raise `SettingError` (naming the setting as `<what>.<field>`) unless `options` make a decode
    plan on `model`'s grid, e.g. steps within the token count. Decodes nothing, so it runs before
    any work, on a model built on the meta device."""
    try:
        decode_plan(model, options, 1, [(1, None)], torch.device("cpu"))
    except ValueError as err:
        raise SettingError(f"{what}.{err}") from None


def generate(model: nn.Module, conditions: Any, options: Optional[SamplingOptions] = None, *,
             generator: Generators = None, tokenizer: Any = None, progress: bool = False,
             **overrides: Any) -> Tensor:
    """Sample one image per condition.

    Args:
        model: a model of any family (eval mode); its device decides where sampling runs.
        conditions: what the model's `condition` takes: B class ids in [0, num_classes), or for a
            text-to-image model B prompts (strings) or `arpg.condition.Captions`.
        options: a whole `SamplingOptions`, used as it is; None (default): the model's recipe,
            `model.sampling` (what its weights recorded, else the published settings). Keyword
            `overrides` replace single fields of either: `generate(model, labels, steps=8)`
            keeps the recipe's schedule, guidance and temperature.
        generator: a torch.Generator, or a list of B generators (one per sample: then sample b's
            order and noise come from generator[b] alone, so batching does not change results).
        tokenizer: when given, decode the tokens to images.
        progress: a tqdm bar over the steps.
    Returns:
        tokens (B, h, w) in raster order, or images (B, C, H, W) in [-1, 1] with a tokenizer.
    """
    draws = prepare_draws(model, conditions, options, overrides, generator, tokenizer)
    plan = decode_plan(model, draws.options, draws.batch, draws.parts, draws.device)
    draws.draw_noise(plan.order.shape[1], plan.num_steps)
    sampler, select = draws.rules(plan.order, plan.tokens_per_step, known=0)
    return draws.output(decode_grid(model, draws.conditions, plan, sampler, draws.options, progress, select))


def token_sampler(options: SamplingOptions, uniforms: Tensor, tokens_per_step: Sequence[int], known: int,
                  total: int) -> TokenSampler:
    """The `TokenSampler` of `options`, with uniforms (B, N) per target and the temperature of each
    step (`temperature_schedule`)."""
    temperature = options.temperature
    if options.temperature_schedule != "constant":
        temperature = tuple(options.ramp("temperature", tokens_per_step, known, total))
    return TokenSampler(uniforms, temperature, options.top_k, options.top_p)


def decode_grid(model: nn.Module, conditions: Any, plan: DecodePlan, choose: Choose, options: SamplingOptions,
                progress: bool = False, select: Optional[PositionSelector] = None) -> Tensor:
    """Decode whole grids along `plan`, choosing each step's tokens with `choose` (and positions
    with `select`, see `decode`) -> (B, h, w) in raster order. (`generate` with the draws made
    explicit; tests plug in fixed tokens.)"""
    h, w = model.grid
    require(select is None or not model.decode_rules.fixed,
            f"positions: {model.system} decodes only along its own sequence; use positions='plan'")
    runtime = engine_options(options, query_open=select is not None)

    def make_engine(rows: Any, cache_dtype: torch.dtype) -> StepEngine:
        return model.step_engine(rows, plan.order, plan.tokens_per_step, (h, w), cache_dtype=cache_dtype, **runtime)

    scales = cfg_scales(options, plan.tokens_per_step, known=0, total=h * w)
    per_target = decode(model, conditions, make_engine, plan.tokens_per_step, choose, scales, progress, select,
                        bf16=use_bf16(options.amp, next(model.parameters()).device))
    return torch.empty_like(per_target).scatter_(1, plan.order, per_target).view(-1, h, w)


def check_tokenizer(model: nn.Module, tokenizer: Any) -> None:
    """Raise unless `tokenizer` (when given) has as many codes as the model's vocabulary."""
    require(tokenizer is None or tokenizer.codebook_size == model.config.vocab_size,
            f"tokenizer has {getattr(tokenizer, 'codebook_size', '?')} codes but the model's vocab_size is "
            f"{model.config.vocab_size}; pass the tokenizer the model was trained on")


def engine_options(options: SamplingOptions, query_open: bool = False) -> dict[str, Any]:
    """The keywords every step engine takes from the options (`query_open` only where a position
    selector runs: the fixed-order engines do not take it)."""
    runtime: dict[str, Any] = dict(causal_within_step=options.causal_within_step, use_cache=options.use_cache,
                                   compile=options.compile, static=options.static)
    if query_open:
        runtime["query_open"] = True
    return runtime


@dataclass
class Draws:
    """What one `generate` or editing call prepares once (`prepare_draws`): the resolved options,
    the checked conditions, the generator parts, and the noise drawn up front per canvas position
    (`draw_noise`, after the orders), from which each decode of a set of targets gets its token
    sampler and position selector (`rules`)."""

    options: SamplingOptions
    conditions: Any
    batch: int
    parts: list[tuple[int, Optional[torch.Generator]]]
    device: torch.device
    tokenizer: Any = None
    uniforms: Optional[Tensor] = None  # (B, P) one per canvas position
    position_noise: Optional[Tensor] = None  # (B, S, P) one per step and canvas position, for a selector

    @property
    def bf16(self) -> bool:
        """Whether the decode runs in bf16 (`SamplingOptions.amp` on this device)."""
        return use_bf16(self.options.amp, self.device)

    def draw_noise(self, positions: int, num_steps: int) -> None:
        """Draw, per generator part, one uniform per canvas position, then (for a position
        selector) one per step (at most `num_steps`) and canvas position."""
        self.uniforms = draw_uniforms(self.parts, positions, self.device)
        if SELECTORS[self.options.positions] is not None:
            noise = draw_uniforms(self.parts, num_steps * positions, self.device)
            self.position_noise = noise.view(self.batch, num_steps, positions)

    def rules(self, targets: Tensor, tokens_per_step: Sequence[int], known: int, total: Optional[int] = None,
              rows: Optional[Tensor] = None) -> tuple[TokenSampler, Optional[PositionSelector]]:
        """(token sampler, position selector or None) of a decode of the canvas positions `targets`
        (G, N), in decode order, for the samples `rows` (default all), after `known` context tokens
        out of `total` (default: the canvas)."""
        uniforms = self.uniforms if rows is None else self.uniforms[rows]
        total = uniforms.shape[1] if total is None else total
        sampler = token_sampler(self.options, uniforms.gather(1, targets), tokens_per_step, known, total)
        if self.position_noise is None:
            return sampler, None
        noise = self.position_noise if rows is None else self.position_noise[rows]
        noise = noise.gather(2, targets[:, None].expand(-1, noise.shape[1], -1))
        return sampler, position_selector(self.options, tokens_per_step, known, total, noise)

    def output(self, tokens: Tensor) -> Tensor:
        """The tokens, or the images they decode to with a tokenizer."""
        return self.tokenizer.decode(tokens) if self.tokenizer is not None else tokens


def prepare_draws(model: nn.Module, conditions: Any, options: Optional[SamplingOptions | Mapping[str, Any]],
                  overrides: Mapping[str, Any], generator: Generators, tokenizer: Any) -> Draws:
    """The setup `generate` and editing share: the options (`resolve_options`), the tokenizer
    check, the conditions checked onto the model's device, and the generator parts."""
    options = resolve_options(model.sampling, options, overrides)
    check_tokenizer(model, tokenizer)
    device = next(model.parameters()).device
    conditions = model.condition.check(conditions, device=device)
    batch = model.condition.batch_size(conditions)
    return Draws(options, conditions, batch, split_generators(generator, batch), device, tokenizer)
