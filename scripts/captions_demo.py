"""A digits model conditioned on captions, asked in words: a picture per prompt, digit accuracy and
stroke agreement (see `arpg.reports.captions`).

    python scripts/train.py experiment=digits_captions
    python scripts/captions_demo.py checkpoint=runs/digits_captions/model.safetensors out_dir=docs
"""

from arpg.cli import hydra_main
from arpg.reports.captions import CaptionsDemoConfig, captions_demo

if __name__ == "__main__":
    hydra_main(captions_demo, CaptionsDemoConfig, "captions_demo")
