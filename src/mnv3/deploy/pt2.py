"""AOTInductor ``.pt2`` packages: the ``torch.export`` / Inductor path for server CPUs.

``optimize_for_inference(mode="freeze")`` (TorchScript + oneDNN Graph) is the fastest fp32 path
measured here, but TorchScript is in maintenance upstream; its successor is ``torch.export``
compiled ahead of time by Inductor into a shared library inside a ``.pt2`` package, which runs
without Python model code (``torch._inductor.aoti_load_package``, or the C++
``AOTIModelPackageLoader``). The package computes what ONNX and ExecuTorch export
(:func:`mnv3.deploy.onnx_export.program_module`: a classifier's logits, LR-ASPP's logits,
SSDLite's decoded boxes and scores) and takes the same input: float32 NCHW images.

What goes in, each step kept because it measured faster or is free (``docs/deployment.md``):

1. BatchNorm folded into the convolutions (:func:`mnv3.models.fuse_conv_bn`) and the weights
   made channels-last, so Inductor's frozen graph starts from oneDNN's layout.
2. ``precision="bf16"``: the folded float32 weights are cast to bfloat16 once, and the graph
   casts its input to bfloat16 and its outputs back to float32, so callers never see the
   dtype. oneDNN runs bf16 convolutions natively on CPUs with AVX-512 BF16 or AMX and emulates
   them (slowly) elsewhere; accuracy is checked like int8 (``bench_deploy.py --ckpt``).
3. Inductor's ``freezing``: weights become constants, pre-packed once for oneDNN.

A C++ compiler is needed at export time (10-30 s for MobileNetV3-Large on 2 cores), not at
load time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mnv3.deploy.common import (
    ExportError,
    atomic_output,
    batch_dim,
    check_input_size,
    two_rows,
    write_sidecar,
)
from mnv3.deploy.onnx_export import program_module
from mnv3.models.optimize import fuse_conv_bn

Precision = Literal["bf16"] | None
PT2_PRECISIONS: dict[str | None, torch.dtype] = {None: torch.float32, "bf16": torch.bfloat16}


class _CastGraph(nn.Module):
    """``module`` in ``dtype`` between float32 input and float32 outputs (one tensor or a tuple)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> Any:
        out = self.module(images.to(self.dtype))
        if isinstance(out, torch.Tensor):
            return out.float()
        return tuple(o.float() for o in out)


def export_pt2(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: torch.Tensor,
    precision: Precision = None,
    metadata: Mapping[str, Any] | None = None,
    dynamic_batch: bool = True,
) -> Path:
    """Compile a classifier, an SSDLite or a segmenter into an AOTInductor package at ``path``.

    Args:
        model: as :func:`mnv3.deploy.export_onnx` takes it (an SSDLite gets its box decoder).
        path: the ``.pt2`` file; written atomically, ``metadata`` as ``<path>.json``.
        example_input: a float32 ``(N, C, H, W)`` batch; fixes C, H and W (and N unless
            ``dynamic_batch``).
        precision: None (float32) or ``"bf16"`` (weights and activations in bfloat16).
        metadata: preprocessing and labels for the sidecar json; ``format``, ``precision``,
            ``outputs`` and ``batch_size`` (null when dynamic) are added.
        dynamic_batch: any batch size from 1 to 1024 (else only the example's).
    """
    if precision not in PT2_PRECISIONS:
        raise ExportError(
            f"precision={precision!r} is not supported for .pt2; expected null or bf16"
        )
    if example_input.dim() != 4:
        raise ExportError(
            f"example input has shape {tuple(example_input.shape)}; expected (N, C, H, W)"
        )
    import torch._inductor

    dtype = PT2_PRECISIONS[precision]
    input_size = check_input_size(tuple(example_input.shape[-2:]), model)
    module, output_names = program_module(model.eval(), input_size)
    folded = fuse_conv_bn(module).to(dtype=dtype, memory_format=torch.channels_last)
    graph = _CastGraph(folded, dtype).eval()
    cl = torch.channels_last
    example = example_input.float().contiguous(memory_format=cl)
    with torch.no_grad():
        if dynamic_batch:
            program = torch.export.export(
                graph,
                (two_rows(example).contiguous(memory_format=cl),),
                dynamic_shapes=batch_dim(example),
            )
        else:
            program = torch.export.export(graph, (example,))
    # Compiled without autograd too: with grad mode on, Inductor keeps the weights as inputs
    # instead of freezing them (measured 1.5x slower in bf16).
    with atomic_output(path) as tmp, tmp.open("w+b") as package, torch.no_grad():
        torch._inductor.aoti_compile_and_package(
            program, package_path=package, inductor_configs={"freezing": True}
        )
        package.flush()
        if metadata is not None:
            sidecar = {
                **metadata,
                "format": "pt2",
                "precision": precision,
                "batch_size": None if dynamic_batch else int(example_input.shape[0]),
                "outputs": output_names,
            }
            write_sidecar(path, sidecar)
    return Path(path)


def load_pt2(path: str | os.PathLike[str]) -> Any:
    """A callable running the package at ``path``: float32 images in, a list of outputs out."""
    import torch._inductor

    return torch._inductor.aoti_load_package(str(path))


def run_pt2(runner: Any, images: torch.Tensor) -> torch.Tensor:
    """The first output (logits, or a detector's boxes) of a loaded package on float32 images."""
    out = runner(images.float().contiguous(memory_format=torch.channels_last))
    return out[0] if isinstance(out, (list, tuple)) else out
