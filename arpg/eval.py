"""Sample-quality metrics: FID, Inception Score and k-NN precision/recall.

The metric maths (`frechet_distance`, `feature_statistics`, `inception_score`, `precision_recall`)
needs only numpy, scipy and torch. Image features come from `InceptionFeatures`, a thin wrapper
around torch-fidelity's TF-ported FID Inception-v3 (an optional dependency: `pip install
torch-fidelity`, or `pip install -e '.[eval]'` in a clone of this repository), loaded from a
weights file that is fetched into ~/.cache/arpg on first use and checked against the SHA-256 prefix
in its name (`arpg.hub.fetch_url`; HF_HUB_OFFLINE=1 never downloads). ADM's ImageNet 256x256
reference batch is fetched the same way when `ref_npz` names it and no such file exists. Any other
`FeatureExtractor` can stand in for the network (`evaluate_npz(extractor=...)`, or
`extractor=module:name` on the command line).

Image sets are `.npz` files in the layout of ADM's evaluation suite (openai/guided-diffusion):
uint8 images (N, H, W, 3) under `arr_0`; a reference batch may also hold the Inception pool
statistics `mu` (2048,) and `sigma` (2048, 2048). `NpzImages` streams `arr_0` batch by batch, so
50k 256x256 samples (about 10 GB) never have to sit in memory at once.
"""

from __future__ import annotations

import importlib
import math
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from einops import rearrange
from scipy.linalg import sqrtm
from scipy.special import xlogy
from tqdm.auto import tqdm

from arpg.errors import MissingPrerequisites, require
from arpg.files import read_torch_file
from arpg.hub import URL_CACHE, fetch_url
from arpg.runtime import resolve_device, tf32

INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILENAME
)
INCEPTION_WEIGHTS_SHA256_PREFIX = "6726825d"  # torch-fidelity's name carries it, as torch.hub's convention
DEFAULT_WEIGHTS_DIR = URL_CACHE
# ADM's (openai/guided-diffusion) reference batches, by file name; they publish no checksum, so a
# download is checked by its content (`check_reference_batch`)
ADM_REFERENCE_BATCHES = {
    "VIRTUAL_imagenet256_labeled.npz":
        "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
        "VIRTUAL_imagenet256_labeled.npz",
}
INCEPTION_FEATURE_DIM = 2048
INCEPTION_NUM_CLASSES = 1008  # the 2015 TF graph has 1008 outputs: 1000 ImageNet classes + 8 unused

# images uint8 (B, H, W, 3) -> (pool features (B, D) float64, class probabilities (B, C) float64)
FeatureExtractor = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


# ----------------------------------------------------------------------------- metric maths

def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of `features` (N, D), in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must have shape (N, D) with N >= 2, got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    When the matrix square root is not finite (the product is singular, typical for fewer samples
    than feature dimensions) it is retried with `eps` added to both diagonals, with a warning.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.ndim != 1:
        raise ValueError(f"mu1 must be a vector of shape (D,), got {mu1.shape}")
    dim = mu1.shape[0]
    for name, value, shape in (("mu2", mu2, (dim,)), ("sigma1", sigma1, (dim, dim)), ("sigma2", sigma2, (dim, dim))):
        if value.shape != shape:
            raise ValueError(f"{name} must have shape {shape} to match mu1 {mu1.shape}, got {value.shape}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")

    covmean = sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"frechet_distance: sqrtm(sigma1 @ sigma2) is not finite (singular product); "
                      f"adding eps={eps} to the diagonal of both covariances", RuntimeWarning, stacklevel=2)
        offset = eps * np.eye(dim)
        covmean = sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off gives sqrtm of a PSD product a tiny imaginary part; a large one means an input
        # is not a covariance matrix (not symmetric positive semi-definite).
        max_imag = np.abs(np.diagonal(covmean).imag).max()
        if max_imag > 1e-3:
            raise ValueError(f"sigma1 @ sigma2 has a matrix square root with imaginary part {max_imag:.3g} "
                             "(> 1e-3); sigma1 and sigma2 must be symmetric positive semi-definite")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E_x[KL(p(y|x) || p(y))]) of predictive distributions `probs` (N, C).

    The rows are cut into `splits` contiguous chunks (no shuffle, as in ADM's evaluator); p(y) is
    each chunk's mean prediction. Returns the mean and standard deviation over the chunks.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape (N, C), got {probs.shape}")
    if not 1 <= splits <= probs.shape[0]:
        raise ValueError(f"splits must be in [1, {probs.shape[0]}] (the number of rows of probs), got {splits}")
    if (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probs must hold probability rows: non-negative and summing to 1 (atol 1e-3)")
    scores = []
    for chunk in np.array_split(probs, splits):
        marginal = chunk.mean(axis=0, keepdims=True)  # (1, C)
        kl = (xlogy(chunk, chunk) - xlogy(chunk, marginal)).sum(axis=1)  # xlogy: 0 log 0 = 0
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def precision_recall(real_features: np.ndarray | torch.Tensor, fake_features: np.ndarray | torch.Tensor,
                     k: int = 3, batch_size: int = 1000, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float64) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019) with k-NN manifolds.

    Each point's ball has the radius of its k-th nearest neighbour within its own set.
    precision: fraction of fake points inside at least one real ball (sample quality);
    recall: fraction of real points inside at least one fake ball (coverage).
    Distances are computed `batch_size` rows at a time, so memory is O(batch_size * N).
    """
    real = _as_feature_tensor(real_features, "real_features", device, dtype)
    fake = _as_feature_tensor(fake_features, "fake_features", device, dtype)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"fake_features must have {real.shape[1]} columns like real_features, got {fake.shape[1]}")
    max_k = min(len(real), len(fake)) - 1
    if not 1 <= k <= max_k:
        raise ValueError(f"k must be in [1, {max_k}] (one less than the smaller set), got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    real_radii = _knn_radii(real, k, batch_size)  # (N_real,)
    fake_radii = _knn_radii(fake, k, batch_size)  # (N_fake,)
    fake_in_real = torch.empty(len(fake), dtype=torch.bool, device=real.device)
    real_in_fake = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    # One pass over fake-vs-real distances serves both directions.
    for start in range(0, len(fake), batch_size):
        stop = start + batch_size
        dist = torch.cdist(fake[start:stop], real)  # (B, N_real)
        fake_in_real[start:stop] = (dist <= real_radii).any(dim=1)
        real_in_fake |= (dist <= fake_radii[start:stop, None]).any(dim=0)
    return fake_in_real.double().mean().item(), real_in_fake.double().mean().item()


def _as_feature_tensor(features: np.ndarray | torch.Tensor, name: str, device: str | torch.device,
                       dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.as_tensor(features).to(device=device, dtype=dtype)
    if tensor.ndim != 2 or len(tensor) < 2:
        raise ValueError(f"{name} must have shape (N, D) with N >= 2, got {tuple(tensor.shape)}")
    return tensor


def _knn_radii(points: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in `points` (itself excluded)."""
    radii = torch.empty(len(points), dtype=points.dtype, device=points.device)
    for start in range(0, len(points), batch_size):
        dist = torch.cdist(points[start:start + batch_size], points)  # (B, N)
        # The point itself is the nearest at distance 0, so the k-th neighbour is the (k+1)-th value.
        radii[start:start + batch_size] = dist.kthvalue(k + 1, dim=1).values
    return radii


# ----------------------------------------------------------------------------- image files

class NpzImages:
    """The uint8 images (N, H, W, 3) stored under `key` of an `.npz`, read in batches on demand.

    Only the `.npy` header is read on construction, which validates the entry's dtype and shape.
    """

    def __init__(self, path: str | Path, key: str = "arr_0"):
        self.path = _require_file(path, "images .npz")
        self.key = key
        keys = npz_keys(self.path)
        if key not in keys:
            raise ValueError(f"{self.path} has no '{key}' entry (images); its entries are {sorted(keys)}")
        with self._open() as file:
            self.shape, dtype = _read_npy_header(file, f"{self.path}['{key}']")
        if dtype != np.uint8 or len(self.shape) != 4 or self.shape[-1] != 3:
            raise ValueError(f"{self.path}['{key}'] must be uint8 images of shape (N, H, W, 3), "
                             f"got {dtype} {self.shape}")

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yield consecutive uint8 batches (B, H, W, 3), the last one possibly smaller."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        image_bytes = math.prod(self.shape[1:])
        with self._open() as file:
            _read_npy_header(file, f"{self.path}['{self.key}']")
            for start in range(0, len(self), batch_size):
                count = min(batch_size, len(self) - start)
                data = file.read(count * image_bytes)
                if len(data) != count * image_bytes:
                    raise ValueError(f"{self.path}['{self.key}'] is truncated: images {start}..{start + count - 1} "
                                     f"of {len(self)} are incomplete")
                # A writable copy: torch refuses to wrap read-only buffers without a warning.
                yield np.frombuffer(data, dtype=np.uint8).reshape(count, *self.shape[1:]).copy()

    @contextmanager
    def _open(self) -> Iterator[IO[bytes]]:
        with zipfile.ZipFile(self.path) as archive, archive.open(f"{self.key}.npy") as member:
            yield member


def npz_keys(path: str | Path) -> list[str]:
    """The entry names of an `.npz` archive, without loading any array."""
    path = _require_file(path, ".npz")
    try:
        with zipfile.ZipFile(path) as archive:
            return [name.removesuffix(".npy") for name in archive.namelist()]
    except zipfile.BadZipFile as error:
        raise ValueError(f"{path} is not an .npz archive (not a zip file)") from error


def _read_npy_header(file: IO[bytes], what: str) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(file)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read_header is None:
        raise ValueError(f"{what} has .npy format version {version}; supported are 1.0 and 2.0")
    shape, fortran_order, dtype = read_header(file)
    if fortran_order:
        raise ValueError(f"{what} is stored in Fortran order; save it C-contiguous (np.ascontiguousarray)")
    return shape, dtype


def _require_file(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    return path


# ----------------------------------------------------------------------------- features

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


# ----------------------------------------------------------------------------- reference batches

def load_reference_stats(path: str | Path, extractor: FeatureExtractor | None = None,
                         batch_size: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a reference batch `.npz` (e.g. ADM's VIRTUAL_imagenet256_labeled.npz).

    Uses its precomputed `mu`/`sigma` when present; otherwise computes them from its `arr_0`
    images with `extractor` (e.g. `InceptionFeatures(weights_path)`).
    """
    path = _require_file(path, "reference batch")
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
    return _require_file(path, "reference batch")


def check_reference_batch(path: Path) -> None:
    """Raise ValueError unless `path` holds ADM's layout: uint8 images `arr_0` (N, H, W, 3) and the
    Inception statistics `mu` (2048,) and `sigma` (2048, 2048)."""
    NpzImages(path)  # checks arr_0
    with np.load(path) as npz:
        require({"mu", "sigma"} <= set(npz.files) and npz["mu"].shape == (INCEPTION_FEATURE_DIM,)
                and npz["sigma"].shape == (INCEPTION_FEATURE_DIM,) * 2,
                f"{path} is not an ADM reference batch: it needs 'mu' ({INCEPTION_FEATURE_DIM},) and 'sigma' "
                f"({INCEPTION_FEATURE_DIM}, {INCEPTION_FEATURE_DIM})")


# ----------------------------------------------------------------------------- evaluation

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
