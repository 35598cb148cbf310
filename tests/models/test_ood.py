"""The Mahalanobis out-of-distribution detector: fit, score, and its checkpointed state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mnv3.models import mobilenet_v3_small
from mnv3.models.ood import (
    fit_class_gaussians,
    ledoit_wolf_covariance,
    mahalanobis_distances,
    mahalanobis_score,
    pooled_features,
)
from mnv3.tasks.classifier_callbacks import MahalanobisCalibration


def _two_gaussians(n: int = 400, dim: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes with means at -3 and +3 on the first axis and one shared, non-diagonal
    covariance (``A A^T``)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / dim**0.5
    mixing += torch.eye(dim, dtype=torch.float64)
    labels = torch.arange(n) % 2
    centres = torch.zeros(2, dim, dtype=torch.float64)
    centres[:, 0] = torch.tensor([-3.0, 3.0])
    noise = torch.randn(n, dim, generator=generator, dtype=torch.float64) @ mixing.T
    return centres[labels] + noise, labels


def _numpy_reference(features: np.ndarray, labels: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Lee et al.'s score written independently: class means, Ledoit-Wolf tied covariance
    (the 2004 paper's formulas, loops over samples), numpy's inverse, min over classes."""
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(axis=0) for c in classes])
    centred = features - means[np.searchsorted(classes, labels)]
    n, dim = centred.shape
    sample = sum(np.outer(x, x) for x in centred) / n
    mu = np.trace(sample) / dim
    d2 = np.sum((sample - mu * np.eye(dim)) ** 2) / dim
    b2 = sum(np.sum((np.outer(x, x) - sample) ** 2) / dim for x in centred) / n**2
    shrinkage = min(b2, d2) / d2
    covariance = (1 - shrinkage) * sample + shrinkage * mu * np.eye(dim)
    covariance += 1e-6 * np.trace(covariance) / dim * np.eye(dim)  # fit_class_gaussians' ridge
    precision = np.linalg.inv(covariance)
    distances = [[(q - m) @ precision @ (q - m) for m in means] for q in queries]
    return -np.min(np.array(distances), axis=1)


def test_score_equals_an_independent_numpy_computation() -> None:
    features, labels = _two_gaussians(n=60, dim=5)
    fitted = fit_class_gaussians(features, labels)
    queries = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = _numpy_reference(features.numpy(), labels.numpy(), queries.numpy())
    got = mahalanobis_score(queries, fitted["means"], fitted["precision"])
    # The stored means and precision are float32: agreement to float32 rounding.
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_ledoit_wolf_matches_scikit_learn() -> None:
    sklearn_covariance = pytest.importorskip("sklearn.covariance")
    features = torch.randn(30, 50, dtype=torch.float64)  # fewer samples than dimensions
    centred = features - features.mean(dim=0)
    covariance, shrinkage = ledoit_wolf_covariance(centred)
    expected, expected_shrinkage = sklearn_covariance.ledoit_wolf(
        centred.numpy(), assume_centered=True
    )
    assert shrinkage == pytest.approx(expected_shrinkage, rel=1e-10)
    np.testing.assert_allclose(covariance.numpy(), expected, atol=1e-12)
    assert torch.linalg.eigvalsh(covariance).min() > 0  # invertible although 30 < 50


def test_class_means_score_zero_and_far_points_score_worse() -> None:
    features, labels = _two_gaussians()
    fitted = fit_class_gaussians(features, labels)
    means, precision = fitted["means"], fitted["precision"]
    assert fitted["classes"].tolist() == [0, 1]
    np.testing.assert_allclose(means[:, 0].numpy(), [-3.0, 3.0], atol=0.3)
    assert mahalanobis_score(means, means, precision).abs().max() < 1e-6
    # Moving away from the nearest mean along any direction lowers the score monotonically.
    direction = torch.randn(6, dtype=torch.float64)
    steps = torch.tensor([0.0, 0.5, 2.0, 10.0, 100.0], dtype=torch.float64)
    path = means[1].double() + steps[:, None] * direction
    scores = mahalanobis_score(path, means, precision)
    assert torch.all(scores[1:] < scores[:-1])
    # In-distribution samples outscore samples from elsewhere.
    inside = mahalanobis_score(_two_gaussians(seed=5)[0], means, precision)
    outside = mahalanobis_score(torch.randn(400, 6, dtype=torch.float64) * 3 + 12, means, precision)
    assert inside.min() > outside.max()


def test_the_tied_covariance_weighs_directions_by_their_spread() -> None:
    # Variance 100 along axis 0, 1 along axis 1: a step of 10 along axis 0 is as unusual as a
    # step of 1 along axis 1 (squared distance 1 each), which a Euclidean distance would miss.
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(20_000, 2, generator=generator, dtype=torch.float64)
    features *= torch.tensor([10.0, 1.0], dtype=torch.float64)
    fitted = fit_class_gaussians(features)  # one Gaussian (the multi-label case)
    centre = fitted["means"][0].double()
    queries = centre + torch.tensor([[10.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    distances = mahalanobis_distances(queries, fitted["means"], fitted["precision"])
    np.testing.assert_allclose(distances[:, 0].numpy(), [1.0, 1.0], rtol=0.05)


def test_pooled_features_are_the_mean_of_c5() -> None:
    model = mobilenet_v3_small(num_classes=3).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.forward_features(images).mean(dim=(2, 3))
        got = pooled_features(model, images)
    assert got.shape == (2, 576)
    torch.testing.assert_close(got, expected)


def test_fitted_state_survives_a_weights_only_checkpoint(tmp_path: Path) -> None:
    features, labels = _two_gaussians()
    detector = MahalanobisCalibration(quantile=0.1)
    fitted = fit_class_gaussians(features, labels)
    detector.means, detector.precision = fitted["means"], fitted["precision"]
    detector.shrinkage, detector.threshold, detector.num_train = 0.1, -12.5, 400
    path = tmp_path / "state.ckpt"
    torch.save(
        {"state_dict": {}, "callbacks": {"MahalanobisCalibration": detector.state_dict()}}, path
    )

    restored = MahalanobisCalibration.from_checkpoint(torch.load(path, weights_only=True))
    assert restored is not None and restored.threshold == -12.5 and restored.quantile == 0.1
    assert restored.num_train == 400
    torch.testing.assert_close(restored.scores(features), detector.scores(features))
    # A checkpoint without the callback, or with an unfitted one, has no detector.
    assert MahalanobisCalibration.from_checkpoint({"callbacks": {}}) is None
    unfitted = {"callbacks": {"MahalanobisCalibration": MahalanobisCalibration().state_dict()}}
    assert MahalanobisCalibration.from_checkpoint(unfitted) is None


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        fit_class_gaussians(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        fit_class_gaussians(torch.randn(4))
    with pytest.raises(ValueError, match="labels"):
        fit_class_gaussians(torch.randn(4, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="quantile"):
        MahalanobisCalibration(quantile=1.0)
