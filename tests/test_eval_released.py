"""Evaluating released weights without a training run: ImageNet's raw val layout with a
torchvision classifier file, and COCO val with torchvision's 91-way SSDLite file."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from mnv3 import eval as mnv3_eval
from mnv3.models import checkpoints
from mnv3.models.checkpoints import KnownWeights, Preprocessing

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

WNIDS = ["n01440764", "n01443537", "n01484850"]
LABELS = [2, 0, 1, 2, 1, 0]
# Not the ImageNet defaults, so that a preset left at its defaults gives other numbers.
ENTRY_PRE = Preprocessing(
    (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), resize_size=40, crop_size=32, interpolation="bicubic"
)


def _val_name(i: int) -> str:
    return f"ILSVRC2012_val_{i:08d}.JPEG"


def _imagenet_val_only(root: Path) -> None:
    """The raw val layout, a label file and a class index; no train/ folder at all."""
    rng = np.random.default_rng(0)
    (root / "val").mkdir(parents=True)
    for i, _ in enumerate(LABELS, start=1):
        pixels = rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "val" / _val_name(i), quality=95)
    lines = "".join(f"{_val_name(i)} {label}\n" for i, label in enumerate(LABELS, start=1))
    (root / "val_labels.txt").write_text(lines)
    index = {str(i): [w, f"class{i}"] for i, w in enumerate(WNIDS)}
    (root / "imagenet_class_index.json").write_text(json.dumps(index))


def _run_eval(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m mnv3.eval args`` in this process (so a registered KnownWeights is seen)."""
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["mnv3.eval", *args])
    mnv3_eval.main()


def _last_metrics(run: Path) -> dict[str, float]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for row in rows for k, v in row.items() if v not in ("", None)}


def _calibrated(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """A random-init model whose BatchNorm statistics are measured on random images: with the
    default ones (mean 0, variance 1) an untrained network's outputs barely depend on its input."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(torch.randn(shape))
    return model.eval()


def _tv_loss(model: nn.Module, root: Path, pre: Preprocessing) -> float:
    """Cross-entropy (label smoothing 0.1, as head=classifier) of torchvision's model on the
    val images prepared with torchvision's own transforms."""
    mode = getattr(v2.InterpolationMode, pre.interpolation.upper())
    transform = v2.Compose(
        [
            v2.Resize(pre.resize_size, interpolation=mode, antialias=True),
            v2.CenterCrop(pre.crop_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(pre.mean, pre.std),
        ]
    )
    images = torch.stack(
        [
            transform(torchvision.io.decode_image(str(root / "val" / _val_name(i))))
            for i in range(1, len(LABELS) + 1)
        ]
    )
    with torch.no_grad():
        logits = model(images)
    return float(F.cross_entropy(logits, torch.tensor(LABELS), label_smoothing=0.1))


def test_released_classifier_on_raw_imagenet_val_without_train(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "imagenet"
    _imagenet_val_only(root)
    torch.manual_seed(0)
    tv = _calibrated(torchvision.models.mobilenet_v3_small(num_classes=3), (4, 3, 32, 32))
    with torch.no_grad():
        tv.classifier[3].weight.mul_(30)  # logits that depend on the pixels, not ~0
    weights = tmp_path / "tv_small.pth"
    torch.save(tv.state_dict(), weights)
    entry = KnownWeights(
        "mobilenet_v3_small.TEST_V1",
        "mobilenet_v3_small",
        str(weights),
        0,
        {"acc1": 61.5},
        ENTRY_PRE,
        num_classes=3,
    )
    monkeypatch.setitem(checkpoints.KNOWN_WEIGHTS, entry.name, entry)
    run = tmp_path / "run"
    args = [
        "backbone=small",
        f"backbone.weights={entry.name}",
        "data=imagenet",
        f"data.root={root}",
        "data.batch_size=4",
        "data.num_workers=0",
        "split=val",
        f"hydra.run.dir={run}",
    ]
    _run_eval(args, monkeypatch)
    out = capsys.readouterr().out
    assert "measured vs published" in out and "61.500" in out
    metrics = _last_metrics(run)
    # The entry's resize 40 / crop 32 / bicubic / mean-std, not the data config's 256 / 224.
    expected = _tv_loss(tv, root, ENTRY_PRE)
    assert metrics["val/loss"] == pytest.approx(expected, abs=2e-4)
    default = _tv_loss(tv, root, Preprocessing())
    assert abs(default - expected) > 1e-2  # the check can tell the two recipes apart
    measured = f"{100 * metrics['val/acc1']:.3f}"
    assert measured in out


def test_preprocessing_keys_set_on_the_command_line_win() -> None:
    entry = KnownWeights("x", "mobilenet_v3_small", "x.pth", 0, {}, ENTRY_PRE)
    keys = mnv3_eval.user_set_keys(["data=imagenet", "data.resize_size=48", "+data.std=[1,1,1]"])
    got = mnv3_eval.preprocessing_overrides(entry, "classification", {"resize_size": 256}, keys)
    assert got == {
        "image_size": 32,
        "interpolation": "bicubic",
        "mean": [0.4, 0.5, 0.6],
    }
    detection = mnv3_eval.preprocessing_overrides(entry, "detection", {}, set())
    assert set(detection) == {"image_size", "mean", "std"}  # no resize / interpolation there


def test_without_ckpt_or_weights_is_one_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "imagenet"
    _imagenet_val_only(root)
    args = ["backbone=small", "data=imagenet", f"data.root={root}", f"hydra.run.dir={tmp_path}/r"]
    with pytest.raises(SystemExit) as exit_info:
        _run_eval(args, monkeypatch)
    assert exit_info.value.code == 1


# --- COCO: torchvision's 91-way SSDLite on our 80-category labels ------------------------------

CATEGORIES = [
    {"id": 1, "name": "person"},
    {"id": 3, "name": "car"},
    {"id": 17, "name": "cat"},
    {"id": 90, "name": "toothbrush"},
]


def _torchvision_ssdlite() -> nn.Module:
    """torchvision's detector from scratch, BN statistics measured so scores vary by anchor."""
    tv = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=91
    )
    bns = [m for m in tv.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    for block in tv.head.classification_head.module_list:
        block[1].bias.data.normal_(0, 1.0)
    tv.train()
    with torch.no_grad():
        tv.head(list(tv.backbone(torch.rand(2, 3, 320, 320) * 2 - 1).values()))
    return tv.eval()


def _coco_val_only(root: Path, tv: nn.Module) -> Path:
    """COCO val2017 only (no train json): noise images whose ground truth is torchvision's own
    best detections of four sparse categories, so a category mix-up costs the mAP."""
    rng = np.random.default_rng(1)
    ids = [c["id"] for c in CATEGORIES]
    images, annotations = [], []
    (root / "val2017").mkdir(parents=True)
    for image_id in (1, 2, 3):
        name = f"{image_id:012d}.png"
        pixels = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "val2017" / name)
        images.append({"id": image_id, "file_name": name, "width": 128, "height": 96})
        with torch.no_grad():
            found = tv([torch.from_numpy(pixels).permute(2, 0, 1).float() / 255])[0]
        keep = [i for i, c in enumerate(found["labels"].tolist()) if c in ids][:3]
        for i in keep:
            x0, y0, x1, y1 = found["boxes"][i].tolist()
            box = [x0, y0, x1 - x0, y1 - y0]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(found["labels"][i]),
                    "bbox": box,
                    "iscrowd": 0,
                    "area": box[2] * box[3],
                }
            )
    path = root / "annotations" / "instances_val2017.json"
    path.parent.mkdir(parents=True)
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES})
    )
    return path


def test_category_ids_select_torchvision_scores_exactly(tmp_path: Path) -> None:
    from mnv3.models.detection import ssdlite320
    from mnv3.models.detection.checkpoints import load_ssdlite_weights

    torch.manual_seed(0)
    tv = _torchvision_ssdlite()
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    ids = [0, 1, 3, 17, 90]
    ours = ssdlite320(num_classes=len(ids)).eval()
    report = load_ssdlite_weights(ours, path, category_ids=ids)
    assert not report.reinitialized and len(report.adapted) == 6
    x = torch.rand(1, 3, 320, 320) * 2 - 1
    with torch.no_grad():
        theirs = tv.head(list(tv.backbone(x).values()))["cls_logits"]
        mine = ours.forward_batch(x)["cls_logits"]
    torch.testing.assert_close(mine, theirs[..., ids], rtol=1e-5, atol=1e-5)


def test_released_detector_on_coco_val_matches_cocoeval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    torch.manual_seed(0)
    tv = _torchvision_ssdlite()
    root = tmp_path / "coco"
    annotation_file = _coco_val_only(root, tv)
    weights = tmp_path / "tv_ssdlite.pth"
    torch.save(tv.state_dict(), weights)
    entry = KnownWeights(
        "ssdlite320_mobilenet_v3_large.TEST_COCO",
        "ssdlite320_mobilenet_v3_large",
        str(weights),
        3_440_060,
        {"box_map": 21.3},
        Preprocessing((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize_size=320, crop_size=320),
        num_classes=91,
    )
    monkeypatch.setitem(checkpoints.KNOWN_WEIGHTS, entry.name, entry)
    run = tmp_path / "run"
    args = [
        "head=ssdlite",
        "backbone=large_reduced",
        f"head.weights={entry.name}",
        "head.box_images=0",
        "data=coco",
        f"data.root={root}",
        "data.batch_size=3",
        "data.num_workers=0",
        "split=val",
        f"hydra.run.dir={run}",
    ]
    _run_eval(args, monkeypatch)
    out = capsys.readouterr().out
    assert "measured vs published" in out and "21.300" in out
    measured = _last_metrics(run)["val/map"]
    results = json.loads((run / "coco_results.json").read_text())
    assert {r["category_id"] for r in results} <= {1, 3, 17, 90}  # COCO ids, not labels 1..4
    # torchvision's detections are the ground truth: only a right category mapping finds them.
    assert measured > 0.3
    gt = COCO(str(annotation_file))
    evaluation = COCOeval(gt, gt.loadRes(results), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert measured == pytest.approx(evaluation.stats[0], abs=1e-4)
    assert f"{100 * measured:.3f}" in out
