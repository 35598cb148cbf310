"""int8 with torchao's PT2E flow: post-training (x86 / XNNPACK) and quantization-aware training.

torch 2.14.1 no longer ships ``torch.ao.quantization.quantize_pt2e``; the flow lives in torchao
(FACTS): export the network, ``prepare_pt2e`` inserts observers where the quantizer says,
calibration batches set their ranges, ``convert_pt2e`` turns them into quantize/dequantize
pairs. On x86 the converted graph is lowered to int8 kernels by ``torch.compile`` (Inductor
with freezing); for phones the same graph goes to ExecuTorch's XNNPACK delegate (:mod:`.pte`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from mnv3.deploy.common import ExportError

Backend = Literal["x86", "xnnpack"]


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


def check_calibration(calibration: Sequence[torch.Tensor]) -> None:
    """Refuse an empty calibration set with one sentence."""
    if not calibration or sum(int(b.shape[0]) for b in calibration) == 0:
        raise ExportError("the calibration set is empty; expected at least one image")


def quantize_ptq(
    model: nn.Module,
    example_input: torch.Tensor,
    calibration: Sequence[torch.Tensor],
    backend: Backend = "x86",
) -> torch.fx.GraphModule:
    """Post-training static int8: export, observe ``calibration`` batches, convert.

    Returns the converted graph (runs eagerly with quantize/dequantize ops; lower it with
    :func:`compile_int8` on x86 or :func:`mnv3.deploy.pte.export_pte` for XNNPACK). The batch
    size of ``example_input`` is the one the graph accepts for XNNPACK; the x86 graph is
    exported with a dynamic batch.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    check_calibration(calibration)
    model = copy.deepcopy(model).eval()
    dynamic = _batch_dim(example_input) if backend == "x86" else None
    if dynamic is not None:
        example_input = _two_rows(example_input)
    graph = torch.export.export(model, (example_input,), dynamic_shapes=dynamic).module()
    prepared = prepare_pt2e(graph, quantizer_for(backend))
    with torch.no_grad():
        for batch in calibration:
            for chunk in _fit_batch(batch, example_input, dynamic is not None):
                prepared(chunk)
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

    Exported in train mode so BatchNorm keeps updating; switch it with
    :func:`torchao.quantization.pt2e.move_exported_model_to_eval` before evaluating, else
    BatchNorm uses batch statistics in evaluation (one way PT2E QAT "collapses",
    pytorch#114859).
    """
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    model = copy.deepcopy(model).train()
    graph = torch.export.export(
        model, (_two_rows(example_input),), dynamic_shapes=_batch_dim(example_input)
    ).module()
    return prepare_qat_pt2e(graph, quantizer_for(backend, is_qat=True))


def qat_finetune(
    model: nn.Module,
    example_input: torch.Tensor,
    batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    epochs: int = 1,
    lr: float = 1e-4,
    freeze_bn_after: int | None = None,
    backend: Backend = "x86",
) -> torch.fx.GraphModule:
    """Quantization-aware fine-tuning of a classifier: prepare, train, convert.

    Args:
        model: the trained fp32 classifier.
        example_input: an input batch of the deployed size (its batch dimension stays free).
        batches: called once per epoch; yields ``(images, labels)`` training batches.
        epochs: passes over ``batches()``.
        lr: SGD (momentum 0.9) learning rate; small, since the weights are already trained.
        freeze_bn_after: steps after which BatchNorm statistics stop updating (the usual QAT
            recipe, so the folded scales settle); None: never.
        backend: the quantizer (``"x86"`` or ``"xnnpack"``).

    Returns the converted int8 graph in evaluation mode.
    """
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    prepared = prepare_qat(model, example_input, backend)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    step = 0
    for _ in range(int(epochs)):
        for images, labels in batches():
            if freeze_bn_after is not None and step >= freeze_bn_after:
                _freeze_bn_stats(prepared)
            loss = loss_fn(prepared(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    move_exported_model_to_eval(prepared)
    return convert_pt2e(prepared)


def _freeze_bn_stats(graph: torch.fx.GraphModule) -> None:
    """Keep BatchNorm running statistics fixed in an exported train-mode graph."""
    targets = (torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit.default)
    for node in graph.graph.nodes:
        if node.target in targets:
            # args of both: input, weight, bias, running_mean, running_var, training, momentum, ...
            args = list(node.args)
            args[6] = 0.0
            node.args = tuple(args)
    graph.recompile()


def _batch_dim(example_input: torch.Tensor) -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1, max=1024)},)


def _two_rows(example_input: torch.Tensor) -> torch.Tensor:
    """A batch of at least two: torch.export specialises a batch of one to a constant."""
    if example_input.shape[0] >= 2:
        return example_input
    return example_input.expand(2, *example_input.shape[1:]).contiguous()


def _fit_batch(
    batch: torch.Tensor, example_input: torch.Tensor, dynamic: bool
) -> Iterable[torch.Tensor]:
    """Calibration batches as the graph accepts them: whole, or split to its fixed batch size."""
    if dynamic:
        yield batch
        return
    size = int(example_input.shape[0])
    for start in range(0, int(batch.shape[0]) - size + 1, size):
        yield batch[start : start + size]


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """The fraction of rows whose argmax is the same in two logits tensors."""
    return float((a.argmax(dim=1) == b.argmax(dim=1)).float().mean())
