"""Sampling speed and peak memory: ARPG's parallel decoding vs one-token-per-step AR vs no KV cache.

    python scripts/bench_sample.py                      # CPU preset: ARPG-tiny, 16x16 tokens, batch 16
    python scripts/bench_sample.py preset=cuda          # ARPG-L/XL/XXL shapes, bf16 autocast, batch 64
    python scripts/bench_sample.py steps=[8,64] batch=4 threads=1 output=bench.json

Rows, all with random weights, classifier-free guidance on (the batch doubles) and the same sampler:
  arpg      random order, arccos schedule, `steps` steps, KV cache
  raster_ar raster order, one token per step (steps = T), KV cache: classic autoregressive decoding
  no_cache  random order, `no_cache_steps` steps, every step recomputes the whole prefix fed so far
            (one full forward with the same block-causal attention pattern; identical logits)
Prints a table, writes JSON (`output`) and a plot of images/s against steps (`plot`).
Peak memory: CUDA max_memory_allocated; CPU peak RSS above the pre-run RSS, sampled every 2 ms.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch
from omegaconf import OmegaConf

from arpg import create_model
from arpg.cli import to_dataclass
from arpg.runtime import resolve_device
from arpg.sample import generate


@dataclass
class BenchConfig:
    preset: str = "cpu"  # cpu | cuda: the defaults below, before command-line overrides
    models: list[str] = field(default_factory=lambda: ["ARPG-tiny"])
    grid: int = 16  # tokens per side
    vocab_size: int = 16384
    num_classes: int = 1000
    batch: int = 16
    steps: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    no_cache_steps: list[int] = field(default_factory=lambda: [64])
    cfg: float = 4.0
    repeats: int = 1  # timed runs per row (the best is reported), after one untimed warm-up per model
    threads: int = 0  # CPU intra-op threads; 0 keeps torch's default
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    compile: bool = False
    seed: int = 0
    output: str = "bench_sample.json"
    plot: str = "bench_sample.png"


PRESETS = {
    "cpu": {},
    "cuda": dict(models=["ARPG-L", "ARPG-XL", "ARPG-XXL"], batch=64, device="cuda"),
}


class _PeakRSS:
    """Peak resident memory above the starting RSS, polled by a background thread."""

    def __enter__(self):
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


def _timed(fn, device: torch.device) -> tuple[float, float]:
    """Seconds and peak MiB of one call of fn()."""
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


def bench_sample(config: BenchConfig) -> list[dict]:
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    T = config.grid * config.grid
    labels = torch.arange(config.batch, device=device) % config.num_classes
    rows = []
    for name in config.models:
        torch.manual_seed(config.seed)
        model = create_model(name, vocab_size=config.vocab_size, block_size=T, num_classes=config.num_classes)
        torch.nn.init.normal_(model.head.weight, std=0.02)  # the published init zeroes the head
        model = model.to(device).eval()
        runs = [("arpg", s, "random", True) for s in config.steps] + [("raster_ar", T, "raster", True)]
        runs += [("no_cache", s, "random", False) for s in config.no_cache_steps]

        def sample(steps: int, order: str, use_cache: bool) -> torch.Tensor:
            return generate(model, labels, steps=steps, order=order, cfg=config.cfg, amp=config.amp,
                            compile=config.compile, use_cache=use_cache,
                            generator=torch.Generator().manual_seed(config.seed))

        sample(min(config.steps), "random", True)  # warm-up: first-call allocations, kernels
        for mode, steps, order, use_cache in runs:
            timings = [_timed(lambda: sample(steps, order, use_cache), device) for _ in range(config.repeats)]
            seconds = min(t for t, _ in timings)
            rows.append(dict(model=name, mode=mode, steps=steps, batch=config.batch, seconds=seconds,
                             images_per_s=config.batch / seconds, peak_mib=max(m for _, m in timings)))
            print(f"  {name} {mode:9s} steps={steps:3d}: {seconds:7.2f} s", flush=True)
        del model
    _report(config, rows, device)
    return rows


def _report(config: BenchConfig, rows: list[dict], device: torch.device) -> None:
    by_key = {(r["model"], r["mode"], r["steps"]): r for r in rows}
    T = config.grid * config.grid
    for r in rows:
        r["speedup_vs_raster_ar"] = r["images_per_s"] / by_key[(r["model"], "raster_ar", T)]["images_per_s"]
    memory = "peak MiB (CUDA allocated)" if device.type == "cuda" else "peak MiB (RSS increase)"
    print(f"\n| model | mode | steps | images/s | s/batch | {memory} | vs raster AR |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['mode']} | {r['steps']} | {r['images_per_s']:.2f} | {r['seconds']:.2f} | "
              f"{r['peak_mib']:.0f} | {r['speedup_vs_raster_ar']:.2f}x |")
    for name in config.models:
        for steps in config.no_cache_steps:
            cached, uncached = by_key.get((name, "arpg", steps)), by_key[(name, "no_cache", steps)]
            if cached:
                print(f"{name}: KV cache vs recomputation at {steps} steps: "
                      f"{cached['images_per_s'] / uncached['images_per_s']:.2f}x")

    env = dict(torch=torch.__version__, device=torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine(), threads=torch.get_num_threads(),
               cpus=os.cpu_count(), load_average=os.getloadavg())
    output = Path(config.output)
    output.write_text(json.dumps(dict(config=asdict(config), environment=env, rows=rows), indent=2))
    _plot(config, rows, Path(config.plot))
    print(f"wrote {output.resolve()} and {Path(config.plot).resolve()} "
          f"({len(rows)} rows, {env['device']}, {env['threads']} threads, load {env['load_average'][0]:.1f})")


def _plot(config: BenchConfig, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    markers = {"arpg": "o-", "raster_ar": "s", "no_cache": "x"}
    for name in config.models:
        for mode, style in markers.items():
            points = sorted((r["steps"], r["images_per_s"]) for r in rows if r["model"] == name and r["mode"] == mode)
            if points:
                ax.plot(*zip(*points), style, label=f"{name} {mode}")
    ax.set(xscale="log", yscale="log", xlabel="decoding steps", ylabel="images / s",
           title=f"sampling speed, batch {config.batch}, {config.grid}x{config.grid} tokens, cfg {config.cfg}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    overrides = OmegaConf.from_cli()
    preset = overrides.get("preset", "cpu")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    config = to_dataclass(OmegaConf.merge(PRESETS[preset], overrides), BenchConfig)
    bench_sample(config)


if __name__ == "__main__":
    main()
