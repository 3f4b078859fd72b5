"""Stopping a run whose loss or gradients become non-finite (NaN or inf), keeping its last good state.

`NonFiniteGuard.observe` adds each optimizer step's verdict to counters on the device, so a step
costs no host sync on CUDA; `check` reads them, and whether every weight is finite (an update can
overflow although its gradients did not), all-reduced over the processes, at the loop's logging,
sample-grid and checkpoint boundaries, so always before anything is saved. A run that
went non-finite is then stopped with `TrainingDiverged` before its state reaches a checkpoint or
`model.safetensors`: the newest checkpoint is the last good state, and rotation only ever sees
finite ones. The message names the step, what was non-finite and how to resume from that
checkpoint with a lower learning rate.

`skip_nonfinite_steps > 0` tolerates that many bad steps in one invocation: a step whose gradient
norm is non-finite is not applied (the weights and optimizer state stay as they were; the EMA
averages the unchanged weights), logged as a warning. Deciding to skip reads the step's flag on
the host, one sync per step, so the setting is off by default. With fp16 loss scaling the grad
scaler already skips steps with overflowing gradients (a routine part of its calibration): there
only a non-finite loss counts.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from arpg.errors import TrainingDiverged

log = logging.getLogger(__name__)

_NONE_YET = 2 ** 62  # "first bad step" before any (a min-reduction identity)


class NonFiniteGuard:
    """Counts the optimizer steps whose loss or gradient norm is not finite (see the module doc).

    `parameters` are the model's (this process's shards under FSDP); `learning_rate_at(step)` gives
    the learning rate of 1-based step `step` (for the message); `lr` is the configured peak,
    `skip_limit` the run's `skip_nonfinite_steps`.
    """

    def __init__(self, accelerator, parameters: Sequence[Tensor], skip_limit: int, lr: float,
                 learning_rate_at: Callable[[int], float]):
        self.accelerator, self.skip_limit, self.lr = accelerator, skip_limit, lr
        self.parameters = [p.to_local() if hasattr(p, "to_local") else p for p in parameters]
        self.learning_rate_at = learning_rate_at
        self.scaler_skips = accelerator.scaler is not None  # fp16: the grad scaler skips overflows itself
        # [steps with a non-finite loss, steps with a non-finite gradient norm, bad steps, first bad step]
        self.counts = torch.tensor([0, 0, 0, _NONE_YET], dtype=torch.int64, device=accelerator.device)
        self.skipped = 0

    def observe(self, step: int, loss: Tensor, grad_norm: Tensor) -> bool:
        """Record 1-based step `step` before it is applied; True when it must be skipped instead
        (only with `skip_limit > 0`: reads the flag on the host)."""
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        loss_bad = ~torch.isfinite(loss)
        grad_bad = torch.zeros_like(loss_bad) if self.scaler_skips else ~torch.isfinite(grad_norm)
        bad = loss_bad | grad_bad
        self.counts[:3] += torch.stack([loss_bad, grad_bad, bad]).long()
        self.counts[3:] = torch.minimum(self.counts[3:], torch.where(bad, step, _NONE_YET))
        # The gradient norm is the same on every process (gradients are all-reduced): so is the decision.
        if self.skip_limit == 0 or not grad_bad.item():
            return False
        self.skipped += 1
        log.warning("step %d: non-finite gradient norm, step skipped (%d of skip_nonfinite_steps=%d; the run "
                    "stops at the next check beyond that)", step, self.skipped, self.skip_limit)
        return True

    def check(self, step: int, checkpoint: Optional[Path]) -> Optional[TrainingDiverged]:
        """At a boundary after 1-based step `step` (collective: call on every process): the error
        that stops the run when it has more bad steps than `skip_limit`, else None. `checkpoint`
        is the newest one written (or resumed from): the last good state."""
        largest = torch._foreach_norm(self.parameters, math.inf)  # NaN or inf where a weight is
        weights_bad = ~torch.isfinite(torch.stack(largest)).all()
        counts = torch.cat([self.counts, weights_bad.long().view(1)])
        if self.accelerator.num_processes > 1:
            counts[3] = -counts[3]  # one max-reduction for all five
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX)
            counts[3] = -counts[3]
        loss_steps, grad_steps, bad_steps, first, weights = counts.tolist()
        if bad_steps <= self.skip_limit and not weights:
            return None
        names = [name for name, count in (("the loss", loss_steps), ("the gradient norm", grad_steps),
                                          ("the weights", weights)) if count]
        what = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        when = (f"at step {first} (learning rate {self.learning_rate_at(first):.3g}), in {bad_steps} step(s)"
                if bad_steps else f"by step {step}")
        lower = f"optim.lr (this run: {self.lr:g}; e.g. {self.lr / 2:g})"
        if checkpoint is None:
            then = f"no checkpoint was saved before it; rerun with a lower {lower}"
        else:
            then = (f"the last good checkpoint is {checkpoint}; to go on from it rerun the same command with "
                    f"resume={checkpoint} and a lower {lower}")
        skips = f"skip_nonfinite_steps={self.skip_limit} exceeded; " if self.skip_limit and bad_steps else ""
        return TrainingDiverged(f"training stopped at step {step}: {what} became non-finite (NaN or inf) {when}; "
                                f"{skips}nothing of it was saved; {then}")
