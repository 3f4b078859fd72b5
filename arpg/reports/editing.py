"""Zero-shot editing with a digits model: inpainting, outpainting to a wide canvas, 2x expansion.

    python scripts/editing_demo.py checkpoint=runs/tiny_digits/model.safetensors out_dir=docs

Writes three PNG grids into `out_dir` (each image enlarged `scale` times; unknown pixels of the
inputs are drawn mid-grey):
  editing_inpaint.png  rows: one real digit per class. Columns: the digit; then, per mask (right
                       half / centre 4x4 / 75% random pixels), the masked input and two inpaintings;
                       last, the right half regenerated as the *next* class (label + 1 mod 10).
  editing_outpaint.png each real digit centred on an 8x32 canvas, then two outpaintings of it.
  editing_expand.png   per class: a sampled 8x8 digit (nearest-upsampled) and two 16x16 expansions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from arpg.checkpoint import load_model
from arpg.errors import require
from arpg.sample import SamplingOptions, expand, generate, inpaint, outpaint, save_grid
from arpg.tokenizer import PixelTokenizer


@dataclass
class EditingDemoConfig:
    """`scripts/editing_demo.py` (mirrored by `arpg/configs/editing_demo.yaml`)."""

    checkpoint: str = "runs/tiny_digits/model.safetensors"  # a model trained on the 8x8 digits (vocab 17, 10 classes)
    out_dir: str = "docs"
    sampling: SamplingOptions = field(default_factory=lambda: SamplingOptions(steps=16, cfg=2.0))
    seed: int = 0
    scale: int = 8
    device: str = "cpu"


def _real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The first scikit-learn digit of each class: tokens (10, 8, 8) (grey levels 0..16), labels (10,)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    targets = torch.as_tensor(data.target)
    first = torch.stack([(targets == c).nonzero()[0, 0] for c in range(10)])
    return torch.as_tensor(data.images, dtype=torch.long)[first], targets[first]


def _show(tokenizer: PixelTokenizer, tokens: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
    """Images (B, 1, H, W) of token grids, unknown positions mid-grey."""
    images = tokenizer.decode(tokens.cpu())
    if known is not None:
        images = torch.where(known.expand_as(tokens)[:, None].cpu(), images, torch.zeros_like(images))
    return images


def _interleave(*columns: torch.Tensor) -> torch.Tensor:
    """Per-row columns (B, C, H, W) each -> (B * len(columns), C, H, W), row by row."""
    return torch.stack(columns, dim=1).flatten(0, 1)


def editing_demo(config: EditingDemoConfig) -> list[Path]:
    """Write the three editing grids (see the module doc) into `config.out_dir`; returns their paths."""
    model = load_model(config.checkpoint, device=config.device)
    require((model.config.vocab_size, model.config.block_size) == (17, 64),
            f"checkpoint must be a digits model (vocab_size 17, 8x8 tokens), got vocab_size "
            f"{model.config.vocab_size}, block_size {model.config.block_size}")
    tokenizer = PixelTokenizer.digits()
    tokens, labels = _real_digits()
    tokens, labels = tokens.to(config.device), labels.to(config.device)
    out_dir = Path(config.out_dir)
    options = config.sampling

    def seeded(offset: int) -> torch.Generator:
        return torch.Generator().manual_seed(config.seed + offset)

    right_half = torch.zeros(8, 8, dtype=torch.bool)
    right_half[:, :4] = True
    centre = torch.ones(8, 8, dtype=torch.bool)
    centre[2:6, 2:6] = False
    sparse = torch.rand(10, 8, 8, generator=seeded(100)) < 0.25
    columns = [_show(tokenizer, tokens)]
    for i, keep in enumerate((right_half, centre, sparse)):
        keep = keep.to(config.device)
        columns.append(_show(tokenizer, tokens, keep))
        columns += [_show(tokenizer, inpaint(model, tokens, keep, labels, generator=seeded(10 * i + s), options=options))
                    for s in range(2)]
    other = (labels + 1) % 10
    columns.append(_show(tokenizer, inpaint(model, tokens, right_half.to(config.device), other,
                                            generator=seeded(50), options=options)))
    paths = [save_grid(_interleave(*columns), out_dir / "editing_inpaint.png", nrow=len(columns), scale=config.scale)]

    wide = (8, 32)
    placed = torch.zeros(10, *wide, dtype=torch.long, device=config.device)
    placed[:, :, 12:20] = tokens
    known = torch.zeros(wide, dtype=torch.bool, device=config.device)
    known[:, 12:20] = True
    columns = [_show(tokenizer, placed, known)]
    columns += [_show(tokenizer, outpaint(model, tokens, labels, size=wide, generator=seeded(60 + s), options=options))
                for s in range(2)]
    paths.append(save_grid(_interleave(*columns), out_dir / "editing_outpaint.png", nrow=3, scale=config.scale))

    small = generate(model, labels, generator=seeded(70), options=options)
    columns = [_show(tokenizer, small.repeat_interleave(2, 1).repeat_interleave(2, 2))]
    columns += [_show(tokenizer, expand(model, small, labels, factor=2, generator=seeded(80 + s), options=options))
                for s in range(2)]
    paths.append(save_grid(_interleave(*columns), out_dir / "editing_expand.png", nrow=3, scale=max(1, config.scale // 2)))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return paths
