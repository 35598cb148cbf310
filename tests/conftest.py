"""Shared test settings: CPU only, deterministic, few threads (CI has 2 cores)."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
# The suite is CPU-only: trainer=default (accelerator and precision auto) would otherwise train
# on a GPU in bf16 where one is visible. Set before torch first asks CUDA; CLI subprocesses
# inherit it.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("HYDRA_FULL_ERROR", "1")


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
