"""End to end: config composition, training, test, eval, resume, DDP, W&B, bad input."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from helpers import (
    QUIET,
    TINY_DATA,
    compose_config,
    compose_train,
    entry_point_of,
    run_cli,
)
from mnv3.cli import CONFIG_DIR, ConfigError
from mnv3.train import train
from mnv3.validate import (
    check_backbone_keys,
    check_head_and_data,
    check_known_keys,
    check_values,
)

BACKBONES = sorted(p.stem for p in (CONFIG_DIR / "backbone").glob("*.yaml"))


def test_every_group_option_composes_and_passes_the_checks(tmp_path: Path) -> None:
    """Every option of every config group composes; each one mnv3.train runs also passes the
    config checks (a check refusing a shipped option would stop users before any data is read).
    One compose per option serves both: a compose costs ~0.2 s here."""
    assert {
        "large",
        "small",
        "large_075",
        "small_075",
        "large_minimal",
        "small_minimal",
        "large_reduced",
        "small_reduced",
        "mobilenet_v2",
    } <= set(BACKBONES)
    named = {
        "optim": ["adamw", "sgd", "rmsprop_tf"],
        "scheduler": ["cosine", "exponential"],
        "trainer": ["cpu", "gpu", "ddp"],
        "logger": ["wandb", "csv", "tensorboard", "none"],
        "debug": ["fast_dev_run", "overfit", "limit"],
        "head": ["classifier", "ssdlite", "lraspp", "raspp"],
    }
    groups = ("backbone", "data", "experiment", *named)
    options = {
        group: sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")) for group in groups
    }
    for group, names in named.items():
        assert set(names) <= set(options[group]), group
    assert entry_point_of("netadapt_small_quick") == "search"
    checked = 0
    for group, names in options.items():
        for option in names:
            entry = entry_point_of(option) if group == "experiment" else "train"
            cfg = compose_config(entry, tmp_path, [f"{group}={option}"])
            if group == "backbone":
                assert cfg.backbone.name.startswith("mobilenet_v")
            if group == "data":
                # Segmentation trains on crops and evaluates whole frames: its size knob is
                # crop_size.
                size = "crop_size" if "segmentation" in cfg.data.provides else "image_size"
                for knob in ("root", "batch_size", "num_workers", size):
                    assert knob in cfg.data, f"data={option} lacks data.{knob}"
            if entry == "train":  # search experiments: tests/search checks them
                check_known_keys(cfg)
                check_values(cfg)
                check_backbone_keys(cfg)
                checked += 1
    assert checked >= 35


def test_paper_recipe_experiments_hold_the_paper_numbers(tmp_path: Path) -> None:
    paper = {"imagenet_large": (0.752, 5.4, 219), "imagenet_small": (0.674, 2.5, 56)}  # Table 3
    for name in ("imagenet_large", "imagenet_small"):
        cfg = compose_train(tmp_path, [f"experiment={name}"])
        assert (cfg.paper.acc1, cfg.paper.params_m, cfg.paper.madds_m) == paper[name]
        assert (
            cfg.optim.name == "rmsprop_tf" and cfg.optim.momentum == 0.9 and cfg.optim.decay == 0.9
        )
        assert (
            cfg.optim.weight_decay == 1e-5 and cfg.head.dropout == 0.2 and cfg.ema_decay == 0.9999
        )
        assert cfg.scheduler.decay_rate == 0.99 and cfg.scheduler.decay_epochs == 3
        assert cfg.data.batch_size * cfg.trainer.devices == 4096


def test_impossible_head_and_data_fail_before_reading_data(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["data.provides=[detection]", "data.root=/does/not/exist"])
    with pytest.raises(
        ConfigError,
        match="head=classifier needs classification data, but data=textures provides detection",
    ):
        check_head_and_data(cfg)


def test_fast_dev_run_trains_validates_and_tests(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["debug=fast_dev_run", *TINY_DATA, *QUIET])
    train(cfg)
    assert (tmp_path / "run" / "config_resolved.yaml").is_file()
    assert (
        tmp_path / "data" / "textures" / "train"
    ).is_dir()  # generated as a real ImageFolder tree


def _metrics_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_short_run_learns_and_saves_plain_checkpoints(tmp_path: Path) -> None:
    overrides = [
        *TINY_DATA,
        *QUIET,
        "trainer.max_epochs=3",
        "optim.lr=0.01",
        "scheduler.warmup_epochs=0",
        "ema_decay=0.9",
        "channels_last=true",
    ]
    cfg = compose_train(tmp_path, overrides)
    train(cfg)
    run = tmp_path / "run"
    losses = [float(r["train/loss_epoch"]) for r in _metrics_rows(run) if r.get("train/loss_epoch")]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    for name in ("best.ckpt", "last.ckpt"):
        ckpt = torch.load(run / "checkpoints" / name, weights_only=True)
        hp = ckpt["hyper_parameters"]
        assert hp["model"]["name"] == "mobilenet_v3_small" and hp["num_classes"] == 6
        assert type(hp["optimizer"]) is dict and type(hp["class_names"]) is list
        assert any(k.startswith("ema.module.") for k in ckpt["state_dict"])
    rows = _metrics_rows(run)
    assert any(r.get("test/acc1") for r in rows) and any(
        r.get("val/acc1_class/checker") for r in rows
    )
    assert list((run / "plots").glob("val_confusion_epoch*.png"))
    hparams = (run / "csv" / "hparams.yaml").read_text()
    assert "model/madds" in hparams and "model/params" in hparams


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    calls = {"n": 0}
    original = torch.nn.CrossEntropyLoss.forward

    def poisoned(self, logits, target):
        calls["n"] += torch.is_grad_enabled()  # training steps only, not validation
        loss = original(self, logits, target)
        return loss * float("nan") if calls["n"] > 8 else loss

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", poisoned)
    cfg = compose_train(
        tmp_path,
        [*TINY_DATA, *QUIET, "trainer.max_epochs=3", "callbacks.last_every_n_steps=2"],
    )
    with pytest.raises(SystemExit) as info:
        train(cfg)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "training loss is nan at step 8" in err and "last good checkpoint" in err
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] in (6, 8)
    assert all(
        torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point()
    )


def test_missing_dataset_root_is_one_sentence_and_nonzero_exit(tmp_path: Path) -> None:
    result = run_cli(
        "mnv3.train",
        [
            "data=imagefolder",
            f"data.root={tmp_path}/nowhere",
            f"hydra.run.dir={tmp_path}/run",
            "logger=none",
            "callbacks.progress_bar=none",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 1
    line = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and f"{tmp_path}/nowhere" in line[0] and "expected" in line[0], (
        result.stderr[-2000:]
    )
    assert "Traceback" not in result.stderr


def test_mistyped_config_key_is_hydras_error(tmp_path: Path) -> None:
    result = run_cli(
        "mnv3.train", ["data.batch_sise=3", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path
    )
    assert result.returncode != 0
    assert "Could not override 'data.batch_sise'" in result.stderr


def test_cfg_job_prints_the_config_without_running(tmp_path: Path) -> None:
    result = run_cli("mnv3.train", ["backbone=large", "--cfg", "job"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "name: mobilenet_v3_large" in result.stdout


def test_multirun_sweeps_backbones_one_run_each(tmp_path: Path) -> None:
    args = [
        "-m",
        "backbone=small,small_minimal",
        "debug=fast_dev_run",
        *TINY_DATA,
        *QUIET,
        f"paths.data_dir={tmp_path}/data",
        f"hydra.sweep.dir={tmp_path}/multi",
    ]
    result = run_cli("mnv3.train", args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / "multi").iterdir() if p.is_dir())
    assert runs == [
        "0_mobilenet_v3_small-classifier-textures",
        "1_mobilenet_v3_small-classifier-textures",
    ]
    minimal = (tmp_path / "multi" / runs[1] / "config_resolved.yaml").read_text()
    assert "minimal: true" in minimal


def test_eval_reproduces_the_test_metrics_of_training(tmp_path: Path) -> None:
    # Trained in-process (the train CLI has tests of its own); evaluated as a user runs eval.
    train(compose_train(tmp_path, [*TINY_DATA, *QUIET, "trainer.max_epochs=2"]))
    trained = [r for r in _metrics_rows(tmp_path / "run") if r.get("test/acc1")][-1]
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    # The default run folder (no hydra.run.dir); one thread as in training.
    result = run_cli("mnv3.eval", [f"ckpt_path={ckpt}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (eval_dir,) = (tmp_path / "logs" / "eval" / "runs").iterdir()
    evaluated = [r for r in _metrics_rows(eval_dir) if r.get("test/acc1")][-1]
    # The OOD threshold calibrated on validation travels in the checkpoint; eval reports the
    # share of test images below it (in-distribution test data: a small share).
    assert 0.0 <= float(evaluated["test/ood_flagged"]) <= 0.5
    assert float(evaluated["test/acc1"]) == pytest.approx(float(trained["test/acc1"]))
    assert "test/acc1" in result.stdout


def test_ddp_two_cpu_processes_with_gloo(tmp_path: Path) -> None:
    args = [
        *TINY_DATA,
        *QUIET,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "debug=limit",
        "test=false",
        f"paths.data_dir={tmp_path}/data",
        f"hydra.run.dir={tmp_path}/run",
    ]
    result = run_cli("mnv3.train", args, cwd=tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "distributed_backend=gloo" in out and "All distributed processes registered" in out
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    # 48 train images split over 2 ranks: 24 each = 3 batches of 8 per epoch, 2 epochs. A single
    # process would run debug=limit's 4 batches per epoch (8 steps): the sampler split the data.
    assert ckpt["global_step"] == 2 * 3


def test_wandb_offline_run_is_grouped_and_tagged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    args = [*TINY_DATA, "logger=wandb", "callbacks.progress_bar=none"]
    train(compose_train(tmp_path, [*args, "debug=limit", "test=false"]))
    wandb.teardown()  # the W&B service writes its last records as it shuts down
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    record = next(runs[0].glob("*.wandb")).read_bytes()  # protobuf records keep strings verbatim
    for expected in (
        b"mobilenet_v3_small-classifier-textures",
        b"model/madds",
        b"val/acc1",
        b"textures",
    ):
        assert expected in record, expected
    assert list(runs[0].rglob("media/images/val/confusion_matrix_*.png"))


def test_truncated_and_empty_images_are_skipped_counted_and_training_continues(
    tmp_path: Path,
) -> None:
    from mnv3.data import generate_shapes

    root = tmp_path / "data" / "textures"
    generate_shapes(
        root,
        seed=0,
        num_classes=6,
        train_per_class=8,
        val_per_class=4,
        test_per_class=4,
        image_size=32,
        kind="textures",
    )
    victims = sorted((root / "train" / "checker").glob("*.png"))[:2]
    victims[0].write_bytes(
        victims[0].read_bytes()[: len(victims[0].read_bytes()) // 3]
    )  # truncated
    victims[1].write_bytes(b"")  # zero bytes
    cfg = compose_train(tmp_path, [*TINY_DATA, *QUIET, "trainer.max_epochs=1", "test=false"])
    train(cfg)
    rows = _metrics_rows(tmp_path / "run")
    skipped = max(float(r["data/skipped_images"]) for r in rows if r.get("data/skipped_images"))
    assert skipped == 2.0
    assert any(r.get("val/acc1") for r in rows)


def test_gray_data_with_rgb_backbone_fails_at_start(tmp_path: Path) -> None:
    from mnv3.validate import check_channels

    cfg = compose_train(tmp_path, ["data=chestxray14", "data.channels=1"])
    with pytest.raises(ConfigError, match=r"data.channels=1 but backbone.in_channels=3"):
        check_channels(cfg)
    check_channels(
        compose_train(tmp_path, ["data=chestxray14", "data.channels=1", "backbone.in_channels=1"])
    )
