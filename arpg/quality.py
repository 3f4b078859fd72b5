"""Sample quality of digits models: a judge trained on real digits, and steps-vs-quality.

The CPU analogue of the paper's steps-vs-FID table. For the bundled 8x8 digits a token IS a
pixel (grey level 0..16), so samples need no decoder and a small classifier of real digits
stands in for Inception:

* `DigitsJudge` fits an MLP (one hidden layer of 64 ReLU units, pixels / 16 in) on the even-
  indexed half of scikit-learn's 1,797 digits (899 images), and reports its accuracy on the odd
  half (898 held-out images; about 96.7%).
  - `accuracy(tokens, labels)`: how often the judge recognises the requested class.
  - `features(tokens)`: the hidden-layer activations, the analogue of Inception's pool features.
    Units that fire on fewer than 1% of the reference digits are dropped (with seed 0: 5 never
    fire, 1 fires on a single image): their (near-)zero variance makes covariances (near-)
    singular and the matrix square root of the Frechet distance unreliable.
  - `frechet(tokens)`: Frechet distance of the tokens' features to those of the judge's training
    half, the reference set (as FID's reference is ImageNet-train, the set Inception learnt from).
  - `noise_floor`: the same distance for the 898 held-out real digits, which the judge never saw,
    like samples: what a perfect generator scores (up to sample-size effects: 898 images here,
    1,000 samples per setting in the benchmark). Real images the judge was trained on would not
    do: their features sit measurably closer to the reference than unseen images' do.
* `bench_quality` draws class-balanced samples (image i has class i % 10) for every (order,
  steps) and reports accuracy, Frechet distance and images/s as JSON, a markdown table and a plot.

The training run's final class-accuracy check is meant to use the same judge, through
`digits_judge().accuracy(*sample_digits(model, ...))`, so both report one number for one thing.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arpg.checkpoint import WEIGHTS_CHOICES, atomic_write, load_model
from arpg.data import digits_dataset
from arpg.eval import feature_statistics, frechet_distance, summary_table
from arpg.model import ARPG
from arpg.orders import ORDERS, make_plan

DIGITS_LEVELS = 17  # grey levels 0..16: token ids of the digits data
DIGITS_SIDE = 8
DIGITS_CLASSES = 10
JUDGE_HIDDEN_UNITS = 64
JUDGE_MIN_FIRING = 0.01  # a feature unit must fire on at least this fraction of the reference digits


def _as_pixels(tokens: np.ndarray | torch.Tensor) -> np.ndarray:
    """Digit tokens (N, 8, 8) or (N, 64), ints in [0, 16] -> float64 pixels (N, 64) in [0, 1]."""
    array = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if array.ndim not in (2, 3) or array.shape[1:] not in ((DIGITS_SIDE, DIGITS_SIDE), (DIGITS_SIDE ** 2,)):
        raise ValueError(f"tokens must have shape (N, 8, 8) or (N, 64), got {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"tokens must be integers (grey levels 0..16), got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() >= DIGITS_LEVELS):
        raise ValueError(f"tokens must be grey levels in [0, {DIGITS_LEVELS - 1}], "
                         f"got values in [{array.min()}, {array.max()}]")
    return array.reshape(len(array), -1).astype(np.float64) / (DIGITS_LEVELS - 1)


class DigitsJudge:
    """A classifier of real 8x8 digits that scores generated digits (see the module docstring).

    Deterministic for a given `seed` (the MLP's initialisation). Fitting takes a few seconds;
    `digits_judge()` keeps one per seed.
    """

    def __init__(self, seed: int = 0):
        from sklearn.neural_network import MLPClassifier
        from threadpoolctl import threadpool_limits

        digits = digits_dataset()
        tokens, labels = digits.tokens.numpy(), digits.labels.numpy()
        is_reference = np.arange(len(labels)) % 2 == 0
        self.seed = seed
        self.reference_tokens, self.held_out_tokens = tokens[is_reference], tokens[~is_reference]
        self.classifier = MLPClassifier(hidden_layer_sizes=(JUDGE_HIDDEN_UNITS,), max_iter=3000, random_state=seed)
        # One BLAS thread: the matrices are tiny, and threads spinning on shared cores doubled the fit time.
        with threadpool_limits(limits=1):
            self.classifier.fit(_as_pixels(self.reference_tokens), labels[is_reference])
        self.held_out_accuracy = self.accuracy(self.held_out_tokens, labels[~is_reference])
        firing = (self._hidden(_as_pixels(self.reference_tokens)) > 0).mean(axis=0)  # (64,)
        self._active_units = firing >= JUDGE_MIN_FIRING
        self.reference_statistics = feature_statistics(self.features(self.reference_tokens))
        self.noise_floor = self.frechet(self.held_out_tokens)

    def _hidden(self, pixels: np.ndarray) -> np.ndarray:
        weights, bias = self.classifier.coefs_[0], self.classifier.intercepts_[0]
        return np.maximum(pixels @ weights + bias, 0.0)  # (N, 64)

    @property
    def feature_dim(self) -> int:
        return int(self._active_units.sum())

    def predict(self, tokens: np.ndarray | torch.Tensor) -> np.ndarray:
        """The judge's class (N,) for digit tokens (N, 8, 8) or (N, 64)."""
        return self.classifier.predict(_as_pixels(tokens))

    def accuracy(self, tokens: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | list[int]) -> float:
        """Fraction of the digits `tokens` whose class the judge reads as `labels` (N,)."""
        labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        predicted = self.predict(tokens)
        if labels.shape != predicted.shape:
            raise ValueError(f"labels must have shape {predicted.shape} (one per image), got {labels.shape}")
        return float((predicted == labels).mean())

    def features(self, tokens: np.ndarray | torch.Tensor) -> np.ndarray:
        """Hidden-layer activations (N, feature_dim) float64 of digit tokens (N, 8, 8) or (N, 64)."""
        return self._hidden(_as_pixels(tokens))[:, self._active_units]

    def frechet(self, tokens: np.ndarray | torch.Tensor) -> float:
        """Frechet distance between the features of `tokens` (N >= 2) and of the reference half."""
        return frechet_distance(*feature_statistics(self.features(tokens)), *self.reference_statistics)


@lru_cache(maxsize=4)
def digits_judge(seed: int = 0) -> DigitsJudge:
    """The shared `DigitsJudge` for `seed` (fitted once per process)."""
    return DigitsJudge(seed)


def _check_digits_model(model: ARPG) -> None:
    c = model.config
    if (c.block_size, c.vocab_size, c.num_classes) != (DIGITS_SIDE ** 2, DIGITS_LEVELS, DIGITS_CLASSES):
        raise ValueError(f"model must be a digits model (block_size 64, vocab_size 17, num_classes 10), "
                         f"got block_size {c.block_size}, vocab_size {c.vocab_size}, num_classes {c.num_classes}")


@torch.no_grad()
def sample_digits(model: ARPG, num_samples: int, seed: int = 0, batch_size: int = 500,
                  **generate_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced samples of a digits model: tokens (N, 8, 8) and labels (N,), on the CPU.

    Sample i has class i % 10. One generator seeded with `seed` drives the batches in turn, so
    the result depends on (seed, batch_size). `generate_kwargs` go to `arpg.sample.generate`
    (steps, schedule, cfg, order, ...).
    """
    from arpg.sample import generate

    _check_digits_model(model)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model.head.weight.device
    labels = torch.arange(num_samples) % DIGITS_CLASSES
    generator = torch.Generator().manual_seed(seed)
    tokens = [generate(model, batch.to(device), generator=generator, **generate_kwargs).cpu()
              for batch in labels.split(batch_size)]
    return torch.cat(tokens), labels


def digits_class_accuracy(model: ARPG, num_samples: int = 1000, seed: int = 0, batch_size: int = 500,
                          **generate_kwargs: Any) -> float:
    """Fraction of `num_samples` class-balanced samples (`sample_digits`) that the judge reads as
    their requested class; `generate_kwargs` go to `arpg.sample.generate` (steps, cfg, ...)."""
    tokens, labels = sample_digits(model, num_samples, seed=seed, batch_size=batch_size, **generate_kwargs)
    return digits_judge().accuracy(tokens, labels)


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------

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
    # The published sampler's defaults, untempered: the training run's own check (configs/train.yaml
    # `sample`) uses cfg 3.0 too but cosine and temperature 0.7, which flatter few-step samples.
    schedule: str = "arccos"  # the standard schedule of every (order, steps) row
    cfg: float = 3.0
    cfg_schedule: str = "constant"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    batch_size: int = 500
    seed: int = 0  # sampling; every setting uses the same seed (common random numbers)
    judge_seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_json: str = "docs/bench_quality.json"
    output_plot: str = "docs/bench_quality.png"


def _validate(config: BenchQualityConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    need(config.checkpoint == "" or Path(config.checkpoint).is_file(),
         f"checkpoint {config.checkpoint!r} not found; pass a digits model (scripts/train.py writes "
         f"<out_dir>/model.safetensors) or checkpoint='' to train the default one")
    need(config.weights in WEIGHTS_CHOICES, f"weights must be one of {WEIGHTS_CHOICES}, got {config.weights!r}")
    need(config.samples >= 2, f"samples must be >= 2 (a covariance needs two), got {config.samples}")
    need(bool(config.steps) and all(1 <= s <= DIGITS_SIDE ** 2 for s in config.steps),
         f"steps must be a non-empty list of ints in [1, 64], got {config.steps}")
    need(bool(config.orders) and all(o in ORDERS for o in config.orders),
         f"orders must be a non-empty list of names from {sorted(ORDERS)}, got {config.orders}")
    need(config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size}")
    need(config.seed >= 0 and config.judge_seed >= 0,
         f"seed and judge_seed must be >= 0, got {config.seed}, {config.judge_seed}")


def _default_digits_model(train_dir: str, device: torch.device) -> tuple[ARPG, Path]:
    """Train (or finish, or just reload) the default digits recipe of configs/train.yaml in `train_dir`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from arpg.cli import CONFIG_DIR, register_schema, to_dataclass
    from arpg.train import TrainConfig, train

    register_schema("train", TrainConfig)
    overrides = [f"out_dir={train_dir}"]
    if GlobalHydra.instance().is_initialized():  # called from a Hydra script: compose in its context
        train_config = compose("train", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            train_config = compose("train", overrides=overrides)
    result = train(to_dataclass(train_config, TrainConfig))
    return load_model(result.weights, device=device), result.weights


def _settings(config: BenchQualityConfig) -> list[tuple[str, str, int]]:
    """(order, schedule, steps) of every row: each order x steps with the standard schedule, then
    each regions order with its natural schedule."""
    rows = [(order, config.schedule, steps) for order in config.orders for steps in config.steps]
    if config.natural_regions:
        rows += [(order, "regions", make_plan(order, 1, DIGITS_SIDE, DIGITS_SIDE, None, "regions").num_steps)
                 for order in config.orders if order.startswith("regions")]
    return rows


def bench_quality(config: BenchQualityConfig) -> dict:
    """Run the steps x orders benchmark; write JSON and a plot, print a markdown table; return the report."""
    _validate(config)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto"
                          else config.device)
    if config.checkpoint:
        model, checkpoint = load_model(config.checkpoint, weights=config.weights, device=device), Path(config.checkpoint)
    else:
        model, checkpoint = _default_digits_model(config.train_dir, device)
    _check_digits_model(model)
    judge = digits_judge(config.judge_seed)
    print(f"judge: {judge.held_out_accuracy:.2%} held-out accuracy on {len(judge.held_out_tokens)} real digits; "
          f"noise floor (held-out real digits) Frechet {judge.noise_floor:.4f}")

    generate_kwargs = dict(cfg=config.cfg, cfg_schedule=config.cfg_schedule, temperature=config.temperature,
                           top_k=config.top_k, top_p=config.top_p)
    sample_digits(model, 2, steps=1, **generate_kwargs)  # untimed warm-up: first-call overheads
    results = []
    for order, schedule, steps in _settings(config):
        started = time.perf_counter()
        tokens, labels = sample_digits(model, config.samples, seed=config.seed, batch_size=config.batch_size,
                                       order=order, schedule=schedule,
                                       steps=None if schedule == "regions" else steps, **generate_kwargs)
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
        "model": {"checkpoint": str(checkpoint), "parameters": model.num_parameters(),
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
    standard = report["config"]["schedule"]
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
    fig.suptitle(f"digits: sample quality vs steps ({n} samples per point, cfg {report['config']['cfg']})")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
