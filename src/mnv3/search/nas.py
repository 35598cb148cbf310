"""Platform-aware block search (paper §4.1, MnasNet): a supernet, a controller, the reward.

``python -m mnv3.search experiment=nas_small_quick`` runs, in its run folder:

1. **Supernet**: the space's largest network trained by the sandwich rule through the normal
   Lightning task (:func:`mnv3.search.supernet.sandwich_task`) on the training split for
   ``search.supernet_steps`` steps; saved as ``search/supernet.pt`` (a search resumed after
   this point does not train it again).
2. **Search**: the controller (``search.controller``: ``random``, ``evolution``, ``rl``) asks
   for ``search.budget`` candidates; each is scored by the supernet after its own BN
   statistics are re-measured (:func:`calibrate_bn`) on the **validation split** (disjoint from
   the supernet's training data; the test split stays untouched for the final training), and
   its latency is predicted by the per-block table on the platform. Reward: MnasNet's
   ``ACC x (LAT / TAR) ** w`` (:func:`mnv3.report.reward`; ``search.w``, -0.15 the paper's for
   Small, -0.07 for Large), 0 above the target with ``search.hard_cap``. The target:
   ``search.target_ms``, or ``search.target_ratio`` of the backbone group's network's predicted
   latency. Every candidate is a row of ``search/candidates.csv`` and of the loggers; the state
   is saved after each, so a killed search resumes (the controller replays the history).
3. **End to end**: the ``search.top_k`` best by reward are measured whole, side by side with
   the backbone network; the best reward with its *measured* latency is the result:
   ``table.yaml`` and the printed ``python -m mnv3.train`` command.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mnv3.errors import ConfigError
from mnv3.models.backbone import build_backbone
from mnv3.models.block_table import save_backbone_file, table_to_plain
from mnv3.report import reward as mnasnet_reward
from mnv3.search.controllers import Budget, History, make_controller, run
from mnv3.search.latency_table import LatencyTable
from mnv3.search.platform import Platform
from mnv3.search.space import SearchSpace
from mnv3.search.supernet import calibrate_bn, sandwich_task

log = logging.getLogger("mnv3.search")

SEARCH_DIR = "search"
STATE_FILE = "state.json"
CANDIDATES_CSV = "candidates.csv"
SUPERNET_FILE = "supernet.pt"
COLUMNS = ("candidate", "reward", "acc", "predicted_ms", "table")


def _atomic_text(path: Path, text: str) -> None:
    from mnv3.deploy.common import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(text)


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
    import pytorch_lightning as pl

    from mnv3.cli import build_datamodule
    from mnv3.tasks import TASKS

    s = _settings(cfg["search"])
    if cfg["head"].get("task") != "classification":
        raise ConfigError(
            f"head={cfg['head'].get('name')}: the block search scores candidates by "
            "classification accuracy; expected head=classifier"
        )
    space = SearchSpace.from_config(s["space"])
    platform = Platform.from_config(cfg["platform"])
    state_dir = folder / SEARCH_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    state_file = state_dir / STATE_FILE
    state: dict[str, Any] = (
        json.loads(state_file.read_text()) if state_file.is_file() else {"rows": []}
    )

    datamodule = build_datamodule(cfg["data"], num_workers=cfg["cpu"]["resolved"]["num_workers"])
    datamodule.prepare_data()
    task = sandwich_task(TASKS["classification"]).from_config(cfg, datamodule)
    supernet = task.model.supernet
    weights = state_dir / SUPERNET_FILE
    if weights.is_file():
        supernet.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        log.info("supernet: trained, read from %s", weights)
    elif s["supernet_steps"]:
        log.info("supernet: %d sandwich steps on the training split", s["supernet_steps"])
        trainer = pl.Trainer(
            max_steps=s["supernet_steps"],
            accelerator=cfg.get("trainer", {}).get("accelerator", "cpu"),
            devices=1,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(folder),
        )
        trainer.fit(task, datamodule=datamodule)
    if not weights.is_file():
        from mnv3.deploy.common import atomic_output

        with atomic_output(weights) as tmp:
            torch.save(supernet.state_dict(), tmp)

    latency = LatencyTable(platform, s["latency_table"])
    dropout = float(cfg["head"].get("dropout", 0.2))
    classes = datamodule.num_classes

    def build(table: Any) -> Any:
        return build_backbone("mobilenet_v3", table=table_to_plain(table), num_classes=classes)

    reference = build_backbone(**dict(cfg["backbone"]), num_classes=classes, dropout=dropout)
    target = s.get("target_ms") or float(s["target_ratio"]) * latency.predict(reference)
    calibration = [
        b["image"]
        for _, b in zip(
            range(s["calibration_batches"]), datamodule.train_dataloader(), strict=False
        )
    ]
    held_out = list(datamodule.val_dataloader())

    def evaluate(choices: list[int]) -> float:
        supernet.eval()
        calibrate_bn(supernet, choices, calibration)
        correct = total = 0
        with torch.no_grad():
            for batch in held_out:
                logits = supernet(batch["image"], choices)
                correct += int((logits.argmax(1) == batch["label"]).sum())
                total += len(batch["label"])
        acc = correct / total
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

    ranked = sorted(range(len(history.rewards)), key=lambda i: -history.rewards[i])
    top = []
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
        value = (
            0.0 if s["hard_cap"] and ms > target else mnasnet_reward(row["acc"], ms, target, s["w"])
        )
        finals.append((value, j, row, measured[str(j)].ms))
    value, j, row, ms = max(finals, key=lambda f: f[0])
    table = space.table(top[j], f"{space.name}_nas")
    save_backbone_file(table, folder / "table.yaml")
    summary = {
        "controller": s["controller"],
        "candidates": len(history.rewards),
        "target ms (predicted units)": target,
        "best reward (measured latency)": value,
        "best supernet acc": row["acc"],
        "best measured ms": ms,
        "reference measured ms": ref_ms,
        "latency vs reference (side by side)": ms / ref_ms,
        "platform": f"{platform.name} ({measured['reference'].runtime}, {platform.threads} "
        f"thread(s), {measured['reference'].cpu})",
    }
    _atomic_text(folder / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def _save(state_dir: Path, state: dict[str, Any]) -> None:
    _atomic_text(state_dir / STATE_FILE, json.dumps(state) + "\n")
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(
        {k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for r in state["rows"]
    )
    _atomic_text(state_dir / CANDIDATES_CSV, text.getvalue())
