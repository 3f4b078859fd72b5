"""Metric maths against closed forms, the .npz readers, and the error paths of the Inception loader.

The real Inception network is not run here (its weights are not shipped); `evaluate_npz` is
exercised end to end with a small deterministic feature extractor instead.
"""

from __future__ import annotations

import math
import re
import sys

import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm

from arpg.cli import compose_config
from arpg.errors import MissingPrerequisites
from arpg.eval import (
    INCEPTION_WEIGHTS_FILENAME,
    EvalConfig,
    InceptionFeatures,
    NpzImages,
    evaluate,
    evaluate_npz,
    extract_features,
    feature_statistics,
    frechet_distance,
    inception_score,
    load_reference_stats,
    precision_recall,
    summary_table,
)


def _pixel_extractor(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stand-in for Inception: the first 8 pixel values as features, a softmax over 4 of them as probs."""
    features = images.reshape(len(images), -1)[:, :8].astype(np.float64)  # (B, 8)
    logits = features[:, :4] / 64.0
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return features, probs / probs.sum(axis=1, keepdims=True)


def _random_images(n: int, seed: int, size: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _random_covariance(rng: np.random.Generator, dim: int) -> np.ndarray:
    factor = rng.normal(size=(dim, dim))
    return factor @ factor.T + 0.1 * np.eye(dim)


def _reference_frechet(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """The Frechet distance written out from its definition, without the project's code: tr (s1 s2)^(1/2)
    is the sum of the square roots of the eigenvalues of s1 s2 (real and >= 0: s1 s2 is similar to
    the PSD s1^(1/2) s2 s1^(1/2))."""
    eigenvalues = np.linalg.eigvals(s1 @ s2).real.clip(min=0)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eigenvalues).sum())


def _reference_fid(x: np.ndarray, y: np.ndarray) -> float:
    """FID of feature sets (N, D) from the definition: means and unbiased (N - 1) covariances."""
    mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
    s_x = (x - mu_x).T @ (x - mu_x) / (len(x) - 1)
    s_y = (y - mu_y).T @ (y - mu_y) / (len(y) - 1)
    return _reference_frechet(mu_x, s_x, mu_y, s_y)


def _reference_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """k-NN precision and recall (Kynkaanniemi et al.) by brute force over all pairs, without the project's code."""
    def radii(points):  # distance to the k-th nearest other point: column k of the sorted distances (0 is itself)
        return np.sort(np.linalg.norm(points[:, None] - points[None], axis=-1), axis=1)[:, k]

    between = np.linalg.norm(fake[:, None] - real[None], axis=-1)  # (N_fake, N_real)
    precision = (between <= radii(real)[None, :]).any(axis=1).mean()
    recall = (between <= radii(fake)[:, None]).any(axis=0).mean()
    return float(precision), float(recall)


# Four 2-D points whose statistics are worked out by hand: mean (1.5, 1.5); deviations (-1.5, -1.5),
# (-0.5, 0.5), (0.5, -0.5), (1.5, 1.5); sums of products 5 (each variance) and 4 (the covariance), so
# the unbiased covariance is [[5, 4], [4, 5]] / 3 (the biased one, / 4, would be [[5/4, 1], [1, 5/4]]).
HAND_POINTS = np.array([[0.0, 0.0], [1.0, 2.0], [2.0, 1.0], [3.0, 3.0]])
HAND_SIGMA = np.array([[5.0, 4.0], [4.0, 5.0]]) / 3


# ----------------------------------------------------------------------------- Frechet distance

def test_frechet_distance_of_identical_statistics_is_zero():
    features = np.random.default_rng(0).normal(size=(500, 32))
    mu, sigma = feature_statistics(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3.0, size=16), rng.uniform(0.1, 3.0, size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_feature_statistics_are_the_unbiased_sample_statistics_worked_by_hand():
    mu, sigma = feature_statistics(HAND_POINTS)
    np.testing.assert_allclose(mu, [1.5, 1.5], rtol=1e-15)
    np.testing.assert_allclose(sigma, HAND_SIGMA, rtol=1e-14)


def test_frechet_distance_of_small_sets_worked_by_hand():
    # y = 2 x + (1, 0): mean (4, 3), covariance 4 S with S = HAND_SIGMA, and (S 4S)^(1/2) = 2S. So
    # FID = |(2.5, 1.5)|^2 + tr(S + 4S - 4S) = 8.5 + tr S = 8.5 + 10/3 = 71/6 (biased covariances: 11).
    x = HAND_POINTS
    y = 2 * x + np.array([1.0, 0.0])
    assert frechet_distance(*feature_statistics(x), *feature_statistics(y)) == pytest.approx(71 / 6, rel=1e-12)
    assert _reference_fid(x, y) == pytest.approx(71 / 6, rel=1e-12)  # the test's own helper, checked too


def test_frechet_distance_matches_the_closed_form_for_two_non_commuting_gaussians():
    # For a 2x2 matrix M with eigenvalues l1, l2 >= 0, tr M^(1/2) = sqrt(l1) + sqrt(l2)
    # = sqrt(tr M + 2 sqrt(det M)). With s1 = [[2, 1], [1, 2]], s2 = diag(1, 4): s1 s2 = [[2, 4], [1, 8]],
    # tr 10, det 3 * 4 = 12; means (0, 0) and (1, 2).
    s1, s2 = np.array([[2.0, 1.0], [1.0, 2.0]]), np.diag([1.0, 4.0])
    expected = (1 + 4) + (4 + 5) - 2 * math.sqrt(10 + 2 * math.sqrt(12))  # 5.77122...
    assert frechet_distance(np.zeros(2), s1, np.array([1.0, 2.0]), s2) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_is_symmetric():
    rng = np.random.default_rng(2)
    a = (rng.normal(size=12), _random_covariance(rng, 12))
    b = (rng.normal(size=12), _random_covariance(rng, 12))
    forward, backward = frechet_distance(*a, *b), frechet_distance(*b, *a)
    assert forward > 1.0
    assert forward == pytest.approx(backward, rel=1e-8)


def _singular_retry_reference(x: np.ndarray, y: np.ndarray, eps: float) -> float:
    """tr ((x x^T + eps I)(y y^T + eps I))^(1/2) for 3-vectors x, y, worked by hand: the product maps
    z orthogonal to x and y to eps^2 z (a root eps), and the plane of x and y into itself, where it has
    trace T = (x.y)^2 + eps (|x|^2 + |y|^2) + 2 eps^2 and determinant D = det / eps^2
    = eps^2 (|x|^2 + eps)(|y|^2 + eps): roots summing to sqrt(T + 2 sqrt(D))."""
    xx, yy, xy = x @ x, y @ y, x @ y
    plane_trace = xy ** 2 + eps * (xx + yy) + 2 * eps ** 2
    plane_det = eps ** 2 * (xx + eps) * (yy + eps)
    return eps + math.sqrt(plane_trace + 2 * math.sqrt(plane_det))


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # scipy's own notice of the singular product
@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_frechet_distance_singular_covariances_follow_the_reference_retry(eps):
    # Rank-1 covariances x x^T and y y^T: sqrtm of their product is not finite with scipy's Schur
    # method, which triggers the retry. pytorch-fid's (and torch-fidelity's) retry adds eps to both
    # diagonals before the product, sqrtm((s1 + eps I)(s2 + eps I)), and keeps tr s1 + tr s2 unchanged.
    x, y = np.array([0.0, -1.0, 2.0]), np.array([-1.0, -1.0, 1.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, 0.0])
    with pytest.warns(RuntimeWarning, match="eps"):
        distance = frechet_distance(mu1, np.outer(x, x), mu2, np.outer(y, y), eps=eps)
    expected = 1.0 + x @ x + y @ y - 2 * _singular_retry_reference(x, y, eps)
    assert distance == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_frechet_distance_retry_formula_on_a_forced_retry(monkeypatch):
    # Whatever scipy's sqrtm does with singular products, the retry itself must compute
    # tr s1 + tr s2 - 2 tr ((s1 + eps I)(s2 + eps I))^(1/2): force it by failing the first sqrtm.
    # s1 + I/2 = [[2.5, 1], [1, 2.5]], s2 + I/2 = diag(1.5, 4.5); their product has trace
    # 2.5 * 1.5 + 2.5 * 4.5 = 15 and determinant 5.25 * 6.75 = 35.4375 (2x2 rule as above).
    import arpg.eval.metrics

    calls = []

    def first_fails(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else sqrtm(matrix)

    monkeypatch.setattr(arpg.eval.metrics, "sqrtm", first_fails)
    s1, s2 = np.array([[2.0, 1.0], [1.0, 2.0]]), np.diag([1.0, 4.0])
    with pytest.warns(RuntimeWarning, match="eps=0.5"):
        distance = frechet_distance(np.zeros(2), s1, np.array([1.0, 2.0]), s2, eps=0.5)
    assert len(calls) == 2
    assert distance == pytest.approx(5 + 4 + 5 - 2 * math.sqrt(15 + 2 * math.sqrt(35.4375)), rel=1e-12)


def test_frechet_distance_rejects_large_imaginary_part():
    # diag(-1, 1) is not a covariance: sqrt of the product has an imaginary unit on the diagonal.
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))


@pytest.mark.parametrize("bad, name", [("mu2", "mu2"), ("sigma1", "sigma1"), ("sigma2", "sigma2")])
def test_frechet_distance_validates_shapes(bad, name):
    args = {"mu1": np.zeros(4), "sigma1": np.eye(4), "mu2": np.zeros(4), "sigma2": np.eye(4)}
    args[bad] = np.zeros(3) if bad.startswith("mu") else np.eye(3)
    with pytest.raises(ValueError, match=name):
        frechet_distance(**args)


# ----------------------------------------------------------------------------- Inception Score

def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(np.full((200, 10), 0.1))
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_uniformly_spread_predictions_is_class_count():
    num_classes = 25
    probs = np.eye(num_classes)[np.arange(10 * 4 * num_classes) % num_classes]  # every split sees each class 4x
    mean, std = inception_score(probs, splits=10)
    assert mean == pytest.approx(num_classes, rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_of_soft_predictions_is_exp_of_entropy_gap():
    # Each row puts 0.9 on its class and spreads 0.1 evenly; classes are balanced, so
    # p(y) is uniform and IS = exp(log C - H(row)).
    num_classes, confident = 8, 0.9
    row = np.full(num_classes, (1 - confident) / (num_classes - 1))
    rows = np.stack([np.roll(row, c) for c in range(num_classes)])
    rows[np.arange(num_classes), np.arange(num_classes)] = confident
    probs = np.tile(rows, (10, 1))
    entropy = -np.sum(rows[0] * np.log(rows[0]))
    mean, _ = inception_score(probs, splits=5)
    assert mean == pytest.approx(np.exp(np.log(num_classes) - entropy), rel=1e-12)


def test_inception_score_validates_input():
    with pytest.raises(ValueError, match="probs"):
        inception_score(np.full((20, 4), 0.3))
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.full((5, 4), 0.25), splits=6)


# ----------------------------------------------------------------------------- precision / recall

def test_precision_recall_of_a_set_against_itself_is_one():
    real = np.random.default_rng(3).normal(size=(300, 16))
    assert precision_recall(real, real, k=3, batch_size=64) == (1.0, 1.0)


def test_precision_recall_against_far_shifted_copy_is_zero():
    real = np.random.default_rng(4).normal(size=(300, 16))
    assert precision_recall(real, real + 100.0, k=3, batch_size=64) == (0.0, 0.0)


def test_precision_recall_half_covered_and_batch_independent():
    # Fake = an exact copy of real plus as many far-away points: half the fakes are real-looking
    # (precision 0.5) and every real point has its copy among the fakes (recall 1).
    rng = np.random.default_rng(5)
    real = rng.normal(size=(200, 8))
    fake = np.concatenate([real, rng.normal(size=(200, 8)) + 50.0])
    assert precision_recall(real, fake, k=5, batch_size=7) == (0.5, 1.0)
    # Batching changes only memory, never the answer.
    other = rng.normal(size=(250, 8)) * 1.3 + 0.4
    assert precision_recall(real, other, batch_size=9) == precision_recall(real, other, batch_size=1000)


@pytest.mark.parametrize("k, expected", [(1, (0.5, 0.75)), (2, (0.75, 1.0))])
def test_precision_recall_of_points_on_a_line_worked_by_hand(k, expected):
    # real 0, 1, 3, 7: radii of the 1st neighbour 1, 1, 2, 4; of the 2nd 3, 2, 3, 6.
    # fake 0.5, 2.5, 12, 13.5: radii of the 1st neighbour 2, 2, 1.5, 1.5; of the 2nd 11.5, 9.5, 9.5, 11.
    # k = 1: 0.5 and 2.5 lie in real balls, 12 (5 from 7) and 13.5 do not: precision 1/2; real 0, 1
    # and 3 lie within 2 of a fake, 7 (4.5 from 2.5, 5 from 12) does not: recall 3/4.
    # k = 2: 12 is now inside the ball of 7 (radius 6), 13.5 (6.5 away) still not: 3/4; every real
    # point is within 11.5 of 0.5: recall 1. No distance equals a radius, so rounding cannot tip one.
    real = np.array([[0.0], [1.0], [3.0], [7.0]])
    fake = np.array([[0.5], [2.5], [12.0], [13.5]])
    assert precision_recall(real, fake, k=k, batch_size=3) == expected
    assert _reference_precision_recall(real, fake, k) == expected  # the test's own helper, checked too


def test_precision_recall_validates_input():
    real = np.zeros((10, 4))
    with pytest.raises(ValueError, match="k must be in"):
        precision_recall(real, real, k=10)
    with pytest.raises(ValueError, match="fake_features"):
        precision_recall(real, np.zeros((10, 5)))


# ----------------------------------------------------------------------------- .npz readers

@pytest.mark.parametrize("compressed", [False, True])
def test_npz_images_stream_the_exact_array(tmp_path, compressed):
    images = _random_images(23, seed=6)
    path = tmp_path / "samples.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr_0=images, arr_1=np.arange(23))
    reader = NpzImages(path)
    batches = list(reader.batches(5))
    assert len(reader) == 23
    assert [len(batch) for batch in batches] == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(np.concatenate(batches), images)


def test_npz_images_rejects_non_image_arrays(tmp_path):
    path = tmp_path / "floats.npz"
    np.savez(path, arr_0=np.zeros((4, 6, 6, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        NpzImages(path)


def test_extract_features_batches_match_one_call():
    images = _random_images(37, seed=7)
    features, probs = extract_features(_pixel_extractor, images, batch_size=10)
    expected_features, expected_probs = _pixel_extractor(images)
    np.testing.assert_array_equal(features, expected_features)
    np.testing.assert_allclose(probs, expected_probs, rtol=1e-12)


def test_reference_stats_round_trip(tmp_path):
    rng = np.random.default_rng(8)
    mu, sigma = rng.normal(size=6).astype(np.float32), _random_covariance(rng, 6)
    path = tmp_path / "ref.npz"
    np.savez(path, mu=mu, sigma=sigma, arr_0=_random_images(4, seed=8))
    loaded_mu, loaded_sigma = load_reference_stats(path)
    assert loaded_mu.dtype == loaded_sigma.dtype == np.float64
    np.testing.assert_array_equal(loaded_mu, mu.astype(np.float64))
    np.testing.assert_array_equal(loaded_sigma, sigma)


def test_reference_stats_from_images_use_the_extractor(tmp_path):
    images = _random_images(40, seed=9)
    path = tmp_path / "ref_images.npz"
    np.savez(path, arr_0=images)
    mu, sigma = load_reference_stats(path, extractor=_pixel_extractor, batch_size=16)
    features = _pixel_extractor(images)[0]
    expected_mu = features.mean(axis=0)
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, (features - expected_mu).T @ (features - expected_mu) / 39, rtol=1e-12)
    with pytest.raises(ValueError, match="extractor"):
        load_reference_stats(path)


def test_reference_stats_missing_file_names_it(tmp_path):
    path = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    with pytest.raises(FileNotFoundError, match="VIRTUAL_imagenet256_labeled.npz"):
        load_reference_stats(path)


def test_reference_stats_without_stats_or_images_names_the_file(tmp_path):
    path = tmp_path / "labels_only.npz"
    np.savez(path, arr_1=np.arange(3))
    with pytest.raises(ValueError, match=r"labels_only\.npz.*neither"):
        load_reference_stats(path, extractor=_pixel_extractor)


# ----------------------------------------------------------------------------- Inception loader

def test_missing_inception_weights_name_the_needed_file(tmp_path):
    given = tmp_path / "inception.pth"
    with pytest.raises(MissingPrerequisites) as error:
        InceptionFeatures(given)
    assert str(given) in str(error.value)
    assert INCEPTION_WEIGHTS_FILENAME in str(error.value)


def test_inception_weights_folder_and_default_location(tmp_path, monkeypatch):
    with pytest.raises(MissingPrerequisites, match=str(tmp_path / INCEPTION_WEIGHTS_FILENAME)):
        InceptionFeatures(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the default location is fetched into, except offline
    with pytest.raises(MissingPrerequisites, match=str(tmp_path / ".cache" / "arpg" / INCEPTION_WEIGHTS_FILENAME)):
        InceptionFeatures()


def test_wrong_weights_file_is_rejected_before_loading(tmp_path):
    path = tmp_path / INCEPTION_WEIGHTS_FILENAME
    torch.save({"fc.weight": torch.zeros(10, 20)}, path)
    with pytest.raises(ValueError, match="not the FID Inception-v3 state dict"):
        InceptionFeatures(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch file"):
        InceptionFeatures(path)


def _without_torch_fidelity(monkeypatch):
    # A None entry in sys.modules makes `import` raise ImportError, as if the package were absent.
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)


def test_missing_torch_fidelity_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / INCEPTION_WEIGHTS_FILENAME
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, path)
    _without_torch_fidelity(monkeypatch)
    # `arpg` is not on PyPI: the hint names the package itself, or the extra of a clone.
    with pytest.raises(MissingPrerequisites, match=r"pip install torch-fidelity \(or, in a clone of this "
                                                   r"repository, pip install -e '\.\[eval\]'\)"):
        InceptionFeatures(path)


def test_every_missing_prerequisite_is_reported_together(tmp_path, monkeypatch):
    _without_torch_fidelity(monkeypatch)
    with pytest.raises(MissingPrerequisites) as error:
        InceptionFeatures(tmp_path / "w.pth")
    message = str(error.value)
    assert str(tmp_path / "w.pth") in message and "torch-fidelity package is not installed" in message
    assert "\n" not in message


def test_evaluate_config_reports_missing_weights(tmp_path):
    samples, ref = tmp_path / "samples.npz", tmp_path / "ref.npz"
    np.savez(samples, arr_0=_random_images(8, seed=10))
    np.savez(ref, arr_0=_random_images(8, seed=11))
    config = EvalConfig(sample_npz=str(samples), ref_npz=str(ref), weights_path=str(tmp_path / "w.pth"), splits=2)
    with pytest.raises(MissingPrerequisites, match=INCEPTION_WEIGHTS_FILENAME):
        evaluate(config)


@pytest.mark.parametrize("settings, message", [
    (dict(k=0), "k must be in [1, 7]"), (dict(k=9), "k must be in [1, 7]"),
    (dict(splits=0), "splits must be in [1, 8]"), (dict(splits=9), "splits must be in [1, 8]"),
    (dict(batch_size=0), "batch_size must be >= 1"), (dict(device="tpu"), "device must be"),
    (dict(extractor="pixels"), "extractor must be 'inception' or 'module:name'"),
    (dict(extractor="no_such_module:f"), "extractor 'no_such_module:f' cannot be imported"),
])
def test_evaluate_rejects_bad_settings_before_extracting_features(tmp_path, monkeypatch, settings, message):
    samples, ref = tmp_path / "samples.npz", tmp_path / "ref.npz"
    np.savez(samples, arr_0=_random_images(8, seed=10))
    np.savez(ref, arr_0=_random_images(9, seed=11))
    calls = []
    monkeypatch.setattr("arpg.eval.evaluation.extract_features", lambda *args, **kwargs: calls.append(args))
    config = EvalConfig(sample_npz=str(samples), ref_npz=str(ref),
                        **{"extractor": "test_eval:_pixel_extractor", "splits": 2, **settings})
    with pytest.raises(ValueError, match=re.escape(message)):
        evaluate(config)
    assert not calls


def test_evaluate_with_another_extractor_named_on_the_command_line(tmp_path):
    samples, ref = tmp_path / "samples.npz", tmp_path / "ref.npz"
    np.savez(samples, arr_0=_random_images(30, seed=15))
    np.savez(ref, arr_0=_random_images(30, seed=16))
    config = compose_config("evaluate", EvalConfig, [f"sample_npz={samples}", f"ref_npz={ref}", "splits=3",
                                                     "extractor=test_eval:_pixel_extractor"])
    by_name = evaluate(config)
    assert by_name == evaluate_npz(samples, ref, extractor=_pixel_extractor, splits=3)


# ----------------------------------------------------------------------------- evaluate_npz

def test_evaluate_npz_samples_equal_to_reference(tmp_path, capsys):
    # The reference file holds the same images in another order: the statistics and the k-NN balls
    # do not depend on the order, so FID is 0 and precision = recall = 1.
    images = _random_images(120, seed=12)
    samples, ref = tmp_path / "samples.npz", tmp_path / "ref.npz"
    np.savez(samples, arr_0=images)
    np.savez(ref, arr_0=images[np.random.default_rng(0).permutation(120)])
    results = evaluate_npz(samples, ref, extractor=_pixel_extractor, batch_size=32, splits=4)
    assert results["num_samples"] == 120
    assert abs(results["fid"]) < 1e-6
    assert (results["precision"], results["recall"]) == (1.0, 1.0)
    assert results["inception_score"] == pytest.approx(inception_score(_pixel_extractor(images)[1], 4)[0])
    header = capsys.readouterr().out.splitlines()[0]
    assert [cell.strip() for cell in header.strip("|").split("|")] == [
        "num_samples", "fid", "inception_score", "inception_score_std", "precision", "recall"]


def test_evaluate_npz_equals_the_metrics_of_both_files_computed_directly(tmp_path):
    # Two different sets (the reference brighter): every number must be the metric of the right file.
    sample_images, ref_images = _random_images(50, seed=17), _random_images(60, seed=18) // 2 + 100
    samples, ref = tmp_path / "samples.npz", tmp_path / "ref.npz"
    np.savez(samples, arr_0=sample_images)
    np.savez(ref, arr_0=ref_images)
    results = evaluate_npz(samples, ref, extractor=_pixel_extractor, batch_size=16, splits=5, k=4)
    sample_features, sample_probs = _pixel_extractor(sample_images)
    ref_features, _ = _pixel_extractor(ref_images)
    expected_fid = _reference_fid(sample_features, ref_features)
    assert expected_fid > 100 and results["fid"] == pytest.approx(expected_fid, rel=1e-9)
    precision, recall = _reference_precision_recall(ref_features, sample_features, k=4)
    assert precision != recall  # so that swapping the two sets would show
    assert (results["precision"], results["recall"]) == (precision, recall)
    assert results["inception_score"] == pytest.approx(inception_score(sample_probs, 5)[0], rel=1e-12)
    assert results["num_samples"] == 50


def _first_pixel_extractor(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One feature, the first pixel's red value; uniform predictions over 4 classes."""
    return images[:, 0, 0, :1].astype(np.float64), np.full((len(images), 4), 0.25)


@pytest.mark.parametrize("k, precision, recall", [(1, 0.5, 0.75), (2, 0.75, 1.0)])
def test_evaluate_npz_of_small_sets_worked_by_hand(tmp_path, k, precision, recall):
    # The points of test_precision_recall_of_points_on_a_line_worked_by_hand, doubled into grey levels:
    # reference 0, 2, 6, 14 and samples 1, 5, 24, 27 (k-NN balls do not change with the scale).
    # In one dimension FID = (m1 - m2)^2 + (s1 - s2)^2: means 22/4 and 57/4; squared deviations from
    # them sum to 115 (reference) and 518.75 (samples), unbiased variances 115/3 and 518.75/3.
    def images(values):
        return np.repeat(np.array(values, dtype=np.uint8)[:, None, None, None], 3, axis=3)  # (N, 1, 1, 3)

    samples, ref = tmp_path / "samples.npz", tmp_path / "ref.npz"
    np.savez(samples, arr_0=images([1, 5, 24, 27]))
    np.savez(ref, arr_0=images([0, 2, 6, 14]))
    results = evaluate_npz(samples, ref, extractor=_first_pixel_extractor, batch_size=3, splits=2, k=k)
    expected_fid = (57 / 4 - 22 / 4) ** 2 + (math.sqrt(518.75 / 3) - math.sqrt(115 / 3)) ** 2  # 124.98...
    assert results["fid"] == pytest.approx(expected_fid, rel=1e-12)
    assert (results["precision"], results["recall"]) == (precision, recall)
    assert results["inception_score"] == pytest.approx(1.0, abs=1e-12)  # uniform predictions


def test_evaluate_npz_uses_reference_statistics(tmp_path):
    samples, ref = tmp_path / "samples.npz", tmp_path / "ref.npz"
    images = _random_images(60, seed=13)
    np.savez(samples, arr_0=images)
    rng = np.random.default_rng(14)
    mu, sigma = rng.normal(size=8) * 50 + 128, _random_covariance(rng, 8) * 100
    np.savez(ref, mu=mu, sigma=sigma)  # statistics only, as for a precomputed FID reference
    with pytest.raises(ValueError, match=r"ref\.npz.*arr_0.*compute_precision_recall=False"):
        evaluate_npz(samples, ref, extractor=_pixel_extractor)
    results = evaluate_npz(samples, ref, extractor=_pixel_extractor, compute_precision_recall=False, splits=2)
    features = _pixel_extractor(images)[0]
    mu_samples = features.mean(axis=0)
    sigma_samples = (features - mu_samples).T @ (features - mu_samples) / (len(features) - 1)
    assert results["fid"] == pytest.approx(_reference_frechet(mu_samples, sigma_samples, mu, sigma), rel=1e-9)
    assert "precision" not in results


def test_summary_table_rows_and_formatting():
    table = summary_table([{"steps": 64, "fid": 1.23456}, {"steps": 32, "fid": 2.0, "recall": 0.5}])
    lines = table.splitlines()
    assert len(lines) == 4
    assert [cell.strip() for cell in lines[0].strip("|").split("|")] == ["steps", "fid", "recall"]
    assert [cell.strip() for cell in lines[2].strip("|").split("|")] == ["64", "1.2346", ""]
    assert [cell.strip() for cell in lines[3].strip("|").split("|")] == ["32", "2.0000", "0.5000"]
    assert summary_table({"fid": 3.0}).splitlines()[2].strip("| ") == "3.0000"
