"""The processes of one job, as `torchrun` or `accelerate launch` start them (one or several nodes),
working in lock step so that they share their progress and their failures.

A job's work is cut into steps (one batch each, say). At every step each process does one step of
its own work, then the processes add up their counts and hand each other their news (results
for the process that keeps the books, or an error). So one process can show the progress of the
whole job, and a process that fails stops every other one at the same step with its error,
instead of leaving them waiting at a barrier until a timeout. A process that dies outright
(killed, out of memory) closes its connections: the others' next exchange fails at once.

The exchange is a few integers per step over gloo, on CPU tensors, also on GPU nodes: it never
waits for a GPU. A launch that already joined a process group of another backend gets a gloo
group beside it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist

from arpg.errors import ProcessFailed

T = TypeVar("T")

# The longest one process waits for the others at one exchange (the slowest one's step, or the
# first process's bookkeeping); a process that hangs longer ends the job with a timeout error.
EXCHANGE_TIMEOUT = timedelta(minutes=30)


@dataclass
class Step:
    """What the processes told each other at one step."""

    count: int = 0  # their counts added up
    news: list = field(default_factory=list)  # the news they passed (those that passed some), in rank order
    working: bool = False  # whether any of them still had work at this step
    failure: Optional[str] = None  # "process r of n failed: <error>" when one failed (the first one)


class Processes:
    """This process's place in its job: `rank` of `world`, `local_rank` on its node. Every method
    is called by every process of the job, in the same order (they exchange with each other)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, group: Any = None):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self._group = group  # the gloo group of the exchanges (None: the default group)

    @classmethod
    @contextmanager
    def join(cls) -> Iterator[Processes]:
        """The processes of this launch (from torchrun's environment: WORLD_SIZE, RANK, LOCAL_RANK,
        MASTER_ADDR/PORT), joined into a gloo group for the duration of the `with` block; a plain
        `python script.py` is a job of one process and joins nothing."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            yield cls()
            return
        created = not dist.is_initialized()
        if created:
            dist.init_process_group("gloo", timeout=EXCHANGE_TIMEOUT)
        group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=EXCHANGE_TIMEOUT)
        try:
            yield cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), group)
        finally:
            if created:
                dist.destroy_process_group()
            elif group is not None:
                dist.destroy_process_group(group)

    def everywhere(self, fn: Callable[[], T]) -> T:
        """`fn()` on every process; if it raises on any of them, every process raises."""
        result, error = None, None
        try:
            result = fn()
        except Exception as err:
            error = err
        self._raise(self._exchange(0, None, error, working=False), error)
        return result

    def on_first(self, fn: Callable[[], T]) -> T:
        """`fn()` on process 0 only; the others receive a copy of its result (picklable). If it
        raises, every process raises."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as err:
                error = err
        step = self._exchange(0, (result,) if self.rank == 0 and error is None else None, error, working=False)
        self._raise(step, error)
        return result if self.rank == 0 else step.news[0][0]

    def gather(self, value: Any) -> list:
        """Every process's `value` (picklable), in rank order, on every process."""
        return [news[0] for news in self._exchange(0, (value,), None, working=False).news]

    def steps(self, work: Iterator[tuple[int, Any]], receive: Callable[[Step], None]) -> None:
        """Advance every process's own `work` by one item per step until every one is exhausted.

        An item is `(count, news or None)`. After each step every process calls `receive` with the
        `Step` (the counts added up, everyone's news), also at the step where one failed, so that
        what the others finished is still recorded. An error raised by `work` or `receive` on any
        process is then raised on every process: its own error where it happened, `ProcessFailed`
        naming the process and its error elsewhere.
        """
        working, error = True, None
        while True:
            count, news = 0, None
            if working and error is None:
                try:
                    count, news = next(work)
                except StopIteration:
                    working = False
                except Exception as err:
                    error = err
            step = self._exchange(count, news, error, working)
            try:
                receive(step)
            except Exception as err:
                if step.failure is None:
                    error = err
                    continue  # shared at the next exchange
            self._raise(step, error)
            if not step.working:
                return

    def _exchange(self, count: int, news: Any, error: Optional[BaseException], working: bool) -> Step:
        if self.world == 1:
            return Step(count, [] if news is None else [news], working, None if error is None else _describe(error))
        flags = torch.tensor([count, news is not None, error is not None, working], dtype=torch.int64)
        dist.all_reduce(flags, group=self._group)
        total, with_news, failed, still_working = flags.tolist()
        sent = [(None, None)] * self.world
        if with_news or failed:  # objects only when there are some: most steps move four integers
            sent = [None] * self.world
            dist.all_gather_object(sent, (news, None if error is None else _describe(error)), group=self._group)
        failure = next((f"process {rank} of {self.world} failed: {message}"
                        for rank, (_, message) in enumerate(sent) if message is not None), None)
        return Step(total, [n for n, _ in sent if n is not None], bool(still_working), failure)

    @staticmethod
    def _raise(step: Step, error: Optional[BaseException]) -> None:
        if error is not None:
            raise error
        if step.failure is not None:
            raise ProcessFailed(step.failure)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"
