"""Runs lose nothing: resume=<run>, SIGKILL / SIGTERM then resume, W&B id, atomic checkpoints,
unwritable output folders (issue 7)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import (
    QUIET,
    TINY_DATA,
    compose_train,
    metrics_rows,
    run_cli,
    start_cli,
    wait_for_file,
)
from mnv3.cli import ConfigError
from mnv3.output_dir_check import check_output_dir
from mnv3.preemption import AtomicCheckpointIO
from mnv3.resumable_logs import ResumableExperimentWriter
from mnv3.resume import restore_run_config, resume_argv
from mnv3.train import train

# 6 classes x 16 images / batch 8 = 12 steps per epoch, 2 epochs = 24 optimizer steps; a row
# every 2 steps and last.ckpt every 3, so a kill lands between checkpoints and rows are replayed.
DATA = [a.replace("train_per_class=8", "train_per_class=16") for a in TINY_DATA]
STEPS = 24
# As a user runs it: conftest sets HYDRA_FULL_ERROR=1, which adds the traceback to user errors.
AS_A_USER = {"HYDRA_FULL_ERROR": "0"}
RUN_ARGS = [
    *DATA,
    *QUIET,
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=2",
    "callbacks.last_every_n_steps=3",
    "test=false",
]


def _signature(rows: list[dict[str, str]]) -> list[tuple[str, str, tuple[str, ...]]]:
    """What a CSV row is, values aside: its step, its epoch and the metrics it holds, in order."""
    return [
        (r["step"], r["epoch"], tuple(sorted(k for k, v in r.items() if v and k != "step")))
        for r in rows
    ]


def _global_step(ckpt: Path) -> int:
    return int(torch.load(ckpt, weights_only=True)["global_step"])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def uninterrupted(workdir: Path) -> Path:
    """One uninterrupted run of RUN_ARGS: the reference for step counts and CSV rows.

    Trained in-process (no interpreter to start): what is compared is its steps and rows, which
    test_sigterm_during_validation's in-process run shares with the CLI runs."""
    train(compose_train(workdir / "full", RUN_ARGS, data_dir=workdir / "data"))
    run = workdir / "full" / "run"
    assert _global_step(run / "checkpoints" / "last.ckpt") == STEPS
    return run


def _start_and_signal(workdir: Path, name: str, sig: int, env: dict[str, str] | None = None):
    """Start a run, send ``sig`` once its first last.ckpt exists; returns (process, signal time)."""
    run = workdir / name
    extra = ["logger=wandb"] if env else []
    proc = start_cli(
        "mnv3.train",
        [*RUN_ARGS, *extra, f"paths.data_dir={workdir}/data", f"hydra.run.dir={run}"],
        cwd=workdir,
        env=env,
    )
    wait_for_file(run / "checkpoints" / "last.ckpt", proc)
    sent = time.time()
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc, sent


def test_sigkill_then_resume_ends_like_the_uninterrupted_run(
    workdir: Path, uninterrupted: Path
) -> None:
    proc, _ = _start_and_signal(workdir, "killed", signal.SIGKILL)
    run = workdir / "killed"
    killed_at = _global_step(run / "checkpoints" / "last.ckpt")
    assert proc.returncode == -signal.SIGKILL and 0 < killed_at < STEPS
    rows_before = len(metrics_rows(run))

    resumed = run_cli("mnv3.train", [f"resume={run}"], cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _global_step(run / "checkpoints" / "last.ckpt") == STEPS
    # The same file, continued: the history before the kill is still there, none of it twice.
    assert len(metrics_rows(run)) >= rows_before
    assert _signature(metrics_rows(run)) == _signature(metrics_rows(uninterrupted))
    assert not list((run / "csv").glob("*.tmp-*"))
    # The run's own config came back (nothing but resume= on the command line).
    assert "train_per_class: 16" in (run / "config_resolved.yaml").read_text()


def test_a_slurm_requeued_job_continues_from_its_last_checkpoint(
    workdir: Path, uninterrupted: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SLURM reruns the same command in the same folder: it must continue, not start over.

    The killed job is a real process; its rerun composes the same config for the same folder
    and runs in-process (what it reads from the job is SLURM_RESTART_COUNT, from the environment).
    """
    import pytorch_lightning as pl

    _, _ = _start_and_signal(workdir, "requeued/run", signal.SIGKILL)
    run = workdir / "requeued" / "run"
    killed_at = _global_step(run / "checkpoints" / "last.ckpt")
    assert 0 < killed_at < STEPS
    trained: list[int] = []

    def count_batch(self, batch, batch_idx) -> None:
        trained.append(batch_idx)

    monkeypatch.setattr(pl.LightningModule, "on_train_batch_start", count_batch)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    train(compose_train(workdir / "requeued", RUN_ARGS, data_dir=workdir / "data"))
    assert _global_step(run / "checkpoints" / "last.ckpt") == STEPS
    assert len(trained) == STEPS - killed_at  # it continued: a restart would train all 24
    assert _signature(metrics_rows(run)) == _signature(metrics_rows(uninterrupted))


def test_sigterm_saves_last_ckpt_exits_143_and_resume_keeps_the_wandb_run(
    workdir: Path, uninterrupted: Path
) -> None:
    env = {"WANDB_MODE": "offline"}
    proc, sent = _start_and_signal(workdir, "terminated", signal.SIGTERM, env=env)
    run = workdir / "terminated"
    last = run / "checkpoints" / "last.ckpt"
    stderr = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 143, stderr[-3000:]
    stopped_at = _global_step(last)
    assert 0 < stopped_at < STEPS
    # Saved on the signal; or the signal landed just after a periodic save (every 3 steps) at
    # the same batch end, and that checkpoint already holds the step the run stopped at.
    assert last.stat().st_mtime >= sent or stopped_at % 3 == 0
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in stderr
    assert errors == [
        f"error: interrupted by SIGTERM at step {stopped_at}; {last} holds step {stopped_at}; "
        f"resume with python -m mnv3.train resume={run}"
    ], stderr[-3000:]
    run_id = (run / "wandb_run_id").read_text().strip()

    resumed = run_cli("mnv3.train", [f"resume={run}"], cwd=workdir, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _global_step(last) == STEPS
    assert _signature(metrics_rows(run)) == _signature(metrics_rows(uninterrupted))
    # Both attempts wrote into the same offline W&B run (one folder per attempt, one id).
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline), offline
    assert (run / "wandb_run_id").read_text().strip() == run_id


def test_sigterm_during_validation_resumes_from_the_checkpoint_before_it(
    workdir: Path, uninterrupted: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import pytorch_lightning as pl

    def terminate_in_first_validation(self, batch, batch_idx, dataloader_idx=0) -> None:
        if not self.trainer.sanity_checking and self.trainer.current_epoch == 0 and batch_idx == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(
        pl.LightningModule, "on_validation_batch_start", terminate_in_first_validation
    )
    tmp = workdir / "in_validation"
    with pytest.raises(SystemExit) as stop:
        train(compose_train(tmp, RUN_ARGS, data_dir=workdir / "data"))
    assert stop.value.code == 143
    last = tmp / "run" / "checkpoints" / "last.ckpt"
    # Not saved inside validation (Lightning would skip the rest of it on resume), nor at the
    # epoch's last batch (same): the periodic step-9 checkpoint stands and step 10-12 replay.
    assert f"at step 12; {last} holds step 9" in capsys.readouterr().err
    monkeypatch.undo()

    train(compose_train(tmp, [f"resume={tmp}/run"], data_dir=workdir / "data"))
    assert _global_step(last) == STEPS
    assert _signature(metrics_rows(tmp / "run")) == _signature(metrics_rows(uninterrupted))


def test_resume_folder_without_checkpoint_is_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config_resolved.yaml").write_text("seed: 1\n")
    result = run_cli("mnv3.train", [f"resume={tmp_path}/run"], cwd=tmp_path, env=AS_A_USER)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: resume={tmp_path}/run: {tmp_path}/run/checkpoints/last.ckpt does not exist; "
        "expected a run folder written by mnv3.train (with config_resolved.yaml and "
        "checkpoints/last.ckpt)"
    ]


def test_resume_argv_points_hydra_at_the_run(tmp_path: Path) -> None:
    run = tmp_path / "my run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config_resolved.yaml").write_text("seed: 1\n")
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    args = resume_argv([f"resume={run}", "trainer.max_epochs=5"])
    assert args == [
        f"resume={run}",
        "trainer.max_epochs=5",
        f"hydra.run.dir='{run}'",  # quoted: Hydra's grammar parses a space
        "hydra.output_subdir=null",
    ]
    assert resume_argv(["seed=3"]) == ["seed=3"]


def test_restore_run_config_takes_key_overrides_and_refuses_group_changes(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    old, new = tmp_path / "old", tmp_path / "new"
    new.mkdir()
    OmegaConf.save(
        {
            "seed": 7,
            "ckpt_path": None,
            "resume": None,
            "trainer": {"max_epochs": 2, "default_root_dir": str(old)},
            "backbone": {"name": "mobilenet_v3_small"},
            "paths": {"output_dir": str(old), "data_dir": "/data"},
        },
        new / "config_resolved.yaml",
    )
    composed = OmegaConf.create(
        {"resume": str(new), "trainer": {"max_epochs": 9}, "backbone": {"name": "other"}}
    )
    cfg = restore_run_config(composed, [f"resume={new}", "trainer.max_epochs=9"])
    assert cfg.seed == 7 and cfg.trainer.max_epochs == 9
    assert cfg.backbone.name == "mobilenet_v3_small"
    assert cfg.paths.output_dir == str(new) and cfg.trainer.default_root_dir == str(new)
    assert cfg.paths.data_dir == "/data" and cfg.ckpt_path == str(new / "checkpoints/last.ckpt")
    with pytest.raises(ConfigError, match=r"'backbone=large' cannot change a config group"):
        restore_run_config(composed, [f"resume={new}", "backbone=large"])


def test_csv_writer_replaces_replayed_rows_and_keeps_the_rest(tmp_path: Path) -> None:
    first = ResumableExperimentWriter(str(tmp_path), resume=False)
    for step, metrics in [(1, {"a": 1.0}), (3, {"a": 2.0}), (3, {"v": 5.0}), (5, {"a": 3.0})]:
        first.log_metrics(metrics, step)
    # Rows reach the file as they are logged, so a SIGKILL loses none.
    assert [r["step"] for r in _read(tmp_path)] == ["1", "3", "3", "5"]

    # The resumed attempt replays from step 3, where only the "a" row is logged again.
    second = ResumableExperimentWriter(str(tmp_path), resume=True)
    second.log_metrics({"a": 20.0}, 3)
    assert [(r["step"], r["a"], r["v"]) for r in _read(tmp_path)] == [
        ("1", "1.0", ""),
        ("3", "", "5.0"),
        ("3", "20.0", ""),
    ]
    second.log_metrics({"a": 30.0, "b": 1.0}, 5)
    second.log_metrics({"a": 40.0}, 7)
    rows = _read(tmp_path)
    assert [(r["step"], r["a"]) for r in rows] == [
        ("1", "1.0"),
        ("3", ""),
        ("3", "20.0"),
        ("5", "30.0"),
        ("7", "40.0"),
    ]
    assert list(rows[0]) == ["a", "b", "step", "v"]

    ResumableExperimentWriter(str(tmp_path), resume=False)  # a fresh run starts a fresh file
    assert not (tmp_path / "metrics.csv").exists()


def _read(folder: Path) -> list[dict[str, str]]:
    import csv

    with open(folder / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_checkpoint_temporary_is_next_to_the_target_and_failure_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        replaced.append((str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, target)
    assert replaced == [(str(target.parent / f".last.ckpt.tmp-{os.getpid()}"), str(target))]
    assert torch.load(target, weights_only=True)["global_step"] == 1

    real_save = torch.save

    def dies_mid_write(obj, f, *args, **kwargs) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(target, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


@pytest.mark.parametrize("case", ["parent_is_file", "checkpoints_is_file"])
def test_unwritable_output_fails_at_start_with_one_line(tmp_path: Path, case: str) -> None:
    if case == "parent_is_file":
        (tmp_path / "afile").write_text("")
        run = tmp_path / "afile" / "run"
    else:
        run = tmp_path / "run"
        run.mkdir()
        (run / "checkpoints").write_text("")
    result = run_cli(
        "mnv3.train",
        [*DATA, *QUIET, f"paths.data_dir={tmp_path}/data", f"hydra.run.dir={run}"],
        cwd=tmp_path,
        env=AS_A_USER,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(run) in lines[0], lines
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()  # failed before any data was generated or read


def test_read_only_run_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(folder, 0o555)
    immutable = False
    if os.access(folder, os.W_OK) and shutil.which("chattr"):  # root ignores modes
        immutable = subprocess.run(["chattr", "+i", str(folder)]).returncode == 0
    try:
        if os.access(folder, os.W_OK) and not immutable:
            pytest.skip("cannot make a read-only folder here (root without chattr)")
        with pytest.raises(ConfigError, match=r"is not writable"):
            check_output_dir(folder / "run")
        with pytest.raises(ConfigError, match=r"ro is not writable"):
            check_output_dir(folder)
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)])
        os.chmod(folder, 0o755)


def test_a_disk_that_fills_during_a_checkpoint_write_keeps_the_previous_one(
    uninterrupted: Path, workdir: Path
) -> None:
    """The resumed run may write files no larger than half a checkpoint (RLIMIT_FSIZE, the
    kernel's EFBIG, as a full disk's ENOSPC fails the same write): its first checkpoint write
    fails, the run says so in one sentence and exits 1, and the previous last.ckpt survives."""
    import resource
    import sys

    from helpers import _cli_env

    run = workdir / "disk_full"
    shutil.copytree(uninterrupted, run)
    last = run / "checkpoints" / "last.ckpt"
    limit = last.stat().st_size // 2

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, not kills
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(
        [sys.executable, "-m", "mnv3.train", f"resume={run}", "trainer.max_epochs=3"],
        cwd=workdir,
        env=_cli_env(AS_A_USER),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_files,
    )
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith(f"error: could not write checkpoint {run}/checkpoints/"), lines
    assert "File too large" in lines[-1] and "previous last.ckpt is kept unchanged" in lines[-1]
    assert lines[-1].endswith(f"then resume with resume={run}")
    assert _global_step(last) == STEPS
    assert not list(last.parent.glob(".*.tmp-*"))
