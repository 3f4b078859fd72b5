"""The digits judge (held-out accuracy, Frechet features) and the steps-vs-quality benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arpg import create_model
from arpg.checkpoint import save
from arpg.cli import compose_config
from arpg.data import digits_dataset
from arpg.digits_judge import digits_judge, sample_digits
from arpg.reports.quality import BenchQualityConfig, bench_quality
from test_eval import _reference_fid, _reference_precision_recall


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def judge():
    return digits_judge()


@pytest.fixture(scope="module")
def digits_model():
    """A random digits-shaped model (64 tokens of 17 grey levels, 10 classes) with a non-zero head."""
    torch.manual_seed(0)
    model = create_model("ARPG-tiny", vocab_size=17, block_size=64, num_classes=10, dim=64)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def test_judge_recognises_held_out_real_digits(judge):
    # Scored here from the data set's own labels, not from the judge's report of itself.
    digits = digits_dataset()
    odd = torch.arange(len(digits)) % 2 == 1
    assert np.array_equal(judge.held_out_tokens, digits.tokens[odd].numpy())
    assert np.array_equal(judge.reference_tokens, digits.tokens[~odd].numpy())
    held_out = judge.accuracy(digits.tokens[odd], digits.labels[odd])
    fitted = judge.accuracy(digits.tokens[~odd], digits.labels[~odd])
    assert held_out >= 0.95 and held_out == judge.held_out_accuracy
    # Held-out digits really were held out: the judge knows its own half perfectly and misreads
    # some of the other half (a judge fitted on all 1,797 digits scores 1.0 on both).
    assert fitted == 1.0 and held_out < fitted


def test_real_vs_real_frechet_is_small_against_random_tokens(judge):
    random_tokens = torch.randint(0, 17, (898, 8, 8), generator=torch.Generator().manual_seed(0))
    random_frechet = judge.frechet(random_tokens)
    assert 0 < judge.noise_floor < random_frechet / 50
    # The same real images on both sides score (numerically) zero.
    assert judge.frechet(judge.reference_tokens) == pytest.approx(0.0, abs=1e-6)


def test_judge_accepts_grids_and_sequences_and_names_bad_input(judge):
    test = digits_dataset("test")
    grids = test.tokens.view(-1, 8, 8)
    assert judge.accuracy(grids, test.labels) == judge.accuracy(test.tokens.numpy(), test.labels.tolist())
    assert judge.features(grids).shape == (len(test), judge.feature_dim)
    with pytest.raises(ValueError, match="grey levels"):
        judge.accuracy(grids + 1, test.labels)
    with pytest.raises(ValueError, match=r"shape \(N, 8, 8\)"):
        judge.features(torch.zeros(3, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must have shape"):
        judge.accuracy(grids, test.labels[:-1])


def test_sample_digits_is_class_balanced_and_seeded(digits_model):
    tokens, labels = sample_digits(digits_model, 25, seed=3, batch_size=10, steps=4, cfg=2.0)
    assert tokens.shape == (25, 8, 8) and labels.tolist() == [i % 10 for i in range(25)]
    again, _ = sample_digits(digits_model, 25, seed=3, batch_size=10, steps=4, cfg=2.0)
    assert torch.equal(tokens, again)
    with pytest.raises(ValueError, match="digits model"):
        sample_digits(create_model("ARPG-tiny", vocab_size=32, block_size=16, num_classes=10, dim=64), 4)


# 50 samples span at most 49 of the 58 feature dimensions: their covariance is singular by construction.
@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_bench_quality_reduced_run_writes_every_field(digits_model, tmp_path, capsys):
    checkpoint = save(digits_model, tmp_path / "digits.safetensors")
    strategies = {"random": {}, "raster": {"order": "raster"}, "regions4": {"order": "regions4"},
                  "confidence": {"positions": "confidence", "position_noise": 2.0}}
    config = BenchQualityConfig(checkpoint=str(checkpoint), samples=50, steps=[1, 8], strategies=strategies,
                                batch_size=50, device="cpu", grid_strategies=["confidence"],
                                output_json=str(tmp_path / "q.json"), output_plot=str(tmp_path / "q.png"),
                                output_grid=str(tmp_path / "grid.png"))
    bench_quality(config)

    report = json.loads(Path(config.output_json).read_text())
    assert report["config"]["steps"] == [1, 8] and report["config"]["samples"] == 50
    assert report["judge"]["held_out_accuracy"] >= 0.95 and report["judge"]["feature_dim"] > 0
    floor = report["noise_floor"]
    judge = digits_judge()
    reference = judge.features(judge.reference_tokens)
    assert floor["frechet"] == judge.noise_floor == pytest.approx(
        _reference_fid(judge.features(judge.held_out_tokens), reference), rel=1e-6)
    assert report["random_tokens_frechet"] > floor["frechet"] > 0
    assert (floor["precision"], floor["recall"]) == _reference_precision_recall(
        reference, judge.features(judge.held_out_tokens), k=3)
    assert report["model"]["checkpoint"] == config.checkpoint  # as given: no other path of the machine
    rows = {(r["strategy"], r["steps"]): r for r in report["results"]}
    assert set(rows) == {(name, s) for name in strategies for s in (1, 8)}
    for (name, steps), row in rows.items():
        assert set(row) == {"strategy", "steps", "accuracy", "frechet", "precision", "recall", "images_per_s",
                            "seconds"}
        assert row["images_per_s"] > 0
        # Each number recomputed from the same samples, by the test's own helpers where the maths is ours.
        tokens, labels = sample_digits(digits_model, 50, seed=config.seed, batch_size=50,
                                       options=config.sampling.replace(**strategies[name]), steps=steps)
        features = judge.features(tokens)
        assert row["accuracy"] == (judge.predict(tokens) == labels.numpy()).mean()
        assert row["frechet"] == pytest.approx(_reference_fid(features, reference), rel=1e-6)
        assert (row["precision"], row["recall"]) == _reference_precision_recall(reference, features, k=3)
    # One step predicts every position from the class token alone, with one uniform per position:
    # any fixed order gives the very same samples.
    assert rows["raster", 1]["frechet"] == rows["regions4", 1]["frechet"]
    assert rows["raster", 8]["frechet"] != rows["regions4", 8]["frechet"]
    assert report["strategies"]["confidence"] == str(config.sampling.replace(**strategies["confidence"]))
    assert "positions=confidence position_noise=2.0" in report["strategies"]["confidence"]

    for path, width in ((config.output_plot, 500), (config.output_grid, 2 * (8 * 4 + 1) * 8)):
        with Image.open(path) as picture:
            assert picture.format == "PNG" and picture.width > width
    out = " ".join(capsys.readouterr().out.split())
    assert "| steps | random | raster | regions4 | confidence |" in out
    assert "| real | " in out


def test_default_model_is_the_train_yaml_recipe(monkeypatch, tmp_path):
    """Without a checkpoint the bench trains arpg/configs/train.yaml's default digits run in train_dir."""
    import arpg.reports.quality

    seen = {}

    def fake_train(config):
        seen["config"] = config
        raise RuntimeError("stop before training")

    monkeypatch.setattr(arpg.reports.quality, "train", fake_train)
    with pytest.raises(RuntimeError, match="stop before training"):
        arpg.reports.quality.default_digits_model(str(tmp_path / "run"), torch.device("cpu"))
    config = seen["config"]
    assert config.out_dir == str(tmp_path / "run")
    assert (config.model.name, config.data.name, config.model.cls_rope) == ("ARPG-tiny", "digits", "identity")


def test_yaml_mirrors_the_dataclass():
    assert compose_config("bench_quality", BenchQualityConfig) == BenchQualityConfig()


@pytest.mark.parametrize("overrides, name", [
    (dict(samples=3), "samples"), (dict(steps=[0]), "steps"), (dict(steps=[]), "steps"),
    (dict(strategies={"mine": {"order": "spiral"}}), "strategies.mine: order"),
    (dict(strategies={"mine": {"colour": 1}}), "strategies.mine: unknown sampling options"),
    (dict(grid_strategies=["best"]), "grid_strategies"), (dict(checkpoint="nope.safetensors"), "checkpoint"),
    (dict(batch_size=0), "batch_size"), (dict(weights="best"), "weights"),
])
def test_bad_settings_name_the_parameter(overrides, name):
    with pytest.raises(ValueError, match=name):
        bench_quality(BenchQualityConfig(**overrides))
