"""The training configuration: `TrainConfig` and its sections, and the checks run before any work.

`configs/train.yaml` mirrors `TrainConfig` (a Hydra structured config); its groups are
`model/`, `data/` (`arpg.data.DataSettings`), `optim/`, `sampling/` (`arpg.sample.SamplingOptions`)
and `experiment/`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from arpg.data import DataSettings
from arpg.errors import require
from arpg import models
from arpg.orders import ORDERS
from arpg.sample.options import SamplingOptions
from arpg.tokenizer import TOKENIZER_CHOICES

DEVICE_CHOICES = ("auto", "cpu")
MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16")
STRATEGY_CHOICES = ("ddp", "fsdp")


@dataclass
class ModelSettings:
    """A registered size (`arpg.models.models.MODEL_SIZES`) plus overrides of its config fields.

    None keeps the registry value. vocab_size, block_size and num_classes always come from the
    data set. Dropouts default to the published recipe.
    """

    name: str = "ARPG-tiny"
    dim: Optional[int] = None
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    multiple_of: Optional[int] = None  # the SwiGLU width is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    rope_base: Optional[float] = None  # 2-D RoPE base; small grids resolve positions better with a small one
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    class_dropout_prob: float = 0.1
    cls_rope: str = "zeros"

    def model_config(self, vocab_size: int, block_size: int, num_classes: int) -> Any:
        """The model family's config for data of this vocabulary, grid and class count."""
        overrides = {k: v for k, v in dataclasses.asdict(self).items() if k != "name" and v is not None}
        return models.model_config(self.name, vocab_size=vocab_size, block_size=block_size,
                            num_classes=num_classes, **overrides)


@dataclass
class OptimSettings:
    """AdamW with linear warmup and cosine decay by step; EMA of the weights.

    `batch_size` is the global batch of one optimizer step (all processes, all accumulated
    micro-batches); it must be divisible by num_processes x grad_accum.
    """

    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 4e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_decay: float = 0.995


@dataclass
class RuntimeSettings:
    """Where and how the math runs. Processes and nodes come from the launcher."""

    device: str = "auto"  # "auto": the launcher's GPU if there is one, else CPU; "cpu": force CPU
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    strategy: str = "ddp"  # "ddp" (replicate) | "fsdp" (shard params/grads/optimizer, FSDP2)
    compile: bool = False  # torch.compile the training forward/backward


@dataclass
class GridSettings:
    """Class-conditional sample grids (every `every_steps` and at the end, EMA weights, drawn with
    the run's `sampling` options) and, for the digits data, the final class accuracy of
    `eval_samples` samples."""

    every_steps: int = 0  # 0: only at the end
    classes: list[int] = field(default_factory=lambda: list(range(10)))
    per_class: int = 10  # images per class in a grid (one row per class); 0 disables grids
    tokenizer: str = "pixel_digits"  # "pixel_digits" | "pixel" | "vq16" (needs vq_ckpt) | "none" (no images)
    vq_ckpt: str = ""  # LlamaGen's vq_ds16_c2i.pt, for tokenizer=vq16
    scale: int = 4  # enlarge each image in the PNG grid (nearest), e.g. 4 for 8x8 digits
    eval_samples: int = 1000  # digits data only; 0 disables the accuracy check
    seed: int = 0


@dataclass
class TrainConfig:
    """Everything a training run reads. `configs/train.yaml` mirrors it (Hydra structured config)."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    sample: GridSettings = field(default_factory=GridSettings)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)  # for the grids and the accuracy check
    name: str = "tiny_digits"
    out_dir: str = "runs/tiny_digits"
    order: str = "random"  # training order: a name from arpg.orders.ORDERS
    epochs: float = 40.0
    max_steps: Optional[int] = None  # overrides epochs when set
    stop_at_step: Optional[int] = None  # end this invocation early; the schedule still spans the run
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 1000
    keep_checkpoints: int = 3
    resume: str = "auto"  # "auto" (newest complete checkpoint in out_dir, if any) | "none" | a path
    tensorboard: bool = True


@dataclass
class TrainResult:
    """What `train` returns (and prints as its summary)."""

    steps: int  # optimizer steps done in total (including before a resume)
    total_steps: int
    final_loss: Optional[float]  # mean training loss of the last logging window of this invocation
    loss_log: list[tuple[int, float]]  # (step, mean loss since the previous entry), this invocation
    seconds: float
    out_dir: Path
    checkpoint: Optional[Path]
    weights: Optional[Path]  # EMA safetensors, written when training reached total_steps
    samples: Optional[Path]
    digits_accuracy: Optional[float]


def validate(config: TrainConfig) -> None:
    """Raise ValueError naming the first bad key. Needs no data, model or processes."""
    m, d, o, r, s = config.model, config.data, config.optim, config.runtime, config.sample
    require(m.name in models.MODEL_SIZES, f"model.name must be one of {sorted(models.MODEL_SIZES)}, got {m.name!r}")
    d.validate()
    require(o.batch_size >= 1, f"optim.batch_size must be >= 1, got {o.batch_size}")
    require(o.grad_accum >= 1, f"optim.grad_accum must be >= 1, got {o.grad_accum}")
    require(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    require(0 <= o.min_lr <= o.lr, f"optim.min_lr must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    require(o.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0, got {o.warmup_epochs}")
    require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    for name in ("beta1", "beta2", "ema_decay"):
        require(0 <= getattr(o, name) < 1, f"optim.{name} must be in [0, 1), got {getattr(o, name)}")
    require(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {o.grad_clip}")
    require(r.device in DEVICE_CHOICES, f"runtime.device must be one of {DEVICE_CHOICES}, got {r.device!r}")
    require(r.mixed_precision in MIXED_PRECISION_CHOICES,
            f"runtime.mixed_precision must be one of {MIXED_PRECISION_CHOICES}, got {r.mixed_precision!r}")
    require(r.strategy in STRATEGY_CHOICES, f"runtime.strategy must be one of {STRATEGY_CHOICES}, got {r.strategy!r}")
    require(config.order in ORDERS, f"order must be one of {sorted(ORDERS)}, got {config.order!r}")
    tokenizers = (*TOKENIZER_CHOICES, "none")
    require(s.tokenizer in tokenizers, f"sample.tokenizer must be one of {tokenizers}, got {s.tokenizer!r}")
    if s.tokenizer == "vq16" and s.per_class > 0:
        require(Path(s.vq_ckpt).is_file(),
              f"sample.vq_ckpt {s.vq_ckpt!r} not found: download vq_ds16_c2i.pt from the LlamaGen release "
              f"(huggingface.co/FoundationVision/LlamaGen), pass sample.vq_ckpt=/path/to/it, or set "
              f"sample.tokenizer=none to train without sample images")
    for name in ("every_steps", "per_class", "eval_samples"):
        require(getattr(s, name) >= 0, f"sample.{name} must be >= 0, got {getattr(s, name)}")
    require(config.epochs > 0, f"epochs must be > 0, got {config.epochs}")
    require(config.max_steps is None or config.max_steps >= 1, f"max_steps must be >= 1 or null, got {config.max_steps}")
    require(config.stop_at_step is None or config.stop_at_step >= 1,
            f"stop_at_step must be >= 1 or null, got {config.stop_at_step}")
    for name in ("log_every", "ckpt_every", "keep_checkpoints"):
        require(getattr(config, name) >= 1, f"{name} must be >= 1, got {getattr(config, name)}")
    require(config.resume in ("auto", "none") or Path(config.resume).is_file(),
            f"resume must be 'auto', 'none' or an existing checkpoint file, got {config.resume!r}")


def validate_processes(optim: OptimSettings, num_processes: int) -> None:
    per_step = num_processes * optim.grad_accum
    require(optim.batch_size % per_step == 0,
            f"optim.batch_size must be divisible by num_processes x optim.grad_accum = {num_processes} x "
            f"{optim.grad_accum} = {per_step}, got {optim.batch_size}")


