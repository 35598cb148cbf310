"""What the deployment tests share: random networks with real BatchNorm statistics."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

SIZE = 64


def with_batch_statistics(
    model: nn.Module, size: int | tuple[int, int], classes: int = 0
) -> nn.Module:
    """A random network whose BatchNorm statistics are those of its inputs and whose logits are
    spread, so parity and argmax agreement are measured on outputs that are not all ~0."""
    h, w = (size, size) if isinstance(size, int) else size
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the passes below
        if isinstance(module, nn.Linear) and module.out_features == classes:
            nn.init.normal_(module.weight, std=1.0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, h, w))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return model.eval()


def only_standard_ops(path: Path) -> bool:
    import onnx

    graph = onnx.load(str(path)).graph
    return all(node.domain in ("", "ai.onnx") for node in graph.node)


def assert_same_top_detections(
    got: list[dict[str, torch.Tensor]], expected: list[dict[str, torch.Tensor]]
) -> None:
    """An exported detector's runner gives ``SSDLite.postprocess``'s 10 best detections of
    every image: same labels, boxes within 1e-3 px, scores within 1e-5 (at least 5 per image,
    so the comparison is not vacuous)."""
    for g, e in zip(got, expected, strict=True):
        assert len(e["boxes"]) >= 5
        top = min(10, len(e["boxes"]))
        assert torch.equal(g["labels"][:top], e["labels"][:top])
        torch.testing.assert_close(g["boxes"][:top], e["boxes"][:top], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(g["scores"][:top], e["scores"][:top], atol=1e-5, rtol=1e-4)
