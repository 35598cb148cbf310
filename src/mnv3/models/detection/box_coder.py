"""Box encoding and anchor matching of SSD (Liu et al. 2016, §2.2 "Matching strategy").

Regression targets are the Faster R-CNN parameterisation ``(dx, dy, dw, dh)`` of a box relative
to its anchor, scaled by ``weights`` (10, 10, 5, 5): the inverse of the "variances" (0.1, 0.2)
of the SSD paper, as TensorFlow's and torchvision's SSDs use. The arithmetic follows
torchvision's ``BoxCoder`` operation by operation, so decoded boxes agree to the last bit.
"""

from __future__ import annotations

import math

import torch
from torchvision.ops import box_iou

# exp(dw) is clamped so a wild prediction cannot overflow: boxes at most 1000/16 x the anchor.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


class BoxCoder:
    """Encode boxes against anchors into regression targets, and decode predictions back.

    Both directions work on any leading shape: ``(..., 4)`` boxes against ``(..., 4)`` anchors
    that broadcast, xyxy in pixels.
    """

    def __init__(
        self,
        weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        clip: float = BBOX_XFORM_CLIP,
    ) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.clip = clip

    def encode(self, boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Regression targets ``(dx, dy, dw, dh)`` of xyxy ``boxes`` relative to ``anchors``."""
        wx, wy, ww, wh = self.weights
        a_w = anchors[..., 2] - anchors[..., 0]
        a_h = anchors[..., 3] - anchors[..., 1]
        a_cx = anchors[..., 0] + 0.5 * a_w
        a_cy = anchors[..., 1] + 0.5 * a_h
        b_w = boxes[..., 2] - boxes[..., 0]
        b_h = boxes[..., 3] - boxes[..., 1]
        b_cx = boxes[..., 0] + 0.5 * b_w
        b_cy = boxes[..., 1] + 0.5 * b_h
        return torch.stack(
            (
                wx * (b_cx - a_cx) / a_w,
                wy * (b_cy - a_cy) / a_h,
                ww * torch.log(b_w / a_w),
                wh * torch.log(b_h / a_h),
            ),
            dim=-1,
        )

    def decode(self, codes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """xyxy boxes from regression ``codes`` and their ``anchors`` (the inverse of encode)."""
        anchors = anchors.to(codes.dtype)
        wx, wy, ww, wh = self.weights
        a_w = anchors[..., 2] - anchors[..., 0]
        a_h = anchors[..., 3] - anchors[..., 1]
        a_cx = anchors[..., 0] + 0.5 * a_w
        a_cy = anchors[..., 1] + 0.5 * a_h
        dx = codes[..., 0] / wx
        dy = codes[..., 1] / wy
        dw = torch.clamp(codes[..., 2] / ww, max=self.clip)
        dh = torch.clamp(codes[..., 3] / wh, max=self.clip)
        cx = dx * a_w + a_cx
        cy = dy * a_h + a_cy
        half_w = 0.5 * (torch.exp(dw) * a_w)
        half_h = 0.5 * (torch.exp(dh) * a_h)
        return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


def match_anchors(
    gt_boxes: torch.Tensor, anchors: torch.Tensor, iou_threshold: float = 0.5
) -> torch.Tensor:
    """Index of the ground-truth box each anchor is assigned to, -1 for background.

    SSD's rule: an anchor matches the box it overlaps most if that IoU is at least
    ``iou_threshold``; in addition each ground-truth box claims the anchor it overlaps most,
    so no object goes without a positive (torchvision's ``SSDMatcher``). An image without
    boxes gets all background.
    """
    if gt_boxes.numel() == 0:
        return torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
    iou = box_iou(gt_boxes, anchors)  # (G, A)
    best_iou, matches = iou.max(dim=0)
    matches[best_iou < iou_threshold] = -1
    best_anchor = iou.max(dim=1).indices
    matches[best_anchor] = torch.arange(gt_boxes.shape[0], device=anchors.device)
    return matches
