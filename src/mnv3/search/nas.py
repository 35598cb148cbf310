"""Platform-aware block search (paper §4.1, MnasNet): a supernet, a controller, the reward.

``python -m mnv3.search experiment=nas_small_quick`` runs, in its run folder:

1. **Supernet**: the space's largest network trained by the sandwich rule through the normal
   Lightning task (:func:`mnv3.search.supernet.sandwich_task`) on the training split for
   ``search.supernet_steps`` steps; saved as ``search/supernet.pt`` (a search resumed after
   this point does not train it again).
2. **Search**: the controller (``search.controller``: ``random``, ``evolution``, ``rl``) asks
   for ``search.budget`` candidates; each is scored by the supernet after its own BN
   statistics are re-measured (:func:`calibrate_bn`) on the **validation split** (disjoint from
   the supernet's training data; the test split stays untouched for the final training) with
   the task's own validation metric (:func:`supernet_accuracy`: top-1 for ``head=classifier``,
   mIoU for ``head=lraspp``, mAP for ``head=ssdlite``; the ``acc`` column), and its latency
   (of the backbone, as a classifier) is predicted by the per-block table on the platform.
   Reward: MnasNet's
   ``ACC x (LAT / TAR) ** w`` (:func:`mnv3.report.reward`; ``search.w``, -0.15 the paper's for
   Small, -0.07 for Large), 0 above the target with ``search.hard_cap``. The target:
   ``search.target_ms``, or ``search.target_ratio`` of the backbone group's network's predicted
   latency. Every candidate is a row of ``search/candidates.csv`` and of the loggers; the state
   is saved after each, so a killed search resumes (the controller replays the history).
3. **End to end**: the ``search.top_k`` best by reward are measured whole, side by side with
   the backbone network; the best reward with its *measured* latency is the result:
   ``table.yaml``. Each of the top k is also written as a backbone option
   (``backbones/backbone/nas_<rank>.yaml``, rank 0 the winner), so retraining them from scratch
   over seeds is one Hydra multirun (``hydra.searchpath=[file://<run>/backbones]
   backbone=nas_0,nas_1 seed=0,1,2``; a SLURM launcher spreads it with no new code).
4. **NetAdapt** (``search.netadapt: true``; paper §4.2 after §4.1; classification heads only,
   as NetAdapt scores by top-1): the winner, its weights
   inherited from the supernet with its own BN statistics, is refined by NetAdapt
   (:func:`mnv3.search.netadapt.run_netadapt` with the ``search.refine`` settings, the
   ``search=netadapt`` group's) in ``<run>/netadapt``; it joins the multirun as ``nas_netadapt``.
The printed commands train what was found.
"""

from __future__ import annotations

import json
import logging
import shlex
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mnv3.deploy.common import atomic_torch_save, atomic_write_csv, atomic_write_json
from mnv3.errors import ConfigError
from mnv3.models.backbone import build_backbone
from mnv3.models.block_table import save_backbone_file, table_to_plain
from mnv3.report import reward as mnasnet_reward
from mnv3.search.controllers import Budget, History, make_controller, run
from mnv3.search.latency_table import LatencyTable
from mnv3.search.platform import Platform
from mnv3.search.space import SearchSpace
from mnv3.search.supernet import (
    calibrate_bn,
    sandwich_task,
    scoring_trainer,
    supernet_accuracy,
)

log = logging.getLogger("mnv3.search")

SEARCH_DIR = "search"
STATE_FILE = "state.json"
CANDIDATES_CSV = "candidates.csv"
SUPERNET_FILE = "supernet.pt"
SUPERNET_LAST = "supernet_last.ckpt"  # the supernet's training, resumable
COLUMNS = ("candidate", "reward", "acc", "predicted_ms", "measured_ms", "measured_reward", "table")
BACKBONES_DIR = "backbones"  # <run>/backbones/backbone/nas_<rank>.yaml: a Hydra search path
WINNER_WEIGHTS = "winner.pt"
HELD_IN_MEMORY = 10_000  # validation images kept decoded in memory (ImageNet's 50,000 are not)


class _StepOffset:
    """A logger whose steps start at ``offset`` (NetAdapt after the candidates: W&B drops a
    step that goes back)."""

    def __init__(self, logger: Any, offset: int) -> None:
        self._logger, self._offset = logger, offset

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._logger.log_metrics(metrics, step=None if step is None else step + self._offset)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


def _settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    s = dict(cfg)
    for key in ("budget", "top_k", "calibration_batches", "measure_rounds"):
        if not isinstance(s.get(key), int) or s[key] < 1:
            raise ConfigError(f"search.{key}={s.get(key)!r}; expected an integer >= 1")
    if not isinstance(s.get("supernet_steps"), int) or s["supernet_steps"] < 0:
        raise ConfigError(f"search.supernet_steps={s.get('supernet_steps')!r}; expected >= 0")
    if float(s.get("w", -0.15)) > 0:
        raise ConfigError(
            f"search.w={s['w']!r}; expected a negative exponent (paper: -0.07, -0.15)"
        )
    return s


def run_nas(cfg: Mapping[str, Any], folder: Path, loggers: list[Any]) -> dict[str, Any]:
    """The block search as the config asks (plain ``cfg``); returns its summary."""

    from mnv3.cli import build_datamodule
    from mnv3.tasks import TASKS

    s = _settings(cfg["search"])
    task_cls = TASKS[cfg["head"]["task"]]
    if s.get("netadapt") and cfg["head"].get("task") != "classification":
        raise ConfigError(
            f"search.netadapt=true with head={cfg['head'].get('name')}: NetAdapt scores "
            "proposals by classification top-1; expected search.netadapt=false for a "
            f"{cfg['head']['task']} head"
        )
    space = SearchSpace.from_config(s["space"])
    platform = Platform.from_config(cfg["platform"])
    state_dir = folder / SEARCH_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    state_file = state_dir / STATE_FILE
    state: dict[str, Any] = (
        json.loads(state_file.read_text()) if state_file.is_file() else {"rows": []}
    )
    platform.check_resumed(state.get("platform"), state_file)  # its ms must compare
    state.setdefault("platform", platform.record())
    _save(state_dir, state)  # from now on resume=<run> finds the search, even mid-supernet

    datamodule = build_datamodule(cfg["data"], num_workers=cfg["cpu"]["resolved"]["num_workers"])
    datamodule.prepare_data()
    task = sandwich_task(task_cls).from_config(cfg, datamodule)
    if task.monitor_mode != "max":
        raise ConfigError(
            f"head={cfg['head'].get('name')}: its task monitors {task.monitor} "
            f"({task.monitor_mode}); the search's reward needs a metric where higher is better"
        )
    supernet = task.model.supernet
    weights = state_dir / SUPERNET_FILE
    accelerator = cfg.get("trainer", {}).get("accelerator", "cpu")
    if weights.is_file():
        supernet.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        log.info("supernet: trained, read from %s", weights)
    elif s["supernet_steps"]:
        _train_supernet(cfg, s, task, datamodule, state_dir, accelerator)
    if not weights.is_file():
        atomic_torch_save(supernet.state_dict(), weights)

    latency = LatencyTable(platform, s["latency_table"])
    dropout = float(cfg["head"].get("dropout", 0.2))
    classes = datamodule.num_classes
    # Latency is the backbone's, as a classifier (what the per-block table measures), with the
    # backbone group's options (its tail) and the candidate's table.
    options = {k: v for k, v in cfg["backbone"].items() if k not in ("name", "table", "weights")}
    options |= {"width_mult": 1.0, "minimal": False}  # the space fixes widths, kernels, SE

    def build(table: Any) -> Any:
        return build_backbone(
            "mobilenet_v3", **options, table=table_to_plain(table), num_classes=classes
        )

    reference = build_backbone(**dict(cfg["backbone"]), num_classes=classes, dropout=dropout)
    if s.get("target_ms"):
        # A target in ms needs predictions in ms: the table's scale fitted on the backbone
        # group's network measured whole (entries timed alone miss what runs between them;
        # on a platform with a reference they are ratios to an anchor block).
        latency.fit([latency.parts_sum(reference)], [platform.measure(reference).ms])
    target = s.get("target_ms") or float(s["target_ratio"]) * latency.predict(reference)
    calibration = [
        b["image"]
        for _, b in zip(
            range(s["calibration_batches"]), datamodule.train_dataloader(), strict=False
        )
    ]
    held_out = datamodule.val_dataloader()
    if len(held_out.dataset) <= HELD_IN_MEMORY:  # decoded once, not once per candidate
        held_out = list(held_out)
    # Candidates are scored by the task's own validation step on the accelerator (Lightning
    # moves the supernet there and back); its pictures of the last candidate go to scoring/.
    scorer = scoring_trainer(str(state_dir / "scoring"), accelerator)

    def evaluate(choices: list[int]) -> float:
        acc = supernet_accuracy(task, choices, calibration, held_out, scorer)
        table = space.table(choices)
        ms = latency.predict(build(table))
        value = 0.0 if s["hard_cap"] and ms > target else mnasnet_reward(acc, ms, target, s["w"])
        row = {
            "candidate": len(state["rows"]),
            "reward": value,
            "acc": acc,
            "predicted_ms": ms,
            "table": json.dumps(table_to_plain(table)["rows"]),
            "choices": choices,
        }
        state["rows"].append(row)
        _save(state_dir, state)
        for logger in loggers:
            logger.log_metrics(
                {"candidate/reward": value, "candidate/acc": acc, "candidate/predicted_ms": ms},
                step=row["candidate"],
            )
        if (row["candidate"] + 1) % max(1, s["budget"] // 10) == 0:
            best = max(state["rows"], key=lambda r: r["reward"])
            log.info(
                "candidate %d/%d: best reward %.4f (acc %.4f, %.2f ms predicted; target %.2f ms)",
                row["candidate"] + 1,
                s["budget"],
                best["reward"],
                best["acc"],
                best["predicted_ms"],
                target,
            )
        return value

    controller = make_controller(
        s["controller"],
        [d.options for d in space.decisions],
        int(cfg["seed"]),
        **dict(s.get("controller_options", {}).get(s["controller"], {}) or {}),
    )
    done = History([r["choices"] for r in state["rows"]], [r["reward"] for r in state["rows"]])
    history = run(controller, evaluate, Budget(s["budget"]), done)
    latency.save()

    if state.get("final") is None:  # measured once: a resumed run keeps its winner
        state["final"] = _measure_top(
            s, history, state, space, platform, latency, build, reference, target
        )
        _save(state_dir, state)
        for logger in loggers:  # W&B: every candidate, as the CSV has it
            if hasattr(logger, "log_table"):
                data = [[str(r.get(c, "")) for c in COLUMNS] for r in state["rows"]]
                logger.log_table("search/candidates", columns=list(COLUMNS), data=data)
    final = state["final"]
    top = final["top"]
    table = space.table(top[0], f"{space.name}_nas")
    # The tail the supernet's candidates had (a dense head's reduced tail) goes with the table.
    tail = {"reduced_tail": True} if cfg["backbone"].get("reduced_tail") else {}
    save_backbone_file(table, folder / "table.yaml", **tail)
    backbones = folder / BACKBONES_DIR / "backbone"
    for rank, choices in enumerate(top):
        save_backbone_file(
            space.table(choices, f"{space.name}_nas_{rank}"),
            backbones / f"nas_{rank}.yaml",
            extends="small_table",
            **tail,
        )
    summary: dict[str, Any] = {
        "controller": s["controller"],
        "candidates": len(history.rewards),
        "target ms (predicted units)": target,
        "best reward (measured latency)": final["reward"],
        "best supernet acc": final["acc"],
        "supernet acc metric": task.monitor,
        "best measured ms": final["ms"],
        "reference measured ms": final["reference_ms"],
        "latency vs reference (side by side)": final["ms"] / final["reference_ms"],
        "platform": final["platform"],
    }
    names = [f"nas_{rank}" for rank in range(len(top))]
    if s.get("netadapt"):
        if accelerator == "gpu" and torch.cuda.is_available():
            supernet.cuda()  # Lightning leaves it on the CPU; the winner calibrates on the GPU
        refined = _refine(cfg, s, folder, supernet, top[0], calibration, loggers)
        save_backbone_file(refined, backbones / "nas_netadapt.yaml", extends="small_table")
        names.append("nas_netadapt")
        summary["netadapt latency ratio (side by side)"] = refined_ratio(folder)
    atomic_write_json(folder / "summary.json", summary)
    retrain = [
        "python",
        "-m",
        "mnv3.train",
        "-m",
        f"hydra.searchpath=[file://{(folder / BACKBONES_DIR).resolve()}]",
        f"backbone={','.join(names)}",
        "seed=0,1,2",
        *s["train_overrides"],
    ]
    summary["commands"] = [
        ("retrain the top candidates from scratch, 3 seeds (a multirun)", shlex.join(retrain))
    ]
    return summary


def _train_supernet(
    cfg: Mapping[str, Any],
    s: Mapping[str, Any],
    task: Any,
    datamodule: Any,
    state_dir: Path,
    accelerator: str,
) -> None:
    """``search.supernet_steps`` sandwich steps through Lightning; ``supernet_last.ckpt`` every
    ``search.supernet_checkpoint_every`` steps (written atomically), so a killed run resumes
    the supernet's training from there (optimizer and step included), not from scratch."""
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from mnv3.accelerator import AUTO, CPU_PRECISION, auto_precision
    from mnv3.preemption import (
        AtomicCheckpointIO,
        PeriodicLastCheckpoint,
        Preempted,
        PreemptionCheckpoint,
    )

    last = state_dir / SUPERNET_LAST
    every = int(s.get("supernet_checkpoint_every") or max(1, s["supernet_steps"] // 10))
    checkpoints = PeriodicLastCheckpoint(
        dirpath=state_dir,
        filename=last.stem,
        every_n_train_steps=every,
        save_top_k=1,
        enable_version_counter=False,
    )
    # SIGTERM / SIGUSR1 (a preempted job): supernet_last.ckpt at the next step's end, then
    # Preempted (exit 143), so the kill loses no step.
    preemption = PreemptionCheckpoint(last)
    precision = cfg.get("trainer", {}).get("precision", CPU_PRECISION)
    if precision == AUTO:  # trainer=default: what ``auto`` means on this accelerator
        precision = auto_precision(accelerator)
    trainer = pl.Trainer(
        max_steps=s["supernet_steps"],
        accelerator=accelerator,
        precision=precision,
        devices=1,
        limit_val_batches=0,
        logger=False,
        callbacks=[checkpoints, preemption],
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(state_dir),
    )
    resume = last if last.is_file() else None
    if resume is not None:
        log.info("supernet: resuming its training from %s", resume)
    else:
        log.info("supernet: %d sandwich steps on the training split", s["supernet_steps"])
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=resume)
    except SIGTERMException:
        signum = preemption.signum or int(signal.SIGTERM)
        run_dir = state_dir.parent
        raise Preempted(
            signum, trainer.global_step, preemption.checkpoint_step, run_dir, "mnv3.search", last
        ) from None


def _measure_top(
    s: Mapping[str, Any],
    history: History,
    state: dict[str, Any],
    space: SearchSpace,
    platform: Platform,
    latency: LatencyTable,
    build: Any,
    reference: torch.nn.Module,
    target: float,
) -> dict[str, Any]:
    """The ``top_k`` best distinct candidates measured whole, interleaved with the reference;
    ranked by the reward with measured latency (scaled to the table's predicted units). Their
    rows in ``state`` get ``measured_ms`` and ``measured_reward``."""
    ranked = sorted(range(len(history.rewards)), key=lambda i: -history.rewards[i])
    top: list[list[int]] = []
    for i in ranked:
        if history.choices[i] not in top:
            top.append(history.choices[i])
        if len(top) == s["top_k"]:
            break
    networks = {"reference": reference} | {str(j): build(space.table(c)) for j, c in enumerate(top)}
    measured = platform.measure_interleaved(networks, s["measure_rounds"])
    ref_ms = measured["reference"].ms
    finals = []
    for j, choices in enumerate(top):
        row = state["rows"][history.choices.index(choices)]
        ms = measured[str(j)].ms / ref_ms * latency.predict(reference)  # in predicted-ms units
        capped = s["hard_cap"] and ms > target
        value = 0.0 if capped else mnasnet_reward(row["acc"], ms, target, s["w"])
        row["measured_ms"], row["measured_reward"] = measured[str(j)].ms, value  # in the CSV
        finals.append(
            {"reward": value, "acc": row["acc"], "ms": measured[str(j)].ms, "choices": choices}
        )
    finals.sort(key=lambda f: -f["reward"])
    return {
        "top": [f["choices"] for f in finals],
        "reward": finals[0]["reward"],
        "acc": finals[0]["acc"],
        "ms": finals[0]["ms"],
        "reference_ms": ref_ms,
        "platform": f"{platform.name} ({measured['reference'].runtime}, {platform.threads} "
        f"thread(s), {measured['reference'].cpu})",
    }


def _refine(
    cfg: Mapping[str, Any],
    s: Mapping[str, Any],
    folder: Path,
    supernet: Any,
    choices: list[int],
    calibration: list[torch.Tensor],
    loggers: list[Any],
) -> Any:
    """NetAdapt on the winner (paper §4.2 after §4.1), started from its supernet weights with
    its own BN statistics, in ``<run>/netadapt``; returns the refined table."""
    from mnv3.models.block_table import load_backbone_file
    from mnv3.search.netadapt import TABLE_FILE, run_netadapt

    where = folder / "netadapt"
    start = where / WINNER_WEIGHTS
    if not start.is_file():
        supernet.eval()
        calibrate_bn(supernet, choices, calibration)
        atomic_torch_save(supernet.subnet(choices).state_dict(), start)
    space = supernet.space
    backbone = {
        k: cfg["backbone"][k] for k in ("bn_momentum", "in_channels") if cfg["backbone"].get(k)
    }
    backbone |= {
        "name": "mobilenet_v3",
        "table": table_to_plain(space.table(choices, f"{space.name}_nas")),
        "weights": str(start),
    }
    log.info("NetAdapt on the winner, from its supernet weights, in %s", where)
    offset = [_StepOffset(logger, int(s["budget"])) for logger in loggers]
    run_netadapt({**cfg, "backbone": backbone, "search": s["refine"]}, where, offset)
    return load_backbone_file(where / TABLE_FILE)


def refined_ratio(folder: Path) -> float:
    """NetAdapt's final side-by-side latency ratio (refined / winner) from its summary."""
    summary = json.loads((folder / "netadapt" / "summary.json").read_text())
    return float(summary["latency ratio (final side by side)"])


def _save(state_dir: Path, state: dict[str, Any]) -> None:
    atomic_write_json(state_dir / STATE_FILE, state)
    atomic_write_csv(state_dir / CANDIDATES_CSV, COLUMNS, state["rows"])
