"""RMSpropTF against TensorFlow's update written out by hand; schedules; no-decay groups; EMA."""

import io
import math

import pytest
import torch
from torch import nn

from mnv3.models import mobilenet_v3_small
from mnv3.tasks.ema import ModelEma
from mnv3.tasks.optim import (
    RMSpropTF,
    WarmupSchedule,
    build_optimizer,
    build_scheduler,
    param_groups_without_norm_and_bias_decay,
)


def test_rmsprop_tf_follows_tensorflow_update() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, requires_grad=True)
    opt = RMSpropTF([w], lr=0.1, decay=0.9, momentum=0.9, eps=1e-3, weight_decay=0.01)
    ref_w = w.detach().clone()
    ms, mom = torch.ones(5), torch.zeros(5)
    for _ in range(4):
        opt.zero_grad()
        loss = (w**2).sum() + w.sum()
        loss.backward()
        opt.step()
        g = 2 * ref_w + 1 + 0.01 * ref_w
        ms = 0.9 * ms + 0.1 * g * g
        mom = 0.9 * mom + 0.1 * g / torch.sqrt(ms + 1e-3)
        ref_w = ref_w - mom
    assert torch.allclose(w.detach(), ref_w, atol=1e-6)


def test_first_step_is_small_unlike_torch_rmsprop() -> None:
    # ms starts at 1, so the first step is about lr * g; torch's zero-initialised square average
    # with eps outside the root makes it lr * g / sqrt((1 - alpha) g^2), ten times larger here.
    w = torch.zeros(1, requires_grad=True)
    opt = RMSpropTF([w], lr=0.01, momentum=0.0)
    w.grad = torch.tensor([0.5])
    opt.step()
    assert w.item() == pytest.approx(-0.01 * 0.5 / math.sqrt(0.9 + 0.1 * 0.25 + 1e-3), rel=1e-5)
    v = torch.zeros(1, requires_grad=True)
    torch_opt = torch.optim.RMSprop([v], lr=0.01)
    v.grad = torch.tensor([0.5])
    torch_opt.step()
    assert abs(v.item()) > 5 * abs(w.item())


def test_norm_and_bias_parameters_get_no_weight_decay() -> None:
    model = mobilenet_v3_small(num_classes=4)
    decay, no_decay = param_groups_without_norm_and_bias_decay(model, 1e-5)
    assert decay["weight_decay"] == 1e-5 and no_decay["weight_decay"] == 0.0
    ids_no_decay = {id(p) for p in no_decay["params"]}
    assert id(model.stem.bn.weight) in ids_no_decay and id(model.stem.bn.bias) in ids_no_decay
    assert id(model.classifier.fc.bias) in ids_no_decay
    assert all(p.ndim > 1 for p in decay["params"])
    total = len(decay["params"]) + len(no_decay["params"])
    assert total == len(list(model.parameters()))


@pytest.mark.parametrize("name", ["rmsprop_tf", "sgd", "adamw"])
def test_every_optimizer_makes_the_loss_fall(name: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    opt = build_optimizer(
        model, name, lr={"rmsprop_tf": 0.01, "sgd": 0.1, "adamw": 0.01}[name], weight_decay=1e-4
    )
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_sgd_is_nesterov_and_unknown_name_fails() -> None:
    opt = build_optimizer(nn.Linear(2, 2), "sgd", lr=0.1)
    assert opt.param_groups[0]["nesterov"] is True
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        build_optimizer(nn.Linear(2, 2), "lamb", lr=0.1)


def test_warmup_then_paper_exponential_staircase() -> None:
    s = WarmupSchedule(
        "exponential",
        total_steps=1000,
        steps_per_epoch=10,
        warmup_steps=20,
        warmup_start_factor=0.0,
    )
    assert s(0) == 0.0 and s(10) == pytest.approx(0.5)
    assert s(20) == 1.0 and s(29) == 1.0  # 2 epochs < 3: no decay yet
    assert s(30) == pytest.approx(0.99)  # x0.99 every 3 epochs
    assert s(95) == pytest.approx(0.99**3)


def test_cosine_goes_from_one_to_min_factor() -> None:
    s = WarmupSchedule(
        "cosine", total_steps=110, steps_per_epoch=10, warmup_steps=10, min_factor=0.1
    )
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s(110) == pytest.approx(0.1)
    assert math.isclose(s(5), 0.01 + 0.99 * 0.5)


def test_scheduler_state_is_plain_and_loads_with_weights_only() -> None:
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, "sgd", lr=0.1)
    sched = build_scheduler(opt, "cosine", total_steps=100, steps_per_epoch=10, warmup_epochs=1)
    for _ in range(7):
        opt.step()
        sched.step()
    buffer = io.BytesIO()
    torch.save({"sched": sched.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    opt2 = build_optimizer(model, "sgd", lr=0.1)
    sched2 = build_scheduler(opt2, "cosine", total_steps=100, steps_per_epoch=10, warmup_epochs=1)
    sched2.load_state_dict(state["sched"])
    assert sched2.last_epoch == 7 and sched2.get_last_lr() == sched.get_last_lr()


def test_ema_follows_tensorflow_formula_and_copies_bn_stats() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    ema = ModelEma(model, decay=0.9)
    shadow = model[0].weight.detach().clone()
    for n in range(3):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model(torch.randn(2, 3, 4, 4))  # moves BN running stats
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        shadow = d * shadow + (1 - d) * model[0].weight.detach()
    assert torch.allclose(ema.module[0].weight, shadow, atol=1e-6)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)
    assert int(ema.num_updates) == 3
    assert not any(p.requires_grad for p in ema.parameters())
