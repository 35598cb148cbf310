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

Pure torch; the callers (a Lightning callback, ``mnv3.explain``) choose the score by label type
through :func:`confidence_score`.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = [
    "calibrate_threshold",
    "confidence_score",
    "energy_score",
    "joint_energy_score",
    "max_sigmoid_score",
    "max_softmax_score",
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
