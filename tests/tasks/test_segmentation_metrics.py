"""SegmentationTask's mIoU is one confusion matrix over the whole split (Cityscapes' definition),
checked against an IoU computed by hand; a mean of per-image IoUs would give another number."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from helpers import quiet_trainer
from mnv3.tasks.segmentation import IGNORE_INDEX, SegmentationTask

NUM_CLASSES = 4


class PredictionInChannelZero(nn.Module):
    """A stand-in network whose prediction is written in the image: class = channel 0."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Conv2d(1, 1, 1)  # an optimizer needs one parameter

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        predicted = images[:, 0].long()
        return nn.functional.one_hot(predicted, NUM_CLASSES).permute(0, 3, 1, 2).float()


def _split(seed: int = 0) -> list[dict[str, object]]:
    """Six 8x8 images, each less right than the one before, some pixels ignored, class 3 absent."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(6):
        predicted = torch.randint(0, 3, (8, 8), generator=g)
        right = 0.95 - 0.15 * i  # images from nearly right to mostly wrong
        label = torch.where(torch.rand(8, 8, generator=g) < right, predicted, (predicted + 1) % 3)
        label[torch.rand(8, 8, generator=g) < 0.1] = IGNORE_INDEX
        image = predicted[None].float().expand(3, -1, -1).contiguous()
        samples.append({"image": image, "mask": label, "name": f"img{i}", "orig_size": (8, 8)})
    return samples


def _collate(samples: list[dict[str, object]]) -> dict[str, object]:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "mask": torch.stack([s["mask"] for s in samples]),
        "name": [s["name"] for s in samples],
        "orig_size": [s["orig_size"] for s in samples],
        "skipped": 0,
    }


def _hand_iou(samples: list[dict[str, object]]) -> tuple[np.ndarray, float]:
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for s in samples:
        label = s["mask"].numpy().ravel()
        predicted = s["image"][0].long().numpy().ravel()
        keep = label != IGNORE_INDEX
        np.add.at(confusion, (label[keep], predicted[keep]), 1)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return iou, float(tp.sum() / confusion.sum())


def test_miou_is_the_whole_split_confusion_matrix_iou(tmp_path) -> None:
    task = _task(PredictionInChannelZero())
    samples = _split()
    trainer = quiet_trainer(tmp_path)
    loader = DataLoader(samples, batch_size=4, collate_fn=_collate)
    (logged,) = trainer.validate(task, dataloaders=loader, verbose=False)

    iou, accuracy = _hand_iou(samples)
    assert np.isnan(iou[3])  # class "d" is in no label and no prediction: left out of the mean
    assert logged["val/miou"] == pytest.approx(np.nanmean(iou), abs=1e-6)
    assert logged["val/pixel_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    for name, value in zip("abc", iou[:3], strict=True):
        assert logged[f"val/iou_class/{name}"] == pytest.approx(value, abs=1e-6)
    assert "val/iou_class/d" not in logged
    per_image = []
    for s in samples:
        one, _ = _hand_iou([s])
        per_image.append(np.nanmean(one))
    assert abs(np.mean(per_image) - logged["val/miou"]) > 1e-2  # not a mean of per-image IoUs


class OneByOneConv(nn.Module):
    """A trainable stand-in segmenter (a 1x1 convolution) with the backbone a task freezes."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Identity()
        self.classifier = nn.Conv2d(3, NUM_CLASSES, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(images))


def _void(samples: list[dict[str, object]]) -> list[dict[str, object]]:
    """The same samples with every pixel ignored (a crop of a real frame that is all void)."""
    return [s | {"mask": torch.full_like(s["mask"], IGNORE_INDEX)} for s in samples]


def _task(model: nn.Module) -> SegmentationTask:
    task = SegmentationTask(
        model={"backbone": "mobilenet_v3_small", "reduced_tail": True},
        num_classes=NUM_CLASSES,
        optimizer={"name": "adamw", "lr": 1e-2},
        class_names=["a", "b", "c", "d"],
        mask_images=0,
    )
    task.model = model
    return task


def test_the_loss_of_a_batch_without_a_labelled_pixel_is_zero_not_nan() -> None:
    from mnv3.tasks.segmentation import segmentation_loss

    logits = torch.randn(2, NUM_CLASSES, 8, 8, requires_grad=True)
    void = torch.full((2, 8, 8), IGNORE_INDEX)
    assert torch.isnan(nn.functional.cross_entropy(logits, void, ignore_index=IGNORE_INDEX))
    loss = segmentation_loss(logits, void)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0
    labelled = void.clone()
    labelled[0, :3] = 1
    expected = nn.functional.cross_entropy(logits, labelled, ignore_index=IGNORE_INDEX)
    assert torch.equal(segmentation_loss(logits, labelled), expected)


def test_all_void_batches_train_on_and_are_left_out_of_the_val_loss(tmp_path) -> None:
    samples = _split()
    # Batches of 2: the first and third all void, the second labelled.
    split = _void(samples[:2]) + samples[2:4] + _void(samples[4:])
    network = OneByOneConv()
    start = network.classifier.weight.detach().clone()
    task = _task(network)
    trainer = quiet_trainer(tmp_path, enable_checkpointing=False, max_epochs=1)
    loader = DataLoader(split, batch_size=2, collate_fn=_collate)
    trainer.fit(task, train_dataloaders=loader)
    assert trainer.global_step == 3 and task.void_batches["train"] == 2
    assert trainer.callback_metrics["train/void_batches"] == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert not torch.equal(network.classifier.weight, start)  # the labelled batch trained it

    (logged,) = trainer.validate(task, dataloaders=loader, verbose=False)
    images, masks = _collate(samples[2:4])["image"], _collate(samples[2:4])["mask"]
    with torch.no_grad():
        expected = nn.functional.cross_entropy(network(images), masks, ignore_index=IGNORE_INDEX)
    assert logged["val/loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert logged["val/void_batches"] == 2
