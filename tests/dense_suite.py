"""One end-to-end suite for the dense tasks (detection, segmentation), run once per task.

``tests/test_detect.py`` and ``tests/test_segment.py`` each subclass :class:`DenseRunSuite` with
their :class:`DenseCase`: the suite trains the tiny run once per class and checks what every dense
task must do (a falling loss, bounded metrics, pictures and per-class CSVs, eval through the CLI,
DDP giving the one-process numbers); the subclasses add what only their task does. Kept out of a
``test_*.py`` name so pytest collects it only through those subclasses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from helpers import (
    epoch_losses,
    eval_one_process_and_ddp,
    last_metric,
    metrics_rows,
    run_cli,
    train_for_epochs,
)

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


@dataclass(frozen=True)
class DenseCase:
    """What differs between the dense tasks' end-to-end runs.

    ``bounded``: logged val metrics that must lie in [0, 1] (or be COCO's -1 for "no such
    object"); ``ddp_metrics``: the val metrics one process and DDP over two must give equal;
    ``ddp_val_images``: the odd number of val images that DDP test scores (uneven shards);
    ``picture`` / ``per_class_csv``: what validation draws and writes.
    """

    name: str
    overrides: tuple[str, ...]
    bounded: tuple[str, ...]
    ddp_metrics: tuple[str, ...]
    ddp_val_images: int
    picture: str
    per_class_csv: str


DETECT = DenseCase(
    name="detect",
    overrides=tuple(TINY_DETECT),
    bounded=("val/map", "val/map_50", "val/map_75", "val/map_small", "val/mar_100"),
    ddp_metrics=("val/map", "val/map_50"),
    ddp_val_images=7,  # 4 + 3 over 2 ranks; the last (empty) image on rank 1
    picture="val_boxes_epoch*.png",
    per_class_csv="val_per_class_ap.csv",
)
SEGMENT = DenseCase(
    name="segment",
    overrides=tuple(TINY_SEGMENT),
    bounded=("val/miou", "val/pixel_accuracy"),
    ddp_metrics=("val/miou", "val/pixel_accuracy"),
    ddp_val_images=5,  # 3 + 2 over 2 ranks; one process: batches of 4 + 1
    picture="val_masks_epoch*.png",
    per_class_csv="val_per_class_iou.csv",
)


class DenseRunSuite:
    """The tests every dense task passes; a ``Test*`` subclass sets :attr:`CASE`."""

    CASE: ClassVar[DenseCase]

    @pytest.fixture(scope="class")
    def trained_run(self, tmp_path_factory: pytest.TempPathFactory) -> Path:
        """A 3-epoch run of :attr:`CASE` on its tiny generated set (shared by the class)."""
        return train_for_epochs(tmp_path_factory.mktemp(self.CASE.name), list(self.CASE.overrides))

    def check_run(self, rows: list[dict[str, str]], hparams: Mapping[str, Any]) -> None:
        """What the task's logged rows and checkpoint hyperparameters must hold."""
        raise NotImplementedError

    def check_eval_output(self, out: Path) -> None:
        """What an eval run of the task writes beside its metrics (nothing by default)."""

    def test_trains_and_saves_plain_checkpoints(self, trained_run: Path) -> None:
        run = trained_run / "run"
        rows = metrics_rows(run)
        losses = epoch_losses(rows)
        assert len(losses) == 3 and losses[-1] < losses[0]
        for key in self.CASE.bounded:
            assert 0.0 <= last_metric(rows, key) <= 1.0 or last_metric(rows, key) == -1.0
        ckpt = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
        self.check_run(rows, ckpt["hyper_parameters"])
        assert ckpt["hyper_parameters"]["model"]["backbone"] == "mobilenet_v3_small"
        assert sorted((run / "plots").glob(self.CASE.picture))
        assert (run / self.CASE.per_class_csv).is_file()

    def test_ddp_two_processes_give_the_one_process_metrics(self, trained_run: Path) -> None:
        """An odd val set on 2 ranks: each image is scored once (no sampler padding), and the
        states gathered in rank order keep the one-process image order, so the numbers are
        equal to the last bit (COCOeval breaks score ties by image order)."""
        ckpt = trained_run / "run" / "checkpoints" / "best.ckpt"
        odd = [
            f"data.root={trained_run / 'odd_val'}",  # generated afresh with the odd count
            f"data.generate.val_images={self.CASE.ddp_val_images}",
        ]
        values = []
        for out in eval_one_process_and_ddp(ckpt, trained_run, odd):
            rows = metrics_rows(out)
            values.append(tuple(last_metric(rows, key) for key in self.CASE.ddp_metrics))
            self.check_eval_output(out)
        assert values[0] == values[1]

    @staticmethod
    def eval_val(trained_run: Path, name: str = "eval1") -> Path:
        """``python -m mnv3.eval`` of the run's best checkpoint on val, into ``<run>/<name>``."""
        ckpt = trained_run / "run" / "checkpoints" / "best.ckpt"
        out = trained_run / name
        args = [f"ckpt_path={ckpt}", "split=val", f"hydra.run.dir={out}"]
        result = run_cli("mnv3.eval", args, cwd=trained_run)
        assert result.returncode == 0, result.stderr[-3000:]
        return out
