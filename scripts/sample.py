"""Draw a PNG grid of class-conditional samples from a checkpoint (see `arpg.sample.script.SampleConfig`).

    python scripts/sample.py checkpoint=arpg_300m.pt vq_ckpt=vq_ds16_c2i.pt sampling.cfg=4.0
    python scripts/sample.py checkpoint=runs/tiny_digits/model.safetensors tokenizer=pixel_digits \
        sampling=digits classes=[0,1,2,3,4,5,6,7,8,9] samples_per_class=4 nrow=10 scale=8
"""

from arpg.commands import sample

if __name__ == "__main__":
    sample()
