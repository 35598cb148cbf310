"""int8 accuracy of a trained detector or segmenter: eager vs ONNX fp32 vs onnxruntime QDQ int8.

``python bench/bench_int8_dense.py <run>/checkpoints/best.ckpt [--calibration-batches 4] [--pte]``

The run's own config rebuilds its validation split; the network is exported with
:func:`mnv3.deploy.export_onnx` and quantized with :func:`mnv3.deploy.quantize_onnx` in the
:data:`RECIPES` below (weight scales per tensor or per channel, MinMax / percentile activation
ranges, post-processing in int8 or kept in float), calibrated on the first validation
batches. Detection is scored with COCO mAP (COCOeval's thresholds) after
:func:`mnv3.deploy.run_onnx_detector`'s post-processing, segmentation with mIoU over the whole
split; the table prints each path's drop from eager.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric

from mnv3.data.coco import COCO_IOU_THRESHOLDS, COCO_RECALL_THRESHOLDS
from mnv3.deploy import (
    DetectorForExport,
    DetectorNetwork,
    export_onnx,
    export_pte,
    load_pte,
    onnx_session,
    qat_network,
    quantize_onnx,
    quantize_ptq,
    run_onnx,
    run_onnx_detector,
    run_pte_detector,
    run_pte_outputs,
)
from mnv3.deploy.onnx_export import CalibrationMethod
from mnv3.trained_run import TrainedRun

# (row name, per-channel weights, calibration method, post-processing kept in float)
RECIPES: tuple[tuple[str, bool, CalibrationMethod, bool], ...] = (
    ("per-tensor, MinMax, all int8", False, "minmax", False),
    ("per-tensor, MinMax, float post-processing (default)", False, "minmax", True),
    ("per-channel, MinMax, float post-processing", True, "minmax", True),
    ("per-tensor, percentile, float post-processing", False, "percentile", True),
)


PTE_ROW = "ExecuTorch XNNPACK int8 (network only, per-channel)"


def pt2e_graphs(
    task: Any,
    net: nn.Module,
    datamodule: Any,
    calibration: list[torch.Tensor],
    steps: int,
    backends: Sequence[str] = ("x86", "xnnpack"),
) -> dict[str, Callable[[torch.Tensor], Any]]:
    """torchao PT2E int8 graphs of the task's QAT network (raw outputs: a detector's before box
    decoding): PTQ on ``calibration``, QAT at lr 0 (fake quantization with moving-average ranges
    over ``steps`` training batches, weights unchanged) and QAT fine-tuning (``steps`` SGD steps
    at lr 1e-4, BatchNorm frozen halfway) as ``mnv3.export qat_steps=...`` runs them, each with
    the ``backends``' quantizers (x86, XNNPACK). Empty when ``steps`` is 0."""
    if steps <= 0:
        return {}
    example = calibration[0][:1]
    network = task.qat_objective(net, example).network
    pair = isinstance(network, DetectorNetwork)
    graphs: dict[str, Callable[[torch.Tensor], Any]] = {}
    for backend in backends:
        ptq = quantize_ptq(network, example, calibration, backend)
        # The XNNPACK graph takes the batch it was exported with (1): feed images one by one.
        graphs[f"torchao PT2E PTQ, {backend}"] = (
            _one_by_one(ptq, pair) if backend == "xnnpack" else ptq
        )
        for lr, name in (
            (0.0, f"QAT lr 0 ({steps} train batches)"),
            (1e-4, f"QAT {steps} steps lr 1e-4"),
        ):
            graphs[f"torchao PT2E {name}, {backend}"] = qat_network(
                task, net, datamodule, example, steps, lr, backend
            )
    return graphs


def _one_by_one(graph: Callable[[torch.Tensor], Any], pair: bool) -> Callable[[torch.Tensor], Any]:
    def run(images: torch.Tensor) -> Any:
        outs = [graph(images[i : i + 1]) for i in range(images.shape[0])]
        if pair:
            return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        return torch.cat(outs)

    return run


def metric(task: str, num_classes: int) -> Metric:
    """COCO mAP for detection, whole-split per-class IoU (NaN = absent) for segmentation."""
    if task == "detection":
        from torchmetrics.detection import MeanAveragePrecision

        return MeanAveragePrecision(
            box_format="xyxy",
            iou_type="bbox",
            iou_thresholds=list(COCO_IOU_THRESHOLDS),
            rec_thresholds=list(COCO_RECALL_THRESHOLDS),
        )
    from torchmetrics.classification import MulticlassJaccardIndex

    return MulticlassJaccardIndex(
        num_classes=num_classes, ignore_index=255, average=None, zero_division=float("nan")
    )


def score(task: str, result: object) -> dict[str, float]:
    if task == "detection":
        return {"mAP": float(result["map"]), "mAP@0.5": float(result["map_50"])}
    return {"mIoU": float(result[~torch.isnan(result)].mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", type=Path, help="a detection or segmentation best.ckpt")
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument(
        "--qat-steps",
        type=int,
        default=0,
        help="also score torchao PT2E int8 (x86 and XNNPACK quantizers, converted graphs run "
        "eagerly): PTQ, QAT with lr 0 over this many training batches (moving-average ranges) "
        "and QAT fine-tuning for this many steps; 0: skip",
    )
    parser.add_argument(
        "--qat-backends",
        nargs="+",
        default=["x86", "xnnpack"],
        choices=["x86", "xnnpack"],
        help="the PT2E quantizers of --qat-steps (default both)",
    )
    parser.add_argument(
        "--pte",
        action="store_true",
        help="also score the ExecuTorch XNNPACK int8 program (export_pte; a minute or two more)",
    )
    args = parser.parse_args()
    run = TrainedRun.open(args.ckpt, {"num_workers": 0}, key="ckpt")
    task, task_name, net = run.task, run.task_name, run.network
    num_classes = int(run.checkpoint["hyper_parameters"]["num_classes"])
    datamodule = run.datamodule()
    datamodule.setup("fit" if args.qat_steps else "validate")
    loader = datamodule.val_dataloader()
    batches = list(loader)
    first = batches[0]["image"]
    detection = task_name == "detection"
    exportable = DetectorForExport(net, tuple(first.shape[-2:])) if detection else net
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(exportable, Path(tmp) / "fp32.onnx", first[:1])
        calibration = [b["image"] for b in batches[: args.calibration_batches]]
        sessions = {"onnxruntime fp32": onnx_session(fp32)}
        for i, (name, per_channel, method, float_post) in enumerate(RECIPES):
            path = quantize_onnx(
                fp32,
                Path(tmp) / f"int8_{i}.onnx",
                calibration,
                per_channel,
                float_postprocess=float_post,
                calibration_method=method,
            )
            sessions[f"onnxruntime int8 QDQ, {name}"] = onnx_session(path)
        programs = {}
        if args.pte:
            pte = export_pte(exportable, Path(tmp) / "int8.pte", first[:1], "int8", calibration)
            programs[PTE_ROW] = load_pte(pte)
        graphs = pt2e_graphs(task, net, datamodule, calibration, args.qat_steps, args.qat_backends)
        metrics = {"eager": metric(task_name, num_classes)}
        metrics.update({k: metric(task_name, num_classes) for k in [*sessions, *programs, *graphs]})
        for batch in batches:
            images = batch["image"]
            if detection:
                sizes = [(int(h), int(w)) for h, w in batch["orig_size"]]
                with torch.no_grad():
                    outputs = net(images)
                found = {"eager": net.postprocess(outputs, sizes, tuple(images.shape[-2:]))}
                found |= {k: run_onnx_detector(s, images, sizes) for k, s in sessions.items()}
                found |= {k: run_pte_detector(m, images, sizes) for k, m in programs.items()}
                for k, graph in graphs.items():
                    with torch.no_grad():
                        cls_logits, regression = graph(images)
                    raw = {**outputs, "cls_logits": cls_logits, "bbox_regression": regression}
                    found[k] = net.postprocess(raw, sizes, tuple(images.shape[-2:]))
                for k, detections in found.items():
                    metrics[k].update(detections, list(batch["eval_target"]))
            else:
                with torch.no_grad():
                    found = {"eager": net(images).argmax(1)}
                for k, s in sessions.items():
                    found[k] = torch.from_numpy(run_onnx(s, images)[0]).argmax(1)
                for k, m in programs.items():
                    found[k] = run_pte_outputs(m, images)[0].argmax(1)
                for k, graph in graphs.items():
                    with torch.no_grad():
                        found[k] = graph(images).argmax(1)
                for k, predicted in found.items():
                    metrics[k].update(predicted, batch["mask"])
    results = {k: score(task_name, m.compute()) for k, m in metrics.items()}
    names = list(results["eager"])
    print(f"| path | {' | '.join(names)} | drop from eager |")
    print(f"|---|{'---|' * len(names)}---|")
    for path, values in results.items():
        drop = values[names[0]] - results["eager"][names[0]]
        cells = " | ".join(f"{values[n]:.4f}" for n in names)
        print(f"| {path} | {cells} | {drop * 100:+.2f} pt |")


if __name__ == "__main__":
    main()
