"""The step engines of an ARPG decode: the forward passes the sampler's loop calls once per step.

`ARPGStepEngine(model, ...)` builds the engine its runtime settings ask for:

* `CachedSteps` (default): a KV cache grown step by step, attention over its filled prefix;
  with `query_open`, every open target is queried (confidence-guided positions).
* `StaticSteps` (`static` or `compile`): fixed shapes, attention over the whole preallocated
  cache under a validity mask, so that a compile traces one graph per function and CUDA graphs
  replay; its cache is kept between compiled decodes (`CompiledCaches`).
* `RecomputedSteps` (`use_cache=False`): the whole prefix recomputed at every step (same logits,
  slow): a reference for tests and benchmarks.

The engines drive the model through its cached entry points (`new_cache`, `extend`, `predict`,
`content_kv`, `target_logits`, `fused_weights`; see `arpg.models.arpg.ARPG`).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arpg.errors import require
from arpg.models.layers import Rotation, block_causal_mask, rotation

# The float32 logits of open targets a query_open step holds at once (see `ARPGStepEngine`).
OPEN_LOGITS_BYTES = 256 * 2**20


def query_bucket(n: int) -> int:
    """The padded size of a static step of n queries: the next power of two, at least 2 (a
    compile would trace a size of 1 as a constant: a graph of its own), so a decode of T tokens
    runs at most log2(T) shapes per function, all in one compiled graph."""
    return max(2, 1 << (n - 1).bit_length())


def _batch_rope(rope: Tensor, batch: int) -> Tensor:
    """RoPE (1 or b, n, D/2, 2) -> (batch, n, D/2, 2), repeating a per-sample table for the guidance rows."""
    return rope.expand(batch, -1, -1, -1) if rope.shape[0] == 1 else rope.repeat(batch // rope.shape[0], 1, 1, 1)


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    """x (r, ...) -> (rows, ...), repeating row 0 (a valid input whose results are dropped)."""
    return x if x.shape[0] == rows else torch.cat([x, x[:1].expand(rows - x.shape[0], *x.shape[1:])])


# ---------------------------------------------------------------------------------------------
# The engines
# ---------------------------------------------------------------------------------------------

class ARPGStepEngine:
    """The forward passes of one ARPG decode: call it with the tokens chosen at the previous step
    (None at the first) and it returns the float32 logits (rows, n, V) of this step's targets.
    Constructing it gives the engine the settings ask for (`StaticSteps`, `CachedSteps` or
    `RecomputedSteps`, all subclasses).

    Step 0 feeds the condition token alone (it sees only itself, as in training), then the
    context tokens when editing; step s > 0 feeds the tokens chosen at step s - 1 at their own
    positions, then one content-free query per target of step s reads everything fed so far.
    The RoPE rotations of every position are computed once, and the cache carries the decode
    weights (fused projections, see `ARPG.fused_weights`).

    Args:
        conditions: a batch of `rows` conditions (the unconditional ones for the guidance rows).
        target_rope: (rows|b|1, N, D/2, 2) RoPE of the N positions to decode, in decode order.
        tokens_per_step: how many targets each step predicts (sums to N).
        context_ids, context_rope: (rows, K) known tokens and their RoPE, fed after the condition.
        causal_within_step: tokens fed in one step attend causally (training-like) instead of
            block-wise (published).
        use_cache: False recomputes the whole prefix at every step with the attention pattern the
            cache builds up (same logits, slow; for tests and benchmarks).
        compile: torch.compile the fixed-shape steps (see `static`; the only shapes a compile
            reuses from step to step): one graph for extending and one for predicting, whatever
            the schedule. Their cache is kept for the next compiled decode (`CompiledCaches`):
            a later batch of as many rows or fewer runs in it (padded), with no new graph.
        cache_dtype: dtype of the KV cache and of the decode weights (default: the weights').
        static: fixed-shape steps: attention over the whole preallocated cache under a validity
            mask, fed tokens and queries padded to `query_bucket` sizes. Same tokens as the
            dynamic steps. With `compile` on CUDA, the steps replay as CUDA graphs (mode
            "reduce-overhead").
        query_open: every step queries all N - start targets not yet fed (its own first), and a
            position selector picks which of them the step commits (see `reorder_open`); the
            call then returns an iterator over the open targets' logits in chunks of at most
            `OPEN_LOGITS_BYTES` (batch 64 with guidance and 16384 codes: 32 targets, 256 MiB,
            instead of 2 GiB for all 256 at step 0, and as much for each copy). Not with
            `static` or `compile` (the number of open targets shrinks every step).

    With `query_open`, the decode order is not fixed up front: after step s the caller passes
    `reorder_open` the arrangement of the open targets that puts the committed ones first, and
    step s + 1 feeds those (the cache stays incremental; only the guided half runs for the
    queries that are not committed).
    """

    def __new__(cls, model: nn.Module, conditions: Any, target_rope: Tensor, tokens_per_step: Sequence[int],
                context_ids: Optional[Tensor] = None, context_rope: Optional[Tensor] = None,
                causal_within_step: bool = False, use_cache: bool = True, compile: bool = False,
                cache_dtype: Optional[torch.dtype] = None, static: bool = False, query_open: bool = False):
        if cls is ARPGStepEngine:
            require(not ((static or compile) and query_open),
                    "static=True and compile=True decode a fixed plan of positions; confidence-guided positions "
                    "query every open position: set static=False and compile=False with them")
            cls = RecomputedSteps if not use_cache else StaticSteps if static or compile else CachedSteps
        return super().__new__(cls)

    def __init__(self, model: nn.Module, conditions: Any, target_rope: Tensor, tokens_per_step: Sequence[int],
                 context_ids: Optional[Tensor] = None, context_rope: Optional[Tensor] = None,
                 causal_within_step: bool = False, use_cache: bool = True, compile: bool = False,
                 cache_dtype: Optional[torch.dtype] = None, static: bool = False, query_open: bool = False):
        rows, device = model.condition.batch_size(conditions), model.head.weight.device
        self.model, self.causal, self.query_open, self.rows, self.device = model, causal_within_step, query_open, rows, device
        self.tokens_per_step = list(tokens_per_step)
        self.ends = [sum(tokens_per_step[:i + 1]) for i in range(len(tokens_per_step))]
        self.step = 0
        self.target_rope = _batch_rope(target_rope, rows)  # (rows, N, D/2, 2)
        if query_open:  # rearranged in place by reorder_open: an own copy, not a broadcast view
            self.target_rope = self.target_rope.clone()
        # The condition rows first (causal among themselves, as trained), then any context tokens.
        self.prefill = [(model.condition_inputs(conditions), model.class_rope(rows, device))]
        if context_ids is not None and context_ids.shape[1]:
            self.prefill.append((context_ids, _batch_rope(context_rope, rows)))
        self.prefilled = sum(ids.shape[1] for ids, _ in self.prefill)
        self.fed_slots = self.ends[-2] if len(self.ends) > 1 else 0  # the last step's tokens are never fed
        keys = model.condition.key_mask(conditions)  # (rows, P) or None: padded caption rows hidden
        self.key_mask = None if keys is None else F.pad(keys, (0, self.prefilled + self.fed_slots - keys.shape[1]),
                                                        value=True)  # (rows, prefilled + fed_slots)
        self.open_chunk = max(1, OPEN_LOGITS_BYTES // (4 * rows * model.config.vocab_size))

    def __call__(self, fed: Optional[Tensor]) -> Tensor | Iterator[Tensor]:
        step = self.step
        self.step += 1
        start = self.ends[step - 1] if step else 0
        predict = self._feed(fed, self.ends[step - 2] if step > 1 else 0, start)
        if not self.query_open:
            return predict(start, self.ends[step])
        total = self.ends[-1]
        return (predict(a, min(a + self.open_chunk, total)) for a in range(start, total, self.open_chunk))

    def _feed(self, fed: Optional[Tensor], before: int, start: int) -> Callable[[int, int], Tensor]:
        """Feed the tokens of targets [before, start); returns predict(a, b): the logits
        (rows, b - a, V) of targets [a, b) given everything fed."""
        raise NotImplementedError

    def _target_table(self) -> Tensor:
        """The per-target table `reorder_open` rearranges: (rows, N, ...)."""
        raise NotImplementedError

    def reorder_open(self, order: Tensor) -> None:
        """Rearrange the open targets of the step just run (slots start..N): slot start + i takes
        the target at start + order[:, i]. order (B, N - start) is given for the B samples and
        applies to their guidance rows too. Call it between steps, with `query_open`."""
        start = self.ends[self.step - 2] if self.step > 1 else 0
        table = self._target_table()  # (rows, N, D/2[, 2])
        index = order.repeat(table.shape[0] // order.shape[0], 1)  # (rows, N - start)
        open_targets = table[:, start:]
        index = index.view(*index.shape, *(1,) * (table.ndim - 2)).expand_as(open_targets)
        table[:, start:] = open_targets.gather(1, index)


class CachedSteps(ARPGStepEngine):
    """Dynamic shapes over a KV cache grown step by step (see `ARPGStepEngine`)."""

    def __init__(self, model: nn.Module, conditions: Any, target_rope: Tensor, tokens_per_step: Sequence[int],
                 *args, cache_dtype: Optional[torch.dtype] = None, **kwargs):
        super().__init__(model, conditions, target_rope, tokens_per_step, *args, cache_dtype=cache_dtype, **kwargs)
        self.targets = rotation(self.target_rope)  # (rows, N, D/2), sliced per step
        self.cache = model.new_cache(self.rows, max_len=self.prefilled + self.fed_slots, dtype=cache_dtype)
        self.cache.key_mask = self.key_mask
        for i, (ids, rope) in enumerate(self.prefill):
            model.extend(ids, rope, self.cache, causal=self.causal or i == 0)

    def _feed(self, fed: Optional[Tensor], before: int, start: int) -> Callable[[int, int], Tensor]:
        if fed is not None:
            self.model.extend(fed, self.targets.slice(before, start), self.cache, causal=self.causal)

        def predict(a: int, b: int) -> Tensor:
            return self.model.predict(self.targets.slice(a, b), self.cache)
        return predict

    def _target_table(self) -> Tensor:
        return self.targets.turns


class RecomputedSteps(ARPGStepEngine):
    """No cache: every step recomputes the whole prefix with the attention pattern the cache
    builds up (the same logits; a reference for tests and benchmarks)."""

    def __init__(self, model: nn.Module, conditions: Any, target_rope: Tensor, tokens_per_step: Sequence[int],
                 *args, **kwargs):
        super().__init__(model, conditions, target_rope, tokens_per_step, *args, **kwargs)
        rows, prefill = self.rows, self.prefill
        self.inputs = torch.cat([model.embed(ids) for ids, _ in prefill]
                                + [model.embeddings.weight.new_zeros(rows, self.fed_slots, model.config.dim)], dim=1)
        self.rope = torch.cat([rope for _, rope in prefill] + [self.target_rope[:, :self.fed_slots]], dim=1)
        condition_rows = prefill[0][0].shape[1]
        groups = [1] * condition_rows + [ids.shape[1] for ids, _ in prefill[1:]] + list(tokens_per_step[:-1])
        self.visible = block_causal_mask(groups, self.causal, self.device)  # (L, L)
        if self.key_mask is not None:  # (rows, 1, L, L): no row sees a hidden one, but each sees itself
            eye = torch.eye(self.key_mask.shape[1], dtype=torch.bool, device=self.device)
            self.visible = (self.visible & (self.key_mask[:, None, :] | eye))[:, None]
        self.length = self.prefilled

    def _feed(self, fed: Optional[Tensor], before: int, start: int) -> Callable[[int, int], Tensor]:
        if fed is not None:
            self.inputs[:, self.length:self.length + fed.shape[1]] = self.model.embeddings(fed)
            self.rope[:, self.length:self.length + fed.shape[1]] = self.target_rope[:, before:start]  # maybe reordered
            self.length += fed.shape[1]
        L = self.length
        k, v = self.model.content_kv(self.inputs[:, :L], self.rope[:, :L], is_causal=False,
                                     attn_mask=self.visible[..., :L, :L])
        keys = None if self.key_mask is None else self.key_mask[:, None, None, :L]

        def recompute(a: int, b: int) -> Tensor:
            return self.model.target_logits(k, v, self.target_rope[:, a:b], is_causal=False, attn_mask=keys)
        return recompute

    def _target_table(self) -> Tensor:
        return self.target_rope


class _StaticStep(NamedTuple):
    """The fixed-shape inputs of one static step, made before the loop (no host work inside it)."""

    fed: int  # tokens fed at this step (0 at the first)
    fed_rope: Optional[Rotation]  # (rows, bucket(fed), D)
    positions: Optional[Tensor]  # (bucket(fed),) cache positions written
    fed_visible: Optional[Tensor]  # (bucket(fed)|1, S) what the fed tokens see
    targets: int
    target_rope: Rotation  # (rows, bucket(targets), D)
    target_visible: Tensor  # (1, S)


class StaticSteps(ARPGStepEngine):
    """Fixed shapes, eager or compiled (CUDA graphs with `static` on CUDA; see `ARPGStepEngine`)."""

    def __init__(self, model: nn.Module, conditions: Any, target_rope: Tensor, tokens_per_step: Sequence[int],
                 *args, compile: bool = False, cache_dtype: Optional[torch.dtype] = None, static: bool = False,
                 **kwargs):
        super().__init__(model, conditions, target_rope, tokens_per_step, *args, **kwargs)
        require(self.key_mask is None, "static=True and compile=True are not supported with captions (their padded "
                                       "rows need a per-sample mask); leave them False")
        device = self.device
        self.graphs = static and compile and device.type == "cuda"
        # Room for every token of the canvas and the write of the padded rows (at the last
        # position, never visible): one size for every schedule.
        max_len = self.prefilled + self.ends[-1]
        if compile:
            self.cache = COMPILED_CACHES.get(model, self.rows, max_len, cache_dtype)
        else:
            self.cache = model.new_cache(self.rows, max_len=max_len, dtype=cache_dtype)
        cache_rows = self.cache.self_k.shape[1]  # more than rows when a larger batch made the cache
        self.targets = rotation(_pad_rows(self.target_rope, cache_rows))  # (cache rows, N, D/2)
        self.plan = self._static_plan(device)
        # One compile serves every bucket (sizes are symbolic); CUDA graphs record one graph per bucket.
        mode = "reduce-overhead" if self.graphs else None
        self.extend_fn = _compiled(_static_extend, mode) if compile else _static_extend
        self.predict_fn = _compiled(_static_predict, mode) if compile else _static_predict
        for i, (ids, rope) in enumerate(self.prefill):
            model.extend(_pad_rows(ids, cache_rows), _pad_rows(rope, cache_rows), self.cache,
                         causal=self.causal or i == 0)

    def _static_plan(self, device: torch.device) -> list[_StaticStep]:
        """The padded inputs of every step, made once: rotations padded with zero rows, the cache
        positions each step writes (padded rows: the last position, never visible) and the masks
        of what its fed tokens and its queries see. Bucket sizes are marked dynamic for the compile."""
        pad = query_bucket(max(self.tokens_per_step))
        targets = Rotation(F.pad(self.targets.turns, (0, 0, 0, pad)))  # (rows, N + pad, D/2)
        keys = torch.arange(self.cache.max_len, device=device)  # (S,)
        steps, written = [], self.prefilled
        for step, m in enumerate(self.tokens_per_step):
            first = self.ends[step - 1] if step else 0  # decode slot of the first target
            fed_rope = positions = fed_visible = None
            fed = self.tokens_per_step[step - 1] if step else 0
            if fed:
                bucket = query_bucket(fed)
                fed_rope = targets.slice(first - fed, first - fed + bucket)
                slots = torch.arange(written, written + bucket, device=device)
                positions = slots.masked_fill(slots >= written + fed, self.cache.max_len - 1)
                # block-wise: everything up to the last fed token; causal: up to the token itself
                limit = slots[:, None] if self.causal else torch.tensor([[written + fed - 1]], device=device)
                fed_visible = keys[None, :] <= limit
                written += fed
                _mark_step_size(fed_rope.turns, 1)
                _mark_step_size(positions, 0)
                if self.causal:  # block-wise, fed_visible is (1, S)
                    _mark_step_size(fed_visible, 0)
            target_rope = targets.slice(first, first + query_bucket(m))
            _mark_step_size(target_rope.turns, 1)
            steps.append(_StaticStep(fed, fed_rope, positions, fed_visible, m, target_rope, keys[None, :] < written))
        return steps

    def __call__(self, fed: Optional[Tensor]) -> Tensor:
        plan = self.plan[self.step]
        self.step += 1
        if self.graphs:  # a new iteration: the previous step's graph outputs are consumed
            torch.compiler.cudagraph_mark_step_begin()
        if fed is not None:
            ids = F.pad(_pad_rows(fed, self.targets.turns.shape[0]), (0, plan.positions.shape[0] - plan.fed))
            _mark_step_size(ids, 1)
            self.extend_fn(self.model, self.cache, ids, plan.fed_rope, plan.positions, plan.fed_visible)
        logits = self.predict_fn(self.model, self.cache, plan.target_rope, plan.target_visible)
        return logits[:self.rows, :plan.targets].contiguous()  # (rows, n, V); the sampler works in place


def _static_extend(model: nn.Module, cache, ids: Tensor, rope: Rotation, positions: Tensor, visible: Tensor) -> None:
    model.extend(ids, rope, cache, positions=positions, visible=visible)


def _static_predict(model: nn.Module, cache, target_rope: Rotation, visible: Tensor) -> Tensor:
    return model.predict(target_rope, cache, visible=visible)


@functools.cache
def _compiled(fn: Callable, mode: Optional[str]) -> Callable:
    """`fn` compiled once per process; the sizes that vary between steps are marked dynamic by
    `StaticSteps` (`_mark_step_size`), everything else is traced static."""
    return torch.compile(fn, mode=mode)


def _mark_step_size(tensor: Tensor, dim: int) -> None:
    """Trace `dim` of `tensor` (a padded step size, >= 2) as a symbol: one graph for every bucket."""
    torch._dynamo.mark_dynamic(tensor, dim)


# ---------------------------------------------------------------------------------------------
# The caches kept between compiled decodes
# ---------------------------------------------------------------------------------------------

class CompiledCaches:
    """The KV caches of compiled decodes: one per model (held weakly), dtype and device, reused
    by every compiled decode, because the compiled steps trace its shapes statically and CUDA
    graphs capture its addresses (marked static for torch.compile). A decode of fewer rows or
    positions runs in it (padded); a larger one replaces it, freeing the old one first. Its
    decode weights are refreshed in place when a parameter was replaced or changed in place
    (its tensor version) since."""

    def __init__(self):
        self.pools: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()

    def get(self, model: nn.Module, batch: int, max_len: int, dtype: Optional[torch.dtype]):
        """A cache of at least `batch` rows and `max_len` positions, emptied (`length` 0)."""
        dtype = dtype or model.head.weight.dtype
        pool = self.pools.setdefault(model, {})
        key = (dtype, model.head.weight.device)
        cache = pool.get(key)
        if cache is None or cache.self_k.shape[1] < batch or cache.max_len < max_len:
            if cache is not None:
                batch, max_len = max(batch, cache.self_k.shape[1]), max(max_len, cache.max_len)
                del pool[key], cache
            cache = pool[key] = model.new_cache(batch, max_len=max_len, dtype=dtype)
            for tensor in cache.tensors():
                torch._dynamo.mark_static_address(tensor)
        elif cache.version != _parameter_version(model):
            cache.refresh_weights(model.fused_weights(dtype))
        cache.version, cache.length = _parameter_version(model), 0
        return cache

    def kept(self, model: nn.Module) -> list:
        """The caches kept for `model`."""
        return list(self.pools.get(model, {}).values())

    def release(self, model: Optional[nn.Module] = None) -> None:
        """Free the caches kept for `model` (default: for every model)."""
        if model is None:
            self.pools.clear()
        else:
            self.pools.pop(model, None)


def _parameter_version(model: nn.Module) -> tuple:
    """Changes whenever a parameter is replaced or modified in place."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


COMPILED_CACHES = CompiledCaches()


def release_compiled_caches(model: Optional[nn.Module] = None) -> None:
    """Free the KV caches kept for compiled decodes of `model` (default: of every model), e.g.
    before measuring another decode's peak memory. The next compiled decode allocates a new one
    (CUDA graphs then record again once)."""
    COMPILED_CACHES.release(model)
