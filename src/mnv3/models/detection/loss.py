"""SSD training losses: smooth-L1 on matched anchors plus one of two classification losses.

- ``"softmax_hnm"``: softmax cross-entropy with 3:1 hard-negative mining (SSD paper §2.2,
  torchvision's ``SSD.compute_loss``): every positive anchor, plus the negatives with the highest
  loss, three per positive in the same image.
- ``"focal"``: sigmoid focal loss (Lin et al., ICCV 2017) on every anchor and every class
  column, alpha 0.75, gamma 2: TensorFlow's ``ssdlite_mobilenet_v3_*_320x320_coco`` configs, the
  recipe behind the paper's Table 6. As in TensorFlow's SSD the background column is trained too
  (target 1 on unmatched anchors); predicted scores are then sigmoids, not a softmax.

Both parts are sums divided by the number of matched anchors in the batch (at least 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch.nn import functional as F
from torchvision.ops import sigmoid_focal_loss

from mnv3.models.detection.box_coder import BoxCoder, match_anchors

LossName = Literal["softmax_hnm", "focal"]
LOSSES: tuple[str, ...] = ("softmax_hnm", "focal")


def assign_targets(
    targets: Sequence[Mapping[str, torch.Tensor]],
    anchors: torch.Tensor,
    iou_threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Match every image's boxes to the anchors.

    Returns ``(matched, labels, boxes)``: the (N, A) index of each anchor's ground-truth box
    (-1 background), its (N, A) class (0 background) and its (N, A, 4) box (zeros where
    unmatched). The loop is over images only; matching inside an image is vectorised.
    """
    matched, labels, boxes = [], [], []
    for target in targets:
        gt_boxes, gt_labels = target["boxes"], target["labels"]
        m = match_anchors(gt_boxes, anchors, iou_threshold)
        if gt_boxes.numel() == 0:
            labels.append(torch.zeros_like(m))
            boxes.append(anchors.new_zeros(anchors.shape))
        else:
            safe = m.clamp(min=0)
            labels.append(torch.where(m >= 0, gt_labels[safe], torch.zeros_like(m)))
            boxes.append(gt_boxes[safe].to(anchors.dtype))
        matched.append(m)
    return torch.stack(matched), torch.stack(labels), torch.stack(boxes)


def hard_negative_mask(
    cls_loss: torch.Tensor, positive: torch.Tensor, neg_to_pos_ratio: float = 3.0
) -> torch.Tensor:
    """(N, A) mask of the ``neg_to_pos_ratio`` x #positives highest-loss negatives per image.

    Positives are ranked last (their loss set to -inf), so they are never taken as negatives;
    an image without positives contributes no negatives (torchvision's semantics).
    """
    num_neg = neg_to_pos_ratio * positive.sum(dim=1, keepdim=True)
    ranked = cls_loss.detach().masked_fill(positive, -float("inf"))
    order = ranked.argsort(dim=1, descending=True)
    # rank[i, a] = position of anchor a in image i's descending order (the inverse permutation).
    rank = torch.empty_like(order)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank.scatter_(1, order, positions)
    return rank < num_neg


def detection_loss(
    cls_logits: torch.Tensor,
    bbox_regression: torch.Tensor,
    anchors: torch.Tensor,
    targets: Sequence[Mapping[str, torch.Tensor]],
    box_coder: BoxCoder,
    loss: LossName = "softmax_hnm",
    iou_threshold: float = 0.5,
    neg_to_pos_ratio: float = 3.0,
    focal_alpha: float = 0.75,
    focal_gamma: float = 2.0,
) -> dict[str, torch.Tensor]:
    """SSD losses of one batch: ``bbox_regression``, ``classification`` and their sum ``loss``.

    ``cls_logits`` (N, A, C) with class 0 the background, ``bbox_regression`` (N, A, 4),
    ``anchors`` (A, 4) xyxy in the input tensor's pixels, ``targets`` one dict per image with
    ``boxes`` (G, 4) xyxy in the same pixels and ``labels`` (G,) int64 in 1..C-1.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if len(targets) != cls_logits.shape[0]:
        raise ValueError(f"got {len(targets)} targets for a batch of {cls_logits.shape[0]} images")
    matched, labels, gt_boxes = assign_targets(targets, anchors, iou_threshold)
    matched_any = matched >= 0
    num_matched = matched_any.sum().clamp(min=1).to(cls_logits.dtype)

    anchors_all = anchors.unsqueeze(0).expand_as(gt_boxes)
    reg_targets = box_coder.encode(gt_boxes[matched_any], anchors_all[matched_any])
    box_loss = F.smooth_l1_loss(
        bbox_regression[matched_any], reg_targets.to(bbox_regression.dtype), reduction="sum"
    )

    num_classes = cls_logits.shape[-1]
    if loss == "softmax_hnm":
        ce = F.cross_entropy(
            cls_logits.reshape(-1, num_classes), labels.reshape(-1), reduction="none"
        ).view_as(labels)
        positive = labels > 0
        negative = hard_negative_mask(ce, positive, neg_to_pos_ratio)
        cls_loss = ce[positive].sum() + ce[negative].sum()
    else:
        one_hot = F.one_hot(labels, num_classes).to(cls_logits.dtype)
        cls_loss = sigmoid_focal_loss(
            cls_logits, one_hot, alpha=focal_alpha, gamma=focal_gamma, reduction="sum"
        )
    out = {
        "bbox_regression": box_loss / num_matched,
        "classification": cls_loss / num_matched,
    }
    out["loss"] = out["bbox_regression"] + out["classification"]
    return out
