"""Run comparison and the paper's figures: reading real CSV and W&B offline logs, the reward,
the best-run table, and executing both notebooks end to end on runs the tests make."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import nbformat
import pytest
import yaml
from nbclient import NotebookClient
from pytorch_lightning.loggers import CSVLogger

from dense_suite import TINY_SEGMENT
from helpers import QUIET, TINY_DATA, compose_train, train_for_epochs
from mnv3.report import (
    best_per_experiment,
    collect_runs,
    markdown_table,
    paper_rows,
    read_wandb_offline,
    reference_targets_ms,
    reward,
    runs_table,
    wandb_records,
)

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


# -- the paper's figures (notebooks/paper_figures.ipynb) -------------------------------------------
def _experiment_run(
    folder: Path, experiment: str, accs: list[float], latency_ms: float, paper: float | None = None
) -> None:
    """A fake classification run started with ``experiment=<experiment>``, latency cached."""
    _fake_run(folder, "mobilenet_v3_large", accs, 217_000_000)
    config = yaml.safe_load((folder / "config_resolved.yaml").read_text())
    config["head"] = {"task": "classification"}
    config["data"]["image_size"] = 224
    if paper is not None:
        config["paper"] = {"acc1": paper, "table": "Table 3"}
    (folder / "config_resolved.yaml").write_text(yaml.safe_dump(config))
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"experiment={experiment}"]))
    cache = {"latency_ms": latency_ms, "input_size": [224, 224], "threads": 1}
    (folder / "latency.json").write_text(json.dumps(cache))


def test_reward_is_mnasnets_formula_on_known_numbers() -> None:
    # Paper §4.1: ACC x (LAT / TAR)^w; twice the target costs 2^-0.07 (Large) or 2^-0.15 (Small).
    assert reward(0.75, 45.52, 22.76, -0.07) == pytest.approx(0.75 * 0.952638, rel=1e-6)
    assert reward(0.674, 5.0, 10.0, -0.15) == pytest.approx(0.674 * 1.109569, rel=1e-6)
    assert reward(0.6, 22.76, 22.76, -0.07) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="must be positive"):
        reward(0.6, 0.0, 22.76, -0.07)


def test_best_run_table_picks_the_best_monitored_value_per_experiment(tmp_path: Path) -> None:
    # a1 peaks at 0.9 but ends at 0.5: the best value counts, not the last one.
    _experiment_run(tmp_path / "a1", "imagenet_large", [0.6, 0.9, 0.5], 40.0, paper=0.752)
    _experiment_run(tmp_path / "a2", "imagenet_large", [0.7, 0.85], 20.0, paper=0.752)
    _experiment_run(tmp_path / "b1", "other", [0.3, 0.4], 10.0)
    rows = paper_rows(collect_runs(tmp_path), targets_ms={"large": 20.0})
    assert all(r["latency_source"] == "cached" for r in rows)
    best = best_per_experiment(rows)
    assert [(r["experiment"], r["best"]) for r in best] == [("imagenet_large", 0.9), ("other", 0.4)]
    assert best[0]["paper"] == 0.752 and best[0]["paper_table"] == "Table 3"
    assert math.isnan(best[1]["paper"])
    assert best[0]["reward"] == pytest.approx(0.9 * 2.0**-0.07)  # 40 ms against a 20 ms target
    assert best[1]["reward"] == pytest.approx(0.4 * 0.5**-0.07)
    table = markdown_table(best)
    assert (
        "| imagenet_large | mobilenet_v3_large-classifier-shapes | val/acc1 | 0.9 | 0.752 |"
        in table
    )


def test_reward_target_comes_from_bench_results_when_present(tmp_path: Path) -> None:
    bench = tmp_path / "models.csv"
    bench.write_text("key,ours_1t_ms\nlarge-1.0,20.5\nsmall-1.0,9.25\n")
    targets, source = reference_targets_ms(bench)
    assert targets == {"large": 20.5, "small": 9.25, "mobilenet_v2": 20.5} and "bench" in source
    assert reference_targets_ms(tmp_path / "missing.csv")[0]["large"] == 22.76


def test_a_missing_runs_folder_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"runs folder .*nope does not exist; expected"):
        collect_runs([tmp_path, tmp_path / "nope"])


# TINY_SEGMENT (LR-ASPP-Small on 64x128 frames) and TINY_DATA (6 classes x 8 images of 32 px for
# the classifier): a few seconds per run on 2 cores.
@pytest.fixture(scope="module")
def real_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classifier run logged to CSV and W&B offline, and an LR-ASPP run (CSV), in one folder."""
    from mnv3.train import train

    root = tmp_path_factory.mktemp("runs")
    previous = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "offline"
    try:
        overrides = [*TINY_DATA, *QUIET, "logger=wandb", "trainer.max_epochs=2", "test=false"]
        train(compose_train(root / "cls", overrides))
    finally:
        if previous is None:
            del os.environ["WANDB_MODE"]
        else:
            os.environ["WANDB_MODE"] = previous
    train_for_epochs(root / "seg", [*TINY_SEGMENT, "test=false"], epochs=2)
    return root


def test_wandb_offline_run_reads_as_its_csv(real_runs: Path, tmp_path: Path) -> None:
    (offline,) = (real_runs / "cls" / "run" / "wandb").glob("offline-run-*")
    from_wandb = read_wandb_offline(offline)
    (from_csv,) = [r for r in collect_runs(real_runs) if r.task == "classification"]
    assert from_csv.source == "csv" and from_wandb.source == "wandb"
    assert from_wandb.path == from_csv.path and from_wandb.name == from_csv.name
    assert from_wandb.config["backbone"] == from_csv.config["backbone"]
    for key in ("model/params", "model/madds"):
        assert from_wandb.final(key) == from_csv.final(key) > 0
    assert from_wandb.series("val/acc1") == from_csv.series("val/acc1")
    assert len(from_wandb.series("val/acc1")[1]) == 2
    # A run folder with only its W&B files (CSV lost, or copied from elsewhere) is still found.
    shutil.copytree(offline, tmp_path / "copy" / "wandb" / offline.name)
    (copied,) = collect_runs(tmp_path)
    assert copied.source == "wandb" and copied.best() == from_csv.best()
    # A record file cut mid-write keeps its complete records instead of failing.
    record = next((tmp_path / "copy" / "wandb" / offline.name).glob("*.wandb"))
    whole = len(wandb_records(record))
    record.write_bytes(record.read_bytes()[:-5])
    assert 0 < len(wandb_records(record)) < whole
    with pytest.raises(ValueError, match="is not a W&B run file"):
        wandb_records(REPO / "README.md")


def _saved_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: outputs"


def test_notebooks_are_saved_without_outputs() -> None:
    for name in ("compare_runs.ipynb", "paper_figures.ipynb"):
        _saved_without_outputs(REPO / "notebooks" / name)


def test_paper_figures_notebook_executes_on_real_runs(real_runs: Path, tmp_path: Path) -> None:
    nb = nbformat.read(REPO / "notebooks" / "paper_figures.ipynb", as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    params.source = (
        f"RUNS = [Path({str(real_runs)!r})]\nFIGURES = Path({str(tmp_path / 'figures')!r})\n"
        f"LATENCY = True\nBENCH_CSV = None\nWANDB_PROJECT = None"
    )
    NotebookClient(
        nb,
        timeout=180,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO / "notebooks")}},
    ).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "2 run(s)" in text, text
    assert "mobilenet_v3_small-classifier-textures" in text and "val/miou" in text
    for name in ("top1_vs_latency", "top1_vs_madds", "map_vs_latency", "miou_vs_latency"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 0, name
    assert (
        "| experiment | run | metric | best | paper |"
        in (tmp_path / "figures" / "best_runs.md").read_text()
    )
    for run in ("cls", "seg"):
        latency = json.loads((real_runs / run / "run" / "latency.json").read_text())
        assert latency["latency_ms"] > 0 and latency["checkpoint"] == "best.ckpt"
    seg = json.loads((real_runs / "seg" / "run" / "latency.json").read_text())
    assert seg["input_size"] == [64, 128]


def test_a_block_table_run_is_its_own_line_unless_it_is_the_papers_table() -> None:
    from mnv3.models.block_table import table_to_plain
    from mnv3.models.mobilenetv3 import MOBILENET_V3_SMALL, V3Table
    from mnv3.report import backbone_family, backbone_name, family_label

    small = {"name": "mobilenet_v3", "table": table_to_plain(MOBILENET_V3_SMALL)}
    assert backbone_family(small) == "small" and family_label(small) == "MobileNetV3-Small"
    rows = (
        *MOBILENET_V3_SMALL.rows[:-1],
        MOBILENET_V3_SMALL.rows[-1].__class__(5, 256, 96, True, "HS", 1),
    )
    searched = V3Table("mobilenet_v3_small_netadapt", rows, 16, 576, 1024)
    adapted = {"name": "mobilenet_v3", "table": table_to_plain(searched)}
    assert backbone_name(adapted) == "mobilenet_v3_small_netadapt"
    assert backbone_family(adapted) == family_label(adapted) == "mobilenet_v3_small_netadapt"
    # Same rows under another name are still Small; a named backbone keeps its group name.
    renamed = {"name": "mobilenet_v3", "table": {**small["table"], "name": "mine"}}
    assert backbone_family(renamed) == "small" and backbone_name(renamed) == "mine"
    assert backbone_name({"name": "mobilenet_v3_large"}) == "mobilenet_v3_large"
