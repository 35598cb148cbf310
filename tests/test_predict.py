"""``mnv3.predict`` on a user's own images for every task, and the per-image predictions of a
multi-class classification ``mnv3.eval``.

Each task's tiny run is trained for a step or two, then its BatchNorm statistics are measured on
random images: a barely trained network answers every image alike, and a comparison with a
direct forward pass would pass for a constant network too.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as TF

from dense_suite import TINY_DETECT, TINY_SEGMENT
from helpers import QUIET, TINY_DATA, compose_config, compose_train, metrics_rows
from mnv3.predict import InputImages, main, predict, same_size_groups
from mnv3.tasks import ClassificationTask, DetectionTask, SegmentationTask
from mnv3.tasks.image_predictions import ClassPredictions, ImageItem
from mnv3.train import train
from mnv3.trained_run import TrainedRun

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

ONE_EPOCH = ["trainer.max_epochs=1", "test=false", *QUIET]


def _input_dependent(run: Path, task_class: Any, shape: tuple[int, ...]) -> Path:
    """``<run>/checkpoints/calibrated.ckpt``: the run's best checkpoint with BatchNorm statistics
    measured on random ``shape`` images, so that its outputs depend on the input."""
    best = run / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    task = task_class.load_trained(best, checkpoint)
    network = task.evaluated_network
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the calibration batch
    network.train()
    with torch.no_grad():
        network(torch.randn(shape))
    checkpoint["state_dict"] = task.state_dict()
    out = best.with_name("calibrated.ckpt")
    torch.save(checkpoint, out)
    return out


def _trained(tmp: Path, overrides: list[str], task_class: Any, shape: tuple[int, ...]) -> Path:
    torch.set_num_threads(1)
    train(compose_train(tmp, overrides))
    return _input_dependent(tmp / "run", task_class, shape)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A textures classifier (6 classes, 32 px) after a few steps: its calibrated checkpoint."""
    tmp = tmp_path_factory.mktemp("classify")
    overrides = ["debug=limit", "trainer.limit_train_batches=1", *TINY_DATA, *ONE_EPOCH]
    return _trained(tmp, overrides, ClassificationTask, (16, 3, 32, 32))


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SSDLite-Small on the generated COCO-layout shapes (96 px input) after one step."""
    tmp = tmp_path_factory.mktemp("detect")
    overrides = [*TINY_DETECT, "+trainer.limit_train_batches=1", *ONE_EPOCH]
    return _trained(tmp, overrides, DetectionTask, (4, 3, 96, 96))


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LR-ASPP-Small on the generated Cityscapes-layout streets (64x128 frames) after one step."""
    tmp = tmp_path_factory.mktemp("segment")
    overrides = [*TINY_SEGMENT, "+trainer.limit_train_batches=1", *ONE_EPOCH]
    return _trained(tmp, overrides, SegmentationTask, (4, 3, 64, 128))


def _random_png(path: Path, height: int, width: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    return path


def _predict(out: Path, ckpt: Path, source: Any, *overrides: str) -> dict[str, Any]:
    """``mnv3.predict`` in this process (a CLI start costs seconds), writing into ``out/run``."""
    cfg = compose_config("predict", out, [f"ckpt_path={ckpt}", f"input={source}", *overrides])
    return predict(cfg)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- classification ----------------------------------------------------------------------------


def _eval_preprocessed(path: Path, preset: Any) -> torch.Tensor:
    """The evaluation preprocessing written out with torchvision from the preset's numbers
    (shorter side to resize_size, centre crop, scale, normalise): a (1, 3, S, S) batch."""
    image = TF.pil_to_tensor(Image.open(path).convert("RGB"))
    image = TF.resize(image, preset.resize_size, antialias=True)
    image = TF.center_crop(image, preset.crop_size)
    image = TF.to_dtype(image, torch.float32, scale=True)
    return TF.normalize(image, list(preset.mean), list(preset.std))[None]


def test_classifier_probabilities_equal_a_direct_forward_for_folder_glob_and_csv(
    classifier: Path, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    images = [
        _random_png(photos / "a.png", 45, 38, 0),
        _random_png(photos / "nested" / "b.png", 30, 70, 1),
        _random_png(photos / "nested" / "deeper" / "c.png", 64, 64, 2),
    ]
    corrupt = _corrupt(photos / "nested" / "broken.png")
    (photos / "notes.txt").write_text("not an image, not listed")

    found = _predict(tmp_path / "folder", classifier, photos)
    out = found["output_dir"]
    rows = _csv_rows(out / "predictions.csv")
    assert found["images"] == 3 and [p for p, _ in found["skipped"]] == [str(corrupt)]
    assert (out / "skipped.txt").read_text().split("\t")[0] == str(corrupt)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in images)

    run = TrainedRun.open(classifier)
    preset = run.datamodule().eval_transform
    names = run.task.class_names
    assert list(rows[0]) == ["path"] + [
        f"{kind}_{rank}" for rank in range(1, 6) for kind in ("prediction", "probability")
    ]
    # The rows were one batch of 3 (data.batch_size 8): forwarded so here too, since float sums
    # differ in their last bits between batch sizes.
    batch = torch.cat([_eval_preprocessed(Path(row["path"]), preset) for row in rows])
    with torch.no_grad():
        all_probs = torch.softmax(run.network(batch), 1)
    distinct = set()
    for row, probs in zip(rows, all_probs, strict=True):
        shown = torch.tensor([float(row[f"probability_{r}"]) for r in range(1, 6)])
        order = [names.index(row[f"prediction_{r}"]) for r in range(1, 6)]
        assert torch.allclose(shown, probs[order], atol=1e-6, rtol=0)
        assert torch.allclose(shown, probs.sort(descending=True).values[:5], atol=1e-6, rtol=0)
        assert row["prediction_1"] == names[int(probs.argmax())]
        distinct.add(row["probability_1"])
    assert len(distinct) == 3  # the network answers each image differently

    # A glob (recursive, non-images left out) and a CSV of relative paths give the same rows.
    by_path = {r["path"]: r for r in rows}
    glob_rows = _csv_rows(
        _predict(tmp_path / "glob", classifier, f"{photos}/**/*.png")["output_dir"]
        / "predictions.csv"
    )
    assert {r["path"]: r for r in glob_rows} == by_path
    listing = tmp_path / "lists" / "todo.csv"
    listing.parent.mkdir()
    lines = ["id,path", *(f"{i},../photos/{p.relative_to(photos)}" for i, p in enumerate(images))]
    listing.write_text("\n".join([*lines, "9,../photos/missing.png"]) + "\n")
    listed = _predict(tmp_path / "csv", classifier, listing)
    csv_rows = _csv_rows(listed["output_dir"] / "predictions.csv")
    assert [Path(r["path"]).resolve() for r in csv_rows] == [p.resolve() for p in images]
    assert [r["probability_1"] for r in csv_rows] == [
        by_path[str(p)]["probability_1"] for p in images
    ]
    assert [reason for _, reason in listed["skipped"]] == ["no such file"]


def test_released_weights_predict_through_the_groups_as_eval_builds_them(
    classifier: Path, tmp_path: Path
) -> None:
    """Without ckpt_path: the backbone / head / data groups and a weights file, as mnv3.eval."""
    photo = _random_png(tmp_path / "photo.png", 40, 52, 3)
    weights = tmp_path / "weights.pth"
    torch.save(TrainedRun.open(classifier).task.model.state_dict(), weights)
    root = classifier.parents[2] / "data" / "textures"
    groups = ["backbone=small", f"backbone.weights={weights}", "data=textures", *TINY_DATA]
    cfg = compose_config("predict", tmp_path, [*groups, f"data.root={root}", f"input={photo}"])
    (row,) = _csv_rows(predict(cfg)["output_dir"] / "predictions.csv")
    (from_run,) = _csv_rows(
        _predict(tmp_path / "ckpt", classifier, photo)["output_dir"] / "predictions.csv"
    )
    assert row == from_run


@pytest.mark.parametrize("label_type", ["binary", "multilabel"])
def test_findings_are_calibrated_and_decided_at_the_checkpoints_thresholds(
    label_type: str, tmp_path: Path
) -> None:
    multilabel = label_type == "multilabel"
    task = ClassificationTask(
        model={"name": "mobilenet_v3_small", "width_mult": 0.5},
        num_classes=3 if multilabel else 2,
        optimizer={"name": "sgd", "lr": 0.1},
        class_names=["effusion", "mass", "nodule"] if multilabel else ["normal", "pneumonia"],
        label_type="multilabel" if multilabel else "multiclass",
    )
    task.temperature.fill_(2.0)
    thresholds = torch.tensor([0.3, 0.5, 0.7]) if multilabel else torch.tensor([0.4])
    if multilabel:
        task.finding_thresholds.copy_(thresholds)
    else:
        task.decision_threshold.fill_(float(thresholds[0]))
    network = task.evaluated_network.eval()
    writer = ClassPredictions(task, network, tmp_path, {})
    images = torch.randn(4, 3, 32, 32) * 3
    items = [ImageItem(f"x{i}.png", f"x{i}", (32, 32), i + 1) for i in range(4)]
    with torch.no_grad():
        logits = network(images)
        writer.add(images[:3], items[:3])
        writer.add(images[3:], items[3:])
    rows = _csv_rows(writer.finish()[0])
    finding_logits = logits if multilabel else (logits[:, 1] - logits[:, 0])[:, None]
    expected = torch.sigmoid(finding_logits / 2.0)
    findings = task.class_names if multilabel else ["pneumonia"]
    assert [r["path"] for r in rows] == [item.path for item in items]
    for i, row in enumerate(rows):
        for k, name in enumerate(findings):
            column = "" if not multilabel else f"/{name}"
            probability = float(row[f"probability{column}"])
            assert probability == pytest.approx(float(expected[i, k]), abs=2e-6)
            assert row[f"decision{column}"] == str(int(float(expected[i, k]) >= thresholds[k]))
            assert row[f"label{column}"] == ""  # new images: no label


# --- multi-class evaluation writes its per-image predictions -----------------------------------


def test_eval_writes_a_multiclass_runs_predictions_per_image(
    classifier: Path, tmp_path: Path
) -> None:
    from mnv3.eval import evaluate

    evaluate(compose_config("eval", tmp_path, [f"ckpt_path={classifier}", "split=val"]))
    out = tmp_path / "run"
    rows = _csv_rows(out / "predictions_val.csv")
    run = TrainedRun.open(classifier)
    names = run.task.class_names
    dataset = run.datamodule().get_dataset("val")
    assert [r["path"] for r in rows] == [dataset.path(i) for i in range(len(dataset))]
    samples = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([sample["image"] for sample in samples])
    size = run.datamodule().batch_size  # the batches eval ran: float sums depend on them
    with torch.no_grad():
        batches = [run.network(images[i : i + size]) for i in range(0, len(images), size)]
    all_probs = torch.softmax(torch.cat(batches), 1)
    for row, sample, probs in zip(rows, samples, all_probs, strict=True):
        assert row["label"] == names[int(sample["label"])]
        shown = torch.tensor([float(row[f"probability_{r}"]) for r in range(1, 6)])
        order = [names.index(row[f"prediction_{r}"]) for r in range(1, 6)]
        assert torch.allclose(shown, probs[order], atol=1e-6, rtol=0)
        assert torch.allclose(shown, probs.topk(5).values, atol=1e-6, rtol=0)
        assert row["prediction_1"] == names[int(probs.argmax())]
    hits = sum(r["prediction_1"] == r["label"] for r in rows) / len(rows)
    logged = [float(r["val/acc1"]) for r in metrics_rows(out) if r.get("val/acc1")]
    assert hits == pytest.approx(logged[-1], abs=1e-6)


# --- detection ---------------------------------------------------------------------------------


def test_detections_load_in_pycocotools_in_original_pixels(detector: Path, tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    photos = tmp_path / "photos"
    sizes = {"wide.png": (90, 200), "small.png": (40, 30), "square.png": (96, 96)}
    for i, (name, (h, w)) in enumerate(sizes.items()):
        _random_png(photos / name, h, w, i)
    corrupt = _corrupt(photos / "zz_broken.png")
    found = _predict(tmp_path / "p", detector, f"{photos}/*.png")
    out = found["output_dir"]
    assert found["images"] == 3 and found["skipped"][0][0] == str(corrupt)

    results = json.loads((out / "coco_results.json").read_text())
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        truth = COCO(str(out / "images.json"))
        loaded = truth.loadRes(str(out / "coco_results.json"))
    assert results and len(loaded.getAnnIds()) == len(results)
    images = {image["id"]: image for image in truth.dataset["images"]}
    assert {
        image["file_name"]: (image["height"], image["width"]) for image in images.values()
    } == sizes
    run = TrainedRun.open(detector)
    assert {c["id"] for c in truth.dataset["categories"]} == set(run.task.category_table[1:])
    for d in results:
        x, y, w, h = d["bbox"]
        image = images[d["image_id"]]
        assert x >= 0 and y >= 0 and w >= 0 and h >= 0
        assert x + w <= image["width"] + 1e-3 and y + h <= image["height"] + 1e-3

    # The best box of each image is the direct forward's, scaled to the image's own pixels (the
    # three images forwarded as the one batch they were: float sums depend on the batch).
    preset = run.datamodule().eval_transform
    batch = []
    for image in images.values():  # in input order
        pixels = TF.pil_to_tensor(Image.open(photos / image["file_name"]).convert("RGB"))
        resized = TF.resize(pixels, [preset.size, preset.size], antialias=True)
        scaled = TF.to_dtype(resized, torch.float32, scale=True)
        batch.append(TF.normalize(scaled, preset.mean, preset.std))
    with torch.no_grad():
        outputs = run.network(torch.stack(batch))
        detections = run.task.model.postprocess(
            outputs,
            [(image["height"], image["width"]) for image in images.values()],
            input_size=(preset.size, preset.size),
        )
    for image_id, direct in zip(images, detections, strict=True):
        best = max((d for d in results if d["image_id"] == image_id), key=lambda d: d["score"])
        assert best["score"] == pytest.approx(float(direct["scores"].max()), abs=1e-5)
        tied = (direct["scores"] - best["score"]).abs() <= 1e-5  # equal scores: any order
        same = [
            [x1, y1, x2 - x1, y2 - y1]
            for (x1, y1, x2, y2), label in zip(
                direct["boxes"][tied].tolist(), direct["labels"][tied].tolist(), strict=True
            )
            if run.task.category_table[label] == best["category_id"]
        ]
        assert any(box == pytest.approx(best["bbox"], abs=1e-3) for box in same), (best, same)


# --- segmentation ------------------------------------------------------------------------------


def test_label_maps_are_the_direct_forward_at_the_original_size(
    segmenter: Path, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    sizes = {"street/a.png": (64, 128), "b.png": (50, 90)}
    for i, (name, (h, w)) in enumerate(sizes.items()):
        _random_png(photos / name, h, w, i)
    listing = photos / "list.csv"
    listing.write_text("".join(f"{name}\n" for name in sizes))  # no header, relative paths
    # The network sees 32x64 (data.eval_resize); the maps come back at each image's own size.
    found = _predict(tmp_path / "p", segmenter, listing, "++data.eval_resize=[32,64]")
    out = found["output_dir"] / "predictions"
    assert found["images"] == 2 and not found["skipped"]
    run = TrainedRun.open(segmenter, {"eval_resize": [32, 64]})
    preset = run.datamodule().eval_transform
    palette = torch.tensor(run.task.palette, dtype=torch.float32)
    for name, (h, w) in sizes.items():
        stem = out / Path(name).with_suffix("")
        train_ids = np.array(Image.open(f"{stem}_trainIds.png"))
        assert train_ids.shape == (h, w) and train_ids.dtype == np.uint8
        pixels = TF.pil_to_tensor(Image.open(photos / name).convert("RGB"))
        small = TF.to_dtype(TF.resize(pixels, [32, 64], antialias=True), torch.float32, scale=True)
        with torch.no_grad():
            logits = run.network(TF.normalize(small, preset.mean, preset.std)[None])
        scores = F.interpolate(logits, size=(h, w), mode="bilinear")[0]
        top2 = scores.topk(2, dim=0).values
        decided = (top2[0] - top2[1] > 1e-4).numpy()  # near-ties may flip with the batch
        expected = scores.argmax(0).numpy()
        assert decided.mean() > 0.9 and len(np.unique(expected)) > 1
        assert (train_ids[decided] == expected[decided]).all()
        # The overlay: the image half-blended with the dataset's colour of each pixel's class.
        overlay = torch.from_numpy(np.array(Image.open(f"{stem}_overlay.png"))).float()
        blend = (
            0.5 * pixels.permute(1, 2, 0).float()
            + 0.5 * palette[torch.from_numpy(train_ids).long()]
        )
        assert overlay.shape == (h, w, 3) and (overlay - blend.round()).abs().max() <= 1


def test_images_of_different_sizes_are_batched_by_size() -> None:
    images = [torch.zeros(3, 4, 6), torch.ones(3, 5, 5), torch.full((3, 4, 6), 2.0)]
    items = [ImageItem(str(i), str(i), (1, 1), i + 1) for i in range(3)]
    groups = list(same_size_groups(images, items))
    assert [(tuple(g.shape), [it.image_id for it in its]) for g, its in groups] == [
        ((2, 3, 4, 6), [1, 3]),
        ((1, 3, 5, 5), [2]),
    ]
    assert groups[0][0][1].eq(2.0).all()


def test_output_names_keep_folders_and_tell_same_stems_apart(tmp_path: Path) -> None:
    paths = [tmp_path / "a" / "x.png", tmp_path / "a" / "x.jpg", tmp_path / "b" / "y.png"]
    assert InputImages(paths, tmp_path, "").names() == ["a/x.png", "a/x.jpg", "b/y"]


# --- bad input: one sentence, exit status 1 ----------------------------------------------------


def test_bad_input_is_one_sentence_and_exit_status_1(
    classifier: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    (tmp_path / "empty.csv").write_text("path\n")
    unreadable = tmp_path / "unreadable"
    _corrupt(unreadable / "x.png")
    cases = [
        (tmp_path / "nope", "does not exist"),
        (f"{tmp_path}/*.jpg", "matches no image file"),
        (tmp_path / "empty", "holds no image file"),
        (tmp_path / "empty.csv", "lists no image path"),
        (unreadable, "none of the 1 file(s)"),
    ]
    for source, message in cases:
        GlobalHydra.instance().clear()
        args = [f"ckpt_path={classifier}", f"input={source}", f"hydra.run.dir={tmp_path}/run"]
        monkeypatch.setattr(sys, "argv", ["mnv3.predict", *args])  # the console script's main
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 1
        errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], errors
    assert (tmp_path / "run" / "skipped.txt").read_text().startswith(str(unreadable / "x.png"))
