"""NetAdapt against latency measured on the user's platform (paper §4.2; Yang et al. 2018).

From a start network (any MobileNetV3 backbone or block table) and a target latency, each
iteration:

1. makes one proposal per part (:func:`mnv3.search.proposals.parts`): the widest shrink whose
   latency, *predicted* by the per-block table (:class:`LatencyTable`), is at least ``delta``
   below its parent's (``delta = delta_ratio * start latency * delta_decay ** k``; the paper's
   0.01); a part that cannot save ``delta`` even at width 8 is dropped with that reason;
2. *measures* the parent and every proposal whole, interleaved in the same time windows
   (:meth:`Platform.measure_interleaved`), and drops a proposal whose measured latency did not
   fall, with that reason;
3. gives each survivor its parent's strongest filters, fine-tunes it ``finetune_steps`` steps
   on the fine-tune split and scores it on the held-out split (disjoint from it, both carved out
   of the training split): ``score = (acc - parent acc) / (parent ms - ms)``, change in
   accuracy per millisecond saved (MobileNetV3 §4.2's ratio); the best score is kept.

It stops when the kept network's latency, as a fraction of the start's, reaches the target:
after each iteration the start network and the kept one are measured side by side (the same
time windows, so a VM whose speed drifts does not move the stop; a fresh measurement, so the
optimism of a *selected* proposal's measured cut does not either). Every proposal is one row of
``search/proposals.csv`` (its table, predicted and measured latency, accuracy, score, status
and reason) and of the W&B log. The state is saved after every proposal, so a search killed at
any point resumes where it stopped. It ends by writing ``table.yaml`` (the chosen block table)
and ``adapted.pt`` (its fine-tuned weights) and printing the ``python -m mnv3.train`` command
that trains the table from scratch (or, with ``backbone.weights=<run>/adapted.pt``, longer).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from mnv3.cpus import cpu_model
from mnv3.deploy.common import atomic_torch_save, atomic_write_csv, atomic_write_json
from mnv3.errors import ConfigError
from mnv3.models.backbone import build_backbone
from mnv3.models.block_table import (
    BlockTableError,
    save_backbone_file,
    table_from_arch,
    table_from_plain,
    table_to_plain,
)
from mnv3.models.mobilenet import MobileNet
from mnv3.models.mobilenetv3 import V3Table
from mnv3.search.latency_table import LatencyTable
from mnv3.search.platform import Latency, Platform
from mnv3.search.proposals import Proposal, inherit, kept_channels, parts, proposals_of

log = logging.getLogger("mnv3.search")

SEARCH_DIR = "search"
STATE_FILE = "state.json"
PROPOSALS_CSV = "proposals.csv"
TABLE_FILE = "table.yaml"
WEIGHTS_FILE = "adapted.pt"
CSV_COLUMNS = (
    "iteration",
    "proposal",
    "kind",
    "index",
    "width",
    "parent_width",
    "status",
    "reason",
    "delta_ms",
    "predicted_ms",
    "parent_predicted_ms",
    "measured_ms",
    "parent_measured_ms",
    "acc",
    "parent_acc",
    "score",
    "finetune_s",
    "platform",
    "runtime",
    "threads",
    "input_size",
    "cpu",
    "table",
)


@dataclass(frozen=True)
class Settings:
    """The ``search`` group's NetAdapt values (conf/search/netadapt.yaml says what each does)."""

    target_ratio: float = 0.75
    target_ms: float | None = None
    delta_ratio: float = 0.01
    delta_decay: float = 1.0
    delta_halvings: int = 3
    max_iterations: int = 100
    finetune_steps: int = 10_000
    pretrain_steps: int = 0
    lr: float = 1e-3
    pretrain_lr: float = 2e-3
    weight_decay: float = 0.01
    holdout: float = 0.2
    holdout_max: int = 2000
    measure_rounds: int = 30
    latency_table: str | None = None
    fit: str = "scale"
    train_overrides: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Settings:
        """The settings of a ``search`` group entry, each wrong value named in one sentence."""
        known = set(cls.__dataclass_fields__)
        plain = {k: v for k, v in cfg.items() if k in known}
        for key in ("max_iterations", "measure_rounds", "holdout_max"):
            if not isinstance(plain.get(key, 1), int) or plain.get(key, 1) < 1:
                raise ConfigError(f"search.{key}={plain[key]!r}; expected an integer >= 1")
        for key in ("finetune_steps", "pretrain_steps", "delta_halvings"):
            if not isinstance(plain.get(key, 0), int) or plain.get(key, 0) < 0:
                raise ConfigError(f"search.{key}={plain[key]!r}; expected an integer >= 0")
        if not 0 < float(plain.get("target_ratio", 0.75)) < 1:
            raise ConfigError(
                f"search.target_ratio={plain['target_ratio']!r}; expected a fraction of the "
                "start latency between 0 and 1"
            )
        if plain.get("target_ms") is not None and float(plain["target_ms"]) <= 0:
            raise ConfigError(f"search.target_ms={plain['target_ms']!r}; expected ms > 0")
        if not 0 < float(plain.get("holdout", 0.2)) < 1:
            raise ConfigError(
                f"search.holdout={plain['holdout']!r}; expected the held-out share of the "
                "training split, between 0 and 1"
            )
        if not 0 < float(plain.get("delta_ratio", 0.01)) < 1:
            raise ConfigError(f"search.delta_ratio={plain['delta_ratio']!r}; expected 0 < x < 1")
        if plain.get("fit", "scale") not in ("scale", "constant"):
            raise ConfigError(f"search.fit={plain['fit']!r}; expected scale or constant")
        plain["train_overrides"] = tuple(str(v) for v in plain.get("train_overrides") or ())
        return cls(**plain)


# -- data: the fine-tune and held-out splits ---------------------------------------------------


def split_indices(n: int, holdout: float, holdout_max: int, seed: int) -> tuple[list, list]:
    """Disjoint (fine-tune, held-out) index lists over ``n`` training images: a seeded random
    ``holdout`` share (at most ``holdout_max``) is held out, the rest is fine-tuned on."""
    count = min(max(1, round(n * holdout)), holdout_max, n - 1)
    if n < 2:
        raise ConfigError(f"the training split has {n} image(s); NetAdapt needs at least 2")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[count:]), sorted(order[:count])


class SearchData:
    """The training split cut in two: fine-tune batches (augmented, endless) and the held-out
    images (evaluation transform), which no proposal is ever fine-tuned on."""

    def __init__(self, datamodule: Any, settings: Settings, seed: int) -> None:
        if getattr(datamodule, "label_type", "multiclass") != "multiclass":
            raise ConfigError(
                f"data={datamodule.hparams['dataset']} has {datamodule.label_type} labels; "
                "NetAdapt scores proposals by top-1 accuracy and expects multiclass data"
            )
        datamodule.prepare_data()
        train = datamodule.get_dataset("train")
        self.finetune_index, self.holdout_index = split_indices(
            len(train), settings.holdout, settings.holdout_max, seed
        )
        held = datamodule.family.build(datamodule.spec, "train", datamodule.eval_transform)
        self.batch_size = datamodule.batch_size
        self.seed = seed
        self._generator = torch.Generator()
        self._finetune = datamodule._loader(
            Subset(train, self.finetune_index),
            shuffle=True,
            drop_last=len(self.finetune_index) >= self.batch_size,
            generator=self._generator,
        )
        self._holdout = list(datamodule._loader(Subset(held, self.holdout_index)))

    def batches(self, stream: int) -> Iterator[dict[str, Any]]:
        """Endless fine-tune batches; the same ``stream`` gives the same order (every proposal
        of an iteration sees the same images)."""
        epoch = 0
        while True:
            self._generator.manual_seed(self.seed * 100_003 + stream * 1_009 + epoch)
            yield from self._finetune
            epoch += 1

    def accuracy(self, network: nn.Module) -> float:
        """Top-1 accuracy of ``network`` on the held-out images (eval mode)."""
        network.eval()
        correct = total = 0
        with torch.inference_mode():
            for batch in self._holdout:
                correct += int((network(batch["image"]).argmax(1) == batch["label"]).sum())
                total += len(batch["label"])
        return correct / total


def train_steps(
    network: nn.Module,
    batches: Iterator[dict[str, Any]],
    steps: int,
    lr: float,
    weight_decay: float,
    label_smoothing: float = 0.0,
) -> float:
    """``steps`` AdamW steps (constant lr) of cross-entropy; returns the last loss (NaN for 0)."""
    if steps == 0:
        return math.nan
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    network.train()
    loss = torch.tensor(math.nan)
    for _ in range(steps):
        batch = next(batches)
        loss = loss_fn(network(batch["image"]), batch["label"])
        if not torch.isfinite(loss):
            raise ConfigError(
                f"the fine-tune loss became {loss.item()}; expected a finite loss (lower search.lr)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def selection_score(acc: float, parent_acc: float, ms: float, parent_ms: float) -> float:
    """MobileNetV3 §4.2's objective: change in accuracy per ms of latency saved."""
    return (acc - parent_acc) / abs(parent_ms - ms)


def select(results: Mapping[int, Mapping[str, float]]) -> int:
    """The proposal with the best score (ties: the higher accuracy, then the first)."""
    return max(sorted(results), key=lambda j: (results[j]["score"], results[j]["acc"]))


# -- the search --------------------------------------------------------------------------------


class NetAdapt:
    """One NetAdapt search in ``folder`` (the run folder); :meth:`run` starts or resumes it."""

    def __init__(
        self,
        folder: Path,
        settings: Settings,
        platform: Platform,
        build: Callable[[V3Table], MobileNet],
        data: SearchData,
        start: MobileNet,
        seed: int = 0,
        label_smoothing: float = 0.0,
        loggers: list[Any] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.dir = self.folder / SEARCH_DIR
        self.settings = settings
        self.platform = platform
        self.build = build
        self.data = data
        self.start_network = start
        self.seed = seed
        self.label_smoothing = label_smoothing
        self.loggers = loggers or []
        self.latency = LatencyTable(platform, settings.latency_table)
        self.state: dict[str, Any] = {}

    # -- state ---------------------------------------------------------------------------------

    def _save(self) -> None:
        atomic_write_json(self.dir / STATE_FILE, self.state)
        self._write_csv()

    def _write_csv(self) -> None:
        atomic_write_csv(self.dir / PROPOSALS_CSV, CSV_COLUMNS, self.state["rows"])

    def _network(self, table: V3Table, weights: str) -> MobileNet:
        network = self.build(table)
        state = torch.load(self.dir / weights, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
        return network

    def _fit(self) -> None:
        pairs = self.state["fit_pairs"]
        self.latency.fit([p[0] for p in pairs], [p[1] for p in pairs], self.settings.fit)
        self.latency.save()

    # -- phases --------------------------------------------------------------------------------

    def _begin(self) -> None:
        """Pretrain the start network (if asked), measure it, score it: iteration 0's parent."""
        s = self.settings
        network = self.start_network
        if s.pretrain_steps:
            log.info("pretraining the start network: %d steps", s.pretrain_steps)
            train_steps(
                network,
                self.data.batches(-1),
                s.pretrain_steps,
                s.pretrain_lr,
                s.weight_decay,
                self.label_smoothing,
            )
        table = table_from_arch(network.arch)
        latency = self.platform.measure(network)
        parts_sum = self.latency.parts_sum(network)
        acc = self.data.accuracy(network)
        atomic_torch_save(network.state_dict(), self.dir / "current_0.pt")
        self.state = {
            "version": 1,
            "iteration": 0,
            "start": {"table": table_to_plain(table), "ms": latency.ms, "acc": acc},
            "current": {"table": table_to_plain(table), "weights": "current_0.pt", "acc": acc},
            "ratio": 1.0,
            "chained": 1.0,
            "fit_pairs": [[parts_sum, latency.ms]],
            "rows": [],
            "pending": None,
            "finished": None,
            "started": time.time(),
            "platform": self.platform.record(),
        }
        self._fit()
        self._save()
        log.info(
            "start network %s: %.2f ms on %s (%s, %d thread(s), %s, %s), held-out acc %.4f; "
            "target %.2f ms (%.2fx)",
            table.name,
            latency.ms,
            self.platform.name,
            latency.runtime,
            latency.threads,
            "x".join(map(str, latency.input_size)),
            latency.cpu,
            acc,
            self.target_ratio * latency.ms,
            self.target_ratio,
        )

    @property
    def target_ratio(self) -> float:
        """The stop, as a fraction of the start network's measured latency."""
        s = self.settings
        if s.target_ms is None:
            return s.target_ratio
        return s.target_ms / self.state["start"]["ms"]

    def _propose(self, k: int) -> None:
        """Iteration ``k``'s proposals: predicted to save delta, measured, the rest dropped."""
        s = self.settings
        current = table_from_plain(self.state["current"]["table"])
        parent = self._network(current, self.state["current"]["weights"])
        delta = s.delta_ratio * self.state["start"]["ms"] * s.delta_decay**k
        parent_pred = self.latency.predict(parent)
        rows: list[dict[str, Any]] = []
        for halving in range(s.delta_halvings + 1):
            kept, dropped = self._widest_saving(current, parent_pred, delta)
            if kept or halving == s.delta_halvings:
                break
            log.info("iteration %d: no part saves %.3f ms (predicted); halving delta", k, delta)
            delta /= 2
        for kind, index, saved in dropped:
            rows.append(
                self._row(
                    k,
                    len(rows),
                    kind,
                    index,
                    status="dropped",
                    reason=f"no width saves {delta:.3f} ms (predicted): the narrowest "
                    f"saves {saved:.3f} ms",
                    delta_ms=delta,
                    parent_predicted_ms=parent_pred,
                )
            )
        self.latency.save()
        networks: dict[str, nn.Module] = {"parent": parent}
        networks.update({str(j): self.build(p.table) for j, (p, _) in enumerate(kept)})
        measured = self.platform.measure_interleaved(networks, s.measure_rounds)
        parent_ms = measured["parent"].ms
        self.state["fit_pairs"].append([self.latency.parts_sum(parent), parent_ms])
        pending = []
        for j, (proposal, pred) in enumerate(kept):
            latency = measured[str(j)]
            row = self._row(
                k,
                len(rows),
                proposal.kind,
                proposal.index,
                proposal=proposal,
                delta_ms=delta,
                predicted_ms=pred,
                parent_predicted_ms=parent_pred,
                measured_ms=latency.ms,
                parent_measured_ms=parent_ms,
                latency=latency,
            )
            if latency.ms >= parent_ms:
                row.update(
                    status="dropped",
                    reason=f"measured latency did not fall ({latency.ms:.3f} >= "
                    f"{parent_ms:.3f} ms)",
                )
            else:
                row["status"] = "pending"
                pending.append(len(self.state["rows"]) + len(rows))
            rows.append(row)
        first = len(self.state["rows"])
        self.state["rows"].extend(rows)
        for n, row in enumerate(rows, start=first):
            if row["status"] == "dropped":
                self._log_row(row, n)
        self.state["pending"] = {
            "iteration": k,
            "rows": pending,
            "parent_ms": parent_ms,
            "done": {},
            "best": None,
        }
        self._fit()
        self._save()

    def _ratio_to_start(self, table: V3Table) -> float:
        """``table``'s latency over the start network's, both measured now in the same windows.

        The stop is judged on this fresh measurement, not on the product of the kept
        proposals' ratios: those were *selected*, so their measured cuts lean optimistic (in
        the first quick search the product said 0.746 where start and result side by side
        said 0.800)."""
        start, current = self._side_by_side(self.build(table))
        return current.ms / start.ms

    def _side_by_side(self, network: nn.Module) -> tuple[Latency, Latency]:
        """The start network's and ``network``'s latency measured in the same windows, with
        the rounds every stop decision and the final report use (three times a proposal's:
        two networks are cheap, and this decides the stop)."""
        start = self.build(table_from_plain(self.state["start"]["table"]))
        measured = self.platform.measure_interleaved(
            {"start": start, "current": network}, 3 * self.settings.measure_rounds
        )
        return measured["start"], measured["current"]

    def _widest_saving(
        self, table: V3Table, parent_pred: float, delta: float
    ) -> tuple[list[tuple[Proposal, float]], list[tuple[str, int, float]]]:
        """Per part, the widest proposal predicted to save ``delta`` (with its prediction),
        and the parts where none does (with what the narrowest saves).

        Found by bisection over the part's widths (the table's prediction falls with width,
        up to measurement noise): about log2(widths) networks built per part instead of one
        per width, which took most of an iteration's time when every width was tried."""
        kept: list[tuple[Proposal, float]] = []
        dropped: list[tuple[str, int, float]] = []
        for kind, index in parts(table):
            widths = list(proposals_of(table, kind, index))  # widest first
            found, saved = self._bisect(widths, parent_pred, delta)
            if found is None:
                dropped.append((kind, index, saved))
            else:
                kept.append((widths[found], parent_pred - saved))
        return kept, dropped

    def _bisect(
        self, widths: list[Proposal], parent_pred: float, delta: float
    ) -> tuple[int | None, float]:
        """The index of the widest of ``widths`` (widest first) predicted to save ``delta``,
        and its saving; (None, what the narrowest saves) when even that one does not."""
        predicted: dict[int, float] = {}

        def saving(j: int) -> float:
            if j not in predicted:
                predicted[j] = self.latency.predict(self.build(widths[j].table))
            return parent_pred - predicted[j]

        if not widths:
            return None, 0.0
        high = len(widths) - 1
        if saving(high) < delta:
            return None, saving(high)
        low = -1  # saving(high) >= delta; widths[low] not known to save it
        while high - low > 1:
            mid = (low + high) // 2
            if saving(mid) >= delta:
                high = mid
            else:
                low = mid
        return high, saving(high)

    def _row(
        self,
        k: int,
        n: int,
        kind: str,
        index: int,
        proposal: Proposal | None = None,
        latency: Latency | None = None,
        **values: Any,
    ) -> dict[str, Any]:
        row: dict[str, Any] = dict.fromkeys(CSV_COLUMNS, "")
        row.update(
            iteration=k,
            proposal=proposal.name if proposal else f"{kind}{index}",
            kind=kind,
            index=index,
            parent_acc=self.state["current"]["acc"],
            platform=self.platform.name,
            threads=self.platform.threads,
            input_size="x".join(map(str, self.platform.input_size)),
            runtime=self.latency.runtime,
            cpu=cpu_model(),
        )
        if proposal is not None:
            row.update(
                width=proposal.width,
                parent_width=proposal.parent_width,
                table=json.dumps(table_to_plain(proposal.table)["rows"]),
            )
        if latency is not None:
            row.update(runtime=latency.runtime, cpu=latency.cpu)
        row.update(values)
        return row

    def _finetune_pending(self) -> None:
        """Fine-tune and score every pending proposal not scored yet; keep the best's weights."""
        s = self.settings
        pending = self.state["pending"]
        k = pending["iteration"]
        current = table_from_plain(self.state["current"]["table"])
        parent = self._network(
            current, self.state["current"]["weights"]
        )  # read once: never changed
        for n in pending["rows"]:
            if str(n) in pending["done"]:
                continue
            row = self.state["rows"][n]
            proposal = _proposal(current, row)
            child = inherit(parent, self.build(proposal.table), kept_channels(parent, proposal))
            torch.manual_seed(self.seed * 7919 + k)
            t0 = time.perf_counter()
            train_steps(
                child,
                self.data.batches(k),
                s.finetune_steps,
                s.lr,
                s.weight_decay,
                self.label_smoothing,
            )
            acc = self.data.accuracy(child)
            score = selection_score(
                acc, row["parent_acc"], row["measured_ms"], row["parent_measured_ms"]
            )
            row.update(
                acc=acc, score=score, finetune_s=round(time.perf_counter() - t0, 2), status="scored"
            )
            pending["done"][str(n)] = {"acc": acc, "score": score}
            previous = pending["best"]
            if select({int(j): v for j, v in pending["done"].items()}) == n:
                # the weights first, then the state that names them: a kill in between
                # leaves a stray file, never a state without its weights
                atomic_torch_save(child.state_dict(), self.dir / f"proposal_{k}_{n}.pt")
                pending["best"] = n
            self._save()
            if previous is not None and pending["best"] != previous:
                (self.dir / f"proposal_{k}_{previous}.pt").unlink(missing_ok=True)
            self._log_row(row, n)

    def _keep_best(self) -> bool:
        """End the iteration: the best proposal becomes the current network; False if none."""
        pending = self.state["pending"]
        k = pending["iteration"]
        best = pending["best"]
        if best is None:
            self.state["pending"] = None
            self.state["finished"] = (
                f"iteration {k}: no proposal was left (every one dropped: proposals.csv says why)"
            )
            self._save()
            return False
        row = self.state["rows"][best]
        row["status"] = "kept"
        old = self.state["current"]["weights"]
        weights = f"current_{k + 1}.pt"
        os.replace(self.dir / f"proposal_{k}_{best}.pt", self.dir / weights)
        table = _proposal(table_from_plain(self.state["current"]["table"]), row).table
        self.state["current"] = {
            "table": table_to_plain(table),
            "weights": weights,
            "acc": row["acc"],
        }
        self.state["chained"] *= row["measured_ms"] / row["parent_measured_ms"]
        self.state["ratio"] = self._ratio_to_start(table)
        self.state["iteration"] = k + 1
        self.state["pending"] = None
        self._save()
        (self.dir / old).unlink(missing_ok=True)
        scored = len(pending["done"])
        n_rows = sum(1 for r in self.state["rows"] if r["iteration"] == k)
        elapsed = time.time() - self.state["started"]
        log.info(
            "iteration %d: kept %s: %.3f ms measured (%.3f ms predicted), %.3fx the start "
            "side by side (target %.2fx), held-out acc %.4f (%+.4f); %d proposals scored, "
            "%d dropped; %.0f s",
            k,
            row["proposal"],
            row["measured_ms"],
            row["predicted_ms"],
            self.state["ratio"],
            self.target_ratio,
            row["acc"],
            row["acc"] - row["parent_acc"],
            scored,
            n_rows - scored,
            elapsed,
        )
        self._log(
            {
                "search/iteration": k,
                "search/latency_ratio": self.state["ratio"],
                "search/measured_ms": row["measured_ms"],
                "search/acc": row["acc"],
            }
        )
        return True

    def _log_row(self, row: Mapping[str, Any], n: int) -> None:
        """One proposal in the loggers (W&B, CSV): its numbers, its row index, dropped or not."""
        numeric = {
            f"proposal/{k}": float(v)
            for k, v in row.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        self._log({**numeric, "proposal/row": n, "proposal/dropped": row["status"] == "dropped"})

    def _log(self, metrics: Mapping[str, float]) -> None:
        """Metrics at the next step of one increasing counter (W&B drops a step that goes back)."""
        step = self.state.setdefault("logged", 0)
        for logger in self.loggers:
            logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
        self.state["logged"] = step + 1

    def run(self) -> dict[str, Any]:
        """Start (or resume) the search and run it to the target; returns the final summary."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if (self.dir / STATE_FILE).is_file():
            self.state = json.loads((self.dir / STATE_FILE).read_text())
            log.info(
                "resuming the search in %s at iteration %d", self.folder, self.state["iteration"]
            )
            self.platform.check_resumed(self.state.get("platform"), self.dir / STATE_FILE)
            self._fit()
        else:
            self._begin()
        s = self.settings
        while self.state["finished"] is None:
            if self.state["pending"] is None:
                k = self.state["iteration"]
                if self.state["ratio"] <= self.target_ratio:
                    self.state["finished"] = (
                        f"reached the target: {self.state['ratio']:.3f}x <= {self.target_ratio:.3f}x"
                    )
                    break
                if k >= s.max_iterations:
                    self.state["finished"] = f"stopped after search.max_iterations={k}"
                    break
                self._propose(k)
            self._finetune_pending()
            self._keep_best()
        self._save()
        for logger in self.loggers:  # W&B: the whole proposals table, as the CSV has it
            if hasattr(logger, "log_table"):
                rows = [[str(r[c]) for c in CSV_COLUMNS] for r in self.state["rows"]]
                logger.log_table("search/proposals", columns=list(CSV_COLUMNS), data=rows)
        return self._finish()

    def _finish(self) -> dict[str, Any]:
        """Write the chosen table and weights; measure start and result side by side."""
        table = table_from_plain(self.state["current"]["table"])
        table = V3Table(f"{table.name}_netadapt", table.rows, table.stem, table.last, table.head)
        network = self._network(
            table_from_plain(self.state["current"]["table"]), self.state["current"]["weights"]
        )
        save_backbone_file(table, self.folder / TABLE_FILE)
        atomic_torch_save(network.state_dict(), self.folder / WEIGHTS_FILE)
        start, adapted = self._side_by_side(network)
        summary = {
            "stopped": self.state["finished"],
            "iterations": self.state["iteration"],
            "proposals": len(self.state["rows"]),
            "start ms": start.ms,
            "adapted ms": adapted.ms,
            "latency ratio (judged each iteration)": self.state["ratio"],
            "latency ratio (product of kept proposals')": self.state["chained"],
            "latency ratio (final side by side)": adapted.ms / start.ms,
            "start held-out acc": self.state["start"]["acc"],
            "adapted held-out acc": self.state["current"]["acc"],
            "platform": f"{self.platform.name} ({start.runtime}, "
            f"{self.platform.threads} thread(s), {self.platform.statistic} {self.platform.quantile}, "
            f"reference {self.platform.reference}, {start.cpu})",
        }
        atomic_write_json(self.folder / "summary.json", summary)
        return summary


def _proposal(table: V3Table, row: Mapping[str, Any]) -> Proposal:
    """The proposal a CSV row names (kind, index, width) on its parent ``table``."""
    for proposal in proposals_of(table, row["kind"], int(row["index"])):
        if proposal.width == int(row["width"]):
            return proposal
    raise ConfigError(f"search state row {row['proposal']} names no proposal of its parent")


def start_table(network: MobileNet) -> V3Table:
    """The start network's block table (a sentence if it has none)."""
    try:
        return table_from_arch(network.arch)
    except BlockTableError as exc:
        raise ConfigError(f"backbone: {exc}") from None


def network_builder(backbone: Mapping[str, Any], num_classes: int, dropout: float) -> Callable:
    """``table -> MobileNet`` with the backbone group's BN momentum and input channels."""
    options = {k: backbone[k] for k in ("bn_momentum", "in_channels") if backbone.get(k)}

    def build(table: V3Table) -> MobileNet:
        return build_backbone(
            "mobilenet_v3",
            table=table_to_plain(table),
            num_classes=num_classes,
            dropout=dropout,
            **options,
        )

    return build


def run_netadapt(cfg: Mapping[str, Any], folder: Path, loggers: list[Any]) -> dict[str, Any]:
    """NetAdapt as the search config asks (plain ``cfg``: backbone, head, data, platform,
    search, seed), in run folder ``folder``; returns the summary."""
    from mnv3.cli import build_datamodule

    if cfg["head"].get("task") != "classification":
        raise ConfigError(
            f"head={cfg['head'].get('name')}: NetAdapt scores proposals by classification "
            "accuracy; expected head=classifier (searched tables then train any head)"
        )
    backbone = dict(cfg["backbone"])
    if backbone.get("output_stride", 32) != 32:
        raise ConfigError(
            f"backbone.output_stride={backbone['output_stride']}; NetAdapt searches networks "
            "at output stride 32 (a dilated network is a detection / segmentation choice)"
        )
    settings = Settings.from_config(cfg["search"])
    platform = Platform.from_config(cfg["platform"])
    datamodule = build_datamodule(cfg["data"], num_workers=cfg["cpu"]["resolved"]["num_workers"])
    data = SearchData(datamodule, settings, int(cfg["seed"]))
    dropout = float(cfg["head"].get("dropout", 0.2))
    named = build_backbone(**backbone, num_classes=datamodule.num_classes, dropout=dropout)
    build = network_builder(backbone, datamodule.num_classes, dropout)
    start = build(start_table(named))
    start.load_state_dict(named.state_dict())  # backbone.weights, if given, come along
    search = NetAdapt(
        folder,
        settings,
        platform,
        build,
        data,
        start,
        seed=int(cfg["seed"]),
        label_smoothing=float(cfg["head"].get("label_smoothing", 0.0)),
        loggers=loggers,
    )
    return search.run()
