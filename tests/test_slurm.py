"""SLURM through Hydra's submitit launcher: the shipped launcher config, and a two-job multirun
through submitit's local executor on this machine."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from helpers import QUIET, TINY_DATA, metrics_rows, run_cli
from mnv3.cli import CONFIG_DIR


def test_slurm_launcher_asks_for_sigusr1_and_requeue(tmp_path: Path) -> None:
    from submitit.slurm.slurm import _make_sbatch_string

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4"],
            return_hydra_config=True,
        )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert cfg.hydra.launcher.tasks_per_node == 4  # one DDP process per GPU
    # The sbatch header submitit writes from these settings (as the launcher passes them).
    script = _make_sbatch_string(
        command="python -m mnv3.train",
        folder=str(tmp_path),
        job_name="mnv3",
        nodes=1,
        ntasks_per_node=4,
        gpus_per_node=4,
        signal_delay_s=cfg.hydra.launcher.signal_delay_s,
        additional_parameters=dict(launcher["additional_parameters"]),
    )
    assert "#SBATCH --signal=USR1@90" in script  # Lightning's requeue signal, not submitit's USR2
    assert "USR2" not in script
    assert "#SBATCH --requeue" in script


def test_submitit_local_runs_a_two_job_multirun(tmp_path: Path) -> None:
    sweep = tmp_path / "multi"
    args = [
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.cpus_per_task=1",
        "seed=1,2",
        "debug=limit",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "test=false",
        *TINY_DATA,
        *QUIET,
        f"paths.data_dir={tmp_path}/data",
        f"hydra.sweep.dir={sweep}",
    ]
    result = run_cli("mnv3.train", args, cwd=tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in runs] == [
        "0_mobilenet_v3_small-classifier-textures",
        "1_mobilenet_v3_small-classifier-textures",
    ]
    for run, seed in zip(runs, (1, 2), strict=True):
        assert f"seed: {seed}" in (run / "config_resolved.yaml").read_text()
        assert (run / "checkpoints" / "last.ckpt").stat().st_size > 0
        assert any("val/acc1" in row and row["val/acc1"] for row in metrics_rows(run))
    # submitit kept each job's own log and result next to the runs.
    assert len(list((sweep / ".submitit").rglob("*_result.pkl"))) == 2
