import json
import math
from fractions import Fraction

import pytest
import torch

from arpg.orders import (
    ORDERS,
    SCHEDULES,
    DecodePlan,
    check_order,
    decode_schedule,
    make_order,
    make_plan,
    random_order,
    raster_order,
    regions_order,
    regions_schedule,
)
from conftest import data_file

PUBLISHED_STEPS = (8, 16, 32, 64, 128, 256)


@pytest.fixture(scope="module")
def published_schedules() -> dict[str, list[int]]:
    reference = json.loads(data_file("arpg_decode_schedules.json").read_text())
    assert reference["seq_len"] == 256
    return reference["schedules"]


def _is_permutation(order: torch.Tensor, num_tokens: int) -> bool:
    return bool((order.sort(dim=-1).values == torch.arange(num_tokens)).all())


# --- schedules --------------------------------------------------------------------------------


def test_reference_file_holds_exactly_the_expected_lists(published_schedules):
    expected = {f"{name}_num_iter{n}" for name in ("arccos", "cosine") for n in PUBLISHED_STEPS}
    assert set(published_schedules) == expected


@pytest.mark.parametrize("steps", PUBLISHED_STEPS)
@pytest.mark.parametrize("schedule", ["arccos", "cosine"])
def test_published_schedules_reproduced_exactly(published_schedules, schedule, steps):
    expected = published_schedules[f"{schedule}_num_iter{steps}"]
    assert decode_schedule(256, steps, schedule) == expected


def test_tiny_golden_schedule():
    assert decode_schedule(16, 4, "arccos") == [3, 3, 3, 7]


def test_published_lopsidedness_is_kept():
    # Documented defects of the published schedules, kept for fidelity with its checkpoints.
    assert decode_schedule(256, 64, "arccos")[-1] == 28
    assert decode_schedule(256, 64, "cosine")[:14] == [1] * 13 + [2]


def _published_rule(num_tokens, steps, mask_ratio):
    """The README's rule, written independently: the oracle for the deviation test."""
    sizes, done = [], 0
    for step in range(steps):
        if step == steps - 1:
            sizes.append(num_tokens - done)
            break
        upper = num_tokens - done - 1
        mask_len = max(1, min(math.floor(num_tokens * mask_ratio(step, steps)), upper))
        sizes.append(num_tokens - done - mask_len)
        done += sizes[-1]
    return sizes


def test_named_schedules_follow_the_published_rule_without_deviation():
    ratios = {
        "arccos": lambda s, n: math.acos((s + 1) / n) / (math.pi / 2),
        "cosine": lambda s, n: math.cos(math.pi / 2 * (s + 1) / n),
        "linear": lambda s, n: Fraction(n - s - 1, n),
    }
    assert set(ratios) == set(SCHEDULES) - {"square", "cube"}  # ours follow their own rule (test_strategies)
    for name, ratio in ratios.items():
        for num_tokens in (1, 2, 3, 5, 16, 17, 64):
            for steps in range(1, num_tokens + 1):
                assert decode_schedule(num_tokens, steps, name) == _published_rule(
                    num_tokens, steps, ratio
                ), (name, num_tokens, steps)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("num_tokens", [1, 2, 3, 16, 64, 256])
def test_every_step_count_gives_a_valid_schedule(schedule, num_tokens):
    for steps in range(1, num_tokens + 1):
        sizes = decode_schedule(num_tokens, steps, schedule)
        assert len(sizes) == steps, (steps, sizes)
        assert min(sizes) >= 1, (steps, sizes)
        assert sum(sizes) == num_tokens, (steps, sizes)


def test_linear_is_exact():
    # Equal groups whenever steps divides T; float64 1 - (s+1)/n would empty a step at T=n=10.
    assert decode_schedule(16, 4, "linear") == [4, 4, 4, 4]
    for steps in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        assert decode_schedule(256, steps, "linear") == [256 // steps] * steps
    assert decode_schedule(10, 10, "linear") == [1] * 10


def test_explicit_schedule_is_validated():
    assert decode_schedule(16, 3, [1, 5, 10]) == [1, 5, 10]
    assert decode_schedule(16, None, (8, 8)) == [8, 8]
    for bad in ([1, 0, 15], [1, 5, 9], [1.0, 5, 10], [True, 5, 10]):
        with pytest.raises(ValueError, match="schedule"):
            decode_schedule(16, None, bad)
    with pytest.raises(ValueError, match="schedule has 2 steps but steps=3"):
        decode_schedule(16, 3, [8, 8])


@pytest.mark.parametrize("steps", [0, 17, -1, None])
def test_steps_out_of_range(steps):
    with pytest.raises(ValueError, match=rf"steps must be in \[1, 16\], got {steps}"):
        decode_schedule(16, steps, "arccos")


def test_unknown_schedule_name_lists_allowed():
    with pytest.raises(ValueError, match="schedule must be one of .*'arccos'.*'cosine'.*'linear'"):
        decode_schedule(16, 4, "cosin")


# --- orders -----------------------------------------------------------------------------------


def test_random_order_is_seeded_per_sample_and_shared():
    orders = random_order(4, 64, generator=torch.Generator().manual_seed(0))
    assert orders.shape == (4, 64) and orders.dtype == torch.int64
    assert _is_permutation(orders, 64)
    again = random_order(4, 64, generator=torch.Generator().manual_seed(0))
    other = random_order(4, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(orders, again)
    assert not torch.equal(orders, other)
    assert len({tuple(row) for row in orders.tolist()}) == 4

    shared = random_order(4, 64, generator=torch.Generator().manual_seed(0), shared=True)
    assert shared.shape == (4, 64) and _is_permutation(shared, 64)
    assert (shared == shared[:1]).all()


def test_raster_order():
    assert raster_order(3, 5).tolist() == list(range(15))


def test_regions_order_matches_hand_written_permutation():
    # 4x4 grid, 2x2 regions with top-left corners 0, 2, 8, 10; in-region offsets 0, 1, 4, 5.
    expected = [0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15]
    assert regions_order(4, 4, 4).tolist() == expected
    assert regions_schedule(4, 4, 4) == [1, 1, 1, 1, 4, 4, 4]


@pytest.mark.parametrize("h, w, num_regions", [(16, 16, 4), (16, 16, 16), (8, 4, 4), (8, 12, 16)])
def test_regions_order_is_a_permutation_with_natural_schedule(h, w, num_regions):
    order = regions_order(h, w, num_regions)
    assert _is_permutation(order, h * w)
    sizes = regions_schedule(h, w, num_regions)
    assert sum(sizes) == h * w
    assert len(sizes) == num_regions + h * w // num_regions - 1
    # The first R tokens are the regions' top-left corners, one per region.
    side = math.isqrt(num_regions)
    corners = {(r // w, r % w) for r in order[:num_regions].tolist()}
    assert corners == {(i * h // side, j * w // side) for i in range(side) for j in range(side)}


@pytest.mark.parametrize("h, w, num_regions", [(16, 16, 5), (16, 16, 9), (6, 6, 16)])
def test_regions_rejects_bad_region_count(h, w, num_regions):
    with pytest.raises(ValueError, match=r"num_regions must be .* one of \[.*\], got"):
        regions_order(h, w, num_regions)
    with pytest.raises(ValueError, match="num_regions"):
        regions_schedule(h, w, num_regions)


def test_check_order_accepts_and_expands():
    order = torch.tensor([2, 0, 1, 3], dtype=torch.int32)
    assert check_order(order, 4).dtype == torch.int64
    assert check_order(order, 4, batch=3).tolist() == [[2, 0, 1, 3]] * 3
    rows = torch.stack([torch.randperm(4) for _ in range(3)])
    assert torch.equal(check_order(rows, 4, batch=3), rows)


@pytest.mark.parametrize(
    "order, message",
    [
        (torch.tensor([0, 1, 1, 3]), "permutation"),
        (torch.tensor([[0, 1, 2, 3], [0, 1, 2, 4]]), r"permutation of 0..3 \(rows \[1\]\)"),
        (torch.tensor([-1, 0, 1, 2]), "permutation"),
        (torch.arange(5), r"shape \(T,\) or \(B, T\) with T=4"),
        (torch.arange(4).view(1, 2, 2), "shape"),
        (torch.arange(4, dtype=torch.float32), "integer dtype"),
        ([0, 1, 2, 3], "torch.Tensor"),
    ],
)
def test_check_order_rejects(order, message):
    with pytest.raises(ValueError, match=rf"^order must .*{message}"):
        check_order(order, 4)


def test_check_order_rejects_wrong_batch():
    with pytest.raises(ValueError, match="order has 2 rows but batch=3"):
        check_order(torch.arange(4).repeat(2, 1), 4, batch=3)


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_make_order_by_name(name):
    order = make_order(name, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert order.shape == (3, 64) and order.dtype == torch.int64
    assert _is_permutation(order, 64)
    shared = name not in ("random", "halton", "locality")  # per sample (halton: a random shift each)
    assert torch.equal(order[1], order[0]) == shared and torch.equal(order[2], order[0]) == shared
    if name not in ("raster", "regions4", "regions16"):  # seeded: the same generator state, the same order
        again = make_order(name, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        other = make_order(name, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        assert torch.equal(order, again) and not torch.equal(order, other)


def test_make_order_from_tensor_and_unknown_name():
    order = make_order(torch.arange(16).flip(0), 2, 4, 4)
    assert order.shape == (2, 16) and order[1, 0].item() == 15
    with pytest.raises(ValueError, match=r"order must be one of \[.*'random'.*'raster'"):
        make_order("spiral", 2, 4, 4)
    with pytest.raises(ValueError, match="order must be a permutation"):
        make_order(torch.zeros(16, dtype=torch.int64), 2, 4, 4)


# --- plans ------------------------------------------------------------------------------------


def test_plan_holds_the_order_and_python_int_step_sizes():
    plan = make_plan("random", 2, 16, 16, 64, "arccos", generator=torch.Generator().manual_seed(0))
    assert plan.order.shape == (2, 256)
    assert plan.num_steps == 64 and plan.num_tokens == 256
    assert plan.tokens_per_step == tuple(decode_schedule(256, 64, "arccos"))
    assert all(type(size) is int for size in plan.tokens_per_step)  # no device reads in the decode loop


@pytest.mark.parametrize("schedule", [None, "regions"])
def test_plan_with_natural_regions_schedule(schedule):
    plan = make_plan("regions4", 1, 4, 4, None, schedule)
    assert plan.tokens_per_step == (1, 1, 1, 1, 4, 4, 4)
    assert plan.order[0].tolist() == regions_order(4, 4, 4).tolist()
    assert make_plan("regions16", 1, 16, 16, 31, schedule).num_steps == 31
    raster = make_plan("raster", 2, 4, 4, None, schedule)  # one region: one token per step (LlamaGen)
    assert raster.tokens_per_step == (1,) * 16 and raster.order[1].tolist() == list(range(16))


def test_plan_rejects_natural_schedule_without_regions_and_bad_sizes():
    natural_needs_regions = r"schedule=None .* needs order in \['raster', 'regions16', 'regions4'\]"
    with pytest.raises(ValueError, match=natural_needs_regions):
        make_plan("random", 1, 4, 4, None, None)
    with pytest.raises(ValueError, match="schedule has 7 steps but steps=8"):
        make_plan("regions4", 1, 4, 4, 8, None)
    with pytest.raises(ValueError, match="tokens_per_step must sum to num_tokens=16"):
        DecodePlan(torch.arange(16).view(1, 16), (8, 7))


def test_locality_plan_per_sample_generators_runs_one_batched_greedy(monkeypatch):
    # FID passes one generator per image: the greedy loop (tiny kernels, on a GPU one launch
    # each) runs once for the batch, and each sample's order is still its own generator's.
    import arpg.orders as orders

    calls = []
    locality = orders.locality_order
    monkeypatch.setattr(orders, "locality_order", lambda priority, *a, **k: calls.append(priority.shape[0])
                        or locality(priority, *a, **k))
    def parts():
        return [(1, torch.Generator().manual_seed(seed)) for seed in range(4)]

    plan = make_plan("locality", 4, 4, 4, 5, "arccos", parts=parts())
    assert calls == [4]
    alone = [make_plan("locality", 1, 4, 4, 5, "arccos", g).order for _, g in parts()]
    assert torch.equal(plan.order, torch.cat(alone))
    # as the sampler plans it for a list of generators
    from types import SimpleNamespace

    from arpg.sample import SamplingOptions
    from arpg.sample.decode import decode_plan

    sampler_model = SimpleNamespace(decode_rules=orders.DecodeRules("random", 5, "arccos"), grid=(4, 4), system="ARPG")
    calls.clear()
    planned = decode_plan(sampler_model, SamplingOptions(order="locality"), 4, parts(), torch.device("cpu"))
    assert calls == [4] and torch.equal(planned.order, plan.order)
    with pytest.raises(ValueError, match="parts"):
        make_plan("random", 3, 4, 4, 5, parts=parts())
