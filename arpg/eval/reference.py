"""Reference batches: ADM's ImageNet batch fetched by name on first use and checked, and the
(mu, sigma) FID compares against, precomputed or from the batch's images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from arpg.errors import require
from arpg.eval.inception import INCEPTION_FEATURE_DIM, FeatureExtractor, extract_features
from arpg.eval.metrics import feature_statistics
from arpg.eval.npz import NpzImages, npz_keys, require_file
from arpg.hub import fetch_url

# ADM's (openai/guided-diffusion) reference batches, by file name; they publish no checksum, so a
# download is checked by its content (`check_reference_batch`)
ADM_REFERENCE_BATCHES = {
    "VIRTUAL_imagenet256_labeled.npz":
        "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
        "VIRTUAL_imagenet256_labeled.npz",
}


def load_reference_stats(path: str | Path, extractor: FeatureExtractor | None = None,
                         batch_size: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a reference batch `.npz` (e.g. ADM's VIRTUAL_imagenet256_labeled.npz).

    Uses its precomputed `mu`/`sigma` when present; otherwise computes them from its `arr_0`
    images with `extractor` (e.g. `InceptionFeatures(weights_path)`).
    """
    path = require_file(path, "reference batch")
    keys = npz_keys(path)
    if {"mu", "sigma"} <= set(keys):
        with np.load(path) as npz:
            return npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
    if "arr_0" not in keys:
        raise ValueError(f"reference batch {path} has neither 'mu'/'sigma' statistics nor 'arr_0' images; "
                         f"its entries are {sorted(keys)}")
    if extractor is None:
        raise ValueError(f"reference batch {path} has no 'mu'/'sigma'; computing them from its 'arr_0' images "
                         "needs an extractor, e.g. extractor=InceptionFeatures(weights_path)")
    features, _ = extract_features(extractor, NpzImages(path), batch_size, desc="reference")
    return feature_statistics(features)


def resolve_reference_batch(ref_npz: str | Path) -> Path:
    """The reference batch file: `ref_npz` where it exists; a bare name of `ADM_REFERENCE_BATCHES`
    that does not exist is fetched into ~/.cache/arpg on first use (`arpg.hub.fetch_url`)."""
    path = Path(ref_npz).expanduser()
    if not path.is_file() and str(ref_npz) in ADM_REFERENCE_BATCHES:
        return fetch_url(ADM_REFERENCE_BATCHES[str(ref_npz)], str(ref_npz), check=check_reference_batch)
    return require_file(path, "reference batch")


def check_reference_batch(path: Path) -> None:
    """Raise ValueError unless `path` holds ADM's layout: uint8 images `arr_0` (N, H, W, 3) and the
    Inception statistics `mu` (2048,) and `sigma` (2048, 2048)."""
    NpzImages(path)  # checks arr_0
    with np.load(path) as npz:
        require({"mu", "sigma"} <= set(npz.files) and npz["mu"].shape == (INCEPTION_FEATURE_DIM,)
                and npz["sigma"].shape == (INCEPTION_FEATURE_DIM,) * 2,
                f"{path} is not an ADM reference batch: it needs 'mu' ({INCEPTION_FEATURE_DIM},) and 'sigma' "
                f"({INCEPTION_FEATURE_DIM}, {INCEPTION_FEATURE_DIM})")
