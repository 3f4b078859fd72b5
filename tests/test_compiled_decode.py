"""Compiled ARPG decodes: how many graphs a compile traces, which batches reuse them, and the
cache kept between compiled decodes. Dynamo's graphs are counted with its "eager" backend (the
same tracing and guards as inductor, without generating kernels: seconds instead of minutes);
one slow test counts them under inductor."""

import pytest
import torch
from torch._dynamo.utils import counters

import arpg.models.arpg_steps as arpg_steps
import arpg.sample as sample
from arpg.models import create_model
from arpg.models.arpg_steps import COMPILED_CACHES, release_compiled_caches

from conftest import in_child

GRID = 4
T = GRID * GRID

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = create_model("ARPG-tiny", vocab_size=16, block_size=T, num_classes=4, dim=64)
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, std=1.0 if "to_q" in name or "to_k" in name else 0.3)
    return model.eval()


@pytest.fixture()
def fresh_compile():
    """No compiled code or kept cache from another test: counts start at zero."""
    torch._dynamo.reset()
    arpg_steps._compiled.cache_clear()
    release_compiled_caches()
    yield
    torch._dynamo.reset()
    arpg_steps._compiled.cache_clear()
    release_compiled_caches()


@pytest.fixture()
def traced_only(monkeypatch, fresh_compile):
    """torch.compile with dynamo's "eager" backend."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: compile_(fn, backend="eager", **kw))


def _draw(model, batch, steps, seed=0, **runtime):
    return sample.generate(model, list(range(batch)), steps=steps, cfg=2.0,
                           generator=torch.Generator().manual_seed(seed), **runtime)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_decode_traces_two_graphs_for_any_schedule_and_smaller_batch(model, traced_only):
    # (static=True adds CUDA graphs on CUDA; the traced steps are the same)
    before = _graphs()
    assert torch.equal(_draw(model, 3, 8, compile=True), _draw(model, 3, 8))
    assert _graphs() - before <= 2  # one for feeding, one for predicting: every bucket in each
    # another schedule and a smaller batch (FID's last one) reuse them: no new graph
    assert torch.equal(_draw(model, 2, 5, seed=1, compile=True, static=True), _draw(model, 2, 5, seed=1))
    assert torch.equal(_draw(model, 1, 16, seed=2, compile=True), _draw(model, 1, 16, seed=2))
    assert _graphs() - before <= 2


@pytest.mark.slow
def test_inductor_compiled_decode_traces_two_graphs(model, fresh_compile):
    # Inductor builds C++ kernels on the CPU: about a minute on 2 cores. In a child process: its
    # compile workers would keep this one from forking children that train.
    def compiled_decodes() -> None:
        before = _graphs()
        assert torch.equal(_draw(model, 3, 8, compile=True), _draw(model, 3, 8))
        assert torch.equal(_draw(model, 2, 5, seed=1, compile=True), _draw(model, 2, 5, seed=1))
        assert _graphs() - before <= 2

    assert in_child(compiled_decodes) == 0


def _kept_caches(model):
    return COMPILED_CACHES.kept(model)


def test_one_kept_cache_per_model_whatever_the_schedule(model, traced_only):
    # Its size does not depend on the schedule, so a 64-step decode after a 32-step one holds
    # one cache, not both; a larger batch replaces it.
    _draw(model, 3, 8, compile=True, static=True)
    (cache,) = _kept_caches(model)
    _draw(model, 3, 4, compile=True, static=True)
    _draw(model, 2, 16, compile=True, static=True)
    assert _kept_caches(model) == [cache] and cache.self_k.shape[1] == 6  # 3 samples and their guidance rows
    _draw(model, 4, 8, compile=True, static=True)
    (larger,) = _kept_caches(model)
    assert larger.self_k.shape[1] == 8
    release_compiled_caches(model)
    assert _kept_caches(model) == []


def test_kept_fused_weights_rebuilt_only_after_a_parameter_change(model, traced_only, monkeypatch):
    model = create_model("ARPG-tiny", vocab_size=16, block_size=T, num_classes=4, dim=64).eval()
    torch.nn.init.normal_(model.head.weight)
    builds = []
    fused_weights = model.fused_weights
    monkeypatch.setattr(model, "fused_weights", lambda *a: builds.append(1) or fused_weights(*a))
    first = _draw(model, 2, 4, compile=True, static=True, temperature=0)
    _draw(model, 2, 4, compile=True, static=True)
    assert len(builds) == 1  # made with the cache, then reused
    with torch.no_grad():
        model.layers.self_dec[0].attn.to_v.weight.mul_(-3.0)
        model.head.weight.mul_(-1.0)
    changed = _draw(model, 2, 4, compile=True, static=True, temperature=0)
    assert not torch.equal(first, changed) and len(builds) == 2
    for _ in range(3):
        assert torch.equal(_draw(model, 2, 4, compile=True, static=True, temperature=0), changed)
    assert len(builds) == 2  # refreshing did not itself count as a change
