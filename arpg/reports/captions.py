"""A digits model conditioned on captions, asked in words: a picture per prompt and two checks.

    python scripts/train.py experiment=digits_captions      # ARPG-tiny on the captioned digits
    python scripts/captions_demo.py checkpoint=runs/digits_captions/model.safetensors out_dir=docs

Writes into `out_dir`:
  digits_captions.png   one row per prompt, "a thin zero", "a bold zero", ..., "a bold nine"
                        (`per_prompt` samples each).
  digits_captions.json  the checks, on `eval_samples` fresh samples per prompt:
    - digit accuracy: how often the digits judge (`arpg.digits_judge`, a classifier of real digits,
      independent of the model) reads the prompt's digit;
    - stroke agreement: how often the sample's ink lies on the prompt's side of the median ink of
      the real digits of that class ("thin": below, "bold": at or above; 50% by chance).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from arpg.checkpoint import load_model
from arpg.data import DIGIT_STROKES, digit_prompt, digit_strokes
from arpg.errors import require
from arpg.files import atomic_write
from arpg.digits_judge import DIGITS_CLASSES, check_digits_model, digits_judge
from arpg.sample import SamplingOptions, generate, save_grid
from arpg.tokenizer import PixelTokenizer


@dataclass
class CaptionsDemoConfig:
    """`scripts/captions_demo.py` (mirrored by `arpg/configs/captions_demo.yaml`)."""

    checkpoint: str = "runs/digits_captions/model.safetensors"  # a model of the captioned digits
    out_dir: str = "docs"
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    per_prompt: int = 10  # samples per prompt in the picture
    eval_samples: int = 100  # samples per prompt for the checks
    seed: int = 0
    scale: int = 4  # enlarge each 8x8 digit in the PNG
    device: str = "cpu"


def captions_demo(config: CaptionsDemoConfig) -> dict[str, Any]:
    """Write the picture and the checks (see the module doc) into `config.out_dir`; returns the checks."""
    require(config.per_prompt >= 1 and config.eval_samples >= 1,
            f"per_prompt and eval_samples must be >= 1, got {config.per_prompt}, {config.eval_samples}")
    model = load_model(config.checkpoint, device=config.device)
    check_digits_model(model)
    require(model.config.model_type == "t2i", "checkpoint must be a model of the captioned digits (model_type t2i: "
                                              "python scripts/train.py experiment=digits_captions)")
    out_dir = Path(config.out_dir)
    tokenizer = PixelTokenizer.digits()
    digits = [(c, stroke) for c in range(DIGITS_CLASSES) for stroke in DIGIT_STROKES]
    prompts = [digit_prompt(c, stroke) for c, stroke in digits]
    generator = torch.Generator().manual_seed(config.seed)

    rows = [p for p in prompts for _ in range(config.per_prompt)]
    shown = generate(model, rows, config.sampling, generator=generator)
    picture = save_grid(tokenizer.decode(shown.cpu()), out_dir / "digits_captions.png", nrow=config.per_prompt,
                        scale=config.scale)

    judge, per_prompt = digits_judge(), {}
    for (c, stroke), prompt in zip(digits, prompts):
        tokens = generate(model, [prompt] * config.eval_samples, config.sampling, generator=generator).cpu()
        labels = torch.full((config.eval_samples,), c)
        strokes = digit_strokes(tokens, labels)
        per_prompt[prompt] = {"digit_accuracy": judge.accuracy(tokens, labels),
                              "stroke_agreement": sum(s == stroke for s in strokes) / len(strokes)}
    checks = {
        "digit_accuracy": sum(v["digit_accuracy"] for v in per_prompt.values()) / len(per_prompt),
        "stroke_agreement": sum(v["stroke_agreement"] for v in per_prompt.values()) / len(per_prompt),
        "judge_accuracy_on_real_digits": judge.held_out_accuracy,
        "per_prompt": per_prompt,
        "samples_per_prompt": config.eval_samples,
        "checkpoint": str(config.checkpoint),
        "made_by": ["python scripts/train.py experiment=digits_captions",
                    f"python scripts/captions_demo.py checkpoint={config.checkpoint} out_dir={config.out_dir}"],
        "sampling": asdict(config.sampling),
        "seed": config.seed,
    }
    text = json.dumps(checks, indent=1)
    atomic_write(out_dir / "digits_captions.json", lambda tmp: tmp.write_text(text))
    print(f"wrote {picture} and {out_dir / 'digits_captions.json'}: digit accuracy "
          f"{100 * checks['digit_accuracy']:.1f}% (the judge on real digits: {100 * judge.held_out_accuracy:.1f}%), "
          f"stroke agreement {100 * checks['stroke_agreement']:.1f}% (chance: 50%)")
    return checks
