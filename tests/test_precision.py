"""The precision policy: float32 on every CPU unless bf16 is asked for, bf16 by default on CUDA.

Each test runs as both kinds of CPU (`cpu_kind`: without fast bf16, AVX2; with it, AVX512-BF16 or
AMX), simulated through ARPG_CPU_FAST_BF16, so one machine checks what the other would do. Only
`test_the_cpu_probe_reads_the_real_cpu_unless_told` looks at the real CPU."""

from __future__ import annotations

import logging

import pytest
import torch

from arpg import runtime
from arpg.models import build_model, create_model
from arpg.runtime import CPU_BF16_ENV, fast_bf16, training_precision, use_bf16
from arpg.sample import SamplingOptions, generate
from arpg.train import train

from test_train import SMALL, make_config

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
FAMILIES = {"ARPG-tiny": "head", "LlamaGen-tiny": "output", "PAR-tiny": "output"}
STEPS = {"ARPG-tiny": 4, "LlamaGen-tiny": None, "PAR-tiny": None}  # LlamaGen and PAR decode their own way


class _HeadProbe:
    """Records, at each call of a training model's output head, whether CPU autocast is on and in
    which dtype."""

    def __init__(self, head: torch.nn.Module):
        self.seen: set[tuple[bool, torch.dtype | None]] = set()
        head.register_forward_hook(lambda *_: self.seen.add(_autocast_state()))


def _autocast_state() -> tuple[bool, torch.dtype | None]:
    on = torch.is_autocast_enabled("cpu")
    return on, torch.get_autocast_dtype("cpu") if on else None


class _DecodeProbe:
    """Wraps `model.step_engine` (every family's step engine): records the cache dtype the sampler asks
    for, the autocast state at each step, and the dtypes of the engine's cache and decode matrices."""

    def __init__(self, model: torch.nn.Module):
        self.cache_dtypes, self.steps, self.tensor_dtypes = set(), set(), set()
        make = model.step_engine

        def step_engine(*args, **runtime):
            self.cache_dtypes.add(runtime["cache_dtype"])
            engine = make(*args, **runtime)
            call = engine.__call__

            def step(fed):
                self.steps.add(_autocast_state())
                cache = getattr(engine, "cache", None)
                if hasattr(cache, "tensors"):
                    self.tensor_dtypes |= {t.dtype for t in cache.tensors() if t.ndim >= 2}  # norms stay fp32
                return call(fed)

            return step

        model.step_engine = step_engine


def _tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, vocab_size=16, block_size=16, num_classes=4, dim=32).eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_default_cpu_decode_is_float32_on_every_kind_of_cpu(name, cpu_kind):
    model = _tiny(name)
    probe = _DecodeProbe(model)
    generate(model, [0, 1], cfg=2.0, steps=STEPS[name], generator=torch.Generator().manual_seed(0))
    assert probe.cache_dtypes == {torch.float32} and probe.steps == {(False, None)}
    assert probe.tensor_dtypes == ({torch.float32} if name == "ARPG-tiny" else set())


@pytest.mark.parametrize("name", FAMILIES)
def test_amp_true_on_a_cpu_decodes_in_bf16(name, cpu_kind, caplog):
    model = _tiny(name)
    probe = _DecodeProbe(model)
    runtime._warn_slow_cpu_bf16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="arpg.runtime"):
        for _ in range(2):
            generate(model, [0, 1], cfg=2.0, amp=True, steps=STEPS[name], generator=torch.Generator().manual_seed(0))
    assert probe.cache_dtypes == {torch.bfloat16} and probe.steps == {(True, torch.bfloat16)}
    # ARPG's cache also holds the decode weights: bf16 matrices as well
    assert probe.tensor_dtypes == ({torch.bfloat16} if name == "ARPG-tiny" else set())
    warnings = [r for r in caplog.records if "slower" in r.getMessage()]
    assert len(warnings) == (1 if cpu_kind == "avx2" else 0)  # said once, only where bf16 is slow


def test_the_resolved_setting_follows_the_policy(cpu_kind):
    assert use_bf16(None, CPU) is False and use_bf16(False, CPU) is False and use_bf16(True, CPU) is True
    assert use_bf16(None, torch.device("cuda")) == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert training_precision("auto", CPU) == "no" and training_precision("no", CPU) == "no"
    assert training_precision("bf16", CPU) == "bf16" and training_precision("fp16", CPU) == "fp16"
    assert fast_bf16("cpu") == (cpu_kind == "avx512_bf16")  # the simulated probe, for reports only


@pytest.mark.parametrize("setting, expected", [("no", torch.float32), ("auto", torch.float32), ("bf16", torch.bfloat16)])
def test_training_step_precision_on_a_cpu(tmp_path, monkeypatch, cpu_kind, setting, expected):
    seen = []
    real_build = build_model

    def probed(config):
        model = real_build(config)
        seen.append(_HeadProbe(model.head))
        return model

    monkeypatch.setattr("arpg.train.loop.build_model", probed)
    train(make_config(*SMALL, "max_steps=1", f"runtime.mixed_precision={setting}", f"out_dir={tmp_path}"))
    assert seen[0].seen == ({(True, torch.bfloat16)} if expected == torch.bfloat16 else {(False, None)})


def test_the_cpu_probe_reads_the_real_cpu_unless_told(monkeypatch):
    monkeypatch.delenv(CPU_BF16_ENV)
    instructions = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert fast_bf16("cpu") is instructions
    for forced, answer in (("1", True), ("0", False)):
        monkeypatch.setenv(CPU_BF16_ENV, forced)
        assert fast_bf16("cpu") is answer
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(ValueError, match=CPU_BF16_ENV):
        fast_bf16("cpu")
