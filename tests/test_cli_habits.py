"""Habits of the field: the accelerator the machine has, mnv3's own ``--help``, MAdds instead of
Lightning's "Total FLOPs: 0", plain progress lines in logs, and the W&B / Optuna sweep recipes."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import pytest
import torch
import yaml
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning_fabric.connector import _convert_precision_to_unified_args
from omegaconf import OmegaConf

from helpers import (
    QUIET,
    REPO,
    TINY_DATA,
    compose_config,
    compose_train,
    entry_point_of,
    last_metric,
    metrics_rows,
    run_cli,
)
from mnv3.accelerator import resolve_device
from mnv3.cli import CONFIG_DIR, open_data_overrides
from mnv3.errors import ConfigError
from mnv3.validate import check_accelerator

QUICK_TRAIN = sorted(
    p.stem
    for p in (CONFIG_DIR / "experiment").glob("*_quick.yaml")
    if entry_point_of(p.stem) == "train"
)
# Entry point -> (its module, its top config).
ENTRIES = {
    "train": ("mnv3.train", "train"),
    "eval": ("mnv3.eval", "eval"),
    "export": ("mnv3.export", "export"),
    "explain": ("mnv3.explain", "explain"),
    "predict": ("mnv3.predict", "predict"),
    "search": ("mnv3.search.__main__", "search"),
}
SWEEP_RECIPE = REPO / "docs" / "wandb_sweep_lr_wd.yaml"
# Plain progress lines (mnv3.progress.PlainProgress), e.g.
# "epoch 1/2 step 2/4 (fit 2/8): train/acc1 0.375, train/loss 1.785 | 0.32 it/s | ETA 0:00:32"
STEP_LINE = re.compile(
    r"epoch (\d+)/2 step (\d+)/4 \(fit (\d+)/8\): .*train/loss [-\d.e]+.* "
    r"\| [\d.]+ it/s \| ETA (\d+:\d\d:\d\d|\?)$"
)
EPOCH_LINE = re.compile(r"epoch (\d+)/2 done in \d+:\d\d:\d\d: .*train/loss .*val/acc1 [\d.]+")
VAL_ACC = re.compile(r"done in .*val/acc1 ([\d.]+)")


def _trainer_args(cfg: Any) -> dict[str, Any]:
    """The trainer section as Lightning receives it, precision in Lightning's own spelling."""
    args = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(args, dict)
    args["precision"] = _convert_precision_to_unified_args(args["precision"])
    return args


# -- 1. trainer.accelerator: what the machine has ------------------------------------------------
def test_default_trainer_on_a_cpu_machine_is_the_cpu_trainer(tmp_path: Path) -> None:
    """On a machine without a GPU (conftest hides any), trainer=default resolves to exactly what
    trainer=cpu is: the same Lightning arguments, accelerator and precision plugin."""
    from pytorch_lightning.accelerators import CPUAccelerator

    assert not torch.cuda.is_available()
    default = compose_train(tmp_path, [])
    assert HydraConfig.get().runtime.choices["trainer"] == "default"
    assert (default.trainer.accelerator, default.trainer.precision) == ("auto", "auto")
    choice = resolve_device(default)
    assert choice is not None
    assert choice.describe() == "accelerator: cpu x1, precision 32-true (auto: no GPU visible)"
    cpu = compose_train(tmp_path, ["trainer=cpu"])
    explicit = resolve_device(cpu)
    assert explicit is not None and explicit.describe() == "accelerator: cpu x1, precision 32"
    assert _trainer_args(default) == _trainer_args(cpu)
    for cfg in (default, cpu):
        trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
        assert isinstance(trainer.accelerator, CPUAccelerator)
        assert trainer.precision == "32-true" and trainer.num_devices == 1


@pytest.mark.parametrize(("bf16", "precision"), [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_on_a_gpu_machine_trains_on_the_gpu_and_demos_stay_on_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bf16: bool, precision: str
) -> None:
    """Where a CUDA GPU is visible, trainer=default trains on it in mixed precision (bf16 where
    the GPU has it), eval measures on it in float32, the thread tuner stays off, a device count
    the machine lacks is refused in one sentence, and every CPU demo still runs on the CPU."""
    from mnv3.thread_tuner import thread_tuner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    cfg = compose_train(tmp_path, [])
    choice = resolve_device(cfg)
    assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("gpu", precision)
    assert choice is not None and choice.describe().endswith("(auto: a CUDA GPU is visible)")
    check_accelerator(cfg, gpus=1)
    tuned = {"tune_threads": True, "resolved": {"threads": 1, "thread_candidates": [1, 2]}}
    assert thread_tuner(tuned, str(cfg.trainer.accelerator)) is None
    assert thread_tuner(tuned, "cpu") is not None

    evaluation = compose_config("eval", tmp_path, [])
    resolve_device(evaluation, training=False)
    assert (evaluation.trainer.accelerator, evaluation.trainer.precision) == ("gpu", "32-true")

    ddp = compose_train(tmp_path, ["trainer=ddp"])  # 2 devices; resolved before the check
    resolve_device(ddp)
    with pytest.raises(ConfigError, match=r"^trainer\.devices=2 but this machine has 1 GPU"):
        check_accelerator(ddp, gpus=1)

    assert {"textures_quick", "shapes_detect_quick", "shapes_segment_quick"} <= set(QUICK_TRAIN)
    for name in QUICK_TRAIN:
        demo = compose_train(tmp_path, [f"experiment={name}"])
        assert HydraConfig.get().runtime.choices["trainer"] == "cpu", name
        resolve_device(demo)
        assert demo.trainer.accelerator == "cpu", name
        assert _convert_precision_to_unified_args(demo.trainer.precision) == "32-true", name
    search = compose_config("search", tmp_path, ["experiment=netadapt_small_quick"])
    assert "experiment=textures_quick" in search.search.train_overrides  # its retrain: CPU


# -- 2. --help -----------------------------------------------------------------------------------
@pytest.fixture
def keep_logging() -> Iterator[None]:
    """Hydra's --help configures logging onto the captured stdout: put the root logger back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _run_main(module: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``python -m <module> argv`` in this process: its stdout; it must exit 0."""
    entry = importlib.import_module(module)
    old_argv = sys.argv
    sys.argv = [module, *argv]
    GlobalHydra.instance().clear()
    try:
        with pytest.raises(SystemExit) as exited:
            entry.main()
    finally:
        sys.argv = old_argv
        GlobalHydra.instance().clear()
    assert exited.value.code in (0, None)
    return capsys.readouterr().out


def _examples(text: str, entry: str) -> list[list[str]]:
    """The overrides of each example command line of a help text (comments and -m dropped)."""
    block = text.split("== Examples (", 1)[1].split("\n", 1)[1].split("\n\n", 1)[0]
    block = block.replace("$RUN", "logs/runs/2026-01-01_00-00-00_run")  # a run folder
    lines = [line.split("  #", 1)[0] for line in block.splitlines() if line.strip()]
    prefix = ["python", "-m", f"mnv3.{entry}"]
    commands = [shlex.split(line) for line in lines]
    assert all(c[:3] == prefix for c in commands), lines
    return [[a for a in c[3:] if a != "-m"] for c in commands]


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_help_says_what_the_entry_does_its_groups_and_examples_that_compose(
    entry: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    keep_logging: None,
) -> None:
    module, config = ENTRIES[entry]
    monkeypatch.chdir(tmp_path)
    text = _run_main(module, ["--help"], capsys)
    assert not any(tmp_path.iterdir())  # nothing ran: no run folder, no log
    assert text.startswith(f"mnv3.{entry} (also: mnv3-{entry}): ")
    assert "docs/cli.md" in text and "--hydra-help" in text
    # Each group the entry's top config picks is listed with every option of conf/<group>/.
    defaults = OmegaConf.load(CONFIG_DIR / f"{config}.yaml").defaults
    groups = [str(next(iter(d))) for d in defaults if not isinstance(d, str)]
    groups = [g for g in groups if not g.startswith(("hydra", "override"))]
    for group in groups:
        options = ", ".join(sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")))
        assert re.search(rf"^{group}: {re.escape(options)}", text, re.M), (group, options)
    # Five examples, each composing as the entry's command line would.
    examples = _examples(text, entry)
    assert len(examples) == 5
    for overrides in examples:
        if entry in ("eval", "export", "predict"):  # main() lets data.<key>= reach the run's data
            overrides = open_data_overrides(["", *overrides])[1:]
        compose_config(config, tmp_path, overrides)


def test_hydra_help_stays_hydras(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    keep_logging: None,
) -> None:
    monkeypatch.chdir(tmp_path)
    text = _run_main("mnv3.train", ["--hydra-help"], capsys)
    assert text.startswith("Hydra (") and "--hydra-help" in text and "hydra/launcher" in text
    assert "mnv3.train (also" not in text


# -- 3. and 4. model summary with MAdds; plain progress when stdout is not a terminal -----------
def test_progress_bar_follows_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytorch_lightning.callbacks import RichProgressBar

    import mnv3.progress as progress

    monkeypatch.setattr(progress, "stdout_is_interactive", lambda: False)
    plain = progress.progress_bar("auto", 7)
    assert isinstance(plain, progress.PlainProgress) and plain.every_n_steps == 7
    monkeypatch.setattr(progress, "stdout_is_interactive", lambda: True)
    assert isinstance(progress.progress_bar("auto", 7), RichProgressBar)
    assert isinstance(progress.progress_bar("plain", 3), progress.PlainProgress)
    assert progress.progress_bar("none", 3) is None


def test_a_run_into_a_pipe_shows_plain_progress_and_the_real_madds(tmp_path: Path) -> None:
    """``python -m mnv3.train ... | cat``: a line every 2 steps with step/total, loss, it/s and
    ETA, one per epoch with the validation metric, the model's MAdds at the run's 32x32 input
    (counted again here from the saved checkpoint) and no "Total FLOPs: 0"."""
    from mnv3.models.profile import count_madds
    from mnv3.trained_run import TrainedRun

    args = [
        *TINY_DATA,
        "logger=none",
        "test=false",
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=4",
        "callbacks.progress_every_n_steps=2",
        f"hydra.run.dir={tmp_path}/run",
    ]
    result = run_cli("mnv3.train", args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split(" - ", 1)[-1] for line in result.stdout.splitlines()]

    steps = [m.groups() for line in lines if (m := STEP_LINE.search(line))]
    assert [(e, s, f) for e, s, f, _ in steps] == [
        ("1", "2", "2"),
        ("1", "4", "4"),
        ("2", "2", "6"),
        ("2", "4", "8"),
    ], result.stdout[-3000:]
    assert steps[-1][3] == "0:00:00"  # nothing left after the last step
    epochs = [m.group(1) for line in lines if (m := EPOCH_LINE.search(line))]
    assert epochs == ["1", "2"], result.stdout[-3000:]
    # The epoch line's validation accuracy is the logged one.
    val_acc = [float(r["val/acc1"]) for r in metrics_rows(tmp_path / "run") if r.get("val/acc1")]
    shown = [float(m.group(1)) for line in lines if (m := VAL_ACC.search(line))]
    assert len(shown) == 2 and shown == pytest.approx(val_acc, abs=5e-4)
    assert "accelerator: cpu x1, precision 32-true (auto: no GPU visible)" in lines
    assert not re.search(r"Epoch \d+/\d+ ", result.stdout)  # no rich bar in the log

    assert "FLOPs" not in result.stdout
    network = TrainedRun.open(tmp_path / "run" / "checkpoints" / "best.ckpt").task.model
    madds = count_madds(network, (32, 32))
    params = sum(p.numel() for p in network.parameters())
    model_lines = [line for line in lines if line.startswith("model: ")]
    assert len(model_lines) == 1, result.stdout[-3000:]
    assert model_lines[0].startswith(f"model: {params:,} params (")
    assert model_lines[0].endswith(f", {madds / 1e6:.1f} M MAdds at 32x32")


# -- 5. sweeps -----------------------------------------------------------------------------------
def _sweep_command(recipe: dict[str, Any], values: dict[str, Any]) -> list[str]:
    """The command a W&B agent runs for ``values``, its macros expanded by wandb's own code."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    args = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    macros = {
        "env": ["/usr/bin/env"],
        "interpreter": ["python"],
        "program": [recipe["program"]],
        **args,
    }
    command: list[str] = []
    for chunk in recipe["command"]:
        chunk = str(chunk)
        is_macro = chunk.startswith("${") and chunk.endswith("}")
        command += macros[chunk[2:-1]] if is_macro else [chunk]
    return command


def test_wandb_sweep_recipe_composes_with_train(tmp_path: Path) -> None:
    """Every sampled value reaches the composed train config as a Hydra override, the command
    runs ``python -m mnv3.train`` online, and the sweep's metric is the run's optimized_metric."""
    recipe = yaml.safe_load(SWEEP_RECIPE.read_text())
    assert recipe["method"] in ("grid", "random", "bayes")
    assert (REPO / recipe["program"]).is_file()
    for bound in ("min", "max"):
        values = {name: spec[bound] for name, spec in recipe["parameters"].items()}
        command = _sweep_command(recipe, values)
        start = command.index("mnv3.train")
        assert command[: start + 1] == [
            "/usr/bin/env",
            "WANDB_MODE=online",
            "python",
            "-m",
            "mnv3.train",
        ]
        cfg = compose_train(tmp_path, command[start + 1 :])
        for name, value in values.items():
            assert OmegaConf.select(cfg, name) == pytest.approx(value), name
        assert recipe["metric"]["name"] == cfg.optimized_metric == "val/acc1"
        assert recipe["metric"]["goal"] == "maximize"
        assert cfg.logger.wandb._target_.endswith("WandbLogger")


def test_optuna_search_space_is_over_train_keys(tmp_path: Path) -> None:
    """The Optuna file's parameters are keys of the train config and its direction fits the
    tasks' metrics (all higher-is-better); read as a file, so it holds without the plugin."""
    node = OmegaConf.load(CONFIG_DIR / "hparams_search" / "optuna_lr_wd.yaml")
    cfg = compose_train(tmp_path, [])
    params = node.hydra.sweeper.params
    assert set(params) == {"optim.lr", "optim.weight_decay"}
    for name in params:
        assert OmegaConf.select(cfg, name) is not None, name
    assert node.hydra.sweeper.direction == "maximize"
    grid = OmegaConf.load(CONFIG_DIR / "hparams_search" / "lr_wd.yaml").hydra.sweeper.params
    assert set(grid) == set(params)


@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
    reason="hydra-optuna-sweeper is not installed (pip install -e '.[sweep]')",
)
def test_optuna_sweep_runs_two_trials_and_reports_the_best(tmp_path: Path) -> None:
    args = [
        "-m",
        "hparams_search=optuna_lr_wd",
        "hydra.sweeper.n_trials=2",
        *TINY_DATA,
        *QUIET,
        "test=false",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "+trainer.num_sanity_val_steps=0",
        f"hydra.sweep.dir={tmp_path}/sweep",
    ]
    result = run_cli("mnv3.train", args, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(runs) == 2
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    accuracies = [last_metric(metrics_rows(run), "val/acc1") for run in runs]
    assert results["best_value"] == pytest.approx(max(accuracies), abs=1e-6)
    for run in runs:
        saved = OmegaConf.load(run / "config_resolved.yaml")
        assert 0.0003 <= saved.optim.lr <= 0.03 and 0.001 <= saved.optim.weight_decay <= 0.1
