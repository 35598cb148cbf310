"""MobileNetV2, the baseline the MobileNetV3 paper compares against (Sandler et al., CVPR 2018).

``V2_TABLE`` is Table 2 of the MobileNetV2 paper with its columns t (expansion factor), c (output
channels), n (repeats) and s (stride of the first repeat). Blocks use ReLU6, no squeeze-excite,
3x3 depthwise kernels, and PyTorch's default BatchNorm settings (as torchvision's checkpoints).
"""

from __future__ import annotations

from mnv3.models.layers import make_divisible
from mnv3.models.mobilenet import ArchSpec, BlockSpec

# MobileNetV2 paper, Table 2. Stem: conv2d 3x3, 32, s2. Tail: conv2d 1x1 1280, pool, conv2d 1x1 k.
V2_TABLE = (
    # t   c    n  s
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
V2_STEM, V2_LAST = 32, 1280


def mobilenet_v2_arch(width_mult: float = 1.0, output_stride: int = 32) -> ArchSpec:
    """Concrete widths of MobileNetV2: expansion = t x the rounded input width; 1280 kept below 1.0."""
    if width_mult <= 0:
        raise ValueError(f"width_mult must be positive, got {width_mult}")
    in_ch = make_divisible(V2_STEM * width_mult, 8)
    stem = in_ch
    blocks = []
    for t, c, n, s in V2_TABLE:
        out_ch = make_divisible(c * width_mult, 8)
        for i in range(n):
            blocks.append(
                BlockSpec(
                    in_channels=in_ch,
                    expanded_channels=round(in_ch * t),
                    out_channels=out_ch,
                    kernel_size=3,
                    stride=s if i == 0 else 1,
                    use_se=False,
                    activation="relu6",
                )
            )
            in_ch = out_ch
    return ArchSpec(
        name="mobilenet_v2",
        stem_channels=stem,
        stem_activation="relu6",
        blocks=tuple(blocks),
        last_channels=make_divisible(V2_LAST * max(1.0, width_mult), 8),
        last_activation="relu6",
        head_hidden_channels=None,
        head_activation="none",
        output_stride=output_stride,
    )
