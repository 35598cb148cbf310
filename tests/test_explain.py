"""Grad-CAM, OOD scores, the explain/OOD callbacks and the ``mnv3.explain`` entry point."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image
from torch import nn
from torch.nn import functional as F

from helpers import QUIET, TINY_DATA, compose_train, run_cli
from mnv3.cli import CONFIG_DIR, build_datamodule
from mnv3.data.io import load_rgb
from mnv3.explain import explain, heat_on_image, overlay_size
from mnv3.models import mobilenet_v3_small
from mnv3.models.gradcam import colorize, grad_cam, overlay_heatmap
from mnv3.models.heads.classifier import ClassifierHead
from mnv3.models.ood import (
    calibrate_threshold,
    energy_score,
    joint_energy_score,
    max_sigmoid_score,
    max_softmax_score,
)
from mnv3.tasks import ClassificationTask
from mnv3.tasks.classifier_callbacks import GradCamImages, OODCalibration
from mnv3.train import train

# -- Grad-CAM ------------------------------------------------------------------------------------


def _calibrated_random_net(head: ClassifierHead | None = None) -> nn.Module:
    """A random Small whose BN statistics fit its input, so eval-mode activations are not ~0."""
    model = mobilenet_v3_small(num_classes=3)
    if head is not None:
        model.classifier = head
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration pass
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 64, 64))
    return model.eval()


def _brightness_net(output_stride: int = 32) -> nn.Module:
    """A Small whose every C5 channel is the input brightness sampled on the tap's grid.

    Every convolution keeps only its centre tap and averages channels, BN is the identity, and all
    values stay >= 0 (where ReLU / h-swish are increasing), so C5 is non-zero exactly where a
    bright patch is. The classifier scores class 1 by +mean(C5) and class 0 by -mean(C5): the
    Grad-CAM answer is known (class 1: the patch; class 0: nothing).
    """
    model = mobilenet_v3_small(num_classes=2, dropout=0.0, output_stride=output_stride).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                module.weight.zero_()
                module.weight[:, :, kh // 2, kw // 2] = 1.0 / module.weight.shape[1]
            elif isinstance(module, nn.Linear):
                module.weight.fill_(1.0 / module.in_features)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.reset_parameters()
            if isinstance(module, nn.Conv2d | nn.Linear) and module.bias is not None:
                module.bias.zero_()
        model.classifier.fc.weight[0].neg_()
    return model


def _patch_image(top: int, left: int, size: int = 128, patch: int = 40) -> torch.Tensor:
    image = torch.zeros(1, 3, size, size)
    image[..., top : top + patch, left : left + patch] = 1.0
    return image


def _no_hooks(model: nn.Module) -> bool:
    return all(
        not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks) for m in model.modules()
    )


@pytest.mark.parametrize("output_stride", [32, 8])
def test_grad_cam_finds_the_bright_patch_of_a_constructed_network(output_stride: int) -> None:
    model = _brightness_net(output_stride)
    for top, left in [(16, 16), (72, 72), (16, 72), (72, 16)]:
        image = _patch_image(top, left)
        heat = grad_cam(model, image, target=1)[0]
        inside = torch.zeros(128, 128, dtype=torch.bool)
        inside[top : top + 40, left : left + 40] = True
        row, col = divmod(int(heat.argmax()), 128)
        assert (row >= 64) == (top >= 64) and (col >= 64) == (left >= 64), (top, left, row, col)
        assert heat[inside].mean() > 3 * heat[~inside].mean()
        # Class 0 falls as the patch brightens: no location supports it.
        assert grad_cam(model, image, target=0).abs().max() == 0


def test_grad_cam_equals_a_manual_autograd_computation() -> None:
    model = _calibrated_random_net()
    images = torch.randn(3, 3, 64, 80)
    heat = grad_cam(model, images)

    activations = model.forward_features(images).detach().requires_grad_(True)
    logits = model.classifier(activations)
    chosen = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
    (gradients,) = torch.autograd.grad(chosen, activations)
    cam = F.relu((gradients.mean((2, 3), keepdim=True) * activations).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=(64, 80), mode="bilinear", align_corners=False)[:, 0]
    expected = cam / cam.flatten(1).amax(1)[:, None, None]
    assert heat.shape == (3, 64, 80) and heat.dtype == torch.float32
    assert (heat - expected.detach()).abs().max() < 1e-5
    assert heat.min() >= 0 and torch.allclose(heat.flatten(1).amax(1), torch.ones(3))


def test_grad_cam_of_a_linear_head_is_the_class_activation_map() -> None:
    # Grad-CAM paper §3.1: with global pooling and a linear layer, alpha is the class weight.
    model = _calibrated_random_net(ClassifierHead(576, 3, hidden_channels=None, dropout=0.0))
    images = torch.randn(2, 3, 64, 64)
    heat = grad_cam(model, images, target=torch.tensor([2, 0]))
    with torch.no_grad():
        features = model.forward_features(images)
        weights = model.classifier.fc.weight[[2, 0]]
        cam = F.relu(torch.einsum("nc,nchw->nhw", weights, features))[:, None]
        cam = F.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    assert (heat - cam / cam.flatten(1).amax(1)[:, None, None]).abs().max() < 1e-5


def test_grad_cam_leaves_the_model_as_it_found_it() -> None:
    model = mobilenet_v3_small(num_classes=4, output_stride=16)
    for p in model.blocks[:3].parameters():  # a partly frozen model, as in fine-tuning
        p.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    stats = model.last_conv[1].running_mean.clone()
    model.train()
    images = torch.randn(2, 3, 64, 64)
    for tap in ("C5", "C4", "C4_expansion", "C1"):
        heat = grad_cam(model, images, target=3, tap=tap)
        assert heat.shape == (2, 64, 64) and heat.min() >= 0 and heat.max() <= 1
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())  # train mode restored ...
    assert torch.equal(model.last_conv[1].running_mean, stats)  # ... but BN was not updated
    assert _no_hooks(model)
    with pytest.raises(ValueError, match="out of range"):
        grad_cam(model, images, target=7)
    with pytest.raises(KeyError, match="no feature tap 'C9'"):
        grad_cam(model, images, tap="C9")
    assert _no_hooks(model)


def test_grad_cam_runs_inside_inference_mode_on_a_frozen_copy() -> None:
    model = _calibrated_random_net()
    expected = grad_cam(model, torch.ones(1, 3, 64, 64))
    for p in model.parameters():  # an EMA shadow: no parameter requires grad
        p.requires_grad_(False)
    with torch.inference_mode():
        images = torch.ones(1, 3, 64, 64)
        heat = grad_cam(model, images)
    assert torch.equal(heat, expected)


def test_overlay_and_colour_map() -> None:
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    heat = torch.rand(5, 6)
    overlay = overlay_heatmap(image, heat)
    assert overlay.shape == (20, 30, 3) and overlay.dtype == np.uint8
    assert np.array_equal(overlay_heatmap(image, heat, alpha=0.0), image.permute(1, 2, 0).numpy())
    ends = colorize(torch.tensor([0.0, 0.5, 1.0]))
    assert ends.tolist() == [[0, 0, 128], [128, 255, 128], [128, 0, 0]]  # blue, green, red


def test_heat_map_goes_back_onto_the_uncropped_image() -> None:
    # A 40x60 image resized to 32x48 and centre-cropped to 32x32: columns 8..40 were seen.
    heat, coverage = heat_on_image(torch.ones(32, 32), (40, 60), resize_size=32, crop_size=32)
    assert heat.shape == coverage.shape == (40, 60)
    assert coverage[:, 15:45].min() > 0.999 and coverage[:, :5].max() == 0
    assert coverage[:, 55:].max() == 0


def test_heat_map_goes_onto_a_downscaled_copy_with_the_original_geometry() -> None:
    # A 400x600 image: the network saw columns 100..500; on a 100x150 copy that is 25..125.
    heat, coverage = heat_on_image(
        torch.ones(32, 32), (400, 600), resize_size=32, crop_size=32, out_hw=(100, 150)
    )
    assert heat.shape == coverage.shape == (100, 150)
    assert coverage[:, 30:120].min() > 0.999
    assert coverage[:, :22].max() == 0 and coverage[:, 128:].max() == 0
    assert overlay_size((400, 600), 150) == (100, 150)
    assert overlay_size((8000, 3000), 2048) == (2048, 768)
    assert overlay_size((40, 60), 2048) == (40, 60) and overlay_size((4000, 6000), None) == (
        4000,
        6000,
    )


# -- OOD scores ----------------------------------------------------------------------------------


def test_ood_scores_equal_hand_computed_values() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [2.0, -1.0]])
    assert torch.allclose(
        max_softmax_score(logits), torch.tensor([0.5, 0.75, 1 / (1 + math.e**-3)])
    )
    assert torch.allclose(
        energy_score(logits),
        torch.tensor([math.log(2.0), math.log(4.0), math.log(math.e**2 + math.e**-1)]),
    )
    # T * logsumexp(logits / T) at T=2 for the second row: 2 * log(sqrt(3) + 1).
    assert energy_score(logits, temperature=2.0)[1].item() == pytest.approx(
        2 * math.log(math.sqrt(3.0) + 1)
    )
    assert torch.allclose(
        max_sigmoid_score(logits), torch.sigmoid(torch.tensor([0.0, 1.0986, 2.0])), atol=1e-4
    )
    assert joint_energy_score(torch.zeros(1, 3)).item() == pytest.approx(3 * math.log(2.0))
    with pytest.raises(ValueError):
        energy_score(logits, temperature=0.0)


def test_calibrate_threshold_is_the_low_quantile() -> None:
    scores = torch.arange(101, dtype=torch.float32) / 100  # 0.00, 0.01, ..., 1.00
    assert calibrate_threshold(scores) == pytest.approx(0.05)
    assert calibrate_threshold(scores, quantile=0.0) == 0.0
    assert calibrate_threshold(scores, quantile=1.0) == 1.0
    random = torch.rand(1000)
    threshold = calibrate_threshold(random, 0.1)
    assert threshold == pytest.approx(float(np.quantile(random.double().numpy(), 0.1)))
    assert (random < threshold).float().mean().item() == pytest.approx(0.1, abs=0.002)
    assert calibrate_threshold(torch.tensor([float("nan"), 0.2, 0.4]), 0.5) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        calibrate_threshold(torch.tensor([]))
    with pytest.raises(ValueError):
        calibrate_threshold(scores, quantile=1.5)


# -- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch run on the tiny textures data: <tmp>/run/{checkpoints, config_resolved.yaml}."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("explain")
    overrides = ["debug=limit", "trainer.max_epochs=1", "test=false", *TINY_DATA, *QUIET]
    train(compose_train(tmp, overrides))
    assert (tmp / "run" / "checkpoints" / "best.ckpt").is_file()
    return tmp


def _image(path: Path, size: tuple[int, int] = (45, 38)) -> Path:
    """A striped non-square RGB PNG (width, height)."""
    width, height = size
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, ::4] = (230, 200, 40)
    Image.fromarray(array).save(path)
    return path


def _compose_explain(tmp: Path, overrides: list[str]) -> DictConfig:
    """The explain config as ``python -m mnv3.explain`` would build it, output under ``tmp``."""
    GlobalHydra.instance().clear()
    paths = [f"paths.root_dir={tmp}", f"paths.log_dir={tmp}/logs", f"paths.output_dir={tmp}/out"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("explain", overrides=paths + overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def test_explain_cli_prints_prediction_threshold_and_writes_overlay(trained_run: Path) -> None:
    # The fallback path: a copy of best.ckpt without any OODCalibration state (train.py may save
    # one; the calibrated path is tested below).
    checkpoint = torch.load(trained_run / "run" / "checkpoints" / "best.ckpt", weights_only=True)
    checkpoint["callbacks"] = {
        k: v for k, v in checkpoint.get("callbacks", {}).items() if "OODCalibration" not in str(k)
    }
    ckpt = trained_run / "run" / "checkpoints" / "uncalibrated.ckpt"
    torch.save(checkpoint, ckpt)
    image = _image(trained_run / "photo.png")
    out = trained_run / "overlay.png"
    result = run_cli(
        "mnv3.explain",
        [
            f"ckpt_path={ckpt}",
            f"image={image}",
            f"out={out}",
            "ood_threshold=1.0",  # the largest valid value, above any 6-class probability here
            f"hydra.run.dir={trained_run}/explain",
        ],
        cwd=trained_run,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    classes = ClassificationTask.load_from_checkpoint(ckpt, weights_only=True).class_names
    lines = result.stdout.splitlines()
    assert any(line.strip().startswith("1. ") and line.split()[1] in classes for line in lines)
    assert "max-softmax score:" in result.stdout and "energy score:" in result.stdout
    assert "OOD threshold: 1.0000 (config value ood_threshold" in result.stdout
    assert "WARNING: OUT-OF-DISTRIBUTION" in result.stdout
    with Image.open(out) as overlay:
        assert overlay.size == (45, 38) and overlay.mode == "RGB"


def test_user_errors_are_one_error_line_and_exit_status_1(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process (the wrapper is the same as under ``python -m``): a CLI start costs ~8 s here.
    ckpt = trained_run / "run" / "checkpoints" / "best.ckpt"
    broken = trained_run / "broken.png"
    broken.write_text("not an image")
    image = _image(trained_run / "ok.png")
    for overrides, message in [
        ([f"ckpt_path={ckpt}", f"image={trained_run / 'nope.png'}"], "nope.png does not exist"),
        ([f"ckpt_path={trained_run / 'no.ckpt'}", f"image={image}"], "no.ckpt does not exist"),
        ([f"ckpt_path={ckpt}", f"image={broken}"], "cannot read image"),
        ([f"ckpt_path={ckpt}", f"image={image}", "target=zebra"], "target=zebra is not a class"),
        ([f"ckpt_path={ckpt}", f"image={image}", "target=6"], "out of range for 6 classes"),
        ([f"ckpt_path={ckpt}", f"image={image}", "tap=C9"], "no feature tap 'C9'"),
        (
            [f"ckpt_path={ckpt}", f"image={image}", "overlay_max_size=0"],
            "overlay_max_size=0 (conf/explain.yaml) must be a positive number of pixels",
        ),
    ]:
        cfg = _compose_explain(trained_run, overrides)
        with pytest.raises(SystemExit) as info:
            explain(cfg)
        assert info.value.code == 1
        errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], errors


def _best_task_and_data(run: Path) -> tuple[ClassificationTask, Any]:
    """The run's best checkpoint as its task (CPU) and a new data module of its data config."""
    task = ClassificationTask.load_from_checkpoint(
        run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True
    )
    return task, build_datamodule(OmegaConf.load(run / "config_resolved.yaml").data)


def _one_epoch_trainer(root: Path, callbacks: list, sanity_steps: int) -> pl.Trainer:
    """One quiet CPU epoch of 1 training and 2 validation batches with ``callbacks``."""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=2,
        num_sanity_val_steps=sanity_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )


def test_callbacks_calibrate_save_and_explain_reports_the_saved_threshold(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = trained_run / "run"
    task, datamodule = _best_task_and_data(run)
    ood, cams = OODCalibration(quantile=0.25), GradCamImages(num_images=2)
    trainer = _one_epoch_trainer(trained_run / "calibration", [ood, cams], sanity_steps=1)
    trainer.fit(task, datamodule=datamodule)

    # The threshold is the 25 % quantile of the max-softmax of this epoch's 2 x 8 val images,
    # not counting the sanity-check batch.
    task.eval()
    with torch.no_grad():
        batches = [b["image"] for _, b in zip(range(2), datamodule.val_dataloader(), strict=False)]
        scores = max_softmax_score(task(torch.cat(batches)))
    assert ood.num_scores == 16
    assert ood.threshold == pytest.approx(calibrate_threshold(scores, 0.25), abs=1e-6)
    assert float(trainer.callback_metrics["val/ood_threshold"]) == pytest.approx(ood.threshold)

    ckpt = run / "checkpoints" / "calibrated.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["callbacks"]["OODCalibration"]
    assert saved["threshold"] == ood.threshold and saved["quantile"] == 0.25

    plots = sorted((trained_run / "calibration" / "plots").glob("gradcam_epoch000_*.png"))
    assert [p.name for p in plots] == ["gradcam_epoch000_0.png", "gradcam_epoch000_1.png"]
    with Image.open(plots[0]) as png:
        assert png.size == (32, 32)

    cfg = _compose_explain(
        trained_run, [f"ckpt_path={ckpt}", f"image={_image(trained_run / 'cal.png')}"]
    )
    result = explain(cfg)
    out = capsys.readouterr().out
    assert result["threshold"] == pytest.approx(ood.threshold)
    assert f"OOD threshold: {ood.threshold:.4f} (calibrated by OODCalibration" in out
    assert result["overlay"] == trained_run / "out" / "cal_gradcam.png"
    assert result["overlay"].is_file()
    assert (result["confidence"] < ood.threshold) == ("OUT-OF-DISTRIBUTION" in out)


def test_a_large_image_gives_an_overlay_no_larger_than_overlay_max_size(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Smooth content so that encoding and decoding stay fast; 3000x1800 pixels.
    ramp = np.linspace(0, 255, 3000, dtype=np.float32)
    array = np.stack([np.tile(ramp, (1800, 1))] * 3, axis=-1).astype(np.uint8)
    big = trained_run / "big.jpg"
    Image.fromarray(array).save(big, quality=80)
    ckpt = trained_run / "run" / "checkpoints" / "best.ckpt"
    out = trained_run / "big_overlay.png"
    result = explain(
        _compose_explain(trained_run, [f"ckpt_path={ckpt}", f"image={big}", f"out={out}"])
    )
    printed = capsys.readouterr().out
    assert result["overlay_size"] == (2048, 1229)
    with Image.open(out) as overlay:
        assert overlay.size == (2048, 1229)
    assert "(3000x1800)" in printed
    assert "overlay downscaled from 3000x1800 to 2048x1229 (overlay_max_size=2048" in printed

    small = explain(
        _compose_explain(
            trained_run,
            [f"ckpt_path={ckpt}", f"image={big}", f"out={out}", "overlay_max_size=300"],
        )
    )
    assert small["overlay_size"] == (300, 180)
    # The prediction does not depend on the overlay's size: the network sees the same crop.
    assert small["probability"] == result["probability"]


@pytest.fixture(scope="module")
def gray_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-channel run (data.channels=1, backbone.in_channels=1), its data folder deleted."""
    import shutil

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("explain_gray")
    gray = ["++data.channels=1", "backbone.in_channels=1"]
    train(compose_train(tmp, ["debug=fast_dev_run", *TINY_DATA, *QUIET, *gray]))
    # explain must neither read nor regenerate the training data.
    shutil.rmtree(tmp / "data")
    return tmp


def test_explain_runs_a_gray_model_with_the_data_modules_eval_transform(
    gray_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = gray_run / "run" / "checkpoints" / "last.ckpt"
    image = _image(gray_run / "photo.png")
    result = explain(_compose_explain(gray_run, [f"ckpt_path={ckpt}", f"image={image}"]))
    assert "overlay downscaled" not in capsys.readouterr().out
    assert not (gray_run / "data").exists()
    with Image.open(result["overlay"]) as overlay:
        assert overlay.size == (45, 38) and overlay.mode == "RGB"

    # The same probability as the run's own eval transform (one luma channel) gives.
    datamodule = build_datamodule(OmegaConf.load(gray_run / "run" / "config_resolved.yaml").data)
    batch = datamodule.eval_transform(load_rgb(image))[None]
    assert batch.shape[1] == 1
    task = ClassificationTask.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    network = (task.ema.module if task.ema is not None else task.model).eval()
    with torch.no_grad():
        expected = torch.softmax(network(batch).float()[0], dim=0).max()
    assert result["probability"] == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.parametrize(
    ("experiment", "task"),
    [("shapes_detect_quick", "detection"), ("shapes_segment_quick", "segmentation")],
)
def test_explain_of_a_dense_checkpoint_names_its_task(
    tmp_path: Path, experiment: str, task: str
) -> None:
    from mnv3.cli import ConfigError, to_plain
    from mnv3.explain import _open_classifier
    from mnv3.tasks import TASKS

    cfg = compose_train(tmp_path, [f"experiment={experiment}"])
    model = TASKS[task].network_kwargs(to_plain(cfg))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    OmegaConf.save(cfg, run / "config_resolved.yaml")
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model": model, "num_classes": 3}}, ckpt)
    with pytest.raises(
        ConfigError, match=f"^explain works on classification checkpoints; .* is {task}$"
    ):
        _open_classifier(ckpt)


def test_mahalanobis_fits_on_training_images_and_explain_flags_with_it(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mnv3.models.ood import fit_class_gaussians, mahalanobis_score, pooled_features
    from mnv3.tasks.classifier_callbacks import MahalanobisCalibration

    run = trained_run / "run"
    task, datamodule = _best_task_and_data(run)
    detector = MahalanobisCalibration(quantile=0.25, max_train_images=40)
    trainer = _one_epoch_trainer(trained_run / "mahalanobis", [detector], sanity_steps=0)
    trainer.fit(task, datamodule=datamodule)

    # The same numbers computed here: 40 of the 48 training images (eval transform), 2 val batches.
    # (Same memory format as the task: this one-step network's features vary so little between
    # images that float32 rounding differences of channels_last show in the distances.)
    task.eval()
    with torch.no_grad():

        def features(images: torch.Tensor) -> torch.Tensor:
            return pooled_features(task.model, task.prepare_images(images))

        train = list(datamodule.train_eval_dataloader(40, datamodule.seed))
        fitted = fit_class_gaussians(
            torch.cat([features(b["image"]) for b in train]),
            torch.cat([b["label"] for b in train]),
        )
        val = [b["image"] for _, b in zip(range(2), datamodule.val_dataloader(), strict=False)]
        scores = mahalanobis_score(
            torch.cat([features(v) for v in val]), fitted["means"], fitted["precision"]
        )
    assert detector.num_train == 40 and detector.num_scores == 16
    torch.testing.assert_close(detector.means, fitted["means"], rtol=1e-4, atol=1e-4)
    assert detector.threshold == pytest.approx(calibrate_threshold(scores, 0.25), rel=1e-3)
    assert float(trainer.callback_metrics["val/mahalanobis_threshold"]) == pytest.approx(
        detector.threshold
    )

    # Saved with weights_only-readable tensors; restored for evaluation; used by explain.
    ckpt = run / "checkpoints" / "mahalanobis.ckpt"
    trainer.save_checkpoint(ckpt)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    restored = ClassificationTask.restore_callbacks(checkpoint)
    assert any(isinstance(c, MahalanobisCalibration) and c.fitted for c in restored)
    image = _image(trained_run / "stripes.png")
    for threshold, flagged in [(1.0, True), (-1e30, False)]:  # scores are <= 0
        checkpoint["callbacks"]["MahalanobisCalibration"]["threshold"] = threshold
        torch.save(checkpoint, ckpt)
        # ood_threshold=0 and no OODCalibration state: only the feature check can flag.
        cfg = _compose_explain(
            trained_run, [f"ckpt_path={ckpt}", f"image={image}", "ood_threshold=0.0"]
        )
        result = explain(cfg)
        out = capsys.readouterr().out
        assert result["mahalanobis_threshold"] == threshold
        assert "Mahalanobis score:" in out and "class statistics of 40 training images" in out
        assert result["out_of_distribution"] is flagged
        assert ("WARNING: OUT-OF-DISTRIBUTION: the Mahalanobis score" in out) is flagged
