"""What the classifier reports on a binary or multi-label (X-ray) problem, and where it writes it.

:func:`evaluate_findings` turns one split's logits and labels into the logged numbers (AUROC,
AUPRC, ECE, the Youden and fixed-sensitivity operating points, and on a final evaluation the
bootstrap intervals), using the statistics of :mod:`mnv3.tasks.xray_metrics`. The writers put the
reliability diagram, the per-image prediction CSV and a JSON report into the run's folders, and
:func:`print_intervals` prints AUROC / AUPRC with their intervals. A binary problem is one finding
(the positive class) with flat metric names (``test/auroc``); a multi-label one names each finding
(``test/auroc/Effusion``) and reports the mean over findings under the flat name.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mnv3.tasks.common import save_figure
from mnv3.tasks.xray_metrics import (
    BootstrapResult,
    bootstrap_ci,
    expected_calibration_error,
    operating_point,
    reliability_bins,
    sensitivity_key,
    weighted_auroc,
    weighted_average_precision,
    weighted_sensitivity,
    weighted_specificity,
)

#: ``head.evaluation`` settings and their defaults (conf/head/classifier.yaml).
EVALUATION_DEFAULTS: dict[str, Any] = {
    "bootstrap_resamples": 1000,  # 0: no intervals
    "bootstrap_seed": 0,
    "confidence_level": 0.95,
    "sensitivities": [0.9, 0.95],  # fixed-sensitivity operating points, chosen on validation
    "calibration_bins": 15,
    "temperature_scaling": True,  # fit a temperature on validation, keep it in the checkpoint
}


def evaluation_settings(given: Mapping[str, Any] | None) -> dict[str, Any]:
    """The defaults updated with ``given`` (a checkpoint may predate some keys)."""
    settings = {**EVALUATION_DEFAULTS, **dict(given or {})}
    settings["sensitivities"] = [float(s) for s in settings["sensitivities"] or []]
    return settings


@dataclass
class FindingsReport:
    """One split's evaluation of K findings.

    Attributes:
        values: logged name (after ``<split>/``) -> value.
        intervals: ``"auroc"``, ``"auprc"``, and ``"sensitivity"`` / ``"specificity"`` of each
            operating point (``"sens90/sensitivity"``...) -> bootstrap result, on a final
            evaluation only.
        probs: ``(N, K)`` calibrated probabilities.
        decisions: operating point (``"youden"``, ``"sens90"``...) -> ``(N, K)`` bool decisions.
        per_finding: finding -> its numbers (all of them, for the JSON report).
    """

    values: dict[str, float]
    probs: torch.Tensor
    decisions: dict[str, torch.Tensor]
    per_finding: dict[str, dict[str, float]]
    intervals: dict[str, BootstrapResult] = field(default_factory=dict)


def evaluate_findings(
    logits: torch.Tensor,
    labels: torch.Tensor,
    names: Sequence[str],
    temperature: float,
    youden: torch.Tensor,
    at_sensitivity: torch.Tensor,
    settings: Mapping[str, Any],
    flat: bool,
    groups: Sequence[str] | None = None,
    bootstrap: bool = False,
) -> FindingsReport:
    """AUROC, AUPRC, ECE and the operating points of ``(N, K)`` logits against labels.

    Args:
        logits: ``(N, K)`` one logit per finding (binary: ``l1 - l0``).
        labels: ``(N, K)`` 1 / 0 / -1 (unknown, left out).
        names: the K findings.
        temperature: divides the logits before the sigmoid (fitted on validation).
        youden: ``(K,)`` Youden thresholds; at_sensitivity: ``(S, K)`` thresholds of
            ``settings["sensitivities"]``, both chosen on validation.
        settings: :func:`evaluation_settings`.
        flat: metric names without the finding (a binary problem's one finding).
        groups: patient of each image for the bootstrap (None: images are resampled).
        bootstrap: compute the intervals (final evaluations; not every validation epoch).
    """
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision

    probs = torch.sigmoid(logits.float() / float(temperature))
    values: dict[str, float] = {}
    per_finding: dict[str, dict[str, float]] = {}
    points = {"youden": youden.float()}
    for s, sensitivity in enumerate(settings["sensitivities"]):
        points[sensitivity_key(sensitivity)] = at_sensitivity[s].float()
    decisions = {point: probs >= thresholds[None, :] for point, thresholds in points.items()}

    def key(metric: str, name: str) -> str:
        return metric if flat else f"{metric}/{name}"

    for k, name in enumerate(names):
        known = labels[:, k] >= 0
        p, y = probs[known, k], labels[known, k].long()
        both = y.numel() > 0 and y.unique().numel() == 2
        found = {
            "auroc": float(binary_auroc(p, y)) if both else math.nan,
            "auprc": float(binary_average_precision(p, y)) if both else math.nan,
            "positives": float((y == 1).sum()),
            "negatives": float((y == 0).sum()),
        }
        for point, thresholds in points.items():
            stats = operating_point(p, y, float(thresholds[k]))
            prefix = "" if point == "youden" else f"{point}/"
            found[f"{prefix}threshold"] = float(thresholds[k])
            found.update({f"{prefix}{stat}": v for stat, v in stats.items()})
        per_finding[name] = found
        logged = ["auroc", "auprc", "sensitivity", "specificity", "threshold"]
        logged += [
            f"{sensitivity_key(s)}/{stat}"
            for s in settings["sensitivities"]
            for stat in ("sensitivity", "specificity", "threshold")
        ]
        if flat:
            logged += ["ppv", "npv", "f1"]
            values["accuracy_at_threshold"] = found["accuracy"]
        values.update({key(metric, name): found[metric] for metric in logged})
    if not flat:
        for metric in ("auroc", "auprc"):
            column = torch.tensor([per_finding[n][metric] for n in names])
            values[metric] = float(column.nanmean())
    values["ece"] = expected_calibration_error(probs, labels, int(settings["calibration_bins"]))
    values["temperature"] = float(temperature)
    report = FindingsReport(values, probs, decisions, per_finding)
    resamples = int(settings["bootstrap_resamples"])
    if bootstrap and resamples > 0:
        draw = {
            "groups": groups,
            "num_resamples": resamples,
            "seed": int(settings["bootstrap_seed"]),
            "level": float(settings["confidence_level"]),
        }
        for metric, function in (("auroc", weighted_auroc), ("auprc", weighted_average_precision)):
            result = bootstrap_ci(probs, labels, function, **draw)
            report.intervals[metric] = result
            values[f"{metric}_ci_low"], values[f"{metric}_ci_high"] = (
                (float(result.low[0]), float(result.high[0]))
                if flat
                else (result.mean_low, result.mean_high)
            )
        # Sensitivity / specificity at each operating point: the decisions at the thresholds
        # chosen on validation, test patients resampled (the threshold itself held fixed).
        for point, called in decisions.items():
            prefix = "" if point == "youden" else f"{point}/"
            for stat, function in (
                ("sensitivity", weighted_sensitivity),
                ("specificity", weighted_specificity),
            ):
                result = bootstrap_ci(called.float(), labels, function, **draw)
                report.intervals[f"{prefix}{stat}"] = result
                if flat:
                    values[f"{prefix}{stat}_ci_low"] = float(result.low[0])
                    values[f"{prefix}{stat}_ci_high"] = float(result.high[0])
        if not flat:  # per finding, AUROC / AUPRC logged; every interval in the JSON report
            for metric in ("auroc", "auprc"):
                result = report.intervals[metric]
                for k, name in enumerate(names):
                    values[f"{metric}_ci_low/{name}"] = float(result.low[k])
                    values[f"{metric}_ci_high/{name}"] = float(result.high[k])
        first = report.intervals["auroc"]
        values["bootstrap_resamples"] = float(first.num_resamples)
        values["bootstrap_seed"] = float(first.seed)
        values["bootstrap_units"] = float(first.num_units)
        values["bootstrap_by_patient"] = float(first.by_patient)
    return report


# --- writers -----------------------------------------------------------------------------------


def plot_reliability(
    probs: torch.Tensor, labels: torch.Tensor, num_bins: int, ece: float, title: str, path: Path
) -> Path:
    """The reliability diagram (frequency of positives against mean predicted probability per
    bin, bar widths the bins, counts underneath) saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean_prob, frequency, count = reliability_bins(probs, labels, num_bins)
    centres = (torch.arange(num_bins) + 0.5) / num_bins
    filled = count > 0
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.bar(
        centres[filled].numpy(),
        frequency[filled].numpy(),
        width=1.0 / num_bins,
        edgecolor="black",
        alpha=0.7,
        label="frequency of positives",
    )
    top.plot(mean_prob[filled].numpy(), frequency[filled].numpy(), "o", color="red", ms=3)
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.set_ylabel("frequency of positives")
    top.set_title(f"{title}, ECE {ece:.3f}")
    top.legend(loc="upper left")
    bottom.bar(centres.numpy(), count.numpy(), width=1.0 / num_bins, color="grey")
    bottom.set_yscale("log" if float(count.max()) > 100 else "linear")
    bottom.set_xlabel("predicted probability")
    bottom.set_ylabel("images")
    fig.tight_layout()
    return save_figure(fig, path)


def write_predictions(
    path: Path,
    report: FindingsReport,
    labels: torch.Tensor,
    names: Sequence[str],
    image_paths: Sequence[str] | None,
    patients: Sequence[str] | None,
) -> Path:
    """The per-image CSV: path, patient, then label, probability and decision per finding
    (a binary problem's one finding: ``label, probability, decision, decision_sens90...``).

    Labels are blank where unknown; paths and patients are blank when the split could not be
    matched to the predictions (unreadable images were skipped)."""
    flat = len(names) == 1
    points = list(report.decisions)

    def column(kind: str, name: str) -> str:
        return kind if flat else f"{kind}/{name}"

    header = ["path", "patient"]
    for name in names:
        header += [column("label", name), column("probability", name)]
        header += [column("decision" if p == "youden" else f"decision_{p}", name) for p in points]
    from mnv3.deploy.common import atomic_output  # the one home of atomic writes; lazy: start-up

    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i in range(report.probs.shape[0]):
            row = [
                image_paths[i] if image_paths is not None else "",
                patients[i] if patients is not None else "",
            ]
            for k in range(len(names)):
                label = float(labels[i, k])
                row += [str(int(label)) if label >= 0 else "", f"{float(report.probs[i, k]):.6f}"]
                row += [str(int(report.decisions[p][i, k])) for p in points]
            writer.writerow(row)
    return path


def write_report(path: Path, report: FindingsReport, settings: Mapping[str, Any]) -> Path:
    """Every number of the evaluation as JSON (per finding, intervals, how they were drawn)."""
    intervals = {}
    for metric, result in report.intervals.items():
        intervals[metric] = {
            "low": result.low.tolist(),
            "high": result.high.tolist(),
            "mean": [result.mean_value, result.mean_low, result.mean_high],
            "valid_resamples": result.valid.tolist(),
        }
    first = next(iter(report.intervals.values()), None)
    document = {
        "values": report.values,
        "per_finding": report.per_finding,
        "intervals": intervals,
        "bootstrap": None
        if first is None
        else {
            "resamples": first.num_resamples,
            "seed": first.seed,
            "level": first.level,
            "unit": first.unit,
            "units": first.num_units,
        },
        "settings": dict(settings),
    }
    from mnv3.deploy.common import atomic_write_text

    text = json.dumps(document, indent=2, default=float).replace("NaN", "null")
    return atomic_write_text(path, text + "\n")


def interval_caption(result: BootstrapResult) -> str:
    """How the intervals were drawn, in one line."""
    unit = (
        f"{result.num_units} patients"
        if result.by_patient
        else f"{result.num_units} images (no patient ids: images resampled)"
    )
    return (
        f"{result.level:.0%} percentile bootstrap intervals: {result.num_resamples} resamples of "
        f"{unit}, seed {result.seed}"
    )


def print_intervals(stage: str, report: FindingsReport, names: Sequence[str]) -> None:
    """AUROC and AUPRC of each finding (and their mean) with the bootstrap intervals, then the
    sensitivity and specificity of every operating point with theirs (``stage``: the split)."""
    from rich.console import Console
    from rich.table import Table

    auroc, auprc = report.intervals.get("auroc"), report.intervals.get("auprc")
    if auroc is None or auprc is None:
        return
    ci = "95 % CI" if auroc.level == 0.95 else f"{auroc.level:.0%} CI"
    table = Table(title=f"{stage}: AUROC and AUPRC", caption=interval_caption(auroc))
    for column in ("finding", "AUROC", ci, "AUPRC", ci):
        table.add_column(column, justify="left" if column == "finding" else "right")

    def cells(result: BootstrapResult, k: int | None) -> list[str]:
        if k is None:
            value, low, high = result.mean_value, result.mean_low, result.mean_high
        else:
            value, low, high = (float(result.value[k]), float(result.low[k]), float(result.high[k]))
        return [f"{value:.4f}", f"[{low:.4f}, {high:.4f}]"]

    for k, name in enumerate(names):
        table.add_row(name, *cells(auroc, k), *cells(auprc, k))
    if len(names) > 1:
        table.add_row("mean", *cells(auroc, None), *cells(auprc, None))
    console = Console()
    console.print(table)
    points = Table(
        title=f"{stage}: operating points chosen on validation",
        caption=f"{ci}: the same bootstrap, thresholds held fixed",
    )
    for column in ("finding", "point", "threshold", f"sensitivity ({ci})", f"specificity ({ci})"):
        points.add_column(column, justify="left" if column in ("finding", "point") else "right")
    for k, name in enumerate(names):
        for point in report.decisions:
            prefix = "" if point == "youden" else f"{point}/"
            sens = report.intervals.get(f"{prefix}sensitivity")
            spec = report.intervals.get(f"{prefix}specificity")
            if sens is None or spec is None:
                continue
            threshold = report.per_finding[name][f"{prefix}threshold"]
            points.add_row(
                name,
                point,
                f"{threshold:.3f}",
                *(
                    f"{float(r.value[k]):.3f} [{float(r.low[k]):.3f}, {float(r.high[k]):.3f}]"
                    for r in (sens, spec)
                ),
            )
    console.print(points)
