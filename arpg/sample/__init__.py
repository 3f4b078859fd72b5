"""Sampling: `generate` for every model family, zero-shot editing for ARPG, and PNG grids.

    from arpg.sample import SamplingOptions, generate
    images = generate(model, labels, SamplingOptions(steps=8, cfg=3.0), tokenizer=tokenizer)
    images = generate(model, labels, steps=8, cfg=3.0, tokenizer=tokenizer)   # the same

Modules: `options` (SamplingOptions), `draw` (logit filtering and the token draw), `decode` (the
decode loop and `generate`), `editing` (inpaint / outpaint / expand), `script` (scripts/sample.py).
"""

from arpg.images import save_grid
from arpg.sample.decode import generate
from arpg.sample.draw import filter_logits
from arpg.sample.editing import expand, inpaint, outpaint
from arpg.sample.options import SamplingOptions

__all__ = ["SamplingOptions", "expand", "filter_logits", "generate", "inpaint", "outpaint", "save_grid"]
