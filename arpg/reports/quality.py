"""Sample quality against decoding steps on the digits: the CPU analogue of the paper's
steps-vs-FID table, scored by the digits judge of `arpg.quality`.

`bench_quality` draws class-balanced samples (image i has class i % 10) for every (order, steps)
and reports accuracy, Frechet distance and images/s as JSON, a markdown table and a plot.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from arpg.checkpoint import WEIGHTS_CHOICES, load_model
from arpg.cli import compose_config
from arpg.errors import require
from arpg.eval import summary_table
from arpg.files import atomic_write
from arpg.orders import ORDERS, make_plan
from arpg.quality import (DIGITS_LEVELS, DIGITS_SIDE, JUDGE_HIDDEN_UNITS, JUDGE_MIN_FIRING, check_digits_model,
                          digits_judge, sample_digits)
from arpg.runtime import resolve_device
from arpg.sample import SamplingOptions
from arpg.train import TrainConfig, train


@dataclass
class BenchQualityConfig:
    """`scripts/bench_quality.py` (mirrored by `configs/bench_quality.yaml`)."""

    checkpoint: str = ""  # a digits model (e.g. runs/tiny_digits/model.safetensors); "": train the default one
    weights: str = "default"  # default | model | ema
    train_dir: str = "runs/bench_quality_digits"  # out_dir of that training run (resumed if it is there)
    samples: int = 1000  # per (order, steps) setting, class-balanced
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    orders: list[str] = field(default_factory=lambda: ["random", "raster", "regions4"])
    natural_regions: bool = True  # also each regions order with its own schedule (R + T/R - 1 steps)
    # The published sampler's defaults, untempered, with guidance 3: the standard schedule of every
    # (order, steps) row comes from here (each row sets order and steps).
    sampling: SamplingOptions = field(default_factory=lambda: SamplingOptions(schedule="arccos", cfg=3.0))
    batch_size: int = 500
    seed: int = 0  # sampling; every setting uses the same seed (common random numbers)
    judge_seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_json: str = "docs/bench_quality.json"
    output_plot: str = "docs/bench_quality.png"


def _validate(config: BenchQualityConfig) -> None:
    require(config.checkpoint == "" or Path(config.checkpoint).is_file(),
            f"checkpoint {config.checkpoint!r} not found; pass a digits model (scripts/train.py writes "
            f"<out_dir>/model.safetensors) or checkpoint='' to train the default one")
    require(config.weights in WEIGHTS_CHOICES, f"weights must be one of {WEIGHTS_CHOICES}, got {config.weights!r}")
    require(config.samples >= 2, f"samples must be >= 2 (a covariance needs two), got {config.samples}")
    require(bool(config.steps) and all(1 <= s <= DIGITS_SIDE ** 2 for s in config.steps),
            f"steps must be a non-empty list of ints in [1, 64], got {config.steps}")
    require(bool(config.orders) and all(o in ORDERS for o in config.orders),
            f"orders must be a non-empty list of names from {sorted(ORDERS)}, got {config.orders}")
    require(config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size}")
    require(config.seed >= 0 and config.judge_seed >= 0,
            f"seed and judge_seed must be >= 0, got {config.seed}, {config.judge_seed}")


def default_digits_model(train_dir: str, device: torch.device) -> tuple[torch.nn.Module, Path]:
    """Train (or finish, or just reload) the default digits recipe of configs/train.yaml in `train_dir`."""
    result = train(compose_config("train", TrainConfig, [f"out_dir={train_dir}"]))
    return load_model(result.weights, device=device), result.weights


def _settings(config: BenchQualityConfig) -> list[tuple[str, str, int]]:
    """(order, schedule, steps) of every row: each order x steps with the standard schedule, then
    each regions order with its natural schedule."""
    rows = [(order, config.sampling.schedule, steps) for order in config.orders for steps in config.steps]
    if config.natural_regions:
        rows += [(order, "regions", make_plan(order, 1, DIGITS_SIDE, DIGITS_SIDE, None, "regions").num_steps)
                 for order in config.orders if order.startswith("regions")]
    return rows


def bench_quality(config: BenchQualityConfig) -> dict:
    """Run the steps x orders benchmark; write JSON and a plot, print a markdown table; return the report."""
    _validate(config)
    device = resolve_device(config.device)
    if config.checkpoint:
        model = load_model(config.checkpoint, weights=config.weights, device=device)
    else:
        model, _ = default_digits_model(config.train_dir, device)
    checkpoint = config.checkpoint or f"{config.train_dir}/model.safetensors"  # as given: no machine's paths
    check_digits_model(model)
    judge = digits_judge(config.judge_seed)
    print(f"judge: {judge.held_out_accuracy:.2%} held-out accuracy on {len(judge.held_out_tokens)} real digits; "
          f"noise floor (held-out real digits) Frechet {judge.noise_floor:.4f}")

    sample_digits(model, 2, options=config.sampling, steps=1)  # untimed warm-up: first-call overheads
    results = []
    for order, schedule, steps in _settings(config):
        started = time.perf_counter()
        tokens, labels = sample_digits(model, config.samples, seed=config.seed, batch_size=config.batch_size,
                                       options=config.sampling, order=order, schedule=schedule,
                                       steps=None if schedule == "regions" else steps)
        seconds = time.perf_counter() - started
        row = {"order": order, "schedule": schedule, "steps": steps, "accuracy": judge.accuracy(tokens, labels),
               "frechet": judge.frechet(tokens), "images_per_s": config.samples / seconds, "seconds": seconds}
        print(f"  {order:9s} {schedule:7s} steps={steps:3d}: accuracy {row['accuracy']:.3f}, "
              f"Frechet {row['frechet']:.3f}, {row['images_per_s']:.0f} images/s", flush=True)
        results.append(row)

    random_tokens = torch.randint(0, DIGITS_LEVELS, (config.samples, DIGITS_SIDE ** 2),
                                  generator=torch.Generator().manual_seed(config.seed))
    report = {
        "config": dataclasses.asdict(config),
        "model": {"checkpoint": checkpoint, "parameters": model.num_parameters(),
                  "config": model.config.to_dict()},
        "judge": {
            "classifier": f"sklearn MLPClassifier, {JUDGE_HIDDEN_UNITS} ReLU units, input pixels / 16",
            "train_images": len(judge.reference_tokens),
            "held_out_images": len(judge.held_out_tokens),
            "held_out_accuracy": judge.held_out_accuracy,
            "feature_space": f"hidden-layer activations (units firing on >= {JUDGE_MIN_FIRING:.0%} of the reference)",
            "feature_dim": judge.feature_dim,
            "seed": judge.seed,
        },
        "noise_floor": {"frechet": judge.noise_floor, "images": len(judge.held_out_tokens),
                        "what": "held-out real digits vs the reference (the judge's training half)"},
        "random_tokens_frechet": judge.frechet(random_tokens),
        "results": results,
        "environment": {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "machine": platform.processor() or platform.machine()},
    }
    _write_report(report, Path(config.output_json), Path(config.output_plot))
    return report


def _write_report(report: dict, json_path: Path, plot_path: Path) -> None:
    text = json.dumps(report, indent=1)
    atomic_write(json_path, lambda tmp: tmp.write_text(text))
    _plot(report, plot_path)
    rows = [{"order": r["order"], "schedule": r["schedule"], "steps": r["steps"], "accuracy": r["accuracy"],
             "frechet": r["frechet"], "images/s": f"{r['images_per_s']:.1f}"} for r in report["results"]]
    print()
    print(summary_table(rows))
    print(f"\njudge held-out accuracy {report['judge']['held_out_accuracy']:.4f}; Frechet noise floor "
          f"{report['noise_floor']['frechet']:.4f}; uniformly random tokens {report['random_tokens_frechet']:.2f}")
    print(f"wrote {json_path.resolve()} and {plot_path.resolve()}")


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, fd_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    results = report["results"]
    standard = report["config"]["sampling"]["schedule"]
    for index, order in enumerate(dict.fromkeys(r["order"] for r in results)):
        color = f"C{index}"
        line = sorted((r for r in results if r["order"] == order and r["schedule"] == standard),
                      key=lambda r: r["steps"])
        for ax, key in ((acc_ax, "accuracy"), (fd_ax, "frechet")):
            ax.plot([r["steps"] for r in line], [r[key] for r in line], "o-", color=color, label=order)
            for r in results:
                if r["order"] == order and r["schedule"] == "regions":
                    ax.plot([r["steps"]], [r[key]], "*", color=color, markersize=13,
                            label=f"{order}, natural schedule ({r['steps']} steps)")
    acc_ax.axhline(report["judge"]["held_out_accuracy"], color="grey", linestyle=":",
                   label="judge on held-out real digits")
    fd_ax.axhline(report["noise_floor"]["frechet"], color="grey", linestyle="--", label="noise floor (real vs real)")
    fd_ax.set_yscale("log")
    for ax, ylabel in ((acc_ax, "class accuracy of samples"), (fd_ax, "Frechet distance (judge features)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"decoding steps ({standard} schedule)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    n = report["config"]["samples"]
    fig.suptitle(f"digits: sample quality vs steps ({n} samples per point, cfg {report['config']['sampling']['cfg']})")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
