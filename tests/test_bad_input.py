"""Every bad config value or checkpoint is one sentence and exit status 1, before data is read.

Most cases run the checks in-process (a composed config costs ~0.1 s); a few go through the real
entry points as a user would run them, with ``HYDRA_FULL_ERROR`` unset, to pin the exit path:
status 1, exactly one line on stderr, no traceback.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import compose_train, run_cli
from mnv3.cli import ConfigError, exit_on_user_error, to_plain
from mnv3.models import mobilenet_v3_large
from mnv3.models.checkpoints import CheckpointError
from mnv3.tasks import TASKS
from mnv3.validate import (
    check_accelerator,
    check_backbone_keys,
    check_checkpoint_fits,
    check_train_config,
    check_values,
)


def _user_env() -> dict[str, str]:
    """The environment of a user who did not ask for tracebacks (conftest sets the switch)."""
    return {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}


def _run_as_user(module: str, args: list[str], cwd: Path):
    """``python -m module args`` with HYDRA_FULL_ERROR unset, as a user types it."""
    env = _user_env()
    old = os.environ.pop("HYDRA_FULL_ERROR", None)
    try:
        return run_cli(module, args, cwd=cwd, env=env)
    finally:
        if old is not None:
            os.environ["HYDRA_FULL_ERROR"] = old


def _one_sentence(result) -> str:
    """The single stderr line of a failed run, after asserting the exit path."""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def _lightning_checkpoint(path: Path, network: nn.Module, model: dict, num_classes: int) -> Path:
    """A checkpoint shaped as mnv3.train writes it: Lightning's keys, plain hyperparameters."""
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in network.state_dict().items()},
            "hyper_parameters": {"model": model, "num_classes": num_classes},
            "optimizer_states": [],
            "epoch": 0,
            "global_step": 1,
        },
        path,
    )
    return path


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.batch_size=0", "a positive integer"),
        ("data.image_size=-1", "a positive integer"),
        ("optim.lr=abc", "a positive number"),
        ("optim.weight_decay=-0.1", "a number >= 0"),
        ("scheduler.warmup_epochs=-1", "a number >= 0"),
        ("backbone.name=mobilenet_v4", "one of mobilenet_v3_large, mobilenet_v3_small"),
        ("backbone.output_stride=7", "one of 8, 16, 32"),
        ("backbone.width_mult=0", "a positive number"),
        ("head.dropout=1.5", "a number in [0, 1)"),
        ("data.num_workers=two", "one of auto or an integer >= 0"),
        ("cpu.threads=0", "one of auto or a positive integer"),
        ("data=coco data.iou_crop=maybe", "true or false"),
        ("head=ssdlite head.loss=hinge", "one of softmax_hnm, focal"),
        ("head=ssdlite head.nms_thresh=1.5", "a number in [0, 1]"),
        ("head=lraspp head.pool=max", "one of paper, global"),
        ("head=lraspp head.output_stride=8", "null or one of 16, 32"),
        ("data=shapes_cityscapes data.crop_size=[0,5]", "a positive integer or a list of 2"),
        ("head=ssdlite head.detector=yolo", "one of ssdlite320"),
        ("head=lraspp head.segmenter=deeplab", "one of lraspp, raspp"),
        ("head=lraspp head.low_tap=C9", "one of C1, C2, C3, C4, C4_expansion, C5, C3_first"),
    ],
)
def test_bad_value_names_key_value_and_expectation(tmp_path: Path, override: str, expected: str):
    cfg = compose_train(tmp_path, override.split())
    with pytest.raises(ConfigError) as info:
        check_values(cfg)
    message = str(info.value)
    bad = override.split()[-1].replace(",", ", ")
    assert message.startswith(f"{bad} is not valid") and expected in message
    assert "\n" not in message


# Every shipped option passing these checks: tests/test_train.py composes each option once
# for its own checks and these (test_every_group_option_composes_and_passes_the_checks).


def test_a_v3_only_key_on_mobilenet_v2_is_named(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["backbone.name=mobilenet_v2"])  # keeps large's `minimal`
    with pytest.raises(ConfigError, match=r"backbone.minimal is not an option of .*mobilenet_v2"):
        check_backbone_keys(cfg)


def test_unreadable_backbone_weights_fail_before_data(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pth"
    empty.touch()
    cfg = compose_train(tmp_path, [f"backbone.weights={empty}"])
    with pytest.raises(
        CheckpointError, match=rf"^backbone.weights: checkpoint file {empty} is empty \(0 bytes\)"
    ):
        check_train_config(cfg)


def test_resume_from_another_architecture_names_both_and_the_first_keys(tmp_path: Path) -> None:
    large = {"name": "mobilenet_v3_large", "width_mult": 1.0, "dropout": 0.2, "weights": None}
    ckpt = _lightning_checkpoint(
        tmp_path / "large.ckpt", mobilenet_v3_large(num_classes=6), large, 6
    )
    cfg = compose_train(tmp_path, ["backbone=small", f"ckpt_path={ckpt}"])
    with pytest.raises(CheckpointError) as info:
        check_train_config(cfg)
    message = str(info.value)
    assert f"ckpt_path={ckpt} holds a mobilenet_v3_large network" in message
    assert "this run builds mobilenet_v3_small" in message
    assert "first blocks.0." in message and "backbone.name=mobilenet_v3_large" in message
    assert message.count(" vs ") <= 4 and "\n" not in message  # a few keys, not ~150 lines

    same = compose_train(tmp_path, ["backbone=large", f"ckpt_path={ckpt}"])
    check_train_config(same)  # the right architecture passes


# A detector and a segmenter saved with one architecture, resumed with another.
DENSE_RESUMES = [
    (
        ["head=ssdlite", "data=shapes_coco", "backbone=small"],
        ["backbone.width_mult=0.5"],
        "ssdlite320_mobilenet_v3_small width_mult=1.0",
        "ssdlite320_mobilenet_v3_small width_mult=0.5",
        "backbone.width_mult=1.0",
    ),
    (
        ["head=lraspp", "data=shapes_cityscapes", "backbone=small_reduced"],
        ["backbone.name=mobilenet_v3_large"],
        "lraspp_mobilenet_v3_small",
        "lraspp_mobilenet_v3_large",
        "backbone.name=mobilenet_v3_small",
    ),
]


@pytest.mark.parametrize(
    ("saved", "changed", "theirs", "ours", "setting"), DENSE_RESUMES, ids=["detector", "segmenter"]
)
def test_resume_a_dense_network_of_another_architecture_is_one_sentence(
    tmp_path: Path, saved: list[str], changed: list[str], theirs: str, ours: str, setting: str
) -> None:
    cfg = compose_train(tmp_path, saved)
    task = TASKS[cfg.head.task]
    model = task.network_kwargs(to_plain(cfg))
    ckpt = _lightning_checkpoint(tmp_path / "dense.ckpt", task.network(model, 3), model, 3)
    check_train_config(compose_train(tmp_path, [*saved, f"ckpt_path={ckpt}"]))  # it fits

    cfg = compose_train(tmp_path, [*saved, *changed, f"ckpt_path={ckpt}"])
    with pytest.raises(CheckpointError) as info:
        check_train_config(cfg)
    message = str(info.value)
    assert message.startswith(
        f"ckpt_path={ckpt} holds a {theirs} network but this run builds {ours}: "
    )
    assert f"{setting}) or start a new run without ckpt_path" in message
    assert message.count(" vs ") <= 4 and "\n" not in message


def test_resume_checkpoint_that_does_not_fit_the_task_is_one_sentence(tmp_path: Path) -> None:
    class Task(nn.Module):
        def __init__(self, num_classes: int) -> None:
            super().__init__()
            self.model = nn.Linear(4, num_classes)
            self.hparams = {"model": {"name": "linear"}, "num_classes": num_classes}

    ckpt = _lightning_checkpoint(tmp_path / "last.ckpt", nn.Linear(4, 6), {"name": "linear"}, 6)
    check_checkpoint_fits(ckpt, Task(6))
    with pytest.raises(
        CheckpointError, match=r"linear \(6 classes\).*linear \(3 classes\)"
    ) as info:
        check_checkpoint_fits(ckpt, Task(3))
    assert "model.weight (6, 4) vs (3, 4)" in str(info.value)


def test_a_state_dict_is_not_a_resumable_checkpoint(tmp_path: Path) -> None:
    plain = tmp_path / "weights.pth"
    torch.save(nn.Linear(2, 2).state_dict(), plain)
    cfg = compose_train(tmp_path, [f"ckpt_path={plain}"])
    with pytest.raises(CheckpointError, match=r"is not a checkpoint written by mnv3\.train"):
        check_train_config(cfg)


def test_full_error_switch_prints_the_traceback_above_the_sentence(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    @exit_on_user_error
    def fails() -> None:
        raise ConfigError("data.batch_size=0 is not valid: expected a positive integer")

    for switch, traceback_shown in (("1", True), (None, False)):
        if switch is None:
            monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
        else:
            monkeypatch.setenv("HYDRA_FULL_ERROR", switch)
        with pytest.raises(SystemExit) as info:
            fails()
        assert info.value.code == 1
        err = capsys.readouterr().err
        assert ("Traceback" in err) is traceback_shown
        assert err.strip().splitlines()[-1] == (
            "error: data.batch_size=0 is not valid: expected a positive integer"
        )


def test_a_missing_optional_extra_is_one_sentence_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib

    @exit_on_user_error
    def exports() -> None:
        importlib.import_module("onnxruntime.this_is_not_installed")

    @exit_on_user_error
    def has_a_bug() -> None:
        importlib.import_module("mnv3_no_such_module")

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as info:
        exports()
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: this needs the optional package 'onnxruntime', which is not installed: "
        "pip install 'mnv3[deploy]' (make install includes every extra)"
    ]
    with pytest.raises(ModuleNotFoundError):  # not an optional package: a bug, left loud
        has_a_bug()


# Through the real entry points. data=imagefolder with a root that does not exist: had the data
# been read first, the sentence would be about the missing folder instead.
NO_DATA = ["data=imagefolder", "data.root=/nonexistent/mnv3-data", "logger=none"]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["optim.lr=abc"], "optim.lr=abc is not valid: expected a positive number"),
        (["ckpt_path={empty}"], "ckpt_path: checkpoint file {empty} is empty (0 bytes)"),
    ],
)
def test_train_cli_bad_input_is_one_sentence_before_data(
    tmp_path: Path, args: list[str], named: str
) -> None:
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    args = [a.format(empty=empty) for a in args]
    result = _run_as_user(
        "mnv3.train", [*NO_DATA, *args, f"hydra.run.dir={tmp_path}/run"], tmp_path
    )
    line = _one_sentence(result)
    assert line.startswith("error: ") and named.format(empty=empty) in line
    assert "mnv3-data" not in line


def test_eval_cli_bad_split_is_one_sentence(tmp_path: Path) -> None:
    result = _run_as_user(
        "mnv3.eval",
        [f"ckpt_path={tmp_path}/best.ckpt", "split=train", f"hydra.run.dir={tmp_path}/run"],
        tmp_path,
    )
    assert "split=train is not valid: expected one of val, test" in _one_sentence(result)


def test_unknown_config_option_stays_hydras_short_error(tmp_path: Path) -> None:
    result = _run_as_user(
        "mnv3.train", ["head=no_such_head", f"hydra.run.dir={tmp_path}/run"], tmp_path
    )
    assert result.returncode == 1
    assert "Could not find 'head/no_such_head'" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_error_raised_in_a_dataloader_worker_keeps_its_sentence() -> None:
    from torch.utils.data import DataLoader, Dataset

    from mnv3.cli import user_message
    from mnv3.data.errors import DatasetError

    sentence = "label map a_gtFine_labelIds.png is 10x20 but its image a_leftImg8bit.png is 20x40"

    class Broken(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> None:
            raise DatasetError(sentence)

    with pytest.raises(DatasetError) as caught:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert str(caught.value).startswith("Caught DatasetError")  # torch's wrapping
    assert user_message(caught.value) == sentence
    assert user_message(DatasetError(f"{sentence}\nmore")) == sentence


# One config per task, as the quick experiments compose them.
TASK_RUNS = {
    "classification": ["experiment=shapes_quick"],
    "detection": ["experiment=shapes_detect_quick"],
    "segmentation": ["experiment=shapes_segment_quick"],
}
PAIRS = [(a, b) for a in TASK_RUNS for b in TASK_RUNS if a != b]


def _task_checkpoint(tmp_path: Path, task_name: str) -> tuple[Path, str]:
    """A checkpoint whose hyperparameters are those a ``task_name`` run writes (its builder
    arguments from the quick experiment's config); no tensors: the task check reads none."""
    task = TASKS[task_name]
    model = task.network_kwargs(to_plain(compose_train(tmp_path, TASK_RUNS[task_name])))
    path = tmp_path / f"{task_name}.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model": model, "num_classes": 3}}, path)
    return path, task.network_name(model)


@pytest.mark.parametrize(("held", "run"), PAIRS)
def test_resuming_a_checkpoint_of_another_task_names_both_tasks(
    tmp_path: Path, held: str, run: str
) -> None:
    ckpt, network = _task_checkpoint(tmp_path, held)
    cfg = compose_train(tmp_path, [*TASK_RUNS[run], f"ckpt_path={ckpt}"])
    with pytest.raises(CheckpointError) as info:
        check_train_config(cfg)
    message = str(info.value)
    assert message.startswith(
        f"ckpt_path={ckpt} holds a {held} checkpoint ({network}) but this run is {run} "
        f"(head={cfg.head.name}, data={cfg.data.name}); "
    )
    # The way to use it that does work: a classifier starts a dense run's backbone.
    assert ("backbone.weights=" in message) == (held == "classification"), message


@pytest.mark.parametrize(("held", "run"), PAIRS)
def test_fine_tuning_weights_of_another_task_name_both_tasks(
    tmp_path: Path, held: str, run: str
) -> None:
    ckpt, network = _task_checkpoint(tmp_path, held)
    key = TASKS[run].weights_key
    cfg = compose_train(tmp_path, [*TASK_RUNS[run], f"{key}={ckpt}"])
    with pytest.raises(CheckpointError) as info:
        check_train_config(cfg)
    takes = run if key != "backbone.weights" else "classification"
    assert str(info.value).startswith(
        f"{key}={ckpt} holds a {held} checkpoint ({network}) but {key} of this {run} run "
        f"(head={cfg.head.name}) takes {takes} weights; "
    )


@pytest.mark.parametrize("run", ["detection", "segmentation"])
def test_a_dense_checkpoint_as_backbone_weights_points_to_head_weights(
    tmp_path: Path, run: str
) -> None:
    ckpt, _ = _task_checkpoint(tmp_path, run)
    cfg = compose_train(tmp_path, [*TASK_RUNS[run], f"backbone.weights={ckpt}"])
    with pytest.raises(CheckpointError, match=re.escape(f"; pass it as head.weights={ckpt}") + "$"):
        check_train_config(cfg)


def test_a_classifier_of_another_tail_names_the_setting_that_makes_it_fit(
    tmp_path: Path,
) -> None:
    cfg = compose_train(tmp_path, TASK_RUNS["classification"])
    model = TASKS["classification"].network_kwargs(to_plain(cfg))
    assert model["name"] == "mobilenet_v3_small" and model["reduced_tail"] is False
    network = TASKS["classification"].network(model, 3)
    ckpt = _lightning_checkpoint(tmp_path / "cls.ckpt", network, model, 3)
    detect = [*TASK_RUNS["detection"], f"backbone.weights={ckpt}"]
    with pytest.raises(CheckpointError, match=r"trained with backbone\.reduced_tail=false: set"):
        check_train_config(compose_train(tmp_path, detect))
    check_train_config(compose_train(tmp_path, [*detect, "backbone.reduced_tail=false"]))


def test_train_cli_resuming_another_tasks_checkpoint_is_one_sentence(tmp_path: Path) -> None:
    """Also run in the default run folder (no ``hydra.run.dir``): its folder check once printed
    a 5-line UserWarning there, before every run."""
    ckpt, _ = _task_checkpoint(tmp_path, "detection")
    result = _run_as_user(
        "mnv3.train", [*TASK_RUNS["segmentation"], f"ckpt_path={ckpt}"], cwd=tmp_path
    )
    assert "holds a detection checkpoint" in _one_sentence(result)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        (
            "+head.foo=1",
            "head.foo is not an option of head=classifier; its options: callbacks, class_",
        ),
        ("+head.num_classes=5", "head.num_classes is not an option of head=classifier"),
        ("head=ssdlite +head.dropout=0.1", "head.dropout is not an option of head=ssdlite"),
        ("+optim.moment=0.9", "optim.moment is not an option of optim=adamw; its options: lr,"),
        ("+scheduler.warmup=1", "scheduler.warmup is not an option of scheduler=cosine"),
        ("+cpu.thread=2", "cpu.thread is not an option of cpu=default"),
        ("+callbacks.patience=3", "callbacks.patience is not an option of callbacks=default"),
        ("+trainer.epochs=3", "trainer.epochs is not an option of Lightning's Trainer"),
        ("+learning_rate=0.1", "learning_rate is not an option of train.yaml (top level)"),
    ],
)
def test_a_key_nothing_reads_is_refused_not_ignored(
    tmp_path: Path, override: str, named: str
) -> None:
    cfg = compose_train(tmp_path, override.split())
    with pytest.raises(ConfigError) as info:
        check_train_config(cfg)
    assert str(info.value).startswith(named), str(info.value)


def test_a_gpu_recipe_without_enough_gpus_is_one_sentence(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["experiment=ssdlite_mnv3s_320_coco"])  # gpu, 8 devices
    with pytest.raises(ConfigError, match=r"^trainer\.accelerator=gpu needs a GPU, but this"):
        check_accelerator(cfg, gpus=0)
    with pytest.raises(ConfigError, match=r"^trainer\.devices=8 but this machine has 1 GPU"):
        check_accelerator(cfg, gpus=1)
    check_accelerator(cfg, gpus=8)
    check_accelerator(compose_train(tmp_path, ["experiment=ssdlite_mnv3s_320_coco", "trainer=cpu"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize(
    ("module", "experiment"),
    [("mnv3.train", "lraspp_mnv3s-rf2-f128_769_cityscapes"), ("mnv3.search", "nas_large_imagenet")],
)
def test_cli_gpu_recipe_on_a_cpu_machine_is_one_sentence(
    tmp_path: Path, module: str, experiment: str
) -> None:
    args = [f"experiment={experiment}", f"hydra.run.dir={tmp_path}/r"]
    line = _one_sentence(_run_as_user(module, args, tmp_path))
    assert line.startswith("error: trainer.accelerator=gpu needs a GPU")
