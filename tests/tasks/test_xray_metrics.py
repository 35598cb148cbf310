"""Known-answer tests of the X-ray evaluation statistics (mnv3.tasks.xray_metrics).

Each statistic is checked against an independent computation (torchmetrics, a brute-force count)
or a simulation whose answer is known: bootstrap coverage of a known AUROC, ECE of a calibrated
and of an overconfident model, the temperature that undoes a known overconfidence.
"""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_calibration_error,
)

from mnv3.tasks.xray_metrics import (
    bootstrap_ci,
    expected_calibration_error,
    fit_temperature,
    group_codes,
    operating_point,
    reliability_bins,
    resample_weights,
    threshold_for_sensitivity,
    weighted_auroc,
    weighted_average_precision,
    weighted_sensitivity,
    weighted_specificity,
    youden_threshold,
)


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _next_float32(value: float) -> float:
    """The next float32 above ``value`` (the probabilities are float32)."""
    return float(torch.nextafter(torch.tensor(value), torch.tensor(2.0)))


def _binormal(n_pos: int, n_neg: int, shift: float, generator: torch.Generator) -> tuple:
    """Scores N(shift, 1) for positives and N(0, 1) for negatives: AUROC = Phi(shift / sqrt 2)."""
    scores = torch.cat(
        [torch.randn(n_pos, generator=generator) + shift, torch.randn(n_neg, generator=generator)]
    )
    labels = torch.cat([torch.ones(n_pos), torch.zeros(n_neg)]).long()
    return scores, labels


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_metrics_equal_torchmetrics_on_the_repeated_sample(ties: bool) -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(60, generator=g)
    if ties:
        scores = (scores * 6).round() / 6  # few distinct values: ties everywhere
    labels = (torch.rand(60, generator=g) < 0.4).long()
    ones = torch.ones(1, 60)
    assert float(weighted_auroc(scores, labels, ones)) == pytest.approx(
        float(binary_auroc(scores, labels)), abs=1e-6
    )
    assert float(weighted_average_precision(scores, labels, ones)) == pytest.approx(
        float(binary_average_precision(scores, labels)), abs=1e-6
    )
    # A bootstrap weight vector = the sample with images repeated as often as they were drawn.
    codes, _ = group_codes(None, 60)
    weights = resample_weights(codes, 5, g)
    for row in weights:
        repeated = torch.repeat_interleave(torch.arange(60), row.long())
        s, y = scores[repeated], labels[repeated]
        assert float(weighted_auroc(scores, labels, row[None])) == pytest.approx(
            float(binary_auroc(s, y)), abs=1e-6
        )
        assert float(weighted_average_precision(scores, labels, row[None])) == pytest.approx(
            float(binary_average_precision(s, y)), abs=1e-6
        )


def test_patient_resampling_keeps_a_patients_images_together() -> None:
    groups = ["a", "a", "a", "b", "c", "c"]
    codes, by_patient = group_codes(groups, 6)
    assert by_patient and codes.tolist() == [0, 0, 0, 1, 2, 2]
    weights = resample_weights(codes, 50, torch.Generator().manual_seed(0))
    assert torch.equal(weights[:, 0], weights[:, 1]) and torch.equal(weights[:, 0], weights[:, 2])
    assert torch.equal(weights[:, 4], weights[:, 5])
    # Three patients drawn per resample: the draw counts (patient a counted once) sum to 3.
    assert torch.equal(weights[:, 0] + weights[:, 3] + weights[:, 4], torch.full((50,), 3.0))
    codes, by_patient = group_codes(None, 4)
    assert codes.tolist() == [0, 1, 2, 3] and not by_patient
    assert not group_codes(["x"], 4)[1]  # a list of the wrong length: images are resampled


def test_bootstrap_interval_covers_a_known_auroc_about_95_percent_of_the_time() -> None:
    shift, repeats = 1.0, 200
    truth = _normal_cdf(shift / math.sqrt(2.0))  # 0.760
    g = torch.Generator().manual_seed(0)
    covered, widths = 0, []
    for repeat in range(repeats):
        scores, labels = _binormal(60, 90, shift, g)
        result = bootstrap_ci(scores, labels, weighted_auroc, num_resamples=300, seed=repeat)
        covered += int(result.low[0] <= truth <= result.high[0])
        widths.append(float(result.high[0] - result.low[0]))
        assert result.low[0] <= result.value[0] <= result.high[0]
    coverage = covered / repeats
    print(
        f"bootstrap coverage of AUROC {truth:.3f}: {coverage:.1%}, mean width {sum(widths) / repeats:.3f}"
    )
    assert 0.90 <= coverage <= 0.99


def test_patient_bootstrap_covers_when_images_of_a_patient_are_correlated() -> None:
    # 40 patients x 5 images; a patient's images share a random offset, so the sample holds about
    # 40 independent units, not 200: resampling images gives too narrow intervals.
    shift, repeats, patients, per_patient = 1.0, 150, 40, 5
    truth = _normal_cdf(shift / math.sqrt(2.0 * 2.0))  # each score: patient N(0,1) + image N(0,1)
    g = torch.Generator().manual_seed(3)
    covered = {True: 0, False: 0}
    groups = [f"p{p}" for p in range(patients) for _ in range(per_patient)]
    for repeat in range(repeats):
        labels = (torch.arange(patients) % 2).repeat_interleave(per_patient)
        offset = torch.randn(patients, generator=g).repeat_interleave(per_patient)
        scores = labels * shift + offset + torch.randn(patients * per_patient, generator=g)
        for by_patient in (True, False):
            result = bootstrap_ci(
                scores, labels, weighted_auroc, groups if by_patient else None, 200, seed=repeat
            )
            assert result.by_patient is by_patient
            covered[by_patient] += int(result.low[0] <= truth <= result.high[0])
    print(
        f"coverage by patient {covered[True] / repeats:.1%}, by image {covered[False] / repeats:.1%}"
    )
    assert 0.88 <= covered[True] / repeats <= 0.99
    assert covered[False] < covered[True]


def test_bootstrap_multilabel_columns_unknown_labels_and_reproducibility() -> None:
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(80, 3, generator=g)
    labels = (torch.rand(80, 3, generator=g) < 0.5).float()
    labels[:10, 1] = -1.0  # unknown: left out of finding 1
    labels[:, 2] = 0.0  # one class only: undefined
    a = bootstrap_ci(scores, labels, weighted_auroc, num_resamples=100, seed=7)
    b = bootstrap_ci(scores, labels, weighted_auroc, num_resamples=100, seed=7)
    assert torch.allclose(a.low, b.low, equal_nan=True)
    assert torch.allclose(a.high, b.high, equal_nan=True)
    known = labels[:, 1] >= 0
    assert float(a.value[1]) == pytest.approx(
        float(binary_auroc(scores[known, 1], labels[known, 1].long())), abs=1e-6
    )
    assert math.isnan(float(a.value[2])) and int(a.valid[2]) == 0
    assert a.mean_value == pytest.approx(float(a.value[:2].mean()))
    assert a.mean_low <= a.mean_value <= a.mean_high
    assert (a.num_resamples, a.seed, a.unit, a.num_units) == (100, 7, "images", 80)


def test_operating_points() -> None:
    g = torch.Generator().manual_seed(2)
    scores, labels = _binormal(100, 100, 1.5, g)
    probs = torch.sigmoid(scores)
    for target in (0.9, 0.95):
        threshold = threshold_for_sensitivity(probs, labels, target)
        assert operating_point(probs, labels, threshold)["sensitivity"] >= target
        # The most specific such point: a hair higher loses the sensitivity.
        assert operating_point(probs, labels, _next_float32(threshold))["sensitivity"] < target
    # Youden's J: no threshold among the scores does better.
    best = youden_threshold(probs, labels)

    def j(threshold: float) -> float:
        point = operating_point(probs, labels, threshold)
        return point["sensitivity"] + point["specificity"] - 1

    assert j(best) == pytest.approx(max(j(float(t)) for t in probs), abs=1e-9)
    assert math.isnan(youden_threshold(probs, torch.ones(200).long()))


def test_ece_near_zero_when_calibrated_and_temperature_repairs_overconfidence() -> None:
    g = torch.Generator().manual_seed(0)
    n = 20000
    # A perfectly calibrated model: the label is drawn with the predicted probability.
    true_logits = 2.0 * torch.randn(2 * n, generator=g)
    labels = (torch.rand(2 * n, generator=g) < torch.sigmoid(true_logits)).float()
    calibrated = expected_calibration_error(torch.sigmoid(true_logits), labels)
    # An overconfident one: the same ranking, logits 3x too large.
    overconfident_logits = 3.0 * true_logits
    before = expected_calibration_error(torch.sigmoid(overconfident_logits[n:]), labels[n:])
    temperature = fit_temperature(overconfident_logits[:n], labels[:n])  # "validation" half
    after = expected_calibration_error(
        torch.sigmoid(overconfident_logits[n:] / temperature), labels[n:]
    )
    print(
        f"ECE calibrated {calibrated:.4f}; overconfident {before:.4f} -> {after:.4f} at T={temperature:.3f}"
    )
    assert calibrated < 0.015
    assert before > 0.08
    assert after < 0.02 and after < before / 4
    assert temperature == pytest.approx(3.0, rel=0.1)
    # AUROC is unchanged by a temperature (same ranking).
    assert float(
        binary_auroc(torch.sigmoid(overconfident_logits / temperature), labels.long())
    ) == pytest.approx(float(binary_auroc(torch.sigmoid(true_logits), labels.long())), abs=1e-6)


def test_reliability_bins_reproduce_torchmetrics_ece_and_ignore_unknown_labels() -> None:
    g = torch.Generator().manual_seed(4)
    probs = torch.rand(500, generator=g) * 0.999  # no exact 1.0 (torchmetrics gives it a bin)
    labels = (torch.rand(500, generator=g) < probs**2).float()
    mean_prob, frequency, count = reliability_bins(probs, labels, 10)
    filled = count > 0
    ece = float((count[filled] * (frequency[filled] - mean_prob[filled]).abs()).sum() / count.sum())
    reference = float(binary_calibration_error(probs, labels.long(), n_bins=10))
    assert ece == pytest.approx(reference, abs=1e-6)
    assert expected_calibration_error(probs, labels, 10) == pytest.approx(reference, abs=1e-6)
    with_unknown = torch.cat([labels, torch.full((5,), -1.0)])
    assert expected_calibration_error(
        torch.cat([probs, torch.rand(5)]), with_unknown, 10
    ) == pytest.approx(reference, abs=1e-6)
    assert (
        int(
            reliability_bins(
                probs, labels.clone().index_fill_(0, torch.tensor([0]), float("nan")), 10
            )[2].sum()
        )
        == 499
    )


def test_fit_temperature_leaves_a_calibrated_model_alone_and_handles_no_labels() -> None:
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(5000, generator=g)
    labels = (torch.rand(5000, generator=g) < torch.sigmoid(logits)).float()
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.1)
    assert fit_temperature(logits, torch.full_like(labels, float("nan"))) == 1.0
    # Separable validation labels: the NLL has no minimum (T -> 0); T stays 1.
    separable = (logits > 0).float()
    assert fit_temperature(logits, separable) == 1.0


def test_fit_temperature_sharpens_an_underconfident_model_to_the_bound() -> None:
    # Logits a tenth of the calibrated ones: the NLL's minimum is T = 0.1, below the 0.25 bound;
    # the classes overlap, so the bound (the best T allowed) is returned, not 1.0.
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(5000, generator=g) * 2.0
    labels = (torch.rand(5000, generator=g) < torch.sigmoid(logits)).float()
    assert fit_temperature(logits / 10.0, labels) == pytest.approx(0.25)
    assert fit_temperature(logits / 2.0, labels) == pytest.approx(0.5, rel=0.1)


def test_weighted_sensitivity_and_specificity_equal_counts_on_the_repeated_sample() -> None:
    g = torch.Generator().manual_seed(8)
    called = torch.rand(50, generator=g) < 0.5
    labels = (torch.rand(50, generator=g) < 0.4).long()
    weights = resample_weights(group_codes(None, 50)[0], 4, g)
    for row in weights:
        repeated = torch.repeat_interleave(torch.arange(50), row.long())
        point = operating_point(called[repeated].float(), labels[repeated], 0.5)
        assert float(weighted_sensitivity(called, labels, row[None])) == pytest.approx(
            point["sensitivity"]
        )
        assert float(weighted_specificity(called, labels, row[None])) == pytest.approx(
            point["specificity"]
        )
    assert weighted_sensitivity(called, torch.zeros(50), torch.ones(1, 50)).isnan().all()


def test_bootstrap_interval_covers_a_known_sensitivity_about_95_percent_of_the_time() -> None:
    # Each positive is called with probability 0.8, each negative with 0.3: the sensitivity and
    # specificity of a fixed threshold are 0.8 and 0.7; patients of 1-3 images share one call.
    repeats, patients = 200, 80
    g = torch.Generator().manual_seed(9)
    covered = {"sensitivity": 0, "specificity": 0}
    for repeat in range(repeats):
        sizes = torch.randint(1, 4, (patients,), generator=g)
        sick = (torch.arange(patients) % 2).bool()
        called = torch.where(
            sick, torch.rand(patients, generator=g) < 0.8, torch.rand(patients, generator=g) < 0.3
        )
        groups = [str(p) for p in range(patients) for _ in range(int(sizes[p]))]
        labels, calls = sick.long().repeat_interleave(sizes), called.repeat_interleave(sizes)
        for stat, function, truth in (
            ("sensitivity", weighted_sensitivity, 0.8),
            ("specificity", weighted_specificity, 0.7),
        ):
            result = bootstrap_ci(calls.float(), labels, function, groups, 300, seed=repeat)
            covered[stat] += int(result.low[0] <= truth <= result.high[0])
    print({stat: count / repeats for stat, count in covered.items()})
    for count in covered.values():
        assert 0.88 <= count / repeats <= 0.99
