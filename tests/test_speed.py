"""The speed policies and tools: bf16 detection, host syncs in the training step, CPU threads,
and the speed benchmark's code paths at toy size (speed itself is measured by
scripts/bench_sample.py, never asserted). The fast decode paths are tested in test_sample.py."""

import pytest
import torch

from arpg.models import create_model
from arpg.runtime import fast_bf16, set_cpu_threads, use_bf16
from arpg.sample import SamplingOptions
from conftest import REPO

T = 16


def test_bf16_policy_is_detected_and_can_be_forced_either_way():
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


def test_benchmark_rows_start_with_no_cache_of_the_rows_before(tmp_path, monkeypatch):
    # A compiled row keeps its KV cache for the next compiled decode; the next row's peak memory
    # must not hold it. Compiled with dynamo's "eager" backend: the same caches, no kernels built.
    import arpg.models.arpg_steps as arpg_steps
    import arpg.reports.speed as speed

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: compile_(fn, backend="eager", **kw))
    arpg_steps._compiled.cache_clear()
    kept_at_row_start, timed = [], speed.timed

    def recording_timed(fn, device):
        kept_at_row_start.append(sum(len(pool) for pool in arpg_steps.COMPILED_CACHES.pools.values()))
        return timed(fn, device)

    monkeypatch.setattr(speed, "timed", recording_timed)
    config = speed.load_preset(REPO / "configs/bench_preset/dry_run.yaml", modes=["graphs", "eager"], steps=[4, 2],
                               baselines=False, count_ops=False, train_models=[], repeats=1, matmul_seconds=0.01,
                               output=str(tmp_path / "b.json"), plot=str(tmp_path / "b.png"))
    monkeypatch.setattr(speed, "matmul_tflops", lambda *a: 1.0)
    report = speed.bench_sample(config)
    rows = report["sampling"]
    assert [(r["mode"], r["steps"]) for r in rows] == [("graphs", 4), ("graphs", 2), ("eager", 4), ("eager", 2)]
    assert kept_at_row_start[::2] == [0, 0, 0, 0]  # each row's first (warm-up) call: nothing kept
    assert all(r["warmup_s"] > 0 for r in rows)
    arpg_steps._compiled.cache_clear()


def test_gpu_check_dry_run_without_hydra(tmp_path):
    # The GPU machine has no Hydra: DRY_RUN=1 hides it and runs every stage at toy size.
    import json
    import os
    import subprocess

    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout
    bench = json.loads((tmp_path / "bench_l.json").read_text())
    assert {r["mode"] for r in bench["sampling"]} == {"eager", "static"}
    assert all(r["peak_mib"] >= 0 and r["warmup_s"] > 0 for r in bench["sampling"])
    kernels = json.loads((tmp_path / "kernels.json").read_text())["kernels"]
    assert any("attention" in k["name"] or "bmm" in k["name"] for k in kernels)
    assert json.loads((tmp_path / "train.json").read_text())["training"][0]["tokens_per_s"] > 0
    assert json.loads((tmp_path / "bench_xl_xxl.json").read_text())["sampling"]
