"""Checks that need a CUDA GPU: the cache, bf16 and the compiled static step (CUDA graphs).

Deselected by default like the slow ones (pyproject's addopts) and skipped without a GPU; run
them with `pytest -m cuda` (scripts/gpu_check.sh does). The checks that need no GPU also run on
the CPU, by default, so that the CUDA run finds no error of the test itself.
"""

import pytest
import torch

import arpg.sample as sample
from arpg.models import create_model
from arpg.orders import DecodePlan, decode_schedule, make_plan
from arpg.sample import SamplingOptions
from arpg.sample.decode import decode_grid

CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]

GRID = 8
T = GRID * GRID


def _random_model(device):
    torch.manual_seed(0)
    model = create_model("ARPG-tiny", vocab_size=64, block_size=T, num_classes=4, dim=128)
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, std=0.5 if "to_q" in name or "to_k" in name else 0.1)
    return model.to(device).eval()


@pytest.fixture(scope="module", params=DEVICES)
def model(request):
    return _random_model(request.param)


@pytest.fixture(scope="module")
def cuda_model():
    return _random_model("cuda")


def _fixed_tokens(fixed):
    """A `choose` feeding `fixed` (B, N) whatever the logits say; returns it and the logits list it fills."""
    seen = []
    return (lambda step, slots, logits: seen.append(logits.clone()) or fixed[:, slots]), seen


def _teacher_forced(model, options, steps=6):
    """Logits of every step, feeding the same fixed tokens whatever the logits say."""
    device = model.head.weight.device
    plan = make_plan("random", 3, GRID, GRID, steps, "arccos", torch.Generator(device).manual_seed(0), device)
    fixed = torch.randint(0, 64, (3, T), generator=torch.Generator().manual_seed(1)).to(device)
    choose, logits = _fixed_tokens(fixed)
    decode_grid(model, torch.tensor([0, 1, 3], device=device), plan, choose, options)
    return logits


def test_cached_logits_equal_recomputation(model):
    cached = _teacher_forced(model, SamplingOptions(cfg=2.0, amp=False))
    recomputed = _teacher_forced(model, SamplingOptions(cfg=2.0, amp=False, use_cache=False))
    for a, b in zip(cached, recomputed):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_decode_matches_float32_on_cuda(golden_model, arpg_golden):
    # The same bound as the CPU test (tests/test_speed.py): 3% of each step's largest logit.
    model = golden_model.cuda()
    B = arpg_golden["labels"].shape[0]
    plan = DecodePlan(arpg_golden["gen_order"].expand(B, -1).cuda(), tuple(arpg_golden["num_pred_per_step"]))
    runs = []
    for amp in (False, True):
        choose, logits = _fixed_tokens(arpg_golden["gen_fixed_tokens"].cuda())
        decode_grid(model, arpg_golden["labels"].cuda(), plan, choose, SamplingOptions(cfg=None, amp=amp))
        runs.append(logits)
    for exact, bf16 in zip(*runs):
        assert (exact - bf16).abs().max() <= 0.03 * exact.abs().max()


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_static_step_equals_eager_and_replays_graphs(cuda_model, amp):
    from torch._dynamo.utils import counters

    model = cuda_model

    def draw(seed, **runtime):
        return sample.generate(model, [0, 1, 2, 3], steps=8, cfg=3.0, amp=amp,
                               generator=torch.Generator("cuda").manual_seed(seed), **runtime)

    eager = draw(0)
    compiled = draw(0, static=True, compile=True)
    if amp:  # fused bf16 kernels round differently: compare the logits, not ties between tokens
        a = _teacher_forced(model, SamplingOptions(cfg=3.0, amp=True), steps=8)
        b = _teacher_forced(model, SamplingOptions(cfg=3.0, amp=True, static=True, compile=True), steps=8)
        for x, y in zip(a, b):
            assert (x - y).abs().max() <= 0.03 * x.abs().max()
    else:
        assert torch.equal(eager, compiled)
    graphs = counters["stats"]["unique_graphs"]
    assert torch.equal(draw(1, static=True, compile=True), draw(1, static=True, compile=True))
    assert counters["stats"]["unique_graphs"] == graphs  # later batches recompile nothing
    assert counters["inductor"]["cudagraph_skips"] == 0  # and run as CUDA graphs


def test_static_step_schedules(model):
    # Schedules whose steps fill every bucket, from one step of all tokens to single tokens.
    device = model.head.weight.device
    greedy = lambda step, slots, logits: logits.argmax(-1)  # noqa: E731
    for steps in (1, 3, 17):
        sizes = decode_schedule(T, steps, "arccos")
        plan = DecodePlan(torch.arange(T, device=device).expand(2, -1), tuple(sizes))
        labels = torch.tensor([0, 1], device=device)
        dynamic = decode_grid(model, labels, plan, greedy, SamplingOptions(cfg=2.0, amp=False))
        static = decode_grid(model, labels, plan, greedy, SamplingOptions(cfg=2.0, amp=False, static=True))
        assert torch.equal(dynamic, static)
