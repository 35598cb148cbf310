"""The weight-sharing supernet with a dense head: LR-ASPP on each candidate's own taps, its head
weights shared and sliced like the backbone's; trained by the sandwich rule through the
segmentation task and scored by its mIoU."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from helpers import TINY_SHAPES_CITYSCAPES, compose_config, compose_train, quiet_trainer
from mnv3.cli import CONFIG_DIR, build_datamodule, to_plain
from mnv3.models.block_table import load_backbone_file, table_to_plain
from mnv3.models.mobilenetv3 import MOBILENET_V3_LARGE, MOBILENET_V3_SMALL
from mnv3.models.segmentation import lraspp
from mnv3.search.space import SearchSpace
from mnv3.search.supernet import (
    largest_table,
    sandwich,
    sandwich_task,
    scoring_trainer,
    supernet_accuracy,
)
from mnv3.tasks.segmentation import IGNORE_INDEX, SegmentationTask, segmentation_loss

PAPER = {"small": MOBILENET_V3_SMALL, "large": MOBILENET_V3_LARGE}
TINY_SEGMENT = [*TINY_SHAPES_CITYSCAPES, "data.batch_size=2", "data.num_workers=0"]
LRASPP = ["head=lraspp", "head.pool=global", "backbone=small_reduced", "backbone.bn_momentum=0.1"]


def _space_config(name: str) -> dict[str, Any]:
    path = CONFIG_DIR / "search" / "space" / f"{name}.yaml"
    return OmegaConf.to_container(OmegaConf.load(path))  # type: ignore[return-value]


def _config(tmp_path: Path, space: str = "small") -> dict[str, Any]:
    cfg = to_plain(
        compose_train(tmp_path, ["data=shapes_cityscapes", *LRASPP, *TINY_SEGMENT, "logger=none"])
    )
    cfg["search"] = {"space": _space_config(space)}
    return cfg


def _randomize_bn(module: torch.nn.Module) -> None:
    """Non-trivial BN everywhere (backbone and head), so a wrong slice shows."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)


@pytest.mark.parametrize("name", PAPER)
def test_a_candidate_with_lraspp_is_its_standalone_segmenter_with_copied_weights(
    tmp_path: Path, name: str
) -> None:
    """For the paper's network and random candidates of the space, the supernet's segmenter
    output equals the candidate's own stand-alone LR-ASPP (built by the task from the
    candidate's table, the slices loaded strictly), bit for bit; its head reads the
    candidate's taps, with fewer input channels than the largest network's where the
    candidate is narrower."""
    cfg = _config(tmp_path, name)
    task_cls = sandwich_task(SegmentationTask)
    model = task_cls.network_kwargs(cfg)
    torch.manual_seed(0)
    network = task_cls.network(model, 3)
    supernet = network.supernet
    _randomize_bn(supernet)
    supernet.eval()
    space = supernet.space
    own = {k: v for k, v in model.items() if k not in ("space", "randoms")}
    rng = random.Random(1)
    candidates = [space.decode(PAPER[name]), *(space.sample(rng) for _ in range(3))]
    x = torch.randn(2, 3, 64, 64)
    big_head = supernet.network.head
    narrower = 0
    for choices in candidates:
        plain = table_to_plain(space.table(choices))
        alone = SegmentationTask.network({**own, "table": plain}, 3)
        state = {k: v.detach().clone() for k, v in supernet.sliced_state(choices).items()}
        alone.load_state_dict(state, strict=True)  # every shape the candidate's own
        alone.eval()
        low, high = alone.backbone.tap("C3_first"), alone.backbone.tap("C5")
        assert alone.head.low_classifier.in_channels == low.channels
        assert alone.head.conv.conv.in_channels == alone.head.gate.in_channels == high.channels
        narrower += low.channels < big_head.low_classifier.in_channels
        with torch.no_grad():
            out = supernet(x, choices)
            assert out.shape == (2, 3, 64, 64)
            assert torch.equal(out, alone(x))
            assert torch.equal(out, supernet.subnet(choices).eval()(x))
    assert narrower, "no candidate exercised the head's sliced input channels"
    # The paper's network in its space is the paper's own segmenter (Small: Table 7 row 11).
    paper = lraspp(f"mobilenet_v3_{name}", num_classes=3, pool="global", reduced_tail=True)
    ours = supernet.subnet(candidates[0])
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in paper.state_dict().items()
    }
    largest = space.decode(largest_table(space))
    with torch.no_grad():
        assert torch.equal(supernet(x, largest), supernet.network(x))


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_the_segmentation_task_trains_a_supernet_by_the_sandwich_rule(tmp_path: Path) -> None:
    """A training step's loss is the segmentation loss summed over the sandwich's candidates
    (largest, smallest, two random) computed by hand; Lightning fits it and validates the
    largest by mIoU; the head's shared weights move."""

    cfg = _config(tmp_path)
    datamodule = build_datamodule(cfg["data"], num_workers=0)
    datamodule.prepare_data()
    task = sandwich_task(SegmentationTask).from_config(cfg, datamodule)
    assert type(task).__name__ == "SandwichSegmentationTask"
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape[0] == 2
    task.train()
    loss = task.training_step(batch, 0)
    supernet = task.model.supernet
    expected = sum(
        segmentation_loss(supernet(batch["image"], c), batch["mask"])
        for c in sandwich(supernet.space, random.Random(0), 2)
    )
    torch.testing.assert_close(loss, expected)
    assert task.model.active is None

    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=1)
    head = supernet.network.head.low_classifier.weight.detach().clone()
    trainer.fit(task, datamodule=datamodule)
    assert trainer.global_step == 2
    assert not torch.equal(head, supernet.network.head.low_classifier.weight)
    assert 0.0 <= float(trainer.callback_metrics["val/miou"]) <= 1.0


def _miou(predicted: torch.Tensor, masks: torch.Tensor, classes: int) -> float:
    """mIoU from one confusion matrix over the split, 255 ignored, averaged over the classes in
    the labels or the predictions (the Cityscapes definition), computed by hand."""
    keep = masks != IGNORE_INDEX
    pairs = masks[keep] * classes + predicted[keep]
    confusion = torch.bincount(pairs, minlength=classes * classes).view(classes, classes).double()
    union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
    present = union > 0
    return float((confusion.diag()[present] / union[present]).mean())


def test_a_candidate_is_scored_by_its_standalone_segmenters_miou(tmp_path: Path) -> None:
    """The search's score of a segmentation candidate is the task's own validation metric,
    mIoU: equal to the mIoU of its stand-alone segmenter holding the calibrated slices,
    computed by hand on the same batches."""
    cfg = _config(tmp_path)
    datamodule = build_datamodule(cfg["data"], num_workers=0)
    datamodule.prepare_data()
    task = sandwich_task(SegmentationTask).from_config(cfg, datamodule)
    classes = datamodule.num_classes
    supernet = task.model.supernet
    choices = supernet.space.sample(random.Random(4))
    torch.manual_seed(0)
    calibration = [torch.randn(2, 3, 32, 64) for _ in range(2)]
    masks = torch.randint(0, classes, (2, 32, 64))
    masks[:, :4] = IGNORE_INDEX
    held_out = [{"image": torch.randn(2, 3, 32, 64), "mask": masks}]
    score = supernet_accuracy(task, choices, calibration, held_out, scoring_trainer(str(tmp_path)))
    alone = supernet.subnet(choices).eval()  # the slices, BN statistics just measured
    with torch.no_grad():
        predicted = alone(held_out[0]["image"]).argmax(1)
    assert score == pytest.approx(_miou(predicted, masks, classes), abs=1e-6)
    assert task.model.training and task.model.active is None  # left as it was found


def _search(tmp_path: Path, overrides: list[str]) -> dict[str, Any]:
    from mnv3.search.__main__ import search

    return search(compose_config("search", tmp_path, [*overrides, *TINY_SEGMENT, "logger=none"]))


def test_a_tiny_segmentation_block_search_runs_end_to_end(tmp_path: Path) -> None:
    """experiment=nas_segment_quick under debug=fast_dev_run: the LR-ASPP supernet trains,
    4 candidates are scored by mIoU, the best 2 measured; the winner is a point of the space,
    written with its reduced tail, and the printed multirun's backbone composes with LR-ASPP."""
    summary = _search(tmp_path, ["experiment=nas_segment_quick", "debug=fast_dev_run"])
    run_dir = tmp_path / "run"
    with (run_dir / "search" / "candidates.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == summary["candidates"] == 4
    assert summary["supernet acc metric"] == "val/miou"
    assert all(0.0 <= float(r["acc"]) <= 1.0 for r in rows)
    assert max(float(r["acc"]) for r in rows) > 0  # some pixel class is right
    assert any(
        summary["best supernet acc"] == pytest.approx(float(r["acc"]), abs=1e-4) for r in rows
    )
    table = load_backbone_file(run_dir / "table.yaml")
    space = SearchSpace.from_config(_space_config("small"))
    assert space.decode(table) is not None
    assert json.loads(rows[0]["table"])
    options = run_dir / "backbones" / "backbone"
    assert sorted(p.stem for p in options.glob("*.yaml")) == ["nas_0", "nas_1"]
    train_cfg = compose_config(
        "train",
        tmp_path,
        [f"hydra.searchpath=[file://{options.parent}]", "backbone=nas_0", "head=lraspp"],
    )
    assert train_cfg.backbone.reduced_tail is True  # the tail the supernet's candidates had
    assert OmegaConf.to_container(train_cfg.backbone.table)["rows"] == table_to_plain(table)["rows"]


def test_netadapt_after_a_dense_search_is_refused_in_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """NetAdapt scores by classification top-1: a dense head with search.netadapt=true stops
    before any training, with one sentence naming the key."""
    overrides = ["experiment=nas_segment_quick", "search.netadapt=true", "debug=fast_dev_run"]
    with pytest.raises(SystemExit) as info:
        _search(tmp_path, overrides)
    assert info.value.code == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message == (
        "error: search.netadapt=true with head=lraspp: NetAdapt scores proposals by "
        "classification top-1; expected search.netadapt=false for a segmentation head"
    )
    assert not (tmp_path / "run" / "search" / "supernet.pt").exists()


# Generated shapes in the COCO layout at 64x64: 2 training images, 1 validation image.
TINY_DETECT = [
    "data=shapes_coco",
    "head=ssdlite",
    "backbone=small_reduced",
    "backbone.bn_momentum=0.1",
    "data.generate.train_images=2",
    "data.generate.val_images=1",
    "data.generate.empty_val_images=0",
    "data.generate.image_size=64",
    "data.image_size=64",
    "data.batch_size=2",
    "data.num_workers=0",
    "logger=none",
]


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_ssdlite_candidates_are_their_standalone_detectors_and_train_by_the_sandwich_rule(
    tmp_path: Path,
) -> None:
    """SSDLite over the supernet: for Small and random candidates, the raw outputs (class
    logits, box regression, anchors) equal the candidate's stand-alone detector's with the
    slices loaded strictly, bit for bit, its predictors reading the candidate's own C4
    expansion; a sandwich step's loss is the detection loss summed over the sandwich."""
    from mnv3.tasks.detection import DetectionTask

    cfg = to_plain(compose_train(tmp_path, TINY_DETECT))
    cfg["search"] = {"space": _space_config("small")}
    datamodule = build_datamodule(cfg["data"], num_workers=0)
    datamodule.prepare_data()
    torch.manual_seed(0)
    task = sandwich_task(DetectionTask).from_config(cfg, datamodule)
    supernet = task.model.supernet
    _randomize_bn(supernet)
    supernet.eval()
    space = supernet.space
    own = {k: v for k, v in task.hparams["model"].items() if k not in ("space", "randoms")}
    rng = random.Random(2)
    x = torch.randn(2, 3, 64, 64)
    widths = set()
    for choices in [space.decode(MOBILENET_V3_SMALL), *(space.sample(rng) for _ in range(3))]:
        plain = table_to_plain(space.table(choices))
        alone = DetectionTask.network({**own, "table": plain}, datamodule.num_classes)
        state = {k: v.detach().clone() for k, v in supernet.sliced_state(choices).items()}
        alone.load_state_dict(state, strict=True)
        alone.eval()
        expansion = alone.backbone.tap("C4_expansion").channels
        assert alone.head.classification[0][0].conv.in_channels == expansion
        widths.add(expansion)
        with torch.no_grad():
            ours, theirs = supernet(x, choices), alone(x)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert len(widths) > 1  # the predictors' input channels were sliced to several widths

    batch = next(iter(datamodule.train_dataloader()))
    task.train()
    loss = task.training_step(batch, 0)
    targets = DetectionTask._targets(batch)
    expected = sum(
        task.model.loss(supernet(batch["image"], c), targets)["loss"]
        for c in sandwich(space, random.Random(0), 2)
    )
    torch.testing.assert_close(loss, expected)
