"""SSDLite on a MobileNet backbone: the detector of the MobileNetV3 paper (§6.3, Table 6).

Layout (the training task splits parameter groups and freezes by these submodules):

- ``backbone``: a :class:`~mnv3.models.mobilenet.MobileNet` without classifier; SSDLite reads
  its ``C4_expansion`` tap (the 1x1 expansion of the first stride-32 block: block 13 of Large,
  9 of Small, stride 16) and ``C5`` (the last 1x1 conv);
- ``extra``: four blocks (512, 256, 256, 128 channels) that halve the resolution each:
  1x1 to out/2 -> 3x3 depthwise stride 2 -> 1x1 to out, BN + ReLU6 after each;
- ``head``: per feature map a depthwise-separable predictor (3x3 depthwise + BN + ReLU6, then a
  1x1 conv with bias) for the class logits and one for the box regression (MobileNetV2 §6.2).

Two interfaces. The tensor one (what the training task uses): ``forward(images)`` on an
already resized and normalised (N, 3, H, W) batch returns the raw head outputs plus the
anchors; :meth:`SSDLite.loss` and :meth:`SSDLite.postprocess` take it from there. The list one
is a drop-in for torchvision's ``ssdlite320_mobilenet_v3_large``: float images in [0, 1] of any
size, resized to 320x320 and scaled to [-1, 1] inside (:meth:`SSDLite.preprocess`), returning
``[{boxes, scores, labels}]`` in each image's pixels in eval mode and the loss dict in train mode.
Class 0 is the background (torchvision's convention; COCO has 91 with it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import batched_nms, clip_boxes_to_image

from mnv3.models.detection.anchors import DefaultBoxes
from mnv3.models.detection.box_coder import BoxCoder
from mnv3.models.detection.loss import LOSSES, LossName, detection_loss
from mnv3.models.layers import ConvBNAct
from mnv3.models.mobilenet import MobileNet

# SSDLite's feature maps: the backbone's C4 expansion and C5, then four extra blocks.
TAPS = ("C4_expansion", "C5")
EXTRA_CHANNELS = (512, 256, 256, 128)
IMAGE_SIZE = (320, 320)
# Inputs scaled from [0, 1] to [-1, 1], as TensorFlow's MobileNet SSDs and torchvision's.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
# torchvision's norm_layer for SSDLite (TF: BN decay 0.97, epsilon 1e-3); init std of TF's config.
BN_EPS = 1e-3
BN_MOMENTUM = 0.03
INIT_STD = 0.03

Target = Mapping[str, torch.Tensor]


def resize_and_normalize(
    images: torch.Tensor | Sequence[torch.Tensor],
    size: tuple[int, int] = IMAGE_SIZE,
    mean: Sequence[float] = IMAGE_MEAN,
    std: Sequence[float] = IMAGE_STD,
) -> torch.Tensor:
    """Float images in [0, 1] -> one (N, C, H, W) batch at ``size``, normalised.

    Normalises first and then resizes bilinearly (``align_corners=False``, no antialiasing), the
    order and mode of torchvision's ``GeneralizedRCNNTransform`` with ``fixed_size``, so both
    produce the same tensor. Images of one size are processed as one batch.
    """
    if isinstance(images, torch.Tensor):
        images = [images] if images.dim() == 3 else list(images)
    if len(images) == 0:
        raise ValueError("got no images: expected a list of (C, H, W) float tensors")
    for i, image in enumerate(images):
        if image.dim() != 3:
            raise ValueError(f"image {i} has shape {tuple(image.shape)}; expected (C, H, W)")
        if not image.is_floating_point():
            raise TypeError(f"image {i} is {image.dtype}; expected a float tensor in [0, 1]")
    ref = images[0]
    m = torch.as_tensor(mean, dtype=ref.dtype, device=ref.device)[:, None, None]
    s = torch.as_tensor(std, dtype=ref.dtype, device=ref.device)[:, None, None]
    size = (int(size[0]), int(size[1]))
    if all(img.shape == ref.shape for img in images):
        batch = (torch.stack(list(images)) - m) / s
        return F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
    return torch.cat(
        [
            F.interpolate(((img - m) / s)[None], size=size, mode="bilinear", align_corners=False)
            for img in images
        ]
    )


def scale_boxes(
    boxes: torch.Tensor, from_size: tuple[int, int], to_size: tuple[int, int]
) -> torch.Tensor:
    """xyxy ``boxes`` in an image of ``from_size`` (h, w) -> the same boxes at ``to_size``."""
    num = torch.tensor([to_size[1], to_size[0]] * 2, dtype=torch.float32, device=boxes.device)
    den = torch.tensor([from_size[1], from_size[0]] * 2, dtype=torch.float32, device=boxes.device)
    return boxes * (num / den)


class ExtraBlock(nn.Sequential):
    """1x1 to out/2 -> 3x3 depthwise stride 2 -> 1x1 to out, each with BN + ReLU6 (§6.3)."""

    def __init__(self, in_channels: int, out_channels: int, bn_eps: float, bn_momentum: float):
        mid = out_channels // 2
        bn = {"bn_eps": bn_eps, "bn_momentum": bn_momentum, "activation": "relu6"}
        super().__init__()
        self.reduce = ConvBNAct(in_channels, mid, 1, **bn)
        self.depthwise = ConvBNAct(mid, mid, 3, stride=2, groups=mid, **bn)
        self.project = ConvBNAct(mid, out_channels, 1, **bn)
        self.out_channels = out_channels


def extra_blocks(
    in_channels: int, channels: Sequence[int], bn_eps: float, bn_momentum: float
) -> nn.ModuleList:
    """The extra feature blocks after C5, each halving the resolution (§6.3)."""
    blocks = []
    for out in channels:
        blocks.append(ExtraBlock(in_channels, out, bn_eps, bn_momentum))
        in_channels = out
    return nn.ModuleList(blocks)


class PredictionBlock(nn.Sequential):
    """SSDLite's predictor: 3x3 depthwise + BN + ReLU6, then a 1x1 conv with bias."""

    def __init__(self, in_channels: int, out_channels: int, bn_eps: float, bn_momentum: float):
        super().__init__()
        self.depthwise = ConvBNAct(
            in_channels,
            in_channels,
            3,
            groups=in_channels,
            activation="relu6",
            bn_eps=bn_eps,
            bn_momentum=bn_momentum,
        )
        self.project = nn.Conv2d(in_channels, out_channels, 1)


class SSDLiteHead(nn.Module):
    """Class and box predictors for every feature map; outputs flattened over all anchors."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_anchors: Sequence[int],
        num_classes: int,
        bn_eps: float = BN_EPS,
        bn_momentum: float = BN_MOMENTUM,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.classification = nn.ModuleList(
            PredictionBlock(c, a * num_classes, bn_eps, bn_momentum)
            for c, a in zip(in_channels, num_anchors, strict=True)
        )
        self.regression = nn.ModuleList(
            PredictionBlock(c, a * 4, bn_eps, bn_momentum)
            for c, a in zip(in_channels, num_anchors, strict=True)
        )

    @staticmethod
    def _flatten(out: torch.Tensor, columns: int) -> torch.Tensor:
        # (N, A*K, H, W) -> (N, H*W*A, K): location-major, then anchor, the default boxes' order.
        n, _, h, w = out.shape
        return out.view(n, -1, columns, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, columns)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, A, num_classes) class logits and (N, A, 4) box regression for all anchors."""
        cls = [
            self._flatten(p(f), self.num_classes)
            for p, f in zip(self.classification, features, strict=True)
        ]
        reg = [self._flatten(p(f), 4) for p, f in zip(self.regression, features, strict=True)]
        return torch.cat(cls, dim=1), torch.cat(reg, dim=1)


def normal_init_(module: nn.Module, std: float = INIT_STD) -> None:
    """Normal(0, std) conv weights, zero biases: TF's SSDLite init (torchvision's from scratch)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class SSDLite(nn.Module):
    """SSDLite detector: ``backbone`` + ``extra`` feature blocks + ``head`` predictors.

    See the module docstring for the two interfaces. ``loss`` picks the classification loss
    (``"softmax_hnm"`` or ``"focal"``, :mod:`mnv3.models.detection.loss`); with ``"focal"`` the
    scores are per-class sigmoids, else a softmax over the classes.
    """

    def __init__(
        self,
        backbone: MobileNet,
        num_classes: int = 91,
        extra_channels: Sequence[int] = EXTRA_CHANNELS,
        loss: LossName = "softmax_hnm",
        image_size: tuple[int, int] = IMAGE_SIZE,
        aspect_ratios: Sequence[Sequence[int]] | None = None,
        min_ratio: float = 0.2,
        max_ratio: float = 0.95,
        score_thresh: float = 0.001,
        nms_thresh: float = 0.55,
        detections_per_img: int = 300,
        topk_candidates: int = 300,
        iou_threshold: float = 0.5,
        neg_to_pos_ratio: float = 3.0,
        focal_alpha: float = 0.75,
        focal_gamma: float = 2.0,
        bn_eps: float = BN_EPS,
        bn_momentum: float = BN_MOMENTUM,
    ) -> None:
        super().__init__()
        if backbone.classifier is not None:
            raise ValueError(
                "the SSDLite backbone must be built without classifier (num_classes=0)"
            )
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background too; got {num_classes}, need >= 2")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.backbone = backbone
        in_channels = [backbone.tap(name).channels for name in TAPS] + list(extra_channels)
        self.extra = extra_blocks(in_channels[1], extra_channels, bn_eps, bn_momentum)
        if aspect_ratios is None:
            aspect_ratios = [[2, 3]] * len(in_channels)
        self.default_boxes = DefaultBoxes(aspect_ratios, min_ratio, max_ratio)
        anchors = self.default_boxes.num_anchors_per_location()
        self.head = SSDLiteHead(in_channels, anchors, num_classes, bn_eps, bn_momentum)
        self.box_coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.num_classes = num_classes
        self.loss_name = loss
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.image_mean, self.image_std = IMAGE_MEAN, IMAGE_STD
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_img, self.topk_candidates = detections_per_img, topk_candidates
        self.iou_threshold, self.neg_to_pos_ratio = iou_threshold, neg_to_pos_ratio
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        # The builder's name (what known weights record); weights fit any input size.
        self.name = f"ssdlite320_{backbone.arch.name}"
        normal_init_(self.extra)
        normal_init_(self.head)

    def reset_class_predictors(self) -> None:
        """Re-initialise the class predictors' last 1x1 convs (a new class count)."""
        for predictor in self.head.classification:
            nn.init.normal_(predictor.project.weight, std=INIT_STD)
            nn.init.zeros_(predictor.project.bias)

    # ---- the tensor interface ---------------------------------------------------------------

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The six feature maps the predictors read: C4 expansion, C5, then the extra blocks."""
        taps = self.backbone.forward_taps(images, TAPS)
        feats = [taps[name] for name in TAPS]
        x = feats[-1]
        for block in self.extra:
            x = block(x)
            feats.append(x)
        return feats

    def forward_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw outputs on a resized, normalised (N, 3, H, W) batch, in train and eval mode alike.

        ``cls_logits`` (N, A, C), ``bbox_regression`` (N, A, 4) and ``anchors`` (A, 4, xyxy in
        the batch's pixels; cached per feature-map sizes, device and dtype, shared by the batch).
        """
        feats = self.features(images)
        cls_logits, bbox_regression = self.head(feats)
        dtype = torch.promote_types(bbox_regression.dtype, torch.float32)
        anchors = self.default_boxes(
            [tuple(f.shape[-2:]) for f in feats], tuple(images.shape[-2:]), images.device, dtype
        )
        return {"cls_logits": cls_logits, "bbox_regression": bbox_regression, "anchors": anchors}

    def loss(
        self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Target]
    ) -> dict[str, torch.Tensor]:
        """``bbox_regression``, ``classification`` and their sum ``loss`` for one batch.

        ``targets``: per image ``boxes`` (G, 4) xyxy in the input tensor's pixels and ``labels``
        (G,) int64 in 1..num_classes-1 (0 is the background).
        """
        return detection_loss(
            outputs["cls_logits"],
            outputs["bbox_regression"],
            outputs["anchors"],
            targets,
            self.box_coder,
            loss=self.loss_name,
            iou_threshold=self.iou_threshold,
            neg_to_pos_ratio=self.neg_to_pos_ratio,
            focal_alpha=self.focal_alpha,
            focal_gamma=self.focal_gamma,
        )

    def scores(self, cls_logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities: softmax, or per-class sigmoids when trained with focal loss."""
        if self.loss_name == "focal":
            return torch.sigmoid(cls_logits)
        return F.softmax(cls_logits, dim=-1)

    @torch.no_grad()
    def postprocess(
        self,
        outputs: Mapping[str, torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
        input_size: tuple[int, int] | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Detections per image: ``{boxes (xyxy), scores, labels}`` in torchvision's format.

        Boxes are decoded against the anchors, clipped to the input tensor (``input_size``
        (h, w), default the model's 320x320), and scaled into ``image_sizes[i]`` (h, w). Per
        class the ``topk_candidates`` best scores above ``score_thresh`` are kept (one batched
        top-k over all classes), then per-class NMS and the ``detections_per_img`` best.
        """
        input_size = self.image_size if input_size is None else tuple(input_size)
        scores = self.scores(outputs["cls_logits"])[..., 1:]  # (N, A, C-1) without background
        boxes = self.box_coder.decode(outputs["bbox_regression"], outputs["anchors"])
        boxes = clip_boxes_to_image(boxes, input_size)
        if len(image_sizes) != scores.shape[0]:
            raise ValueError(f"got {len(image_sizes)} image sizes for {scores.shape[0]} images")
        k = min(self.topk_candidates, scores.shape[1])
        top_scores, top_idx = scores.topk(k, dim=1)  # (N, k, C-1), best first per class
        # Class-major order (class 1's candidates first), as torchvision's per-class loop.
        top_scores, top_idx = top_scores.transpose(1, 2), top_idx.transpose(1, 2)
        labels = torch.arange(1, self.num_classes, device=scores.device)[:, None].expand(-1, k)
        detections = []
        for i, size in enumerate(image_sizes):
            keep = top_scores[i] > self.score_thresh
            cand_scores, cand_labels = top_scores[i][keep], labels[keep]
            cand_boxes = boxes[i][top_idx[i][keep]]
            kept = batched_nms(cand_boxes, cand_scores, cand_labels, self.nms_thresh)
            kept = kept[: self.detections_per_img]
            detections.append(
                {
                    "boxes": scale_boxes(cand_boxes[kept], input_size, size),
                    "scores": cand_scores[kept],
                    "labels": cand_labels[kept],
                }
            )
        return detections

    # ---- the torchvision drop-in ------------------------------------------------------------

    def preprocess(
        self, images: Sequence[torch.Tensor], targets: Sequence[Target] | None = None
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]] | None, list[tuple[int, int]]]:
        """Images in [0, 1] -> the model's (N, 3, 320, 320) batch in [-1, 1]; targets' boxes
        scaled along. Returns (batch, targets or None, the original (h, w) of each image)."""
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch = resize_and_normalize(images, self.image_size, self.image_mean, self.image_std)
        if targets is None:
            return batch, None, sizes
        if len(targets) != len(images):
            raise ValueError(f"got {len(targets)} targets for {len(images)} images")
        scaled = []
        for i, (target, size) in enumerate(zip(targets, sizes, strict=True)):
            boxes = target["boxes"]
            if boxes.dim() != 2 or boxes.shape[-1] != 4:
                raise ValueError(
                    f"target {i} boxes have shape {tuple(boxes.shape)}; expected (G, 4) xyxy"
                )
            bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
            if bad.any():
                box = boxes[bad.nonzero()[0, 0]].tolist()
                raise ValueError(
                    f"target {i} has a box {box} without positive width and height; "
                    "expected xyxy with x1 < x2 and y1 < y2"
                )
            scaled.append({**target, "boxes": scale_boxes(boxes, size, self.image_size)})
        return batch, scaled, sizes

    def forward(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        targets: Sequence[Target] | None = None,
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """A (N, 3, H, W) tensor: the raw outputs (:meth:`forward_batch`). A list of images in
        [0, 1]: detections in eval mode, the loss dict in train mode (targets required)."""
        if isinstance(images, torch.Tensor):
            if images.dim() != 4:
                raise ValueError(
                    f"got a tensor of shape {tuple(images.shape)}; expected an (N, 3, H, W) "
                    "batch or a list of (3, H, W) images"
                )
            return self.forward_batch(images)
        if self.training and targets is None:
            raise ValueError("in train mode SSDLite needs targets (boxes, labels) with the images")
        batch, scaled, sizes = self.preprocess(list(images), targets if self.training else None)
        outputs = self.forward_batch(batch)
        if self.training:
            return self.loss(outputs, scaled)
        return self.postprocess(outputs, sizes)
