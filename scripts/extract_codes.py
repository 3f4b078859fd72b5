"""Tokenise an ImageFolder tree into token shards (see `arpg.data.ExtractConfig`).

    python scripts/extract_codes.py data_path=/data/imagenet/train output_dir=/data/imagenet_vq16 \
        vq_ckpt=/weights/vq_ds16_c2i.pt augment=ten_crop

The same command under `torchrun --nproc_per_node 8` or `accelerate launch --multi_gpu
--num_processes 8` (one GPU per process; several nodes too) splits the shards over the processes
and writes the same shards; an interrupted run resumes on any number of processes.
"""

from arpg.commands import extract_codes

if __name__ == "__main__":
    extract_codes()
