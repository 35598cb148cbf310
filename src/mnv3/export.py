"""Export a trained checkpoint to ONNX or ExecuTorch, fp32 or int8, with its preprocessing.

``python -m mnv3.export ckpt_path=<run>/checkpoints/best.ckpt format=onnx|pte [quantize=int8]``

The run's resolved config rebuilds the data module, whose eval transform gives the input size,
the preprocessing written to ``<out>.json`` and the calibration images for int8. The network
comes from the checkpoint's plain hyperparameters (``weights_only=True``), its EMA copy when
the run kept one (the weights it was validated with).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from mnv3.cli import (
    CONFIG_DIR,
    ConfigError,
    build_datamodule,
    exit_on_user_error,
    open_data_overrides,
    to_plain,
)
from mnv3.rundir import find_run_config
from mnv3.validate import lightning_checkpoint

log = logging.getLogger("mnv3.export")

FORMATS = ("onnx", "pte")
QUANTIZE = (None, "int8")


def check_export_config(cfg: DictConfig) -> None:
    """Refuse unknown formats, quantization modes and sizes before anything is read."""
    if cfg.get("ckpt_path") in (None, ""):
        raise ConfigError("ckpt_path is not set; expected ckpt_path=<run>/checkpoints/best.ckpt")
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format!r} is unknown; expected one of {', '.join(FORMATS)}")
    if cfg.get("quantize") not in QUANTIZE:
        raise ConfigError(f"quantize={cfg.quantize!r} is unknown; expected null or int8")
    steps = cfg.get("qat_steps", 0)
    if not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"qat_steps={steps!r} is not a count; expected 0 or more batches")
    if steps and (cfg.format != "pte" or cfg.get("quantize") != "int8"):
        raise ConfigError(
            f"qat_steps={steps} needs format=pte quantize=int8 (quantization-aware training "
            f"for ExecuTorch); got format={cfg.format} quantize={cfg.get('quantize')}"
        )
    from mnv3.deploy.onnx_export import CALIBRATION_METHODS

    method = cfg.get("calibration_method", "minmax")
    if method not in CALIBRATION_METHODS:
        raise ConfigError(
            f"calibration_method={method!r} is unknown; "
            f"expected one of {', '.join(CALIBRATION_METHODS)}"
        )
    size = cfg.get("input_size")
    if size is not None:
        plain = to_plain(size)
        if isinstance(plain, int):
            plain = [plain, plain]
        if not (
            isinstance(plain, list) and len(plain) == 2 and all(isinstance(v, int) for v in plain)
        ):
            raise ConfigError(f"input_size={plain!r} is not a size; expected [H, W] in pixels")


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


def _network(task: Any) -> Any:
    """The network the run validated with: the EMA copy if it has one."""
    import torch

    net = task.ema.module if getattr(task, "ema", None) is not None else task.model
    return net.eval().to(memory_format=torch.contiguous_format)


def qat_network(
    task: Any,
    network: Any,
    datamodule: Any,
    example: Any,
    steps: int,
    lr: float,
    backend: str = "xnnpack",
) -> Any:
    """The int8 graph of ``task.qat_objective(network, example).network`` from
    quantization-aware training on ``steps`` batches of the training split (``datamodule`` set
    up for "fit"): at lr 0 the weights stay and only the moving-average activation ranges are
    learnt (what keeps SSDLite's mAP, README); above 0 the weights are fine-tuned too
    (BatchNorm statistics frozen halfway). ``backend``: ``"xnnpack"`` (``.pte``) or ``"x86"``."""
    from mnv3.deploy import qat_finetune

    objective = task.qat_objective(network, example)

    def batches() -> Any:
        for i, batch in enumerate(datamodule.train_dataloader()):
            if i >= steps:
                return
            yield objective.inputs(batch)

    log.info("quantization-aware training: %d batches at lr %g", steps, lr)
    return qat_finetune(
        objective.network,
        example,
        batches,
        lr=lr,
        freeze_bn_after=0 if lr == 0 else steps // 2,
        backend=backend,
        loss_fn=objective.loss,
    )


@exit_on_user_error
def export(cfg: DictConfig) -> Path:
    """Export the checkpoint ``cfg.ckpt_path`` as ``cfg.format``; return the written file."""
    from mnv3.deploy import ExportError, calibration_batches, example_input, export_onnx
    from mnv3.deploy.onnx_export import postprocess_metadata, quantize_onnx
    from mnv3.tasks import TASKS

    check_export_config(cfg)
    ckpt_path = Path(str(cfg.ckpt_path)).expanduser()
    checkpoint = lightning_checkpoint(ckpt_path, "ckpt_path")
    run_cfg = find_run_config(ckpt_path)
    task_name = run_cfg.head.task
    fmt, quantize = str(cfg.format), cfg.get("quantize")
    task = TASKS[task_name].load_trained(ckpt_path, checkpoint)
    data_cfg = OmegaConf.merge(run_cfg.data, cfg.get("data") or {})
    datamodule = build_datamodule(data_cfg)
    size = to_plain(cfg.get("input_size")) or datamodule.input_size
    input_size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    network = _network(task)
    out = cfg.get("out")
    suffix = "_int8" if quantize else ""
    path = (
        Path(str(out)).expanduser()
        if out
        else ckpt_path.parent.parent / "export" / f"{ckpt_path.stem}{suffix}.{fmt}"
    )
    metadata = {
        "task": task_name,
        "checkpoint": str(ckpt_path),
        "class_names": list(datamodule.class_names),
        "preprocessing": _preprocessing(datamodule, input_size),
        "quantize": quantize,
    }
    postprocess = postprocess_metadata(network)
    if postprocess is not None:
        metadata["postprocess"] = postprocess
    try:
        channels = int(datamodule.channels)
        qat_steps = int(cfg.get("qat_steps", 0))
        calibration = (
            calibration_batches(datamodule, int(cfg.calibration_images), str(cfg.calibration_split))
            if quantize and not qat_steps
            else None
        )
        if fmt == "pte":
            from mnv3.deploy import export_pte

            batch = int(cfg.get("pte_batch_size", 1))
            example = example_input(input_size, batch=batch, channels=channels)
            quantized = None
            if qat_steps:
                lr = float(cfg.get("qat_lr", 0.0))
                metadata["qat"] = {"steps": qat_steps, "lr": lr, "quantizer": "xnnpack"}
                datamodule.setup("fit")
                quantized = qat_network(task, network, datamodule, example, qat_steps, lr)
            export_pte(network, path, example, quantize, calibration, metadata, quantized)
        elif quantize:
            import tempfile

            example = example_input(input_size, batch=1, channels=channels)
            with tempfile.TemporaryDirectory() as scratch:
                fp32 = export_onnx(
                    network,
                    Path(scratch) / "fp32.onnx",
                    example,
                    bool(cfg.dynamic_batch),
                    int(cfg.opset),
                )
                quantize_onnx(
                    fp32,
                    path,
                    calibration or [],
                    bool(cfg.per_channel),
                    metadata,
                    calibration_method=str(cfg.get("calibration_method", "minmax")),
                )
        else:
            example = example_input(input_size, batch=1, channels=channels)
            export_onnx(network, path, example, bool(cfg.dynamic_batch), int(cfg.opset), metadata)
    except ExportError as exc:
        raise ConfigError(str(exc)) from exc
    log.info("wrote %s and %s.json", path, path.name)
    print(f"exported {path} ({path.stat().st_size / 1e6:.2f} MB) and {path.name}.json")
    return path


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
def _hydra_main(cfg: DictConfig) -> None:
    export(cfg)


def main() -> None:
    """The command line: plain ``data.<key>=`` overrides apply to the checkpoint run's data."""
    sys.argv = open_data_overrides(sys.argv)
    _hydra_main()


if __name__ == "__main__":
    main()
