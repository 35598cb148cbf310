"""SSDLite: parity with torchvision's ssdlite320_mobilenet_v3_large, losses, coder, training."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from mnv3.models import build_model, count_madds, count_params, mobilenet_v3_small, ssdlite320
from mnv3.models.checkpoints import CheckpointError
from mnv3.models.detection import BoxCoder, detection_loss, match_anchors
from mnv3.models.detection.loss import hard_negative_mask

build_detector = partial(build_model, "detector")


def _torchvision_ssdlite() -> nn.Module:
    """torchvision's model from scratch, with BN statistics that make its features informative.

    An untrained model's eval-mode BN statistics (0 mean, 1 variance) collapse the activations
    of std-0.03 convs to constants, and then thousands of anchors tie on the same score, where
    any top-k choice is right. Statistics measured on random images avoid that.
    """
    tv = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=91
    )
    bns = [m for m in tv.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_(0, 0.1)
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the calibration batch
    for block in tv.head.classification_head.module_list:
        block[1].bias.data.normal_(0, 1.0)
    tv.train()
    with torch.no_grad():
        tv.head(list(tv.backbone(torch.rand(2, 3, 320, 320) * 2 - 1).values()))
    for bn in bns:
        bn.momentum = 0.03
    return tv.eval()


@pytest.fixture(scope="module")
def tv_and_ours(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    tv = _torchvision_ssdlite()
    path = Path(tmp_path_factory.mktemp("ssdlite")) / "tv_ssdlite.pth"
    torch.save(tv.state_dict(), path)
    return tv, ssdlite320(weights=str(path))


TARGETS = [
    {
        "boxes": torch.tensor([[10.0, 20, 120, 150], [50, 60, 190, 180]]),
        "labels": torch.tensor([3, 17]),
    },
    {"boxes": torch.tensor([[0.0, 0, 300, 300]]), "labels": torch.tensor([1])},
    {
        "boxes": torch.tensor([[30.0, 40, 60, 90], [100, 100, 240, 400], [5, 5, 20, 20]]),
        "labels": torch.tensor([5, 90, 2]),
    },
]
SIZES = [(200, 300), (320, 320), (411, 250)]


def test_param_count_and_layout_match_torchvision(tv_and_ours) -> None:
    tv, ours = tv_and_ours
    assert count_params(ours) == count_params(tv) == 3_440_060
    assert ours.backbone.classifier is None
    # The backbone submodule holds only the MobileNet: extras and predictors live elsewhere.
    head_params = count_params(ours.extra) + count_params(ours.head)
    assert count_params(ours.backbone) + head_params == count_params(ours)


def test_torchvision_checkpoint_gives_same_detections(tv_and_ours) -> None:
    tv, ours = tv_and_ours
    tv.eval()
    ours.eval()
    torch.manual_seed(1)
    images = [torch.rand(3, h, w) for h, w in SIZES]
    with torch.no_grad():
        expected, got = tv(images), ours(images)
    for e, g, (h, w) in zip(expected, got, SIZES, strict=True):
        assert len(g["boxes"]) > 10
        assert torch.equal(g["labels"], e["labels"])
        torch.testing.assert_close(g["scores"], e["scores"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g["boxes"], e["boxes"], rtol=1e-5, atol=1e-4)
        assert g["boxes"][:, 2].max() <= w and g["boxes"][:, 3].max() <= h


def test_loss_matches_torchvision_in_train_mode(tv_and_ours) -> None:
    tv, ours = tv_and_ours
    tv.train()
    ours.train()
    torch.manual_seed(2)
    images = [torch.rand(3, h, w) for h, w in SIZES]
    expected, got = tv(images, TARGETS), ours(images, TARGETS)
    for key in ("bbox_regression", "classification"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["loss"], got["bbox_regression"] + got["classification"])
    ours.eval()


def test_anchors_count_and_cache() -> None:
    model = ssdlite320(backbone="mobilenet_v3_small", num_classes=3).eval()
    out = model(torch.zeros(1, 3, 320, 320))
    assert out["anchors"].shape == (3234, 4)  # torchvision's count at 320
    assert out["cls_logits"].shape == (1, 3234, 3) and out["bbox_regression"].shape == (1, 3234, 4)
    again = model(torch.zeros(2, 3, 320, 320))
    assert again["anchors"] is out["anchors"]  # computed once per size, device and dtype


def test_box_coder_round_trip() -> None:
    torch.manual_seed(3)
    coder = BoxCoder()
    xy = torch.rand(50, 2) * 200
    anchors = torch.cat((xy, xy + 10 + torch.rand(50, 2) * 100), dim=1)
    xy = torch.rand(50, 2) * 200
    boxes = torch.cat((xy, xy + 5 + torch.rand(50, 2) * 150), dim=1)
    codes = coder.encode(boxes, anchors)
    torch.testing.assert_close(coder.decode(codes, anchors), boxes, rtol=1e-5, atol=1e-3)
    assert coder.encode(anchors, anchors).abs().max() < 1e-6
    # (10, 10, 5, 5): a box shifted by half an anchor width has dx = 10 * 0.5.
    shifted = anchors + torch.stack([(anchors[:, 2] - anchors[:, 0]) / 2, 0 * anchors[:, 0]] * 2, 1)
    torch.testing.assert_close(coder.encode(shifted, anchors)[:, 0], torch.full((50,), 5.0))


def test_matching_gives_every_box_its_best_anchor() -> None:
    anchors = torch.tensor(
        [[0.0, 0, 10, 10], [0, 0, 20, 20], [50, 50, 60, 60], [100, 100, 200, 200]]
    )
    boxes = torch.tensor([[0.0, 0, 19, 19], [52, 52, 70, 70]])  # IoU 0.31 with anchor 2 only
    matched = match_anchors(boxes, anchors, 0.5)
    assert matched.tolist() == [-1, 0, 1, -1]
    assert match_anchors(torch.zeros(0, 4), anchors).tolist() == [-1] * 4


def test_hard_negative_mining_takes_three_highest_negatives_per_positive() -> None:
    loss = torch.tensor([[5.0, 0.1, 0.9, 0.2, 0.8, 0.7, 0.3, 0.95]])
    positive = torch.tensor([[True, False, False, False, False, False, False, False]])
    mask = hard_negative_mask(loss, positive, 3.0)
    assert mask.nonzero()[:, 1].tolist() == [2, 4, 7]
    assert not hard_negative_mask(loss, torch.zeros_like(positive), 3.0).any()


def _focal(logit: float, target: float, alpha: float = 0.75, gamma: float = 2.0) -> float:
    p = 1 / (1 + math.exp(-logit))
    p_t = p if target else 1 - p
    alpha_t = alpha if target else 1 - alpha
    return -alpha_t * (1 - p_t) ** gamma * math.log(p_t)


def test_focal_loss_matches_hand_computation() -> None:
    anchors = torch.tensor([[0.0, 0, 10, 10], [100, 100, 150, 150]])
    logits = torch.tensor([[[0.0, -1.0, 0.5], [1.0, -1.0, 2.0]]])
    regression = torch.tensor([[[0.5, 0.0, 0.0, 0.0], [3.0, 3.0, 3.0, 3.0]]])
    targets = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([2])}]
    losses = detection_loss(logits, regression, anchors, targets, BoxCoder(), loss="focal")
    # Anchor 0 matches the box (class 2, zero box code), anchor 1 is background (class 0).
    expected_cls = sum(_focal(x, t) for x, t in zip([0.0, -1.0, 0.5], [0, 0, 1], strict=True))
    expected_cls += sum(_focal(x, t) for x, t in zip([1.0, -1.0, 2.0], [1, 0, 0], strict=True))
    assert losses["classification"].item() == pytest.approx(expected_cls, rel=1e-5)
    assert losses["bbox_regression"].item() == pytest.approx(0.5 * 0.5**2)  # smooth-L1, beta 1
    assert losses["loss"].item() == pytest.approx(expected_cls + 0.125, rel=1e-5)


def test_focal_model_scores_are_sigmoids() -> None:
    model = ssdlite320(backbone="mobilenet_v3_small", num_classes=4, loss="focal").eval()
    logits = torch.tensor([[[-2.0, 3.0, -3.0, 0.0]]])
    torch.testing.assert_close(model.scores(logits), torch.sigmoid(logits))


def test_a_few_steps_on_one_image_lower_the_loss() -> None:
    torch.manual_seed(4)
    model = build_detector(
        "ssdlite320", backbone="mobilenet_v3_small", num_classes=3, bn_momentum=0.1
    )
    image = torch.rand(1, 3, 160, 160) * 2 - 1
    boxes = torch.tensor([[20.0, 30, 90, 120], [100, 10, 150, 60]])
    flipped = torch.stack((160 - boxes[:, 2], boxes[:, 1], 160 - boxes[:, 0], boxes[:, 3]), 1)
    # The image and its mirror: training BN needs more than one value on the 1x1 last map.
    batch = torch.cat((image, image.flip(-1)))
    labels = torch.tensor([1, 2])
    targets = [{"boxes": boxes, "labels": labels}, {"boxes": flipped, "labels": labels}]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss = model.loss(model(batch), targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_a_batch_of_one_trains_the_1x1_batchnorms_on_running_statistics() -> None:
    from mnv3.models.layers import running_stats_for_single_values

    torch.manual_seed(5)
    model = build_detector("ssdlite320", backbone="mobilenet_v3_small", num_classes=3).train()
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    targets = [{"boxes": torch.tensor([[8.0, 8, 40, 40]]), "labels": torch.tensor([1])}]
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        model(image)
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    sizes: dict[str, int] = {}
    hooks = [
        m.register_forward_hook(lambda m, a, o, n=n: sizes.__setitem__(n, a[0][0, 0].numel()))
        for n, m in norms.items()
    ]
    before = {n: m.running_mean.clone() for n, m in norms.items()}
    with running_stats_for_single_values(model):
        loss = model.loss(model(image), targets)["loss"]
    for hook in hooks:
        hook.remove()
    loss.backward()
    assert torch.isfinite(loss) and all(m.training for m in norms.values())
    single = {n for n, size in sizes.items() if size == 1}
    assert single and len(single) < len(norms)  # the last extra blocks' 1x1 maps only
    for name, module in norms.items():
        unchanged = torch.equal(module.running_mean, before[name])
        assert unchanged == (name in single), name  # batch statistics everywhere else
    assert all(norms[n].weight.grad is not None for n in single)  # still trained


def test_other_backbones_and_reduced_tail_rules() -> None:
    for backbone in ("mobilenet_v3_small", "mobilenet_v2"):
        model = ssdlite320(backbone=backbone, num_classes=5).eval()
        assert model.name == f"ssdlite320_{backbone}"
        out = model(torch.zeros(1, 3, 320, 320))
        assert out["cls_logits"].shape == (1, 3234, 5)
    full, reduced = (
        ssdlite320(backbone="mobilenet_v3_small", reduced_tail=r) for r in (False, True)
    )
    assert full.backbone.tap("C5").channels == 2 * reduced.backbone.tap("C5").channels == 576
    with pytest.raises(ValueError, match="MobileNetV3 only"):
        ssdlite320(backbone="mobilenet_v2", reduced_tail=True)
    with pytest.raises(ValueError, match="reduced_tail=True"):
        ssdlite320(backbone_weights="mobilenet_v3_large.IMAGENET1K_V1", reduced_tail=True)


def test_madds_count_the_detection_head() -> None:
    model = ssdlite320(backbone="mobilenet_v3_small", num_classes=91)
    total, backbone = count_madds(model, 320), count_madds(model.backbone, 320)
    # The class predictor's 1x1 on the 20x20 C4 map alone: 400 positions x 546 outputs x 288 in.
    assert total - backbone > 20 * 20 * 6 * 91 * 288


def test_checkpoint_of_another_architecture_is_one_clear_error(tmp_path: Path) -> None:
    small = ssdlite320(backbone="mobilenet_v3_small", num_classes=5)
    path = tmp_path / "small.pth"
    torch.save(small.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"does not fit ssdlite320_mobilenet_v3_large.*first"):
        ssdlite320(weights=str(path), num_classes=5)
    with pytest.raises(CheckpointError, match="are for ssdlite320_mobilenet_v3_large"):
        ssdlite320(backbone="mobilenet_v3_small", weights="ssdlite320_mobilenet_v3_large.COCO_V1")


def test_other_class_count_keeps_all_but_class_predictors(tv_and_ours, tmp_path: Path) -> None:
    tv, _ = tv_and_ours
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    model = ssdlite320(weights=str(path), num_classes=7)
    tv_sd = tv.state_dict()
    torch.testing.assert_close(
        model.head.regression[0].project.weight,
        tv_sd["head.regression_head.module_list.0.1.weight"],
    )
    torch.testing.assert_close(
        model.backbone.stem.conv.weight, tv_sd["backbone.features.0.0.0.weight"]
    )
    assert model.head.classification[0].project.weight.shape[0] == 6 * 7


def test_list_input_needs_targets_in_train_mode_and_rejects_bad_boxes() -> None:
    model = ssdlite320(backbone="mobilenet_v3_small", num_classes=3)
    images = [torch.rand(3, 64, 80)]
    with pytest.raises(ValueError, match="needs targets"):
        model(images)
    bad = [{"boxes": torch.tensor([[10.0, 10, 5, 20]]), "labels": torch.tensor([1])}]
    with pytest.raises(ValueError, match="positive width and height"):
        model(images, bad)
    model.eval()
    (det,) = model(images)
    assert set(det) == {"boxes", "scores", "labels"}
    assert det["boxes"][:, 2].max() <= 80 and det["boxes"][:, 3].max() <= 64


def test_backbone_weights_from_an_imagenet_classifier(tmp_path: Path) -> None:
    classifier = mobilenet_v3_small(num_classes=1000)
    path = tmp_path / "small_imagenet.pth"
    torch.save(classifier.state_dict(), path)
    model = ssdlite320(backbone="mobilenet_v3_small", num_classes=3, backbone_weights=str(path))
    assert model.backbone.tap("C5").channels == 576  # full tail: the checkpoint's
    torch.testing.assert_close(
        model.backbone.last_conv.conv.weight, classifier.last_conv.conv.weight
    )
