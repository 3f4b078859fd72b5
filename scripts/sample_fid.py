"""Draw N class-conditional samples into PNGs and an ADM-style .npz (see `arpg.sample_fid`).

    torchrun --nproc_per_node 8 scripts/sample_fid.py preset=arpg_l checkpoint=pretrained/arpg_300m.pt \
        vq_ckpt=pretrained/vq_ds16_c2i.pt output_dir=samples/arpg_l      # -> samples/arpg_l.npz
    python scripts/sample_fid.py checkpoint=runs/tiny_digits/model.safetensors tokenizer=pixel_digits \
        num_images=1000 sampling=digits output_dir=samples/digits
"""

from arpg.commands import sample_fid

if __name__ == "__main__":
    sample_fid()
