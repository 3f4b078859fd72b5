"""The ImageNet experiments per ARPG size: the published recipe of imagenet_arpg_l with the size's
model, its own run folder, FSDP for the large sizes and the size's published sampling in the grids."""

from __future__ import annotations

import pytest

from arpg.cli import compose_config
from arpg.sample_fid import SampleFIDConfig
from arpg.train import TrainConfig


def train_config(*overrides: str) -> TrainConfig:
    return compose_config("train", TrainConfig, list(overrides))


@pytest.mark.parametrize("size, model, strategy", [("l", "ARPG-L", "ddp"), ("xl", "ARPG-XL", "fsdp"),
                                                   ("xxl", "ARPG-XXL", "fsdp")])
def test_each_size_has_its_own_run_the_published_recipe_and_its_published_guidance(size, model, strategy):
    config = train_config(f"experiment=imagenet_arpg_{size}")
    base = train_config("experiment=imagenet_arpg_l")
    assert config.name == f"imagenet_arpg_{size}" and config.model.name == model
    assert config.runtime.strategy == strategy
    assert (config.optim, config.data, config.epochs, config.order) == (base.optim, base.data, base.epochs, base.order)
    assert config.grids == base.grids
    preset = compose_config("sample_fid", SampleFIDConfig, [f"preset=arpg_{size}", "checkpoint=x.pt"]).sampling
    for field in ("steps", "schedule", "cfg", "cfg_schedule"):  # order: None is ARPG's random, as the preset's
        assert getattr(config.sampling, field) == preset[field], field
