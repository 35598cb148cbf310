"""A finished run, opened once for every tool that reads one back: eval, export, explain,
the report's latency and the deployment benchmarks.

``TrainedRun.open(ckpt_path, data_overrides)`` reads the checkpoint safely
(``weights_only=True``, one sentence for an empty, truncated, unsafe or foreign file), finds the
run's resolved config in its folder (:mod:`mnv3.run_folder`), and gives:

- :attr:`TrainedRun.task`: the task the run saved, its pretrained-weights source not read again;
- :attr:`TrainedRun.network`: the network the run was validated with (the task's
  :attr:`~mnv3.tasks.base.BaseTask.evaluated_network`: its EMA copy when it kept one), in eval
  mode and the plain (NCHW) memory format every exporter and runtime takes;
- :meth:`TrainedRun.datamodule`: the run's data module, with the ``data.`` overrides the
  command line gave (constructing it reads no file).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mnv3.cli import ConfigError, build_datamodule
from mnv3.run_folder import RUN_CONFIG, RunFolder, find_run_config
from mnv3.validate import lightning_checkpoint


@dataclass
class TrainedRun:
    """A run's checkpoint, its resolved config and, on first use, its task and network.

    Attributes:
        ckpt_path: the checkpoint file (``<run>/checkpoints/<name>.ckpt``).
        checkpoint: the checkpoint as read (its callback states, hyperparameters, weights).
        config: the run's ``config_resolved.yaml``.
        data_config: the run's ``data`` section with the overrides applied.
    """

    ckpt_path: Path
    checkpoint: dict[str, Any]
    config: DictConfig
    data_config: DictConfig

    @classmethod
    def open(
        cls,
        ckpt_path: str | Path,
        data_overrides: Mapping[str, Any] | DictConfig | None = None,
        key: str = "ckpt_path",
    ) -> TrainedRun:
        """Read ``ckpt_path`` and its run's config; ``key`` names the setting in error sentences.

        Raises:
            CheckpointError: the file is not a checkpoint written by ``mnv3.train``.
            FileNotFoundError: the run folder holds no ``config_resolved.yaml``.
        """
        path = Path(str(ckpt_path)).expanduser()
        checkpoint = lightning_checkpoint(path, key)
        config = find_run_config(path)
        data = OmegaConf.merge(config.data, data_overrides or {})
        assert isinstance(data, DictConfig)
        return cls(path, checkpoint, config, data)

    @property
    def task_name(self) -> str:
        """The run's task (``head.task``): classification, detection or segmentation."""
        return str(self.config.head.task)

    @property
    def folder(self) -> RunFolder:
        """The run folder holding the checkpoint."""
        return RunFolder.of_checkpoint(self.ckpt_path)

    @property
    def task_class(self) -> Any:
        """The task class of the run (:data:`mnv3.tasks.TASKS`)."""
        from mnv3.tasks import TASKS

        return TASKS[self.task_name]

    @functools.cached_property
    def task(self) -> Any:
        """The task the run saved (:meth:`~mnv3.tasks.base.BaseTask.load_trained`), on CPU."""
        from mnv3.models.checkpoints import CheckpointError

        try:
            return self.task_class.load_trained(self.ckpt_path, self.checkpoint)
        except (RuntimeError, KeyError, TypeError) as exc:  # hparams or tensors that do not fit
            message = f"could not read checkpoint {self.ckpt_path}: {type(exc).__name__}: {exc}"
            raise CheckpointError(message.split("\n")[0]) from exc

    @functools.cached_property
    def network(self) -> Any:
        """The network the run was validated with, in eval mode and NCHW memory format."""
        import torch

        network = self.task.evaluated_network.eval()
        return network.to(memory_format=torch.contiguous_format)

    def datamodule(self) -> Any:
        """A new data module of the run's data config (overrides applied); reads no file."""
        try:
            return build_datamodule(self.data_config)
        except TypeError as exc:  # a key the data module does not take, e.g. from an older version
            raise ConfigError(
                f"the data section of the run config of {self.ckpt_path} does not build a data "
                f"module ({exc}); expected the {RUN_CONFIG} written by mnv3.train"
            ) from None
