"""Segmentation end to end: LR-ASPP trains on generated Cityscapes-layout streets, eval writes
full-size label maps named as Cityscapes' server wants them, DDP gives the one-process mIoU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import (
    compose_train,
    epoch_losses,
    eval_one_process_and_ddp,
    last_metric,
    metrics_rows,
    run_cli,
    train_for_epochs,
)
from mnv3.cli import ConfigError
from mnv3.validate import check_head_and_data

# 12 train / 4 val frames of 64x128; LR-ASPP-Small: a second or two per epoch.
TINY_SEGMENT = [
    "experiment=shapes_segment_quick",
    "data.generate.train_images=12",
    "data.generate.val_images=4",
    "data.generate.height=64",
    "data.generate.width=128",
    "data.frame_size=[64,128]",
    "data.crop_size=[64,128]",
    "data.batch_size=4",
    "data.num_workers=0",
    "head.mask_images=2",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-epoch LR-ASPP run on the tiny generated set (shared by the tests below)."""
    return train_for_epochs(tmp_path_factory.mktemp("segment"), TINY_SEGMENT)


def test_segmenter_trains_and_saves_plain_checkpoints(trained_run: Path) -> None:
    run = trained_run / "run"
    rows = metrics_rows(run)
    losses = epoch_losses(rows)
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert 0.0 <= last_metric(rows, "val/miou") <= 1.0
    assert 0.0 <= last_metric(rows, "val/pixel_accuracy") <= 1.0
    assert any(k.startswith("val/iou_class/") for k in rows[-1])
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    hparams = ckpt["hyper_parameters"]
    assert hparams["model"]["segmenter"] == "lraspp"
    assert hparams["model"]["backbone"] == "mobilenet_v3_small"
    assert len(hparams["label_ids"]) == hparams["num_classes"]
    assert sorted((run / "plots").glob("val_masks_epoch*.png"))
    assert (run / "val_per_class_iou.csv").is_file()


def test_eval_writes_full_size_label_maps_named_after_their_images(trained_run: Path) -> None:
    ckpt = trained_run / "run" / "checkpoints" / "best.ckpt"
    out = trained_run / "eval1"
    result = run_cli(
        "mnv3.eval", [f"ckpt_path={ckpt}", "split=val", f"hydra.run.dir={out}"], cwd=trained_run
    )
    assert result.returncode == 0, result.stderr[-3000:]
    frames = sorted(
        (trained_run / "data" / "shapes_cityscapes" / "leftImg8bit" / "val").rglob("*.png")
    )
    assert len(frames) == 4
    label_ids = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"][
        "label_ids"
    ]
    for frame in frames:
        stem = frame.name.removesuffix("_leftImg8bit.png")
        train_ids = np.asarray(Image.open(out / "predictions" / f"{stem}_trainIds.png"))
        ids = np.asarray(Image.open(out / "predictions" / f"{stem}_labelIds.png"))
        assert train_ids.shape == ids.shape == np.asarray(Image.open(frame)).shape[:2]
        # labelIds are the trainIds mapped through the dataset's table, pixel for pixel.
        assert (np.asarray(label_ids, dtype=np.uint8)[train_ids] == ids).all()


def test_ddp_two_processes_give_the_one_process_miou(trained_run: Path) -> None:
    ckpt = trained_run / "run" / "checkpoints" / "best.ckpt"
    values = []
    for out in eval_one_process_and_ddp(ckpt, trained_run):
        rows = metrics_rows(out)
        values.append((last_metric(rows, "val/miou"), last_metric(rows, "val/pixel_accuracy")))
    assert values[0] == pytest.approx(values[1], abs=1e-6)


@pytest.mark.parametrize(
    ("head", "data"), [("lraspp", "textures"), ("raspp", "coco"), ("ssdlite", "cityscapes")]
)
def test_head_and_data_of_different_tasks_fail_before_reading_data(
    tmp_path: Path, head: str, data: str
) -> None:
    cfg = compose_train(tmp_path, [f"head={head}", f"data={data}"])
    with pytest.raises(ConfigError, match=f"head={head}.*data={data}"):
        check_head_and_data(cfg)


def test_cityscapes_recipes_hold_the_paper_numbers(tmp_path: Path) -> None:
    rows = {  # experiment: (table, mIoU, head, F, output stride, backbone)
        "lraspp_mnv3l-rf2-f128_769_cityscapes": (0.7236, "lraspp", 128, 16, "mobilenet_v3_large"),
        "lraspp_mnv3l-rf2-f256_769_cityscapes": (0.7237, "lraspp", 256, 16, "mobilenet_v3_large"),
        "raspp_mnv3l-rf2-f256_769_cityscapes": (0.7191, "raspp", 256, 16, "mobilenet_v3_large"),
        "lraspp_mnv3s-rf2-f128_769_cityscapes": (0.6838, "lraspp", 128, 16, "mobilenet_v3_small"),
        "lraspp_mnv3l-rf2-f128-os32_769_cityscapes": (
            0.720,
            "lraspp",
            128,
            32,
            "mobilenet_v3_large",
        ),
        "lraspp_mnv3s-rf2-f128-os32_769_cityscapes": (
            0.683,
            "lraspp",
            128,
            32,
            "mobilenet_v3_small",
        ),
    }
    for name, (miou, head, inter, stride, backbone) in rows.items():
        cfg = compose_train(tmp_path, [f"experiment={name}"])
        assert cfg.paper.miou == miou and cfg.head.name == head
        assert cfg.head.inter_channels == inter and cfg.head.output_stride == stride
        assert cfg.backbone.name == backbone and cfg.backbone.reduced_tail
        assert cfg.data.name == "cityscapes" and cfg.data.crop_size == 769
        assert cfg.data.batch_size * cfg.trainer.devices == cfg.optim.reference_batch_size == 16


def test_int8_benchmark_scores_eager_fp32_and_int8_on_the_validation_split(
    trained_run: Path,
) -> None:
    import subprocess
    import sys

    from helpers import REPO

    ckpt = trained_run / "run" / "checkpoints" / "best.ckpt"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "bench_int8_dense.py"),
            str(ckpt),
            "--qat-steps",
            "2",
            "--qat-backends",
            "xnnpack",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=trained_run,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in result.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| path")
    }
    int8 = {r for r in rows if r.startswith("onnxruntime int8 QDQ, ")}
    pt2e = {r for r in rows if r.startswith("torchao PT2E ")}
    assert set(rows) - int8 - pt2e == {"eager", "onnxruntime fp32"}
    assert len(int8) == 4  # all int8 / float post-processing, per-channel, percentile
    assert len(pt2e) == 3  # PTQ, QAT at lr 0, QAT fine-tuning (XNNPACK quantizer)
    # The export changes no prediction beyond a near-tied pixel or two.
    assert abs(float(rows["onnxruntime fp32"]) - float(rows["eager"])) <= 2e-3
    assert all(0.0 <= float(v) <= 1.0 for v in rows.values())
