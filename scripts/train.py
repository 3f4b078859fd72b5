"""Train ARPG (see `arpg.train.TrainConfig` and configs/train.yaml).

    python scripts/train.py                                   # tiny model on the digits, CPU, < 5 min
    accelerate launch --multi_gpu --num_processes 8 scripts/train.py experiment=imagenet_arpg_l
    torchrun --nproc_per_node 8 scripts/train.py experiment=imagenet_arpg_l
"""

from arpg.cli import hydra_main
from arpg.train import TrainConfig, train

if __name__ == "__main__":
    hydra_main(train, TrainConfig, "train")
