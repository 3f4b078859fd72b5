"""The fast paths: static-shape steps, bf16, the decode weights, host syncs in training, the thread
and bf16 policies, and the speed benchmark's code paths (at toy size; speed itself is measured by
scripts/bench_sample.py, never asserted)."""

import copy

import pytest
import torch

import arpg.sample as sample
from arpg.models import create_model
from arpg.models.arpg import query_bucket
from arpg.orders import DecodePlan, make_plan
from arpg.runtime import fast_bf16, set_cpu_threads, use_bf16
from arpg.sample import SamplingOptions
from arpg.sample.decode import decode_grid
from arpg.sample.draw import TokenSampler

GRID = 4
T = GRID * GRID


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    """As in test_sample: random weights large enough that every prediction depends on position."""
    torch.manual_seed(0)
    model = create_model("ARPG-tiny", vocab_size=16, block_size=T, num_classes=4, dim=64)
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, std=1.0 if "to_q" in name or "to_k" in name else 0.3)
    return model.eval()


class _Recorder:
    def __init__(self, choose):
        self.choose, self.logits = choose, []

    def __call__(self, slots, logits):
        self.logits.append(logits.clone())
        return self.choose(slots, logits)


# ---------------------------------------------------------------------------------------------
# Static-shape steps


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("schedule", ["arccos", [1, 2, 5, 8]])
def test_static_steps_give_the_tokens_and_logits_of_dynamic_steps(model, causal, schedule):
    # Padded queries and keys past the valid prefix must change nothing: the same draws from the
    # same uniforms, logits equal up to float rounding of the longer reductions.
    runs = []
    for static in (False, True):
        steps = None if isinstance(schedule, list) else 6
        plan = make_plan("random", 3, GRID, GRID, steps, schedule, torch.Generator().manual_seed(1))
        recorder = _Recorder(TokenSampler(torch.rand(3, T, generator=torch.Generator().manual_seed(2))))
        options = SamplingOptions(cfg=2.0, causal_within_step=causal, static=static)
        runs.append((decode_grid(model, torch.tensor([0, 1, 3]), plan, recorder, options), recorder.logits))
    (dynamic, dynamic_logits), (static, static_logits) = runs
    assert torch.equal(dynamic, static)
    for a, b in zip(dynamic_logits, static_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)  # the golden tolerance; a wrong mask moves them by O(1)


def test_static_editing_keeps_context_and_matches_dynamic(model):
    tokens = torch.randint(0, 16, (2, GRID, GRID), generator=torch.Generator().manual_seed(0))
    keep = torch.rand(2, GRID, GRID, generator=torch.Generator().manual_seed(1)) < 0.5
    outs = [sample.inpaint(model, tokens, keep, [0, 1], steps=3, cfg=2.0, static=static,
                           generator=torch.Generator().manual_seed(0)) for static in (False, True)]
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[1][keep], tokens[keep])


def test_static_steps_use_few_shapes(model, monkeypatch):
    shapes = set()
    predict = model.predict
    monkeypatch.setattr(model, "predict", lambda rope, cache, **kw: shapes.add(rope.turns.shape) or predict(rope, cache, **kw))
    plan = make_plan("random", 2, GRID, GRID, 7, "arccos", torch.Generator().manual_seed(0))
    decode_grid(model, torch.tensor([0, 2]), plan, TokenSampler(torch.rand(2, T)), SamplingOptions(cfg=3.0, static=True))
    # every step's queries are padded to a power of two: at most log2(T) + 1 distinct shapes
    assert {s[1] for s in shapes} == {query_bucket(n) for n in plan.tokens_per_step}
    assert [query_bucket(n) for n in (1, 2, 3, 4, 5, 16, 17)] == [1, 2, 4, 4, 8, 16, 32]


# ---------------------------------------------------------------------------------------------
# The decode weights


def test_decode_leaves_the_module_tree_and_state_dict_unchanged(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [name for name, _ in model.named_modules()]
    sample.generate(model, [0, 1], steps=4, static=True, generator=torch.Generator().manual_seed(0))
    after = model.state_dict()
    assert list(after) == list(before) and [name for name, _ in model.named_modules()] == modules
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_decode_weights_follow_the_parameters(model):
    # Weights are built per decode from the current parameters: a changed parameter changes the logits.
    model = copy.deepcopy(model)
    draw = lambda: sample.generate(model, [0, 1, 2, 3], steps=4, temperature=0, cfg=None)  # noqa: E731
    first = draw()
    with torch.no_grad():
        model.layers.self_dec[0].attn.to_v.weight.mul_(-3.0)
        model.layers.cross_dec[-1].ffn.w3.weight.mul_(-3.0)
    assert not torch.equal(first, draw())


# ---------------------------------------------------------------------------------------------
# bf16


def test_bf16_decode_matches_float32_within_rounding(golden_model, arpg_golden):
    """The autocast path CUDA runs, here on the CPU, teacher-forced with the reference's tokens so
    that every step compares like with like. bf16 keeps 8 significant bits (relative rounding
    2^-9 = 0.2%), and a logit accumulates some tens of such roundings through the 4 blocks, so
    each step's logits must agree to 3% of its largest logit (observed: at most 0.9%, no guidance),
    and the greedy token wherever float32's top-2 margin exceeds twice that bound."""
    B = arpg_golden["labels"].shape[0]
    plan = DecodePlan(arpg_golden["gen_order"].expand(B, -1), tuple(arpg_golden["num_pred_per_step"]))
    fixed = arpg_golden["gen_fixed_tokens"]
    runs = []
    for amp in (False, True):
        recorder = _Recorder(lambda slots, logits: fixed[:, slots])
        decode_grid(golden_model, arpg_golden["labels"], plan, recorder, SamplingOptions(cfg=None, amp=amp))
        runs.append(recorder.logits)
    compared = 0
    for exact, bf16 in zip(*runs):
        bound = 0.03 * exact.abs().max()
        assert (exact - bf16).abs().max() <= bound
        top2 = exact.topk(2, dim=-1).values
        clear = top2[..., 0] - top2[..., 1] > 2 * bound
        assert torch.equal(exact.argmax(-1)[clear], bf16.argmax(-1)[clear])
        compared += int(clear.sum())
    assert compared >= 10  # the check is not vacuous


def test_bf16_policy_is_detected_and_can_be_forced_either_way(caplog):
    cpu = torch.device("cpu")
    assert use_bf16(None, cpu) == fast_bf16("cpu") and isinstance(fast_bf16("cpu"), bool)
    assert use_bf16(True, cpu) and not use_bf16(False, cpu)
    with pytest.raises(ValueError, match="amp"):
        SamplingOptions(amp="yes")
    with pytest.raises(ValueError, match="static"):
        SamplingOptions(static=1)


# ---------------------------------------------------------------------------------------------
# Training step and threads


def test_training_step_without_checks_never_syncs(monkeypatch):
    torch.manual_seed(0)
    model = create_model("ARPG-tiny", vocab_size=16, block_size=T, num_classes=4, dim=32).train()
    tokens, labels = torch.randint(0, 16, (3, T)), torch.tensor([0, 1, 3])
    order = torch.rand(3, T).argsort(1)

    def no_sync(*args, **kwargs):
        raise AssertionError("the training step read a value back from the device")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__"):
            patch.setattr(torch.Tensor, name, no_sync)
        _, loss = model(tokens, labels, order, check=False)
        loss.backward()
    checked = model.check_inputs(tokens, labels, order)  # and the CPU-side check still catches bad values
    assert checked == (3, T)
    with pytest.raises(ValueError, match="permutation"):
        model.check_inputs(tokens, labels, order.flip(1).clamp(max=T - 2))
    with pytest.raises(ValueError, match="vocab_size"):
        model.check_inputs(tokens + 16, labels)


def test_set_cpu_threads():
    threads = torch.get_num_threads()
    try:
        assert set_cpu_threads(1) == 1 == torch.get_num_threads()
        assert set_cpu_threads(0) == 1  # 0 keeps the setting
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="threads"):
        set_cpu_threads(-1)


# ---------------------------------------------------------------------------------------------
# The benchmark (toy size: the code paths of the CUDA preset)


def test_speed_benchmark_dry_run(tmp_path):
    from arpg.cli import compose_config
    from arpg.reports.speed import BenchSampleConfig, bench_sample

    config = compose_config("bench_sample", BenchSampleConfig,
                            ["bench_preset=dry_run", "matmul_seconds=0.01", f"output={tmp_path}/b.json",
                             f"plot={tmp_path}/b.png"])
    report = bench_sample(config)
    modes = {(r["mode"], r["steps"]) for r in report["sampling"]}
    assert modes == {("eager", 4), ("static", 4), ("raster_ar", T), ("no_cache", 4)}
    assert all(r["images_per_s"] > 0 for r in report["sampling"])
    assert all(r["ops_per_step_per_layer"] > 0 for r in report["sampling"] if r["mode"] in ("eager", "static"))
    assert report["training"][0]["tokens_per_s"] > 0 and 0 < report["training"][0]["mfu"]
    assert (tmp_path / "b.json").is_file() and (tmp_path / "b.png").stat().st_size > 0
