import copy

import pytest
import torch
from PIL import Image

import arpg.sample as sample
from arpg import create_model
from arpg.models.arpg_steps import ARPGStepEngine, query_bucket
from arpg.orders import DecodePlan, decode_schedule, make_plan
from arpg.sample import SamplingOptions, filter_logits
from arpg.sample.decode import cfg_scales, decode, decode_grid
from arpg.sample.draw import TokenSampler, draw_tokens

from conftest import in_child

GRID = 4  # the random test model decodes 4x4 grids
T = GRID * GRID


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (50x slower SDPA calls on shared cores otherwise)


@pytest.fixture(scope="module")
def model():
    """A random tiny model with every weight non-trivial (the published init zeroes the head) and
    q/k projections large enough that attention, hence every prediction, depends on position."""
    torch.manual_seed(0)
    model = create_model("ARPG-tiny", vocab_size=16, block_size=T, num_classes=4, dim=64)
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, std=1.0 if "to_q" in name or "to_k" in name else 0.3)
    return model.eval()


def _slot_ids(step, slots, logits):
    """A `choose` that returns each decode slot's own index, so the output shows where slot k went."""
    return torch.arange(slots.start, slots.stop).expand(logits.shape[0], -1)


class _Recorder:
    """Wraps a `choose`, keeping the logits it was given at each step."""

    def __init__(self, choose):
        self.choose, self.logits = choose, []

    def __call__(self, step, slots, logits):
        self.logits.append(logits.clone())
        return self.choose(step, slots, logits)


# ---------------------------------------------------------------------------------------------
# Golden reference


def _golden_run(golden_model, arpg_golden, **runtime):
    kwargs = arpg_golden["generate_kwargs"]
    B = arpg_golden["labels"].shape[0]
    plan = DecodePlan(arpg_golden["gen_order"].expand(B, -1), tuple(arpg_golden["num_pred_per_step"]))
    fixed = arpg_golden["gen_fixed_tokens"]
    recorder = _Recorder(lambda step, slots, logits: fixed[:, slots])
    options = SamplingOptions(cfg=kwargs["guidance_scale"], cfg_schedule=kwargs["cfg_schedule"], **runtime)
    out = decode_grid(golden_model, arpg_golden["labels"], plan, recorder, options)
    return out, recorder.logits


def test_golden_schedule_matches_reference(arpg_golden):
    kwargs = arpg_golden["generate_kwargs"]
    assert decode_schedule(kwargs["seq_len"], kwargs["num_iter"], kwargs["sample_schedule"]) == \
        arpg_golden["num_pred_per_step"]


def test_golden_decode_steps_and_output(golden_model, arpg_golden, monkeypatch, cpu_kind):
    raw = []
    predict = golden_model.predict

    def recording_predict(*args):
        logits = predict(*args)
        raw.append(logits.clone())  # the decode loop mixes the guidance into its own copy in place
        return logits

    monkeypatch.setattr(golden_model, "predict", recording_predict)
    out, logits = _golden_run(golden_model, arpg_golden)
    steps = arpg_golden["decode_steps"]
    assert len(logits) == len(raw) == len(steps)
    B = arpg_golden["labels"].shape[0]
    for step, combined, both in zip(steps, logits, raw):
        assert (combined - step["logits"]).abs().max() <= 1e-4
        assert (both[:B] - step["cond_logits"]).abs().max() <= 1e-4
        assert (both[B:] - step["uncond_logits"]).abs().max() <= 1e-4
    assert torch.equal(out.flatten(1), arpg_golden["generate_output"])


def test_golden_without_cache_matches_too(golden_model, arpg_golden, cpu_kind):
    out, logits = _golden_run(golden_model, arpg_golden, use_cache=False)
    for step, combined in zip(arpg_golden["decode_steps"], logits):
        assert (combined - step["logits"]).abs().max() <= 1e-4
    assert torch.equal(out.flatten(1), arpg_golden["generate_output"])


@pytest.mark.parametrize("causal", [True, False])
def test_causal_within_step_gives_the_training_forward_at_each_steps_first_slot(golden_model, arpg_golden, causal,
                                                                                 cpu_kind):
    # With a causal mask inside each step, the cache holds exactly the training forward's content
    # states, so each step's first query (which sees everything fed before it, as training's query
    # k sees the first k tokens) has the teacher-forced logits. Block-wise steps (published) do not.
    B = arpg_golden["labels"].shape[0]
    sizes = tuple(arpg_golden["num_pred_per_step"])
    order = arpg_golden["gen_order"].expand(B, -1)
    fixed = arpg_golden["gen_fixed_tokens"]
    recorder = _Recorder(lambda step, slots, logits: fixed[:, slots])
    decode_grid(golden_model, arpg_golden["labels"], DecodePlan(order, sizes), recorder,
                SamplingOptions(cfg=None, causal_within_step=causal))
    forward, _ = golden_model(arpg_golden["generate_output"], arpg_golden["labels"], order)
    first_slots = [sum(sizes[:i]) for i in range(len(sizes))]
    gaps = [(logits[:, 0] - forward[torch.arange(B), order[:, slot]]).abs().max()
            for logits, slot in zip(recorder.logits, first_slots)]
    if causal:
        assert max(gaps) <= 1e-4
    else:
        assert gaps[0] <= 1e-4 and max(gaps[1:]) > 1e-2  # step 0 feeds only the class token either way


def test_linear_cfg_scales_follow_published_formula():
    sizes = decode_schedule(256, 8, "arccos")
    scales = cfg_scales(SamplingOptions(cfg=4.0, cfg_schedule="linear"), sizes, known=0, total=256)
    done = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    assert scales == [1 + 3.0 * d / 256 for d in done]
    assert scales[-1] == 4.0
    assert cfg_scales(SamplingOptions(cfg=1.0, cfg_schedule="linear"), sizes, 0, 256) is None
    assert cfg_scales(SamplingOptions(cfg=None), sizes, 0, 256) is None


# ---------------------------------------------------------------------------------------------
# Cache


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_context", [0, 5])
def test_cached_logits_equal_full_recomputation(model, causal, num_context, cpu_kind):
    model = copy.deepcopy(model).double()  # rounding far below the tolerance: any gap is a logic error
    g = torch.Generator().manual_seed(1)
    B, N = 3, T - num_context
    positions = torch.rand(B, T, generator=g).argsort(1)
    context_pos, target_pos = positions[:, :num_context], positions[:, num_context:]
    context = dict(context_ids=torch.randint(0, 16, (B, num_context), generator=g),
                   context_rope=model.position_rope(context_pos)) if num_context else {}
    runs = []
    for use_cache in (True, False):
        recorder = _Recorder(lambda step, slots, logits: torch.randint(0, 16, logits.shape[:2],
                                                                 generator=torch.Generator().manual_seed(slots.start)))
        sizes = decode_schedule(N, 4, "cosine")
        options = SamplingOptions(cfg=2.0, causal_within_step=causal, use_cache=use_cache)

        def make_engine(conditions, cache_dtype):
            extra = dict(context, context_ids=context["context_ids"].repeat(2, 1)) if context else {}
            return ARPGStepEngine(model, conditions, model.position_rope(target_pos), sizes,
                               causal_within_step=causal, use_cache=use_cache, cache_dtype=cache_dtype, **extra)

        decode(model, torch.tensor([0, 1, 3]), make_engine, sizes, recorder, [2.0] * 4)
        runs.append(recorder.logits)
    for cached, recomputed in zip(*runs):
        torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=0)


@pytest.mark.parametrize("runtime", [{}, {"static": True}, {"amp": True}], ids=["dynamic", "static", "bf16"])
def test_cache_allocated_once_and_loop_never_syncs(model, monkeypatch, no_host_sync, runtime):
    caches = []
    new_cache = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda *a, **k: caches.append(new_cache(*a, **k)) or caches[-1])
    plan = make_plan("random", 2, GRID, GRID, 8, "linear", torch.Generator().manual_seed(0))
    sampler = TokenSampler(torch.rand(2, T), top_k=5, top_p=0.8)

    with no_host_sync("the decode loop"):
        decode_grid(model, torch.tensor([0, 2]), plan, sampler, SamplingOptions(cfg=3.0, cfg_schedule="linear", **runtime))
    assert len(caches) == 1
    fed = T if runtime.get("static") else T - plan.tokens_per_step[-1]  # static: one size for every schedule
    assert caches[0].self_k.shape[:4] == (2, 2 * 2, 4, 1 + fed)


# ---------------------------------------------------------------------------------------------
# Fast paths: static-shape steps, decode weights, bf16


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("schedule", ["arccos", [1, 2, 5, 8]])
def test_static_steps_give_the_tokens_and_logits_of_dynamic_steps(model, causal, schedule, cpu_kind):
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
    # every step's queries are padded to a power of two >= 2: at most log2(T) distinct shapes
    assert {s[1] for s in shapes} == {query_bucket(n) for n in plan.tokens_per_step}
    assert [query_bucket(n) for n in (1, 2, 3, 4, 5, 16, 17)] == [2, 2, 4, 4, 8, 16, 32]


def test_decode_leaves_the_module_tree_and_state_dict_unchanged(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [name for name, _ in model.named_modules()]
    sample.generate(model, [0, 1], steps=4, static=True, generator=torch.Generator().manual_seed(0))
    after = model.state_dict()
    assert list(after) == list(before) and [name for name, _ in model.named_modules()] == modules
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fused_weights_follow_the_parameters(model):
    # Weights are built per decode from the current parameters: a changed parameter changes the logits.
    model = copy.deepcopy(model)
    draw = lambda: sample.generate(model, [0, 1, 2, 3], steps=4, temperature=0, cfg=None)  # noqa: E731
    first = draw()
    with torch.no_grad():
        model.layers.self_dec[0].attn.to_v.weight.mul_(-3.0)
        model.layers.cross_dec[-1].ffn.w3.weight.mul_(-3.0)
    assert not torch.equal(first, draw())


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
        recorder = _Recorder(lambda step, slots, logits: fixed[:, slots])
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


# ---------------------------------------------------------------------------------------------
# Plans and output layout


@pytest.mark.parametrize("schedule", ["arccos", "cosine", "linear"])
def test_every_position_decoded_once_in_raster_output(model, schedule):
    labels = torch.tensor([0, 1, 2])
    for steps in range(1, T + 1):
        plan = make_plan("random", 3, GRID, GRID, steps, schedule, torch.Generator().manual_seed(steps))
        recorder = _Recorder(_slot_ids)
        out = decode_grid(model, labels, plan, recorder, SamplingOptions(cfg=None))
        assert [x.shape[1] for x in recorder.logits] == list(plan.tokens_per_step)
        assert len(recorder.logits) == steps
        # out[b, order[b, k]] == k: every slot written exactly once, at its raster position.
        assert torch.equal(out.flatten(1).gather(1, plan.order), torch.arange(T).expand(3, -1))


def test_raster_order_one_token_per_step_is_classic_ar(model, cpu_kind):
    # One token per step in raster order: step k's logits are the teacher-forced causal forward's
    # logits for position k on the decoded image (class token and tokens 0..k-1 seen).
    plan = make_plan("raster", 2, GRID, GRID, T, "arccos")
    assert plan.tokens_per_step == (1,) * T
    recorder = _Recorder(lambda step, slots, logits: logits.argmax(-1))
    out = decode_grid(model, torch.tensor([0, 1]), plan, recorder, SamplingOptions(cfg=None))
    forward, _ = model(out.flatten(1), torch.tensor([0, 1]), order=plan.order)
    torch.testing.assert_close(torch.cat(recorder.logits, dim=1), forward, atol=1e-5, rtol=0)
    assert torch.equal(out.flatten(1), forward.argmax(-1))


# ---------------------------------------------------------------------------------------------
# Randomness


def test_same_seed_same_tokens(model):
    def draw(seed):
        return sample.generate(model, [0, 1, 2], steps=5, top_k=8, top_p=0.9,
                               generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_batch_equals_single_runs_with_per_sample_generators(model):
    labels, seeds = [0, 3, 1, 2], [10, 11, 12, 13]
    options = dict(steps=6, cfg=3.0, cfg_schedule="linear", temperature=1.2, top_k=10, top_p=0.9)
    batch = sample.generate(model, labels, generator=[torch.Generator().manual_seed(s) for s in seeds], **options)
    singles = [sample.generate(model, [label], generator=[torch.Generator().manual_seed(s)], **options)
               for label, s in zip(labels, seeds)]
    assert torch.equal(batch, torch.cat(singles))


def test_draw_tokens_matches_distribution_and_skips_zero_probability():
    probs = torch.tensor([0.0, 0.25, 0.0, 0.5, 0.25, 0.0])
    u = (torch.arange(400) + 0.5) / 400
    logits = probs.log() + 3.0  # any offset: the draw normalises
    counts = torch.bincount(draw_tokens(logits.repeat(400, 1), u), minlength=6)
    assert counts.tolist() == [0, 100, 0, 200, 100, 0]
    # the largest float32 below 1 must not fall off the end onto a zero-probability token
    top = draw_tokens(logits[None].clone(), torch.tensor([torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))]))
    assert top.item() == 4


def test_temperature_zero_is_greedy(model):
    greedy = TokenSampler(torch.rand(2, 8), temperature=0.0)
    logits = torch.randn(2, 3, 16)
    assert torch.equal(greedy(0, slice(0, 3), logits), logits.argmax(-1))


# ---------------------------------------------------------------------------------------------
# Filtering


def test_top_k_and_top_p_against_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=g) * 3
    for k in (1, 7, 50, 0):
        kept = filter_logits(logits, top_k=k).isfinite()
        expected = torch.zeros_like(kept)
        for row, kept_ids in zip(expected.view(-1, 50), logits.view(-1, 50).topk(k or 50).indices):
            row[kept_ids] = True
        assert torch.equal(kept, expected)
    for p in (0.05, 0.5, 0.9, 0.999, 1.0):
        kept = filter_logits(logits, top_p=p).isfinite().view(-1, 50)
        for row, kept_row in zip(logits.view(-1, 50).double(), kept):
            probs = row.softmax(-1)
            ranked = probs.argsort(descending=True)
            # smallest prefix of the ranking whose mass reaches p
            size = int((probs[ranked].cumsum(0) < p).sum()) + 1 if p < 1 else 50
            assert set(kept_row.nonzero().flatten().tolist()) == set(ranked[:min(size, 50)].tolist())
    # top-p renormalises over what top-k kept
    both = filter_logits(logits, top_k=3, top_p=0.99).isfinite()
    assert torch.equal(both, filter_logits(filter_logits(logits, top_k=3), top_p=0.99).isfinite())
    assert (both.sum(-1) <= 3).all() and (both.sum(-1) >= 1).all()


# ---------------------------------------------------------------------------------------------
# Editing


def _record_contexts(model, monkeypatch):
    """Record every extend call; return a function listing the context prefills, (ids, rope) of
    each call that directly follows a class-token call."""
    calls = []
    extend = model.extend

    def recording_extend(ids, rope, *args, **kwargs):
        calls.append((ids.clone(), rope.clone() if isinstance(rope, torch.Tensor) else rope))  # steps pass a Rotation
        return extend(ids, rope, *args, **kwargs)

    monkeypatch.setattr(model, "extend", recording_extend)

    def contexts():
        offset = model.config.class_token_offset
        return [calls[i + 1] for i, (ids, _) in enumerate(calls[:-1]) if ids.shape[1] == 1 and (ids >= offset).all()]
    return contexts


def _masks(B, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 16, (B, GRID, GRID), generator=g)
    keep = torch.rand(B, GRID, GRID, generator=g) < 0.5
    keep[0, 0] = True  # make the counts of unknown tokens differ between samples
    keep[1] = False
    return tokens, keep


def test_inpaint_keeps_tokens_and_feeds_them_as_context(model, monkeypatch):
    tokens, keep = _masks(3, 0)
    keep[1, -1, -1] = True  # every sample has context here (a context-free one is tested below)
    contexts, queried = _record_contexts(model, monkeypatch), []
    predict = model.predict
    monkeypatch.setattr(model, "predict", lambda rope, *a: queried.append(rope.turns.shape[:2]) or predict(rope, *a))
    out = sample.inpaint(model, tokens, keep, [0, 1, 2], steps=3, cfg=None,
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[keep], tokens[keep])
    assert (out[~keep] != tokens[~keep]).any()
    # One decode per distinct unknown count; after the class token it feeds exactly the kept
    # tokens of its samples, and the queries cover exactly the unknown positions.
    unknown = (~keep).flatten(1).sum(1)
    assert len(contexts()) == len(set(unknown.tolist()))
    kept_multisets = {tuple(sorted(tokens[b][keep[b]].tolist())) for b in range(3)}
    for ids, _ in contexts():
        for row in ids:
            assert tuple(sorted(row.tolist())) in kept_multisets
    assert sum(b * n for b, n in queried) == int(unknown.sum())


def test_inpaint_writes_each_prediction_at_its_position(model):
    # One greedy step predicts every unknown position from the context alone. Block-wise context
    # attention does not depend on the context's order, so the result is known in closed form.
    tokens, keep = _masks(2, 2)
    keep[1] = keep[0]
    out = sample.inpaint(model, tokens, keep[0], [1, 2], steps=1, cfg=None, temperature=0.0,
                         generator=torch.Generator().manual_seed(0))
    known, unknown = keep[0].flatten().nonzero().flatten(), (~keep[0]).flatten().nonzero().flatten()
    cache = model.new_cache(2)
    model.extend(model.class_ids(torch.tensor([1, 2]))[:, None], model.class_rope(2), cache)
    model.extend(tokens.flatten(1)[:, known], model.position_rope(known)[None], cache)
    expected = model.predict(model.position_rope(unknown)[None], cache).argmax(-1)  # (2, N)
    assert torch.equal(out.flatten(1)[:, unknown], expected)


def test_inpaint_batch_equals_single_runs_with_different_counts(model):
    tokens, keep = _masks(3, 1)
    options = dict(steps=4, cfg=2.0, top_k=6)
    batch = sample.inpaint(model, tokens, keep, [0, 1, 2],
                           generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)], **options)
    for b, s in enumerate((5, 6, 7)):
        single = sample.inpaint(model, tokens[b:b + 1], keep[b:b + 1], [b],
                                generator=[torch.Generator().manual_seed(s)], **options)
        assert torch.equal(single, batch[b:b + 1])


def test_outpaint_wide_canvas_with_extended_rope(model, monkeypatch):
    contexts = _record_contexts(model, monkeypatch)
    tokens = torch.randint(0, 16, (2, GRID, GRID), generator=torch.Generator().manual_seed(0))
    out = sample.outpaint(model, tokens, [1, 2], size=(GRID, 4 * GRID), steps=4, cfg=None,
                          generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, GRID, 4 * GRID)
    assert torch.equal(out[:, :, 6:10], tokens)
    # one decode of the whole canvas; the context keeps its canvas coordinates (columns 6..9)
    assert len(contexts()) == 1
    ids, rope = contexts()[0]
    placed = torch.arange(GRID * 4 * GRID).view(GRID, 4 * GRID)[:, 6:10].flatten()
    expected = model.position_rope(placed, grid_width=4 * GRID)
    matches = (rope[0, :, None] == expected[None]).flatten(2).all(-1)  # (K, K)
    assert torch.equal(matches.sum(0), torch.ones(T, dtype=torch.long))
    assert torch.equal(matches.sum(1), torch.ones(T, dtype=torch.long))


def test_expand_keeps_the_lattice_at_training_coordinates(model, monkeypatch):
    contexts = _record_contexts(model, monkeypatch)
    tokens = torch.randint(0, 16, (2, GRID, GRID), generator=torch.Generator().manual_seed(0))
    out = sample.expand(model, tokens, [0, 3], factor=2, steps=4, cfg=None,
                        generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 2 * GRID, 2 * GRID)
    assert torch.equal(out[:, ::2, ::2], tokens)
    # position interpolation: the low-resolution tokens carry exactly their training-grid RoPE
    ids, rope = contexts()[0]
    expected = model.position_rope(torch.arange(T))  # (T, D/2, 2)
    matches = (rope[:, :, None] == expected[None, None]).flatten(3).all(-1)  # (B, K, T)
    assert (matches.sum(-1) == 1).all() and (matches.sum(1) == 1).all()
    # ... and each is the token of that low-resolution position
    where = matches.float().argmax(-1)  # (B, K) low-resolution position of each context token
    assert torch.equal(ids, tokens.flatten(1).gather(1, where))


# ---------------------------------------------------------------------------------------------
# Output and validation


def test_generate_with_tokenizer_and_save_grid(model, tmp_path):
    from arpg.tokenizer import PixelTokenizer

    images = sample.generate(model, [0, 1, 2], steps=4, tokenizer=PixelTokenizer(16),
                             generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, GRID, GRID) and images.min() >= -1 and images.max() <= 1
    path = sample.save_grid(images, tmp_path / "grid.png", nrow=2, padding=1, scale=3)
    with Image.open(path) as picture:
        assert picture.size == (2 * (3 * GRID + 1) + 1, 2 * (3 * GRID + 1) + 1)


@pytest.mark.parametrize("kwargs, name", [
    (dict(steps=0), "steps"), (dict(steps=T + 1), "steps"), (dict(schedule="cubic"), "schedule"),
    (dict(order="spiral"), "order"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(temperature=-0.5), "temperature"), (dict(cfg_schedule="cosine"), "cfg_schedule"),
    (dict(cfg=-1.0), "cfg"), (dict(conditions=[0, 4]), "labels"), (dict(generator=[torch.Generator()]), "generator"),
])
def test_bad_generate_arguments_name_the_parameter(model, kwargs, name):
    kwargs = {"conditions": [0, 1], "steps": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        sample.generate(model, **kwargs)


def test_bad_editing_arguments_name_the_parameter(model):
    from arpg.tokenizer import PixelTokenizer

    tokens = torch.zeros(2, GRID, GRID, dtype=torch.long)
    keep = torch.ones(GRID, GRID, dtype=torch.bool)
    with pytest.raises(ValueError, match="keep_mask"):
        sample.inpaint(model, tokens, keep[:3], [0, 1])
    with pytest.raises(ValueError, match="keep_mask"):
        sample.inpaint(model, tokens, keep.long(), [0, 1])
    with pytest.raises(ValueError, match="tokens"):
        sample.inpaint(model, tokens + 16, keep, [0, 1])
    with pytest.raises(ValueError, match="steps"):
        sample.inpaint(model, tokens, keep, [0, 1], steps=0)
    with pytest.raises(ValueError, match="position_scale"):
        sample.inpaint(model, tokens, keep, [0, 1], steps=4, position_scale=0.0)
    with pytest.raises(ValueError, match="size"):
        sample.outpaint(model, tokens, [0, 1], size=(2, 8))
    with pytest.raises(ValueError, match="factor"):
        sample.expand(model, tokens, [0, 1], factor=0)
    with pytest.raises(ValueError, match="tokenizer"):
        sample.generate(model, [0], tokenizer=PixelTokenizer(17))


@pytest.mark.slow
@pytest.mark.parametrize("static", [False, True])
def test_compiled_step_gives_the_same_tokens(model, static):
    # torch.compile on CPU builds C++ kernels: minutes on 2 cores, hence slow.
    from torch._dynamo.utils import counters

    def draw(compile, seed=0):
        return sample.generate(model, [0, 1, 2], steps=5, cfg=2.0, compile=compile, static=static,
                               generator=torch.Generator().manual_seed(seed))

    def same_tokens() -> None:  # in a child: inductor's compile workers would keep this process from forking
        assert torch.equal(draw(False), draw(True))
        if static:  # the next batch replays what the first compiled: no new graphs
            graphs = counters["stats"]["unique_graphs"]
            assert torch.equal(draw(False, seed=1), draw(True, seed=1))
            assert counters["stats"]["unique_graphs"] == graphs

    assert in_child(same_tokens) == 0


# ---------------------------------------------------------------------------------------------
# Linear guidance where it runs


def _recording_engines(calls):
    """Wrap a step-engine factory so every engine records the raw (rows, n, V) logits it returns."""
    def wrap(make):
        def made(*args, **kwargs):
            engine = make(*args, **kwargs)

            def recording(fed):
                logits = engine(fed)
                calls.append(logits.clone())  # the loop mixes the guidance into these in place
                return logits
            return recording
        return made
    return wrap


class _GuidedRecorder(TokenSampler):
    """The real sampler, keeping the guided logits of every step it is given."""

    seen: list = []

    def __call__(self, step, slots, logits):
        _GuidedRecorder.seen.append(logits.clone())
        return super().__call__(step, slots, logits)


def _assert_linear_ramp(raw, guided, sizes, known, total, cfg, batch):
    assert len(raw) == len(guided) == len(sizes)
    done = known
    for both, mixed, n in zip(raw, guided, sizes):
        done += n
        scale = 1 + (cfg - 1) * done / total
        cond, uncond = both[:batch], both[batch:]
        torch.testing.assert_close(mixed, uncond + (cond - uncond) * scale, atol=1e-5, rtol=1e-5)


def test_generate_applies_the_linear_guidance_ramp_at_every_step(model, monkeypatch):
    raw, _GuidedRecorder.seen = [], []
    monkeypatch.setattr(model, "step_engine", _recording_engines(raw)(model.step_engine))
    monkeypatch.setattr(sample.decode, "TokenSampler", _GuidedRecorder)
    sample.generate(model, [0, 1, 2], steps=5, schedule="cosine", cfg=3.0, cfg_schedule="linear",
                    generator=torch.Generator().manual_seed(0))
    _assert_linear_ramp(raw, _GuidedRecorder.seen, decode_schedule(T, 5, "cosine"), 0, T, 3.0, 3)


def test_inpaint_counts_the_known_tokens_in_the_linear_ramp(model, monkeypatch):
    raw, _GuidedRecorder.seen = [], []
    monkeypatch.setattr(sample.editing, "ARPGStepEngine", _recording_engines(raw)(ARPGStepEngine))
    monkeypatch.setattr(sample.decode, "TokenSampler", _GuidedRecorder)  # token_sampler builds it
    tokens = torch.randint(0, 16, (2, GRID, GRID), generator=torch.Generator().manual_seed(0))
    keep = torch.zeros(GRID, GRID, dtype=torch.bool)
    keep[:, :1] = True  # 4 known tokens, 12 to decode
    sample.inpaint(model, tokens, keep, [0, 1], steps=4, schedule="linear", cfg=2.5, cfg_schedule="linear",
                   generator=torch.Generator().manual_seed(0))
    _assert_linear_ramp(raw, _GuidedRecorder.seen, decode_schedule(T - GRID, 4, "linear"), GRID, T, 2.5, 2)
