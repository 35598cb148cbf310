"""Building a :class:`~mnv3.models.mobilenet.MobileNet` from its spec, with weights.

Kept apart from ``mobilenet.py`` so that the network class and the checkpoint code
(``checkpoints.py``, which needs the class for its key maps) import in one direction only.
"""

from __future__ import annotations

from dataclasses import replace

from mnv3.models.checkpoints import load_weights
from mnv3.models.mobilenet import ArchSpec, MobileNet


def build_mobilenet(
    arch: ArchSpec,
    num_classes: int = 1000,
    dropout: float = 0.2,
    weights: str | None = None,
    bn_momentum: float | None = None,
    in_channels: int | None = None,
) -> MobileNet:
    """Build a :class:`MobileNet` from its spec, optionally with another BN momentum and weights.

    ``bn_momentum`` None keeps the spec's (0.01 for V3: TF's decay 0.99, right for ImageNet-length
    runs). Runs of a few hundred steps need ~0.1, or the running statistics lag the weights and
    eval-mode accuracy collapses to chance.

    ``in_channels`` None keeps the spec's (3). 1 builds a network for gray images; RGB-pretrained
    ``weights`` still load: the stem's kernels are summed over R, G, B
    (:func:`mnv3.models.checkpoints.load_weights`).
    """
    if bn_momentum is not None:
        arch = replace(arch, bn_momentum=bn_momentum)
    if in_channels is not None:
        if in_channels < 1:
            raise ValueError(f"in_channels must be a positive channel count, got {in_channels}")
        arch = replace(arch, in_channels=int(in_channels))
    model = MobileNet(arch, num_classes=num_classes, dropout=dropout)
    if weights is not None:
        load_weights(model, weights)
    return model
