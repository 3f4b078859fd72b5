"""Sample quality against decoding steps on the digits, per decoding strategy: the CPU analogue of
the paper's steps-vs-FID table, scored by the digits judge of `arpg.digits_judge`.

`bench_quality` draws class-balanced samples (image i has class i % 10) for every (strategy, steps)
and reports class accuracy, Frechet distance, k-NN precision and recall (in the judge's feature
space) and images/s as JSON, a markdown table and a plot, beside the same measures for held-out
real digits (the noise floor). It also draws real and generated digits side by side.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from arpg.checkpoint import WEIGHTS_CHOICES, load_model
from arpg.cli import compose_config
from arpg.digits_judge import (DIGITS_CLASSES, DIGITS_LEVELS, DIGITS_SIDE, JUDGE_HIDDEN_UNITS, JUDGE_MIN_FIRING,
                               check_digits_model, digits_judge, sample_digits)
from arpg.errors import require
from arpg.eval import precision_recall
from arpg.files import atomic_write
from arpg.images import save_grid
from arpg.runtime import resolve_device
from arpg.sample import SamplingOptions
from arpg.tokenizer import PixelTokenizer
from arpg.train import TrainConfig, train


def _default_strategies() -> dict[str, dict[str, Any]]:
    return {
        "arccos_constant": {"schedule": "arccos", "cfg_schedule": "constant"},  # random order, arccos, constant cfg
        "random": {},
        "halton": {"order": "halton"},
        "locality": {"order": "locality"},
        "confidence": {"positions": "confidence", "position_noise": 6.0},
        "confidence_low_cfg": {"positions": "confidence", "position_noise": 6.0, "cfg": 1.5,
                               "cfg_schedule": "constant"},
    }


@dataclass
class BenchQualityConfig:
    """`scripts/bench_quality.py` (mirrored by `arpg/configs/bench_quality.yaml`)."""

    checkpoint: str = ""  # a digits model (e.g. runs/tiny_digits/model.safetensors); "": train the default one
    weights: str = "default"  # default | model | ema
    train_dir: str = "runs/bench_quality_digits"  # out_dir of that training run (resumed if it is there)
    samples: int = 1000  # per (strategy, steps) cell, class-balanced
    steps: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 64])
    # The table's columns: name -> SamplingOptions fields that differ from `sampling` (each row sets steps).
    strategies: dict[str, dict[str, Any]] = field(default_factory=_default_strategies)
    # What every strategy starts from (arpg/configs/sampling/digits.yaml, the default run's): random order,
    # the growing "cube" schedule, guidance rising to 3 (the published linear ramp), temperature 1.
    sampling: SamplingOptions = field(default_factory=lambda: SamplingOptions(schedule="cube", cfg=3.0,
                                                                              cfg_schedule="linear"))
    batch_size: int = 500
    seed: int = 0  # sampling; every cell uses the same seed (common random numbers)
    judge_seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    grid_strategies: list[str] = field(default_factory=lambda: ["arccos_constant", "confidence"])  # drawn beside real digits
    grid_steps: int = 8
    output_json: str = "docs/bench_quality.json"
    output_plot: str = "docs/bench_quality.png"
    output_grid: str = "docs/digits_real_vs_generated.png"


def _strategy_options(config: BenchQualityConfig) -> dict[str, SamplingOptions]:
    """Each strategy's SamplingOptions (validated: a bad field names the strategy)."""
    options = {}
    for name, overrides in config.strategies.items():
        try:
            options[name] = config.sampling.replace(**overrides)
        except ValueError as error:
            raise ValueError(f"strategies.{name}: {error}") from None
    return options


def _validate(config: BenchQualityConfig) -> None:
    require(config.checkpoint == "" or Path(config.checkpoint).is_file(),
            f"checkpoint {config.checkpoint!r} not found; pass a digits model (scripts/train.py writes "
            f"<out_dir>/model.safetensors) or checkpoint='' to train the default one")
    require(config.weights in WEIGHTS_CHOICES, f"weights must be one of {WEIGHTS_CHOICES}, got {config.weights!r}")
    require(config.samples >= 4, f"samples must be >= 4 (k-NN recall with k = 3), got {config.samples}")
    require(bool(config.steps) and all(1 <= s <= DIGITS_SIDE ** 2 for s in config.steps),
            f"steps must be a non-empty list of ints in [1, 64], got {config.steps}")
    require(bool(config.strategies), "strategies must name at least one strategy")
    _strategy_options(config)
    require(all(name in config.strategies for name in config.grid_strategies),
            f"grid_strategies must be names from strategies {sorted(config.strategies)}, got {config.grid_strategies}")
    require(1 <= config.grid_steps <= DIGITS_SIDE ** 2, f"grid_steps must be in [1, 64], got {config.grid_steps}")
    require(config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size}")
    require(config.seed >= 0 and config.judge_seed >= 0,
            f"seed and judge_seed must be >= 0, got {config.seed}, {config.judge_seed}")


def default_digits_model(train_dir: str, device: torch.device) -> tuple[torch.nn.Module, Path]:
    """Train (or finish, or just reload) the default digits recipe of arpg/configs/train.yaml in `train_dir`."""
    result = train(compose_config("train", TrainConfig, [f"out_dir={train_dir}"]))
    return load_model(result.weights, device=device), result.weights


def bench_quality(config: BenchQualityConfig) -> dict:
    """Run the steps x strategies benchmark; write JSON, a plot and the real-vs-generated grid,
    print a markdown table; return the report."""
    _validate(config)
    device = resolve_device(config.device)
    if config.checkpoint:
        model = load_model(config.checkpoint, weights=config.weights, device=device)
    else:
        model, _ = default_digits_model(config.train_dir, device)
    checkpoint = config.checkpoint or f"{config.train_dir}/model.safetensors"  # as given: no machine's paths
    check_digits_model(model)
    judge = digits_judge(config.judge_seed)
    reference = judge.features(judge.reference_tokens)
    real_precision, real_recall = precision_recall(reference, judge.features(judge.held_out_tokens))
    print(f"judge: {judge.held_out_accuracy:.2%} held-out accuracy on {len(judge.held_out_tokens)} real digits; "
          f"held-out real digits: Frechet {judge.noise_floor:.4f} (noise floor), precision {real_precision:.3f}, "
          f"recall {real_recall:.3f}")

    strategies = _strategy_options(config)
    sample_digits(model, 2, options=config.sampling, steps=1)  # untimed warm-up: first-call overheads
    results = []
    for steps in config.steps:
        for name, options in strategies.items():
            started = time.perf_counter()
            tokens, labels = sample_digits(model, config.samples, seed=config.seed, batch_size=config.batch_size,
                                           options=options, steps=steps)
            seconds = time.perf_counter() - started
            precision, recall = precision_recall(reference, judge.features(tokens))
            row = {"strategy": name, "steps": steps, "accuracy": judge.accuracy(tokens, labels),
                   "frechet": judge.frechet(tokens), "precision": precision, "recall": recall,
                   "images_per_s": config.samples / seconds, "seconds": seconds}
            print(f"  {name:12s} steps={steps:3d}: accuracy {row['accuracy']:.3f}, Frechet {row['frechet']:.3f}, "
                  f"precision {precision:.3f}, recall {recall:.3f}, {row['images_per_s']:.0f} images/s", flush=True)
            results.append(row)

    random_tokens = torch.randint(0, DIGITS_LEVELS, (config.samples, DIGITS_SIDE ** 2),
                                  generator=torch.Generator().manual_seed(config.seed))
    report = {
        "config": dataclasses.asdict(config),
        "strategies": {name: str(options) for name, options in strategies.items()},
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
        "noise_floor": {"frechet": judge.noise_floor, "precision": real_precision, "recall": real_recall,
                        "images": len(judge.held_out_tokens),
                        "what": "held-out real digits vs the reference (the judge's training half)"},
        "random_tokens_frechet": judge.frechet(random_tokens),
        "results": results,
        "environment": {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "machine": platform.processor() or platform.machine()},
    }
    _write_report(report, Path(config.output_json), Path(config.output_plot))
    _real_vs_generated(model, config, strategies, Path(config.output_grid))
    return report


def quality_table(report: dict) -> str:
    """Markdown table: a row per steps, a column per strategy, cells "accuracy / Frechet /
    precision, recall / images/s", then the held-out real digits."""
    names = list(report["strategies"])
    cells = {(r["strategy"], r["steps"]): r for r in report["results"]}
    lines = ["| steps | " + " | ".join(names) + " |", "|---:|" + "---|" * len(names)]
    for steps in dict.fromkeys(r["steps"] for r in report["results"]):
        row = [cells[name, steps] for name in names]
        lines.append(f"| {steps} | " + " | ".join(
            f"{r['accuracy']:.3f} / {r['frechet']:.2f} / {r['precision']:.2f}, {r['recall']:.2f} / "
            f"{r['images_per_s']:.0f}" for r in row) + " |")
    floor = report["noise_floor"]
    lines.append(f"| real | {report['judge']['held_out_accuracy']:.3f} / {floor['frechet']:.2f} / "
                 f"{floor['precision']:.2f}, {floor['recall']:.2f} (held-out digits) |" + " |" * (len(names) - 1))
    return "\n".join(lines)


def _write_report(report: dict, json_path: Path, plot_path: Path) -> None:
    text = json.dumps(report, indent=1)
    atomic_write(json_path, lambda tmp: tmp.write_text(text))
    _plot(report, plot_path)
    print()
    print("cells: class accuracy / Frechet distance / precision, recall / images/s")
    print(quality_table(report))
    for name, options in report["strategies"].items():
        print(f"  {name}: {options}")
    print(f"\nuniformly random tokens: Frechet {report['random_tokens_frechet']:.2f}")
    print(f"wrote {json_path.resolve()} and {plot_path.resolve()}")


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = {"accuracy": "class accuracy of samples", "frechet": "Frechet distance (judge features)",
              "images_per_s": "images/s", "precision": "precision (k-NN, k = 3)", "recall": "recall (k-NN, k = 3)"}
    results, floor = report["results"], report["noise_floor"]
    for index, name in enumerate(report["strategies"]):
        line = sorted((r for r in results if r["strategy"] == name), key=lambda r: r["steps"])
        for ax, key in zip(axes.flat, panels):
            ax.plot([r["steps"] for r in line], [r[key] for r in line], "o-", color=f"C{index}", label=name)
    real = {"accuracy": report["judge"]["held_out_accuracy"], "frechet": floor["frechet"],
            "precision": floor["precision"], "recall": floor["recall"]}
    for ax, key in zip(axes.flat, panels):
        if key in real:
            ax.axhline(real[key], color="grey", linestyle="--", label="held-out real digits")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("decoding steps")
        ax.set_ylabel(panels[key])
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[1].axhline(3 * floor["frechet"], color="grey", linestyle=":", label="3x the noise floor")
    axes.flat[1].set_yscale("log")
    axes.flat[2].set_yscale("log")
    axes.flat[1].legend(fontsize=8)
    axes.flat[5].axis("off")
    axes.flat[5].text(0, 1, "\n".join(f"{name}: {options}" for name, options in report["strategies"].items()),
                      va="top", fontsize=8, wrap=True)
    n = report["config"]["samples"]
    fig.suptitle(f"digits: sample quality vs steps per decoding strategy ({n} samples per point)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def _real_vs_generated(model: torch.nn.Module, config: BenchQualityConfig, strategies: dict[str, SamplingOptions],
                       path: Path, per_class: int = 8) -> None:
    """One PNG: held-out real digits, then each of `grid_strategies` at `grid_steps`, side by side
    (a row per class, `per_class` images of it per panel, a blank column between panels)."""
    judge = digits_judge(config.judge_seed)
    held_out = torch.as_tensor(judge.held_out_tokens).view(-1, DIGITS_SIDE, DIGITS_SIDE)
    held_out_labels = torch.as_tensor(judge.held_out_labels)
    panels = [torch.stack([held_out[held_out_labels == c][:per_class] for c in range(DIGITS_CLASSES)])]
    for name in config.grid_strategies:
        tokens, labels = sample_digits(model, per_class * DIGITS_CLASSES, seed=config.seed,
                                       options=strategies[name], steps=config.grid_steps)
        panels.append(torch.stack([tokens[labels == c] for c in range(DIGITS_CLASSES)]))
    grey = (DIGITS_LEVELS - 1) // 2  # separators and padding in mid-grey, apart from the black background
    blank = torch.full((DIGITS_CLASSES, 1, DIGITS_SIDE, DIGITS_SIDE), grey)
    rows = torch.cat([part for panel in panels for part in (panel.cpu(), blank)][:-1], dim=1)  # (10, n, 8, 8)
    images = PixelTokenizer.digits().decode(rows.flatten(0, 1))
    save_grid(images, path, nrow=rows.shape[1], padding=1, scale=4, pad_value=0.0)
    print(f"wrote {path.resolve()}: real digits | " + " | ".join(
        f"{name}, {config.grid_steps} steps" for name in config.grid_strategies))
