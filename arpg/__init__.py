"""arpg: autoregressive image generators that decode many tokens per step (ARPG, and LlamaGen/PAR).

`arpg.from_pretrained` loads a published model by name ("ARPG-L", "PAR-3B-16x", "VQ-16", ...), a
`save_pretrained` folder or a weights file; `arpg.tokenizer_for` gives the tokenizer a model's
tokens are meant for; `arpg.create_model` builds a registered size; `arpg.sample.generate` draws
images, by default with the model's own recipe (`model.sampling`, an `arpg.sample.SamplingOptions`).
"""

from arpg.hub import from_pretrained, tokenizer_for
from arpg.models import MODEL_SIZES, create_model
from arpg.models.arpg import ARPG, ARPGConfig
from arpg.models.llamagen import LlamaGen, LlamaGenConfig

__all__ = ["ARPG", "ARPGConfig", "LlamaGen", "LlamaGenConfig", "MODEL_SIZES", "create_model", "from_pretrained",
           "tokenizer_for"]
__version__ = "0.1.0"
