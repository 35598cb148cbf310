"""Out-of-distribution scores computed from a classifier's logits, and their threshold.

Every score here is oriented the same way: **higher means more in-distribution**, so one rule
("flag an image whose score is below the threshold") works for all of them, and
:func:`calibrate_threshold` picks that threshold from in-distribution validation scores.

- Softmax (one class per image):
  :func:`max_softmax_score`, the maximum softmax probability baseline (Hendrycks & Gimpel, "A
  Baseline for Detecting Misclassified and Out-of-Distribution Examples in Neural Networks",
  ICLR 2017), and :func:`energy_score`, the negative free energy ``T * logsumexp(logits / T)``
  (Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020), which keeps the
  logits' magnitude that softmax normalises away.
- Multi-label (independent sigmoids): the softmax scores make no sense there (findings do not
  compete, and an image with no finding is a normal in-distribution case). The natural analogues
  are :func:`max_sigmoid_score`, the confidence of the most confident finding, and
  :func:`joint_energy_score`, the sum over labels of each binary classifier's negative energy
  ``T * softplus(logit / T)`` (the "JointEnergy" of Wang et al., "Can multi-label classification
  networks know what they don't know?", NeurIPS 2021).

Feature space (:func:`fit_class_gaussians`, :func:`mahalanobis_score`): the Mahalanobis detector
of Lee et al. ("A Simple Unified Framework for Detecting Out-of-Distribution Samples and
Adversarial Attacks", NeurIPS 2018) on the globally pooled C5 features (:func:`pooled_features`):
one Gaussian per class with a shared (tied) covariance, fitted on training images; the score is
minus the squared Mahalanobis distance to the nearest class mean. Logit scores only see what the
last layer separates; an image unlike every training image can still land far inside one class's
logit region, while its features lie far from every class mean. Lee et al.'s input perturbation
and multi-layer ensemble are left out (they need OOD samples to tune). The covariance is
Ledoit-Wolf shrunk (:func:`ledoit_wolf_covariance`) so 576- or 960-dim features from a few hundred
images stay invertible.

Pure torch; the callers (Lightning callbacks, ``mnv3.explain``) choose the score by label type
through :func:`confidence_score`.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = [
    "calibrate_threshold",
    "confidence_score",
    "energy_score",
    "fit_class_gaussians",
    "joint_energy_score",
    "ledoit_wolf_covariance",
    "mahalanobis_distances",
    "mahalanobis_score",
    "max_sigmoid_score",
    "max_softmax_score",
    "pooled_features",
]


def _check_logits(logits: torch.Tensor) -> torch.Tensor:
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, num_classes), got shape {tuple(logits.shape)}")
    # float32 at least: half-precision softmax saturates near 1, where thresholds live.
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def max_softmax_score(logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability per image, ``(N,)`` in [1/K, 1] (Hendrycks & Gimpel 2017)."""
    return F.softmax(_check_logits(logits), dim=1).amax(dim=1)


def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Negative free energy ``T * logsumexp(logits / T)`` per image, ``(N,)`` (Liu et al. 2020).

    Liu et al.'s energy is ``E(x) = -T * logsumexp(f(x) / T)``; this returns ``-E(x)`` so that,
    like the softmax score, higher means more in-distribution. Unbounded; ``T = 1`` is the
    paper's choice at test time.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return temperature * torch.logsumexp(_check_logits(logits) / temperature, dim=1)


def max_sigmoid_score(logits: torch.Tensor) -> torch.Tensor:
    """Multi-label: the highest per-label sigmoid probability per image, ``(N,)`` in [0, 1].

    Caveat: an in-distribution image with no finding also scores low; calibrate the threshold on
    validation data that contains such images, so the quantile accounts for them.
    """
    return torch.sigmoid(_check_logits(logits)).amax(dim=1)


def joint_energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Multi-label: ``sum_k T * softplus(logit_k / T)`` per image, ``(N,)`` (Wang et al. 2021).

    Each label is a two-way softmax over ``(0, logit_k)``, whose negative free energy is
    ``T * log(1 + exp(logit_k / T))``; summing over labels rewards any confident finding.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return temperature * F.softplus(_check_logits(logits) / temperature).sum(dim=1)


def confidence_score(logits: torch.Tensor, multilabel: bool = False) -> torch.Tensor:
    """The bounded score thresholds are calibrated on: max softmax, or max sigmoid (multi-label)."""
    return max_sigmoid_score(logits) if multilabel else max_softmax_score(logits)


def calibrate_threshold(scores: torch.Tensor, quantile: float = 0.05) -> float:
    """The score below which only ``quantile`` of the (in-distribution) ``scores`` fall.

    ``scores`` are those of validation images; an image scoring below the result is flagged as
    out-of-distribution, which by construction flags ``quantile`` of in-distribution images (the
    false-alarm rate one accepts). Linear interpolation between order statistics (numpy's
    default); non-finite scores are ignored.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    values = torch.as_tensor(scores).detach().flatten().double().cpu()
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        raise ValueError("cannot calibrate an OOD threshold without any finite score")
    values, _ = values.sort()
    # Same as torch.quantile(..., interpolation="linear"), which refuses more than 2**24 values.
    position = quantile * (values.numel() - 1)
    low = int(position)
    high = min(low + 1, values.numel() - 1)
    fraction = position - low
    return float(values[low] + (values[high] - values[low]) * fraction)


# -- feature space: Mahalanobis distance (Lee et al. 2018) --------------------------------------


def pooled_features(network: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The globally average-pooled C5 features ``(N, C)`` (576 Small, 960 Large, 1280 V2).

    What the classifier head pools before its hidden layer: the last feature every MobileNet has
    (MobileNetV2's head has no hidden layer), read with ``forward_features``.
    """
    return network.forward_features(images).float().mean(dim=(2, 3))


def ledoit_wolf_covariance(centered: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Ledoit-Wolf shrunk covariance of already centred rows ``(N, D)``, and its shrinkage.

    ``(1 - s) * S + s * mu * I`` with ``S = X^T X / N``, ``mu = trace(S) / D`` and the shrinkage
    ``s`` in [0, 1] that minimises the expected squared error (Ledoit & Wolf, "A well-conditioned
    estimator for large-dimensional covariance matrices", 2004; the formula of scikit-learn's
    ``ledoit_wolf_shrinkage``). With fewer images than dimensions ``S`` is singular; the shrunk
    matrix is not, so its inverse exists. Computed in float64.
    """
    x = centered.double()
    n, d = x.shape
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {n}")
    empirical = x.T @ x / n
    mu = float(empirical.diagonal().sum()) / d
    squares = x * x
    # delta: distance of S to mu*I; beta: the estimated variance of S around the true covariance.
    delta = float(((empirical - mu * torch.eye(d, dtype=x.dtype)) ** 2).sum()) / d
    beta = float((squares.T @ squares).sum() / n - (empirical**2).sum()) / (n * d)
    shrinkage = 0.0 if delta == 0 else min(max(beta, 0.0), delta) / delta
    covariance = (1.0 - shrinkage) * empirical
    covariance.diagonal().add_(shrinkage * mu)
    return covariance, shrinkage


def fit_class_gaussians(
    features: torch.Tensor,
    labels: torch.Tensor | None = None,
    ridge: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """Class means and the precision of their shared covariance (Lee et al. 2018, Eq. 1).

    Args:
        features: ``(N, D)`` training features (e.g. :func:`pooled_features`).
        labels: ``(N,)`` class indices; None fits one Gaussian to all rows (multi-label tasks,
            where an image belongs to several classes or none, use this).
        ridge: added to the diagonal as a fraction of the mean variance, so the inverse exists
            even when every feature is constant (Ledoit-Wolf then shrinks nothing).

    Returns plain tensors (loadable with ``torch.load(weights_only=True)``): ``means`` ``(K, D)``
    of the classes present, ``classes`` ``(K,)`` their indices, ``precision`` ``(D, D)`` the
    inverse of the Ledoit-Wolf covariance of the features centred on their class means, and
    ``shrinkage`` (scalar) the Ledoit-Wolf weight of the identity.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    x = features.detach().double().cpu()
    if labels is None:
        labels = torch.zeros(x.shape[0], dtype=torch.long)
    labels = labels.detach().long().cpu().flatten()
    if labels.numel() != x.shape[0]:
        raise ValueError(f"{labels.numel()} labels for {x.shape[0]} feature vectors")
    classes = labels.unique(sorted=True)
    means = torch.stack([x[labels == c].mean(dim=0) for c in classes])
    centered = x - means[torch.searchsorted(classes, labels)]
    covariance, shrinkage = ledoit_wolf_covariance(centered)
    covariance.diagonal().add_(ridge * max(float(covariance.diagonal().mean()), 1e-12))
    precision = torch.linalg.inv(covariance)
    precision = (precision + precision.T) / 2  # exactly symmetric despite rounding
    return {
        "means": means.float(),
        "classes": classes,
        "precision": precision.float(),
        "shrinkage": torch.tensor(shrinkage),
    }


def mahalanobis_distances(
    features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor
) -> torch.Tensor:
    """Squared Mahalanobis distances ``(N, K)``: ``(x - m_k)^T P (x - m_k)`` for every class k.

    Computed as Euclidean distances of whitened coordinates (``P = L L^T``, Cholesky; ``x L`` and
    ``m_k L``), differences taken directly, in float64: pooled features can be small (a young
    network's are ~1e-3) and ``P`` then huge (~1e15), where the expansion
    ``x^T P x - 2 x^T P m + m^T P m`` cancels to rounding noise.
    """
    x = features.detach().double()
    whitening = torch.linalg.cholesky(precision.to(x.device, torch.float64))
    z = x @ whitening
    centres = means.to(x.device, torch.float64) @ whitening
    return torch.cdist(z, centres, compute_mode="donot_use_mm_for_euclid_dist") ** 2


def mahalanobis_score(
    features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor
) -> torch.Tensor:
    """Minus the squared Mahalanobis distance to the nearest class mean, ``(N,)`` (float64).

    Higher means more in-distribution, like every score here, so :func:`calibrate_threshold`
    applies unchanged (Lee et al.'s confidence score ``M(x)``).
    """
    return -mahalanobis_distances(features, means, precision).amin(dim=1)
