"""`scripts/sample.py`: a PNG grid of samples from a checkpoint, per class id (or per prompt for a
text-to-image model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from arpg.checkpoint import load_model
from arpg.cli import overlay_field
from arpg.errors import require
from arpg.images import save_grid
from arpg.runtime import resolve_device
from arpg.sample.decode import check_sampling, generate
from arpg.sample.options import SamplingOptions, resolve_options
from arpg.tokenizer import load_tokenizer


@dataclass
class SampleConfig:
    """`scripts/sample.py` (mirrored by `arpg/configs/sample.yaml`). `sampling`: fields of
    `SamplingOptions` that replace the model's recipe's (`model.sampling`), from the
    `arpg/configs/sampling/` group and the command line; empty: the recipe. From Python it may also be
    a whole `SamplingOptions`, used as it is."""

    checkpoint: str = "???"  # our .safetensors or a published checkpoint
    weights: str = "default"  # default | model | ema
    # Tokens per side for checkpoints that do not record their grid (published .pt files): None keeps
    # 16 (256px); 24 for LlamaGen's *_384.pt and the released PAR models (384px).
    token_grid: Optional[int] = None
    tokenizer: str = "vq16"  # vq16 (needs vq_ckpt) | pixel_digits (8x8 digits, 17 grey levels)
    vq_ckpt: str = ""  # LlamaGen's vq_ds16_c2i.pt when tokenizer=vq16
    classes: list[int] = field(default_factory=lambda: [207, 360, 387, 974, 88, 979, 417, 279])
    prompts: Optional[list[str]] = None  # a text-to-image model's prompts, sampled instead of classes
    samples_per_class: int = 1  # samples per class (or prompt)
    sampling: Any = overlay_field(SamplingOptions)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output: str = "samples/grid.png"
    nrow: int = 8
    scale: int = 1  # enlarge each image (nearest) in the PNG, e.g. 8 for 8x8 digits


def sample_images(config: SampleConfig) -> Path:
    """Load the model and tokenizer, sample `samples_per_class` images per class (or prompt), write
    the grid."""
    require(len(config.classes) >= 1, "classes must list at least one class id, got []")
    require(config.prompts is None or len(config.prompts) >= 1, "prompts must list at least one prompt, got []")
    for name in ("samples_per_class", "nrow", "scale"):
        require(getattr(config, name) >= 1, f"{name} must be >= 1, got {getattr(config, name)}")
    require(config.token_grid is None or config.token_grid >= 1, f"token_grid must be >= 1 or null, got {config.token_grid}")
    device = resolve_device(config.device)
    tokenizer = load_tokenizer(config.tokenizer, config.vq_ckpt).to(device)
    grid = {} if config.token_grid is None else {"block_size": config.token_grid ** 2}
    model = load_model(config.checkpoint, weights=config.weights, device=device, **grid)
    chosen = config.classes if config.prompts is None else config.prompts
    conditions = model.condition.check([c for c in chosen for _ in range(config.samples_per_class)], device=device)
    options = resolve_options(model.sampling, config.sampling, {})
    check_sampling(model, options)
    images = generate(model, conditions, options, generator=torch.Generator().manual_seed(config.seed),
                      tokenizer=tokenizer, progress=True)
    path = save_grid(images, config.output, nrow=config.nrow, scale=config.scale)
    print(f"wrote {model.condition.batch_size(conditions)} samples ({options}) to {path.resolve()}")
    return path
