"""int8 with torchao's PT2E flow: post-training (x86 / XNNPACK) and quantization-aware training.

torch 2.14.1 no longer ships ``torch.ao.quantization.quantize_pt2e``; the flow lives in torchao
(FACTS): export the network, ``prepare_pt2e`` inserts observers where the quantizer says,
calibration batches set their ranges, ``convert_pt2e`` turns them into quantize/dequantize
pairs. On x86 the converted graph is lowered to int8 kernels by ``torch.compile`` (Inductor
with freezing); for phones the same graph goes to ExecuTorch's XNNPACK delegate (:mod:`.pte`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from mnv3.deploy.common import (
    ExportError,
    batch_dim,
    check_calibration,
    fixed_batches,
    two_rows,
)

Backend = Literal["x86", "xnnpack"]

log = logging.getLogger(__name__)


def quantizer_for(backend: Backend, is_qat: bool = False) -> Any:
    """The torchao / ExecuTorch quantizer of a backend, symmetric int8 per-channel weights."""
    if backend == "x86":
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

        return X86InductorQuantizer().set_global(
            get_default_x86_inductor_quantization_config(is_qat=is_qat)
        )
    if backend == "xnnpack":
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )

        return XNNPACKQuantizer().set_global(
            get_symmetric_quantization_config(is_per_channel=True, is_qat=is_qat)
        )
    raise ExportError(f"quantization backend {backend!r} is unknown; expected x86 or xnnpack")


def quantize_ptq(
    model: nn.Module,
    example_input: torch.Tensor,
    calibration: Sequence[torch.Tensor],
    backend: Backend = "x86",
    quantizer: Any | None = None,
) -> torch.fx.GraphModule:
    """Post-training static int8: export, observe ``calibration`` batches, convert.

    Returns the converted graph (runs eagerly with quantize/dequantize ops; lower it with
    :func:`compile_int8` on x86 or :func:`mnv3.deploy.pte.export_pte` for XNNPACK). The batch
    size of ``example_input`` is the one the graph accepts for XNNPACK; the x86 graph is
    exported with a dynamic batch. ``quantizer``: a configured PT2E quantizer to use instead
    of ``quantizer_for(backend)`` (e.g. one that annotates only the network of a detector);
    ``backend`` still decides the batch handling.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    check_calibration(calibration)
    model = copy.deepcopy(model).eval()
    dynamic = batch_dim(example_input) if backend == "x86" else None
    if dynamic is not None:
        example_input = two_rows(example_input)
    graph = torch.export.export(model, (example_input,), dynamic_shapes=dynamic).module()
    prepared = prepare_pt2e(graph, quantizer if quantizer is not None else quantizer_for(backend))
    feeds = calibration if dynamic is not None else fixed_batches(calibration, len(example_input))
    with torch.no_grad():
        for feed in feeds:
            prepared(feed)
    return convert_pt2e(prepared)


def compile_int8(converted: torch.fx.GraphModule) -> Callable[[torch.Tensor], torch.Tensor]:
    """Lower a converted x86 graph to Inductor's int8 kernels (constant weights frozen)."""
    import torch._inductor.config as inductor_config

    # Freezing folds the weight quantization into constants, which the int8 conv patterns need.
    inductor_config.freezing = True
    return torch.compile(converted)


def prepare_qat(
    model: nn.Module, example_input: torch.Tensor, backend: Backend = "x86"
) -> torch.fx.GraphModule:
    """A fake-quantized copy of ``model`` to fine-tune (torchao's ``prepare_qat_pt2e``).

    Exported in train mode so BatchNorm keeps updating. torchao 0.18 rewrites every BatchNorm
    with eps 1e-5 and momentum 0.1 whatever the model says (its QAT conv-bn patterns hard-code
    them, a TODO in ``qat_utils.py``; pytorch/ao#4107); MobileNetV3's eps 1e-3 lost that way is
    what made PT2E QAT collapse here (pytorch#114859), so the model's own values are written
    back. Switch the result with :func:`qat_to_eval`, not torchao's
    ``move_exported_model_to_eval`` alone, before evaluating or converting it.
    """
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    model = copy.deepcopy(model).train()
    graph = torch.export.export(
        model, (two_rows(example_input),), dynamic_shapes=batch_dim(example_input)
    ).module()
    literals = _batch_norm_literals(graph)
    prepared = prepare_qat_pt2e(graph, quantizer_for(backend, is_qat=True))
    _set_batch_norm_literals(prepared, literals)
    return prepared


def qat_to_eval(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Switch a :func:`prepare_qat` graph to evaluation, ready for ``convert_pt2e``, in place.

    torchao's ``move_exported_model_to_eval`` and the conv-bn folding in ``convert_pt2e`` both
    assume BatchNorm eps 1e-5. Each running variance is shifted by ``eps - 1e-5`` first, so
    ``sqrt(running_var + 1e-5)`` is the model's ``sqrt(running_var + eps)`` exactly; after this
    the graph is for evaluation only (training it again would update the shifted statistics).
    """
    from torchao.quantization.pt2e import move_exported_model_to_eval

    literals = _batch_norm_literals(prepared)
    with torch.no_grad():
        for target, (_, eps) in literals.items():
            prepared.get_buffer(target).add_(eps - _TORCHAO_BN_EPS)
    _set_batch_norm_literals(
        prepared,
        {target: (momentum, _TORCHAO_BN_EPS) for target, (momentum, _) in literals.items()},
    )
    move_exported_model_to_eval(prepared)
    return prepared


def qat_finetune(
    model: nn.Module,
    example_input: torch.Tensor,
    batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    epochs: int = 1,
    lr: float = 1e-4,
    freeze_bn_after: int | None = None,
    backend: Backend = "x86",
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
) -> torch.fx.GraphModule:
    """Quantization-aware fine-tuning: prepare, train, convert.

    Args:
        model: the trained fp32 network (a classifier, or any module of ``images``).
        example_input: an input batch of the deployed size (its batch dimension stays free).
        batches: called once per epoch; yields ``(images, targets)`` training batches.
        epochs: passes over ``batches()``.
        lr: SGD (momentum 0.9) learning rate; small, since the weights are already trained.
        freeze_bn_after: steps after which BatchNorm statistics stop updating (the usual QAT
            recipe, so the folded scales settle); None: never.
        backend: the quantizer (``"x86"`` or ``"xnnpack"``).
        loss_fn: ``loss_fn(outputs, targets)``; None: cross-entropy on class labels. A
            detector passes its own (e.g. SSDLite's matching loss on the network's raw
            ``(cls_logits, bbox_regression)``).

    Returns the converted int8 graph in evaluation mode.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    prepared = prepare_qat(model, example_input, backend)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=lr, momentum=0.9)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    step = 0
    for _ in range(int(epochs)):
        for images, targets in batches():
            if freeze_bn_after is not None and step == freeze_bn_after:
                _freeze_bn_stats(prepared)
            loss = loss_fn(prepared(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return convert_pt2e(qat_to_eval(prepared))


def qat_network(
    task: Any,
    network: nn.Module,
    datamodule: Any,
    example: torch.Tensor,
    steps: int,
    lr: float,
    backend: Backend = "xnnpack",
) -> torch.fx.GraphModule:
    """The int8 graph of ``task.qat_objective(network, example).network`` from
    quantization-aware training on ``steps`` batches of the training split (``datamodule`` set
    up for "fit"): at lr 0 the weights stay and only the moving-average activation ranges are
    learnt (what keeps SSDLite's mAP, docs/deployment.md); above 0 the weights are fine-tuned too
    (BatchNorm statistics frozen halfway). ``backend``: ``"xnnpack"`` (``.pte``) or ``"x86"``.

    ``task``: the trained task (:meth:`mnv3.tasks.base.BaseTask.qat_objective` gives the loss
    and how a batch feeds it), so the task's own loss drives the fine-tuning.
    """
    objective = task.qat_objective(network, example)

    def batches() -> Iterable[tuple[torch.Tensor, Any]]:
        for i, batch in enumerate(datamodule.train_dataloader()):
            if i >= steps:
                return
            yield objective.inputs(batch)

    log.info("quantization-aware training: %d batches at lr %g", steps, lr)
    return qat_finetune(
        objective.network,
        example,
        batches,
        lr=lr,
        freeze_bn_after=0 if lr == 0 else steps // 2,
        backend=backend,
        loss_fn=objective.loss,
    )


# torchao 0.18's QAT conv-bn patterns and its train/eval rewrites write this eps into the graph.
_TORCHAO_BN_EPS = 1e-5
_BATCH_NORM = (torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit.default)


def _running_var_target(node: torch.fx.Node, position: int) -> str | None:
    """The buffer name of ``node.args[position]`` when it is a BatchNorm running variance."""
    arg = node.args[position] if len(node.args) > position else None
    if (
        isinstance(arg, torch.fx.Node)
        and arg.op == "get_attr"
        and str(arg.target).endswith("running_var")
    ):
        return str(arg.target)
    return None


def _batch_norm_literals(graph: torch.fx.GraphModule) -> dict[str, tuple[float, float]]:
    """Running-variance buffer -> (momentum, eps) of every training-mode BatchNorm node."""
    literals = {}
    for node in graph.graph.nodes:
        # args of both: input, weight, bias, running_mean, running_var, training, momentum, eps
        if node.op == "call_function" and node.target in _BATCH_NORM:
            target = _running_var_target(node, 4)
            if target is not None and node.args[5]:
                literals[target] = (float(node.args[6]), float(node.args[7]))
    return literals


def _set_batch_norm_literals(
    graph: torch.fx.GraphModule, literals: dict[str, tuple[float, float]]
) -> None:
    """Write (momentum, eps) into the BatchNorm nodes of each running variance, and eps into
    the ``running_var + eps`` of torchao's QAT conv-bn pattern (its weight scale)."""
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _BATCH_NORM:
            target = _running_var_target(node, 4)
            if target in literals:
                args = list(node.args)
                args[6], args[7] = literals[target]
                node.args = tuple(args)
        elif node.target == torch.ops.aten.add.Tensor and isinstance(node.args[1], float):
            target = _running_var_target(node, 0)
            if target in literals:
                node.args = (node.args[0], literals[target][1])
    graph.recompile()


def _freeze_bn_stats(graph: torch.fx.GraphModule) -> None:
    """Keep BatchNorm running statistics fixed in an exported train-mode graph."""
    for node in graph.graph.nodes:
        if node.target in _BATCH_NORM:
            args = list(node.args)
            args[6] = 0.0
            node.args = tuple(args)
    graph.recompile()


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """The fraction of rows whose argmax is the same in two logits tensors."""
    return float((a.argmax(dim=1) == b.argmax(dim=1)).float().mean())
