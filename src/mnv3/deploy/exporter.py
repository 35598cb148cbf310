"""One entry to every deployment file: format (ONNX, ExecuTorch, AOTInductor) x precision.

:func:`export_network` chooses the exporter, so ``mnv3.export`` and the benchmarks never branch
on the format themselves: ONNX fp32 (:func:`~mnv3.deploy.onnx_export.export_onnx`), ONNX int8
(an fp32 export, then onnxruntime static QDQ, :func:`~mnv3.deploy.onnx_export.quantize_onnx`),
and ExecuTorch ``.pte`` fp32 or int8 (:func:`~mnv3.deploy.pte.export_pte`; int8 from calibration
or from a network already quantized by QAT, :func:`~mnv3.deploy.quantize.qat_network`), and
AOTInductor ``.pt2`` fp32 or bf16 (:func:`~mnv3.deploy.pt2.export_pt2`). :data:`FORMAT_QUANTIZE`
says which precision each format holds.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mnv3.deploy.common import ExportError
from mnv3.deploy.onnx_export import (
    DEFAULT_OPSET,
    CalibrationMethod,
    export_onnx,
    quantize_onnx,
)

FORMATS = ("onnx", "pte", "pt2")
QUANTIZE = (None, "int8", "bf16")
# What each format can hold: int8 from onnxruntime / XNNPACK, bf16 from Inductor (oneDNN).
FORMAT_QUANTIZE: dict[str, tuple[str | None, ...]] = {
    "onnx": (None, "int8"),
    "pte": (None, "int8"),
    "pt2": (None, "bf16"),
}


def check_format(fmt: str, quantize: str | None) -> None:
    """One :class:`ExportError` sentence for an unknown format, precision or pairing of both."""
    if fmt not in FORMATS:
        raise ExportError(f"format={fmt!r} is unknown; expected one of {', '.join(FORMATS)}")
    if quantize not in QUANTIZE:
        raise ExportError(f"quantize={quantize!r} is unknown; expected null, int8 or bf16")
    allowed = FORMAT_QUANTIZE[fmt]
    if quantize not in allowed:
        names = " or ".join("null" if q is None else q for q in allowed)
        others = [f for f, q in FORMAT_QUANTIZE.items() if quantize in q]
        raise ExportError(
            f"quantize={quantize} is not available for format={fmt}; expected {names} "
            f"(quantize={quantize} exports as format={' or '.join(others)})"
        )


def export_network(
    network: nn.Module,
    path: str | os.PathLike[str],
    fmt: str,
    example_input: torch.Tensor,
    quantize: str | None = None,
    calibration: Sequence[torch.Tensor] | None = None,
    metadata: Mapping[str, Any] | None = None,
    *,
    quantized_network: nn.Module | None = None,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    per_channel: bool = False,
    calibration_method: CalibrationMethod = "minmax",
) -> Path:
    """Write ``network`` as ``fmt`` (:data:`FORMATS`), ``quantize`` (:data:`QUANTIZE`), at ``path``
    with ``metadata`` in the sidecar json.

    ``example_input`` fixes the input size (and a ``.pte``'s batch); ``calibration``: the
    preprocessed batches int8 ranges come from; ``quantized_network``: a ``.pte``'s int8 network
    from QAT, lowered instead of calibrating. ``dynamic_batch``, ``opset``, ``per_channel`` and
    ``calibration_method`` are ONNX's (see :func:`~mnv3.deploy.onnx_export.export_onnx` and
    :func:`~mnv3.deploy.onnx_export.quantize_onnx`). Returns the written file.
    """
    check_format(fmt, quantize)
    if fmt == "pt2":
        from mnv3.deploy.pt2 import export_pt2

        return export_pt2(network, path, example_input, quantize, metadata, dynamic_batch)  # type: ignore[arg-type]
    if fmt == "pte":
        from mnv3.deploy.pte import export_pte

        return export_pte(
            network, path, example_input, quantize, calibration, metadata, quantized_network
        )
    if not quantize:
        return export_onnx(network, path, example_input, dynamic_batch, opset, metadata)
    with tempfile.TemporaryDirectory() as scratch:
        fp32 = export_onnx(
            network, Path(scratch) / "fp32.onnx", example_input, dynamic_batch, opset
        )
        return quantize_onnx(
            fp32,
            path,
            calibration or [],
            per_channel,
            metadata,
            calibration_method=calibration_method,
        )
