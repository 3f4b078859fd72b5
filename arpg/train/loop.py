"""The training loop: one loop for a laptop CPU, one GPU, DDP over GPUs and nodes, and FSDP.

Read top to bottom:

* The config and its checks are in `arpg.train.config`, the run's state and checkpoints in
  `arpg.train.state`, the data sets in `arpg.data`; here are the per-process batches, the
  accelerator and optimizer, progress reporting and `train(config)`, the loop.

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

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm

from arpg.checkpoint import save
from arpg.data import build_dataset
from arpg.errors import SettingError, require
from arpg.files import FolderLock, remove_partial_writes
from arpg.images import save_grid
from arpg.models import build_model
from arpg.orders import make_order
from arpg.digits_judge import digits_class_accuracy
from arpg.runtime import derive_seed, set_cpu_threads, tf32, training_precision, worker_count
from arpg.sample import generate
from arpg.tokenizer import load_tokenizer
from arpg.train.config import (GridSettings, OptimSettings, RunPlan, RuntimeSettings, TrainConfig, TrainResult,
                               plan_run, resolve, validate, validate_processes)
from arpg.train.nonfinite import NonFiniteGuard
from arpg.train.state import (EMA, Run, check_same_run, find_resume_state, learning_rate, read_training_state,
                              run_record)

log = logging.getLogger(__name__)

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


def _save_sample_grid(model: nn.Module, config: TrainConfig, tokenizer, path: Path) -> Path:
    """Generate `per_class` images of each of `grids.classes` (one row per class) into a PNG grid."""
    grid: GridSettings = config.grids
    labels = [c for c in grid.classes for _ in range(grid.per_class)]
    device = next(model.parameters()).device
    images = generate(model, labels, config.sampling, generator=torch.Generator().manual_seed(grid.seed),
                      tokenizer=tokenizer.to(device))  # (B, C, H, W)
    scale = grid.scale or max(1, math.ceil(32 / images.shape[-1]))  # small images: at least 32 pixels a side
    return save_grid(images, path, nrow=grid.per_class, scale=scale)


def _make_accelerator(runtime: RuntimeSettings):
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    # accelerate keeps precision and sharding settings in a process-wide singleton that refuses to
    # change; train() may run several times in one process (tests, notebooks) with other settings.
    # The distributed setup itself (PartialState) is kept.
    AcceleratorState._reset_state()
    cpu = runtime.device == "cpu" or not torch.cuda.is_available()
    precision = training_precision(runtime.mixed_precision, torch.device("cpu" if cpu else "cuda"))
    fsdp_plugin = _fsdp_plugin(precision) if runtime.strategy == "fsdp" else None
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=runtime.collective_timeout_minutes))
    accelerator = Accelerator(cpu=runtime.device == "cpu", mixed_precision=precision, fsdp_plugin=fsdp_plugin,
                              kwargs_handlers=[timeout])
    if fsdp_plugin is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # accelerate enables FSDP for GPU processes only and silently falls back to DDP on CPU ones;
        # FSDP2 itself shards over gloo as well, so CPU runs shard like GPU runs (and CI tests it).
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = fsdp_plugin
    return accelerator


def _fsdp_plugin(precision: str):
    """accelerate's FSDP2 plugin for accelerate's `precision` ("no", "bf16", "fp16"). Parameters are
    gathered in the low precision for the forward and backward (half the traffic), but gradients
    are reduced in float32, as DDP reduces them: accelerate's own policy would sum them in bf16."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    # The blocks to wrap come from the model's `_no_split_modules` (each family names its own).
    return FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
        mixed_precision_policy=MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low else None)


def _optimizer(model: nn.Module, optim: OptimSettings, device: torch.device) -> torch.optim.AdamW:
    """AdamW decaying only >= 2-D weights (matmuls, embeddings); fused on CUDA, multi-tensor on CPU
    (torch would otherwise loop over the tensors one op at a time there)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    implementation = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), **implementation)


def _micro_batch_generator(config: TrainConfig, step: int, slice_index: int, device: torch.device) -> torch.Generator:
    """Seed all randomness of one micro-batch from (seed, step, its slice of the global batch).

    The global RNG (dropout masks) is reseeded too, so the same slice draws the same masks on any
    number of processes; the returned generator drives the training order and class dropout.
    """
    seed = derive_seed(config.seed, _STEP_STREAM, step, slice_index)
    torch.manual_seed(seed)
    return torch.Generator(device).manual_seed(seed)


class _Progress:
    """Loss / lr / throughput reporting: tqdm postfix, TensorBoard scalars and the loss log.

    The loss is summed on the device and read back (all-reduced) only every `log_every` steps.
    """

    def __init__(self, run: Run, end_step: int, tokens_per_step: int):
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

    def step_done(self, step: int, loss: Tensor, lr: float, grad_norm: Tensor) -> None:
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
        scalars = {"train/loss": mean_loss, "train/lr": lr, "train/tokens_per_s": tokens_per_s,
                   "train/grad_norm": float(grad_norm)}
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
    """Train a model as `config` says; returns (and prints) a summary. See the module doc.

    Every setting is checked, against the data set too, before any model, data loading or output
    folder exists; the output folder is then locked for this run (`arpg.files.FolderLock`).
    """
    started = time.time()
    validate(config)
    dataset = build_dataset(config.data, config.seed)  # reads a manifest; the shards are mapped lazily
    config = resolve(config, dataset)
    plan = plan_run(config, dataset)
    set_cpu_threads(config.runtime.threads)
    accelerator = _make_accelerator(config.runtime)
    validate_processes(config.optim, accelerator.num_processes)
    out_dir = Path(config.out_dir).resolve()
    lock = FolderLock(out_dir, "training") if accelerator.is_main_process else nullcontext()
    with tf32(config.runtime.tf32), lock:
        return _train(config, dataset, plan, accelerator, started)


def _prepare_folder(config: TrainConfig, record: dict, dataset,
                    accelerator) -> tuple[Optional[Path], Optional[dict], object]:
    """On the main process (which holds the folder lock): remove what killed writes left, load the
    sample tokenizer, find the checkpoint to resume and check that it continues this run. Every
    process gets the resume path (and reads the state) or the same error."""
    out_dir = Path(config.out_dir).resolve()
    ckpt_dir, state, tokenizer, outcome = out_dir / "checkpoints", None, None, [None, None]
    if accelerator.is_main_process:
        try:
            for folder in (out_dir, ckpt_dir, out_dir / "samples"):
                remove_partial_writes(folder)
            if config.grids.tokenizer != "none" and config.grids.per_class > 0:
                tokenizer = load_tokenizer(config.grids.tokenizer, config.grids.vq_ckpt,
                                           pixel_levels=dataset.codebook_size)
                require(tokenizer.codebook_size == dataset.codebook_size,
                        f"grids.tokenizer={config.grids.tokenizer} has {tokenizer.codebook_size} codes, the data "
                        f"{dataset.codebook_size}; leave grids.tokenizer unset (the data's own) or set it to none")
            path, state = find_resume_state(config.resume, ckpt_dir)
            if state is not None:
                check_same_run(state, record, path, config.resume_changes)
            outcome = [str(path) if path else None, None]
        except ValueError as err:
            outcome = [None, str(err)]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(outcome)
    path, error = outcome
    if error is not None:
        raise SettingError(error)
    if path is not None and state is None:
        state = read_training_state(Path(path))
    return Path(path) if path else None, state, tokenizer


def _train(config: TrainConfig, dataset, plan: RunPlan, accelerator, started: float) -> TrainResult:
    device, optim = accelerator.device, config.optim
    h, w = dataset.grid_size
    record = run_record(config, plan, dataset)
    resume_path, resume_state, tokenizer = _prepare_folder(config, record, dataset, accelerator)

    torch.manual_seed(config.seed)  # the same initial weights on every process
    raw_model = build_model(plan.model_config).to(device)
    optimizer = _optimizer(raw_model, optim, device)
    model, optimizer = accelerator.prepare(raw_model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    run = Run(config, plan.model_config, accelerator, model, raw_model, optimizer, EMA(raw_model, optim.ema_decay),
              step=0, steps_per_epoch=plan.steps_per_epoch, total_steps=plan.total_steps, record=record)
    if resume_state is not None:
        run.load_checkpoint(resume_state, resume_path)
        run.readable.add(resume_path)
        del resume_state
    train_model = torch.compile(model) if config.runtime.compile else model
    wants_grids = config.grids.tokenizer != "none" and config.grids.per_class > 0  # the same on every process
    steps_per_epoch, total_steps, end_step = plan.steps_per_epoch, plan.total_steps, plan.end_step
    workers = worker_count(config.data.num_workers, "data.num_workers")

    if accelerator.is_main_process:
        print(f"output folder: {run.out_dir}")
        print(f"{config.model.name}: {raw_model.num_parameters():,} parameters, {len(dataset):,} training images, "
              f"{total_steps} steps of global batch {optim.batch_size} ({accelerator.num_processes} process(es) x "
              f"{optim.grad_accum} micro-batch(es)) on {device}"
              + (f"; resuming from {resume_path} at step {run.step}" if resume_path else ""))
    world, rank, accum = accelerator.num_processes, accelerator.process_index, optim.grad_accum
    fixed_order = config.model.family.fixed_order  # LlamaGen / PAR: their own sequence, no order input
    micro = optim.batch_size // (world * accum)
    progress = _Progress(run, end_step, tokens_per_step=optim.batch_size * h * w)
    guard = NonFiniteGuard(accelerator, list(model.parameters()), config.skip_nonfinite_steps, optim.lr,
                           lambda step: learning_rate(step - 1, total_steps, plan.warmup_steps, optim.lr, optim.min_lr))
    checkpoint = resume_path  # until this invocation writes one: the last good state
    model.train()
    while run.step < end_step:
        epoch, first_batch = divmod(run.step, steps_per_epoch)
        dataset.set_epoch(epoch)
        permutation = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(
            derive_seed(config.seed, _DATA_STREAM, epoch)))
        last_batch = min(steps_per_epoch, first_batch + end_step - run.step)
        batches = _RankBatches(permutation, optim.batch_size, rank, world, accum, first_batch, last_batch)
        micro_batches = iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                                         pin_memory=device.type == "cuda"))
        for _ in range(first_batch, last_batch):
            lr = learning_rate(run.step, total_steps, plan.warmup_steps, optim.lr, optim.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            for a in range(accum):
                tokens, conditions = next(micro_batches)
                raw_model.check_inputs(tokens, conditions)  # on the CPU, so the forward needs no device sync
                tokens = tokens.to(device, non_blocking=True)
                conditions = raw_model.condition.to(conditions, device, non_blocking=True)
                generator = _micro_batch_generator(config, run.step, rank * accum + a, device)
                # The draws the forward would make, in its order (ARPG's order, random unless set: a
                # permutation by construction; then class dropout), made here because torch.compile
                # cannot trace draws from a generator.
                order = {} if fixed_order else {
                    "order": make_order(config.order or "random", micro, h, w, generator=generator, device=device)}
                conditions = raw_model.condition.drop(conditions, plan.model_config.class_dropout_prob, generator)
                # Gradients are all-reduced only on the last micro-batch of the step.
                with accelerator.no_sync(model) if a < accum - 1 else nullcontext():
                    _, loss = train_model(tokens, conditions, check=False, drop_labels=False, return_logits=False,
                                          **order)
                    accelerator.backward(loss / accum)
                step_loss += loss.detach() / accum
            # Without clipping (max norm inf) the norm is still measured: the guard checks it.
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), optim.grad_clip or math.inf)
            if not guard.observe(run.step + 1, step_loss, grad_norm):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            run.ema.update(raw_model)
            run.step += 1
            progress.step_done(run.step, step_loss, lr, grad_norm)
            saving = run.step % config.ckpt_every == 0 or run.step == end_step
            sampling = (wants_grids and config.grids.every_steps and run.step % config.grids.every_steps == 0
                        and run.step < total_steps)
            if saving or sampling or run.step % config.log_every == 0:
                stop = guard.check(run.step, checkpoint)
                if stop is not None:
                    progress.close()
                    raise stop
            if saving:
                checkpoint = run.save_checkpoint()
            if sampling:
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


def _export_and_evaluate(run: Run, tokenizer) -> tuple[Optional[Path], Optional[Path], Optional[float]]:
    """At the end of training: EMA weights to safetensors, a final sample grid (when `tokenizer`)
    and, for the digits, the class accuracy of the samples. Returns (weights, samples, accuracy)
    on the main process, Nones elsewhere."""
    config = run.config
    ema_model = run.ema_model()
    weights = samples = accuracy = None
    if ema_model is not None:
        weights = save(ema_model, run.out_dir / "model.safetensors", weights="ema")
        if tokenizer is not None:
            samples = _save_sample_grid(ema_model, config, tokenizer, run.out_dir / "samples" / "final.png")
        if config.data.name == "digits" and config.grids.eval_samples > 0:
            accuracy = digits_class_accuracy(ema_model, num_samples=config.grids.eval_samples,
                                             seed=config.grids.seed, options=config.sampling)
    run.accelerator.wait_for_everyone()
    return weights, samples, accuracy


def _sample_on_main(run: Run, tokenizer, path: Path) -> None:
    ema_model = run.ema_model()
    if ema_model is not None:
        _save_sample_grid(ema_model, run.config, tokenizer, path)
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
        parts.append(f"digits accuracy {100 * result.digits_accuracy:.1f}% ({config.grids.eval_samples} samples at "
                     f"temperature {config.sampling.temperature:g}; {config.sampling})")
    return "; ".join(parts)
