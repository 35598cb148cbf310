"""Training throughput: our Lightning tasks vs plain PyTorch loops on the same in-memory batches.

Workloads (``--models``; adding one is one entry of :data:`WORKLOADS`):

- ``small`` / ``large``: ``ClassificationTask`` on MobileNetV3-Small / -Large, 1000 classes,
  224x224, batch 32, AdamW, label smoothing 0.1, vs a plain loop over torchvision's same model.
- ``ssdlite-small``: ``DetectionTask`` on SSDLite 320 with a reduced-tail MobileNetV3-Small,
  6 object classes, batch 8, AdamW, random boxes (1-5 per image), vs two plain loops: one over
  torchvision's SSDLite with that backbone (its list API: transform, matching and loss inside,
  the images handed over in [0, 1]), and one over *our* detector called directly
  (``model(batch)`` + ``model.loss``), which isolates what Lightning and the task cost.
- ``lraspp-large``: ``SegmentationTask`` on LR-ASPP built as torchvision builds it (global gate
  pooling, full tail, OS16), 19 classes, batch 4 of 256x256, cross-entropy with 255 ignored, vs a
  plain loop over torchvision's ``lraspp_mobilenet_v3_large``.

Every side trains on the same pre-made batches held in memory, so the numbers compare the
training step itself (loop, loss, metrics, logging, scheduler) and not data loading (see
bench_data.py for that). Rounds alternate which side runs first (the side that runs first in a
process pays for its allocator warm-up: a fixed order once showed ours at 0.88x where an
alternating order shows 1.0x), and glibc's malloc thresholds are pinned as in bench_models.py;
the median images/s per side is reported with the ratio ours / plain.

    python bench/bench_train.py --out bench/results [--steps 8] [--rounds 5] [--threads 1]
        [--models small large ssdlite-small lraspp-large]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torchvision
from bench_dense import torchvision_ssdlite
from common import write_results
from torch.utils.data import DataLoader, Dataset

from mnv3.cpus import cpu_model, pin_malloc
from mnv3.models import ssdlite320
from mnv3.tasks import ClassificationTask, DetectionTask

Batch = dict[str, Any]
GOAL = 0.95  # ours / plain images per second (issues 8 and 9)


class FixedBatches(Dataset):
    """``n`` pre-made batches served as already-collated dict batches (no decode, no copy)."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Batch:
        return self.batches[i]


class StepTimer(pl.Callback):
    """Wall time of each training step after ``warmup`` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._start = warmup, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._start)


# A plain side: build the model and optimizer, return the function that runs one step (and
# returns its loss).
PlainStep = Callable[[], Callable[[Batch], torch.Tensor]]


@dataclass(frozen=True)
class Workload:
    key: str  # the --models name
    label: str
    task: str  # our side, for the table
    batch: int
    size: int
    make_batches: Callable[[int], list[Batch]]
    build_task: Callable[[], pl.LightningModule]
    plain: dict[str, PlainStep]  # description -> one plain loop


# --------------------------------------------------------------------------- classification

CLASSES, CLS_BATCH, CLS_SIZE = 1000, 32, 224


def classification_batches(n: int) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randn(CLS_BATCH, 3, CLS_SIZE, CLS_SIZE, generator=g),
            "label": torch.randint(0, CLASSES, (CLS_BATCH,), generator=g),
            "skipped": 0,
        }
        for _ in range(n)
    ]


def classification_task(name: str) -> ClassificationTask:
    return ClassificationTask(
        model={"name": f"mobilenet_v3_{name}"},
        num_classes=CLASSES,
        optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
        scheduler={"name": "cosine", "warmup_epochs": 0},
        label_smoothing=0.1,
    )


def adamw_step(
    model: torch.nn.Module, loss_of: Callable[[Batch], torch.Tensor], weight_decay: float = 0.01
) -> Callable[[Batch], torch.Tensor]:
    """The plain loop's step for ``model`` (put in train mode): loss, backward, AdamW update."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=weight_decay)

    def step(batch: Batch) -> torch.Tensor:
        loss = loss_of(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def torchvision_classifier_step(name: str) -> Callable[[Batch], torch.Tensor]:
    model = getattr(torchvision.models, f"mobilenet_v3_{name}")(num_classes=CLASSES)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    return adamw_step(model, lambda b: criterion(model(b["image"]), b["label"]), weight_decay=0.05)


def classification(name: str) -> Workload:
    return Workload(
        key=name,
        label=f"MobileNetV3-{name.title()}",
        task="ClassificationTask",
        batch=CLS_BATCH,
        size=CLS_SIZE,
        make_batches=classification_batches,
        build_task=lambda: classification_task(name),
        plain={"torchvision's model": lambda: torchvision_classifier_step(name)},
    )


# --------------------------------------------------------------------------- detection

DET_CLASSES, DET_BATCH, DET_SIZE = 6, 8, 320


def detection_batches(n: int) -> list[Batch]:
    """Batches as the detection collate makes them (images in [-1, 1], boxes in input pixels),
    plus ``image01``: the same images in [0, 1] for torchvision's list API."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        images01 = torch.rand(DET_BATCH, 3, DET_SIZE, DET_SIZE, generator=g)
        boxes, labels = [], []
        for _ in range(DET_BATCH):
            count = int(torch.randint(1, 6, (), generator=g))
            xy = torch.rand(count, 2, generator=g) * (DET_SIZE - 64)
            wh = 16 + torch.rand(count, 2, generator=g) * 160
            boxes.append(torch.cat((xy, (xy + wh).clamp(max=DET_SIZE)), dim=1))
            labels.append(torch.randint(1, DET_CLASSES + 1, (count,), generator=g))
        batches.append(
            {
                "image": images01 * 2 - 1,
                "image01": list(images01),
                "boxes": boxes,
                "labels": labels,
                "skipped": 0,
            }
        )
    return batches


def detection_task() -> DetectionTask:
    return DetectionTask(
        model={
            "detector": "ssdlite320",
            "backbone": "mobilenet_v3_small",
            "reduced_tail": True,
            "image_size": [DET_SIZE, DET_SIZE],
        },
        num_classes=DET_CLASSES,
        optimizer={"name": "adamw", "lr": 1e-3},
    )


def _targets(batch: Batch) -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": b, "labels": lb} for b, lb in zip(batch["boxes"], batch["labels"], strict=True)
    ]


def torchvision_ssdlite_step() -> Callable[[Batch], torch.Tensor]:
    model = torchvision_ssdlite("mobilenet_v3_small", DET_CLASSES + 1)

    def loss_of(batch: Batch) -> torch.Tensor:
        losses = model(batch["image01"], _targets(batch))
        return losses["bbox_regression"] + losses["classification"]

    return adamw_step(model, loss_of)


def our_ssdlite_step() -> Callable[[Batch], torch.Tensor]:
    model = ssdlite320(
        backbone="mobilenet_v3_small", num_classes=DET_CLASSES + 1, reduced_tail=True
    )
    return adamw_step(model, lambda b: model.loss(model(b["image"]), _targets(b))["loss"])


# --------------------------------------------------------------------------- segmentation

SEG_CLASSES, SEG_BATCH, SEG_SIZE = 19, 4, 256  # Cityscapes' classes; 256x256 crops keep it short


def segmentation_batches(n: int) -> list[Batch]:
    """Images in [-1, 1] and label maps with 5% of the pixels ignored (255), as Cityscapes'."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        mask = torch.randint(0, SEG_CLASSES, (SEG_BATCH, SEG_SIZE, SEG_SIZE), generator=g)
        mask[torch.rand(mask.shape, generator=g) < 0.05] = 255
        image = torch.rand(SEG_BATCH, 3, SEG_SIZE, SEG_SIZE, generator=g) * 2 - 1
        batches.append({"image": image, "mask": mask, "skipped": 0})
    return batches


def segmentation_task() -> pl.LightningModule:
    from mnv3.tasks.segmentation import SegmentationTask

    return SegmentationTask(
        model={
            "segmenter": "lraspp",
            "backbone": "mobilenet_v3_large",
            "pool": "global",
            "reduced_tail": False,
            "low_tap": "C3_first",
        },
        num_classes=SEG_CLASSES,
        optimizer={"name": "adamw", "lr": 1e-3},
    )


def torchvision_lraspp_step() -> Callable[[Batch], torch.Tensor]:
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=SEG_CLASSES
    )
    return adamw_step(
        model,
        lambda b: torch.nn.functional.cross_entropy(
            model(b["image"])["out"], b["mask"], ignore_index=255
        ),
    )


WORKLOADS: dict[str, Workload] = {
    w.key: w
    for w in (
        classification("small"),
        classification("large"),
        Workload(
            key="ssdlite-small",
            label="SSDLite 320, MobileNetV3-Small reduced",
            task="DetectionTask",
            batch=DET_BATCH,
            size=DET_SIZE,
            make_batches=detection_batches,
            build_task=detection_task,
            plain={
                "torchvision's SSDLite": torchvision_ssdlite_step,
                "our detector called directly": our_ssdlite_step,
            },
        ),
        Workload(
            key="lraspp-large",
            label="LR-ASPP, MobileNetV3-Large (torchvision's config)",
            task="SegmentationTask",
            batch=SEG_BATCH,
            size=SEG_SIZE,
            make_batches=segmentation_batches,
            build_task=segmentation_task,
            plain={"torchvision's LR-ASPP": torchvision_lraspp_step},
        ),
    )
}


# --------------------------------------------------------------------------- timing


def ours_images_per_s(w: Workload, batches: list[Batch], warmup: int) -> float:
    """Median images/s of the Lightning task over ``batches`` after ``warmup`` steps."""
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    loader = DataLoader(FixedBatches(batches), batch_size=None, shuffle=False)
    trainer.fit(w.build_task(), train_dataloaders=loader)
    return w.batch / statistics.median(timer.times)


def plain_images_per_s(w: Workload, build: PlainStep, batches: list[Batch], warmup: int) -> float:
    """Median images/s of a plain loop (one ``build()`` step function) over ``batches``."""
    step = build()
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        step(batch)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return w.batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--models", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS), metavar="NAME"
    )
    parser.add_argument("--steps", type=int, default=8, help="measured steps per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default torch's, one per core); 1 on a machine other processes "
        "share: with every core asked for, a descheduled OpenMP thread stalls each op",
    )
    parser.add_argument(
        "--default-malloc", action="store_true", help="do not pin glibc's malloc thresholds"
    )
    args = parser.parse_args()
    allocator = "glibc default" if args.default_malloc else pin_malloc()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    for key in args.models:
        w = WORKLOADS[key]
        batches = w.make_batches(args.warmup + args.steps)
        sides: list[tuple[str, Callable[[], float]]] = [
            (w.task, lambda w=w, b=batches: ours_images_per_s(w, b, args.warmup))
        ]
        sides += [
            (name, lambda w=w, build=build, b=batches: plain_images_per_s(w, build, b, args.warmup))
            for name, build in w.plain.items()
        ]
        speeds: dict[str, list[float]] = {name: [] for name, _ in sides}
        for r in range(args.rounds):  # alternate the order so noise and warm-up hit all alike
            for name, run in sides if r % 2 == 0 else sides[::-1]:
                speeds[name].append(run())
        ours = statistics.median(speeds[w.task])
        for name in w.plain:
            plain = statistics.median(speeds[name])
            rows.append(
                {
                    "model": w.label,
                    "ours": w.task,
                    "plain": name,
                    "batch": w.batch,
                    "size": w.size,
                    "ours_img_s": ours,
                    "plain_img_s": plain,
                    "ratio": ours / plain,
                }
            )
            print(
                f"{w.label}: ours {ours:.1f} img/s, plain loop over {name} {plain:.1f} img/s, "
                f"ratio {ours / plain:.3f}",
                flush=True,
            )

    lines = [
        f"Training throughput, CPU, AdamW, in-memory batches; median of {args.rounds} rounds x "
        f"{args.steps} steps (after {args.warmup} warm-up steps), the side that runs first "
        "alternating.",
        "",
        "| model | batch, size | ours (img/s) | plain PyTorch loop over (img/s) | ratio ours/plain "
        f"| goal >= {GOAL} |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        verdict = "met" if r["ratio"] >= GOAL else "MISSED"
        lines.append(
            f"| {r['model']} | {r['batch']}, {r['size']}x{r['size']} "
            f"| {r['ours']}: {r['ours_img_s']:.1f} | {r['plain']}: {r['plain_img_s']:.1f} "
            f"| {r['ratio']:.3f} | {verdict} |"
        )
    lines += [
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"allocator: {allocator}.",
        f"Command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
    ]
    text = "\n".join(lines)
    print(text)
    write_results(args.out, "bench_train", text, rows)


if __name__ == "__main__":
    main()
