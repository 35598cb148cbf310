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

The network need not be a classifier: ``build`` makes any task's network from a table (a
segmenter, LR-ASPP; a detector, SSDLite), and the same slicing covers its head. Its taps come
from the candidate's own table (:func:`mnv3.models.mobilenet.feature_taps`), and a head conv
reading a tap of fewer channels takes the leading input channels of the largest network's, as a
backbone conv does.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
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


def _blocks_prefix(network: nn.Module) -> str:
    """Where the backbone's blocks are named in ``network``: ``blocks.`` in a classifier,
    ``backbone.blocks.`` in a segmenter or detector (its first :class:`MobileNet`)."""
    for name, module in network.named_modules():
        if isinstance(module, MobileNet):
            return f"{name}.blocks." if name else "blocks."
    raise TypeError(f"{type(network).__name__} holds no MobileNet backbone to slice")


class SuperNet(nn.Module):
    """The space's largest network; candidates run on its weights' slices.

    ``build``: a table -> the task's network of it (all of it: backbone and head), e.g. a
    segmenter; None builds a classifier with ``num_classes``, ``dropout``, ``bn_momentum`` and
    ``in_channels``."""

    def __init__(
        self,
        space: SearchSpace,
        num_classes: int,
        dropout: float = 0.2,
        bn_momentum: float | None = None,
        in_channels: int | None = None,
        build: Callable[[V3Table], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.space = space
        self.options = {
            "num_classes": num_classes,
            "dropout": dropout,
            "bn_momentum": bn_momentum,
            "in_channels": in_channels,
        }
        self._builder = build
        self.network = self._build(largest_table(space))
        self._blocks = _blocks_prefix(self.network)
        offsets, at = [], 0
        for stage in space.stages:
            offsets.append(at)
            at += stage.max_depth
        self._offsets = offsets
        self._structures: dict[V3Table, nn.Module] = {}

    def _build(self, table: V3Table) -> nn.Module:
        if self._builder is not None:
            return self._builder(table)
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

    def _structure(self, table: V3Table) -> nn.Module:
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
            if name.startswith(self._blocks):
                j, rest = name[len(self._blocks) :].split(".", 1)
                source = f"{self._blocks}{block_map[int(j)]}.{rest}"
            state[name] = _slice(shared[source], tensor.shape)
        return state

    def forward(self, x: torch.Tensor, choices: Sequence[int]) -> Any:
        """The candidate ``choices`` on ``x``, computed with the shared weights."""
        structure = self._structure(self.space.table(choices))
        structure.train(self.training)
        return functional_call(structure, self.sliced_state(choices), (x,))

    def subnet(self, choices: Sequence[int], name: str = "searched") -> nn.Module:
        """The candidate as a stand-alone network (backbone and head) holding a copy of its
        slices."""
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


def scoring_trainer(root: str, accelerator: str = "cpu") -> Any:
    """A quiet Lightning trainer that only validates (no logger, checkpoints or progress bar):
    what :func:`supernet_accuracy` runs a task's validation with, built once per search.
    ``root``: where the task's own validation side products (its pictures) go."""
    import pytorch_lightning as pl

    return pl.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )


class _Batches:
    """Batches held in memory, as one loader (Lightning reads a list as a list of loaders)."""

    def __init__(self, batches: Sequence[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def supernet_accuracy(
    task: Any,
    choices: Sequence[int],
    calibration: Iterable[torch.Tensor],
    held_out: Iterable[Any],
    trainer: Any,
) -> float:
    """The task's own validation metric (``task.monitor``: top-1 for classification, mIoU for
    segmentation, mAP for detection) of candidate ``choices`` on ``held_out`` batches, scored
    with the shared weights after its own BN statistics are measured on ``calibration`` images
    (:func:`calibrate_bn`): how the block search ranks candidates without training them.

    ``task``: a :func:`sandwich_task` task; its validation step runs unchanged through
    ``trainer`` (:func:`scoring_trainer`) with ``choices`` active, so the score is
    the metric a stand-alone training of the candidate would monitor. Higher must be better
    (the MnasNet reward multiplies it): a task monitoring a loss is refused."""
    if task.monitor_mode != "max":
        raise ValueError(
            f"{type(task).__name__} monitors {task.monitor} ({task.monitor_mode}); the search's "
            "reward needs a metric where higher is better"
        )
    network = task.evaluated_network  # a SandwichNetwork (the EMA copy when the run keeps one)
    was_training = network.training
    network.to(trainer.strategy.root_device)  # calibrated where it is scored
    try:
        network.eval()
        calibrate_bn(network.supernet, choices, calibration)
        network.active = list(choices)
        loader = _Batches(held_out) if isinstance(held_out, list | tuple) else held_out
        results = trainer.validate(task, dataloaders=loader, verbose=False)
    finally:
        network.active = None
        network.train(was_training)
    value = results[0].get(task.monitor) if results else None
    if value is None:
        raise ValueError(
            f"the held-out split gave no {task.monitor}; expected at least one labelled batch"
        )
    return float(value)


class SandwichNetwork(nn.Module):
    """A supernet as a task's network: it runs the ``active`` candidate (the largest when none
    is set, e.g. for validation), so a task's own step, loss and metrics drive it unchanged.

    Other attributes a task reads from its network are the largest network's: right for what
    holds no weights (a detector's ``loss`` and ``postprocess``, given the candidate's outputs);
    whatever runs weights goes through :meth:`forward`, the candidate's."""

    def __init__(self, supernet: SuperNet) -> None:
        super().__init__()
        self.supernet = supernet
        self.largest = extreme_choices(supernet.space, largest=True)
        self.active: list[int] | None = None

    def backbone_modules(self) -> list[nn.Module]:
        """The shared feature extractor (what fine-tuning recipes treat as the backbone)."""
        from mnv3.tasks.base import backbone_modules

        return backbone_modules(self.supernet.network)

    def forward(self, x: torch.Tensor) -> Any:
        return self.supernet(x, self.active if self.active is not None else self.largest)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "supernet":  # not built yet: no network to ask
                raise
            return getattr(self.supernet.network, name)


def sandwich_task(task_cls: type) -> type:
    """``task_cls`` (a :class:`mnv3.tasks.base.BaseTask`: classification, segmentation,
    detection) whose
    network is a :class:`SuperNet` over ``model["space"]`` and whose training step is the
    task's own step run once per sandwich candidate, their losses summed (one optimizer step
    for all: the sandwich rule). Validation and test score the largest candidate. Built with
    the task's ``from_config``: the space comes from ``search.space`` in the run's config.

    The network is the task's own (``task_cls.network_kwargs`` and ``build_network``) with the
    backbone group's ``table`` replaced by each candidate's: a classifier, or a segmenter or
    detector whose head reads the candidate's taps. The space fixes widths, kernels and SE, so
    the backbone group's ``width_mult`` and ``minimal`` do not apply; the supernet starts from
    scratch (``backbone.weights`` and ``head.weights`` are not loaded)."""

    class SandwichTask(task_cls):  # type: ignore[misc, valid-type]
        randoms = 2

        @classmethod
        def network_kwargs(cls, cfg: Any) -> dict[str, Any]:
            search = cfg["search"]
            space = SearchSpace.from_config(search["space"])
            backbone = {
                **cfg["backbone"],
                "name": "mobilenet_v3",
                "table": table_to_plain(largest_table(space)),
                "width_mult": 1.0,
                "minimal": False,
                "weights": None,
            }
            head = {**cfg["head"], "weights": None}
            model = task_cls.network_kwargs({**cfg, "backbone": backbone, "head": head})
            return {
                **model,
                "space": dict(search["space"]),
                "randoms": int(search.get("sandwich_randoms", 2)),
            }

        @classmethod
        def build_network(cls, model: dict[str, Any]) -> nn.Module:
            model = dict(model)
            space = SearchSpace.from_config(model.pop("space"))
            randoms = int(model.pop("randoms", 2))

            def build(table: V3Table) -> nn.Module:
                return task_cls.build_network({**model, "table": table_to_plain(table)})

            supernet = SuperNet(space, int(model["num_classes"]), build=build)
            network = SandwichNetwork(supernet)
            network.randoms = randoms  # type: ignore[assignment]
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
