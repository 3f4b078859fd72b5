"""Image features: `InceptionFeatures`, a thin wrapper around torch-fidelity's TF-ported FID
Inception-v3 (an optional dependency: `pip install torch-fidelity`, or `pip install -e '.[eval]'`),
its weights file fetched into ~/.cache/arpg on first use (`arpg.hub.fetch_url`; HF_HUB_OFFLINE=1
never downloads), any other `FeatureExtractor` by name, and `extract_features` over an image set."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from einops import rearrange
from tqdm.auto import tqdm

from arpg.errors import MissingPrerequisites, require
from arpg.eval.npz import NpzImages
from arpg.files import read_torch_file
from arpg.hub import URL_CACHE, fetch_url
from arpg.runtime import tf32

INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILENAME
)
INCEPTION_WEIGHTS_SHA256_PREFIX = "6726825d"  # torch-fidelity's name carries it, as torch.hub's convention
DEFAULT_WEIGHTS_DIR = URL_CACHE
INCEPTION_FEATURE_DIM = 2048
INCEPTION_NUM_CLASSES = 1008  # the 2015 TF graph has 1008 outputs: 1000 ImageNet classes + 8 unused

# images uint8 (B, H, W, 3) -> (pool features (B, D) float64, class probabilities (B, C) float64)
FeatureExtractor = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class InceptionFeatures:
    """TF-compatible FID Inception-v3 (torch-fidelity's port of the 2015-12-05 TF graph).

    `weights_path` is the `.pth` file itself or a folder holding it under its canonical name
    `weights-inception-2015-12-05-6726825d.pth`; default `~/.cache/arpg/`, where it is fetched on
    first use (`resolve_inception_weights`). Calling the object on uint8 images (B, H, W, 3) of any size returns the
    2048-d pool features (B, 2048) and the softmax over the 1008 logits without bias (B, 1008),
    both float64: the features FID and precision/recall use and the predictions IS uses, as in the
    TF reference code. Images are resized to 299x299 inside, bilinearly as TF 1.x does.
    """

    def __init__(self, weights_path: str | Path | None = None, device: str | torch.device = "cpu"):
        problems = []  # every missing prerequisite is reported at once
        try:
            self.weights_path = resolve_inception_weights(weights_path)
            _check_inception_state_dict(self.weights_path)
        except (FileNotFoundError, ValueError) as error:
            problems.append(str(error))
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            problems.append("the torch-fidelity package is not installed: pip install torch-fidelity "
                            "(or, in a clone of this repository, pip install -e '.[eval]')")
        if problems:
            raise MissingPrerequisites("evaluation needs: " + "; and ".join(problems))
        self.device = torch.device(device)
        # An explicit path is what keeps torch-fidelity from fetching its weights from the internet.
        self.network = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(self.weights_path),
        ).to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = torch.as_tensor(np.asarray(images))
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 of shape (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        batch = rearrange(images, "b h w c -> b c h w").contiguous().to(self.device)
        features, logits = self.network(batch)  # (B, 2048), (B, 1008)
        probs = logits.double().softmax(dim=1)
        return features.double().cpu().numpy(), probs.cpu().numpy()


def resolve_inception_weights(weights_path: str | Path | None = None) -> Path:
    """The Inception weights file for `weights_path` (file, folder or None for the default folder).

    None: `~/.cache/arpg/`, downloaded from torch-fidelity's release on first use and checked
    (SHA-256 prefix, state dict); offline and not cached, a FileNotFoundError in one line naming
    the file and its URL. A given file or folder is never downloaded into: it must hold the file.
    """
    if weights_path is None:
        return fetch_url(INCEPTION_WEIGHTS_URL, INCEPTION_WEIGHTS_FILENAME, INCEPTION_WEIGHTS_SHA256_PREFIX,
                         check=_check_inception_state_dict)
    path = Path(weights_path).expanduser()
    if path.is_dir():
        path = path / INCEPTION_WEIGHTS_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"the Inception weights file {path} (not found): the TF-ported FID Inception-v3 weights "
            f"{INCEPTION_WEIGHTS_FILENAME}, published by torch-fidelity at {INCEPTION_WEIGHTS_URL}: put the file "
            f"there, or leave weights_path unset to fetch it into {DEFAULT_WEIGHTS_DIR}")
    return path


def _check_inception_state_dict(path: Path) -> None:
    # torch-fidelity unpickles the file with weights_only=False; reading it with weights_only=True
    # first refuses a file that carries code, and catches a wrong file with a clear message.
    state_dict = read_torch_file(path)
    expected = (INCEPTION_NUM_CLASSES, INCEPTION_FEATURE_DIM)
    fc_weight = state_dict.get("fc.weight") if isinstance(state_dict, dict) else None
    if fc_weight is None or tuple(fc_weight.shape) != expected:
        raise ValueError(f"{path} is not the FID Inception-v3 state dict {INCEPTION_WEIGHTS_FILENAME} "
                         f"(expected an 'fc.weight' of shape {expected})")


def extract_features(extractor: FeatureExtractor, images: np.ndarray | NpzImages, batch_size: int = 100,
                     desc: str = "inception") -> tuple[np.ndarray, np.ndarray]:
    """Run `extractor` over `images` (uint8 (N, H, W, 3) array or `NpzImages`) in batches.

    Returns features (N, D) and class probabilities (N, C), float64.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(images, NpzImages):
        batches = images.batches(batch_size)
    else:
        batches = (images[start:start + batch_size] for start in range(0, len(images), batch_size))
    features, probs = [], []
    # True float32: TF32 convolutions (cuDNN's default) would move the features of a CUDA run.
    with tf32(False), tqdm(total=len(images), desc=desc, unit="img") as progress:
        for batch in batches:
            batch_features, batch_probs = extractor(batch)
            features.append(np.asarray(batch_features, np.float64))
            probs.append(np.asarray(batch_probs, np.float64))
            progress.update(len(batch))
    return np.concatenate(features), np.concatenate(probs)


def import_extractor(spec: str) -> FeatureExtractor:
    """The `FeatureExtractor` named "module:name" (a callable; a class is built with no arguments)."""
    module_name, _, name = spec.partition(":")
    require(bool(module_name and name), f"extractor must be 'inception' or 'module:name', got {spec!r}")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise MissingPrerequisites(f"extractor {spec!r} cannot be imported ({error})") from None
    extractor = found() if isinstance(found, type) else found
    require(callable(extractor), f"extractor {spec!r} is not callable (images -> (features, probabilities))")
    return extractor
