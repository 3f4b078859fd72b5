"""Evaluating a sample `.npz` against a reference batch: `EvalConfig`, `evaluate` (scripts/evaluate.py),
`evaluate_npz`, and `summary_table` (the printed results)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from arpg.errors import require
from arpg.eval.inception import FeatureExtractor, InceptionFeatures, extract_features, import_extractor
from arpg.eval.metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from arpg.eval.npz import NpzImages, npz_keys
from arpg.eval.reference import load_reference_stats, resolve_reference_batch
from arpg.runtime import resolve_device


@dataclass
class EvalConfig:
    """Evaluate a sample `.npz` against a reference batch (`arpg/configs/evaluate.yaml` mirrors this)."""
    sample_npz: str = "samples.npz"  # uint8 images (N, H, W, 3) under arr_0, as sample_fid writes
    ref_npz: str = "VIRTUAL_imagenet256_labeled.npz"  # ADM reference batch (this bare name: fetched on first use)
    # "inception" (FID's Inception-v3 from weights_path) or "module:name", a FeatureExtractor
    # importable from Python (a callable, or a class built with no arguments)
    extractor: str = "inception"
    weights_path: str | None = None  # Inception .pth or its folder; None: ~/.cache/arpg/ (fetched on first use)
    device: str = "cpu"
    batch_size: int = 100  # images per Inception forward
    splits: int = 10  # Inception Score splits
    k: int = 3  # neighbourhood size of precision/recall
    compute_precision_recall: bool = True  # needs the reference images (arr_0)


def evaluate(config: EvalConfig) -> dict[str, float]:
    """`evaluate_npz` driven by an `EvalConfig` (the entry point of a Hydra script)."""
    resolve_device(config.device)
    extractor = None if config.extractor == "inception" else import_extractor(config.extractor)
    return evaluate_npz(config.sample_npz, config.ref_npz, config.weights_path, device=config.device,
                        batch_size=config.batch_size, splits=config.splits, k=config.k,
                        compute_precision_recall=config.compute_precision_recall, extractor=extractor)


def evaluate_npz(sample_npz: str | Path, ref_npz: str | Path, weights_path: str | Path | None = None, *,
                 device: str | torch.device = "cpu", batch_size: int = 100, splits: int = 10, k: int = 3,
                 compute_precision_recall: bool = True, extractor: FeatureExtractor | None = None) -> dict[str, float]:
    """FID, Inception Score and precision/recall of the images in `sample_npz` against `ref_npz`.

    FID uses the reference `mu`/`sigma` when the file has them (ADM's are computed over the whole
    ImageNet training set), else statistics of its `arr_0` images. Precision/recall compare the
    sample features with the features of the reference images. `extractor` replaces the Inception
    network built from `weights_path` (for tests or another feature network). Prints a table.
    """
    samples = NpzImages(sample_npz)
    ref_path = resolve_reference_batch(ref_npz)
    ref_keys = set(npz_keys(ref_path))
    has_stats = {"mu", "sigma"} <= ref_keys
    if (compute_precision_recall or not has_stats) and "arr_0" not in ref_keys:
        need = "precision/recall (pass compute_precision_recall=False to skip them)" if has_stats else "FID"
        raise ValueError(f"reference batch {ref_path} has no 'arr_0' images, needed for {need}; "
                         f"its entries are {sorted(ref_keys)}")
    # Validate everything cheap before the long feature extraction starts.
    ref_images = NpzImages(ref_path) if "arr_0" in ref_keys else None
    require(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
    require(1 <= splits <= len(samples),
            f"splits must be in [1, {len(samples)}] (the number of sample images), got {splits}")
    if compute_precision_recall:
        max_k = min(len(samples), len(ref_images)) - 1
        require(1 <= k <= max_k, f"k must be in [1, {max_k}] (one less than the smaller image set), got {k}")
    extractor = extractor if extractor is not None else InceptionFeatures(weights_path, device=device)

    sample_features, sample_probs = extract_features(extractor, samples, batch_size, desc="samples")
    ref_features = None
    if compute_precision_recall or not has_stats:
        ref_features, _ = extract_features(extractor, ref_images, batch_size, desc="reference")
    ref_mu, ref_sigma = load_reference_stats(ref_path) if has_stats else feature_statistics(ref_features)

    is_mean, is_std = inception_score(sample_probs, splits)
    results = {
        "num_samples": len(samples),
        "fid": frechet_distance(*feature_statistics(sample_features), ref_mu, ref_sigma),
        "inception_score": is_mean,
        "inception_score_std": is_std,
    }
    if compute_precision_recall:
        results["precision"], results["recall"] = precision_recall(ref_features, sample_features, k=k, device=device)
    print(summary_table(results))
    return results


def summary_table(rows: Mapping[str, object] | Sequence[Mapping[str, object]]) -> str:
    """A markdown table of one result dict or of several (one row each; columns in first-seen order).

    Floats are shown with 4 decimals, everything else as str; a missing entry is left blank.
    """
    rows = [rows] if isinstance(rows, Mapping) else list(rows)
    if not rows:
        raise ValueError("rows must hold at least one result dict, got none")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_format_cell(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = [columns, ["-" * width for width in widths], *cells]
    return "\n".join("| " + " | ".join(cell.rjust(width) for cell, width in zip(line, widths)) + " |"
                     for line in lines)


def _format_cell(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
