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


def _own_cpus() -> None:
    """Give each pytest-xdist worker its own share of this process's CPUs (``pytest -n 2`` on
    2 cores: one each), inherited by the CLI runs it starts.

    mnv3 sizes torch threads from the CPUs a process may use (``cpu.threads=auto``,
    mnv3/cpus.py). Without this, every worker's training run takes all the cores, and beside
    the other busy worker its threads spin at each op's barrier. Measured on 2 vCPUs (Intel
    Xeon), tests/test_finetune.py + test_train.py under ``-n 2``: 80 s -> 68 s wall, 112 s ->
    78 s CPU; the in-process training tests 2-8x faster (short run 7.8 s -> 2.0 s).
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or workers < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    share = max(1, len(cpus) // workers)
    index = int(worker[2:]) % max(1, len(cpus) // share)
    os.sched_setaffinity(0, set(cpus[index * share : (index + 1) * share]))


_own_cpus()


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
