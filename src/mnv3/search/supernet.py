"""A weight-sharing supernet over a :class:`~mnv3.search.space.SearchSpace` (Once-for-All style).

The supernet is the space's largest network, built by the normal backbone code: per stage its
deepest depth, widest width, largest kernel and expansion, SE wherever SE is a choice. A
candidate (a decision vector) runs on *slices* of its weights (Cai et al., ICLR 2020: elastic
depth = the first blocks of each stage, elastic width and expansion = the leading channels,
elastic kernel = the kernel's centre): the candidate's own stand-alone network is built once
(:func:`mnv3.models.backbone.build_backbone`, cached) and called through
:func:`torch.func.functional_call` with views into the supernet's parameters and BN buffers, so
gradients and running statistics land in the shared weights, and the candidate is exactly the
network its table builds. :meth:`SuperNet.subnet` copies the slices into that stand-alone network
(the test checks both give the same outputs).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from mnv3.models.backbone import build_backbone
from mnv3.models.block_table import table_to_plain
from mnv3.models.layers import make_divisible
from mnv3.models.mobilenet import MobileNet
from mnv3.models.mobilenetv3 import Bneck, V3Table
from mnv3.search.space import SearchSpace


def largest_table(space: SearchSpace) -> V3Table:
    """The space's largest network: every stage at its deepest, widest, largest kernel and
    expansion, with SE where SE is a choice (the supernet's shape)."""
    rows: list[Bneck] = []
    width_in = space.stem
    for stage in space.stages:
        width = max(stage.widths)
        ratio = max(float(e) for e in stage.expansions)
        for b in range(stage.max_depth):
            exp = width_in if ratio == 1 else max(8, make_divisible(width_in * ratio, 8))
            rows.append(
                Bneck(
                    max(stage.kernels),
                    exp,
                    width,
                    any(stage.se),
                    stage.nl[0],  # type: ignore[arg-type]  # parameter-free: any will do
                    stage.stride if b == 0 else 1,
                )
            )
            width_in = width
    return V3Table(f"{space.name}_supernet", tuple(rows), space.stem, space.last, space.head)


def _slice(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A view of ``tensor`` with ``shape``: leading channels on dims 0 and 1, the centre of
    the kernel on dims 2 and 3."""
    if tensor.shape == shape:
        return tensor
    index: list[slice] = []
    for dim, (big, small) in enumerate(zip(tensor.shape, shape, strict=True)):
        if dim >= 2:  # kernel: the centre (a 3x3 inside a 5x5)
            start = (big - small) // 2
            index.append(slice(start, start + small))
        else:
            index.append(slice(0, small))
    return tensor[tuple(index)]


class SuperNet(nn.Module):
    """The space's largest network; candidates run on its weights' slices."""

    def __init__(
        self,
        space: SearchSpace,
        num_classes: int,
        dropout: float = 0.2,
        bn_momentum: float | None = None,
        in_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.space = space
        self.options = {
            "num_classes": num_classes,
            "dropout": dropout,
            "bn_momentum": bn_momentum,
            "in_channels": in_channels,
        }
        self.network = self._build(largest_table(space))
        offsets, at = [], 0
        for stage in space.stages:
            offsets.append(at)
            at += stage.max_depth
        self._offsets = offsets
        self._structures: dict[V3Table, MobileNet] = {}

    def _build(self, table: V3Table) -> MobileNet:
        options = {k: v for k, v in self.options.items() if v is not None}
        return build_backbone("mobilenet_v3", table=table_to_plain(table), **options)

    def _block_map(self, choices: Sequence[int]) -> list[int]:
        """For each block of the candidate, its block in the supernet (the stage's first d)."""
        depth_choice = {
            d.stage: int(c)
            for d, c in zip(self.space.decisions, choices, strict=True)
            if d.kind == "depth"
        }
        blocks: list[int] = []
        for s, stage in enumerate(self.space.stages):
            depth = stage.depths[depth_choice[s]]
            blocks += [self._offsets[s] + b for b in range(depth)]
        return blocks

    def _structure(self, table: V3Table) -> MobileNet:
        """The candidate's stand-alone network (its module tree; weights come from slices)."""
        if table not in self._structures:
            if len(self._structures) > 256:  # a long search: keep memory bounded
                self._structures.clear()
            self._structures[table] = self._build(table)
        return self._structures[table]

    def sliced_state(self, choices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The candidate's parameters and buffers as views into the supernet's."""
        table = self.space.table(choices)
        structure = self._structure(table)
        block_map = self._block_map(choices)
        shared = dict(self.network.named_parameters()) | dict(self.network.named_buffers())
        state: dict[str, torch.Tensor] = {}
        own = dict(structure.named_parameters()) | dict(structure.named_buffers())
        for name, tensor in own.items():
            source = name
            if name.startswith("blocks."):
                _, j, rest = name.split(".", 2)
                source = f"blocks.{block_map[int(j)]}.{rest}"
            state[name] = _slice(shared[source], tensor.shape)
        return state

    def forward(self, x: torch.Tensor, choices: Sequence[int]) -> torch.Tensor:
        """The candidate ``choices`` on ``x``, computed with the shared weights."""
        structure = self._structure(self.space.table(choices))
        structure.train(self.training)
        return functional_call(structure, self.sliced_state(choices), (x,))

    def subnet(self, choices: Sequence[int], name: str = "searched") -> MobileNet:
        """The candidate as a stand-alone network holding a copy of its slices."""
        network = self._build(self.space.table(choices, name))
        state = {k: v.detach().clone() for k, v in self.sliced_state(choices).items()}
        network.load_state_dict(state)
        return network


def extreme_choices(space: SearchSpace, largest: bool) -> list[int]:
    """The decisions of the space's largest (or smallest) network: deepest / shallowest,
    widest / narrowest, largest / smallest kernel and expansion, SE on / off where it is a
    choice (the two ends the sandwich rule trains every step)."""
    pick = max if largest else min
    out: list[int] = []
    for d in space.decisions:
        stage = space.stages[d.stage]
        options = {
            "depth": stage.depths,
            "width": stage.widths,
            "kernel": stage.kernels,
            "expansion": [float(e) for e in stage.expansions],
            "se": stage.se,
            "nl": [0] * len(stage.nl),  # parameter-free: the first
        }[d.kind]
        out.append(options.index(pick(options)))
    return out


def sandwich(space: SearchSpace, rng: random.Random, randoms: int = 2) -> list[list[int]]:
    """One step's candidates under the sandwich rule (Yu & Huang, ICCV 2019; used by
    Once-for-All and BigNAS): the largest, the smallest and ``randoms`` random ones."""
    return [
        extreme_choices(space, largest=True),
        extreme_choices(space, largest=False),
        *(space.sample(rng) for _ in range(randoms)),
    ]


@torch.no_grad()
def calibrate_bn(
    supernet: SuperNet, choices: Sequence[int], images: Iterable[torch.Tensor]
) -> None:
    """Re-estimate the candidate's BN statistics on ``images`` (a few training batches).

    Shared running statistics are a mixture of every candidate trained; a candidate is scored
    after its own are measured (Once-for-All §3.2): reset, then a cumulative average over the
    batches, in train mode without gradients. The statistics land in the supernet's buffers
    (the candidate's slices), so calibrate again before scoring another candidate."""
    structure = supernet._structure(supernet.space.table(choices))
    state = supernet.sliced_state(choices)
    momenta = {}
    for name, module in structure.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            state[f"{name}.running_mean"].zero_()
            state[f"{name}.running_var"].fill_(1.0)
            state[f"{name}.num_batches_tracked"].zero_()
            momenta[module] = module.momentum
            module.momentum = None  # cumulative moving average
    try:
        structure.train()
        device = next(supernet.parameters()).device
        for batch in images:
            functional_call(structure, state, (batch.to(device),))
    finally:
        for module, momentum in momenta.items():
            module.momentum = momentum
        structure.train(supernet.training)


@torch.no_grad()
def supernet_accuracy(
    supernet: SuperNet,
    choices: Sequence[int],
    calibration: Iterable[torch.Tensor],
    held_out: Iterable[Mapping[str, torch.Tensor]],
) -> float:
    """Top-1 of candidate ``choices`` on ``held_out`` batches (``image``, ``label``), scored
    with the shared weights after its own BN statistics are measured on ``calibration`` images
    (:func:`calibrate_bn`): how the block search ranks candidates without training them."""
    was_training = supernet.training
    device = next(supernet.parameters()).device
    supernet.eval()
    try:
        calibrate_bn(supernet, choices, calibration)
        correct = total = 0
        for batch in held_out:
            logits = supernet(batch["image"].to(device), choices)
            correct += int((logits.argmax(1).cpu() == batch["label"]).sum())
            total += len(batch["label"])
    finally:
        supernet.train(was_training)
    if not total:
        raise ValueError("the held-out split is empty; expected at least one labelled image")
    return correct / total


class SandwichNetwork(nn.Module):
    """A supernet as a task's network: it runs the ``active`` candidate (the largest when none
    is set, e.g. for validation), so a task's own step, loss and metrics drive it unchanged."""

    def __init__(self, supernet: SuperNet) -> None:
        super().__init__()
        self.supernet = supernet
        self.largest = extreme_choices(supernet.space, largest=True)
        self.active: list[int] | None = None

    def backbone_modules(self) -> list[nn.Module]:
        """The shared feature extractor (what fine-tuning recipes treat as the backbone)."""
        return self.supernet.network.backbone_modules()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.supernet(x, self.active if self.active is not None else self.largest)


def sandwich_task(task_cls: type) -> type:
    """``task_cls`` (a :class:`mnv3.tasks.base.BaseTask`, e.g. the classification task) whose
    network is a :class:`SuperNet` over ``model["space"]`` and whose training step is the
    task's own step run once per sandwich candidate, their losses summed (one optimizer step
    for all: the sandwich rule). Validation and test score the largest candidate. Built with
    the task's ``from_config``: the space comes from ``search.space`` in the run's config."""

    class SandwichTask(task_cls):  # type: ignore[misc, valid-type]
        randoms = 2

        @classmethod
        def network_kwargs(cls, cfg: Any) -> dict[str, Any]:
            backbone = cfg["backbone"]
            return {
                "space": dict(cfg["search"]["space"]),
                "dropout": cfg["head"].get("dropout", 0.2),
                "bn_momentum": backbone.get("bn_momentum"),
                "randoms": int(cfg["search"].get("sandwich_randoms", 2)),
            }

        @classmethod
        def build_network(cls, model: dict[str, Any]) -> nn.Module:
            space = SearchSpace.from_config(model["space"])
            supernet = SuperNet(
                space,
                int(model["num_classes"]),
                dropout=float(model.get("dropout", 0.2)),
                bn_momentum=model.get("bn_momentum"),
            )
            network = SandwichNetwork(supernet)
            network.randoms = int(model.get("randoms", 2))  # type: ignore[assignment]
            return network

        def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
            rng = random.Random(self.global_step * 7919 + batch_idx)
            total = None
            try:
                for choices in sandwich(self.model.supernet.space, rng, self.model.randoms):
                    self.model.active = choices
                    loss = super().training_step(batch, batch_idx)
                    if loss is None:
                        return None
                    total = loss if total is None else total + loss
            finally:
                self.model.active = None
            return total

    SandwichTask.__name__ = SandwichTask.__qualname__ = f"Sandwich{task_cls.__name__}"
    return SandwichTask
