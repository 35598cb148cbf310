"""Keep torch's intra-op thread count at whichever setting trains fastest on the CPU right now.

No thread count is best both alone and beside other busy processes (measured on 2 cores,
docs/cpu.md): 2 threads make ``make train`` ~12% faster on a quiet machine, but beside two busy
processes each step waits at OpenMP barriers for a descheduled thread, and the same run took
12x its quiet time (1 thread: 2x). The machine's load also changes during a run. So
:class:`ThreadTuner` measures: it times training steps at the current count, now and then
tries another count for a few steps, and keeps the faster one. A probe that is clearly slower
stops after one step, and a probe that confirms the current count doubles the wait until the
next one, so a steady machine pays little for the checks; steps that get 1.5x slower or faster
(a neighbour started or stopped) bring the next probe forward.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch

log = logging.getLogger("mnv3.cpus")


class ThreadTuner(pl.Callback):
    """Switch ``torch.set_num_threads`` among ``candidates`` by measured training-step time.

    Args:
        candidates: thread counts to choose from; the run starts at ``start``.
        start: the first count (the static plan's).
        probe_steps: steps timed at a probed count.
        first_probe: global step of the first probe (after the allocator and caches warm up).
        min_period / max_period: steps between probes; the period doubles after each probe
            that keeps the current count and resets after a switch.
        margin: a probed count must be this much faster (ratio of medians) to be taken.
        change: steps this much slower or faster than when the count was chosen (the load
            changed) start a probe at once.
    """

    def __init__(
        self,
        candidates: Sequence[int],
        start: int,
        probe_steps: int = 3,
        first_probe: int = 8,
        min_period: int = 40,
        max_period: int = 640,
        margin: float = 0.9,
        change: float = 1.5,
    ) -> None:
        self.candidates = sorted({int(c) for c in candidates} | {int(start)})
        self.current = int(start)
        self.probe_steps = probe_steps
        self.period = min_period
        self.min_period, self.max_period = min_period, max_period
        self.next_probe = first_probe
        self.margin = margin
        self.recent: deque[float] = deque(maxlen=16)
        self.reference: float | None = None  # step time when the count was last chosen
        self.change = change
        self.probing: int | None = None
        self.probe_times: list[float] = []
        self._order = 0  # which other candidate the next probe tries
        self._t0: float | None = None
        self.history: list[tuple[int, int]] = []  # (global step, threads) at each switch

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        torch.set_num_threads(self.current)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        if self._t0 is None:
            return
        seconds = time.perf_counter() - self._t0
        self._t0 = None
        threads = self.observe(seconds, trainer.global_step)
        pl_module.log("cpu/threads", float(threads), on_step=True, on_epoch=False)

    def observe(self, seconds: float, step: int) -> int:
        """Record one training step's time; returns the thread count set for the next step."""
        if self.probing is not None:
            self._probe_step(seconds, step)
        else:
            self.recent.append(seconds)
            ready = len(self.recent) >= 3 and len(self.candidates) > 1
            if ready and (step >= self.next_probe or self._load_changed()):
                self._start_probe()
        return self.probing if self.probing is not None else self.current

    def _load_changed(self) -> bool:
        """The last 3 steps are 1.5x slower or faster than when the count was last chosen."""
        if self.reference is None:
            return False
        latest = statistics.median(list(self.recent)[-3:])
        return not (self.reference / self.change <= latest <= self.reference * self.change)

    def _start_probe(self) -> None:
        others = [c for c in self.candidates if c != self.current]
        self.probing = others[self._order % len(others)]
        self._order += 1
        self.probe_times = []
        torch.set_num_threads(self.probing)

    def _probe_step(self, seconds: float, step: int) -> None:
        assert self.probing is not None
        self.probe_times.append(seconds)
        now = statistics.median(list(self.recent)[-5:])  # the machine as it is now
        if seconds < 2 * now and len(self.probe_times) < self.probe_steps:
            return  # keep measuring (a step twice as slow is enough to say no)
        probed = statistics.median(self.probe_times)
        if len(self.probe_times) >= self.probe_steps and probed < self.margin * now:
            log.info(
                "CPU threads %d -> %d at step %d: %.0f ms per step instead of %.0f",
                self.current,
                self.probing,
                step,
                probed * 1e3,
                now * 1e3,
            )
            self.current = self.probing
            self.recent = deque(self.probe_times, maxlen=self.recent.maxlen)
            self.period = self.min_period
            self.history.append((step, self.current))
            self.reference = probed
        else:
            self.period = min(2 * self.period, self.max_period)
            self.reference = now
        torch.set_num_threads(self.current)
        self.probing = None
        self.next_probe = step + self.period

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A resumed run may be on another machine: keep this run's own start, only the record.
        self.history = [(int(s), int(t)) for s, t in state_dict.get("history", [])]


def thread_tuner(cpu: dict[str, Any], accelerator: str) -> ThreadTuner | None:
    """The tuner a training run's ``cpu`` config asks for; None when there is nothing to tune.

    It runs when ``cpu.tune_threads`` is on, the plan (``cpu.resolved``) offers more than one
    thread count (``cpu.threads: auto``) and the model trains on the CPU.
    """
    resolved = cpu.get("resolved") or {}
    candidates = list(resolved.get("thread_candidates") or [])
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if not cpu.get("tune_threads", True) or len(set(candidates)) < 2 or not on_cpu:
        return None
    return ThreadTuner(candidates, int(resolved["threads"]))
