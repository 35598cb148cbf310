"""Finished runs read back from their folders: config, metric history and summary.

Every run of ``mnv3.train`` leaves ``config_resolved.yaml`` and ``csv/metrics.csv`` (the CSV logger
is always on), so runs can be compared offline without W&B. Runs logged with ``logger=wandb`` also
leave ``wandb/offline-run-*`` folders; those are read too (their ``.wandb`` record file), which
covers a run whose CSV was lost or an offline run copied from another machine. The W&B public API
is read only on request (:func:`collect_wandb_api`). :mod:`mnv3.report` compares what this reads.
"""

from __future__ import annotations

import csv
import json
import math
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mnv3.run_folder import (
    CSV_DIR,
    HPARAMS_YAML,
    HYDRA_OVERRIDES,
    METRICS_CSV,
    RUN_CONFIG,
    WANDB_OFFLINE_RUNS,
)

# What each task monitors for its best checkpoint (the tasks' ``monitor``); binary and multi-label
# classification switch to val/auroc, which only they log.
TASK_MONITOR = {"classification": "val/acc1", "detection": "val/map", "segmentation": "val/miou"}


@dataclass
class Run:
    """One training run: its folder, config and metric history (``source``: csv or wandb)."""

    path: Path
    config: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    source: str = CSV_DIR

    @property
    def name(self) -> str:
        return str(self.config.get("run_name", self.path.name))

    @property
    def task(self) -> str:
        """The head's task (classification, detection or segmentation)."""
        return str((self.config.get("head") or {}).get("task", "classification"))

    @property
    def experiment(self) -> str:
        """The ``experiment=`` the run was started with (Hydra's record), else its run name."""
        overrides = self.path / HYDRA_OVERRIDES
        if overrides.is_file():
            for item in yaml.safe_load(overrides.read_text()) or []:
                key, _, value = str(item).lstrip("+~").partition("=")
                if key == "experiment" and value:
                    return value
        return self.name

    @property
    def monitor(self) -> str:
        """The metric the run's best checkpoint was chosen by."""
        if self.task == "classification" and "val/auroc" in self.summary:
            return "val/auroc"
        return TASK_MONITOR.get(self.task, "val/acc1")

    def series(self, metric: str, x: str = "epoch") -> tuple[list[float], list[float]]:
        """(x, y) for every logged row that has ``metric``."""
        rows = [r for r in self.history if metric in r and x in r]
        return [r[x] for r in rows], [r[metric] for r in rows]

    def final(self, metric: str) -> float:
        """The last logged value of ``metric`` (NaN when the run never logged it)."""
        return self.summary.get(metric, math.nan)

    def best(self, metric: str | None = None) -> float:
        """The highest logged value of ``metric`` (default: the monitored one); NaN if never."""
        metric = metric or self.monitor
        values = [r[metric] for r in self.history if metric in r and not math.isnan(r[metric])]
        return max(values) if values else math.nan


def _read_metrics(path: Path) -> list[dict[str, float]]:
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for key, value in raw.items():
                if value not in ("", None):
                    try:
                        row[key] = float(value)
                    except ValueError:
                        continue
            rows.append(row)
    return rows


def _read_hparams(path: Path) -> dict[str, float]:
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    return {
        k: float(v)
        for k, v in data.items()
        if k.startswith("model/") and isinstance(v, int | float)
    }


def _folders(log_dirs: str | Path | Iterable[str | Path]) -> list[Path]:
    folders = [Path(log_dirs)] if isinstance(log_dirs, str | Path) else [Path(d) for d in log_dirs]
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(
                f"runs folder {folder} does not exist; expected a folder of mnv3.train runs "
                f"(each with {RUN_CONFIG} and {METRICS_CSV})"
            )
    return folders


def collect_runs(log_dir: str | Path | Iterable[str | Path], wandb: bool = True) -> list[Run]:
    """Every run below ``log_dir`` (one folder or several), oldest first.

    A run folder with ``config_resolved.yaml`` and ``csv/metrics.csv`` is read from its CSV. With
    ``wandb``, a W&B offline run folder (``wandb/offline-run-*``) whose run has no CSV is read from
    its ``.wandb`` record file instead, so such runs are not silently missing.
    """
    runs: list[Run] = []
    seen: set[Path] = set()
    folders = _folders(log_dir)
    for root in folders:
        for config_path in sorted(root.rglob(RUN_CONFIG)):
            folder = config_path.parent
            metrics_path = folder / METRICS_CSV
            if not metrics_path.is_file() or folder in seen:
                continue
            seen.add(folder)
            history = _read_metrics(metrics_path)
            summary: dict[str, float] = _read_hparams(folder / HPARAMS_YAML)
            for row in history:
                summary.update(row)
            config = yaml.safe_load(config_path.read_text()) or {}
            runs.append(Run(folder, config, history, summary))
    if wandb:
        for root in folders:
            for offline in sorted(root.rglob(WANDB_OFFLINE_RUNS)):
                if not offline.is_dir() or _run_folder_of(offline) in seen:
                    continue
                records = sorted(offline.glob("*.wandb"))
                if records:
                    seen.add(_run_folder_of(offline))
                    runs.append(read_wandb_offline(records[0]))
    return runs


def _run_folder_of(offline: Path) -> Path:
    """``<run>/wandb/offline-run-*`` -> ``<run>`` (where checkpoints and latency.json live)."""
    return offline.parent.parent if offline.parent.name == "wandb" else offline


# -- W&B offline run files --------------------------------------------------------------------
# The .wandb file is a LevelDB-style log (wandb's datastore format): a 7-byte header (":W&B",
# magic 0xBEE1, version 0), then 32 KiB blocks of records, each with a 7-byte header (CRC-32 of
# type byte + data, length, type: 1 full, 2 first, 3 middle, 4 last); every record is a protobuf
# ``wandb_internal_pb2.Record``. wandb 0.31 ships the protobuf but no Python reader.
_WANDB_HEADER = struct.Struct("<4sHB")
_WANDB_RECORD = struct.Struct("<IHB")
_WANDB_BLOCK = 32768


def wandb_records(path: str | Path) -> list[bytes]:
    """The raw protobuf records of a W&B ``.wandb`` file, in order (CRC-checked)."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < _WANDB_HEADER.size or _WANDB_HEADER.unpack_from(data)[:2] != (b":W&B", 0xBEE1):
        raise ValueError(f"{path} is not a W&B run file; expected the run-<id>.wandb of a W&B run")
    records, parts, pos = [], [], _WANDB_HEADER.size
    while pos + _WANDB_RECORD.size <= len(data):
        left = _WANDB_BLOCK - pos % _WANDB_BLOCK
        if left < _WANDB_RECORD.size:  # a block's tail too short for a header is padding
            pos += left
            continue
        crc, length, kind = _WANDB_RECORD.unpack_from(data, pos)
        if kind == 0:  # zero padding up to the next block, or the unwritten end of a live run
            pos += left
            continue
        body = data[pos + _WANDB_RECORD.size : pos + _WANDB_RECORD.size + length]
        if len(body) < length or zlib.crc32(body, zlib.crc32(bytes([kind]))) != crc:
            break  # a run still being written (or killed mid-record): keep what is complete
        pos += _WANDB_RECORD.size + length
        if kind == 1:
            records.append(body)
        elif kind == 2:
            parts = [body]
        elif kind == 3:
            parts.append(body)
        elif kind == 4:
            records.append(b"".join([*parts, body]))
            parts = []
    return records


def _item_key(item: Any) -> str | None:
    """The metric name of a W&B history / summary / config item; None for nested media fields."""
    if item.key:
        return str(item.key)
    return str(item.nested_key[0]) if len(item.nested_key) == 1 else None


def _numbers(items: Iterable[Any]) -> dict[str, float]:
    out = {}
    for item in items:
        key = _item_key(item)
        if key is None or key.startswith("_"):
            continue
        try:
            value = json.loads(item.value_json) if item.value_json else None
        except json.JSONDecodeError:
            continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def read_wandb_offline(path: str | Path) -> Run:
    """A :class:`Run` from a W&B offline run: its config, numeric history and summary.

    ``path`` is the ``run-<id>.wandb`` file or the ``offline-run-*`` folder holding it.
    """
    from wandb.proto import wandb_internal_pb2

    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.wandb"))
        if not found:
            raise FileNotFoundError(f"{path} holds no .wandb file; expected a W&B offline run")
        path = found[0]
    config: dict[str, Any] = {}
    history: list[dict[str, float]] = []
    summary: dict[str, float] = {}
    for raw in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "config":
            for item in record.config.update:
                key = _item_key(item)
                if key is not None and not key.startswith("_"):
                    config[key] = json.loads(item.value_json)
        elif kind == "history":
            row = _numbers(record.history.item)
            if row:
                history.append(row)
                summary.update(row)
        elif kind == "summary":
            summary.update(_numbers(record.summary.update))
    summary.update({k: float(v) for k, v in config.items() if k.startswith("model/")})
    return Run(_run_folder_of(path.parent), config, history, summary, source="wandb")


def collect_wandb_api(project: str, online: bool = False, limit: int = 200) -> list[Run]:
    """Runs of a W&B project (``entity/project``) through the public API: network, on request.

    Refuses unless ``online`` is set and ``WANDB_MODE`` allows the network, so a notebook re-run
    offline (or a test) never reaches for it. The runs have no local folder: no latency unless
    measured elsewhere.
    """
    mode = os.environ.get("WANDB_MODE", "")
    if not online or mode in ("offline", "disabled", "dryrun"):
        raise RuntimeError(
            f"collect_wandb_api({project!r}) reads W&B over the network; expected online=True "
            f"and WANDB_MODE unset or online (it is {mode or 'unset'})"
        )
    import wandb

    runs = []
    for api_run in list(wandb.Api().runs(project))[:limit]:
        history = [
            {k: float(v) for k, v in row.items() if isinstance(v, int | float) and k[0] != "_"}
            for row in api_run.scan_history()
        ]
        summary = {
            k: float(v)
            for k, v in dict(api_run.summary).items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        config = dict(api_run.config)
        summary.update({k: float(v) for k, v in config.items() if k.startswith("model/")})
        runs.append(Run(Path(api_run.id), config, history, summary, source="wandb-api"))
    return runs
