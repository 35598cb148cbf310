"""ExecuTorch ``.pte`` export of the three heads with the XNNPACK delegate, and its runners.

The phone path: ``torch.export`` -> (int8: ``XNNPACKQuantizer`` PT2E) ->
``to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])`` -> ``.pte``. Shapes are
static in the program, batch included (the example input's).

What the program returns is what ONNX exports (:func:`mnv3.deploy.onnx_export.program_module`):
a classifier's logits, LR-ASPP's logits at the input size, SSDLite's decoded boxes and class
scores (:class:`DetectorForExport`); top-k, score threshold and per-class NMS run after it
(:func:`run_pte_detector`). XNNPACK takes every convolution, pooling, resize and activation and
the decoder's exp / clamp / softmax / stack; what it leaves (the decoder's index ``select`` /
``slice``, copies of scalar constants) runs on ExecuTorch's portable kernels, listed in the
sidecar's ``xnnpack`` entry so a phone build knows which kernels to link.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mnv3.deploy.common import (
    ExportError,
    atomic_output,
    check_input_size,
    postprocess_detections,
    write_sidecar,
)
from mnv3.deploy.onnx_export import DetectorForExport, postprocess_metadata, program_module
from mnv3.deploy.quantize import quantize_ptq, quantizer_for

PTE_DETECTOR_RUNNER = "mnv3.deploy.run_pte_detector"


def export_pte(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: torch.Tensor,
    quantize: Literal["int8"] | None = None,
    calibration: Sequence[torch.Tensor] | None = None,
    metadata: Mapping[str, Any] | None = None,
    quantized_network: nn.Module | None = None,
) -> Path:
    """Export a classifier, an SSDLite or a segmenter to an ExecuTorch program at ``path``.

    Args:
        model: a classifier (returns logits), a segmenter (logits at the input size) or an
            ``SSDLite`` (exported as :class:`DetectorForExport`: boxes and scores; an already
            wrapped ``DetectorForExport`` is taken as is).
        path: the ``.pte`` file; written atomically, ``metadata`` as ``<path>.json``.
        example_input: the fixed ``(N, C, H, W)`` input shape of the program.
        quantize: None (fp32) or ``"int8"`` (``XNNPACKQuantizer``, per-channel symmetric
            weights, calibrated on ``calibration``). A detector's box decoding and softmax stay
            in float: 8-bit pixel coordinates and probabilities cost mAP (docs/deployment.md's ONNX
            QDQ measurement), so only the ops inside the network's modules are quantized.
        calibration: batches of preprocessed images, needed for int8.
        metadata: preprocessing and labels for the sidecar json; ``outputs`` (what the program
            returns), the XNNPACK delegation and, for a detector, ``postprocess`` are added.
        quantized_network: the network already quantized for XNNPACK (the converted graph of
            :func:`mnv3.deploy.qat_finetune` with ``backend="xnnpack"``: the model itself, or a
            detector's :class:`DetectorNetwork`), lowered instead of calibrating ``model``;
            needs ``quantize="int8"``.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    if example_input.dim() != 4:
        raise ExportError(
            f"example input has shape {tuple(example_input.shape)}; expected (N, C, H, W)"
        )
    if quantize not in (None, "int8"):
        raise ExportError(f"quantize={quantize!r} is not supported; expected null or int8")
    input_size = check_input_size(tuple(example_input.shape[-2:]), model)
    module, output_names = program_module(model.eval(), input_size)
    graph = _lowered_graph(module, example_input, quantize, calibration, quantized_network)
    with torch.no_grad():
        program = torch.export.export(graph, (example_input,))
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    # Counted before to_executorch(), which adds its memory-planning ops to the graph.
    delegation = xnnpack_delegation(lowered.exported_program().graph_module)
    buffer = lowered.to_executorch().buffer
    with atomic_output(path) as tmp:
        tmp.write_bytes(buffer)
        if metadata is not None:
            sidecar = {
                **metadata,
                "format": "pte",
                "quantize": quantize,
                "batch_size": int(example_input.shape[0]),
                "outputs": output_names,
                "xnnpack": delegation,
            }
            write_sidecar(path, _with_postprocess(sidecar, module))
    return Path(path)


def _with_postprocess(sidecar: dict[str, Any], module: nn.Module) -> dict[str, Any]:
    """A detector's sidecar gains what runs after the program (NMS) and the runner to use."""
    if isinstance(module, DetectorForExport):
        post = sidecar.get("postprocess") or postprocess_metadata(module.detector)
        sidecar["postprocess"] = {**post, "runner": PTE_DETECTOR_RUNNER}
    return sidecar


def _lowered_graph(
    module: nn.Module,
    example_input: torch.Tensor,
    quantize: Literal["int8"] | None,
    calibration: Sequence[torch.Tensor] | None,
    quantized_network: nn.Module | None,
) -> nn.Module:
    """What is handed to XNNPACK: ``module`` (fp32), its int8 graph calibrated on
    ``calibration``, or the QAT-quantized network (in a detector's decoding wrapper)."""
    if quantized_network is not None:
        if quantize != "int8":
            raise ExportError("a quantized network is exported with quantize='int8' only")
        from torchao.quantization.pt2e import allow_exported_model_train_eval

        # A converted graph refuses .eval(); this makes it a no-op (no dropout / BN left).
        allow_exported_model_train_eval(quantized_network)
        if isinstance(module, DetectorForExport):
            input_size = module.input_size
            return DetectorForExport(module.detector, input_size, network=quantized_network).eval()
        return quantized_network
    if quantize == "int8":
        quantizer = network_quantizer() if isinstance(module, DetectorForExport) else None
        return quantize_ptq(
            module, example_input, calibration or [], "xnnpack", quantizer=quantizer
        )
    return module


def inside_network(node: torch.fx.Node) -> bool:
    """True for an op run inside a submodule (the detector's network), False for the wrapper's
    own ops (box decoding, softmax). Weights and constants carry no module stack: they go with
    the ops that use them."""
    stack = node.meta.get("nn_module_stack")
    return not stack or any(name not in ("", "L['self']") for name, _ in stack.values())


def network_quantizer() -> Any:
    """``XNNPACKQuantizer`` (as :func:`quantizer_for`) restricted to :func:`inside_network`."""
    return quantizer_for("xnnpack").set_filter_function(inside_network)


def xnnpack_delegation(graph_module: torch.fx.GraphModule) -> dict[str, Any]:
    """How much of a lowered program XNNPACK runs: ``delegated_ops`` (edge ops inside its
    subgraphs), ``subgraphs``, and ``portable_ops``: op type -> count of the ops left to
    ExecuTorch's portable kernels (what a phone build must link besides XNNPACK).

    ``graph_module``: ``to_edge_transform_and_lower(...).exported_program().graph_module``.
    The delegate's own output unpacking (``getitem``) is bookkeeping, not an op, and not counted.
    """
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    portable = {
        row.op_type: int(row.non_delegated)
        for row in info.delegation_by_operator.values()
        if row.non_delegated and row.op_type != "getitem"
    }
    return {
        "delegated_ops": int(info.num_delegated_nodes),
        "subgraphs": int(info.num_delegated_subgraphs),
        "portable_ops": dict(sorted(portable.items())),
    }


def load_pte(path: str | os.PathLike[str]) -> Any:
    """The ``forward`` method of an ExecuTorch program, ready to execute."""
    from executorch.runtime import Runtime

    return Runtime.get().load_program(str(path)).load_method("forward")


def run_pte_outputs(method: Any, images: torch.Tensor) -> list[torch.Tensor]:
    """All outputs of a loaded ``.pte`` method on ``(N, C, H, W)`` images, any N: fed in chunks
    of the program's fixed batch (the last one padded with zeros, dropped from the outputs)."""
    shape = tuple(method.metadata.input_tensor_meta(0).sizes())
    if images.dim() != 4 or tuple(images.shape[1:]) != shape[1:]:
        raise ValueError(
            f"images have shape {tuple(images.shape)}; the program takes (N, "
            f"{', '.join(str(s) for s in shape[1:])}) batches"
        )
    batch, count = shape[0], int(images.shape[0])
    chunks: list[list[torch.Tensor]] = []
    for start in range(0, count, batch):
        chunk = images[start : start + batch].float()
        if chunk.shape[0] < batch:
            pad = chunk.new_zeros(batch - chunk.shape[0], *chunk.shape[1:])
            chunk = torch.cat([chunk, pad])
        chunks.append(list(method.execute([chunk.contiguous()])))
    return [torch.cat(outs)[:count] for outs in zip(*chunks, strict=True)]


def run_pte(method: Any, images: torch.Tensor) -> torch.Tensor:
    """Logits of a loaded classifier or segmenter ``.pte`` on ``(N, C, H, W)`` images, any N."""
    return run_pte_outputs(method, images)[0]


def run_pte_detector(
    method: Any,
    images: torch.Tensor,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    **thresholds: Any,
) -> list[dict[str, torch.Tensor]]:
    """Detections from a loaded SSDLite ``.pte``, post-processed as ``SSDLite.postprocess`` does.

    ``images``: the resized, normalised ``(N, 3, H, W)`` batch, any N; ``image_sizes``: each
    image's original (h, w) to scale the boxes into (default: the input size); ``thresholds``:
    :func:`~mnv3.deploy.common.postprocess_detections`' (the sidecar's ``postprocess`` values
    are the model's). Returns per image ``{boxes, scores, labels}`` (labels count the
    background as 0, as the model's).
    """
    boxes, scores = run_pte_outputs(method, images)
    input_size = (int(images.shape[-2]), int(images.shape[-1]))
    return postprocess_detections(boxes, scores, input_size, image_sizes, **thresholds)
