"""The speed tools: host syncs in the training step, CPU threads,
and the speed benchmark's code paths at toy size (speed itself is measured by
scripts/bench_sample.py, never asserted). The fast decode paths are tested in test_sample.py."""

import pytest
import torch

from arpg.models import create_model
from arpg.runtime import set_cpu_threads
from arpg.sample import SamplingOptions
from conftest import REPO

T = 16


def test_runtime_settings_are_validated():
    with pytest.raises(ValueError, match="amp"):
        SamplingOptions(amp="yes")
    with pytest.raises(ValueError, match="static"):
        SamplingOptions(static=1)


# ---------------------------------------------------------------------------------------------
# Training step and threads


def test_training_step_without_checks_never_syncs(no_host_sync):
    torch.manual_seed(0)
    model = create_model("ARPG-tiny", vocab_size=16, block_size=T, num_classes=4, dim=32).train()
    tokens, labels = torch.randint(0, 16, (3, T)), torch.tensor([0, 1, 3])
    order = torch.rand(3, T).argsort(1)

    with no_host_sync("the training step"):
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


def test_speed_benchmark_adds_bf16_rows_only_where_the_cpu_has_fast_bf16(tmp_path, cpu_kind):
    from arpg.cli import compose_config
    from arpg.reports.speed import BenchSampleConfig, bench_sample

    config = compose_config("bench_sample", BenchSampleConfig,
                            ["bench_preset=dry_run", "precisions=null", "baselines=false", "count_ops=false",
                             "train_models=[]", "modes=[eager]", "matmul_seconds=0.01",
                             f"output={tmp_path}/b.json", f"plot={tmp_path}/b.png"])
    report = bench_sample(config)
    expected = {"float32", "bf16"} if cpu_kind == "avx512_bf16" else {"float32"}
    assert {r["precision"] for r in report["sampling"]} == expected
    assert f"fast bf16 taken as {cpu_kind == 'avx512_bf16'}" in report["environment"]["device"]
