"""ONNX export of the three heads, an onnxruntime runner for SSDLite, and static int8 (QDQ).

The classifier exports its logits and LR-ASPP its logits at the input size. SSDLite exports
decoded boxes (xyxy in input pixels, clipped) and class scores; the anchors are constants of
the graph, so its input size is fixed (the batch stays dynamic). Score threshold, top-k and
per-class NMS stay outside the graph (FACTS: they lower badly to mobile runtimes):
:func:`run_onnx_detector` applies them exactly as ``SSDLite.postprocess`` does.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn

from mnv3.deploy.common import (
    ExportError,
    atomic_output,
    check_calibration,
    check_input_size,
    postprocess_detections,
    write_sidecar,
)
from mnv3.models.detection.ssdlite import SSDLite

DEFAULT_OPSET = 20
# onnxruntime's entropy calibration is left out: quantize_static (1.32) cannot set its histogram
# sizes and its defaults (128 bins, 128 quantized bins) leave one candidate range, MinMax's
# (measured: every scale equal to MinMax's).
CalibrationMethod = Literal["minmax", "percentile"]
CALIBRATION_METHODS: tuple[str, ...] = get_args(CalibrationMethod)


class DetectorNetwork(nn.Module):
    """SSDLite's network alone, ``images -> (cls_logits, bbox_regression)``: the part that is
    quantized (and what QAT trains: the detector's loss matches anchors on these outputs)."""

    def __init__(self, detector: SSDLite) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.detector.head(self.detector.features(images))


class DetectorForExport(nn.Module):
    """SSDLite with box decoding and scores in the graph: ``images -> (boxes, scores)``.

    ``boxes`` (N, A, 4) xyxy in the input's pixels, clipped to it; ``scores`` (N, A, C - 1)
    class probabilities without the background, as ``SSDLite.postprocess`` sees them.
    """

    def __init__(
        self, detector: SSDLite, input_size: tuple[int, int], network: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.detector = detector
        # ``network``: a replacement of DetectorNetwork(detector) with the same outputs, e.g.
        # its int8 graph from quantization-aware training.
        self.network = network if network is not None else DetectorNetwork(detector)
        self.input_size = check_input_size(input_size)
        with torch.no_grad():
            probe = torch.zeros(1, 3, *self.input_size)
            anchors = detector.forward_batch(probe)["anchors"].detach().clone()
        self.register_buffer("anchors", anchors, persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls_logits, bbox_regression = self.network(images)
        boxes = self.detector.box_coder.decode(bbox_regression, self.anchors)
        h, w = self.input_size
        x = boxes[..., 0::2].clamp(0, w)
        y = boxes[..., 1::2].clamp(0, h)
        boxes = torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)
        return boxes, self.detector.scores(cls_logits)[..., 1:]


def export_module(model: nn.Module, input_size: tuple[int, int]) -> tuple[nn.Module, list[str]]:
    """The module to export for ``model`` and its output names (detectors get their decoder)."""
    if isinstance(model, SSDLite):
        return DetectorForExport(model, input_size).eval(), ["boxes", "scores"]
    return model, ["logits"]


def program_module(model: nn.Module, input_size: tuple[int, int]) -> tuple[nn.Module, list[str]]:
    """The module an exported program is made of and its output names (ONNX's choice per head);
    an already wrapped :class:`DetectorForExport` must match ``input_size``."""
    if isinstance(model, DetectorForExport):
        if tuple(model.input_size) != tuple(input_size):
            raise ExportError(
                f"the detector was wrapped for {model.input_size[0]}x{model.input_size[1]} "
                f"inputs but the example input is {input_size[0]}x{input_size[1]}; expected "
                "the same size (its anchors are constants of the program)"
            )
        return model, ["boxes", "scores"]
    return export_module(model, input_size)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: torch.Tensor,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Export ``model`` (in eval mode) to ONNX at ``path`` with torch's dynamo exporter.

    Args:
        model: a classifier, an ``SSDLite`` (exported with :class:`DetectorForExport`) or a
            segmenter.
        path: the ``.onnx`` file; written atomically, with ``metadata`` as ``<path>.json``.
        example_input: a ``(N, C, H, W)`` batch that fixes the input size (and the batch when
            ``dynamic_batch`` is false).
        dynamic_batch: leave the batch dimension free (a symbolic ``batch`` axis).
        opset: the ONNX opset (20: HardSwish and HardSigmoid are native ops since opset 14).
        metadata: preprocessing and labels for the sidecar json (plain JSON values).

    Returns the path of the written model.
    """
    if example_input.dim() != 4:
        raise ExportError(
            f"example input has shape {tuple(example_input.shape)}; expected (N, C, H, W)"
        )
    check_input_size(tuple(example_input.shape[-2:]), model)
    module, output_names = export_module(model.eval(), tuple(example_input.shape[-2:]))
    # A batch of one would be specialised by torch.export; trace with two when it must stay free.
    if dynamic_batch and example_input.shape[0] == 1:
        example_input = example_input.expand(2, -1, -1, -1).contiguous()
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None
    path = Path(path)
    with atomic_output(path) as tmp, warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example_input,),
            str(tmp),
            dynamo=True,
            opset_version=opset,
            input_names=["images"],
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            external_data=False,
            verbose=False,
        )
        if metadata is not None:
            write_sidecar(path, {**metadata, "format": "onnx", "outputs": output_names})
    return path


def onnx_op_types(path: str | os.PathLike[str]) -> set[str]:
    """The operator types of an ONNX graph (its top level and every function it defines)."""
    import onnx

    graph = onnx.load(str(path))
    ops = {node.op_type for node in graph.graph.node}
    for function in graph.functions:
        ops |= {node.op_type for node in function.node}
    return ops


def onnx_session(path: str | os.PathLike[str], threads: int | None = None) -> Any:
    """An onnxruntime CPU ``InferenceSession`` (``threads``: intra-op threads; None: ORT's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, images: torch.Tensor | np.ndarray) -> list[np.ndarray]:
    """All outputs of ``session`` on one ``(N, C, H, W)`` float batch."""
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(array, dtype=np.float32)})


def run_onnx_detector(
    session: Any,
    images: torch.Tensor | np.ndarray,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    **thresholds: Any,
) -> list[dict[str, torch.Tensor]]:
    """Detections from an exported SSDLite, post-processed as ``SSDLite.postprocess`` does.

    ``images``: the resized, normalised ``(N, 3, H, W)`` batch; ``image_sizes``: each image's
    original (h, w) to scale the boxes into (default: the input size); ``thresholds``:
    :func:`~mnv3.deploy.common.postprocess_detections`' ``score_thresh``, ``nms_thresh``,
    ``topk_candidates`` and ``detections_per_img``. Returns per image ``{boxes, scores,
    labels}`` (labels count the background as 0, as the model's).
    """
    boxes, scores = (torch.from_numpy(out) for out in run_onnx(session, images))
    input_size = (int(images.shape[-2]), int(images.shape[-1]))
    return postprocess_detections(boxes, scores, input_size, image_sizes, **thresholds)


def postprocess_metadata(network: nn.Module) -> dict[str, Any] | None:
    """What a runtime must do after an exported detector (NMS stays outside the graph), for the
    sidecar json; None for networks whose outputs are final (classifier, segmenter)."""
    if not isinstance(network, SSDLite):
        return None
    return {
        "outputs": "boxes (N, A, 4) xyxy in input pixels; scores (N, A, C-1) without background",
        "score_thresh": float(network.score_thresh),
        "nms_thresh": float(network.nms_thresh),
        "topk_candidates": int(network.topk_candidates),
        "detections_per_img": int(network.detections_per_img),
        "labels": "index into scores + 1 (0 is the background)",
        "runner": "mnv3.deploy.run_onnx_detector",
    }


class _BatchReader:
    """onnxruntime's ``CalibrationDataReader`` protocol over a list of batches.

    ``batch_size`` 1 feeds the images one by one: a model exported with a fixed batch of 1 takes
    no other shape (calibration statistics are the same either way).
    """

    def __init__(
        self, input_name: str, batches: Iterable[torch.Tensor], batch_size: int | None = None
    ) -> None:
        if batch_size is not None:
            batches = [one for b in batches for one in b.split(batch_size)]
        self._feeds = iter(
            [{input_name: b.detach().cpu().numpy().astype(np.float32)} for b in batches]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def postprocess_nodes(path: str | os.PathLike[str]) -> list[str]:
    """Names of the nodes after the network's last weighted layer: those from which no
    Conv / Gemm / MatMul can be reached (box decoding, softmax, a final resize, reshapes).

    Found on the graph, not by name, so it holds for every head and any exporter's naming.
    """
    import onnx

    graph = onnx.load(str(path)).graph
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    feeds_weighted: dict[int, bool] = {}
    # ONNX nodes are stored in topological order: walking backwards sees consumers first.
    for index in range(len(graph.node) - 1, -1, -1):
        node = graph.node[index]
        feeds_weighted[id(node)] = any(
            c.op_type in WEIGHTED_OPS or feeds_weighted[id(c)]
            for out in node.output
            for c in consumers.get(out, [])
        )
    return [
        node.name
        for node in graph.node
        if node.op_type not in WEIGHTED_OPS and not feeds_weighted[id(node)]
    ]


def quantize_onnx(
    fp32_path: str | os.PathLike[str],
    path: str | os.PathLike[str],
    calibration: Sequence[torch.Tensor],
    per_channel: bool = False,
    metadata: Mapping[str, Any] | None = None,
    float_postprocess: bool = True,
    calibration_method: CalibrationMethod = "minmax",
) -> Path:
    """Static int8 QDQ model at ``path`` from the fp32 ONNX model and calibration batches.

    onnxruntime's recipe for CNNs: ``quant_pre_process`` (shape inference, graph optimisation),
    then ``quantize_static`` in QDQ format with uint8 activations and int8 weights.

    Args:
        fp32_path: the model written by :func:`export_onnx`.
        path: the int8 ``.onnx``; written atomically, with ``metadata`` as ``<path>.json``.
        calibration: preprocessed image batches whose activation ranges set the scales.
        per_channel: per-output-channel weight scales (FACTS: reported worse on MobileNetV3's
            depthwise blocks, onnxruntime#11415; measured in docs/deployment.md).
        metadata: preprocessing and labels for the sidecar json.
        float_postprocess: keep the nodes after the last weighted layer (Conv / Gemm / MatMul)
            in float: SSDLite's box decoding and softmax, LR-ASPP's final resize. Quantizing
            decoded pixel coordinates and class probabilities to 8 bits cost the detector
            7 points of mAP (docs/deployment.md); the network itself stays int8 either way.
        calibration_method: onnxruntime's range estimate: ``minmax`` or ``percentile`` (the
            99.999th percentile of absolute values, symmetric ranges).
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    check_calibration(calibration)
    if calibration_method not in CALIBRATION_METHODS:
        raise ExportError(
            f"calibration_method={calibration_method!r} is unknown; "
            f"expected one of {', '.join(CALIBRATION_METHODS)}"
        )
    path = Path(path)
    with atomic_output(path) as tmp, tempfile.TemporaryDirectory() as scratch:
        pre = Path(scratch) / "preprocessed.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        excluded = postprocess_nodes(pre) if float_postprocess else []
        _quantize_static(pre, tmp, calibration, per_channel, excluded, calibration_method)
        if metadata is not None:
            recipe = {
                "per_channel": per_channel,
                "calibration_method": calibration_method,
                "float_postprocess": float_postprocess,
            }
            write_sidecar(path, {**metadata, "format": "onnx", "quantize": "int8", **recipe})
    return path


def _quantize_static(
    pre: Path,
    out: Path,
    calibration: Sequence[torch.Tensor],
    per_channel: bool,
    excluded: list[str],
    calibration_method: CalibrationMethod,
) -> None:
    """onnxruntime's ``quantize_static`` in QDQ format: uint8 activations, int8 weights."""
    from onnxruntime.quantization import CalibrationMethod as OrtMethod
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    methods = {"minmax": OrtMethod.MinMax, "percentile": OrtMethod.Percentile}
    graph_input = onnx_session(pre).get_inputs()[0]
    fixed = graph_input.shape[0] if isinstance(graph_input.shape[0], int) else None
    quantize_static(
        str(pre),
        str(out),
        _BatchReader(graph_input.name, calibration, batch_size=fixed),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
        nodes_to_exclude=excluded,
        calibrate_method=methods[calibration_method],
    )
