"""Explain one prediction: top classes, out-of-distribution check and a Grad-CAM overlay.

``python -m mnv3.explain ckpt_path=<run>/checkpoints/best.ckpt image=photo.png [out=overlay.png]
[target=null] [tap=C5]``

The image is preprocessed exactly as in evaluation: the data module of the run's
``config_resolved.yaml`` is built (which lists, reads and generates nothing) and its own
``eval_transform`` is applied, so crop, resize, normalisation and channels (a gray X-ray model
reads one) are the evaluation's. The network is the one the run validated with (its EMA copy when
it kept one), and the heat map is mapped back from the centre crop onto the whole image. The
overlay has the image's own size up to ``overlay_max_size`` pixels on the long side; a larger
image is shown downscaled (and the output says so): the network only ever sees the resized crop,
and full-size float copies of an 8000x8000 photo cost gigabytes. The out-of-distribution threshold
is the one :class:`~mnv3.tasks.classifier_callbacks.OODCalibration` saved in the checkpoint, or
``ood_threshold``. When the checkpoint also carries a fitted
:class:`~mnv3.tasks.classifier_callbacks.MahalanobisCalibration` (class means and shared
covariance of the pooled features), the image's Mahalanobis score is checked against its threshold
too, and the image is flagged when either check fails: the two catch different things (a
low-confidence prediction; features unlike any training image).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from mnv3.cli import CONFIG_DIR, ConfigError, exit_on_user_error
from mnv3.tasks.classifier_callbacks import is_multilabel
from mnv3.trained_run import TrainedRun
from mnv3.validate import check_explain_config

log = logging.getLogger("mnv3.explain")


def _open_classifier(ckpt_path: Path) -> tuple[TrainedRun, Any, Any]:
    """The run of a classification checkpoint, its data module and eval preset (resize, crop)."""
    run = TrainedRun.open(ckpt_path)
    if run.task_name != "classification":
        raise ConfigError(
            f"explain works on classification checkpoints; {ckpt_path} is {run.task_name}"
        )
    datamodule = run.datamodule()
    preset = getattr(datamodule, "eval_transform", None)
    if not all(hasattr(preset, key) for key in ("resize_size", "crop_size")):
        raise ConfigError(
            f"the data module of the run of {ckpt_path} ({type(datamodule).__name__}) has no "
            "classification eval transform (resize_size, crop_size); explain needs one"
        )
    return run, datamodule, preset


def overlay_size(image_hw: tuple[int, int], max_size: int | None) -> tuple[int, int]:
    """The overlay's ``(height, width)``: the image's, scaled so the long side is <= max_size."""
    height, width = image_hw
    if max_size is None or max(height, width) <= max_size:
        return height, width
    scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _ood_threshold(checkpoint: dict[str, Any], cfg: DictConfig) -> tuple[float, str]:
    """The saved OODCalibration threshold, else the ``ood_threshold`` config value; and its source."""
    from mnv3.tasks.classifier_callbacks import OODCalibration

    state = OODCalibration.state_from_checkpoint(checkpoint)
    if state is not None:
        quantile = float(state.get("quantile", float("nan")))
        return float(state["threshold"]), (
            f"calibrated by OODCalibration in the checkpoint: the {quantile:.0%} quantile of "
            f"{int(state.get('num_scores', 0))} validation scores"
        )
    return float(cfg.get("ood_threshold", 0.5)), (
        "config value ood_threshold; the checkpoint holds no OODCalibration threshold"
    )


def _target_index(target: Any, class_names: list[str]) -> int | None:
    """``target`` as a class index: None, an index, or a class name."""
    if target is None:
        return None
    if isinstance(target, str) and not target.lstrip("-").isdigit():
        if target not in class_names:
            raise ConfigError(f"target={target} is not a class; classes: {', '.join(class_names)}")
        return class_names.index(target)
    index = int(target)
    if not 0 <= index < len(class_names):
        raise ConfigError(f"target={index} is out of range for {len(class_names)} classes")
    return index


def heat_on_image(
    heat: torch.Tensor,
    image_hw: tuple[int, int],
    resize_size: int,
    crop_size: int,
    out_hw: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map a heat map of the evaluation centre crop back onto the original image.

    The eval preset resizes the short side of the ``image_hw`` image to ``resize_size`` (long
    side scaled and truncated, as torchvision does) and centre-crops ``crop_size``. Returns the
    heat map and a coverage mask (1 where the network saw the image, 0 in the cropped-away
    margins), both of size ``out_hw``: the image's own size by default, or that of a downscaled
    copy of the whole image (the geometry is the original's either way).
    """
    height, width = image_hw
    short, long = sorted((height, width))
    resized_long = int(resize_size * long / short)
    rh, rw = (resize_size, resized_long) if height <= width else (resized_long, resize_size)
    # torchvision's CenterCrop offsets (Python's round, half to even).
    top, left = round((rh - crop_size) / 2.0), round((rw - crop_size) / 2.0)
    canvas = torch.zeros(2, rh, rw)
    # Clipped paste: with resize_size < crop_size the crop is padded, i.e. offsets are negative.
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + crop_size, rh), min(left + crop_size, rw)
    canvas[0, y0:y1, x0:x1] = heat[y0 - top : y1 - top, x0 - left : x1 - left].float().cpu()
    canvas[1, y0:y1, x0:x1] = 1.0
    size = out_hw if out_hw is not None else (height, width)
    full = torch.nn.functional.interpolate(canvas[None], size=size, mode="bilinear")
    return full[0, 0].clamp(0, 1), full[0, 1].clamp(0, 1)


def render_overlay(
    image: torch.Tensor, heat: torch.Tensor, coverage: torch.Tensor, alpha: float = 0.5
) -> np.ndarray:
    """Heat-map overlay where the network looked; the image at half brightness elsewhere."""
    from mnv3.models.gradcam import overlay_heatmap

    overlay = torch.from_numpy(overlay_heatmap(image, heat, alpha)).float()
    dimmed = image.permute(1, 2, 0).float() * 0.5
    weight = coverage[..., None]
    return (weight * overlay + (1 - weight) * dimmed).round().to(torch.uint8).numpy()


@exit_on_user_error
def explain(cfg: DictConfig) -> dict[str, Any]:
    """Predict, check for out-of-distribution input, and write the Grad-CAM overlay of one image."""
    from torchvision.transforms.v2 import functional as TF

    from mnv3.data.errors import UnreadableImageError
    from mnv3.data.io import load_rgb

    check_explain_config(cfg)  # files and values: one sentence before the checkpoint is read
    ckpt_path = Path(str(cfg.ckpt_path)).expanduser()
    image_path = Path(str(cfg.image)).expanduser()
    max_size = cfg.get("overlay_max_size", 2048)
    run, datamodule, preset = _open_classifier(ckpt_path)
    class_names = list(run.task.class_names)
    try:
        raw = load_rgb(image_path, wide=datamodule.family.wide_gray)  # as the run's data was
    except UnreadableImageError as exc:
        raise ConfigError(str(exc)) from None

    # Only the uint8 decode is full size: the preset resizes it to the network's input, and the
    # overlay is drawn on a uint8 copy of at most max_size on the long side.
    image_hw = (int(raw.shape[1]), int(raw.shape[2]))
    batch = preset(raw)[None]
    shown_hw = overlay_size(image_hw, max_size)
    shown = raw if shown_hw == image_hw else TF.resize(raw, list(shown_hw), antialias=True)
    del raw
    found = _scores(run, datamodule, batch, cfg)
    tap = str(cfg.get("tap", "C5"))
    target = _target_index(cfg.get("target"), class_names)
    explained = target if target is not None else int(found["logits"][0].argmax())
    out = cfg.get("out")
    out_path = (
        Path(str(out)).expanduser()
        if out
        else Path(cfg.paths.output_dir) / f"{image_path.stem}_gradcam.png"
    )
    geometry = (image_hw, preset.resize_size, preset.crop_size, shown_hw)
    _write_overlay(run.network, batch, explained, tap, shown, geometry, out_path, cfg)

    top_k = min(int(cfg.get("top_k", 5)), len(class_names))
    values, indices = found["probs"].topk(top_k)
    lines = _summary(found, class_names, values, indices)
    lines.insert(0, f"image: {image_path} ({image_hw[1]}x{image_hw[0]}), checkpoint: {ckpt_path}")
    lines.append(f"Grad-CAM of class '{class_names[explained]}' at tap {tap} written to {out_path}")
    if shown_hw != image_hw:
        lines.append(
            f"overlay downscaled from {image_hw[1]}x{image_hw[0]} to {shown_hw[1]}x{shown_hw[0]} "
            f"(overlay_max_size={max_size}; the network saw the same {preset.crop_size}-pixel "
            "crop either way)"
        )
    print("\n".join(lines))
    return {
        "prediction": class_names[int(indices[0])],
        "probability": float(values[0]),
        **{k: found[k] for k in ("confidence", "energy", "threshold")},
        "mahalanobis": found["mahalanobis"],
        "mahalanobis_threshold": found["mahalanobis_threshold"],
        "threshold_source": found["source"],
        "out_of_distribution": found["out_of_distribution"],
        "explained_class": class_names[explained],
        "overlay": out_path,
        "overlay_size": (shown_hw[1], shown_hw[0]),
    }


def temperature_of(task: Any) -> float:
    """The temperature the run fitted on validation (``temperature`` buffer of binary and
    multi-label classifiers), 1.0 when it has none."""
    temperature = getattr(task, "temperature", None)
    return float(temperature) if isinstance(temperature, torch.Tensor) else 1.0


def calibrated_probs(logits: torch.Tensor, multilabel: bool, temperature: float) -> torch.Tensor:
    """Probabilities of one image's logits divided by the temperature: the calibrated numbers
    evaluation reports (a two-class softmax of ``l / T`` is ``sigmoid((l1 - l0) / T)``)."""
    scaled = logits.float() / temperature
    return torch.sigmoid(scaled) if multilabel else torch.softmax(scaled, dim=0)


def _scores(run: TrainedRun, datamodule: Any, batch: torch.Tensor, cfg: DictConfig) -> dict:
    """Logits, probabilities, confidence, energy and Mahalanobis scores, and the OOD verdict of
    ``batch`` (flagged by the softmax check or, when the checkpoint has one, the feature check)."""
    from mnv3.models.ood import confidence_score, energy_score, joint_energy_score, pooled_features
    from mnv3.tasks.classifier_callbacks import MahalanobisCalibration

    with torch.no_grad():
        logits = run.network(batch).float()
    multilabel = is_multilabel(run.task, datamodule)
    confidence = float(confidence_score(logits, multilabel)[0])
    threshold, source = _ood_threshold(run.checkpoint, cfg)
    detector = MahalanobisCalibration.from_checkpoint(run.checkpoint)
    mahalanobis = mahalanobis_threshold = None
    if detector is not None:
        with torch.no_grad():
            mahalanobis = float(detector.scores(pooled_features(run.network, batch))[0])
        mahalanobis_threshold = detector.threshold
    feature_flag = mahalanobis is not None and mahalanobis < mahalanobis_threshold
    return {
        "logits": logits,
        "multilabel": multilabel,
        "probs": calibrated_probs(logits[0], multilabel, temperature_of(run.task)),
        "temperature": temperature_of(run.task),
        "confidence": confidence,
        "energy": float((joint_energy_score if multilabel else energy_score)(logits)[0]),
        "threshold": threshold,
        "source": source,
        "mahalanobis": mahalanobis,
        "mahalanobis_threshold": mahalanobis_threshold,
        "mahalanobis_train_images": detector.num_train if detector is not None else 0,
        "low_confidence": confidence < threshold,
        "far_features": feature_flag,
        "out_of_distribution": confidence < threshold or feature_flag,
    }


def _write_overlay(
    network: torch.nn.Module,
    batch: torch.Tensor,
    explained: int,
    tap: str,
    shown: torch.Tensor,
    geometry: tuple[tuple[int, int], int, int, tuple[int, int]],
    out_path: Path,
    cfg: DictConfig,
) -> None:
    """Grad-CAM of class ``explained`` at ``tap``, mapped onto the shown image and saved.

    ``geometry``: the image's (h, w), the preset's resize and crop sizes, the shown (h, w).
    """
    from PIL import Image

    from mnv3.models.gradcam import grad_cam

    try:
        network.tap(tap)
    except KeyError as exc:
        raise ConfigError(str(exc.args[0])) from None
    heat = grad_cam(network, batch, target=explained, tap=tap)[0]
    image_hw, resize_size, crop_size, shown_hw = geometry
    shown_heat, coverage = heat_on_image(heat, image_hw, resize_size, crop_size, out_hw=shown_hw)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    overlay = render_overlay(shown, shown_heat, coverage, float(cfg.get("alpha", 0.5)))
    Image.fromarray(overlay).save(out_path)


def _summary(
    found: dict[str, Any], class_names: list[str], values: torch.Tensor, indices: torch.Tensor
) -> list[str]:
    """The printed lines: top classes, scores, threshold, and the OOD warning."""
    multilabel, confidence, threshold = found["multilabel"], found["confidence"], found["threshold"]
    width = max(len(class_names[i]) for i in indices.tolist())
    score_name = "max-sigmoid" if multilabel else "max-softmax"
    energy_name = "joint energy" if multilabel else "energy"
    lines = [
        f"top {len(indices)} predictions ({'sigmoid' if multilabel else 'softmax'} probability"
        + (
            f", temperature {found['temperature']:.3f} fitted on validation):"
            if found.get("temperature", 1.0) != 1.0
            else "):"
        ),
        *(
            f"  {rank}. {class_names[i]:<{width}}  {p:.4f}"
            for rank, (i, p) in enumerate(zip(indices.tolist(), values.tolist(), strict=True), 1)
        ),
        f"{score_name} score: {confidence:.4f}   {energy_name} score: {found['energy']:.4f}",
        f"OOD threshold: {threshold:.4f} ({found['source']})",
    ]
    if found["mahalanobis"] is not None:
        lines.append(
            f"Mahalanobis score: {found['mahalanobis']:.2f}   threshold: "
            f"{found['mahalanobis_threshold']:.2f} (pooled features; class statistics of "
            f"{found['mahalanobis_train_images']} training images in the checkpoint)"
        )
    reasons = []
    if found["low_confidence"]:
        reasons.append(f"the {score_name} score {confidence:.4f} is below {threshold:.4f}")
    if found["far_features"]:
        reasons.append(
            f"the Mahalanobis score {found['mahalanobis']:.2f} is below "
            f"{found['mahalanobis_threshold']:.2f}"
        )
    if found["out_of_distribution"]:
        lines.append(
            f"WARNING: OUT-OF-DISTRIBUTION: {' and '.join(reasons)}; this image is unlike the "
            "training data, do not trust the prediction"
        )
    return lines


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="explain")
def main(cfg: DictConfig) -> None:
    explain(cfg)


if __name__ == "__main__":
    main()
