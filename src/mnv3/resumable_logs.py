"""Logs that continue across a resume: the CSV file and the W&B run of a run folder.

- :class:`ResumableCSVLogger`: continues ``csv/metrics.csv`` instead of deleting it (Lightning's
  CSVLogger removes an existing file), dropping the rows a resumed run logs again.
- :func:`wandb_run_id`: the W&B run id kept in the run folder, so a resume continues the same run.
"""

from __future__ import annotations

import csv
import os
import secrets
import string
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from mnv3.run_folder import WANDB_ID_FILE


def _row_step(row: dict[str, Any]) -> int:
    return int(float(row["step"]))


def _row_keys(row: dict[str, Any]) -> frozenset[str]:
    """The metrics a row holds (its non-empty columns), which identify it within a step."""
    return frozenset(k for k, v in row.items() if k != "step" and v not in ("", None))


class ResumableExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer that continues an existing ``metrics.csv`` and writes every row at once.

    Rows are appended as they are logged (Lightning buffers up to ``flush_logs_every_n_steps``,
    which a SIGKILL would lose). On resume, the previous attempt's rows stay, except those the
    resumed run logs again: it replays every step from the first one it logs (``s``), so rows of
    the old attempt after ``s`` are dropped, and a row at ``s`` is replaced by a new row with the
    same metrics. The file then holds the rows an uninterrupted run writes.
    """

    def __init__(self, log_dir: str, resume: bool) -> None:
        self._resume = resume
        super().__init__(log_dir=log_dir)
        self._previous: list[dict[str, str]] | None = None
        self._new_rows: list[dict[str, Any]] = []
        if resume and os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                reader = csv.DictReader(f)
                self._previous = list(reader)
                self.metrics_keys = list(reader.fieldnames or [])

    def _check_log_dir_exists(self) -> None:
        if not self._resume:  # a fresh run in a used folder starts a fresh file, as Lightning does
            super()._check_log_dir_exists()

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        """Record one row and write it to the file at once."""
        super().log_metrics(metrics_dict, step)
        self.save()

    def save(self) -> None:
        """Append the pending rows, first dropping the previous attempt's rows they replace."""
        if self._previous is None or not self.metrics:
            super().save()
            return
        # The resumed run's first step: rewrite the file as the previous rows it does not
        # replay plus the new rows (a few rows, at one step), until the run moves past it.
        self._record_new_keys()
        self._new_rows += self.metrics
        self.metrics = []
        start = min(int(m["step"]) for m in self._new_rows)
        replayed = {_row_keys(m) for m in self._new_rows if int(m["step"]) == start}
        kept = [
            row
            for row in self._previous
            if _row_step(row) < start
            or (_row_step(row) == start and _row_keys(row) not in replayed)
        ]
        self._rewrite([*kept, *self._new_rows])
        if any(int(m["step"]) > start for m in self._new_rows):
            self._previous, self._new_rows = None, []

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        tmp = f"{self.metrics_file_path}.tmp-{os.getpid()}"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_file_path)


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose file survives a resume (``resume=True``) and loses no row to a kill."""

    def __init__(self, *args: Any, resume: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resume = resume

    @property
    @rank_zero_experiment
    def experiment(self) -> ResumableExperimentWriter:
        """The writer, created on first use (rank zero only, as Lightning's)."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ResumableExperimentWriter(self.log_dir, resume=self._resume)
        return self._experiment


def wandb_run_id(output_dir: Path, resume: bool) -> str:
    """The W&B run id of this run folder: the saved one when resuming, else a new one (saved).

    ``WandbLogger`` passes ``resume="allow"`` to ``wandb.init``, so the same id continues the
    same W&B run online; offline (wandb 0.31), each attempt writes another
    ``wandb/offline-run-*-<id>`` folder under the same id, and ``wandb sync`` of all of them
    uploads them into that one run.
    """
    path = output_dir / WANDB_ID_FILE
    if resume and path.is_file():
        saved = path.read_text().strip()
        if saved:
            return saved
    alphabet = string.ascii_lowercase + string.digits  # W&B's own id alphabet
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    path.write_text(run_id + "\n")
    return run_id
