"""The evaluation a reviewer of a chest X-ray model asks for, as pure functions on tensors.

- Discrimination: AUROC and AUPRC (torchmetrics' ``binary_auroc`` / ``binary_average_precision``
  for the point estimates) with percentile bootstrap intervals that resample *patients* when a
  patient id is known: images of one patient are correlated, and resampling them one by one
  gives intervals that are too narrow (:func:`bootstrap_ci`).
- Operating points chosen on validation and reused on test: Youden's J
  (:func:`youden_threshold`) and a fixed sensitivity (:func:`threshold_for_sensitivity`).
- Calibration: expected calibration error (torchmetrics' ``binary_calibration_error``), the bins of
  a reliability diagram (:func:`reliability_bins`) and temperature scaling (Guo et al. 2017), one
  temperature fitted by minimising the validation NLL with LBFGS (:func:`fit_temperature`).

A binary problem is one logit per image: a two-class softmax ``[l0, l1]`` gives
``P(class 1) = sigmoid(l1 - l0)``, so binary and multi-label problems share these functions, with
``(N,)`` or ``(N, K)`` scores and labels, unknown labels marked ``-1`` (or NaN for the logits'
targets in :func:`fit_temperature`).

The bootstrap computes the metric of every resample at once: a resample is a vector of weights
(how often each image was drawn), and the weighted AUROC / AUPRC below equal torchmetrics' on the
sample with the drawn images repeated (the tests check it). Nothing here imports Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

__all__ = [
    "BootstrapResult",
    "WeightedMetric",
    "binary_logits",
    "bootstrap_ci",
    "confusion_counts",
    "expected_calibration_error",
    "fit_temperature",
    "group_codes",
    "operating_point",
    "reliability_bins",
    "resample_weights",
    "sensitivity_key",
    "threshold_for_sensitivity",
    "weighted_auroc",
    "weighted_average_precision",
    "weighted_sensitivity",
    "weighted_specificity",
    "youden_threshold",
]

#: ``metric(scores (N,), labels (N,) in {0, 1}, weights (B, N)) -> (B,)``, NaN where undefined.
WeightedMetric = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def binary_logits(logits: torch.Tensor) -> torch.Tensor:
    """The one logit of a two-class softmax head: ``l1 - l0``, whose sigmoid is ``P(class 1)``."""
    return (logits[:, 1] - logits[:, 0]).float()


# --- weighted discrimination metrics ---------------------------------------------------------------


def _per_value(
    scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative weight per distinct score, scores ascending: two ``(B, U)``."""
    _, inverse = torch.unique(scores, sorted=True, return_inverse=True)
    num_values = int(inverse.max()) + 1 if inverse.numel() else 0
    positive = labels.to(weights.dtype)
    shape = (weights.shape[0], num_values)
    pos = torch.zeros(shape, dtype=weights.dtype).index_add_(1, inverse, weights * positive)
    neg = torch.zeros(shape, dtype=weights.dtype).index_add_(1, inverse, weights * (1 - positive))
    return pos, neg


def weighted_auroc(
    scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """AUROC of each weight row: P(score of a positive > score of a negative), ties counted half.

    Args:
        scores: ``(N,)`` probabilities or logits (only their order matters).
        labels: ``(N,)`` 0 / 1.
        weights: ``(B, N)`` non-negative weights (bootstrap draw counts; 0 leaves an image out).

    Returns:
        ``(B,)`` AUROC, NaN for a row without positive or without negative weight.
    """
    pos, neg = _per_value(scores, labels, weights)
    below = torch.cumsum(neg, dim=1) - neg  # negative weight strictly below each score
    pairs = (pos * (below + 0.5 * neg)).sum(dim=1)
    total = pos.sum(dim=1) * neg.sum(dim=1)
    return torch.where(total > 0, pairs / total.clamp_min(1e-30), torch.nan)


def weighted_average_precision(
    scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Average precision (area under the step precision-recall curve) of each weight row.

    Same definition as torchmetrics' ``binary_average_precision``: the sum over distinct
    thresholds, highest first, of (recall gained) x (precision at that threshold).

    Returns:
        ``(B,)`` AUPRC, NaN for a row without positive weight.
    """
    pos, neg = _per_value(scores, labels, weights)
    pos, neg = pos.flip(1), neg.flip(1)  # highest score first
    true_pos = torch.cumsum(pos, dim=1)
    called = true_pos + torch.cumsum(neg, dim=1)
    precision = true_pos / called.clamp_min(1e-30)
    total = pos.sum(dim=1)
    return torch.where(total > 0, (pos * precision).sum(dim=1) / total.clamp_min(1e-30), torch.nan)


def weighted_sensitivity(
    called: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Sensitivity of 0 / 1 decisions (``called``, in the scores' place) for each weight row.

    A :data:`WeightedMetric`, so :func:`bootstrap_ci` draws its interval: the decisions are made
    once at a threshold chosen on validation, and the bootstrap resamples the test patients (the
    threshold's own uncertainty, from the validation set, is not in this interval).

    Returns:
        ``(B,)`` weighted share of positives called positive, NaN for a row without positives.
    """
    positive = labels.to(weights.dtype)
    hit = called.to(weights.dtype)
    total = (weights * positive).sum(dim=1)
    return torch.where(
        total > 0, (weights * positive * hit).sum(dim=1) / total.clamp_min(1e-30), torch.nan
    )


def weighted_specificity(
    called: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Specificity of 0 / 1 decisions for each weight row: :func:`weighted_sensitivity` of the
    negatives (share of negatives not called), NaN for a row without negatives."""
    return weighted_sensitivity(1 - called.to(weights.dtype), 1 - labels, weights)


# --- the bootstrap ---------------------------------------------------------------------------------


def group_codes(groups: Sequence[str] | None, num_samples: int) -> tuple[torch.Tensor, bool]:
    """Integer codes ``0..G-1`` of the patients of ``num_samples`` images, and whether they are
    patients: without ids (None, or a list of the wrong length) every image is its own group."""
    if groups is None or len(groups) != num_samples:
        return torch.arange(num_samples), False
    index: dict[str, int] = {}
    codes = [index.setdefault(str(g), len(index)) for g in groups]
    return torch.tensor(codes, dtype=torch.long), True


def resample_weights(
    codes: torch.Tensor, num_resamples: int, generator: torch.Generator
) -> torch.Tensor:
    """``(num_resamples, N)`` bootstrap weights: G groups drawn with replacement, each image
    weighted by how often its group was drawn (all images of a drawn patient come along)."""
    num_groups = int(codes.max()) + 1 if codes.numel() else 0
    drawn = torch.randint(num_groups, (num_resamples, num_groups), generator=generator)
    counts = torch.zeros(num_resamples, num_groups).scatter_add_(1, drawn, torch.ones(drawn.shape))
    return counts[:, codes]


@dataclass(frozen=True)
class BootstrapResult:
    """Point estimates and percentile intervals of one metric, per column and for their mean.

    Attributes:
        value, low, high: ``(K,)`` estimate on the whole sample and interval bounds per column.
        mean_value, mean_low, mean_high: the mean over the defined columns and its interval
            (the mean is taken inside every resample, so the interval is the mean's own).
        num_resamples, seed, level: how the intervals were drawn.
        by_patient: True when patients were resampled, False when images were.
        num_units: how many patients (or images) were resampled.
        valid: ``(K,)`` resamples in which the column's metric was defined (both classes drawn).
    """

    value: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    mean_value: float
    mean_low: float
    mean_high: float
    num_resamples: int
    seed: int
    level: float
    by_patient: bool
    num_units: int
    valid: torch.Tensor = field(repr=False)

    @property
    def unit(self) -> str:
        """What was resampled, in words."""
        return "patients" if self.by_patient else "images"


def bootstrap_ci(
    scores: torch.Tensor,
    labels: torch.Tensor,
    metric: WeightedMetric,
    groups: Sequence[str] | None = None,
    num_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    chunk: int = 100,
) -> BootstrapResult:
    """Percentile bootstrap interval of ``metric`` for every column of ``scores``.

    Args:
        scores: ``(N,)`` or ``(N, K)`` scores (one column per finding).
        labels: same shape, 1 / 0, or -1 (or NaN) where the label is unknown (left out).
        metric: a weighted metric (:func:`weighted_auroc`, :func:`weighted_average_precision`).
        groups: the patient of each image; None resamples images.
        num_resamples: bootstrap resamples (each draws as many patients as the sample holds).
        seed: seed of the draws (the same seed gives the same intervals).
        level: coverage of the interval (0.95: the 2.5 and 97.5 percentiles).
        chunk: resamples computed at once (memory: ``chunk x N`` floats).

    Returns:
        The :class:`BootstrapResult`; a column whose metric is never defined is NaN.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be at least 1, got {num_resamples}")
    scores = scores.detach().float().cpu()
    labels = torch.nan_to_num(labels.detach().float().cpu(), nan=-1.0)
    if scores.ndim == 1:
        scores, labels = scores[:, None], labels[:, None]
    codes, by_patient = group_codes(groups, scores.shape[0])
    known = labels >= 0
    positive = (labels == 1).long()

    def columns(weights: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` metric values of the weight rows, unknown labels weighted 0."""
        return torch.stack(
            [
                metric(scores[:, k], positive[:, k], weights * known[:, k])
                for k in range(scores.shape[1])
            ],
            dim=1,
        )

    value = columns(torch.ones(1, scores.shape[0]))[0]
    generator = torch.Generator().manual_seed(int(seed))
    parts = []
    for start in range(0, num_resamples, chunk):
        size = min(chunk, num_resamples - start)
        parts.append(columns(resample_weights(codes, size, generator)))
    draws = torch.cat(parts).double()  # (B, K)
    tail = (1.0 - level) / 2.0
    bounds = torch.tensor([tail, 1.0 - tail], dtype=torch.float64)
    per_column = torch.nanquantile(draws, bounds, dim=0)  # (2, K), NaN where never defined
    means = draws.nanmean(dim=1)
    mean_bounds = torch.nanquantile(means, bounds)
    defined = value[~value.isnan()]
    return BootstrapResult(
        value=value,
        low=per_column[0].float(),
        high=per_column[1].float(),
        mean_value=float(defined.mean()) if defined.numel() else math.nan,
        mean_low=float(mean_bounds[0]),
        mean_high=float(mean_bounds[1]),
        num_resamples=int(num_resamples),
        seed=int(seed),
        level=float(level),
        by_patient=by_patient,
        num_units=int(codes.max()) + 1 if codes.numel() else 0,
        valid=(~draws.isnan()).sum(dim=0),
    )


# --- operating points ------------------------------------------------------------------------------


def youden_threshold(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The threshold of the ROC point that maximises Youden's J = sensitivity + specificity - 1.

    ``prob >= threshold`` is called positive; NaN when one class is missing.
    """
    from torchmetrics.functional.classification import binary_roc

    labels = labels.long()
    if labels.unique().numel() < 2:
        return math.nan
    fpr, tpr, thresholds = binary_roc(probs.float(), labels)
    return float(thresholds[int(torch.argmax(tpr - fpr))].clamp(0.0, 1.0))


def threshold_for_sensitivity(
    probs: torch.Tensor, labels: torch.Tensor, sensitivity: float
) -> float:
    """The highest threshold whose sensitivity (share of positives with ``prob >= threshold``)
    reaches ``sensitivity``: the most specific operating point that keeps it. NaN without
    positives."""
    if not 0.0 < sensitivity <= 1.0:
        raise ValueError(f"sensitivity must be in (0, 1], got {sensitivity}")
    positives = probs[labels.long() == 1].float().sort(descending=True).values
    if positives.numel() == 0:
        return math.nan
    # The k-th highest positive score: k / n >= sensitivity (a hair below, for float error).
    needed = math.ceil(sensitivity * positives.numel() - 1e-9)
    return float(positives[max(1, needed) - 1])


def confusion_counts(called: torch.Tensor, labels: torch.Tensor) -> tuple[int, int, int, int]:
    """``(tp, fp, fn, tn)`` of boolean decisions against 0 / 1 labels (other labels: neither)."""
    labels = labels.long()
    tp = int((called & (labels == 1)).sum())
    fp = int((called & (labels == 0)).sum())
    fn = int((~called & (labels == 1)).sum())
    tn = int((~called & (labels == 0)).sum())
    return tp, fp, fn, tn


def operating_point(
    probs: torch.Tensor, labels: torch.Tensor, threshold: float
) -> dict[str, float]:
    """Sensitivity, specificity, PPV, NPV, F1 and accuracy of ``prob >= threshold``."""
    tp, fp, fn, tn = confusion_counts(probs >= threshold, labels)
    return {
        "sensitivity": tp / max(1, tp + fn),
        "specificity": tn / max(1, tn + fp),
        "ppv": tp / max(1, tp + fp),
        "npv": tn / max(1, tn + fn),
        "f1": 2 * tp / max(1, 2 * tp + fp + fn),
        "accuracy": (tp + tn) / max(1, tp + tn + fp + fn),
    }


def sensitivity_key(sensitivity: float) -> str:
    """The metric-name part of a fixed-sensitivity operating point: 0.9 -> ``sens90``."""
    return f"sens{100 * sensitivity:g}"


# --- calibration -----------------------------------------------------------------------------------


def expected_calibration_error(
    probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15
) -> float:
    """ECE of ``P(positive)`` against the frequency of positives (torchmetrics, L1, equal-width
    bins); multi-label inputs are pooled over findings, unknown (-1 / NaN) labels left out."""
    from torchmetrics.functional.classification import binary_calibration_error

    probs, labels = probs.flatten().float(), torch.nan_to_num(labels.flatten().float(), nan=-1.0)
    known = labels >= 0
    if not bool(known.any()):
        return math.nan
    return float(binary_calibration_error(probs[known], labels[known].long(), n_bins=num_bins))


def reliability_bins(
    probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reliability diagram's bins: mean predicted probability, frequency of positives and
    count per equal-width bin (``(num_bins,)`` each; empty bins are NaN, count 0).

    ECE = sum(count * |frequency - mean probability|) / sum(count) over the non-empty bins.
    """
    probs, labels = probs.flatten().float(), torch.nan_to_num(labels.flatten().float(), nan=-1.0)
    known = labels >= 0
    probs, labels = probs[known], labels[known]
    index = (probs * num_bins).long().clamp(0, num_bins - 1)
    count = torch.zeros(num_bins).index_add_(0, index, torch.ones_like(probs))
    mean_prob = torch.zeros(num_bins).index_add_(0, index, probs) / count
    frequency = torch.zeros(num_bins).index_add_(0, index, labels) / count
    return mean_prob, frequency, count


def fit_temperature(
    logits: torch.Tensor, labels: torch.Tensor, bounds: tuple[float, float] = (0.25, 20.0)
) -> float:
    """The temperature T minimising the NLL of ``sigmoid(logit / T)`` on these (validation) labels.

    One T for all findings (Guo et al. 2017's temperature scaling: one parameter, so it cannot
    over-fit a small validation set and it keeps every ranking, hence AUROC, unchanged). Fitted
    over log T (T stays positive) with LBFGS; the result is clamped to ``bounds``. Below the lower
    bound two cases differ: when the validation logits separate the classes perfectly, the NLL
    falls towards 0 as T -> 0 and such a T would only saturate every probability to 0 or 1
    (thresholds on them then mean nothing), so T = 1.0; otherwise the NLL has its minimum below
    the bound (an under-confident model, e.g. early in training or with class weights) and, the
    NLL being convex in 1 / T, the lower bound is the best temperature allowed.

    Args:
        logits: ``(N,)`` or ``(N, K)`` logits (a two-class head: :func:`binary_logits`).
        labels: same shape, 1 / 0, or -1 / NaN where unknown (left out).

    Returns:
        T (1.0 when there is no known label).
    """
    logits = logits.detach().double().flatten().cpu()
    labels = torch.nan_to_num(labels.detach().double().flatten().cpu(), nan=-1.0)
    known = (labels >= 0) & torch.isfinite(logits)
    if not bool(known.any()):
        return 1.0
    z, y = logits[known], labels[known]
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    separable = bool(y.any()) and bool((1 - y).any()) and z[y == 1].min() > z[y == 0].max()
    if not math.isfinite(temperature) or (temperature < bounds[0] and separable):
        return 1.0
    return min(max(temperature, bounds[0]), bounds[1])
