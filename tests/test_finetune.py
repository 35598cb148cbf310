"""Fine-tuning and medical metrics: binary AUROC / Youden threshold, freezing, multi-label BCE."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from helpers import QUIET, compose_train
from mnv3.tasks import ClassificationTask
from mnv3.train import train

BINARY = [
    "data.generate.num_classes=2",
    "data.generate.train_per_class=48",
    "data.generate.val_per_class=24",
    "data.generate.test_per_class=24",
    "data.generate.image_size=48",
    "data.image_size=48",
    "data.resize_size=48",
    "data.batch_size=16",
    "data.num_workers=0",
]


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _torchvision_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    return path


def test_binary_finetune_reaches_auroc_and_reports_youden_metrics(tmp_path: Path) -> None:
    # The fine-tuning path of the X-ray recipe on a generated binary set (horizontal vs vertical
    # stripes): torchvision-format weights in, a new 2-class logits layer, balanced class weights.
    ckpt = _torchvision_checkpoint(tmp_path / "imagenet_small.pth")
    overrides = [
        *BINARY,
        *QUIET,
        f"backbone.weights={ckpt}",
        "backbone.bn_momentum=0.1",
        # Validation AUROC by epoch, measured: 0.65 (warm-up), 0.997, 1.0 (8 epochs also end at 1.0).
        "trainer.max_epochs=3",
        "data.generate.train_per_class=96",
        "head.class_weights=balanced",
        "head.label_smoothing=0.0",
        "optim.lr=0.003",
    ]
    train(compose_train(tmp_path, overrides))
    run = tmp_path / "run"
    rows = _rows(run)
    best_auroc = max(float(r["val/auroc"]) for r in rows if r.get("val/auroc"))
    assert best_auroc >= 0.95
    test = [r for r in rows if r.get("test/auroc")][-1]
    for key in (
        "test/auroc",
        "test/sensitivity",
        "test/specificity",
        "test/f1",
        "test/accuracy_at_threshold",
    ):
        assert 0.0 <= float(test[key]) <= 1.0
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    threshold = float(best["state_dict"]["decision_threshold"])
    assert float(test["test/threshold"]) == pytest.approx(
        threshold
    )  # test used validation's threshold
    assert 0.0 < threshold < 1.0
    assert best["callbacks"] and "val/auroc" in str(best["callbacks"])  # monitored metric is AUROC
    assert list((run / "plots").glob("val_roc_epoch*.png")) and list(
        (run / "plots").glob("test_roc_*.png")
    )


def test_frozen_epochs_leave_the_backbone_untouched(tmp_path: Path) -> None:
    ckpt = _torchvision_checkpoint(tmp_path / "imagenet_small.pth")
    overrides = [
        *BINARY,
        *QUIET,
        f"backbone.weights={ckpt}",
        "trainer.max_epochs=1",
        "freeze_backbone_epochs=1",
        "test=false",
        "data.generate.train_per_class=8",
    ]
    train(compose_train(tmp_path, overrides))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)[
        "state_dict"
    ]
    reference = torch.load(ckpt, weights_only=True)
    assert torch.equal(state["model.stem.conv.weight"], reference["features.0.0.weight"])
    assert torch.equal(state["model.stem.bn.running_mean"], reference["features.0.1.running_mean"])
    assert (
        torch.equal(state["model.classifier.pre_logits.weight"], reference["classifier.0.weight"])
        is False
    )


def test_multilabel_loss_ignores_uncertain_labels() -> None:
    task = ClassificationTask(
        model={"name": "mobilenet_v3_small"},
        num_classes=3,
        optimizer={"name": "adamw", "lr": 1e-3},
        label_type="multilabel",
        class_weights=[1.0, 2.0, 1.0],
    )
    assert task.monitor == "val/auroc"
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -2.0]])
    labels = torch.tensor([[1.0, float("nan"), 0.0], [0.0, 1.0, float("nan")]])
    known = ~labels.isnan()
    manual = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[known], labels[known], pos_weight=torch.tensor([1.0, 2.0, 1.0]).expand(2, 3)[known]
    )
    assert torch.allclose(task._loss(logits, labels), manual)


def _write_nih(root: Path, patients: int = 12) -> Path:
    """A tiny NIH ChestX-ray14 tree in the real layout: PNGs, Data_Entry_2017.csv (CRLF), lists."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    header = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
    lines, names = [header], []
    findings = [
        "No Finding",
        "Cardiomegaly",
        "Effusion|Infiltration",
        "Mass",
        "Atelectasis|Effusion",
    ]
    for p in range(1, patients + 1):
        for k in range(2):
            name = f"{p:08d}_{k:03d}.png"
            Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), mode="L").save(
                root / "images" / name
            )
            lines.append(
                f"{name},{findings[(p + k) % len(findings)]},{k},{p},50,M,PA,1024,1024,0.143,0.143,"
            )
            names.append(name)
    (root / "Data_Entry_2017.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    (root / "train_val_list.txt").write_text("\n".join(names[:18]) + "\n")
    (root / "test_list.txt").write_text("\n".join(names[18:]) + "\n")
    return root


def test_chestxray14_multilabel_run_logs_per_finding_auroc(tmp_path: Path) -> None:
    root = _write_nih(tmp_path / "nih")
    overrides = [
        "data=chestxray14",
        f"data.root={root}",
        "data.image_size=32",
        "data.resize_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.val_fraction=0.34",
        *QUIET,
        "trainer.max_epochs=1",
        "head.class_weights=balanced",
    ]
    train(compose_train(tmp_path, overrides))
    rows = _rows(tmp_path / "run")
    keys = set().union(*(r.keys() for r in rows))
    assert "val/auroc" in keys and "test/auroc" in keys and "val/auroc/Effusion" in keys
    assert (
        torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)[
            "hyper_parameters"
        ]["label_type"]
        == "multilabel"
    )
