"""Run by tests/test_train.py under `torchrun --nproc_per_node 2`: two short trainings (gloo on the
CPU), DDP then FSDP2, in `<out_root>/ddp` and `<out_root>/fsdp`, checking inside the processes that
FSDP really shards the parameters and the EMA; each process writes how many parameter values it
holds to `<out_root>/fsdp_rank<r>.txt` (the test checks that they add up to the model).

    torchrun --nproc_per_node 2 tests/two_process_training.py <out_root> <train.yaml overrides...>
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import accelerate
from torch.distributed.tensor import DTensor, Shard

import arpg.train.loop
from arpg.cli import compose_config
from arpg.train import TrainConfig, train

runs = []


class RecordedRun(arpg.train.loop.Run):
    """The training loop's `Run`, kept for inspection after `train` returns."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        runs.append(self)


def check_sharded(run, out_root: str) -> None:
    """Every parameter is a DTensor sharded on dim 0 over the processes, and so is its EMA copy."""
    for (name, param), ema in zip(run.model.named_parameters(), run.ema.tensors):
        assert isinstance(param, DTensor) and param.placements == (Shard(0),), (name, type(param))
        assert isinstance(ema, DTensor) and ema.placements == (Shard(0),), name
        assert ema.shape == param.shape and ema.to_local().shape == param.to_local().shape, name
    held = sum(param.to_local().numel() for param in run.model.parameters())
    total = sum(param.numel() for param in run.model.parameters())
    assert held < total, "FSDP left the parameters whole"
    Path(out_root, f"fsdp_rank{os.environ['RANK']}.txt").write_text(f"{held} {total}")


def main() -> None:
    out_root, overrides = sys.argv[1], sys.argv[2:]
    arpg.train.loop.Run = RecordedRun
    # Both runs share this launch's process group: the first must not tear it down at its end.
    accelerate.Accelerator.end_training = lambda self: None
    for strategy in ("ddp", "fsdp"):
        train(compose_config("train", TrainConfig, [*overrides, f"runtime.strategy={strategy}",
                                                    f"out_dir={out_root}/{strategy}"]))
    check_sharded(runs[-1], out_root)


if __name__ == "__main__":
    main()
