"""Run comparison: reading real CSVLogger output, and executing the notebook end to end."""

from __future__ import annotations

import math
import os
from pathlib import Path

import nbformat
import yaml
from nbclient import NotebookClient
from pytorch_lightning.loggers import CSVLogger

from mnv3.report import collect_runs, runs_table

REPO = Path(__file__).resolve().parents[1]


def _fake_run(folder: Path, backbone: str, accs: list[float], madds: int) -> None:
    """A run folder as mnv3.train leaves it, written with Lightning's own CSVLogger."""
    folder.mkdir(parents=True)
    config = {
        "run_name": f"{backbone}-classifier-shapes",
        "backbone": {"name": backbone, "width_mult": 1.0},
        "data": {"name": "shapes"},
    }
    (folder / "config_resolved.yaml").write_text(yaml.safe_dump(config))
    logger = CSVLogger(save_dir=str(folder), name="csv", version="")
    logger.log_hyperparams({"model/params": 1000, "model/madds": madds})
    for epoch, acc in enumerate(accs):
        logger.log_metrics({"val/acc1": acc, "epoch": epoch}, step=epoch)
    logger.save()


def test_collect_runs_reads_final_metrics_and_model_cost(tmp_path: Path) -> None:
    _fake_run(tmp_path / "a", "mobilenet_v3_small", [0.5, 0.8, 0.9], 56_000_000)
    _fake_run(tmp_path / "b", "mobilenet_v2", [0.4, 0.7], 300_000_000)
    runs = collect_runs(tmp_path)
    assert [r.name for r in runs] == [
        "mobilenet_v3_small-classifier-shapes",
        "mobilenet_v2-classifier-shapes",
    ]
    table = runs_table(runs)
    assert table[0]["val/acc1"] == 0.9 and table[1]["val/acc1"] == 0.7
    assert table[0]["madds_M"] == 56.0 and math.isnan(table[0]["test/acc1"])
    assert runs[0].series("val/acc1") == ([0.0, 1.0, 2.0], [0.5, 0.8, 0.9])


def test_compare_runs_notebook_executes(tmp_path: Path) -> None:
    _fake_run(tmp_path / "logs" / "a", "mobilenet_v3_small", [0.5, 0.9], 56_000_000)
    _fake_run(tmp_path / "logs" / "b", "mobilenet_v3_large", [0.6, 0.95], 217_000_000)
    nb = nbformat.read(REPO / "notebooks" / "compare_runs.ipynb", as_version=4)
    os.environ["MNV3_LOG_DIR"] = str(tmp_path / "logs")
    try:
        NotebookClient(
            nb,
            timeout=120,
            kernel_name="python3",
            resources={"metadata": {"path": str(REPO / "notebooks")}},
        ).execute()
    finally:
        del os.environ["MNV3_LOG_DIR"]
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "2 run(s)" in text and "mobilenet_v3_large-classifier-shapes" in text
    assert (tmp_path / "logs" / "compare_runs.png").stat().st_size > 0
