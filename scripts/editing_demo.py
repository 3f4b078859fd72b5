"""Zero-shot editing with a digits model: inpainting, outpainting to a wide canvas, 2x expansion
(see `arpg.reports.editing`).

    python scripts/editing_demo.py checkpoint=runs/tiny_digits/model.safetensors out_dir=docs
"""

from arpg.cli import hydra_main
from arpg.reports.editing import EditingDemoConfig, editing_demo

if __name__ == "__main__":
    hydra_main(editing_demo, EditingDemoConfig, "editing_demo")
