"""Training: one loop for a laptop CPU, one GPU, DDP over GPUs and nodes, and FSDP.

`train(TrainConfig(...))` runs it; `python scripts/train.py` composes the config from
`arpg/configs/train.yaml`. Modules: `config` (TrainConfig, its sections and checks), `state` (the
run's state, EMA, schedule and checkpoint files), `nonfinite` (stopping a run that diverged
before anything of it is saved), `loop` (the loop itself).
"""

from arpg.train.config import TrainConfig, TrainResult, validate
from arpg.train.loop import train
from arpg.train.state import learning_rate

__all__ = ["TrainConfig", "TrainResult", "learning_rate", "train", "validate"]
