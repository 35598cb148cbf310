"""Predict your own images with a trained run or released weights, for every task.

``python -m mnv3.predict ckpt_path=logs/train/runs/<run>/checkpoints/best.ckpt input=photos/``

``input`` is a folder (searched recursively for the image files the data loaders read: JPEG,
PNG incl. 16-bit, TIFF, BMP, WebP, DICOM...), a glob (``'input=photos/**/*.jpg'``) or a CSV
whose ``path`` column, else its first column, lists the images (relative paths are relative to
the CSV's folder). Each image is read as the run's data was read (its dataset family's
``wide_gray`` for 16-bit files) and preprocessed exactly as in evaluation (the data module's own
``eval_transform``, as ``mnv3.explain`` does for one image), in batches of ``data.batch_size``.

Without ``ckpt_path`` the backbone / head / data groups name released or local weights, as for
``mnv3.eval`` (:func:`mnv3.eval.task_with_weights`: a known checkpoint brings its preprocessing).

What is written into the run folder (``${paths.output_dir}``) is the task's
(:data:`mnv3.tasks.image_predictions.IMAGE_PREDICTIONS`): ``predictions.csv`` (classification),
``coco_results.json`` + ``images.json`` (detection), label-map and overlay PNGs under
``predictions/`` (segmentation); ``skipped.txt`` lists the files that could not be read (skipped,
counted, never a crash). See docs/predict.md.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from mnv3.cli import command_line_overrides, exit_on_user_error, run_tool_main
from mnv3.data.folder import IMAGE_EXTENSIONS, is_image_file, walk_once
from mnv3.errors import ConfigError
from mnv3.tasks.image_predictions import IMAGE_PREDICTIONS, ImageItem
from mnv3.validate import check_accelerator, check_values

log = logging.getLogger("mnv3.predict")

INPUT_EXPECTED = "a folder of images, a glob of image files or a CSV of image paths"
SKIPPED_FILE = "skipped.txt"


# --- what to predict: the input's image files --------------------------------------------------


@dataclass(frozen=True)
class InputImages:
    """The image files of ``input=``, in order, and the folder their output names start from.

    Attributes:
        paths: the files (a CSV may list missing ones: they are skipped when read).
        root: the folder the inputs share (the folder given, else the files' common folder);
            outputs are named by the path below it.
        source: ``input=`` as given, for the printout.
    """

    paths: list[Path]
    root: Path
    source: str

    def names(self) -> list[str]:
        """Each file's output name: its path below :attr:`root` without the suffix
        (``street/frame_001``); with the suffix where two files would share a name."""
        relative = [_below(path, self.root) for path in self.paths]
        stems = [str(Path(r).with_suffix("")) for r in relative]
        counts: dict[str, int] = {}
        for stem in stems:
            counts[stem] = counts.get(stem, 0) + 1
        return [
            stem if counts[stem] == 1 else rel for stem, rel in zip(stems, relative, strict=True)
        ]


def _below(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` as a POSIX string (the file name when it is not below)."""
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:  # another drive (Windows)
        return path.name


def _common_folder(paths: Sequence[Path]) -> Path:
    """The deepest folder holding every one of ``paths``."""
    try:
        return Path(os.path.commonpath([str(p.parent) for p in paths]))
    except ValueError:  # mixed drives or relative and absolute paths
        return Path(".")


def list_inputs(spec: Any) -> InputImages:
    """The image files of ``input=``: a folder (recursive), one image, a CSV of paths or a glob.

    Raises:
        ConfigError: ``input`` is unset, does not exist, or names no image file (one sentence).
    """
    if spec is None or str(spec).strip() == "":
        raise ConfigError(f"input is not set; expected input=<{INPUT_EXPECTED}>")
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        files = [
            Path(folder) / name
            for folder, names in walk_once(path)
            for name in names
            if is_image_file(name)
        ]
        if not files:
            raise ConfigError(
                f"input={text} holds no image file (searched recursively for "
                f"{', '.join(IMAGE_EXTENSIONS)})"
            )
        return InputImages(sorted(files), path, text)
    if path.is_file() and path.suffix.lower() == ".csv":
        files = _csv_paths(path)
        return InputImages(files, _common_folder(files), text)
    if path.is_file():
        if not is_image_file(path.name):
            raise ConfigError(
                f"input={text} is neither an image file nor a .csv; expected {INPUT_EXPECTED}"
            )
        return InputImages([path], path.parent, text)
    if not glob.has_magic(text):
        raise ConfigError(f"input={text} does not exist; expected {INPUT_EXPECTED}")
    matches = glob.glob(os.path.expanduser(text), recursive=True)
    files = sorted(Path(m) for m in matches if os.path.isfile(m) and is_image_file(Path(m).name))
    if not files:
        raise ConfigError(
            f"input={text} matches no image file ({len(matches)} match(es) in all); expected "
            f"{INPUT_EXPECTED}"
        )
    return InputImages(files, _common_folder(files), text)


def _csv_paths(path: Path) -> list[Path]:
    """The image paths a CSV lists: its ``path`` column (any case), else its first column; a
    first row that is no image file name is a header. Relative paths: from the CSV's folder."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    column = 0
    if rows:
        header = [cell.strip().lower() for cell in rows[0]]
        if "path" in header:
            column, rows = header.index("path"), rows[1:]
        elif not is_image_file(Path(rows[0][0].strip()).name):
            rows = rows[1:]
    cells = [row[column].strip() for row in rows if len(row) > column and row[column].strip()]
    if not cells:
        raise ConfigError(
            f"input={path} lists no image path; expected a CSV whose 'path' column (or first "
            "column) names image files"
        )
    return [path.parent / Path(cell).expanduser() for cell in cells]


# --- reading and preprocessing, batch by batch ------------------------------------------------


class ImageFiles(Dataset[dict[str, Any]]):
    """The input files, each read as the run's data was read and preprocessed as in evaluation.

    A sample is ``{"image": the preprocessed tensor, "item": ImageItem}``, or ``{"skipped":
    (path, reason)}`` for a file that is missing or cannot be decoded.

    Args:
        inputs: the files and their output names.
        transform: the data module's ``eval_transform`` (takes a ``tv_tensors.Image``).
        wide_gray: how 16-bit images become 8-bit (the run's dataset family's).
        keep_original: also pass on the decoded image (predictions drawn on it).
    """

    def __init__(
        self, inputs: InputImages, transform: Any, wide_gray: str, keep_original: bool
    ) -> None:
        self.paths = [str(p) for p in inputs.paths]
        self.names = inputs.names()
        self.transform = transform
        self.wide_gray = wide_gray
        self.keep_original = keep_original

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from torchvision import tv_tensors

        from mnv3.data.errors import UnreadableImageError
        from mnv3.data.io import load_rgb

        path = self.paths[index]
        if not os.path.isfile(path):
            return {"skipped": (path, "no such file")}
        try:
            raw = load_rgb(path, wide=self.wide_gray)
        except UnreadableImageError as exc:
            return {"skipped": (path, exc.reason)}
        # A tv_tensors.Image: the dense tasks' presets resize images and leave other tensors be.
        image = self.transform(tv_tensors.Image(raw)).as_subclass(torch.Tensor)
        size = (int(raw.shape[-2]), int(raw.shape[-1]))
        original = raw if self.keep_original else None
        item = ImageItem(path, self.names[index], size, index + 1, original)
        return {"image": image, "item": item}


def collate_images(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A batch: the preprocessed images (a list: sizes may differ), their items, the skipped."""
    kept = [s for s in samples if "image" in s]
    return {
        "images": [s["image"] for s in kept],
        "items": [s["item"] for s in kept],
        "skipped": [s["skipped"] for s in samples if "skipped" in s],
    }


def same_size_groups(
    images: Sequence[torch.Tensor], items: Sequence[ImageItem]
) -> Iterator[tuple[torch.Tensor, list[ImageItem]]]:
    """The batch as stacked groups of one image size each (a segmentation run evaluates whole
    images, whose sizes may differ; classification and detection resize to one size)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    for indices in groups.values():
        yield torch.stack([images[i] for i in indices]), [items[i] for i in indices]


class BatchProgress:
    """Progress over the batches: rich's bar on a terminal; on a log file or pipe a plain line
    every ``every`` batches and at the end (images done, skipped, images per second)."""

    def __init__(self, total: int, every: int) -> None:
        from mnv3.progress import stdout_is_interactive

        self.total, self.every = int(total), int(every)
        self.batches = self.images = self.skipped = 0
        self.start = time.monotonic()
        self.bar: Any = None
        if stdout_is_interactive():
            from rich.progress import Progress

            self.bar = Progress()
            self.bar_task = self.bar.add_task("predicting", total=self.total)

    def __enter__(self) -> BatchProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    @property
    def rate(self) -> float:
        """Images per second so far."""
        return self.images / max(time.monotonic() - self.start, 1e-9)

    def update(self, images: int, skipped: int) -> None:
        """One batch done: ``images`` predicted, ``skipped`` unreadable."""
        self.batches += 1
        self.images += images
        self.skipped += skipped
        if self.bar is not None:
            self.bar.advance(self.bar_task)
        elif self.batches % self.every == 0 or self.batches == self.total:
            log.info(
                "predict: batch %d/%d, %d images, %d skipped, %.1f images/s",
                self.batches,
                self.total,
                self.images,
                self.skipped,
                self.rate,
            )


# --- the entry point ---------------------------------------------------------------------------


def _open_model(cfg: DictConfig) -> tuple[Any, torch.nn.Module, Any, str]:
    """The task, the network it evaluates with (eval mode), its data module and a title: from
    ``ckpt_path`` (the run's config, :class:`~mnv3.trained_run.TrainedRun`), else the weights the
    groups name (:func:`mnv3.eval.task_with_weights`)."""
    if cfg.get("ckpt_path"):
        from mnv3.trained_run import TrainedRun

        run = TrainedRun.open(cfg.ckpt_path, cfg.get("data"))
        check_values(OmegaConf.create({"data": run.data_config}))
        return run.task, run.network, run.datamodule(), str(run.ckpt_path)
    from mnv3.eval import task_with_weights

    loaded = task_with_weights(cfg, command_line_overrides(), tool="mnv3.predict")
    network = loaded.task.evaluated_network.eval()
    return loaded.task, network, loaded.datamodule, loaded.name


def _device(cfg: DictConfig) -> torch.device:
    """The device of ``trainer.accelerator`` (``auto``: a GPU where one is visible)."""
    from mnv3.accelerator import resolve_device

    choice = resolve_device(cfg, training=False)
    check_accelerator(cfg)
    accelerator = choice.accelerator if choice is not None else "cpu"
    return torch.device({"gpu": "cuda", "cuda": "cuda", "mps": "mps"}.get(accelerator, "cpu"))


def write_skipped(path: Path, skipped: Sequence[tuple[str, str]]) -> Path:
    """``skipped.txt``: one ``<path>\\t<reason>`` line per file that was not predicted."""
    from mnv3.deploy.common import atomic_write_text

    return atomic_write_text(path, "".join(f"{p}\t{reason}\n" for p, reason in skipped))


@exit_on_user_error
def predict(cfg: DictConfig) -> dict[str, Any]:
    """Predict every image of ``cfg.input`` and write the task's prediction files.

    Returns ``{"images": predicted count, "skipped": [(path, reason)], "outputs": [files],
    "output_dir": the run folder}``.
    """
    check_values(cfg)  # top_k, alpha, data and trainer overrides: before anything is read
    inputs = list_inputs(cfg.get("input"))
    device = _device(cfg)
    task, network, datamodule, title = _open_model(cfg)
    out_dir = Path(cfg.paths.output_dir)
    writer_class = IMAGE_PREDICTIONS[datamodule.task]
    network = network.to(device)
    settings = {"top_k": int(cfg.get("top_k", 5)), "alpha": float(cfg.get("alpha", 0.5))}
    writer = writer_class(task, network, out_dir, settings)
    files = ImageFiles(
        inputs, datamodule.eval_transform, datamodule.family.wide_gray, writer.needs_original
    )
    loader = DataLoader(
        files,
        batch_size=datamodule.batch_size,
        num_workers=datamodule.num_workers,
        collate_fn=collate_images,
    )
    log.info(
        "predicting %d file(s) of input=%s with %s on %s, %d per batch",
        len(files),
        inputs.source,
        title,
        device,
        datamodule.batch_size,
    )
    skipped: list[tuple[str, str]] = []
    every = int(cfg.get("progress_every_n_batches", 10))
    with torch.inference_mode(), BatchProgress(len(loader), every) as progress:
        for batch in loader:
            for images, items in same_size_groups(batch["images"], batch["items"]):
                writer.add(images.to(device), items)
            skipped += batch["skipped"]
            progress.update(len(batch["items"]), len(batch["skipped"]))
    outputs = writer.finish()
    skipped_path = write_skipped(out_dir / SKIPPED_FILE, skipped)
    predicted = len(files) - len(skipped)
    print(
        f"predicted {predicted} of {len(files)} image(s) of input={inputs.source} with {title} "
        f"({progress.rate:.1f} images/s)"
    )
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s), listed in {skipped_path}:")
        for path, reason in skipped[:5]:
            print(f"  {path}: {reason}")
        if len(skipped) > 5:
            print(f"  ... and {len(skipped) - 5} more")
    print("written: " + ", ".join(str(p) for p in outputs))
    if predicted == 0:
        raise ConfigError(
            f"none of the {len(files)} file(s) of input={inputs.source} could be read (listed "
            f"in {skipped_path}); expected {INPUT_EXPECTED}"
        )
    return {"images": predicted, "skipped": skipped, "outputs": outputs, "output_dir": out_dir}


main = run_tool_main(predict, "predict")


if __name__ == "__main__":
    main()
