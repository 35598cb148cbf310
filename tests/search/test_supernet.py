"""The weight-sharing supernet: a candidate on the shared weights' slices is exactly the
stand-alone network its table builds, with those weights copied in."""

from __future__ import annotations

import random

import pytest
import torch
from omegaconf import OmegaConf

from helpers import quiet_trainer
from mnv3.cli import CONFIG_DIR
from mnv3.models.mobilenetv3 import MOBILENET_V3_LARGE, MOBILENET_V3_SMALL
from mnv3.search.space import SearchSpace
from mnv3.search.supernet import SuperNet, largest_table

PAPER = {"small": MOBILENET_V3_SMALL, "large": MOBILENET_V3_LARGE}


def _supernet(name: str) -> SuperNet:
    path = CONFIG_DIR / "search" / "space" / f"{name}.yaml"
    space = SearchSpace.from_config(OmegaConf.to_container(OmegaConf.load(path)))
    torch.manual_seed(0)
    net = SuperNet(space, num_classes=5, bn_momentum=0.1)
    with torch.no_grad():  # non-trivial BN everywhere, so a wrong slice shows
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return net


@pytest.mark.parametrize("name", PAPER)
def test_a_slice_is_the_standalone_network_with_copied_weights(name: str) -> None:
    net = _supernet(name).eval()
    space = net.space
    rng = random.Random(1)
    x = torch.randn(2, 3, 64, 64)
    candidates = [space.decode(PAPER[name]), *(space.sample(rng) for _ in range(4))]
    for choices in candidates:
        standalone = net.subnet(choices).eval()
        assert standalone.arch.blocks == net._build(space.table(choices)).arch.blocks
        with torch.no_grad():
            assert torch.equal(net(x, choices), standalone(x))
    largest = space.decode(largest_table(space))
    assert largest is not None  # the supernet's own shape is a point of the space
    with torch.no_grad():
        assert torch.equal(net(x, largest), net.network(x))  # the largest slice is all of it


def test_training_a_slice_moves_only_its_share_of_the_weights() -> None:
    net = _supernet("small").train()
    choices = net.space.decode(MOBILENET_V3_SMALL)
    block = net.network.blocks[net._block_map(choices)[4]]  # Small's block 4: exp 240
    mean = block.depthwise.bn.running_mean.clone()
    net(torch.randn(4, 3, 64, 64), choices).logsumexp(1).sum().backward()
    grad = block.depthwise.conv.weight.grad
    used = net.space.table(choices).rows[4].exp
    assert grad[:used].abs().sum() > 0 and grad[used:].abs().sum() == 0
    assert not torch.equal(block.depthwise.bn.running_mean[:used], mean[:used])
    assert torch.equal(block.depthwise.bn.running_mean[used:], mean[used:])
    assert grad[:used, :, 1:4, 1:4].abs().sum() > 0  # Small's 5x5 in a 5x5 supernet: all of it


def test_the_sandwich_holds_the_largest_and_the_smallest_network() -> None:
    from mnv3.search.supernet import extreme_choices, sandwich

    space = _supernet("small").space
    big, small, *randoms = sandwich(space, random.Random(0), randoms=2)
    assert space.table(big).rows == largest_table(space).rows
    assert len(randoms) == 2
    smallest = space.table(small)
    assert len(smallest.rows) == sum(min(s.depths) for s in space.stages)
    assert max(r.out for r in smallest.rows) == max(min(s.widths) for s in space.stages)
    assert not any(r.se for r in smallest.rows) and {r.kernel for r in smallest.rows} == {3}
    assert extreme_choices(space, largest=False) == small


def test_bn_calibration_measures_the_candidates_own_statistics() -> None:
    """After calibration, each BN's running mean is the mean of its input over the batches
    (a cumulative average of equal batches), measured with a hook on the stand-alone network."""
    from mnv3.search.supernet import calibrate_bn

    net = _supernet("small")
    choices = net.space.sample(random.Random(3))
    batches = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    calibrate_bn(net, choices, batches)
    # The same statistics, computed independently on a copy with fresh BN stats in train mode.
    standalone = net.subnet(choices)
    inputs: list[torch.Tensor] = []
    bn = standalone.blocks[1].depthwise.bn
    hook = bn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    with torch.no_grad():
        for x in batches:
            standalone.train()(x)
    hook.remove()
    expected = torch.stack([t.mean((0, 2, 3)) for t in inputs]).mean(0)
    torch.testing.assert_close(net.subnet(choices).blocks[1].depthwise.bn.running_mean, expected)
    assert net.subnet(choices).blocks[1].depthwise.bn.num_batches_tracked == 3


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_the_classification_task_trains_a_supernet_by_the_sandwich_rule(tmp_path) -> None:
    """A training step's loss is the task's own loss summed over the sandwich's candidates (the
    largest, the smallest, two random), and Lightning fits it with the task unchanged."""

    from helpers import TINY_DATA, compose_train
    from mnv3.cli import build_datamodule, to_plain
    from mnv3.search.supernet import sandwich, sandwich_task
    from mnv3.tasks.classification import ClassificationTask

    cfg = to_plain(compose_train(tmp_path, [*TINY_DATA, "head.dropout=0.0", "logger=none"]))
    path = CONFIG_DIR / "search" / "space" / "small.yaml"
    cfg["search"] = {"space": OmegaConf.to_container(OmegaConf.load(path))}
    datamodule = build_datamodule(cfg["data"], num_workers=0)
    datamodule.prepare_data()
    task = sandwich_task(ClassificationTask).from_config(cfg, datamodule)
    assert type(task).__name__ == "SandwichClassificationTask"
    batch = next(iter(datamodule.train_dataloader()))
    task.train()
    loss = task.training_step(batch, 0)
    space = task.model.supernet.space
    expected = sum(
        task._loss(task.model.supernet(batch["image"], c), batch["label"])
        for c in sandwich(space, random.Random(0), 2)
    )
    torch.testing.assert_close(loss, expected)
    assert task.model.active is None  # validation scores the largest

    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=1)
    before = task.model.supernet.network.stem.conv.weight.detach().clone()
    trainer.fit(task, datamodule=datamodule)
    assert trainer.global_step == 3
    assert not torch.equal(before, task.model.supernet.network.stem.conv.weight)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_supernet_accuracy_is_the_standalone_networks_accuracy_after_calibration(
    tmp_path,
) -> None:
    """The search's score of a candidate is the task's own validation metric (top-1 for the
    classification task), equal to the top-1 of its stand-alone network holding the
    calibrated slices, computed independently on the same batches."""
    from helpers import TINY_DATA, compose_train
    from mnv3.cli import to_plain
    from mnv3.search.supernet import sandwich_task, scoring_trainer, supernet_accuracy
    from mnv3.tasks.classification import ClassificationTask

    cfg = to_plain(compose_train(tmp_path, [*TINY_DATA, "logger=none"]))
    path = CONFIG_DIR / "search" / "space" / "small.yaml"
    cfg["search"] = {"space": OmegaConf.to_container(OmegaConf.load(path))}
    task_cls = sandwich_task(ClassificationTask)
    task = task_cls(model=task_cls.network_kwargs(cfg), num_classes=3, optimizer=cfg["optim"])
    supernet = task.model.supernet
    choices = supernet.space.sample(random.Random(4))
    torch.manual_seed(0)
    calibration = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    held_out = [{"image": torch.randn(5, 3, 32, 32), "label": torch.randint(0, 3, (5,))}]
    acc = supernet_accuracy(task, choices, calibration, held_out, scoring_trainer(str(tmp_path)))
    alone = supernet.subnet(choices).eval()  # the slices, BN statistics just measured
    with torch.no_grad():
        expected = (alone(held_out[0]["image"]).argmax(1) == held_out[0]["label"]).float().mean()
    assert acc == pytest.approx(float(expected))
    assert task.model.training and task.model.active is None  # left as it was found


def test_a_killed_supernet_training_resumes_from_its_last_checkpoint(tmp_path) -> None:
    """The search's supernet training leaves ``supernet_last.ckpt`` (loadable with
    ``weights_only=True``) every N steps; a new run with more steps continues from it and
    runs only the steps that are left."""
    from helpers import TINY_DATA, compose_train
    from mnv3.cli import build_datamodule, to_plain
    from mnv3.search.nas import SUPERNET_LAST, _train_supernet
    from mnv3.search.supernet import sandwich_task
    from mnv3.tasks.classification import ClassificationTask

    cfg = to_plain(compose_train(tmp_path, [*TINY_DATA, "logger=none"]))
    path = CONFIG_DIR / "search" / "space" / "small.yaml"
    cfg["search"] = {"space": OmegaConf.to_container(OmegaConf.load(path))}
    datamodule = build_datamodule(cfg["data"], num_workers=0)
    datamodule.prepare_data()

    def fit(steps: int) -> list[int]:
        task = sandwich_task(ClassificationTask).from_config(cfg, datamodule)
        calls: list[int] = []
        step = task.training_step
        task.training_step = lambda batch, batch_idx: (
            calls.append(batch_idx),
            step(batch, batch_idx),
        )[1]
        settings = {"supernet_steps": steps, "supernet_checkpoint_every": 1}
        _train_supernet(cfg, settings, task, datamodule, tmp_path, "cpu")
        return calls

    assert len(fit(2)) == 2
    first = torch.load(tmp_path / SUPERNET_LAST, map_location="cpu", weights_only=True)
    assert first["global_step"] == 2
    assert len(fit(3)) == 1  # the killed run's 2 steps are not redone
    last = torch.load(tmp_path / SUPERNET_LAST, map_location="cpu", weights_only=True)
    assert last["global_step"] == 3


def test_sigterm_during_the_supernet_training_saves_the_step_and_says_how_to_resume(
    tmp_path,
) -> None:
    """A preempted search (SIGTERM in its supernet training) saves ``supernet_last.ckpt`` at
    the end of the step it was in and stops with :class:`Preempted` (exit 143 from the entry
    point); the next run does only the steps that are left."""
    import os
    import signal

    from helpers import TINY_DATA, compose_train
    from mnv3.cli import build_datamodule, to_plain
    from mnv3.preemption import Preempted
    from mnv3.search.nas import SUPERNET_LAST, _train_supernet
    from mnv3.search.supernet import sandwich_task
    from mnv3.tasks.classification import ClassificationTask

    cfg = to_plain(compose_train(tmp_path, [*TINY_DATA, "logger=none"]))
    path = CONFIG_DIR / "search" / "space" / "small.yaml"
    cfg["search"] = {"space": OmegaConf.to_container(OmegaConf.load(path))}
    datamodule = build_datamodule(cfg["data"], num_workers=0)
    datamodule.prepare_data()
    state_dir = tmp_path / "run" / "search"
    state_dir.mkdir(parents=True)

    def fit(steps: int, kill_at: int | None = None) -> int:
        task = sandwich_task(ClassificationTask).from_config(cfg, datamodule)
        calls: list[int] = []
        step = task.training_step

        def counted(batch, batch_idx):
            calls.append(batch_idx)
            if len(calls) == kill_at:
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler is installed
            return step(batch, batch_idx)

        task.training_step = counted
        settings = {"supernet_steps": steps, "supernet_checkpoint_every": 100}
        _train_supernet(cfg, settings, task, datamodule, state_dir, "cpu")
        return len(calls)

    with pytest.raises(Preempted) as info:
        fit(5, kill_at=2)
    assert info.value.exit_code == 143
    assert str(info.value) == (
        f"interrupted by SIGTERM at step 2; {state_dir / SUPERNET_LAST} holds step 2; "
        f"resume with python -m mnv3.search resume={tmp_path / 'run'}"
    )
    saved = torch.load(state_dir / SUPERNET_LAST, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2
    assert fit(5) == 3
