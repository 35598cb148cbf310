"""SSD default boxes (Liu et al., "SSD: Single Shot MultiBox Detector", ECCV 2016, §2.2).

Feature map k of m gets scale ``s_k = min + (max - min) * k / (m - 1)`` of the image side, two
square boxes (``s_k`` and ``sqrt(s_k * s_{k+1})``, with ``s_m = 1``) and a pair of boxes
``(s_k sqrt(a), s_k / sqrt(a))`` and its transpose per extra aspect ratio ``a``. SSDLite uses
``[[2, 3]] * 6`` with scales 0.2-0.95: six boxes per location (MobileNetV3 paper §6.3; the same
values as torchvision's ``DefaultBoxGenerator`` for ``ssdlite320_mobilenet_v3_large``, whose
arithmetic we follow so its checkpoints decode to the same boxes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class DefaultBoxes:
    """Generates and caches the default boxes (anchors) for a set of feature-map sizes.

    Anchors depend only on the feature-map sizes, the input size, the device and the dtype, so
    they are computed once per combination and reused: a forward pass never rebuilds them.
    """

    def __init__(
        self,
        aspect_ratios: Sequence[Sequence[int]],
        min_ratio: float = 0.2,
        max_ratio: float = 0.95,
        clip: bool = True,
    ) -> None:
        if not aspect_ratios:
            raise ValueError("aspect_ratios needs one list of ratios per feature map")
        if not 0 < min_ratio < max_ratio <= 1:
            raise ValueError(f"need 0 < min_ratio < max_ratio <= 1, got {min_ratio}, {max_ratio}")
        self.aspect_ratios = [list(r) for r in aspect_ratios]
        self.clip = clip
        m = len(self.aspect_ratios)
        if m > 1:
            self.scales = [min_ratio + (max_ratio - min_ratio) * k / (m - 1.0) for k in range(m)]
        else:
            self.scales = [min_ratio]
        self.scales.append(1.0)
        self._wh = [self._wh_pairs(k) for k in range(m)]
        self._cache: dict[tuple, torch.Tensor] = {}

    def _wh_pairs(self, k: int) -> torch.Tensor:
        """Width/height pairs (fractions of the image side) of feature map ``k``."""
        s_k = self.scales[k]
        s_prime = math.sqrt(s_k * self.scales[k + 1])
        pairs = [[s_k, s_k], [s_prime, s_prime]]
        for ar in self.aspect_ratios[k]:
            w, h = s_k * math.sqrt(ar), s_k / math.sqrt(ar)
            pairs += [[w, h], [h, w]]
        wh = torch.tensor(pairs, dtype=torch.float32)
        return wh.clamp(0, 1) if self.clip else wh

    def num_anchors_per_location(self) -> list[int]:
        """Boxes per location of each feature map: 2 squares + 2 per extra aspect ratio."""
        return [2 + 2 * len(r) for r in self.aspect_ratios]

    def __call__(
        self,
        grid_sizes: Sequence[tuple[int, int]],
        image_size: tuple[int, int],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """All anchors as an (A, 4) xyxy tensor in the input image's pixels, cached.

        Order: feature map, then row-major location, then box: the order the head's
        ``(N, H, W, anchors, K)`` outputs are flattened in.
        """
        key = (
            tuple(tuple(int(v) for v in g) for g in grid_sizes),
            tuple(image_size),
            device,
            dtype,
        )
        anchors = self._cache.get(key)
        if anchors is None:
            anchors = self._build(key[0], key[1], dtype).to(device)
            self._cache[key] = anchors
        return anchors

    def _build(
        self,
        grid_sizes: tuple[tuple[int, int], ...],
        image_size: tuple[int, int],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        if len(grid_sizes) != len(self._wh):
            raise ValueError(
                f"got {len(grid_sizes)} feature maps but default boxes are configured for "
                f"{len(self._wh)}"
            )
        boxes = []
        for (fh, fw), wh in zip(grid_sizes, self._wh, strict=True):
            cx = ((torch.arange(fw) + 0.5) / fw).to(dtype)
            cy = ((torch.arange(fh) + 0.5) / fh).to(dtype)
            grid_y, grid_x = torch.meshgrid(cy, cx, indexing="ij")
            centers = torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=-1)
            centers = centers.repeat_interleave(len(wh), dim=0)
            sizes = wh.to(dtype).repeat(fh * fw, 1)
            boxes.append(torch.cat((centers, sizes), dim=1))
        cxcywh = torch.cat(boxes, dim=0)
        # torchvision scales by an integer (W, H) tensor; the same arithmetic keeps its boxes.
        scale = torch.tensor([image_size[1], image_size[0]])
        return torch.cat(
            (
                (cxcywh[:, :2] - 0.5 * cxcywh[:, 2:]) * scale,
                (cxcywh[:, :2] + 0.5 * cxcywh[:, 2:]) * scale,
            ),
            dim=-1,
        )
