"""ExecuTorch ``.pte`` (XNNPACK) for the dense heads: LR-ASPP logits and SSDLite boxes / scores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from deploy_helpers import assert_same_top_detections, with_batch_statistics
from torch import nn

from mnv3.deploy import (
    DetectorForExport,
    ExportError,
    export_pte,
    load_pte,
    pte,
    read_sidecar,
    run_pte,
    run_pte_detector,
    run_pte_outputs,
)
from mnv3.deploy.onnx_export import program_module
from mnv3.models import ssdlite320
from mnv3.models.segmentation import lraspp

SEG_SIZE = (64, 128)
DET_SIZE = 96
CONSTANT_COPY = "dim_order_ops__to_dim_order_copy_default"  # scalar constants, once per call
# The decoder's indexing (boxes[..., 0], boxes[..., 0::2]): the only compute XNNPACK leaves.
DECODER_INDEXING = {"aten_select_copy_int", "aten_slice_copy_tensor"}


@pytest.fixture(scope="module")
def segmenter() -> nn.Module:
    torch.manual_seed(0)
    # The paper's gate pooling sized so the 4x8 map pools to a 1x3 grid: the gate is resized
    # back (bilinear, corners aligned) as at 1024x2048, not a global pool as at 769.
    model = lraspp(backbone="mobilenet_v3_small", num_classes=4, pool_crop_size=33, pool_stride=2)
    assert model.head.gate_pool(torch.zeros(1, 1, 4, 8)).shape[-2:] == (1, 3)
    return with_batch_statistics(model, SEG_SIZE)


@pytest.fixture(scope="module")
def detector() -> nn.Module:
    torch.manual_seed(0)
    model = with_batch_statistics(ssdlite320(backbone="mobilenet_v3_small", num_classes=4), 96)
    model.score_thresh = 0.3  # a random network's scores: keep a few dozen candidates
    return model


def _images(count: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randn(count, 3, *size, generator=torch.Generator().manual_seed(seed))


def test_pte_segmenter_fp32_matches_eager_and_int8_agrees_on_pixels(
    tmp_path: Path, segmenter: nn.Module
) -> None:
    x = _images(12, SEG_SIZE, seed=1)
    path = export_pte(segmenter, tmp_path / "seg.pte", x[:1], metadata={"task": "segmentation"})
    sidecar = read_sidecar(path)
    assert sidecar["outputs"] == ["logits"] and sidecar["task"] == "segmentation"
    # Everything but scalar constant copies runs in one XNNPACK subgraph: the bilinear
    # resizes, the paper's gate pooling and sigmoid included.
    assert sidecar["xnnpack"]["subgraphs"] == 1
    assert set(sidecar["xnnpack"]["portable_ops"]) <= {CONSTANT_COPY}
    with torch.no_grad():
        expected = segmenter(x)
    got = run_pte(load_pte(path), x[8:])  # three batch-1 calls
    assert got.shape == (4, 4, *SEG_SIZE)
    torch.testing.assert_close(got, expected[8:], atol=1e-4, rtol=1e-4)

    path8 = export_pte(segmenter, tmp_path / "seg8.pte", x[:1], "int8", [x[:8]], {})
    assert set(read_sidecar(path8)["xnnpack"]["portable_ops"]) <= {CONSTANT_COPY}
    got8 = run_pte(load_pte(path8), x[8:])
    # Measured on these held-out images: 0.93-0.96 over three seeds.
    agreement = (got8.argmax(dim=1) == expected[8:].argmax(dim=1)).float().mean()
    assert agreement >= 0.85


def test_pte_detector_fp32_matches_eager_and_runner_gives_postprocess_boxes(
    tmp_path: Path, detector: nn.Module
) -> None:
    x = _images(2, (DET_SIZE, DET_SIZE), seed=2)
    path = export_pte(detector, tmp_path / "det.pte", x[:1], metadata={"task": "detection"})
    sidecar = read_sidecar(path)
    assert sidecar["outputs"] == ["boxes", "scores"]
    assert sidecar["postprocess"]["runner"] == pte.PTE_DETECTOR_RUNNER
    assert sidecar["postprocess"]["score_thresh"] == 0.3
    # exp / clamp / softmax / stack of the decoder are delegated too.
    assert set(sidecar["xnnpack"]["portable_ops"]) <= DECODER_INDEXING | {CONSTANT_COPY}
    method = load_pte(path)
    boxes, scores = run_pte_outputs(method, x)
    with torch.no_grad():
        expected_boxes, expected_scores = DetectorForExport(detector, (DET_SIZE,) * 2)(x)
    torch.testing.assert_close(boxes, expected_boxes, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(scores, expected_scores, atol=1e-4, rtol=1e-5)

    sizes = [(192, 160), (96, 96)]
    got = run_pte_detector(method, x, sizes, score_thresh=0.3)
    with torch.no_grad():
        expected = detector.postprocess(detector(x), sizes, input_size=(DET_SIZE, DET_SIZE))
    assert_same_top_detections(got, expected)


def test_pte_detector_int8_quantizes_the_network_only(detector: nn.Module) -> None:
    """``export_pte(detector, quantize="int8")`` rounds only the network's tensors to 8 bits, and
    its int8 graph stays close to eager.

    Checked on the graph ``export_pte`` hands to XNNPACK (``pte._lowered_graph``), run eagerly,
    without a second int8 lowering of SSDLite: that lowering (int8 network, float decoder) is
    ``tests/test_detect.py::TestDetectionRun::test_cli_exports_a_qat_int8_detector_to_pte``.
    """
    x = _images(12, (DET_SIZE, DET_SIZE), seed=3)
    wrapped, _ = program_module(detector, (DET_SIZE, DET_SIZE))  # as export_pte wraps it
    converted = pte._lowered_graph(wrapped, x[:1], "int8", [x[:8]], None)
    nodes = [n for n in converted.graph.nodes if n.op == "call_function"]
    convs = sum(n.target == torch.ops.aten.conv2d.default for n in nodes)
    per_channel = sum("dequantize_per_channel" in str(n.target) for n in nodes)
    assert convs > 0 and per_channel == convs  # every conv weight is int8
    quantized_inputs = [n.args[0] for n in nodes if "quantize_per_tensor" in str(n.target)]
    # Only network outputs are rounded to 8 bits, never a decoded coordinate or a probability.
    assert quantized_inputs and all(pte.inside_network(n) for n in quantized_inputs)

    with torch.no_grad():  # the graph takes the program's batch of 1
        outputs = [converted(x[i : i + 1]) for i in range(8, 12)]
        expected_boxes, expected_scores = wrapped(x[8:])
    box_error = (torch.cat([b for b, _ in outputs]) - expected_boxes).abs().flatten()
    score_error = (torch.cat([s for _, s in outputs]) - expected_scores).abs().flatten()
    # Measured on held-out images (image seeds 3-5, 96 px input), this graph: box error median
    # 0.07-0.09 px, 99th percentile 1.3-2.0 px; score error median 0.006-0.007, max 0.11-0.21;
    # its lowered program on the same images: 0.07-0.09 px, 1.4-2.1 px; 0.006-0.007, 0.11-0.22.
    assert box_error.median() <= 0.25 and box_error.quantile(0.99) <= 4.0
    assert score_error.median() <= 0.02 and score_error.max() <= 0.35


def test_pte_refuses_what_cannot_be_exported(tmp_path: Path, detector: nn.Module) -> None:
    wrapped = DetectorForExport(detector, (DET_SIZE, DET_SIZE))
    with pytest.raises(
        ExportError, match="wrapped for 96x96 inputs but the example input is 128x128"
    ):
        export_pte(wrapped, tmp_path / "d.pte", torch.zeros(1, 3, 128, 128))
    with pytest.raises(ExportError, match=r"example input has shape \(3, 96, 96\)"):
        export_pte(detector, tmp_path / "d.pte", torch.zeros(3, DET_SIZE, DET_SIZE))
    assert not list(tmp_path.iterdir())
