"""A training run's state and its checkpoints: the learning-rate schedule, the EMA of the weights,
RNG states, and the atomic training-state files that make a resumed run repeat exactly what the
uninterrupted run would have done.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from arpg.errors import SettingError, describe_differences, differences, require
from arpg.files import atomic_write, read_torch_file
from arpg.models import build_model
from arpg.train.config import RunPlan, TrainConfig

log = logging.getLogger(__name__)

CHECKPOINT_GLOB = "step_*.pt"


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

    def state_dict(self, keep: bool = True) -> Optional[dict[str, Tensor]]:
        """Full CPU tensors by parameter name where `keep` (the main process), None elsewhere.
        Gathering shards is collective, so call it on every process; only where `keep` is anything
        copied to the CPU (a full copy on every process would be world x the EMA in host memory)."""
        state = {}
        for name, t in zip(self.names, self.tensors):
            whole = _full(t)
            if keep:
                state[name] = whole.cpu()
        return state if keep else None


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


def _tensor_bytes(value: Any) -> int:
    """About what torch.save writes of a nested dict/list: its tensors' bytes, plus 256 per tensor
    (torch.save's zip entry and 64-byte alignment)."""
    if isinstance(value, Tensor):
        return value.nbytes + 256
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


_STATE_KEYS = ("model", "ema", "optimizer", "step", "config", "rng")
CORRUPT_SUFFIX = ".corrupt"


def read_training_state(path: Path) -> dict:
    """Load a training checkpoint (memory-mapped, so many processes share one copy in RAM).

    Raises ValueError for anything that is not a complete training state (a truncated file fails
    in torch.load: its zip directory sits at the very end) or whose weights are not finite (a run
    that diverged: never resumed, never counted as kept).
    """
    state = read_torch_file(path, mmap=True)
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    require(not missing, f"{path} is not a training checkpoint (missing {missing})")
    non_finite = [name for name, t in state["model"].items() if t.is_floating_point() and not t.isfinite().all()]
    require(not non_finite, f"{path} holds non-finite weights ({', '.join(non_finite[:3])}): written by a run that "
                            f"diverged")
    return state


def _set_aside(path: Path, error: Exception) -> None:
    """Rename an unreadable checkpoint to `<name>.corrupt`: never resumed, never counted as kept,
    never deleted (it may be worth a look)."""
    aside = path.with_name(path.name + CORRUPT_SUFFIX)
    path.replace(aside)
    log.warning("%s is unreadable, moved aside to %s: %s", path, aside.name, error)


def find_resume_state(resume: str, ckpt_dir: Path) -> tuple[Optional[Path], Optional[dict]]:
    """The checkpoint a run continues from and its state, or (None, None) for a fresh start.

    `resume="auto"` takes the newest checkpoint in `ckpt_dir` that reads completely; unreadable
    newer ones are moved aside (`_set_aside`), and starting afresh although checkpoints were there
    is a warning. Call it on the process that holds the run's folder lock.
    """
    existing = _checkpoints(ckpt_dir)
    if resume == "none":
        if existing:
            raise SettingError(f"resume=none but {ckpt_dir} already holds checkpoints ({existing[0].name}, ...); "
                               f"pass resume=auto to continue that run or choose another out_dir")
        return None, None
    if resume != "auto":
        return Path(resume), read_training_state(Path(resume))
    for path in existing:
        try:
            return path, read_training_state(path)
        except ValueError as err:
            _set_aside(path, err)
    if existing:
        log.warning("resume=auto: none of the %d checkpoint(s) in %s could be read (moved aside as *%s); "
                    "STARTING FROM STEP 0", len(existing), ckpt_dir, CORRUPT_SUFFIX)
    return None, None


def run_record(config: TrainConfig, plan: RunPlan, dataset: Any) -> dict[str, Any]:
    """What identifies a run: the model, the data, the order, the seed, the batch and the schedule.
    Stored in every checkpoint; a resume must match it except for `config.resume_changes`."""
    return {"model": plan.model_config.to_dict(),
            "data": {"name": config.data.name, "split": config.data.split, **dataset.identity},
            "order": config.order, "seed": config.seed, "batch_size": config.optim.batch_size,
            "total_steps": plan.total_steps, "warmup_steps": plan.warmup_steps}


def check_same_run(state: dict, record: dict[str, Any], path: Path, allowed: Sequence[str]) -> None:
    """Raise `SettingError` naming every setting in which `record` differs from the run that wrote
    `state`, except the sections in `allowed` (`resume_changes`); the model may never differ."""
    saved = state.get("run") or {"model": state["config"]["model"]}  # states written before run records
    changes = differences(saved, record)
    model = {k: v for k, v in changes.items() if k.startswith("model.")}
    require(not model, f"{path} was trained with another model config ({describe_differences(model)}); use the "
                       f"same model settings or another out_dir")
    refused = {k: v for k, v in changes.items() if k.split(".")[0] not in allowed}
    sections = ",".join(sorted({k.split(".")[0] for k in refused}))
    require(not refused, f"{path} continues a run with other settings ({describe_differences(refused)}); use the "
                         f"same settings or another out_dir, or change them on purpose with "
                         f"resume_changes=[{sections}]")
    for key, (was, now) in changes.items():
        log.warning("resuming %s with a deliberate change (resume_changes): %s: %r there, %r now", path, key, was, now)


@dataclass
class Run:
    """The live state of a training run, as the checkpoint helpers need it."""

    config: TrainConfig
    model_config: Any  # the model family's config
    accelerator: Any
    model: nn.Module  # prepared (DDP / FSDP wrapped), not compiled
    raw_model: nn.Module
    optimizer: Any
    ema: EMA
    step: int
    steps_per_epoch: int
    total_steps: int
    record: dict  # `run_record`, stored in every checkpoint
    readable: set = field(default_factory=set)  # checkpoints known to read completely (main process)

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
        ema_state = self.ema.state_dict(keep=self.accelerator.is_main_process)
        rng_states = gather_object([_rng_state()])  # one per process, by rank
        path = self.ckpt_dir / f"step_{self.step:07d}.pt"
        if self.accelerator.is_main_process:
            epoch, batch = divmod(self.step, self.steps_per_epoch)
            state = {
                "run": self.record,
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
            atomic_write(path, lambda tmp: torch.save(state, tmp), what="the training checkpoint",
                         size=_tensor_bytes(state))
            self.readable.add(path)
            self._prune(newest=path)
        self.accelerator.wait_for_everyone()
        return path

    def _prune(self, newest: Path) -> None:
        """Keep the newest `keep_checkpoints` readable checkpoints and delete older ones. The one just
        written is never deleted, and an unreadable one never counts as kept: it is moved aside."""
        kept = 0
        for path in _checkpoints(self.ckpt_dir):
            if kept >= self.config.keep_checkpoints and path != newest:
                path.unlink(missing_ok=True)
                continue
            if path not in self.readable:
                try:
                    read_training_state(path)
                except ValueError as err:
                    _set_aside(path, err)
                    continue
                self.readable.add(path)
            kept += 1

    def load_checkpoint(self, state: dict, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

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

    def ema_model(self) -> Optional[nn.Module]:
        """A fresh model holding the EMA weights, in eval mode on the main process's device; None on
        the other processes (call on every process: gathering FSDP shards is collective)."""
        state = self.ema.state_dict(keep=self.accelerator.is_main_process)
        if state is None:
            return None
        # The EMA averages the parameters; buffers (a text model's null caption) are the model's own.
        state.update((name, buffer.detach().cpu()) for name, buffer in self.raw_model.named_buffers())
        with torch.device("meta"):
            model = build_model(self.model_config)
        model.load_state_dict(state, assign=True)
        model.sampling = self.config.sampling  # the run's recipe, recorded with the exported weights
        return model.to(self.accelerator.device).eval()


