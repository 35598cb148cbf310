"""Semantic segmentation: per-pixel cross-entropy, mIoU over the whole split (one confusion matrix,
as Cityscapes' official evaluation), per-class IoU, pixel accuracy, colour-mask pictures and
label-map predictions; everything else comes from :class:`~mnv3.tasks.base.BaseTask`.
"""

from __future__ import annotations

import colorsys
import csv
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from mnv3.models.segmentation.builders import BACKBONE_LIMITS, BACKBONE_LIMITS_WHY
from mnv3.tasks.base import BaseTask, QATObjective
from mnv3.tasks.common import check_plain, log_images, save_figure, save_png

log = logging.getLogger(__name__)

IGNORE_INDEX = 255


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labelled pixels (``IGNORE_INDEX`` left out), and 0 for a batch
    with none.

    A random crop of a real Cityscapes frame can be all void; ``F.cross_entropy`` then divides 0
    by 0 and returns NaN, which stopped training with advice about the learning rate. The zero
    keeps the autograd graph (``logits.sum() * 0``), so every DDP rank still runs its backward.
    """
    if bool((masks != IGNORE_INDEX).any()):
        return F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)
    return logits.sum() * 0.0


def default_palette(num_classes: int) -> list[list[int]]:
    """Distinct colours (evenly spaced hues) for datasets that bring no palette of their own."""
    colours = []
    for i in range(num_classes):
        r, g, b = colorsys.hsv_to_rgb(i / max(1, num_classes), 0.75, 0.95)
        colours.append([round(255 * r), round(255 * g), round(255 * b)])
    return colours


class SegmentationTask(BaseTask):
    """LR-ASPP / R-ASPP trained with cross-entropy (255 ignored) and judged by mIoU.

    ``val/miou`` is torchmetrics' :class:`MulticlassJaccardIndex` accumulated over the whole split
    (a dataset-level confusion matrix, not a mean of per-image IoUs), averaged over the classes
    that occur in the split's labels or predictions (a class absent from both is left out, as
    the official script's NaN classes are). Also logged: per-class IoU and pixel accuracy.

    Args:
        model: segmenter builder kwargs: ``segmenter`` (a name of
            ``mnv3.models.MODELS["segmenter"]``, default ``"lraspp"``), ``backbone``, ``pool``, ``inter_channels``...
        num_classes: classes predicted (Cityscapes: 19 train ids).
        class_names: the classes' names, in train-id order.
        label_ids: each class's id in the dataset's own label files (Cityscapes labelIds), for
            ``<name>_labelIds.png`` predictions; None: only train-id maps are written.
        palette: an RGB colour per class for the pictures (the dataset's, else evenly spaced).
        mask_images: validation images drawn with true and predicted masks each epoch (0: none).
        Others: see :class:`~mnv3.tasks.base.BaseTask`.
    """

    monitor = "val/miou"
    monitor_mode = "max"

    network_kind, default_network = "segmenter", "lraspp"
    model_name_key = "segmenter"
    architecture_keys: ClassVar[dict[str, str]] = {
        "segmenter": "head.segmenter",
        "backbone": "backbone.name",
        "reduced_tail": "backbone.reduced_tail",
        "output_stride": "head.output_stride",
        "inter_channels": "head.inter_channels",
        "low_tap": "head.low_tap",
        "reduced_tail_style": "head.reduced_tail_style",
    }

    def __init__(
        self,
        model: dict[str, Any],
        num_classes: int,
        optimizer: dict[str, Any],
        class_names: list[str] | None = None,
        label_ids: list[int] | None = None,
        palette: list[list[int]] | None = None,
        mask_images: int = 4,
        **shared: Any,
    ) -> None:
        super().__init__(model, num_classes, optimizer, **shared)
        check_plain({"class_names": class_names, "label_ids": label_ids, "palette": palette})
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.class_names = class_names or [str(i) for i in range(num_classes)]
        self.label_ids = label_ids
        self.palette = palette or default_palette(num_classes)
        self.mask_images = int(mask_images)
        self.void_batches: dict[str, int] = {}  # stage -> batches without a labelled pixel
        iou = {
            "num_classes": num_classes,
            "ignore_index": IGNORE_INDEX,
            "average": None,
            "zero_division": float("nan"),  # absent from labels and predictions: left out
        }
        accuracy = {"num_classes": num_classes, "ignore_index": IGNORE_INDEX, "average": "micro"}
        self.val_iou = MulticlassJaccardIndex(**iou)
        self.test_iou = MulticlassJaccardIndex(**iou)
        self.val_accuracy = MulticlassAccuracy(**accuracy)
        self.test_accuracy = MulticlassAccuracy(**accuracy)
        self._pictures: dict[str, Any] | None = None

    def load_weights(self, weights: str) -> Any:
        from mnv3.models.segmentation import load_segmentation_weights

        return load_segmentation_weights(self.model, weights)

    @classmethod
    def network_kwargs(cls, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The segmenter's arguments: the backbone group gives the backbone (``weights`` are
        ImageNet weights for it), the head group the segmenter's own settings."""
        backbone = cls.checked_backbone(cfg, BACKBONE_LIMITS, BACKBONE_LIMITS_WHY)
        head = dict(cfg["head"])
        model: dict[str, Any] = {
            "segmenter": head.get("segmenter", head["name"]),
            "backbone": backbone["name"],
            "reduced_tail": bool(backbone.get("reduced_tail", False)),
            # The head's stride (Table 7: 16; Table 8 also 32), else the backbone group's.
            "output_stride": int(head.get("output_stride") or backbone.get("output_stride", 16)),
            "backbone_weights": backbone.get("weights"),
            "weights": head.get("weights"),
        }
        if backbone.get("bn_momentum") is not None:
            model["bn_momentum"] = float(backbone["bn_momentum"])
        if backbone.get("table") is not None:
            model["table"] = backbone["table"]
        skip = {"name", "task", "segmenter", "weights", "mask_images", "output_stride"}
        model.update({k: v for k, v in head.items() if k not in skip and v is not None})
        return model

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], datamodule: Any) -> SegmentationTask:
        """The task for ``head=lraspp`` / ``head=raspp``: :meth:`network_kwargs`, and the data's
        classes, label ids and palette."""
        head = cfg["head"]
        # Class ids that are numbers (Cityscapes labelIds) are what predictions are written as.
        ids = list(getattr(datamodule, "classes", []) or [])
        label_ids = [int(i) for i in ids] if ids and all(str(i).isdigit() for i in ids) else None
        palette = getattr(datamodule, "palette", None)
        return cls(
            model=cls.network_kwargs(cfg),
            num_classes=datamodule.num_classes,
            class_names=list(datamodule.class_names),
            label_ids=label_ids,
            palette=[[int(c) for c in rgb] for rgb in palette] if palette else None,
            mask_images=int(head.get("mask_images", 4)),
            **cls.shared_kwargs(cfg),
        )

    # -- steps -----------------------------------------------------------------------------
    def qat_objective(self, network: nn.Module, example: torch.Tensor) -> QATObjective:
        """The segmenter itself, cross-entropy on its logits at the input size, 255 ignored."""

        return QATObjective(network, segmentation_loss, lambda b: (b["image"], b["mask"]))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self.count_skipped(batch)
        images, masks = batch["image"], batch["mask"]
        if images.shape[0] == 0:  # every image of the batch was unreadable
            return None
        logits = self.train_forward(images)
        loss = segmentation_loss(logits, masks)
        self.check_finite(loss)
        bs = images.shape[0]
        self._count_void(masks, "train")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        self.log_skipped(bs)
        return loss

    def _count_void(self, masks: torch.Tensor, stage: str) -> bool:
        """Count a batch without one labelled pixel (logged as ``<stage>/void_batches``); True
        if it is one. Its training loss is 0; in evaluation it adds no loss and no pixel."""
        void = not bool((masks != IGNORE_INDEX).any())
        if void:
            self.void_batches[stage] = self.void_batches.get(stage, 0) + 1
            log.warning(
                "%s batch without a labelled pixel (all %d ignored): %d such batch(es) so far",
                stage,
                IGNORE_INDEX,
                self.void_batches[stage],
            )
        if stage in self.void_batches:
            self.log(
                f"{stage}/void_batches",
                float(self.void_batches[stage]),
                on_step=False,
                on_epoch=True,
                reduce_fx="max",
                batch_size=masks.shape[0],
            )
        return void

    def _eval_step(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        self.count_skipped(batch)
        images, masks = batch["image"], batch["mask"]
        if images.shape[0] == 0:
            return
        logits = self.net(evaluating=True)(self.prepare_images(images))
        if logits.shape[-2:] != masks.shape[-2:]:  # an eval preset that resized the images
            logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear")
        bs = images.shape[0]
        if not self._count_void(masks, stage):  # an all-void batch has no loss to average
            loss = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)
            self.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=bs)
        predicted = logits.argmax(dim=1)
        iou, accuracy = (
            (self.val_iou, self.val_accuracy)
            if stage == "val"
            else (self.test_iou, self.test_accuracy)
        )
        iou.update(predicted, masks)
        accuracy.update(predicted, masks)
        if self.predictions_dir is not None:
            self._write_predictions(logits, batch)
        if batch_idx == 0 and stage == "val" and self.mask_images > 0:
            n = min(self.mask_images, bs)
            self._pictures = {
                "images": images[:n].detach().float().cpu(),
                "masks": masks[:n].cpu(),
                "predicted": predicted[:n].cpu(),
            }

    def _end_of_eval(self, stage: str) -> None:
        iou, accuracy = (
            (self.val_iou, self.val_accuracy)
            if stage == "val"
            else (self.test_iou, self.test_accuracy)
        )
        per_class = iou.compute().float()
        pixel_accuracy = accuracy.compute().float()
        iou.reset()
        accuracy.reset()
        present = ~torch.isnan(per_class)
        miou = per_class[present].mean() if present.any() else torch.tensor(0.0)
        self.log(f"{stage}/miou", miou, prog_bar=True)
        self.log(f"{stage}/pixel_accuracy", pixel_accuracy)
        for name, value, seen in zip(
            self.class_names, per_class.tolist(), present.tolist(), strict=True
        ):
            if seen:
                self.log(f"{stage}/iou_class/{name}", value)
        if self.trainer.sanity_checking or self.global_rank != 0:
            return
        if stage == "test" or self.current_epoch + 1 == self.trainer.max_epochs:
            self._write_per_class(per_class, stage)
        if self._pictures is not None and stage == "val":
            path = self._draw_pictures(stage)
            log_images(self.loggers, f"{stage}/masks", [path], step=self.global_step)
            self._pictures = None

    def _write_per_class(self, per_class: torch.Tensor, stage: str) -> None:
        """The per-class IoU table, as text in the log and ``<run>/<stage>_per_class_iou.csv``."""
        path = Path(self.trainer.default_root_dir) / f"{stage}_per_class_iou.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [
            (name, value)
            for name, value in zip(self.class_names, per_class.tolist(), strict=True)
            if value == value  # NaN: absent from the split
        ]
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["class", "IoU"])
            writer.writerows((name, f"{value:.4f}") for name, value in rows)
        log.info(
            "%s per-class IoU: %s (%s)", stage, ", ".join(f"{n} {v:.3f}" for n, v in rows), path
        )

    # -- predictions as label maps -----------------------------------------------------------
    def _write_predictions(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> None:
        """``<name>_trainIds.png`` and ``<name>_labelIds.png`` at each image's full size."""
        assert self.predictions_dir is not None
        out = self.predictions_dir / "predictions"
        for i, (name, size) in enumerate(zip(batch["name"], batch["orig_size"], strict=True)):
            self.write_label_maps(logits[i], (int(size[0]), int(size[1])), out / str(name))

    def write_label_maps(
        self, scores: torch.Tensor, size: tuple[int, int], stem: Path
    ) -> torch.Tensor:
        """One image's ``(C, h, w)`` scores as ``<stem>_trainIds.png`` (the :func:`label_map` at
        ``size``) and, when the dataset has label ids, ``<stem>_labelIds.png``; returns the
        train-id map. What evaluation writes and ``mnv3.predict`` writes alike."""
        train_ids = label_map(scores, size).cpu()
        save_png(train_ids, stem.with_name(f"{stem.name}_trainIds.png"))
        if self.label_ids:
            table = torch.tensor(self.label_ids, dtype=torch.uint8)
            save_png(table[train_ids.long()], stem.with_name(f"{stem.name}_labelIds.png"))
        return train_ids

    # -- pictures ----------------------------------------------------------------------------
    def _draw_pictures(self, stage: str) -> Path:
        """Image, true mask and predicted mask in the dataset's colours, one row per image."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        assert self._pictures is not None
        datamodule = getattr(self.trainer, "datamodule", None)
        mean = torch.tensor(getattr(datamodule, "mean", (0.485, 0.456, 0.406))).view(-1, 1, 1)
        std = torch.tensor(getattr(datamodule, "std", (0.229, 0.224, 0.225))).view(-1, 1, 1)
        pics = self._pictures
        n = len(pics["images"])
        fig, axes = plt.subplots(n, 3, figsize=(9, 1.6 + 2.2 * n), squeeze=False)
        for i in range(n):
            image = (pics["images"][i] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
            masks = [pics["masks"][i], pics["predicted"][i]]
            panels = [image] + [colour_mask(m, self.palette).numpy() for m in masks]
            for ax, panel, title in zip(
                axes[i], panels, ("image", "true", "predicted"), strict=True
            ):
                ax.imshow(panel)
                ax.set_title(title, fontsize=9)
                ax.axis("off")
        fig.suptitle(f"{stage} epoch {self.current_epoch}")
        fig.tight_layout()
        root = Path(self.trainer.default_root_dir) / "plots"
        return save_figure(fig, root / f"{stage}_masks_epoch{self.current_epoch:03d}.png")


def label_map(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """One image's ``(C, h, w)`` scores -> its uint8 ``(H, W)`` train-id map at ``size`` (the
    original image's): scores upsampled bilinearly when the network saw a resized image, then
    the argmax, as evaluation scores them."""
    scores = scores[None]
    if tuple(scores.shape[-2:]) != tuple(size):
        scores = F.interpolate(scores, size=tuple(size), mode="bilinear")
    return scores.argmax(dim=1)[0].to(torch.uint8)


def colour_mask(train_ids: torch.Tensor, palette: Sequence[Sequence[int]]) -> torch.Tensor:
    """A ``(H, W)`` train-id map in the dataset's colours, uint8 ``(H, W, 3)``; ids beyond the
    palette (255: ignored) black."""
    colours = torch.tensor([*palette, [0, 0, 0]], dtype=torch.uint8)
    return colours[train_ids.long().clamp(max=len(palette))]


def colour_overlay(
    image: torch.Tensor, train_ids: torch.Tensor, palette: Sequence[Sequence[int]], alpha: float
) -> torch.Tensor:
    """The uint8 ``(3, H, W)`` image with its :func:`colour_mask` blended in (``alpha``: the
    mask's weight), uint8 ``(H, W, 3)``."""
    mask = colour_mask(train_ids, palette).float()
    blended = (1.0 - alpha) * image.permute(1, 2, 0).float() + alpha * mask
    return blended.round().clamp(0, 255).to(torch.uint8)
