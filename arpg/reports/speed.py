"""Sampling and training speed: images/s, peak memory and operations per decode step and layer
for each decode mode and precision, tokens/s and MFU of a training step, and the device's matmul
ceiling, as a table, JSON and a plot.

    python scripts/bench_sample.py                        # CPU preset (the issue #14 configuration)
    python scripts/bench_sample.py bench_preset=cuda      # ARPG-L/XL/XXL shapes, batch 64, eager vs CUDA graphs
    python scripts/bench_sample.py steps=[8,64] modes=[eager,graphs] threads=1 output=bench.json

Decode modes (all with random weights, guidance on so the batch doubles, the same sampler):

* eager: the default cached decode (growing attention slice, fused projections).
* static: fixed-shape steps (`SamplingOptions.static`); eager, so only a check of its cost.
* compiled: torch.compile of the fixed-shape steps (one graph for feeding, one for predicting).
* graphs: static + compile: the same, replayed as CUDA graphs (mode "reduce-overhead") on CUDA.

Every row starts with the caches of the rows before it freed (the kept KV cache of compiled
decodes, cached CUDA blocks), and records its untimed first call (`warmup_s`: the compile, for
compiled rows) and the memory still allocated at its start (`resident_mib`: the weights and
compiled graphs' pools). The JSON is written after every row.

Baseline rows (eager, float32 or the first precision): `raster_ar` decodes one token per step in
raster order (classic autoregressive decoding with a KV cache); `no_cache` recomputes the prefix
at every step. Peak memory: CUDA max_memory_allocated; CPU peak RSS above the pre-run RSS, sampled
every 2 ms. Operations per step per layer: on the CPU the top-level aten operators (and inductor
kernels) of one profiled decode, on CUDA the GPU kernels, divided by steps and layers.

The ceiling: FLOPs per image of the decode (matmuls and attention, both guidance halves) over the
device's matmul throughput at the decode's shapes (measured here), i.e. what a decode would reach
if it were nothing but those matmuls at that speed.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import platform
import threading
import time
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import psutil
import torch
import torch.nn.functional as F

from arpg.errors import require
from arpg.files import atomic_write
from arpg.models import create_model
from arpg.models.arpg_steps import release_compiled_caches
from arpg.orders import decode_schedule
from arpg.runtime import cpu_description, fast_bf16, resolve_device, set_cpu_threads, tf32
from arpg.sample import SamplingOptions, generate
from arpg.train.config import RuntimeSettings

MODES = {
    "eager": {},
    "static": dict(static=True),
    "compiled": dict(compile=True),
    "graphs": dict(static=True, compile=True),
}
PRECISIONS = {"float32": False, "bf16": True}  # -> SamplingOptions.amp
# Dense bf16 tensor-core peaks (TFLOP/s) for MFU, by a substring of torch.cuda.get_device_name.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                   "A800": 312.0, "L40S": 362.0, "RTX 4090": 165.0}


@dataclass
class BenchSampleConfig:
    """`scripts/bench_sample.py` (mirrored by `arpg/configs/bench_sample.yaml`; presets in `arpg/configs/bench_preset/`)."""

    models: list[str] = field(default_factory=lambda: ["ARPG-tiny"])
    dim: Optional[int] = None  # overrides of the registered sizes, for every model (None: the size's own)
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    grid: int = 16  # tokens per side
    vocab_size: int = 16384
    num_classes: int = 1000
    batch: int = 16
    steps: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    modes: list[str] = field(default_factory=lambda: ["eager"])  # eager | static | compiled | graphs
    # float32 | bf16; null: float32, and bf16 too where the device multiplies it fast (arpg.runtime.fast_bf16)
    precisions: Optional[list[str]] = None
    baselines: bool = True  # raster_ar and no_cache rows
    no_cache_steps: list[int] = field(default_factory=lambda: [64])
    cfg: float = 4.0
    repeats: int = 1  # timed runs per row (the best is reported), after untimed warm-up runs
    count_ops: bool = True  # profile one decode per mode for the operation count
    train_models: list[str] = field(default_factory=list)  # also time training steps of these models
    train_batch: int = 16
    train_steps: int = 5  # timed optimizer steps (after 2 untimed ones)
    peak_tflops: Optional[float] = None  # for MFU; None: GPU_PEAK_TFLOPS by device name, CPU: measured matmul
    matmul_seconds: float = 0.5  # time spent measuring the matmul throughput of each ceiling
    threads: int = 0  # CPU intra-op threads (0: torch's default)
    device: str = "auto"
    seed: int = 0
    output: str = "docs/bench_sample.json"
    plot: str = "docs/bench_sample.png"


def _validate(config: BenchSampleConfig) -> None:
    require(bool(config.models or config.train_models), "models or train_models must name at least one model size")
    require(all(m in MODES for m in config.modes), f"modes must be a list of {sorted(MODES)}, got {config.modes}")
    require(config.precisions is None or all(p in PRECISIONS for p in config.precisions),
            f"precisions must be a list of {sorted(PRECISIONS)} or null, got {config.precisions}")
    T = config.grid ** 2
    require(bool(config.steps) and all(1 <= s <= T for s in config.steps + config.no_cache_steps),
            f"steps and no_cache_steps must be ints in [1, {T}], got {config.steps}, {config.no_cache_steps}")
    for name in ("batch", "repeats", "train_batch", "train_steps", "grid"):
        require(getattr(config, name) >= 1, f"{name} must be >= 1, got {getattr(config, name)}")
    require(config.threads >= 0, f"threads must be >= 0 (0: torch's default), got {config.threads}")
    require(config.matmul_seconds > 0, f"matmul_seconds must be > 0, got {config.matmul_seconds}")


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------

class _PeakRSS:
    """Peak resident memory above the starting RSS, polled by a background thread."""

    def __enter__(self):
        if platform.system() == "Linux":  # hand freed heap back to the OS, so the RSS rise is this run's
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Seconds and peak MiB of one call of fn() (CUDA: allocated memory; CPU: RSS increase)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) / 2**20
    with _PeakRSS() as rss:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return seconds, rss.mib


def count_ops(fn: Callable[[], object], device: torch.device) -> int:
    """Operations one call of fn() dispatches: GPU kernels on CUDA; on the CPU the aten operators
    not called by another aten operator, plus inductor's generated kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)

    def top_level(e) -> bool:
        parent = e.cpu_parent
        return parent is None or not (parent.name.startswith("aten::") or parent.name.startswith("cpp_fused"))
    return sum(1 for e in events if (e.name.startswith("aten::") or e.name.startswith("cpp_fused")) and top_level(e))


def matmul_tflops(shapes: list[tuple[int, int, int]], dtype: torch.dtype, device: torch.device,
                  seconds: float = 0.5) -> float:
    """Throughput (TFLOP/s) of x (M, K) @ W^T (N, K) over `shapes` (M, K, N), weighted by their
    FLOPs as a decode runs them. Each shape is timed in groups of 10 calls for about `seconds`
    in all, and its fastest group counts: the device's capability, not a busy moment of it."""
    total_flops = total_seconds = 0.0
    for M, K, N in shapes:
        x, w = torch.randn(M, K, device=device, dtype=dtype), torch.randn(N, K, device=device, dtype=dtype)
        F.linear(x, w)
        best, spent = math.inf, 0.0
        while spent < seconds / len(shapes) or best == math.inf:
            group, _ = timed(lambda: [F.linear(x, w) for _ in range(10)], device)
            best, spent = min(best, group), spent + group
        total_flops += 2 * M * K * N * 10
        total_seconds += best
    return total_flops / total_seconds / 1e12


def decode_flops(model: torch.nn.Module, steps: int, guided: bool = True) -> tuple[float, list[tuple[int, int, int]]]:
    """FLOPs of decoding one image in `steps` steps (arccos schedule; both guidance halves), and
    the (M, K, N) matmul shapes of one average step for a batch of one image."""
    c = model.config
    T, d, hidden, V = c.block_size, c.dim, c.ffn_hidden_dim, c.vocab_size
    half = c.n_layer // 2
    sizes = decode_schedule(T, steps, "arccos")
    fed_per_token = 2 * (half * (4 * d * d + 3 * d * hidden) + 2 * d * d)  # self blocks + shared K/V
    target_per_token = 2 * (half * (2 * d * d + 3 * d * hidden) + d * V)  # cross blocks + head
    fed, flops = 1, 2 * fed_per_token  # the class token: fed once, attends to itself
    for n in sizes:
        flops += n * target_per_token + half * 4 * n * fed * d  # queries read the `fed` cached tokens
        if n is not sizes[-1] or len(sizes) == 1:
            flops += n * fed_per_token + half * 4 * n * (fed + n) * d
        fed += n
    rows = 2 if guided else 1
    m = rows * max(1, round(T / steps))
    shapes = [(m, d, 3 * d), (m, d, d), (m, d, hidden), (m, hidden, d), (m, d, V)]
    return rows * flops, shapes


def train_flops_per_token(model: torch.nn.Module) -> float:
    """Model FLOPs of one training token, forward and backward (3x forward), with the usual
    convention of counting attention over the full sequence (not halved for the causal mask)."""
    c = model.config
    d, hidden, T, half = c.dim, c.ffn_hidden_dim, c.block_size, c.n_layer // 2
    forward = 2 * (half * (4 * d * d + 3 * d * hidden) + 2 * d * d + half * (2 * d * d + 3 * d * hidden)
                   + d * c.vocab_size) + c.n_layer * 4 * T * d
    return 3 * forward


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------

def _model(config: BenchSampleConfig, name: str, device: torch.device) -> torch.nn.Module:
    overrides = {k: getattr(config, k) for k in ("dim", "n_layer", "n_head") if getattr(config, k) is not None}
    torch.manual_seed(config.seed)
    with torch.device(device):  # initialised where it runs: seconds, not minutes, for ARPG-XXL
        model = create_model(name, vocab_size=config.vocab_size, block_size=config.grid ** 2,
                             num_classes=config.num_classes, **overrides)
        torch.nn.init.normal_(model.head.weight, std=0.02)  # the published init zeroes the head
    return model


def _sampling_rows(config: BenchSampleConfig, model: torch.nn.Module, name: str, device: torch.device
                   ) -> Iterator[dict]:
    """Time every (precision, mode, steps) decode of one model, plus the baseline rows (first
    precision), yielding each row when measured. bf16 rows cast the model to bf16 first, as the
    published sampler does (autocast on top). Each row starts with no cache of an earlier row
    alive (`_clear_caches`), so its peak memory is its own; `warmup_s` is its untimed first
    call (compiling, for compiled rows)."""
    T = config.grid ** 2
    labels = torch.arange(config.batch, device=device) % config.num_classes
    for precision in config.precisions:
        if PRECISIONS[precision]:
            model.to(torch.bfloat16)
        runs = [(mode, steps, dict(MODES[mode])) for mode in config.modes for steps in config.steps]
        if config.baselines and precision == config.precisions[0]:
            runs += [("raster_ar", T, dict(order="raster"))]
            runs += [("no_cache", s, dict(use_cache=False)) for s in config.no_cache_steps]
        for mode, steps, options in runs:
            options = SamplingOptions(steps=steps, cfg=config.cfg, amp=PRECISIONS[precision], **options)

            def sample() -> torch.Tensor:
                return generate(model, labels, options, generator=torch.Generator(device).manual_seed(config.seed))

            resident = _clear_caches(model, device)
            warmup, _ = timed(sample, device)
            if options.compile:  # the first call compiled, the second records the CUDA graphs
                sample()
            timings = [timed(sample, device) for _ in range(config.repeats)]
            seconds = min(t for t, _ in timings)
            ops = None
            if config.count_ops and mode in MODES:
                ops = count_ops(sample, device) / steps / model.config.n_layer
            row = dict(model=name, mode=mode, precision=precision, steps=steps, batch=config.batch,
                       seconds=seconds, images_per_s=config.batch / seconds, warmup_s=warmup,
                       peak_mib=max(m for _, m in timings), resident_mib=resident, ops_per_step_per_layer=ops)
            print(f"  {name} {precision} {mode:9s} steps={steps:3d}: {config.batch / seconds:8.2f} images/s, "
                  f"peak {row['peak_mib']:.0f} MiB, first call {warmup:.1f} s"
                  + (f", {ops:.0f} ops per step per layer" if ops else ""), flush=True)
            yield row


def _clear_caches(model: torch.nn.Module, device: torch.device) -> float:
    """Free the caches a previous row kept (the compiled decodes' KV cache, freed CUDA blocks);
    returns the MiB still allocated (CUDA: the weights and compiled graphs' pools; CPU: 0)."""
    release_compiled_caches(model)
    gc.collect()
    if device.type != "cuda":
        return 0.0
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(device) / 2**20


def _ceiling(config: BenchSampleConfig, model: torch.nn.Module, name: str, device: torch.device) -> list[dict]:
    """Images/s if a decode were only its matmuls at the measured matmul throughput, per precision and steps."""
    rows = []
    for precision in config.precisions:
        dtype = torch.bfloat16 if PRECISIONS[precision] else torch.float32
        for steps in config.steps:
            flops, shapes = decode_flops(model, steps)
            tflops = matmul_tflops([(m * config.batch, k, n) for m, k, n in shapes], dtype, device,
                                   config.matmul_seconds)
            rows.append(dict(model=name, precision=precision, steps=steps, gflop_per_image=flops / 1e9,
                             matmul_tflops=tflops, ceiling_images_per_s=tflops * 1e12 / flops))
    return rows


def _training_row(config: BenchSampleConfig, name: str, precision: str, device: torch.device,
                  peak: Optional[float]) -> dict:
    """Tokens/s and MFU of AdamW training steps (batch `train_batch`, random tokens and orders;
    bf16: autocast over float32 weights; float32 under training's default TF32 setting). On the CPU
    without `peak`, MFU is against the measured matmul throughput at the training shapes."""
    T = config.grid ** 2
    bf16 = PRECISIONS[precision]
    model = _model(config, name, device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4,
                                  **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    g = torch.Generator(device).manual_seed(config.seed)
    tokens = torch.randint(0, config.vocab_size, (config.train_batch, T), device=device, generator=g)
    labels = torch.randint(0, config.num_classes, (config.train_batch,), device=device, generator=g)
    order = torch.rand(config.train_batch, T, device=device, generator=g).argsort(dim=1)

    def steps(n: int) -> None:
        for _ in range(n):
            with tf32(RuntimeSettings.tf32), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                _, loss = model(tokens, labels, order, check=False, return_logits=False)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    steps(2)
    seconds, peak_mib = timed(lambda: steps(config.train_steps), device)
    tokens_per_s = config.train_steps * config.train_batch * T / seconds
    achieved = tokens_per_s * train_flops_per_token(model) / 1e12
    if peak is None and device.type == "cpu":
        c, M = model.config, config.train_batch * T
        peak = matmul_tflops([(M, c.dim, 3 * c.dim), (M, c.dim, c.ffn_hidden_dim), (M, c.ffn_hidden_dim, c.dim)],
                             torch.bfloat16 if bf16 else torch.float32, device, config.matmul_seconds)
    print(f"  {name} {precision} training: {tokens_per_s:,.0f} tokens/s, {achieved:.3f} TFLOP/s"
          + (f", MFU {achieved / peak:.1%}" if peak else ""), flush=True)
    return dict(model=name, precision=precision, batch=config.train_batch, tokens_per_s=tokens_per_s,
                achieved_tflops=achieved, peak_tflops=peak, mfu=achieved / peak if peak else None, peak_mib=peak_mib)


def _release(device: torch.device) -> None:
    """Free what one model's rows left behind (compiled code, CUDA graph pools, cached blocks), so
    the next model's peak memory is its own."""
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _gpu_peak(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in GPU_PEAK_TFLOPS.items() if key in name), None)


def bench_sample(config: BenchSampleConfig) -> dict:
    """Run the benchmark; print a table, write JSON and a plot; return the report."""
    _validate(config)
    threads = set_cpu_threads(config.threads)
    device = resolve_device(config.device)
    if config.precisions is None:
        config = dataclasses.replace(config, precisions=["float32", "bf16"] if fast_bf16(device.type) else ["float32"])
    environment = dict(torch=torch.__version__, threads=threads, cpus=os.cpu_count(),
                       load_average=list(os.getloadavg()), fast_bf16=fast_bf16(device.type),
                       device=torch.cuda.get_device_name(device) if device.type == "cuda"
                       else f"{platform.processor() or platform.machine()} ({cpu_description()})")
    report = dict(config=asdict(config), environment=environment, sampling=[], ceiling=[], training=[])

    def save() -> None:  # after every row: a run cut short keeps what it measured
        environment["load_average_end"] = list(os.getloadavg())
        atomic_write(Path(config.output), lambda path: path.write_text(json.dumps(report, indent=2)))

    # Inductor's CPU kernels show in the profiler (for the operation count) only if built so.
    from torch._inductor import config as inductor_config

    with inductor_config.patch({"cpp.enable_kernel_profile": config.count_ops}):
        for name in config.models:
            model = _model(config, name, device).eval()
            report["ceiling"] += _ceiling(config, model, name, device)
            save()
            for row in _sampling_rows(config, model, name, device):
                report["sampling"].append(row)
                save()
            release_compiled_caches(model)
            del model
            _release(device)
    peak = config.peak_tflops or _gpu_peak(device)
    for name in config.train_models:
        for precision in config.precisions:
            report["training"].append(_training_row(config, name, precision, device, peak))
            save()
            _release(device)
    print(_table(report))
    written = [Path(config.output)]
    if report["sampling"]:
        _plot(report, Path(config.plot))
        written.append(Path(config.plot))
    print(f"wrote {' and '.join(str(path.resolve()) for path in written)} ({environment['device']}, "
          f"{threads} threads, load {environment['load_average'][0]:.1f} -> {environment['load_average_end'][0]:.1f})")
    return report


def load_preset(path: Path | str, **overrides) -> BenchSampleConfig:
    """A benchmark preset (`arpg/configs/bench_preset/*.yaml`) read without Hydra, as the GPU check
    needs (`scripts/gpu_check.py`), then `overrides` of single fields. The preset's fields are
    BenchSampleConfig's; what it leaves out keeps the dataclass default (which
    `arpg/configs/bench_sample.yaml` mirrors)."""
    import yaml

    fields = yaml.safe_load(Path(path).read_text()) or {}
    unknown = sorted(set(fields) - set(BenchSampleConfig.__dataclass_fields__))
    require(not unknown, f"{path}: unknown fields {unknown}; allowed: the fields of BenchSampleConfig")
    return BenchSampleConfig(**{**fields, **overrides})


# Substrings (lower case) of the names of attention kernels (CUDA) and operators (CPU).
ATTENTION_NAMES = ("attention", "attn", "flash", "fmha", "sdpa", "softmax", "bmm")


def attention_kernels(config: BenchSampleConfig) -> dict:
    """Which attention kernels a decode runs: one eager decode of the first model (first
    precision, first step count, batch and guidance as configured) under the profiler; every
    GPU kernel (CUDA) or aten operator (CPU) whose name contains one of `ATTENTION_NAMES`, with
    its calls and total microseconds, most time first. Shows the SDPA backend (flash, memory-
    efficient, cuDNN or math) the decode's shapes get. Writes `config.output`."""
    from torch.profiler import ProfilerActivity, profile

    _validate(config)
    set_cpu_threads(config.threads)
    device = resolve_device(config.device)
    name, precision = config.models[0], config.precisions[0]
    model = _model(config, name, device).eval()
    if PRECISIONS[precision]:
        model.to(torch.bfloat16)
    labels = torch.arange(config.batch, device=device) % config.num_classes
    options = SamplingOptions(steps=config.steps[0], cfg=config.cfg, amp=PRECISIONS[precision])
    generate(model, labels, options)  # warm-up: kernels chosen and loaded
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        generate(model, labels, options)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    on_device = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    kernels: dict[str, dict] = {}
    for event in prof.events():
        if event.device_type == on_device and any(word in event.name.lower() for word in ATTENTION_NAMES):
            entry = kernels.setdefault(event.name, dict(calls=0, us=0.0))
            entry["calls"] += 1
            entry["us"] += event.time_range.elapsed_us()
    ranked = [dict(name=k, **v) for k, v in sorted(kernels.items(), key=lambda item: -item[1]["us"])]
    report = dict(config=asdict(config), model=name, precision=precision, steps=config.steps[0],
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", kernels=ranked)
    for kernel in ranked:
        print(f"  {kernel['calls']:6d} calls {kernel['us'] / 1e3:9.2f} ms  {kernel['name']}", flush=True)
    atomic_write(Path(config.output), lambda path: path.write_text(json.dumps(report, indent=2)))
    return report


def _table(report: dict) -> str:
    lines = ["", "| model | precision | mode | steps | images/s | s/batch | peak MiB | ops/step/layer | of ceiling |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    ceilings = {(c["model"], c["precision"], c["steps"]): c["ceiling_images_per_s"] for c in report["ceiling"]}
    for r in report["sampling"]:
        ops = f"{r['ops_per_step_per_layer']:.0f}" if r["ops_per_step_per_layer"] is not None else ""
        ceiling = ceilings.get((r["model"], r["precision"], r["steps"]))
        share = f"{r['images_per_s'] / ceiling:.0%}" if ceiling and r["mode"] in MODES else ""
        lines.append(f"| {r['model']} | {r['precision']} | {r['mode']} | {r['steps']} | {r['images_per_s']:.2f} | "
                     f"{r['seconds']:.2f} | {r['peak_mib']:.0f} | {ops} | {share} |")
    if report["ceiling"]:
        lines += ["", "| model | precision | steps | GFLOP/image | matmul TFLOP/s | ceiling images/s |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {c['model']} | {c['precision']} | {c['steps']} | {c['gflop_per_image']:.2f} | "
                  f"{c['matmul_tflops']:.3f} | {c['ceiling_images_per_s']:.1f} |" for c in report["ceiling"]]
    if report["training"]:
        lines += ["", "| model | precision | batch | tokens/s | TFLOP/s | MFU | peak MiB |", "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {t['model']} | {t['precision']} | {t['batch']} | {t['tokens_per_s']:,.0f} | "
                  f"{t['achieved_tflops']:.3f} | {'' if t['mfu'] is None else format(t['mfu'], '.1%')} | "
                  f"{t['peak_mib']:.0f} |" for t in report["training"]]
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = report["config"]
    fig, (speed_ax, memory_ax) = plt.subplots(1, 2, figsize=(11, 4))
    series = sorted({(r["model"], r["precision"], r["mode"]) for r in report["sampling"]})
    for model, precision, mode in series:
        points = sorted((r["steps"], r["images_per_s"], r["peak_mib"]) for r in report["sampling"]
                        if (r["model"], r["precision"], r["mode"]) == (model, precision, mode))
        steps, speed, memory = zip(*points)
        style = "o-" if len(points) > 1 else "s"
        speed_ax.plot(steps, speed, style, label=f"{model} {precision} {mode}")
        memory_ax.plot(steps, memory, style, label=f"{model} {precision} {mode}")
    for c in report["ceiling"]:
        speed_ax.plot([c["steps"]], [c["ceiling_images_per_s"]], "k_", markersize=14)
    speed_ax.set(xscale="log", yscale="log", xlabel="decoding steps", ylabel="images / s",
                 title=f"batch {config['batch']}, {config['grid']}x{config['grid']} tokens, cfg {config['cfg']} "
                       f"(black: matmul ceiling)")
    memory_ax.set(xscale="log", xlabel="decoding steps", ylabel="peak MiB", title=report["environment"]["device"])
    speed_ax.legend(fontsize=6)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
