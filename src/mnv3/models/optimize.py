"""Inference-time rewrites of a MobileNet: BatchNorm folding and a compiled CPU path.

Training needs BatchNorm as a separate op; inference does not. In eval mode a BatchNorm is a
fixed per-channel affine map, so it folds exactly into the preceding convolution's weights and
bias, removing one full pass over every activation tensor (MobileNets have ~50 of them and are
memory-bound at batch 1, so this matters more than for big-kernel networks).

:func:`optimize_for_inference` stacks the remaining CPU wins on top: channels-last memory
format (what oneDNN's depthwise and 1x1 kernels prefer) and a graph compiler that pre-packs
weights and fuses conv + activation (+ residual add). Nothing here imports Hydra, Lightning
or wandb.

Why "freeze" is the default. mobilenet_v3_large, 1x3x224x224, ``torch.set_num_threads(1)``,
``torch.inference_mode()``, AMD EPYC (Zen 3) 2-vCPU VM, torch 2.14.1, same weights in
all; medians of 250 rounds, order shuffled every round, glibc malloc thresholds pinned as
in ``bench/bench_models.py``; another process kept the second core busy. Channels-last
rows include converting the NCHW input:

============================================  ========  ==============
path                                          latency   vs torchvision
============================================  ========  ==============
torchvision eager                             24.4 ms   1.00
ours eager (BatchNorm, NCHW)                  24.6 ms   1.01
``"eager"`` (BN folded + NHWC)                19.2 ms   0.79
trace + freeze + optimize_for_inference       18.3 ms   0.75
``"compile"`` (Inductor, freezing, NHWC)      16.9 ms   0.69
``"freeze"`` (oneDNN Graph), NCHW             12.6 ms   0.52
``"freeze"`` (oneDNN Graph), NHWC             11.7 ms   0.48
============================================  ========  ==============

The per-row numbers of every model are in ``bench/results/bench_models.md`` (written by
``bench/bench_models.py``). Eager CPU convolutions re-pack weights and reorder activations
on every call; the frozen oneDNN Graph path does that once, which at batch 1 is most of
the gain. TorchScript is deprecated upstream (torch >= 2.11) but still shipped; should it
go, the ``torch.export`` path is an AOTInductor package (:func:`mnv3.deploy.export_pt2`):
re-measured 2026-12-06 on an AMD EPYC Zen 4 2-vCPU VM, quiet, 1 thread, Large, batch 1:
``"freeze"`` 0.50x torchvision eager, ``.pt2`` fp32 0.56x, ``torch.compile`` with freezing
0.66x (unfolded NCHW model, a one-off script), so
``"freeze"`` stays the default (``docs/deployment.md``).
"""

from __future__ import annotations

import copy
import warnings
from typing import Literal

import torch
from torch import nn

from mnv3.models.layers import ConvBNAct
from mnv3.models.profile import model_in_channels

OptimizeMode = Literal["freeze", "compile", "eager"]


@torch.no_grad()
def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d computing ``bn(conv(x))`` of the eval-mode pair, with a bias.

    ``bn(y) = gamma * (y - mean) / sqrt(var + eps) + beta`` per output channel, so with
    ``s = gamma / sqrt(var + eps)``: ``W' = W * s`` and ``b' = (b - mean) * s + beta``. The
    arithmetic is done in float64 and cast back, so folding adds no rounding of its own.
    """
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    weight = conv.weight.double()
    bias = (
        conv.bias.double() if conv.bias is not None else torch.zeros_like(bn.running_mean.double())
    )
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(bias)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(bias)
    scale = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    fused.weight.copy_(weight * scale.reshape(-1, 1, 1, 1))
    fused.bias.copy_((bias - bn.running_mean.double()) * scale + beta)
    return fused


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """Return an eval-mode deep copy of ``model`` with every ConvBNAct's BatchNorm folded.

    Each :class:`~mnv3.models.layers.ConvBNAct` keeps its structure (``conv``, ``bn``, ``act``
    children, so checkpoint-style names and ``forward_taps`` keep working) but its conv gains a
    bias carrying the BatchNorm and its ``bn`` becomes ``nn.Identity``. Works on any network
    built from ConvBNAct (every MobileNet here, dilated and minimal ones included, with or
    without classifier). The input model is left untouched.

    The copy is for inference only: training it would train without BatchNorm.
    """
    fused_model = copy.deepcopy(model).eval()
    for module in fused_model.modules():
        if isinstance(module, ConvBNAct) and isinstance(module.bn, nn.BatchNorm2d):
            module.conv = _folded_conv(module.conv, module.bn)
            module.bn = nn.Identity()
    return fused_model


def _onednn_graph_usable(example_input: torch.Tensor) -> bool:
    """Whether TorchScript's oneDNN Graph fuser can run this input (CPU, float32, oneDNN built)."""
    return (
        example_input.device.type == "cpu"
        and example_input.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.jit, "enable_onednn_fusion")
        and hasattr(torch.jit, "onednn_fusion_enabled")
    )


def _freeze(module: nn.Module, example_input: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace + freeze, then let the oneDNN Graph fuser compile it (or optimize_for_inference)."""
    with torch.no_grad(), warnings.catch_warnings():
        # torch >= 2.11 marks TorchScript deprecated (FutureWarning); it still works and is,
        # today, the fastest CPU path for this network (numbers in optimize_for_inference).
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(module, example_input, check_trace=False)
        frozen = torch.jit.freeze(traced.eval())
        if not _onednn_graph_usable(example_input):
            frozen = torch.jit.optimize_for_inference(frozen)
            for _ in range(_WARMUP_CALLS):
                frozen(example_input)
            return frozen
        # The fuser is a process-wide switch read when the profiling executor optimises a graph,
        # which happens on the first calls. Compile now, then restore the caller's setting: the
        # optimised plan is kept for inputs of this shape / dtype / layout.
        previous = torch.jit.onednn_fusion_enabled()
        torch.jit.enable_onednn_fusion(True)
        try:
            for _ in range(_WARMUP_CALLS):
                frozen(example_input)
        finally:
            torch.jit.enable_onednn_fusion(previous)
    return frozen


# Profiling executor: call 1 records shapes, call 2 builds the optimised plan, call 3 runs it.
_WARMUP_CALLS = 3


def _fused(
    model: nn.Module, channels_last: bool, example_input: torch.Tensor | None
) -> tuple[nn.Module, torch.Tensor]:
    """Steps 1 and 2 of :func:`optimize_for_inference`: BN folded, memory format; the example
    input (default 1xCx224x224 zeros) on the model's device in that format."""
    fused = fuse_conv_bn(model)
    param = next(fused.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if example_input is None:
        example_input = torch.zeros(1, model_in_channels(model), 224, 224, device=device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        fused = fused.to(memory_format=memory_format)
    return fused, example_input.to(device=device).contiguous(memory_format=memory_format)


def optimize_for_inference(
    model: nn.Module,
    mode: OptimizeMode = "freeze",
    channels_last: bool = True,
    example_input: torch.Tensor | None = None,
) -> nn.Module:
    """The fastest CPU inference form of ``model``: BN folded, channels-last, compiled graph.

    Steps, each kept because it measured faster:

    1. :func:`fuse_conv_bn` removes every BatchNorm pass (exact up to float rounding).
    2. ``channels_last`` (default on): the weights and the example input go NHWC, the layout
       oneDNN's depthwise and 1x1 kernels run without reorders. The returned module is tuned
       for NHWC input: feed ``x.contiguous(memory_format=torch.channels_last)``. NCHW inputs
       still give correct results.
    3. ``mode``:

       - ``"freeze"`` (default): ``torch.jit.trace`` + ``torch.jit.freeze``, then compiled by
         TorchScript's oneDNN Graph fuser (``torch.jit.enable_onednn_fusion``), which fuses
         conv + bias + ReLU / h-swish / residual add into oneDNN partitions with weights
         pre-packed once and activations kept in oneDNN's blocked layout between partitions.
         Where that fuser cannot run (non-CPU device, non-float32, torch without oneDNN) it
         falls back to ``torch.jit.optimize_for_inference`` (the two cannot be combined).
         Returns a ``torch.jit.ScriptModule``.
       - ``"compile"``: ``torch.compile`` with Inductor's ``freezing`` option (weights
         constant-folded and pre-packed for oneDNN), compiled here on ``example_input``:
         30-40 s cold on a 2-core machine (~10 s with Inductor's cache warm), and it needs a
         C++ compiler.
       - ``"eager"``: steps 1 and 2 only; a plain ``nn.Module`` (keeps ``forward_taps``).

    Why "freeze" is the default: the measurements in the module docstring.

    ``example_input`` drives tracing / compiling (default: a 1xCx224x224 zero tensor on the
    model's device, C the model's input channels, 3 unless built with ``in_channels=1``); use the
    shape you will run, since the compiled plan is specialised to it.
    Other shapes are still correct; in "freeze" mode they get a plan built without the oneDNN
    Graph fuser (the process-wide switch is restored to its previous state after the warm-up
    calls) unless ``torch.jit.enable_onednn_fusion(True)`` is on when they first run.
    Traced / compiled results compute ``forward`` only (no ``forward_taps``). The input model
    is not modified.
    """
    if mode not in ("freeze", "compile", "eager"):
        raise ValueError(f"mode must be 'freeze', 'compile' or 'eager', got {mode!r}")
    fused, example_input = _fused(model, channels_last, example_input)
    if mode == "eager":
        return fused
    if mode == "compile":
        compiled = torch.compile(fused, dynamic=False, options={"freezing": True})
        with torch.inference_mode():
            compiled(example_input)
        return compiled  # type: ignore[return-value]
    return _freeze(fused, example_input)
