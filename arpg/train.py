"""Training ARPG: one loop for a laptop CPU, one GPU, DDP over GPUs and nodes, and FSDP.

Read top to bottom:

* The config: `TrainConfig` and its sections (`ModelSettings`, `DataSettings`, `OptimSettings`,
  `RuntimeSettings`, `SampleSettings`), mirrored by `configs/train.yaml` and its groups.
* `validate`: every check that can fail before any work starts.
* Building blocks: the learning-rate schedule, `EMA`, the per-process batch sampler, checkpoints.
* `train(config)`: the loop.

Randomness is *derived*, not carried: the data order of epoch e comes from (seed, e), and the
training order, class dropout and dropout masks of micro-batch g of step s come from (seed, s, g),
where g numbers the global batch's equal slices. So a run resumed from a checkpoint repeats
exactly what the uninterrupted run would have done, and 2 processes x 1 micro-batch compute the
same update as 1 process x 2 accumulated micro-batches (the same global batch either way).

Launching (see the README): `python scripts/train.py` (CPU or one GPU),
`accelerate launch --multi_gpu --num_processes 8 scripts/train.py ...` or
`torchrun --nproc_per_node 8 scripts/train.py ...` (DDP; add `--nnodes/--node_rank/--master_addr`
for several nodes), and `runtime.strategy=fsdp` to shard parameters, gradients and optimizer
state (FSDP2) for the large sizes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from arpg.checkpoint import atomic_write, save
from arpg.data import DIGITS_SPLITS, TokenDataset, digits_dataset
from arpg.model import ARPG, ARPGConfig, MODEL_SIZES, model_config
from arpg.orders import ORDERS, make_order
from arpg.quality import digits_class_accuracy
from arpg.sample import generate, save_grid
from arpg.tokenizer import TOKENIZER_CHOICES, load_tokenizer

log = logging.getLogger(__name__)

DATA_CHOICES = ("digits", "codes")
DEVICE_CHOICES = ("auto", "cpu")
MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16")
STRATEGY_CHOICES = ("ddp", "fsdp")
CHECKPOINT_GLOB = "step_*.pt"


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

@dataclass
class ModelSettings:
    """A registered size (`arpg.model.MODEL_SIZES`) plus overrides of its `ARPGConfig` fields.

    None keeps the registry value. vocab_size, block_size and num_classes always come from the
    data set. Dropouts default to the published recipe.
    """

    name: str = "ARPG-tiny"
    dim: Optional[int] = None
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    multiple_of: Optional[int] = None  # the SwiGLU width is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    class_dropout_prob: float = 0.1
    cls_rope: str = "zeros"

    def arpg_config(self, vocab_size: int, block_size: int, num_classes: int) -> ARPGConfig:
        overrides = {k: v for k, v in dataclasses.asdict(self).items() if k != "name" and v is not None}
        return model_config(self.name, vocab_size=vocab_size, block_size=block_size,
                            num_classes=num_classes, **overrides)


@dataclass
class DataSettings:
    """`digits`: scikit-learn's 8x8 digits as tokens (bundled). `codes`: a token-shard folder
    written by scripts/extract_codes.py (`path`)."""

    name: str = "digits"
    path: Optional[str] = None
    split: Optional[str] = None  # digits only: None (all 1797), "train" or "test"
    num_workers: int = 0


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
class SampleSettings:
    """Class-conditional sample grids (every `every_steps` and at the end, EMA weights) and, for
    the digits data, the final class accuracy of `eval_samples` samples."""

    every_steps: int = 0  # 0: only at the end
    classes: list[int] = field(default_factory=lambda: list(range(10)))
    per_class: int = 10  # images per class in a grid (one row per class); 0 disables grids
    tokenizer: str = "pixel_digits"  # "pixel_digits" | "pixel" | "vq16" (needs vq_ckpt) | "none" (no images)
    vq_ckpt: str = ""  # LlamaGen's vq_ds16_c2i.pt, for tokenizer=vq16
    scale: int = 4  # enlarge each image in the PNG grid (nearest), e.g. 4 for 8x8 digits
    steps: int = 8
    schedule: str = "cosine"
    cfg: float = 3.0
    cfg_schedule: str = "constant"
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    order: str = "random"
    eval_samples: int = 1000  # digits data only; 0 disables the accuracy check
    seed: int = 0


@dataclass
class TrainConfig:
    """Everything a training run reads. `configs/train.yaml` mirrors it (Hydra structured config)."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    sample: SampleSettings = field(default_factory=SampleSettings)
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


# ---------------------------------------------------------------------------------------------
# Validation: everything that can be checked before any work starts
# ---------------------------------------------------------------------------------------------

def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _unknown_keys(section: Any, prefix: str = "") -> list[str]:
    """Attributes of a config dataclass (and its sections) that are not fields.

    Hydra's `+key=value` appends even to a structured config and OmegaConf.to_object then sets
    the stray key as an attribute, so a typo like `+optim.lrr=1` would otherwise pass silently.
    """
    fields = {f.name for f in dataclasses.fields(section)}
    unknown = [prefix + name for name in vars(section) if name not in fields]
    for name in fields:
        value = getattr(section, name)
        if dataclasses.is_dataclass(value):
            unknown += _unknown_keys(value, f"{prefix}{name}.")
    return unknown


def validate(config: TrainConfig) -> None:
    """Raise ValueError naming the first bad key. Needs no data, model or processes."""
    unknown = _unknown_keys(config)
    _need(not unknown, f"unknown config keys {unknown} (not fields of arpg.train.TrainConfig; check the spelling)")
    m, d, o, r, s = config.model, config.data, config.optim, config.runtime, config.sample
    _need(m.name in MODEL_SIZES, f"model.name must be one of {sorted(MODEL_SIZES)}, got {m.name!r}")
    _need(d.name in DATA_CHOICES, f"data.name must be one of {DATA_CHOICES}, got {d.name!r}")
    if d.name == "codes":
        _need(bool(d.path), "data.path must be set for data.name=codes (a folder made by scripts/extract_codes.py)")
        _need(Path(d.path, "manifest.json").is_file(),
              f"data.path {d.path!r} is not a token-shard folder (no manifest.json there); make one with "
              f"scripts/extract_codes.py or point data.path at it")
    else:
        _need(d.split in DIGITS_SPLITS, f"data.split must be one of {DIGITS_SPLITS}, got {d.split!r}")
    _need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    _need(o.batch_size >= 1, f"optim.batch_size must be >= 1, got {o.batch_size}")
    _need(o.grad_accum >= 1, f"optim.grad_accum must be >= 1, got {o.grad_accum}")
    _need(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _need(0 <= o.min_lr <= o.lr, f"optim.min_lr must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    _need(o.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0, got {o.warmup_epochs}")
    _need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    for name in ("beta1", "beta2", "ema_decay"):
        _need(0 <= getattr(o, name) < 1, f"optim.{name} must be in [0, 1), got {getattr(o, name)}")
    _need(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {o.grad_clip}")
    _need(r.device in DEVICE_CHOICES, f"runtime.device must be one of {DEVICE_CHOICES}, got {r.device!r}")
    _need(r.mixed_precision in MIXED_PRECISION_CHOICES,
          f"runtime.mixed_precision must be one of {MIXED_PRECISION_CHOICES}, got {r.mixed_precision!r}")
    _need(r.strategy in STRATEGY_CHOICES, f"runtime.strategy must be one of {STRATEGY_CHOICES}, got {r.strategy!r}")
    _need(config.order in ORDERS, f"order must be one of {sorted(ORDERS)}, got {config.order!r}")
    _need(s.order in ORDERS, f"sample.order must be one of {sorted(ORDERS)}, got {s.order!r}")
    tokenizers = (*TOKENIZER_CHOICES, "none")
    _need(s.tokenizer in tokenizers, f"sample.tokenizer must be one of {tokenizers}, got {s.tokenizer!r}")
    if s.tokenizer == "vq16" and s.per_class > 0:
        _need(Path(s.vq_ckpt).is_file(),
              f"sample.vq_ckpt {s.vq_ckpt!r} not found: download vq_ds16_c2i.pt from the LlamaGen release "
              f"(huggingface.co/FoundationVision/LlamaGen), pass sample.vq_ckpt=/path/to/it, or set "
              f"sample.tokenizer=none to train without sample images")
    for name in ("every_steps", "per_class", "eval_samples"):
        _need(getattr(s, name) >= 0, f"sample.{name} must be >= 0, got {getattr(s, name)}")
    _need(config.epochs > 0, f"epochs must be > 0, got {config.epochs}")
    _need(config.max_steps is None or config.max_steps >= 1, f"max_steps must be >= 1 or null, got {config.max_steps}")
    _need(config.stop_at_step is None or config.stop_at_step >= 1,
          f"stop_at_step must be >= 1 or null, got {config.stop_at_step}")
    for name in ("log_every", "ckpt_every", "keep_checkpoints"):
        _need(getattr(config, name) >= 1, f"{name} must be >= 1, got {getattr(config, name)}")
    _need(config.resume in ("auto", "none") or Path(config.resume).is_file(),
          f"resume must be 'auto', 'none' or an existing checkpoint file, got {config.resume!r}")


def _validate_processes(optim: OptimSettings, num_processes: int) -> None:
    per_step = num_processes * optim.grad_accum
    _need(optim.batch_size % per_step == 0,
          f"optim.batch_size must be divisible by num_processes x optim.grad_accum = {num_processes} x "
          f"{optim.grad_accum} = {per_step}, got {optim.batch_size}")


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------

def learning_rate(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """LR of optimizer step `step` (0-based): linear warmup to `lr`, then half-cosine to `min_lr`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _full(t: Tensor) -> Tensor:
    """The whole tensor of a (possibly FSDP-sharded DTensor) parameter; a collective when sharded."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class EMA:
    """Exponential moving average of a model's parameters, in float32 whatever the model's dtype.

    Holds one tensor per parameter shaped like the parameter as this process sees it: the whole
    tensor under DDP, this process's shard under FSDP (so the EMA is sharded like the model).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]
        self.tensors = [p.detach().float().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(self.tensors, params, 1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        """Full CPU tensors by parameter name (gathers shards: call on every process)."""
        return {name: _full(t).cpu() for name, t in zip(self.names, self.tensors)}


def _derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from a tuple of non-negative ints (SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)


_DATA_STREAM, _STEP_STREAM = 0, 1


class _RankBatches(torch.utils.data.Sampler):
    """This process's micro-batches (lists of indices) of one epoch, from global batch `start`.

    The epoch's permutation is cut into global batches; process `rank` takes the rank-th of
    `world` equal slabs of each and cuts it into `accum` micro-batches. Micro-batch `a` of rank
    `r` is therefore slice g = r * accum + a of the global batch under any launch layout.
    """

    def __init__(self, permutation: Tensor, global_batch: int, rank: int, world: int, accum: int,
                 start: int, stop: int):
        self.permutation = permutation
        self.global_batch, self.rank, self.world, self.accum = global_batch, rank, world, accum
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accum

    def __iter__(self):
        per_rank = self.global_batch // self.world
        micro = per_rank // self.accum
        for batch in range(self.start, self.stop):
            first = batch * self.global_batch + self.rank * per_rank
            for a in range(self.accum):
                yield self.permutation[first + a * micro: first + (a + 1) * micro].tolist()


def build_dataset(data: DataSettings, seed: int = 0):
    """The token data set a `DataSettings` names (items: ((T,) LongTensor, int label))."""
    if data.name == "digits":
        return digits_dataset(data.split)
    return TokenDataset(data.path, seed=seed)


def _rng_state() -> dict[str, Any]:
    """This process's global RNG states, as types `torch.load(weights_only=True)` accepts."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoint files `step_<N>.pt` in `ckpt_dir`, newest step first (temporary files never match)."""
    paths = [p for p in ckpt_dir.glob(CHECKPOINT_GLOB) if p.stem.removeprefix("step_").isdigit()]
    return sorted(paths, key=lambda p: int(p.stem.removeprefix("step_")), reverse=True)


_STATE_KEYS = ("model", "ema", "optimizer", "step", "config", "rng")


def _read_training_state(path: Path) -> dict:
    """Load a training checkpoint (memory-mapped, so many processes share one copy in RAM).

    Raises ValueError for anything that is not a complete training state (a truncated file fails
    in torch.load: its zip directory sits at the very end).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several unrelated types for damaged files
        raise ValueError(f"{path} is not a readable checkpoint: {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}") from None
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    _need(not missing, f"{path} is not a training checkpoint (missing {missing})")
    return state


def _find_resume_state(resume: str, ckpt_dir: Path) -> tuple[Optional[Path], Optional[dict]]:
    if resume == "none":
        existing = _checkpoints(ckpt_dir)
        if existing:
            raise ValueError(f"resume=none but {ckpt_dir} already holds checkpoints ({existing[0].name}, ...); "
                             f"pass resume=auto to continue that run or choose another out_dir")
        return None, None
    if resume != "auto":
        return Path(resume), _read_training_state(Path(resume))
    for path in _checkpoints(ckpt_dir):
        try:
            return path, _read_training_state(path)
        except ValueError as err:
            log.warning("resume=auto: skipping %s (%s)", path, err)
    return None, None


def _check_same_model(saved: dict, current: ARPGConfig, path: Path) -> None:
    differ = [f"{k}: {saved.get(k)!r} in the checkpoint, {v!r} now" for k, v in current.to_dict().items()
              if saved.get(k) != v]
    _need(not differ, f"{path} was trained with another model config ({'; '.join(differ)}); "
                      f"use the same model settings or another out_dir")


# ---------------------------------------------------------------------------------------------
# Sampling and evaluation
# ---------------------------------------------------------------------------------------------

def _generate_kwargs(sample: SampleSettings) -> dict[str, Any]:
    return dict(steps=sample.steps, schedule=sample.schedule, cfg=sample.cfg, cfg_schedule=sample.cfg_schedule,
                temperature=sample.temperature, top_k=sample.top_k, top_p=sample.top_p, order=sample.order)


def _save_sample_grid(model: ARPG, sample: SampleSettings, tokenizer, path: Path) -> Path:
    """Generate `per_class` images of each of `sample.classes` (one row per class) into a PNG grid."""
    device = next(model.parameters()).device
    labels = torch.tensor(sample.classes, device=device).repeat_interleave(sample.per_class)
    generator = torch.Generator().manual_seed(sample.seed)
    images = generate(model, labels, generator=generator, tokenizer=tokenizer.to(device), **_generate_kwargs(sample))
    return save_grid(images, path, nrow=sample.per_class, scale=sample.scale)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def _make_accelerator(runtime: RuntimeSettings):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import FullyShardedDataParallelPlugin

    # accelerate keeps precision and sharding settings in a process-wide singleton that refuses to
    # change; train() may run several times in one process (tests, notebooks) with other settings.
    # The distributed setup itself (PartialState) is kept.
    AcceleratorState._reset_state()
    fsdp_plugin = None
    if runtime.strategy == "fsdp":
        fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["SelfDecoder", "CrossDecoder"],
            reshard_after_forward=True, state_dict_type="FULL_STATE_DICT")
    return Accelerator(cpu=runtime.device == "cpu", mixed_precision=runtime.mixed_precision,
                       fsdp_plugin=fsdp_plugin)


def _optimizer(model: ARPG, optim: OptimSettings, device: torch.device) -> torch.optim.AdamW:
    """AdamW decaying only >= 2-D weights (matmuls, embeddings); fused on CUDA, multi-tensor on CPU
    (torch would otherwise loop over the tensors one op at a time there)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    implementation = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), **implementation)


@dataclass
class _Run:
    """The live state of a training run, as the checkpoint helpers need it."""

    config: TrainConfig
    model_config: ARPGConfig
    accelerator: Any
    model: nn.Module  # prepared (DDP / FSDP wrapped), not compiled
    raw_model: ARPG
    optimizer: Any
    ema: EMA
    step: int
    steps_per_epoch: int
    total_steps: int

    @property
    def out_dir(self) -> Path:
        return Path(self.config.out_dir).resolve()

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Write the full training state atomically (collective: call on every process)."""
        from accelerate.utils import gather_object
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.model, options=options)
        optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        ema_state = self.ema.state_dict()
        rng_states = gather_object([_rng_state()])  # one per process, by rank
        path = self.ckpt_dir / f"step_{self.step:07d}.pt"
        if self.accelerator.is_main_process:
            epoch, batch = divmod(self.step, self.steps_per_epoch)
            state = {
                "model": model_state, "ema": ema_state, "optimizer": optimizer_state,
                "lr_schedule": {"step": self.step, "total_steps": self.total_steps,
                                "lr": self.optimizer.param_groups[0]["lr"]},
                "step": self.step,
                "data": {"epoch": epoch, "batch_in_epoch": batch, "steps_per_epoch": self.steps_per_epoch,
                         "seed": self.config.seed},
                "rng": rng_states,
                "config": {"model": self.model_config.to_dict(), "train": dataclasses.asdict(self.config)},
            }
            if self.accelerator.scaler is not None:  # fp16 loss scaling
                state["grad_scaler"] = self.accelerator.scaler.state_dict()
            atomic_write(path, lambda tmp: torch.save(state, tmp))
            for old in _checkpoints(self.ckpt_dir)[self.config.keep_checkpoints:]:
                old.unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()
        return path

    def load_checkpoint(self, state: dict, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        _check_same_model(state["config"]["model"], self.model_config, path)
        options = StateDictOptions(full_state_dict=True)
        # The EMA is shaped (and sharded) like the parameters: pass it through them.
        set_model_state_dict(self.model, state["ema"], options=options)
        self.ema = EMA(self.raw_model, self.ema.decay)
        set_model_state_dict(self.model, state["model"], options=options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        if self.accelerator.scaler is not None and "grad_scaler" in state:
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])
        self.step = int(state["step"])
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        if len(state["rng"]) == world:
            _set_rng_state(state["rng"][rank])
        else:
            log.warning("%s was written by %d processes, this run has %d: global RNG states not restored "
                        "(training randomness is derived per step and is unaffected)", path, len(state["rng"]), world)

    def ema_model(self) -> Optional[ARPG]:
        """A fresh ARPG holding the EMA weights, in eval mode on the main process's device; None on
        the other processes (call on every process: gathering FSDP shards is collective)."""
        state = self.ema.state_dict()
        if not self.accelerator.is_main_process:
            return None
        with torch.device("meta"):
            model = ARPG(self.model_config)
        model.load_state_dict(state, assign=True)
        return model.to(self.accelerator.device).eval()


def _micro_batch_generator(config: TrainConfig, step: int, slice_index: int, device: torch.device) -> torch.Generator:
    """Seed all randomness of one micro-batch from (seed, step, its slice of the global batch).

    The global RNG (dropout masks) is reseeded too, so the same slice draws the same masks on any
    number of processes; the returned generator drives the training order and class dropout.
    """
    seed = _derive_seed(config.seed, _STEP_STREAM, step, slice_index)
    torch.manual_seed(seed)
    return torch.Generator(device).manual_seed(seed)


class _Progress:
    """Loss / lr / throughput reporting: tqdm postfix, TensorBoard scalars and the loss log.

    The loss is summed on the device and read back (all-reduced) only every `log_every` steps.
    """

    def __init__(self, run: _Run, end_step: int, tokens_per_step: int):
        config, self.accelerator = run.config, run.accelerator
        self.log_every, self.end_step, self.tokens_per_step = config.log_every, end_step, tokens_per_step
        is_main = self.accelerator.is_main_process
        self.bar = tqdm(total=end_step, initial=run.step, desc="train", unit="step", disable=not is_main,
                        dynamic_ncols=True)
        self.writer = None
        if is_main and config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run.out_dir / "tensorboard"))
        self.loss_log: list[tuple[int, float]] = []
        self.loss_sum = torch.zeros((), device=self.accelerator.device)
        self.window_start, self.window_time = run.step, time.time()

    def step_done(self, step: int, loss: Tensor, lr: float, grad_norm: Optional[Tensor]) -> None:
        """Record optimizer step `step` (1-based) with its mean micro-batch loss."""
        self.loss_sum += loss
        self.bar.update(1)
        if step % self.log_every and step != self.end_step:
            return
        window = step - self.window_start
        mean_loss = self.accelerator.reduce(self.loss_sum, reduction="mean").item() / window
        tokens_per_s = window * self.tokens_per_step / (time.time() - self.window_time)
        self.loss_log.append((step, mean_loss))
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        scalars = {"train/loss": mean_loss, "train/lr": lr, "train/tokens_per_s": tokens_per_s}
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        self.add_scalars(scalars, step)
        self.loss_sum.zero_()
        self.window_start, self.window_time = step, time.time()

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def train(config: TrainConfig) -> TrainResult:
    """Train an ARPG model as `config` says; returns (and prints) a summary. See the module doc."""
    started = time.time()
    validate(config)
    accelerator = _make_accelerator(config.runtime)
    _validate_processes(config.optim, accelerator.num_processes)
    device, optim = accelerator.device, config.optim
    dataset = build_dataset(config.data, config.seed)
    h, w = dataset.grid_size
    arpg_config = config.model.arpg_config(dataset.codebook_size, h * w, dataset.num_classes)
    steps_per_epoch = len(dataset) // optim.batch_size
    _need(steps_per_epoch >= 1, f"optim.batch_size must be <= the data set size {len(dataset)}, got {optim.batch_size}")
    total_steps = config.max_steps or max(1, round(config.epochs * steps_per_epoch))
    warmup_steps = min(round(optim.warmup_epochs * steps_per_epoch), total_steps)
    end_step = min(total_steps, config.stop_at_step or total_steps)

    torch.manual_seed(config.seed)  # the same initial weights on every process
    raw_model = ARPG(arpg_config).to(device)
    optimizer = _optimizer(raw_model, optim, device)
    model, optimizer = accelerator.prepare(raw_model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    run = _Run(config, arpg_config, accelerator, model, raw_model, optimizer, EMA(raw_model, optim.ema_decay),
               step=0, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    resume_path, resume_state = _find_resume_state(config.resume, run.ckpt_dir)
    if resume_state is not None:
        run.load_checkpoint(resume_state, resume_path)
        del resume_state
    train_model = torch.compile(model) if config.runtime.compile else model
    wants_grids = config.sample.tokenizer != "none" and config.sample.per_class > 0
    tokenizer = None
    if wants_grids and accelerator.is_main_process:
        tokenizer = load_tokenizer(config.sample.tokenizer, config.sample.vq_ckpt, pixel_levels=dataset.codebook_size)
        _need(tokenizer.codebook_size == dataset.codebook_size,
              f"sample.tokenizer={config.sample.tokenizer} has {tokenizer.codebook_size} codes, the data "
              f"{dataset.codebook_size}; pick the tokenizer the data was made with (or sample.tokenizer=none)")

    if accelerator.is_main_process:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        print(f"output folder: {run.out_dir}")
        print(f"{config.model.name}: {raw_model.num_parameters():,} parameters, {len(dataset):,} training images, "
              f"{total_steps} steps of global batch {optim.batch_size} ({accelerator.num_processes} process(es) x "
              f"{optim.grad_accum} micro-batch(es)) on {device}"
              + (f"; resuming from {resume_path} at step {run.step}" if resume_path else ""))
    world, rank, accum = accelerator.num_processes, accelerator.process_index, optim.grad_accum
    micro = optim.batch_size // (world * accum)
    progress = _Progress(run, end_step, tokens_per_step=optim.batch_size * h * w)
    checkpoint = resume_path  # until this invocation writes one
    model.train()
    while run.step < end_step:
        epoch, first_batch = divmod(run.step, steps_per_epoch)
        dataset.set_epoch(epoch)
        permutation = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(
            _derive_seed(config.seed, _DATA_STREAM, epoch)))
        last_batch = min(steps_per_epoch, first_batch + end_step - run.step)
        batches = _RankBatches(permutation, optim.batch_size, rank, world, accum, first_batch, last_batch)
        micro_batches = iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches,
                                                         num_workers=config.data.num_workers,
                                                         pin_memory=device.type == "cuda"))
        for _ in range(first_batch, last_batch):
            lr = learning_rate(run.step, total_steps, warmup_steps, optim.lr, optim.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            for a in range(accum):
                tokens, labels = (t.to(device, non_blocking=True) for t in next(micro_batches))
                generator = _micro_batch_generator(config, run.step, rank * accum + a, device)
                order = make_order(config.order, micro, h, w, generator=generator, device=device)
                # Gradients are all-reduced only on the last micro-batch of the step.
                with accelerator.no_sync(model) if a < accum - 1 else nullcontext():
                    _, loss = train_model(tokens, labels, order, generator=generator)
                    accelerator.backward(loss / accum)
                step_loss += loss.detach() / accum
            grad_norm = None
            if optim.grad_clip > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            run.ema.update(raw_model)
            run.step += 1
            progress.step_done(run.step, step_loss, lr, grad_norm)
            if run.step % config.ckpt_every == 0 or run.step == end_step:
                checkpoint = run.save_checkpoint()
            if (wants_grids and config.sample.every_steps and run.step % config.sample.every_steps == 0
                    and run.step < total_steps):
                _sample_on_main(run, tokenizer, run.out_dir / "samples" / f"step_{run.step:07d}.png")

    weights = samples = accuracy = None
    if run.step >= total_steps:
        weights, samples, accuracy = _export_and_evaluate(run, tokenizer)
        if accuracy is not None:
            progress.add_scalars({"eval/digits_accuracy": accuracy}, run.step)
    progress.close()
    result = TrainResult(steps=run.step, total_steps=total_steps,
                         final_loss=progress.loss_log[-1][1] if progress.loss_log else None,
                         loss_log=progress.loss_log, seconds=time.time() - started, out_dir=run.out_dir,
                         checkpoint=checkpoint, weights=weights, samples=samples, digits_accuracy=accuracy)
    if accelerator.is_main_process:
        print(_summary(result, config))
    accelerator.end_training()
    return result


def _export_and_evaluate(run: _Run, tokenizer) -> tuple[Optional[Path], Optional[Path], Optional[float]]:
    """At the end of training: EMA weights to safetensors, a final sample grid (when `tokenizer`)
    and, for the digits, the class accuracy of the samples. Returns (weights, samples, accuracy)
    on the main process, Nones elsewhere."""
    config = run.config
    ema_model = run.ema_model()
    weights = samples = accuracy = None
    if ema_model is not None:
        weights = save(ema_model, run.out_dir / "model.safetensors", weights="ema")
        if tokenizer is not None:
            samples = _save_sample_grid(ema_model, config.sample, tokenizer, run.out_dir / "samples" / "final.png")
        if config.data.name == "digits" and config.sample.eval_samples > 0:
            accuracy = digits_class_accuracy(ema_model, num_samples=config.sample.eval_samples,
                                             seed=config.sample.seed, **_generate_kwargs(config.sample))
    run.accelerator.wait_for_everyone()
    return weights, samples, accuracy


def _sample_on_main(run: _Run, tokenizer, path: Path) -> None:
    ema_model = run.ema_model()
    if ema_model is not None:
        _save_sample_grid(ema_model, run.config.sample, tokenizer, path)
        log.info("step %d: samples in %s", run.step, path)
    run.accelerator.wait_for_everyone()


def _summary(result: TrainResult, config: TrainConfig) -> str:
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a (no steps run)"
    parts = [f"{config.model.name} on {config.data.name}: step {result.steps}/{result.total_steps}",
             f"final loss {loss}", f"{result.seconds:.0f} s", f"checkpoint {result.checkpoint}"]
    if result.steps < result.total_steps:
        parts.append("stopped early (stop_at_step); rerun with resume=auto to continue")
    if result.weights:
        parts.append(f"EMA weights {result.weights}")
    if result.samples:
        parts.append(f"samples {result.samples}")
    if result.digits_accuracy is not None:
        parts.append(f"digits accuracy {100 * result.digits_accuracy:.1f}% ({config.sample.eval_samples} samples, "
                     f"{config.sample.steps} steps, cfg {config.sample.cfg})")
    return "; ".join(parts)
