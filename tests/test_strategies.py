"""Decoding strategies: spread orders, confidence-guided positions, schedules and ramps."""

import itertools
import math

import pytest
import torch

import arpg.sample as sample
import arpg.sample.draw as draw
from arpg.models.arpg_steps import ARPGStepEngine
from arpg.orders import decode_schedule, halton_order, locality_order, make_plan, random_order
from arpg.sample import SamplingOptions
from arpg.sample.decode import cfg_scales, decode_grid, token_sampler
from arpg.sample.positions import position_selector

# The random tiny model of test_sample (every prediction depends on position and context) on its
# 4x4 grid, single-threaded like there.
from test_sample import GRID, T, model  # noqa: F401 (a fixture, used by name)

pytestmark = pytest.mark.usefixtures("one_thread")


def _is_permutation(order, num_tokens):
    return bool((order.sort(dim=-1).values == torch.arange(num_tokens)).all())


def _target_ids(step, slots, logits):
    """A `choose` returning each target's own index, so the output shows where each target went."""
    if isinstance(slots, slice):
        return torch.arange(slots.start, slots.stop).expand(logits.shape[0], -1)
    return slots.clone()


# ---------------------------------------------------------------------------------------------
# Orders


@pytest.mark.parametrize("h, w", [(4, 4), (8, 8), (16, 16), (3, 7)])
def test_halton_order_is_a_seeded_permutation_per_sample(h, w):
    order = halton_order(3, h, w, torch.Generator().manual_seed(0))
    assert order.shape == (3, h * w) and _is_permutation(order, h * w)
    assert torch.equal(order, halton_order(3, h, w, torch.Generator().manual_seed(0)))
    assert len({tuple(row) for row in order.tolist()}) == 3


def _min_distance(positions, w):
    """The smallest distance between two of the raster positions (n,) on a grid of width w."""
    rows, cols = positions // w, positions % w
    d = ((rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2).double().sqrt()
    return d[~torch.eye(len(positions), dtype=torch.bool)].min().item()


def test_halton_prefixes_cover_the_grid_evenly():
    # The first 16 positions of 16x16 fall into the 16 blocks of 4x4 cells: a low-discrepancy order
    # hits far more of them than random positions do (16 balls in 16 bins: 10.3 on average).
    def blocks_hit(orders):
        return torch.tensor([len(set(((row[:16] // 16) // 4 * 4 + (row[:16] % 16) // 4).tolist()))
                             for row in orders]).double().mean().item()

    assert blocks_hit(halton_order(32, 16, 16, torch.Generator().manual_seed(0))) >= 12.5
    assert blocks_hit(random_order(32, 256, torch.Generator().manual_seed(0))) <= 10.5


@pytest.mark.parametrize("schedule", ["linear", "cosine", "arccos"])
def test_locality_order_spreads_each_step_next_to_the_decoded(schedule):
    h = w = 8
    sizes = decode_schedule(h * w, 8, schedule)
    plan = make_plan("locality", 4, h, w, 8, schedule, torch.Generator().manual_seed(0))
    assert plan.tokens_per_step == tuple(sizes) and _is_permutation(plan.order, h * w)
    ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    random = make_plan("random", 4, h, w, 8, schedule, torch.Generator().manual_seed(0))
    for b in range(4):
        for start, end in zip([0] + ends[:-1], ends):
            step = plan.order[b, start:end]
            if end - start > 1:  # positions of one step keep about sqrt(open / n) apart
                assert _min_distance(step, w) >= min(2.0, math.sqrt((h * w - start) / (end - start))) - 1e-9
        # once the canvas is a third decoded, every later position touches a decoded one
        decoded = torch.zeros(h * w, dtype=torch.bool)
        for start, end in zip([0] + ends[:-1], ends):
            step = plan.order[b, start:end]
            if start >= h * w // 3:
                rows, cols = step // w, step % w
                near = torch.stack([(rows + dr).clamp(0, h - 1) * w + (cols + dc).clamp(0, w - 1)
                                    for dr in (-1, 0, 1) for dc in (-1, 0, 1)])
                assert decoded[near].any(dim=0).all()
            decoded[step] = True
    assert not torch.equal(plan.order, random.order)


def test_locality_order_around_known_positions():
    priority = random_order(2, T, torch.Generator().manual_seed(0))
    known = torch.zeros(2, T, dtype=torch.bool)
    known[:, :GRID] = True  # the top row is known
    order = locality_order(priority, GRID, GRID, [4, 4, 4], decoded=known)
    assert order.shape == (2, T - GRID)
    for row in order:
        assert sorted(row.tolist()) == list(range(GRID, T))
        assert row[0] // GRID == 1  # the first position is next to the known row
        assert _min_distance(row[:4], GRID) >= math.sqrt(12 / 4)  # the first step's keep apart


# ---------------------------------------------------------------------------------------------
# Schedules and ramps


@pytest.mark.parametrize("schedule, power", [("square", 2), ("cube", 3)])
def test_growing_schedules_follow_their_formula(schedule, power):
    assert decode_schedule(64, 8, "square") == [1, 3, 5, 7, 9, 11, 13, 15]
    for num_tokens, steps in ((64, 4), (64, 8), (256, 16), (256, 64)):
        sizes = decode_schedule(num_tokens, steps, schedule)
        done = [sum(sizes[:i + 1]) for i in range(steps)]
        ideal = [num_tokens * ((i + 1) / steps) ** power for i in range(steps)]
        # rounded to the nearest count, except where a step must hold a token
        assert all(abs(d - x) <= 0.5 or sizes[i] == 1 or (i < steps - 1 and d == num_tokens - (steps - 1 - i))
                   for i, (d, x) in enumerate(zip(done, ideal))), (num_tokens, steps, sizes)


def test_ramps_follow_their_formulas():
    sizes = decode_schedule(64, 8, "cosine")
    determined = [sum(sizes[:i + 1]) for i in range(8)]
    falling = SamplingOptions(cfg=3.0, cfg_schedule="falling")
    assert cfg_scales(falling, sizes, known=0, total=64) == [1 + 2.0 * (64 - d) / 64 for d in determined]
    assert cfg_scales(falling, sizes, 0, 64)[-1] == 1.0
    # known context tokens (editing) count as determined from the start
    assert cfg_scales(falling, sizes, known=16, total=80) == [1 + 2.0 * (80 - 16 - d) / 80 for d in determined]
    rising = SamplingOptions(temperature=0.5, temperature_schedule="linear")
    assert rising.ramp("temperature", sizes, 0, 64) == [1 + (0.5 - 1) * d / 64 for d in determined]


@pytest.mark.parametrize("cfg_schedule, temperature_schedule", [("falling", "linear"), ("linear", "falling")])
def test_guidance_and_temperature_ramps_reach_the_draw(model, monkeypatch, cfg_schedule, temperature_schedule):
    """Record the raw conditional/unconditional logits of each step and the logits each draw gets:
    the draw sees (uncond + s_t (cond - uncond)) / temperature_t with s_t, temperature_t per formula."""
    raw, drawn = [], []
    predict, draw_tokens = model.predict, draw.draw_tokens
    monkeypatch.setattr(model, "predict", lambda *a: raw.append(predict(*a).clone()) or raw[-1].clone())
    monkeypatch.setattr(draw, "draw_tokens", lambda logits, u: drawn.append(logits.clone()) or draw_tokens(logits, u))
    options = SamplingOptions(steps=4, schedule="linear", cfg=3.0, cfg_schedule=cfg_schedule, temperature=0.6,
                              temperature_schedule=temperature_schedule)
    sample.generate(model, [0, 1], options, generator=torch.Generator().manual_seed(0))
    sizes = [4, 4, 4, 4]
    scales, temperatures = cfg_scales(options, sizes, 0, T), options.ramp("temperature", sizes, 0, T)
    assert len(set(scales)) == 4 and len(set(temperatures)) == 4
    for step, (both, logits) in enumerate(zip(raw, drawn)):
        cond, uncond = both[:2], both[2:]
        expected = (uncond + scales[step] * (cond - uncond)) / temperatures[step]
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Confidence-guided positions


def test_confidence_decodes_every_position_once_and_queries_the_open_ones(model, monkeypatch):
    queried = []
    predict = model.predict
    monkeypatch.setattr(model, "predict", lambda rope, *a: queried.append(rope.turns.shape[1]) or predict(rope, *a))
    options = SamplingOptions(cfg=2.0, positions="confidence", position_noise=1.0)
    for steps in (1, 3, T):
        queried.clear()
        plan = make_plan("random", 3, GRID, GRID, steps, "cosine", torch.Generator().manual_seed(steps))
        noise = torch.rand(3, steps, T, generator=torch.Generator().manual_seed(0))
        select = position_selector(options, plan.tokens_per_step, 0, T, noise)
        out = decode_grid(model, torch.tensor([0, 1, 2]), plan, _target_ids, options, select=select)
        # out[b, order[b, k]] == k: each target written exactly once, at its own position
        assert torch.equal(out.flatten(1).gather(1, plan.order), torch.arange(T).expand(3, -1))
        ends = [sum(plan.tokens_per_step[:i]) for i in range(steps)]
        assert queried == [T - start for start in ends]


@pytest.mark.parametrize("use_cache", [True, False])
def test_confidence_queries_the_open_positions_in_chunks(model, monkeypatch, use_cache):
    # The open positions' logits (all 256 of a 16x16 canvas at step 0, for every guided row) are
    # made, guided, drawn from and scored a chunk at a time: the same tokens as all at once.
    import arpg.models.arpg_steps as arpg_steps

    options = dict(steps=5, cfg=2.0, positions="confidence", position_noise=1.0, top_p=0.9, use_cache=use_cache)
    whole = sample.generate(model, [0, 1, 2], generator=torch.Generator().manual_seed(0), **options)
    queried = []
    target_logits = model.target_logits
    monkeypatch.setattr(model, "target_logits", lambda k, v, rope, *a, **kw: queried.append(
        getattr(rope, "turns", rope).shape[1]) or target_logits(k, v, rope, *a, **kw))
    monkeypatch.setattr(arpg_steps, "OPEN_LOGITS_BYTES", 3 * 4 * 6 * 16)  # 3 targets of 6 rows, 16 codes
    chunked = sample.generate(model, [0, 1, 2], generator=torch.Generator().manual_seed(0), **options)
    assert torch.equal(whole, chunked)
    starts = [0, *itertools.accumulate(decode_schedule(T, 5, "arccos")[:-1])]
    assert max(queried) == 3 and sum(queried) == sum(T - start for start in starts)


def test_confidence_commits_the_most_confident_positions(model, monkeypatch):
    """Without noise step s commits the n open positions whose drawn token has the highest
    log-probability; the cached logits equal a full recomputation along the chosen order."""
    committed, logged = [], []
    reorder = ARPGStepEngine.reorder_open

    def recording_reorder(self, order):
        committed.append(order.clone())
        return reorder(self, order)

    monkeypatch.setattr(ARPGStepEngine, "reorder_open", recording_reorder)
    options = SamplingOptions(cfg=None, positions="confidence", temperature=0.0)
    plan = make_plan("random", 2, GRID, GRID, 4, "linear", torch.Generator().manual_seed(0))
    select = position_selector(options, plan.tokens_per_step, 0, T, torch.rand(2, 4, T))

    def greedy(step, slots, logits):
        logged.append(logits.log_softmax(-1).amax(-1))  # log p of the greedy token, per open target
        return logits.argmax(-1)

    out = decode_grid(model, torch.tensor([1, 3]), plan, greedy, options, select=select)
    for confidence, order in zip(logged, committed):
        chosen = confidence.gather(1, order[:, :4])
        rest = confidence.gather(1, order[:, 4:])
        if rest.numel():
            assert (chosen.min(1).values >= rest.max(1).values).all()
    # Replaying the realised order as a fixed plan gives the same tokens: the cache stayed exact.
    realised = torch.stack([_realised_order(plan.order[b], [o[b] for o in committed], 4) for b in range(2)])
    replay = decode_grid(model, torch.tensor([1, 3]), type(plan)(realised, plan.tokens_per_step),
                   lambda step, slots, logits: logits.argmax(-1), SamplingOptions(cfg=None, temperature=0.0))
    assert torch.equal(out, replay)


def _realised_order(order, reorders, n):
    """The positions in the order a confidence decode committed them."""
    arrangement = order.clone()
    for step, o in enumerate(reorders):
        arrangement[step * n:] = arrangement[step * n:][o]
    return arrangement


def test_confidence_uses_the_same_cache_as_recomputation(model, cpu_kind):
    runs = []
    for use_cache in (True, False):
        options = SamplingOptions(steps=5, cfg=2.0, positions="confidence", position_noise=2.0, use_cache=use_cache)
        runs.append(sample.generate(model, [0, 1, 2], options, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(*runs)


def test_confidence_is_reproducible_and_batch_equals_single_runs(model):
    options = dict(steps=5, cfg=3.0, positions="confidence", position_noise=2.0, order="locality",
                   temperature=1.2, temperature_schedule="falling", cfg_schedule="falling", top_k=10)
    labels, seeds = [0, 3, 1, 2], [10, 11, 12, 13]
    batch = sample.generate(model, labels, generator=[torch.Generator().manual_seed(s) for s in seeds], **options)
    singles = [sample.generate(model, [label], generator=[torch.Generator().manual_seed(s)], **options)
               for label, s in zip(labels, seeds)]
    assert torch.equal(batch, torch.cat(singles))
    again = sample.generate(model, labels, generator=[torch.Generator().manual_seed(s) for s in seeds], **options)
    assert torch.equal(batch, again)
    other = sample.generate(model, labels, generator=[torch.Generator().manual_seed(s + 1) for s in seeds], **options)
    assert not torch.equal(batch, other)


def test_confidence_loop_never_syncs(model, no_host_sync):
    plan = make_plan("halton", 2, GRID, GRID, 6, "cosine", torch.Generator().manual_seed(0))
    options = SamplingOptions(cfg=3.0, positions="confidence", position_noise=1.0, temperature_schedule="linear")
    sampler = token_sampler(options, torch.rand(2, T), plan.tokens_per_step, 0, T)
    select = position_selector(options, plan.tokens_per_step, 0, T, torch.rand(2, 6, T))

    with no_host_sync("the decode loop"):
        decode_grid(model, torch.tensor([0, 2]), plan, sampler, options, select=select)


@pytest.mark.parametrize("order", ["random", "locality"])
def test_inpaint_with_confidence_never_queries_or_commits_a_known_position(model, monkeypatch, order):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16, (3, GRID, GRID), generator=g)
    keep = torch.rand(GRID, GRID, generator=g) < 0.5
    known = torch.view_as_complex(model.position_rope(keep.flatten().nonzero().flatten()))  # (K, D/2) rotations
    queried = []
    predict = model.predict
    monkeypatch.setattr(model, "predict", lambda rope, *a: queried.append(rope.turns.clone()) or predict(rope, *a))
    out = sample.inpaint(model, tokens, keep, [0, 1, 2], steps=3, cfg=2.0, positions="confidence",
                         position_noise=1.0, order=order, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[:, keep], tokens[:, keep])
    assert (out[:, ~keep] != tokens[:, ~keep]).any()
    for rope in queried:  # (rows, open, D/2): no query carries the rotation of a known position
        assert not (rope[:, :, None] == known[None, None]).all(-1).any()
    unknown = int((~keep).sum())
    sizes = decode_schedule(unknown, 3, "arccos")  # ARPG's own schedule over the unknown positions
    assert [rope.shape[1] for rope in queried] == [unknown - sum(sizes[:i]) for i in range(3)]


def test_inpaint_with_confidence_batch_equals_single_runs_with_different_counts(model):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16, (3, GRID, GRID), generator=g)
    keep = torch.rand(3, GRID, GRID, generator=g) < 0.5
    keep[1] = False
    keep[2, 0] = True
    options = dict(steps=3, cfg=2.0, positions="confidence", position_noise=1.0, order="locality")
    out = sample.inpaint(model, tokens, keep, [0, 1, 2], generator=[torch.Generator().manual_seed(s) for s in (1, 2, 3)],
                         **options)
    assert torch.equal(out[keep], tokens[keep])
    for b, s in enumerate((1, 2, 3)):
        single = sample.inpaint(model, tokens[b:b + 1], keep[b:b + 1], [b], generator=[torch.Generator().manual_seed(s)],
                                **options)
        assert torch.equal(single, out[b:b + 1])


def test_a_rule_registered_in_selectors_is_a_positions_value(model, monkeypatch):
    """The extension point: a selector builder under a new name in `SELECTORS` is all a rule needs."""
    import arpg.sample.positions as positions

    class LastFirst:  # commits the open positions from the end of the plan
        score = staticmethod(positions.ConfidenceSelector.score)

        def __call__(self, step, n, open_targets, scores):
            return torch.arange(open_targets.shape[1] - 1, -1, -1).expand_as(open_targets)

    built = []
    monkeypatch.setitem(positions.SELECTORS, "last_first", lambda *args: built.append(args) or LastFirst())
    out = sample.generate(model, [0, 1], steps=4, cfg=None, positions="last_first", order="raster",
                          generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, GRID, GRID) and len(built) == 1
    keep = torch.zeros(GRID, GRID, dtype=torch.bool)
    keep[0] = True
    sample.inpaint(model, out, keep, [0, 1], steps=3, cfg=2.0, positions="last_first")
    assert len(built) == 2 and built[1][2] == GRID  # the known tokens reach the builder


# ---------------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize("kwargs, name", [
    (dict(positions="entropy"), "positions"), (dict(position_noise=-1.0), "position_noise"),
    (dict(temperature_schedule="cosine"), "temperature_schedule"),
    (dict(temperature=0.0, temperature_schedule="linear"), "temperature"),
    (dict(order="hilbert"), "order"), (dict(cfg_schedule="cosine"), "cfg_schedule"),
])
def test_bad_strategy_options_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingOptions(**kwargs)



def test_scripts_take_the_strategies_through_their_sampling_group():
    from arpg.cli import compose_config
    from arpg.sample_fid import SampleFIDConfig

    overrides = ["checkpoint=x.pt", "sampling.positions=confidence", "sampling.position_noise=6.0",
                 "sampling.schedule=cube", "sampling.order=halton", "sampling.cfg_schedule=falling",
                 "sampling.temperature_schedule=linear", "sampling.temperature=0.8"]
    config = compose_config("sample_fid", SampleFIDConfig, overrides)
    assert config.sampling == dict(positions="confidence", position_noise=6.0, schedule="cube", order="halton",
                                   cfg_schedule="falling", temperature_schedule="linear", temperature=0.8)
    with pytest.raises(ValueError, match="positions"):
        compose_config("sample_fid", SampleFIDConfig, ["checkpoint=x.pt", "sampling.positions=best"])
