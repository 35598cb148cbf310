"""Detection end to end: SSDLite trains on generated COCO-layout data, its logged mAP is COCO's
own, eval writes a COCO results json, DDP gives the one-process mAP, bad pairs fail at start."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from helpers import (
    QUIET,
    compose_train,
    epoch_losses,
    eval_one_process_and_ddp,
    last_metric,
    metrics_rows,
    run_cli,
    train_for_epochs,
)
from mnv3.cli import ConfigError
from mnv3.train import train
from mnv3.validate import check_head_and_data

# 24 train / 8 val images (1 empty) of 96 px; SSDLite-Small at 96x96 input: seconds per epoch.
TINY_DETECT = [
    "experiment=shapes_detect_quick",
    "data.generate.train_images=24",
    "data.generate.val_images=8",
    "data.generate.empty_val_images=1",
    "data.generate.image_size=96",
    "data.image_size=96",
    "data.batch_size=8",
    "data.num_workers=0",
    "head.box_images=2",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-epoch SSDLite run on the tiny generated set (shared by the tests below)."""
    return train_for_epochs(tmp_path_factory.mktemp("detect"), TINY_DETECT)


def test_detector_trains_and_saves_plain_checkpoints(trained_run: Path) -> None:
    run = trained_run / "run"
    rows = metrics_rows(run)
    losses = epoch_losses(rows)
    assert len(losses) == 3 and losses[-1] < losses[0]
    for key in ("val/map", "val/map_50", "val/map_75", "val/map_small", "val/mar_100"):
        assert 0.0 <= last_metric(rows, key) <= 1.0 or last_metric(rows, key) == -1.0
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    hparams = ckpt["hyper_parameters"]
    assert hparams["num_classes"] == 6 and hparams["model"]["backbone"] == "mobilenet_v3_small"
    # Sparse category ids of the generated set (1, 3, 5, ...) travel with the checkpoint.
    assert hparams["label_to_category_id"] == [0, 1, 3, 5, 7, 9, 11]
    assert sorted((run / "plots").glob("val_boxes_epoch*.png"))
    assert (run / "val_per_class_ap.csv").is_file()


def test_logged_map_equals_cocoeval_on_the_written_results(trained_run: Path) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ckpt = trained_run / "run" / "checkpoints" / "best.ckpt"
    out = trained_run / "eval1"
    result = run_cli(
        "mnv3.eval", [f"ckpt_path={ckpt}", "split=val", f"hydra.run.dir={out}"], cwd=trained_run
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logged = metrics_rows(out)
    detections = json.loads((out / "coco_results.json").read_text())
    assert detections and {"image_id", "category_id", "bbox", "score"} <= set(detections[0])
    assert {d["category_id"] for d in detections} <= {1, 3, 5, 7, 9, 11}

    annotations = trained_run / "data" / "shapes_coco" / "annotations" / "instances_val2017.json"
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(annotations))
        evaluation = COCOeval(truth, truth.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    names = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")
    for name, expected in zip(names, evaluation.stats[:6], strict=True):
        assert last_metric(logged, f"val/{name}") == pytest.approx(expected, abs=1e-6), name
    assert last_metric(logged, "val/mar_100") == pytest.approx(evaluation.stats[8], abs=1e-6)


def test_ddp_two_processes_give_the_one_process_map(trained_run: Path) -> None:
    ckpt = trained_run / "run" / "checkpoints" / "best.ckpt"
    maps = []
    for out in eval_one_process_and_ddp(ckpt, trained_run):
        rows = metrics_rows(out)
        maps.append((last_metric(rows, "val/map"), last_metric(rows, "val/map_50")))
        detections = json.loads((out / "coco_results.json").read_text())
        assert len({d["image_id"] for d in detections}) >= 7  # both ranks' images written
    # Equal up to the order in which tied detections reach COCOeval (gathered across ranks).
    assert maps[0] == pytest.approx(maps[1], abs=1e-5)


@pytest.mark.parametrize(
    ("head", "data"), [("ssdlite", "textures"), ("ssdlite", "imagenet"), ("classifier", "coco")]
)
def test_head_and_data_of_different_tasks_fail_before_reading_data(
    tmp_path: Path, head: str, data: str
) -> None:
    cfg = compose_train(tmp_path, [f"head={head}", f"data={data}"])
    with pytest.raises(ConfigError, match=f"head={head}.*data={data}"):
        check_head_and_data(cfg)


def test_unsupported_backbone_option_is_one_sentence(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, [*TINY_DETECT, *QUIET, "backbone=small_minimal"])
    with pytest.raises(
        ConfigError, match=r"backbone\.minimal=True is not supported by head=ssdlite"
    ):
        train.__wrapped__(cfg)


def test_coco_recipes_hold_torchvisions_recipe_and_the_paper_numbers(tmp_path: Path) -> None:
    paper = {  # Table 6 rows: mAP (test-dev), params (M), MAdds (B)
        "ssdlite_mnv3l_320_coco": (0.220, 4.97, 0.62),
        "ssdlite_mnv3l-reduced_320_coco": (0.220, 3.22, 0.51),
        "ssdlite_mnv3s_320_coco": (0.160, 2.49, 0.21),
        "ssdlite_mnv3s-reduced_320_coco": (0.161, 1.77, 0.16),
        "ssdlite_mnv2_320_coco": (0.221, 4.3, 0.80),
    }
    for name, (map_, params, madds) in paper.items():
        cfg = compose_train(tmp_path, [f"experiment={name}"])
        assert cfg.head.name == "ssdlite" and cfg.data.name == "coco"
        assert (cfg.paper.map, cfg.paper.params_m, cfg.paper.madds_b) == (map_, params, madds)
        assert cfg.optim.name == "sgd" and not cfg.optim.nesterov and cfg.optim.momentum == 0.9
        assert cfg.optim.lr == 0.15 and cfg.optim.reference_batch_size == 192
        assert cfg.optim.weight_decay == 4e-5 and cfg.scheduler.name == "cosine"
        assert cfg.trainer.max_epochs == 660
        assert cfg.data.batch_size * cfg.trainer.devices == 192
        assert cfg.backbone.get("reduced_tail", False) == ("reduced" in name)
    tv = compose_train(tmp_path, ["experiment=ssdlite_mnv3l-reduced_320_coco"])
    assert tv.expected.value == 0.213 and tv.expected.metric == "val/map"
    focal = compose_train(tmp_path, ["experiment=ssdlite_mnv3l-reduced_320_coco_focal"])
    assert focal.head.loss == "focal" and focal.optim.lr == 0.4
    assert focal.data.batch_size * focal.trainer.devices == 512


def _export_pte(run: Path, name: str, args: list[str]) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """``python -m mnv3.export format=pte`` on the run's best checkpoint: the sidecar, and the
    program's boxes and scores minus eager ``DetectorForExport``'s on 3 random 96 px images."""
    from mnv3.deploy import DetectorForExport, load_pte, read_sidecar, run_pte_outputs
    from mnv3.tasks import TASKS

    ckpt = run / "run" / "checkpoints" / "best.ckpt"
    out = run / "deploy" / name
    result = run_cli("mnv3.export", [f"ckpt_path={ckpt}", "format=pte", f"out={out}", *args], run)
    assert result.returncode == 0, result.stderr[-3000:]
    network = TASKS["detection"].load_trained(ckpt).model.eval()
    images = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    boxes, scores = run_pte_outputs(load_pte(out), images)
    with torch.no_grad():
        expected_boxes, expected_scores = DetectorForExport(network, (96, 96))(images)
    return read_sidecar(out), boxes - expected_boxes, scores - expected_scores


def test_cli_exports_the_detector_to_pte_with_its_postprocessing(trained_run: Path) -> None:
    sidecar, box_error, score_error = _export_pte(trained_run, "detector.pte", [])
    assert sidecar["task"] == "detection" and sidecar["outputs"] == ["boxes", "scores"]
    assert sidecar["preprocessing"]["input_size"] == [96, 96]
    assert sidecar["postprocess"]["runner"] == "mnv3.deploy.run_pte_detector"
    assert sidecar["xnnpack"]["delegated_ops"] > 0
    assert box_error.abs().max() <= 1e-3 and score_error.abs().max() <= 1e-4


def test_cli_exports_a_qat_int8_detector_to_pte(trained_run: Path) -> None:
    args = ["quantize=int8", "qat_steps=2"]
    sidecar, box_error, score_error = _export_pte(trained_run, "detector_qat.pte", args)
    assert sidecar["quantize"] == "int8"
    assert sidecar["qat"] == {"steps": 2, "lr": 0.0, "quantizer": "xnnpack"}
    # The int8 network is lowered to XNNPACK as the calibrated one is (798 ops here).
    assert sidecar["xnnpack"]["delegated_ops"] > 500
    # int8 of the unchanged weights (lr 0): measured median errors 0.01 px and 0.001.
    assert box_error.abs().median() <= 0.25 and score_error.abs().median() <= 0.01
