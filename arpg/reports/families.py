"""ARPG, LlamaGen and PAR side by side on the digits: the same data, tokens, training recipe and
budget, scored by the digits judge of `arpg.digits_judge` against the forward calls each needs.

`bench_families` trains one model per family with `scripts/train.py`'s recipe (equal training
steps, about equal parameter counts: arpg/configs/model/tiny.yaml, llamagen_tiny.yaml, par_tiny.yaml;
ARPG also with the published all-zero class-token rotation that LlamaGen and PAR use, since the
embedded ARPG recipe's identity rotation learns class conditioning faster on small data),
then draws the same class-balanced samples from each: ARPG at several step counts, LlamaGen (64
forward calls for 8x8 tokens) and PAR-4x (4 + 16 - 1 = 19) at their own. It reports class accuracy,
Frechet distance and images/s as JSON, a markdown table and a plot. Speed is timed after all
sampling, in rounds that visit every setting in turn, keeping each setting's best round: on a
shared machine the settings then see the same conditions.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from arpg.checkpoint import load_model
from arpg.cli import compose_config
from arpg.errors import require
from arpg.eval import summary_table
from arpg.files import atomic_write
from arpg.models import family_of
from arpg.digits_judge import DIGITS_SIDE, check_digits_model, digits_judge, sample_digits
from arpg.runtime import resolve_device
from arpg.sample import SamplingOptions
from arpg.sample.decode import decode_plan
from arpg.train import TrainConfig, train


@dataclass
class BenchFamiliesConfig:
    """`scripts/bench_families.py` (mirrored by `arpg/configs/bench_families.yaml`)."""

    # label -> overrides of arpg/configs/train.yaml that train it (each in <train_root>/<label>, resumed if there)
    # ARPG-zeros: the embedded ARPG recipe with the published all-zero class rotation, as LlamaGen/PAR have.
    families: dict[str, list[str]] = field(default_factory=lambda: {
        "ARPG": [], "ARPG-zeros": ["model.cls_rope=zeros"], "LlamaGen": ["experiment=digits_llamagen"],
        "PAR-4x": ["experiment=digits_par"]})
    train_overrides: list[str] = field(default_factory=list)  # for every family, e.g. ["epochs=10"]
    train_root: str = "runs/bench_families"
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])  # families that decode in any number
    # Every row's settings (the families with their own decoding keep their order and steps).
    sampling: SamplingOptions = field(default_factory=lambda: SamplingOptions(cfg=3.0))
    samples: int = 1000  # per row, class-balanced
    batch_size: int = 500
    speed_rounds: int = 3  # timing rounds over all settings; each setting's best round counts
    seed: int = 0  # sampling; the same seed for every row (common random numbers)
    judge_seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_json: str = "docs/bench_families.json"
    output_plot: str = "docs/bench_families.png"


def _validate(config: BenchFamiliesConfig) -> None:
    require(bool(config.families), "families must name at least one family to train")
    require(bool(config.steps) and all(1 <= s <= DIGITS_SIDE ** 2 for s in config.steps),
            f"steps must be a non-empty list of ints in [1, 64], got {config.steps}")
    require(config.samples >= 2, f"samples must be >= 2 (a covariance needs two), got {config.samples}")
    require(config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size}")
    require(config.speed_rounds >= 1, f"speed_rounds must be >= 1, got {config.speed_rounds}")
    require(config.seed >= 0 and config.judge_seed >= 0,
            f"seed and judge_seed must be >= 0, got {config.seed}, {config.judge_seed}")
    require(config.sampling.steps is None and config.sampling.order is None and config.sampling.schedule is None,
            "sampling.steps, sampling.order and sampling.schedule must be null: each family decodes its own way "
            "(the steps list sets ARPG's steps)")


def bench_families(config: BenchFamiliesConfig) -> dict:
    """Train (or reload) each family, sample and score it; write JSON and a plot, print a table."""
    _validate(config)
    device = resolve_device(config.device)
    judge = digits_judge(config.judge_seed)
    print(f"judge: {judge.held_out_accuracy:.2%} held-out accuracy; noise floor Frechet {judge.noise_floor:.4f}")
    families, models = [], {}
    for label, overrides in config.families.items():
        train_config = compose_config("train", TrainConfig, [*overrides, *config.train_overrides,
                                                             f"out_dir={Path(config.train_root) / label}"])
        trained = train(train_config)
        models[label] = load_model(trained.weights, device=device)
        check_digits_model(models[label])
        families.append({"label": label, "overrides": overrides, "model": train_config.model.name,
                         "parameters": models[label].num_parameters(), "train_steps": trained.total_steps,
                         "train_seconds_this_run": trained.seconds, "config": models[label].config.to_dict()})
    # (family, options) of every row: ARPG at each step count, the others their own way
    settings = [(label, config.sampling.replace(steps=steps)) for label, model in models.items()
                for steps in ([None] if family_of(model).fixed_order else config.steps)]
    results = [_quality(models[label], label, options, config, judge) for label, options in settings]
    for row, seconds in zip(results, _best_seconds(models, settings, config)):
        row["images_per_s"], row["seconds"] = config.samples / seconds, seconds
        print(f"  {row['family']:9s} {row['forward_calls']:3d} forward calls: {row['images_per_s']:.0f} images/s")
    report = {
        "config": dataclasses.asdict(config),
        "families": families,
        "judge": {"held_out_accuracy": judge.held_out_accuracy, "noise_floor_frechet": judge.noise_floor,
                  "feature_dim": judge.feature_dim, "seed": judge.seed},
        "results": results,
        "environment": {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "machine": platform.processor() or platform.machine()},
    }
    _write_report(report, Path(config.output_json), Path(config.output_plot))
    return report


def _quality(model: torch.nn.Module, label: str, options: SamplingOptions, config: BenchFamiliesConfig,
             judge) -> dict:
    forward_calls = decode_plan(model, options, 1, [(1, None)], torch.device("cpu")).num_steps
    tokens, labels = sample_digits(model, config.samples, seed=config.seed, batch_size=config.batch_size,
                                   options=options)
    row = {"family": label, "forward_calls": forward_calls, "accuracy": judge.accuracy(tokens, labels),
           "frechet": judge.frechet(tokens)}
    print(f"  {label:9s} {forward_calls:3d} forward calls: accuracy {row['accuracy']:.3f}, "
          f"Frechet {row['frechet']:.3f}", flush=True)
    return row


def _best_seconds(models: dict, settings: list, config: BenchFamiliesConfig) -> list[float]:
    """Seconds to draw `samples` images for each setting: the best of `speed_rounds` rounds, each
    visiting every setting in turn (after one untimed warm-up round of 2 images)."""
    best = [float("inf")] * len(settings)
    for timed in [False] + [True] * config.speed_rounds:
        for index, (label, options) in enumerate(settings):
            started = time.perf_counter()
            sample_digits(models[label], config.samples if timed else 2, seed=config.seed,
                          batch_size=config.batch_size, options=options)
            if timed:
                best[index] = min(best[index], time.perf_counter() - started)
    return best


def _write_report(report: dict, json_path: Path, plot_path: Path) -> None:
    text = json.dumps(report, indent=1)
    atomic_write(json_path, lambda tmp: tmp.write_text(text))
    _plot(report, plot_path)
    parameters = {f["label"]: f"{f['parameters']:,}" for f in report["families"]}
    rows = [{"family": r["family"], "parameters": parameters[r["family"]], "forward calls": r["forward_calls"],
             "accuracy": r["accuracy"], "frechet": r["frechet"], "images/s": f"{r['images_per_s']:.1f}"}
            for r in report["results"]]
    print()
    print(summary_table(rows))
    trained = ", ".join(f"{f['label']} {f['train_steps']} steps" for f in report["families"])
    print(f"\ntraining: {trained}; judge held-out accuracy {report['judge']['held_out_accuracy']:.4f}; "
          f"Frechet noise floor {report['judge']['noise_floor_frechet']:.4f}")
    print(f"wrote {json_path.resolve()} and {plot_path.resolve()}")


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for index, family in enumerate(report["families"]):
        rows = sorted((r for r in report["results"] if r["family"] == family["label"]),
                      key=lambda r: r["forward_calls"])
        style = "o-" if len(rows) > 1 else "*"
        label = f"{family['label']} ({family['parameters'] / 1e3:.0f}k parameters)"
        for ax, key in zip(axes, ("accuracy", "frechet", "images_per_s")):
            ax.plot([r["forward_calls"] for r in rows], [r[key] for r in rows], style, color=f"C{index}",
                    markersize=6 if len(rows) > 1 else 14, label=label)
    axes[0].axhline(report["judge"]["held_out_accuracy"], color="grey", linestyle=":", label="real held-out digits")
    axes[1].axhline(report["judge"]["noise_floor_frechet"], color="grey", linestyle="--",
                    label="noise floor (real vs real)")
    for ax, ylabel in zip(axes, ("class accuracy of samples", "Frechet distance (judge features)", "images / s")):
        ax.set_xscale("log", base=2)
        if ylabel != "class accuracy of samples":
            ax.set_yscale("log")
        ax.set_xlabel("forward calls per image (decoding steps)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    steps = ", ".join(f"{f['label']} {f['train_steps']}" for f in report["families"])
    fig.suptitle(f"digits: ARPG, LlamaGen and PAR at equal training steps ({steps}); "
                 f"{report['config']['samples']} samples per point, cfg {report['config']['sampling']['cfg']}")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
