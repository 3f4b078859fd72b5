"""Train ARPG, LlamaGen or PAR (see `arpg.train.TrainConfig` and arpg/configs/train.yaml).

    python scripts/train.py                                   # tiny ARPG on the digits, CPU, minutes
    python scripts/train.py experiment=digits_llamagen        # tiny LlamaGen (raster) on the digits
    python scripts/train.py experiment=digits_par             # tiny PAR-4x on the digits
    accelerate launch --multi_gpu --num_processes 8 scripts/train.py experiment=imagenet_arpg_l
    torchrun --nproc_per_node 8 scripts/train.py experiment=imagenet_arpg_l
"""

from arpg.commands import train

if __name__ == "__main__":
    train()
