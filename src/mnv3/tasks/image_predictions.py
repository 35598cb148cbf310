"""Per-image predictions and their files: one home for what a user reads back image by image.

- :func:`write_top_k_csv`: a multi-class classifier's top-k classes and probabilities per image,
  the format of ``mnv3.eval``'s ``predictions_<split>.csv`` (with the true label) and of
  ``mnv3.predict``'s ``predictions.csv`` (without); binary and multi-label classifiers write the
  X-ray report's findings CSV instead (:func:`mnv3.tasks.xray_report.write_predictions`).
- :class:`ImagePredictions` and one subclass per task, in :data:`IMAGE_PREDICTIONS`: what
  ``mnv3.predict`` streams batches of a user's own images through, and the files each writes
  (a task adds an entry, the entry point has no task branch). Every file is written atomically
  (:mod:`mnv3.deploy.common`'s writers, or the COCO results writer evaluation uses).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

#: Classes listed per image in a multi-class classifier's predictions (fewer when it has fewer).
TOP_K = 5


def top_k_probabilities(logits: torch.Tensor, k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities of ``(N, C)`` logits: the ``min(k, C)`` largest and their classes,
    best first, each ``(N, min(k, C))``."""
    probs = torch.softmax(logits.float(), dim=1)
    return probs.topk(min(int(k), probs.shape[1]), dim=1)


def write_top_k_csv(
    path: Path,
    image_paths: Sequence[str] | None,
    probabilities: torch.Tensor,
    classes: torch.Tensor,
    class_names: Sequence[str],
    labels: torch.Tensor | None = None,
) -> Path:
    """One row per image: ``path``, the true ``label`` (when ``labels`` are given), then
    ``prediction_1, probability_1, ..., prediction_k, probability_k``, best first.

    Args:
        path: the CSV file, written atomically.
        image_paths: the images' paths in row order; None: the column is left blank (the
            evaluated split could not be matched to the predictions).
        probabilities: ``(N, k)`` from :func:`top_k_probabilities`.
        classes: ``(N, k)`` class indices of those probabilities.
        class_names: names by class index.
        labels: ``(N,)`` true class indices (evaluation), or None (predictions of new images).
    """
    from mnv3.deploy.common import atomic_output  # the one home of atomic writes; lazy: start-up

    k = int(probabilities.shape[1]) if probabilities.ndim == 2 else 0
    header = ["path"] + (["label"] if labels is not None else [])
    for rank in range(1, k + 1):
        header += [f"prediction_{rank}", f"probability_{rank}"]
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i in range(int(probabilities.shape[0])):
            row = [image_paths[i] if image_paths is not None else ""]
            if labels is not None:
                row.append(class_names[int(labels[i])])
            for rank in range(k):
                row += [class_names[int(classes[i, rank])], f"{float(probabilities[i, rank]):.6f}"]
            writer.writerow(row)
    return Path(path)


@dataclass(frozen=True)
class ImageItem:
    """One input image of a batch.

    Attributes:
        path: the file, as listed.
        name: where its outputs go under the output folder: its path relative to the inputs'
            folder, without the suffix (``street/frame_001``).
        size: the original ``(height, width)``, which outputs are given in.
        image_id: its number (COCO ``image_id``), the position in the input list counted from 1.
        original: the decoded uint8 ``(3, H, W)`` image, for predictions drawn on it (None when
            the task's writer does not draw).
    """

    path: str
    name: str
    size: tuple[int, int]
    image_id: int
    original: torch.Tensor | None = None


class ImagePredictions:
    """A task's predictions of new images: :meth:`add` a batch at a time, :meth:`finish` once.

    Args:
        task: the task (its class names, thresholds, palette and post-processing).
        network: the network to run, in eval mode, on the device the batches arrive on.
        out_dir: the run folder the files go into.
        settings: the entry point's options (``top_k``, ``alpha``).
    """

    #: whether :attr:`ImageItem.original` must be kept (the writer draws on the image)
    needs_original: ClassVar[bool] = False

    def __init__(
        self, task: Any, network: nn.Module, out_dir: Path, settings: Mapping[str, Any]
    ) -> None:
        self.task = task
        self.network = network
        self.out_dir = Path(out_dir)
        self.settings = dict(settings)

    def add(self, images: torch.Tensor, items: Sequence[ImageItem]) -> None:
        """Predict one batch of preprocessed ``(N, C, H, W)`` images (one size) and keep or
        write the results."""
        raise NotImplementedError

    def finish(self) -> list[Path]:
        """Write what was kept; returns the files and folders written."""
        raise NotImplementedError


class ClassPredictions(ImagePredictions):
    """``predictions.csv``: top-k classes and softmax probabilities per image (multi-class), or
    per finding the calibrated probability (the checkpoint's temperature) and the decision at
    each of its thresholds (binary and multi-label: the X-ray report's columns, labels blank)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.findings = bool(self.task.binary or self.task.multilabel)
        self.paths: list[str] = []
        self.parts: list[tuple[torch.Tensor, ...]] = []

    def add(self, images: torch.Tensor, items: Sequence[ImageItem]) -> None:
        logits = self.network(images).float().cpu()
        if self.findings:
            self.parts.append((self.task.finding_logits(logits),))
        else:
            self.parts.append(top_k_probabilities(logits, int(self.settings.get("top_k", TOP_K))))
        self.paths += [item.path for item in items]

    def finish(self) -> list[Path]:
        path = self.out_dir / "predictions.csv"
        columns = [torch.cat(column) for column in zip(*self.parts, strict=True)]
        if not self.findings:
            if not columns:  # no image was read: the header alone
                columns = [torch.empty(0, 0), torch.empty(0, 0, dtype=torch.long)]
            write_top_k_csv(path, self.paths, columns[0], columns[1], self.task.class_names)
            return [path]
        from mnv3.tasks.xray_report import write_predictions

        names = self.task.findings
        logits = columns[0] if columns else torch.empty(0, len(names))
        unknown = torch.full(logits.shape, -1.0)
        report = self.task.report_findings(logits, unknown)
        write_predictions(path, report, unknown, names, self.paths, None)
        return [path]


class DetectionPredictions(ImagePredictions):
    """``coco_results.json`` (COCO's results format: ``image_id``, the dataset's
    ``category_id``, ``bbox`` ``[x, y, w, h]`` in the original image's pixels, ``score``) and
    ``images.json`` (a COCO dataset without annotations: ``images`` with ``id``, ``file_name``,
    ``width``, ``height``, and ``categories``), so ``COCO("images.json").loadRes(...)`` reads it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.results: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []

    def add(self, images: torch.Tensor, items: Sequence[ImageItem]) -> None:
        from mnv3.data.coco import coco_results

        outputs = self.network(images)
        input_size = (int(images.shape[-2]), int(images.shape[-1]))
        sizes = [item.size for item in items]
        detections = self.task.model.postprocess(outputs, sizes, input_size=input_size)
        cpu = [{k: v.detach().cpu() for k, v in d.items()} for d in detections]
        ids = [item.image_id for item in items]
        self.results += coco_results(cpu, ids, self.task.category_table)
        for item in items:
            height, width = item.size
            file_name = f"{item.name}{Path(item.path).suffix}"
            self.images.append(
                {"id": item.image_id, "file_name": file_name, "width": width, "height": height}
            )

    def finish(self) -> list[Path]:
        from mnv3.data.coco import write_coco_results
        from mnv3.deploy.common import atomic_write_json

        results = write_coco_results(self.out_dir / "coco_results.json", self.results)
        dataset = {
            "info": {"description": "images predicted by mnv3.predict"},
            "images": self.images,
            "categories": self.task.coco_categories(),
        }
        return [results, atomic_write_json(self.out_dir / "images.json", dataset)]


class SegmentationPredictions(ImagePredictions):
    """Under ``predictions/``, per image at its original size: ``<name>_trainIds.png`` (the
    train-id map), ``<name>_labelIds.png`` when the dataset has label ids (as evaluation writes
    them) and ``<name>_overlay.png``, the image with the classes in the dataset's colours."""

    needs_original = True

    def add(self, images: torch.Tensor, items: Sequence[ImageItem]) -> None:
        from mnv3.tasks.common import save_png
        from mnv3.tasks.segmentation import colour_overlay

        logits = self.network(images)
        alpha = float(self.settings.get("alpha", 0.5))
        for scores, item in zip(logits, items, strict=True):
            stem = self.out_dir / "predictions" / item.name
            train_ids = self.task.write_label_maps(scores, item.size, stem)
            assert item.original is not None
            overlay = colour_overlay(item.original, train_ids, self.task.palette, alpha)
            save_png(overlay, stem.with_name(f"{stem.name}_overlay.png"))

    def finish(self) -> list[Path]:
        return [self.out_dir / "predictions"]


#: task name (:data:`mnv3.tasks.TASKS`) -> how ``mnv3.predict`` writes its predictions
IMAGE_PREDICTIONS: dict[str, type[ImagePredictions]] = {
    "classification": ClassPredictions,
    "detection": DetectionPredictions,
    "segmentation": SegmentationPredictions,
}
