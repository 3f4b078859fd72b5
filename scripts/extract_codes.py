"""Tokenise an ImageFolder tree into token shards (see `arpg.data.ExtractConfig`).

    python scripts/extract_codes.py data_path=/data/imagenet/train output_dir=/data/imagenet_vq16 \
        vq_ckpt=/weights/vq_ds16_c2i.pt augment=ten_crop
"""

from arpg.commands import extract_codes

if __name__ == "__main__":
    extract_codes()
