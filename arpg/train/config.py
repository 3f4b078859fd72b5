"""The training configuration: `TrainConfig` and its sections, and the checks run before any work.

`arpg/configs/train.yaml` mirrors `TrainConfig` (a Hydra structured config); its groups are
`model/`, `data/` (`arpg.data.DataSettings`), `optim/`, `sampling/` (`arpg.sample.SamplingOptions`)
and `experiment/`.

Settings left None are taken from the data set (`resolve`): the run's name and folder, and the
sample grids' tokenizer and classes (their enlargement from the decoded images' size). So
`python scripts/train.py data=codes data.path=data/my_codes` trains on one's own codes in
`runs/tiny_my_codes` with grids decoded by the tokenizer the codes were made with. `plan_run`
then checks every setting against the data (classes, vocabulary, grid, batch) before any model,
data loading or output folder exists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from arpg import models
from arpg.condition import Condition
from arpg.data import DataSettings
from arpg.errors import require
from arpg.orders import ORDERS
from arpg.sample.decode import check_sampling
from arpg.sample.options import SamplingOptions
from arpg.tokenizer import TOKENIZER_CHOICES

DEVICE_CHOICES = ("auto", "cpu")
# What a resume may change on request (`resume_changes`) of the run it continues (its
# `run_record`): everything but the model, whose weights would not load.
RESUME_CHANGES = ("data", "order", "seed", "batch_size", "total_steps", "warmup_steps")
MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16", "auto")
STRATEGY_CHOICES = ("ddp", "fsdp")


@dataclass
class ModelSettings:
    """A registered size (`arpg.models.MODEL_SIZES`: ARPG-*, LlamaGen-*, PAR-*) plus overrides of
    its config fields.

    None keeps the registry value. vocab_size, block_size and the condition's fields (num_classes,
    or model_type, caption_dim and cls_token_num) always come from the data set. Dropouts default to the published recipe. The last fields belong to one family and
    must stay None for the other: `cls_rope` (ARPG), `regions` and `drop_path_rate` (LlamaGen/PAR).
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
    cls_rope: Optional[str] = None  # ARPG: "zeros" (published) | "identity"
    regions: Optional[int] = None  # LlamaGen/PAR: PAR's n, 1 (LlamaGen) | 4 | 16
    drop_path_rate: Optional[float] = None  # LlamaGen/PAR: stochastic depth

    @property
    def family(self) -> models.Family:
        """The family of the registered size `name`."""
        return models.FAMILIES[models.MODEL_SIZES[self.name][0]]

    def model_config(self, vocab_size: int, block_size: int, condition: Condition) -> Any:
        """The model family's config for data of this vocabulary, grid and condition."""
        overrides = {k: v for k, v in dataclasses.asdict(self).items() if k != "name" and v is not None}
        return models.model_config(self.name, vocab_size=vocab_size, block_size=block_size,
                                   **condition.config_fields(), **overrides)


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
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16" | "auto" (bf16 on CUDA, float32 on a CPU: arpg.runtime.training_precision)
    threads: int = 1  # CPU intra-op threads per process (0: torch's default); see arpg.runtime.set_cpu_threads
    strategy: str = "ddp"  # "ddp" (replicate) | "fsdp" (shard params/grads/optimizer, FSDP2)
    compile: bool = False  # torch.compile the training forward/backward
    # How long a process waits for the others at a collective before the job fails. The others wait
    # while the main process writes a checkpoint or draws a sample grid: a 3B model's state with
    # its optimizer is ~50 GB, longer to write than NCCL's default 10 minutes on slow disks.
    collective_timeout_minutes: float = 60.0
    # float32 matmuls and convolutions on CUDA in TF32 (10-bit mantissa, as most training recipes
    # run them; bf16 autocast matmuls are unaffected); false: true float32 (slower on tensor cores)
    tf32: bool = True


@dataclass
class GridSettings:
    """Class-conditional sample grids (every `every_steps` and at the end, EMA weights, drawn with
    the run's `sampling` options) and, for the digits data, the final class accuracy of
    `eval_samples` samples. None: from the data set (see `resolve`)."""

    every_steps: int = 0  # 0: only at the end
    classes: Optional[list[int]] = None  # None: the data's first (up to) 10 classes
    per_class: int = 10  # images per class in a grid (one row per class); 0 disables grids
    # None: the data's own tokenizer (pixel grey levels, or vq16 with the weights file the codes
    # were extracted with) | "pixel_digits" | "pixel" | "vq16" (needs vq_ckpt) | "none" (no images)
    tokenizer: Optional[str] = None
    vq_ckpt: str = ""  # LlamaGen's vq_ds16_c2i.pt (or our VQ safetensors); "": the file the data records
    scale: Optional[int] = None  # enlarge each image in the PNG (nearest); None: to >= 32 pixels a side
    eval_samples: int = 1000  # digits data only; 0 disables the accuracy check
    seed: int = 0


@dataclass
class TrainConfig:
    """Everything a training run reads. `arpg/configs/train.yaml` mirrors it (Hydra structured config)."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    grids: GridSettings = field(default_factory=GridSettings)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)  # for the grids and the accuracy check
    name: Optional[str] = None  # None: <model>_<data>, e.g. tiny_digits, tiny_my_codes (data.path's folder)
    out_dir: Optional[str] = None  # None: runs/<name>
    order: Optional[str] = None  # ARPG's training order, a name from arpg.orders.ORDERS; None: random
    epochs: float = 40.0
    max_steps: Optional[int] = None  # overrides epochs when set
    stop_at_step: Optional[int] = None  # end this invocation early; the schedule still spans the run
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 1000
    keep_checkpoints: int = 3
    # Steps with a non-finite loss or gradient norm to skip (not apply) before the run stops; 0:
    # stop at the first, keeping the last good checkpoint (arpg.train.nonfinite). > 0 costs a host
    # sync per step.
    skip_nonfinite_steps: int = 0
    resume: str = "auto"  # "auto" (newest complete checkpoint in out_dir, if any) | "none" | a path
    # What a resume may deliberately change of the run it continues (RESUME_CHANGES), e.g.
    # [total_steps] to extend a finished run: its schedule is then recomputed for the new length.
    resume_changes: list[str] = field(default_factory=list)
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
    m, d, o, r, s = config.model, config.data, config.optim, config.runtime, config.grids
    require(m.name in models.MODEL_SIZES, f"model.name must be one of {sorted(models.MODEL_SIZES)}, got {m.name!r}")
    _validate_family_settings(config)
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
    require(isinstance(r.threads, int) and r.threads >= 0, f"runtime.threads must be an int >= 0 (0: torch's default), got {r.threads!r}")
    require(r.strategy in STRATEGY_CHOICES, f"runtime.strategy must be one of {STRATEGY_CHOICES}, got {r.strategy!r}")
    require(r.collective_timeout_minutes > 0,
            f"runtime.collective_timeout_minutes must be > 0, got {r.collective_timeout_minutes}")
    require(config.order is None or config.order in ORDERS,
            f"order must be one of {sorted(ORDERS)} or null, got {config.order!r}")
    tokenizers = (*TOKENIZER_CHOICES, "none")
    require(s.tokenizer is None or s.tokenizer in tokenizers,
            f"grids.tokenizer must be null (the data's own) or one of {tokenizers}, got {s.tokenizer!r}")
    if s.vq_ckpt and s.per_class > 0 and s.tokenizer in (None, "vq16"):
        require(Path(s.vq_ckpt).is_file(),
                f"grids.vq_ckpt {s.vq_ckpt!r} not found: download vq_ds16_c2i.pt from the LlamaGen release "
                f"(huggingface.co/FoundationVision/LlamaGen), pass grids.vq_ckpt=/path/to/it, or set "
                f"grids.tokenizer=none to train without sample images")
    for name in ("every_steps", "per_class", "eval_samples"):
        require(getattr(s, name) >= 0, f"grids.{name} must be >= 0, got {getattr(s, name)}")
    require(s.classes is None or all(c >= 0 for c in s.classes),
            f"grids.classes must be class ids >= 0 or null (the data's first 10), got {s.classes}")
    require(s.classes is None or len(s.classes) >= 1 or s.per_class == 0,
            "grids.classes must name at least one class (or set grids.per_class=0 for no grids), got []")
    require(s.scale is None or s.scale >= 1, f"grids.scale must be >= 1 or null, got {s.scale}")
    require(config.name is None or (config.name and "/" not in config.name),
            f"name must be a non-empty folder name without '/' or null (<model>_<data>), got {config.name!r}")
    require(config.epochs > 0, f"epochs must be > 0, got {config.epochs}")
    require(config.max_steps is None or config.max_steps >= 1, f"max_steps must be >= 1 or null, got {config.max_steps}")
    require(config.stop_at_step is None or config.stop_at_step >= 1,
            f"stop_at_step must be >= 1 or null, got {config.stop_at_step}")
    for name in ("log_every", "ckpt_every", "keep_checkpoints"):
        require(getattr(config, name) >= 1, f"{name} must be >= 1, got {getattr(config, name)}")
    require(config.skip_nonfinite_steps >= 0,
            f"skip_nonfinite_steps must be >= 0 (0: stop at the first non-finite step), got {config.skip_nonfinite_steps}")
    require(config.resume in ("auto", "none") or Path(config.resume).is_file(),
            f"resume must be 'auto', 'none' or an existing checkpoint file, got {config.resume!r}")
    unknown = sorted(set(config.resume_changes) - set(RESUME_CHANGES))
    require(not unknown, f"resume_changes must name some of {list(RESUME_CHANGES)}, got {unknown}")


def resolve(config: TrainConfig, dataset: Any) -> TrainConfig:
    """`config` with the settings left None taken from the data set (a copy; see the module doc)."""
    d, s = config.data, config.grids
    short = config.model.name.removeprefix("ARPG-").lower()
    name = config.name or f"{short}_{d.label}"
    tokenizer, vq_ckpt = s.tokenizer, s.vq_ckpt
    if tokenizer is None:  # the tokenizer the codes were made with
        tokenizer = "pixel" if dataset.tokenizer.startswith("pixel") else "vq16"
        if tokenizer == "vq16" and not vq_ckpt:
            vq_ckpt = dataset.tokenizer_file or ""
    classes = s.classes
    if classes is None and dataset.num_classes is not None:
        classes = list(range(min(10, dataset.num_classes)))
    grids = dataclasses.replace(s, tokenizer=tokenizer, vq_ckpt=vq_ckpt, classes=classes)
    return dataclasses.replace(config, name=name, out_dir=config.out_dir or f"runs/{name}", grids=grids)


@dataclass(frozen=True)
class RunPlan:
    """What a resolved config means on its data set: the model config and the step counts."""

    model_config: Any
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    end_step: int  # where this invocation stops (stop_at_step, else total_steps)


def plan_run(config: TrainConfig, dataset: Any) -> RunPlan:
    """Check a resolved config against its data set (batch, classes, the sample tokenizer's
    vocabulary, the sampling options on the data's grid) and work out the run's shape. Builds the
    model on the meta device only: no memory, no weights."""
    o, s = config.optim, config.grids
    h, w = dataset.grid_size
    require(o.batch_size <= len(dataset),
            f"optim.batch_size must be <= the data set size {len(dataset)}, got {o.batch_size}")
    model_config = config.model.model_config(dataset.codebook_size, h * w, dataset.condition)
    wants_grids = s.tokenizer != "none" and s.per_class > 0
    if wants_grids:
        require(dataset.num_classes is not None, "sample: the grids show classes, and this data has none "
                                                 "(captions); set grids.per_class=0")
        require(all(c < dataset.num_classes for c in s.classes),
                f"grids.classes must be class ids in [0, {dataset.num_classes}) (the data's classes), got {s.classes}")
        require(s.tokenizer != "pixel_digits" or dataset.codebook_size == 17,
                f"grids.tokenizer=pixel_digits has 17 codes, the data {dataset.codebook_size}; leave "
                f"grids.tokenizer unset (the data's own) or set grids.tokenizer=none")
        require(s.tokenizer != "vq16" or Path(s.vq_ckpt).is_file(),
                f"grids.vq_ckpt {s.vq_ckpt!r} not found: the grids of data made with {dataset.tokenizer} need its "
                f"weights file; pass grids.vq_ckpt=/path/to/vq_ds16_c2i.pt or set grids.tokenizer=none")
    if wants_grids or (config.data.name == "digits" and s.eval_samples > 0):
        with torch.device("meta"):
            model = models.build_model(model_config)
        check_sampling(model, config.sampling, what="sampling")
    steps_per_epoch = len(dataset) // o.batch_size
    total_steps = config.max_steps or max(1, round(config.epochs * steps_per_epoch))
    warmup_steps = min(round(o.warmup_epochs * steps_per_epoch), total_steps)
    return RunPlan(model_config, steps_per_epoch, total_steps, warmup_steps,
                   end_step=min(total_steps, config.stop_at_step or total_steps))


def _validate_family_settings(config: TrainConfig) -> None:
    """Settings that exist for one family only; a family that trains along its own sequence
    (LlamaGen, PAR) takes no training order. (Its decoding options are checked by `plan_run`.)"""
    family, settings = config.model.family, dataclasses.asdict(config.model)
    fields = family.config.__dataclass_fields__
    for key, value in settings.items():
        require(key == "name" or value is None or key in fields,
                f"model.{key} does not apply to {config.model.name} ({family.config.__name__}); set it to null")
    require(config.order is None or not family.fixed_order,
            f"order: {config.model.name} trains along its own sequence; set order=null")


def validate_processes(optim: OptimSettings, num_processes: int) -> None:
    per_step = num_processes * optim.grad_accum
    require(optim.batch_size % per_step == 0,
            f"optim.batch_size must be divisible by num_processes x optim.grad_accum = {num_processes} x "
            f"{optim.grad_accum} = {per_step}, got {optim.batch_size}")


