"""A run's batch-1 CPU latency: measured once on its trained network, cached in its folder.

The latency axis of the paper's Figures 1 and 2 and of the MnasNet reward (:mod:`mnv3.report`).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Mapping
from typing import Any

from mnv3.run_folder import LATENCY_FILE, RunFolder
from mnv3.run_records import Run


def input_size_of(config: Mapping[str, Any]) -> tuple[int, int]:
    """(H, W) the run's network sees: the segmentation crop, else the data's image size, else 224."""
    data = config.get("data") or {}
    size = data.get("crop_size") if config.get("head", {}).get("task") == "segmentation" else None
    size = size or data.get("image_size") or 224
    return (int(size), int(size)) if isinstance(size, int | float) else (int(size[0]), int(size[1]))


def measure_latency(
    net: Any, input_size: tuple[int, int], repeats: int = 7, warmup: int = 2, threads: int = 1
) -> float:
    """Median wall time (ms) of ``net`` on one random image of ``input_size`` (batch 1)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(1, 3, *input_size)
        times = []
        with torch.inference_mode():
            for i in range(warmup + repeats):
                start = time.perf_counter()
                net(x)
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(previous)
    return statistics.median(times)


def run_latency(run: Run, repeats: int = 7, threads: int = 1, refresh: bool = False) -> dict:
    """The run's batch-1 CPU latency, measured once and cached in ``<run>/latency.json``.

    Returns ``{"latency_ms", "input_size", "threads", "repeats", "checkpoint", "source"}``;
    ``source`` is "measured", "cached" or "no checkpoint" (latency NaN then).
    """
    size = input_size_of(run.config)
    cache = run.path / LATENCY_FILE
    if cache.is_file() and not refresh:
        cached = json.loads(cache.read_text())
        if cached.get("input_size") == list(size) and cached.get("threads") == threads:
            return {**cached, "source": "cached"}
    ckpt = RunFolder(run.path).trained_checkpoint
    if ckpt is None:
        return {"latency_ms": math.nan, "input_size": list(size), "source": "no checkpoint"}
    import torch

    from mnv3.trained_run import TrainedRun

    network = TrainedRun.open(ckpt).network
    latency = measure_latency(network, size, repeats, threads=threads)
    result = {
        "latency_ms": latency,
        "input_size": list(size),
        "threads": threads,
        "repeats": repeats,
        "checkpoint": ckpt.name,
        "torch": torch.__version__,
    }
    cache.write_text(json.dumps(result, indent=1) + "\n")
    return {**result, "source": "measured"}
