"""What every exporter shares: the error type, atomic file writes and the preprocessing sidecar.

An exported file is useless without the preprocessing it was trained with, so each one gets a
``<file>.json`` beside it. Both are written to a temporary file in the same folder and renamed,
so a failed export never leaves a half-written file where a user or a phone build looks for it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision.ops import batched_nms

from mnv3.models.detection.ssdlite import scale_boxes

# The network's output stride: a smaller input leaves no pixel for the last stage.
MIN_INPUT_SIZE = 32


class ExportError(ValueError):
    """A model, input size, calibration set or output path that cannot be exported (one sentence)."""


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Where the preprocessing json of an exported file lives: ``<file>.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def check_input_size(
    input_size: tuple[int, int], model: torch.nn.Module | None = None
) -> tuple[int, int]:
    """``(H, W)`` as ints, refused when smaller than the network's stride of 32.

    ``model`` that is a part of a network, not a whole one (a block the per-block latency
    table times on its 7x7 input), needs only a non-empty input. Whole networks are the ones
    with an ``arch`` (a backbone / classifier) or a ``backbone`` (a detector, a segmenter).
    """
    if model is not None and not any(hasattr(model, a) for a in ("arch", "backbone", "detector")):
        h, w = (int(v) for v in input_size)
        if min(h, w) < 1:
            raise ExportError(f"input size {h}x{w} is empty; expected at least 1x1")
        return h, w
    h, w = (int(v) for v in input_size)
    if min(h, w) < MIN_INPUT_SIZE:
        raise ExportError(
            f"input size {h}x{w} is smaller than the network's output stride "
            f"{MIN_INPUT_SIZE}; expected at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}"
        )
    return h, w


def check_calibration(calibration: Sequence[torch.Tensor]) -> None:
    """Refuse an empty calibration set with one sentence."""
    if not calibration or sum(int(b.shape[0]) for b in calibration) == 0:
        raise ExportError("the calibration set is empty; expected at least one image")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    Missing parent folders are created. A folder that cannot hold the file (a file in the way,
    no permission, read-only disk) is one :class:`ExportError`; the temporary file is removed on
    any failure.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise ExportError(
            f"output path {path} cannot be written ({exc.strerror or exc}); "
            "expected a writable folder"
        ) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_output`): a kill leaves the old file."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write plain JSON ``data`` (indented, one trailing newline) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def atomic_write_csv(
    path: str | os.PathLike[str], columns: Sequence[str], rows: Iterable[Mapping[str, Any]]
) -> Path:
    """Write ``rows`` under the header ``columns`` atomically; floats rounded to 5 decimals,
    keys outside ``columns`` left out (the search logs' CSV files)."""
    import csv
    import io

    text = io.StringIO()
    writer = csv.DictWriter(text, list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(
        {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()} for row in rows
    )
    return atomic_write_text(path, text.getvalue())


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (weights a killed run never half-writes)."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def write_sidecar(path: str | os.PathLike[str], metadata: Mapping[str, Any]) -> Path:
    """Write ``metadata`` (plain JSON values) atomically as ``<path>.json``; return its path."""
    target = sidecar_path(path)
    text = json.dumps(dict(metadata), indent=2, sort_keys=True) + "\n"
    return atomic_write_text(target, text)


def read_sidecar(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The preprocessing json written beside an exported file."""
    return json.loads(sidecar_path(path).read_text())


def example_input(
    input_size: tuple[int, int], batch: int = 1, channels: int = 3, seed: int = 0
) -> torch.Tensor:
    """A fixed random ``(batch, channels, H, W)`` input for tracing and parity checks."""
    h, w = check_input_size(input_size)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, h, w, generator=generator)


def batch_dim(example_input: torch.Tensor) -> tuple[dict[int, Any]]:
    """``torch.export`` dynamic shapes: dimension 0 of the one input is a batch of 1 to 1024."""
    return ({0: torch.export.Dim("batch", min=1, max=1024)},)


def two_rows(example_input: torch.Tensor) -> torch.Tensor:
    """A batch of at least two: torch.export specialises a batch of one to a constant."""
    if example_input.shape[0] >= 2:
        return example_input
    return example_input.expand(2, *example_input.shape[1:]).contiguous()


def fixed_batches(calibration: Sequence[torch.Tensor], batch: int) -> list[torch.Tensor]:
    """Calibration images regrouped into feeds of exactly ``batch`` images, for a graph whose
    batch is fixed: every image is used (repeated to fill one feed when there are fewer than
    ``batch``; min / max observers see the same ranges), the last partial feed is dropped."""
    images = torch.cat(list(calibration))
    if images.shape[0] < batch:
        images = images.repeat(math.ceil(batch / images.shape[0]), 1, 1, 1)
    return list(images[: images.shape[0] // batch * batch].split(batch))


def calibration_batches(
    datamodule: Any, num_images: int, split: str = "val", batch_size: int = 8
) -> list[torch.Tensor]:
    """The first ``num_images`` images of a data module's split through its eval transform.

    ``datamodule``: an :class:`mnv3.data.DataModule` (any object with ``prepare_data`` and
    ``get_dataset(split)`` returning ``{"image": ...}`` samples, ``None`` for unreadable ones).
    Returns batches of at most ``batch_size`` preprocessed ``(B, C, H, W)`` images; an empty or
    missing split is one :class:`ExportError`.
    """
    if int(num_images) < 1:
        raise ExportError(f"calibration_images={num_images}; expected at least 1 image")
    datamodule.prepare_data()
    dataset = datamodule.get_dataset(split)
    images: list[torch.Tensor] = []
    for index in range(len(dataset)):
        if len(images) >= num_images:
            break
        sample = dataset[index]
        if sample is not None:
            images.append(sample["image"])
    if not images:
        root = getattr(getattr(datamodule, "spec", None), "root", "the data root")
        raise ExportError(
            f"the calibration set ({split} split of {root}) is empty; expected at least one image"
        )
    return [torch.stack(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]


def postprocess_detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    input_size: tuple[int, int],
    image_sizes: Sequence[tuple[int, int]] | None = None,
    score_thresh: float = 0.001,
    nms_thresh: float = 0.55,
    topk_candidates: int = 300,
    detections_per_img: int = 300,
) -> list[dict[str, torch.Tensor]]:
    """Detections from an exported SSDLite's outputs, as ``SSDLite.postprocess`` makes them.

    The step every runtime does after the graph (NMS stays outside it): ``boxes`` (N, A, 4)
    xyxy in the ``input_size`` (h, w) pixels and ``scores`` (N, A, C - 1) without the
    background. Per class the ``topk_candidates`` best scores above ``score_thresh``, per-class
    NMS at ``nms_thresh``, then the ``detections_per_img`` best; boxes scaled into each
    ``image_sizes`` (h, w) (default: the input size). Returns per image ``{boxes, scores,
    labels}``, labels counting the background as 0, as the model's.
    """
    sizes = list(image_sizes) if image_sizes is not None else [input_size] * scores.shape[0]
    if len(sizes) != scores.shape[0]:
        raise ValueError(f"got {len(sizes)} image sizes for {scores.shape[0]} images")
    k = min(int(topk_candidates), scores.shape[1])
    top_scores, top_idx = scores.topk(k, dim=1)  # (N, k, C-1), best first per class
    # Class-major order (class 1's candidates first), as SSDLite.postprocess.
    top_scores, top_idx = top_scores.transpose(1, 2), top_idx.transpose(1, 2)
    labels = torch.arange(1, scores.shape[2] + 1, device=scores.device)[:, None].expand(-1, k)
    detections = []
    for i, size in enumerate(sizes):
        keep = top_scores[i] > score_thresh
        cand_scores, cand_labels = top_scores[i][keep], labels[keep]
        cand_boxes = boxes[i][top_idx[i][keep]]
        kept = batched_nms(cand_boxes, cand_scores, cand_labels, nms_thresh)[:detections_per_img]
        detections.append(
            {
                "boxes": scale_boxes(cand_boxes[kept], input_size, tuple(size)),
                "scores": cand_scores[kept],
                "labels": cand_labels[kept],
            }
        )
    return detections
