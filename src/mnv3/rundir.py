"""Finding what ``mnv3.train`` saved in a run folder, for the tools that read a checkpoint back.

A small module of its own so that ``mnv3.eval`` and ``mnv3.explain`` share it without one entry
point importing the other (and everything that one imports).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

RUN_CONFIG_NAME = "config_resolved.yaml"


def find_run_config(ckpt_path: Path) -> DictConfig:
    """The resolved config saved by ``mnv3.train`` in the run folder holding the checkpoint.

    Looked for next to the checkpoint, then one folder up (``<run>/checkpoints/<name>.ckpt``).

    Raises:
        FileNotFoundError: neither folder holds ``config_resolved.yaml``.
    """
    for folder in (ckpt_path.parent, ckpt_path.parent.parent):
        candidate = folder / RUN_CONFIG_NAME
        if candidate.is_file():
            return OmegaConf.load(candidate)
    raise FileNotFoundError(
        f"no {RUN_CONFIG_NAME} next to {ckpt_path} or in its run folder; "
        f"expected the layout <run>/checkpoints/<name>.ckpt with <run>/{RUN_CONFIG_NAME}"
    )
