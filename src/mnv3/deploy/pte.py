"""ExecuTorch ``.pte`` export with the XNNPACK delegate (fp32 or int8) and its Python runtime.

The phone path: ``torch.export`` -> (int8: ``XNNPACKQuantizer`` PT2E) ->
``to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])`` -> ``.pte``. Shapes are
static in the program, batch included (the example input's).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mnv3.deploy.common import ExportError, atomic_output, check_input_size, write_sidecar
from mnv3.deploy.quantize import quantize_ptq
from mnv3.models.detection.ssdlite import SSDLite


def export_pte(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: torch.Tensor,
    quantize: Literal["int8"] | None = None,
    calibration: Sequence[torch.Tensor] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Export a classifier to an ExecuTorch program at ``path`` with the XNNPACK delegate.

    Args:
        model: a classifier (detectors are refused: their NMS has no XNNPACK kernel, and the
            segmenter's resizes are untested here).
        path: the ``.pte`` file; written atomically, ``metadata`` as ``<path>.json``.
        example_input: the fixed ``(N, C, H, W)`` input shape of the program.
        quantize: None (fp32) or ``"int8"`` (``XNNPACKQuantizer``, per-channel symmetric
            weights, calibrated on ``calibration``).
        calibration: batches of preprocessed images, needed for int8.
        metadata: preprocessing and labels for the sidecar json.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    if isinstance(model, SSDLite) or getattr(model, "classifier", None) is None:
        raise ExportError(
            f"format=pte supports the classifier only, got a {type(model).__name__}; "
            "export detectors and segmenters with format=onnx"
        )
    if quantize not in (None, "int8"):
        raise ExportError(f"quantize={quantize!r} is not supported; expected null or int8")
    check_input_size(tuple(example_input.shape[-2:]))
    model = model.eval()
    if quantize == "int8":
        graph: nn.Module = quantize_ptq(model, example_input, calibration or [], "xnnpack")
    else:
        graph = model
    with torch.no_grad():
        program = torch.export.export(graph, (example_input,))
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    buffer = lowered.to_executorch().buffer
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_bytes(buffer)
        if metadata is not None:
            write_sidecar(
                path,
                {
                    **metadata,
                    "format": "pte",
                    "quantize": quantize,
                    "batch_size": int(example_input.shape[0]),
                    "outputs": ["logits"],
                },
            )
    return path


def load_pte(path: str | os.PathLike[str]) -> Any:
    """The ``forward`` method of an ExecuTorch program, ready to execute."""
    from executorch.runtime import Runtime

    return Runtime.get().load_program(str(path)).load_method("forward")


def run_pte(method: Any, images: torch.Tensor) -> torch.Tensor:
    """Logits of a loaded ``.pte`` method on a batch of the program's fixed size."""
    return method.execute([images.contiguous()])[0]
