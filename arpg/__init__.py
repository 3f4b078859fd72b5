"""arpg: autoregressive image generators that decode many tokens per step (ARPG, and LlamaGen/PAR).

`arpg.create_model` builds a registered size, `arpg.checkpoint.load_model` reads our safetensors
and the published `.pt` files, `arpg.sample.generate` draws images with the settings of one
`arpg.sample.SamplingOptions`.
"""

from arpg.models import MODEL_SIZES, create_model
from arpg.models.arpg import ARPG, ARPGConfig
from arpg.models.llamagen import LlamaGen, LlamaGenConfig

__all__ = ["ARPG", "ARPGConfig", "LlamaGen", "LlamaGenConfig", "MODEL_SIZES", "create_model"]
__version__ = "0.1.0"
