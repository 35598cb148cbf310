"""ONNX export: parity with eager for the three heads (HardSwish / HardSigmoid native), and
onnxruntime QDQ int8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from deploy_helpers import assert_same_top_detections, only_standard_ops, with_batch_statistics
from torch import nn

from mnv3.deploy import (
    ExportError,
    export_onnx,
    onnx_op_types,
    onnx_session,
    quantize_onnx,
    read_sidecar,
    run_onnx,
    run_onnx_detector,
    top1_agreement,
)
from mnv3.models import lraspp, ssdlite320


@pytest.fixture(scope="module")
def classifier_onnx(
    tmp_path_factory: pytest.TempPathFactory, classifier: nn.Module, images: torch.Tensor
) -> Path:
    """The classifier exported once (dynamic batch, a sidecar): the fp32 model of every test
    below that starts from one."""
    folder = tmp_path_factory.mktemp("classifier_onnx")
    return export_onnx(classifier, folder / "cls.onnx", images[:1], metadata={"mean": [0.5]})


def test_onnx_classifier_matches_eager_with_native_hard_activations(
    classifier_onnx: Path, classifier: nn.Module, images: torch.Tensor
) -> None:
    path = classifier_onnx
    ops = onnx_op_types(path)
    assert {"HardSwish", "HardSigmoid"} <= ops and only_standard_ops(path)
    assert not {"Sigmoid", "Clip"} & ops  # h-swish / h-sigmoid not decomposed
    (logits,) = run_onnx(onnx_session(path), images[:3])  # batch 3: the batch axis is free
    with torch.no_grad():
        expected = classifier(images[:3])
    assert expected.abs().max() > 0.1
    assert np.abs(logits - expected.numpy()).max() <= 1e-4
    sidecar = read_sidecar(path)
    assert sidecar["mean"] == [0.5] and sidecar["format"] == "onnx"
    assert sorted(p.name for p in path.parent.iterdir()) == ["cls.onnx", "cls.onnx.json"]


def test_onnx_segmenter_matches_eager_at_input_size(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = with_batch_statistics(lraspp(backbone="mobilenet_v3_small", num_classes=4), (64, 96))
    x = torch.randn(2, 3, 64, 96)
    path = export_onnx(model, tmp_path / "seg.onnx", x[:1])
    (logits,) = run_onnx(onnx_session(path), x)
    with torch.no_grad():
        expected = model(x)
    assert logits.shape == (2, 4, 64, 96)
    assert np.abs(logits - expected.numpy()).max() <= 1e-4
    assert {"HardSwish", "HardSigmoid"} <= onnx_op_types(path) and only_standard_ops(path)


def test_onnx_detector_with_nms_outside_gives_the_same_top_boxes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = with_batch_statistics(ssdlite320(backbone="mobilenet_v3_small", num_classes=4), 96)
    model.score_thresh = 0.3
    x = torch.randn(2, 3, 96, 96)
    path = export_onnx(model, tmp_path / "det.onnx", x[:1])
    assert not {"NonMaxSuppression", "TopK"} & onnx_op_types(path)
    sizes = [(192, 160), (96, 96)]
    got = run_onnx_detector(onnx_session(path), x, sizes, score_thresh=0.3)
    with torch.no_grad():
        expected = model.postprocess(model(x), sizes, input_size=(96, 96))
    assert_same_top_detections(got, expected)


@pytest.mark.parametrize("per_channel", [False, True])
def test_onnx_qdq_int8_agrees_on_most_top1(
    tmp_path: Path,
    classifier_onnx: Path,
    classifier: nn.Module,
    images: torch.Tensor,
    per_channel: bool,
) -> None:
    fp32 = classifier_onnx
    path = quantize_onnx(fp32, tmp_path / "int8.onnx", [images[:8], images[8:]], per_channel, {})
    ops = onnx_op_types(path)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    (logits,) = run_onnx(onnx_session(path), images)
    with torch.no_grad():
        assert top1_agreement(torch.from_numpy(logits), classifier(images)) >= 0.75
    assert read_sidecar(path)["per_channel"] is per_channel
    with pytest.raises(ExportError, match="calibration set is empty"):
        quantize_onnx(fp32, tmp_path / "never.onnx", [], per_channel)
    assert not (tmp_path / "never.onnx").exists()
    if not per_channel:  # a model exported for batch 1 calibrates on batches of 8 too
        fixed = export_onnx(classifier, tmp_path / "fixed.onnx", images[:1], dynamic_batch=False)
        quantized = quantize_onnx(fixed, tmp_path / "fixed_int8.onnx", [images[:8]], False, {})
        assert {"QuantizeLinear", "DequantizeLinear"} <= onnx_op_types(quantized)
