"""Tokenise an ImageFolder tree into token shards (see `arpg.data.ExtractConfig`).

    python scripts/extract_codes.py data_path=/data/imagenet/train output_dir=/data/imagenet_vq16 \
        vq_ckpt=/weights/vq_ds16_c2i.pt augment=ten_crop
"""

from arpg.cli import hydra_main
from arpg.data import ExtractConfig, extract_codes

if __name__ == "__main__":
    hydra_main(extract_codes, ExtractConfig, "extract_codes")
