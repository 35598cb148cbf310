"""Export a trained checkpoint to ONNX or ExecuTorch, fp32 or int8, with its preprocessing.

``python -m mnv3.export ckpt_path=<run>/checkpoints/best.ckpt format=onnx|pte [quantize=int8]``

The run is opened with :class:`~mnv3.trained_run.TrainedRun`: its data module's eval transform
gives the input size, the preprocessing written to ``<out>.json`` and the calibration images for
int8; the network is the one the run validated with (its EMA copy when it kept one).
:func:`mnv3.deploy.export_network` writes the file for the format and quantization asked.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mnv3.cli import exit_on_user_error, run_tool_main, to_plain
from mnv3.errors import ConfigError
from mnv3.trained_run import TrainedRun
from mnv3.validate import check_export_config

log = logging.getLogger("mnv3.export")


def _preprocessing(datamodule: Any, input_size: tuple[int, int]) -> dict[str, Any]:
    """What a deployment must do to an image before the network: the eval transform's recipe."""
    recipe: dict[str, Any] = {
        "input_size": list(input_size),
        "channels": int(datamodule.channels),
        "mean": list(datamodule.mean),
        "std": list(datamodule.std),
        "scale": "pixels / 255, then (x - mean) / std per channel",
        "layout": "NCHW float32",
    }
    recipe["resize"] = datamodule.eval_transform.resize_recipe(input_size)
    return recipe


def _metadata(run: TrainedRun, datamodule: Any, input_size: tuple[int, int], quantize: Any) -> dict:
    """The sidecar json: task, checkpoint, labels, preprocessing (and a detector's NMS)."""
    from mnv3.deploy.onnx_export import postprocess_metadata

    metadata = {
        "task": run.task_name,
        "checkpoint": str(run.ckpt_path),
        "class_names": list(datamodule.class_names),
        "preprocessing": _preprocessing(datamodule, input_size),
        "quantize": quantize,
    }
    postprocess = postprocess_metadata(run.network)
    if postprocess is not None:
        metadata["postprocess"] = postprocess
    return metadata


@exit_on_user_error
def export(cfg: DictConfig) -> Path:
    """Export the checkpoint ``cfg.ckpt_path`` as ``cfg.format``; return the written file."""
    from mnv3.deploy import ExportError, calibration_batches, example_input, export_network

    check_export_config(cfg)
    run = TrainedRun.open(cfg.ckpt_path, cfg.get("data"))
    fmt, quantize = str(cfg.format), cfg.get("quantize")
    datamodule = run.datamodule()
    size = to_plain(cfg.get("input_size")) or datamodule.input_size
    input_size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    out = cfg.get("out")
    path = (
        Path(str(out)).expanduser() if out else run.folder.export_path(run.ckpt_path, fmt, quantize)
    )
    metadata = _metadata(run, datamodule, input_size, quantize)
    qat_steps = int(cfg.get("qat_steps", 0))
    try:
        batch = int(cfg.get("pte_batch_size", 1)) if fmt in ("pte", "pt2") else 1
        example = example_input(input_size, batch=batch, channels=int(datamodule.channels))
        calibration = (
            calibration_batches(datamodule, int(cfg.calibration_images), str(cfg.calibration_split))
            if quantize == "int8" and not qat_steps
            else None
        )
        quantized = _qat(cfg, run, datamodule, example, metadata) if qat_steps else None
        export_network(
            run.network,
            path,
            fmt,
            example,
            quantize,
            calibration,
            metadata,
            quantized_network=quantized,
            dynamic_batch=bool(cfg.dynamic_batch),
            opset=int(cfg.opset),
            per_channel=bool(cfg.per_channel),
            calibration_method=str(cfg.get("calibration_method", "minmax")),  # type: ignore[arg-type]
        )
    except ExportError as exc:
        raise ConfigError(str(exc)) from exc
    log.info("wrote %s and %s.json", path, path.name)
    print(f"exported {path} ({path.stat().st_size / 1e6:.2f} MB) and {path.name}.json")
    return path


def _qat(
    cfg: DictConfig, run: TrainedRun, datamodule: Any, example: Any, metadata: dict[str, Any]
) -> Any:
    """``qat_steps``: the XNNPACK int8 network from quantization-aware training (recorded in
    the sidecar's ``qat`` entry)."""
    from mnv3.deploy import qat_network

    steps, lr = int(cfg.qat_steps), float(cfg.get("qat_lr", 0.0))
    metadata["qat"] = {"steps": steps, "lr": lr, "quantizer": "xnnpack"}
    datamodule.setup("fit")
    return qat_network(run.task, run.network, datamodule, example, steps, lr)


main = run_tool_main(export, "export")


if __name__ == "__main__":
    main()
