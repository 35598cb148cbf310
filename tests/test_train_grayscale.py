"""End to end: a gray run (data.channels=1, backbone.in_channels=1) trains from the configs."""

from __future__ import annotations

from pathlib import Path

from helpers import QUIET, TINY_DATA, compose_train
from mnv3.train import train


def test_gray_fast_dev_run_trains_validates_and_tests(tmp_path: Path) -> None:
    # textures has no channels key of its own (the chest X-ray configs do): add it.
    gray = ["+data.channels=1", "backbone.in_channels=1"]
    cfg = compose_train(tmp_path, ["debug=fast_dev_run", *TINY_DATA, *QUIET, *gray])
    assert cfg.data.channels == 1 and cfg.backbone.in_channels == 1
    train(cfg)
    assert (tmp_path / "run" / "config_resolved.yaml").is_file()


def test_chest_xray_configs_default_to_rgb(tmp_path: Path) -> None:
    for data in ("chest_xray_pneumonia", "chestxray14", "chexpert"):
        cfg = compose_train(tmp_path, [f"data={data}", "backbone=small"])
        assert cfg.data.channels == 3 and cfg.backbone.in_channels == 3
