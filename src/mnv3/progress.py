"""What a training run shows while it runs: progress, and the model it trains.

Lightning's rich progress bar redraws one line in place: on a terminal that is the best view, but
``make train > log``, ``nohup`` or a SLURM job's output file receive nothing from it between the
model summary and the end. :class:`PlainProgress` writes plain log lines instead (every N
training steps and once per epoch), and :func:`progress_bar` picks one of the two by whether
stdout is a terminal (``callbacks.progress_bar: auto``).

Lightning's model summary counts FLOPs only through an example input, which the tasks have no
single shape for, so its table ended in "Total FLOPs: 0". :class:`MAddsSummary` keeps its layer
table and prints the network's multiply-adds at the run's input size instead, counted as the paper
counts them (:func:`mnv3.models.profile.count_madds`, Table 3's MAdds).
"""

from __future__ import annotations

import datetime
import logging
import math
import sys
import time
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichModelSummary, RichProgressBar, TQDMProgressBar
from pytorch_lightning.callbacks.progress import ProgressBar

log = logging.getLogger("mnv3.progress")


def stdout_is_interactive() -> bool:
    """Whether stdout redraws a progress bar in place: a terminal (not ``TERM=dumb``) or Jupyter.

    Rich's own test, so ``FORCE_COLOR`` / ``TTY_COMPATIBLE`` set by a user or CI count as well.
    """
    from rich.console import Console

    console = Console(file=sys.stdout)
    return bool(console.is_interactive or console.is_jupyter)


def progress_bar(kind: str, every_n_steps: int) -> ProgressBar | None:
    """The progress callback ``callbacks.progress_bar`` asks for; None for ``none``.

    ``auto`` is the rich bar when stdout is interactive and :class:`PlainProgress` otherwise (a
    file, a pipe, a batch job's log).
    """
    if kind == "auto":
        kind = "rich" if stdout_is_interactive() else "plain"
    if kind == "rich":
        return RichProgressBar()
    if kind == "tqdm":
        return TQDMProgressBar()
    if kind == "plain":
        return PlainProgress(every_n_steps)
    return None


def _duration(seconds: float) -> str:
    """``0:03:12``; ``?`` while there is nothing to extrapolate from."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(datetime.timedelta(seconds=round(seconds)))


def _number(value: Any) -> str:
    """A metric for a log line: 4 significant digits."""
    value = float(value.item()) if hasattr(value, "item") else value
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class PlainProgress(ProgressBar):
    """Training progress as plain log lines, for logs that are not a terminal.

    Every ``every_n_steps`` training batches::

        epoch 2/10 step 40/63 (fit 103/630): train/loss 1.234, train/acc1 0.41 | 3.21 it/s | ETA 0:02:44

    and at the end of each epoch, with the epoch's and the last validation's metrics::

        epoch 2/10 done in 0:00:21: train/loss 1.105, train/acc1 0.52, val/loss 0.98, val/acc1 0.61

    ``it/s`` counts training batches since the previous line; the ETA extrapolates the optimizer
    steps left at the fit's own pace so far (validation included). The metrics are the ones the
    task logs with ``prog_bar=True``, as the rich bar shows. Only the first process prints.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps}: expected a positive integer")
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._fit_start = self._epoch_start = self._window_start = 0.0
        self._fit_first_step = 0
        self._window_batches = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _emit(self, line: str) -> None:
        log.info("%s", line)

    def _epoch_name(self, trainer: pl.Trainer) -> str:
        epochs = trainer.max_epochs
        shown = trainer.current_epoch + 1  # 1-based for people; checkpoints keep Lightning's
        return f"epoch {shown}/{epochs}" if epochs is not None and epochs > 0 else f"epoch {shown}"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.monotonic()
        self._fit_first_step = trainer.global_step  # a resumed fit starts past 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self._window_start = time.monotonic()
        self._window_batches = 0

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._window_batches += 1
        done = batch_idx + 1
        if not self.is_enabled or done % self.every_n_steps:
            return
        now = time.monotonic()
        rate = self._window_batches / max(now - self._window_start, 1e-9)
        self._window_start, self._window_batches = now, 0
        total = self.total_train_batches
        of_total = f"/{int(total)}" if math.isfinite(total) else ""
        fit_total = trainer.estimated_stepping_batches
        steps_done = trainer.global_step - self._fit_first_step
        elapsed = now - self._fit_start
        left = fit_total - trainer.global_step
        eta = left * elapsed / steps_done if steps_done > 0 else math.nan
        fit = f"{trainer.global_step}/{int(fit_total)}" if math.isfinite(fit_total) else ""
        metrics = self._metrics(trainer, pl_module, stage="step")
        self._emit(
            f"{self._epoch_name(trainer)} step {done}{of_total}"
            + (f" (fit {fit})" if fit else "")
            + (f": {metrics}" if metrics else "")
            + f" | {rate:.2f} it/s | ETA {_duration(eta)}"
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.is_enabled:
            return
        took = _duration(time.monotonic() - self._epoch_start)
        metrics = self._metrics(trainer, pl_module, stage="epoch")
        self._emit(
            f"{self._epoch_name(trainer)} done in {took}" + (f": {metrics}" if metrics else "")
        )

    def _metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> str:
        """The progress-bar metrics of a step line (``*_step``, plain ``train/*``) or an epoch line
        (``*_epoch`` and the rest), their ``_step``/``_epoch`` suffixes dropped."""
        shown: dict[str, str] = {}
        for key, value in self.get_metrics(trainer, pl_module).items():
            if key == "v_num" or isinstance(value, Mapping):
                continue
            step_value = key.endswith("_step") or (
                key.startswith("train/") and not key.endswith("_epoch")
            )
            if (stage == "step") != step_value:
                continue
            shown[key.removesuffix("_step").removesuffix("_epoch")] = _number(value)
        return ", ".join(f"{k} {v}" for k, v in sorted(shown.items(), key=_train_first))


def _train_first(item: tuple[str, str]) -> tuple[bool, str]:
    return (not item[0].startswith("train/"), item[0])


class MAddsSummary(RichModelSummary):
    """Lightning's layer table (``max_depth`` levels; 0: none) without its FLOPs column, then one
    line with the parameters and the multiply-adds at the run's input size::

        model: 2,542,856 params (10.2 MB), 56.5 M MAdds at 224x224

    Args:
        max_depth: layer nesting the table shows; 0 prints the model line alone.
        params: the network's parameter count (:func:`mnv3.models.profile.count_params`).
        madds: its multiply-adds on one image of ``input_size`` (``count_madds``).
        input_size: (H, W) the MAdds were counted at: the data's input size.
    """

    def __init__(
        self, max_depth: int, params: int, madds: float, input_size: tuple[int, int]
    ) -> None:
        super().__init__(max_depth=max_depth)
        self.params = int(params)
        self.madds = float(madds)
        self.input_size = (int(input_size[0]), int(input_size[1]))

    def describe(self, model_size_mb: float | None = None, frozen: int = 0) -> str:
        """The model line (``model_size_mb``: the parameters' size; ``frozen``: parameters that
        do not train, e.g. a frozen backbone's first epochs)."""
        notes = [f"{float(model_size_mb):.1f} MB"] if model_size_mb else []
        if frozen:
            notes.append(f"{frozen:,} frozen")
        size = f" ({', '.join(notes)})" if notes else ""
        h, w = self.input_size
        return f"model: {self.params:,} params{size}, {self.madds / 1e6:.1f} M MAdds at {h}x{w}"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if not self._max_depth:
            log.info("%s", self.describe())
            return
        summary = self._summary(trainer, pl_module)
        columns = [
            (name, values) for name, values in summary._get_summary_data() if name != "FLOPs"
        ]
        self._print_table(columns)
        frozen = int(summary.total_parameters - summary.trainable_parameters)
        log.info("%s", self.describe(summary.model_size, frozen))

    @staticmethod
    def _print_table(columns: list[tuple[str, list[str]]]) -> None:
        from rich import get_console
        from rich.table import Table

        table = Table(header_style="bold magenta")
        for name, _ in columns:
            numeric = name in ("Params", "In sizes", "Out sizes")
            table.add_column(
                name, justify="right" if numeric else "left", style="dim" if name == " " else None
            )
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        get_console().print(table)
