"""arpg: guided random-order autoregressive image generation (ARPG).

`arpg.create_model` builds a registered size, `arpg.checkpoint.load_model` reads our safetensors
and the published `.pt` files, `arpg.sample.generate` draws images.
"""

from arpg.model import ARPG, ARPGConfig, MODEL_SIZES, create_model

__all__ = ["ARPG", "ARPGConfig", "MODEL_SIZES", "create_model"]
__version__ = "0.1.0"
