"""Detection end to end: SSDLite trains on generated COCO-layout data, its logged mAP is COCO's
own, eval writes a COCO results json, DDP gives the one-process mAP (:mod:`dense_suite`), a head
and data of different tasks fail at start."""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from dense_suite import DETECT, TINY_DETECT, DenseRunSuite
from helpers import QUIET, compose_train, last_metric, metrics_rows, run_cli, train_for_epochs
from mnv3.cli import ConfigError
from mnv3.train import train
from mnv3.validate import check_head_and_data


class TestDetectionRun(DenseRunSuite):
    """SSDLite-Small on the tiny generated COCO-layout set: the dense suite plus COCO's own
    numbers, the COCO results json and the ``.pte`` export with its post-processing."""

    CASE = DETECT

    def check_run(self, rows: list[dict[str, str]], hparams: Mapping[str, Any]) -> None:
        assert hparams["num_classes"] == 6
        # Sparse category ids of the generated set (1, 3, 5, ...) travel with the checkpoint.
        assert hparams["label_to_category_id"] == [0, 1, 3, 5, 7, 9, 11]

    def check_eval_output(self, out: Path) -> None:
        detections = json.loads((out / "coco_results.json").read_text())
        # The 7 images of the DDP test: both ranks' written (one may have no box left).
        assert len({d["image_id"] for d in detections}) >= 6

    def test_logged_map_equals_cocoeval_on_the_written_results(self, trained_run: Path) -> None:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        out = self.eval_val(trained_run)
        logged = metrics_rows(out)
        detections = json.loads((out / "coco_results.json").read_text())
        assert detections and {"image_id", "category_id", "bbox", "score"} <= set(detections[0])
        assert {d["category_id"] for d in detections} <= {1, 3, 5, 7, 9, 11}

        annotations = (
            trained_run / "data" / "shapes_coco" / "annotations" / "instances_val2017.json"
        )
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

    def test_cli_exports_a_qat_int8_detector_to_pte(self, trained_run: Path) -> None:
        """``python -m mnv3.export format=pte quantize=int8 qat_steps=2``: the sidecar the
        command writes for a detector, and the suite's one int8 lowering of SSDLite.

        Without ``quantize`` the command differs only in lowering an fp32 SSDLite, whose parity
        with eager and runner detections ``tests/deploy/test_pte_dense.py`` checks
        (``test_pte_detector_fp32_matches_eager_and_runner_gives_postprocess_boxes``) on a
        random detector: this 3-epoch run's outputs do not depend on the image (measured)."""
        from mnv3.deploy import pte
        from mnv3.deploy.onnx_export import postprocess_metadata

        args = ["quantize=int8", "qat_steps=2"]
        sidecar, network, box_error, score_error = _export_pte(
            trained_run, "detector_qat.pte", args
        )
        assert sidecar["task"] == "detection" and sidecar["outputs"] == ["boxes", "scores"]
        assert sidecar["preprocessing"]["input_size"] == [96, 96]
        # The run's NMS thresholds travel with the program, with the runner to apply them.
        expected_post = {**postprocess_metadata(network), "runner": pte.PTE_DETECTOR_RUNNER}
        assert sidecar["postprocess"] == expected_post
        assert sidecar["quantize"] == "int8"
        assert sidecar["qat"] == {"steps": 2, "lr": 0.0, "quantizer": "xnnpack"}
        # The int8 network is lowered to XNNPACK as the calibrated one is (798 ops here).
        assert sidecar["xnnpack"]["delegated_ops"] > 500
        # int8 of the unchanged weights (lr 0): measured median errors 0.01 px and 0.001.
        assert box_error.abs().median() <= 0.25 and score_error.abs().median() <= 0.01


@pytest.mark.parametrize(
    ("head", "data"),
    [
        ("ssdlite", "textures"),
        ("ssdlite", "imagenet"),
        ("classifier", "coco"),
        ("lraspp", "textures"),
        ("raspp", "coco"),
        ("ssdlite", "cityscapes"),
    ],
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


def _export_pte(
    run: Path, name: str, args: list[str]
) -> tuple[dict[str, Any], torch.nn.Module, torch.Tensor, torch.Tensor]:
    """``python -m mnv3.export format=pte`` on the run's best checkpoint: the sidecar, the run's
    eager SSDLite, and the program's boxes and scores minus eager ``DetectorForExport``'s on 3
    random 96 px images."""
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
    return read_sidecar(out), network, boxes - expected_boxes, scores - expected_scores


def test_a_batch_of_one_image_trains(tmp_path: Path) -> None:
    """``data.batch_size=1`` (or a batch that unreadable images shrank to one): the extra blocks'
    BatchNorm on 1x1 maps uses running statistics for it instead of a 133-line traceback."""
    overrides = [
        *TINY_DETECT,
        "data.batch_size=1",
        "data.generate.train_images=3",
        "data.generate.val_images=2",
        "data.generate.empty_val_images=0",
    ]
    train_for_epochs(tmp_path, overrides, epochs=1)
    rows = metrics_rows(tmp_path / "run")
    assert math.isfinite(last_metric(rows, "train/loss_epoch"))
    assert last_metric(rows, "val/map") >= 0.0
