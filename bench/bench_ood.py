"""Out-of-distribution detection, measured: AUROC of "X-ray vs not an X-ray" for three scores.

A MobileNetV3-Small is trained from scratch (no pretrained weights needed) on the real X-rays of
the ``--xray`` folders, one class per folder (e.g. NIH ChestX-ray14 vs the COVID-19 collection),
in ``--folds`` folds: each fold trains on the other folds' X-rays, fits the Mahalanobis detector
on them (pooled C5 features, eval transform, as ``MahalanobisCalibration`` does), and scores its
held-out X-rays (positives) against every image of the ``--natural`` folders (negatives), in
colour and converted to gray (gray is the harder case: colour alone separates photographs from
X-rays). Scores: maximum softmax probability, energy, Mahalanobis; AUROC with torchmetrics over
the held-out X-rays of all folds pooled.

    python bench/bench_ood.py --xray ../shared/data/xray/nih/images \\
        ../shared/data/xray/covid_chestxray/images \\
        --natural ../shared/data/imagenet ../shared/data/coco/train2017

The sample folders are not part of the project (never committed; no test depends on them).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torchmetrics.classification import BinaryAUROC
from torchvision.transforms import v2

from mnv3.data.io import load_rgb
from mnv3.models import mobilenet_v3_small
from mnv3.models.ood import (
    energy_score,
    fit_class_gaussians,
    mahalanobis_score,
    max_softmax_score,
    pooled_features,
)

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def images_in(folders: list[Path]) -> list[list[Path]]:
    """The image files of each folder (sorted; other files such as CSVs are skipped)."""
    return [sorted(p for p in f.iterdir() if p.suffix.lower() in EXTENSIONS) for f in folders]


def load(paths: list[Path], size: int, gray: bool = False) -> torch.Tensor:
    """Images resized (short side) and centre-cropped to ``size``, float in [0, 1]; gray
    replicated to 3 channels when ``gray`` (ITU-R 601 luma)."""
    out = []
    for path in paths:
        image = load_rgb(path, wide="range")
        image = v2.functional.center_crop(v2.functional.resize(image, [size], antialias=True), size)
        image = image.float() / 255
        if gray:
            image = v2.functional.rgb_to_grayscale(image, num_output_channels=3)
        out.append(image)
    return torch.stack(out)


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def train(
    images: torch.Tensor, labels: torch.Tensor, classes: int, steps: int, seed: int
) -> torch.nn.Module:
    """MobileNetV3-Small from scratch, AdamW, random resized crops and small rotations."""
    torch.manual_seed(seed)
    model = mobilenet_v3_small(num_classes=classes)
    augment = v2.Compose(
        [
            v2.RandomResizedCrop(images.shape[-1], scale=(0.5, 1.0), antialias=True),
            v2.RandomRotation(10),
            v2.ColorJitter(brightness=0.3, contrast=0.3),
        ]
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    model.train()
    for _ in range(steps):
        picked = torch.randint(len(images), (16,))
        batch = normalise(torch.stack([augment(images[i]) for i in picked]))
        loss = F.cross_entropy(model(batch), labels[picked], label_smoothing=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def scores(model: torch.nn.Module, images: torch.Tensor, fitted: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        batch = normalise(images)
        logits = model(batch)
        features = pooled_features(model, batch)
    return {
        "max-softmax": max_softmax_score(logits),
        "energy": energy_score(logits),
        "Mahalanobis": mahalanobis_score(features, fitted["means"], fitted["precision"]).float(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--xray", type=Path, nargs="+", required=True, help="one folder per class")
    parser.add_argument("--natural", type=Path, nargs="+", required=True)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150, help="training steps of 16 images")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    per_class = images_in(args.xray)
    xray_paths = [p for paths in per_class for p in paths]
    labels = torch.tensor([c for c, paths in enumerate(per_class) for _ in paths])
    xrays = load(xray_paths, args.size)
    natural_paths = [p for paths in images_in(args.natural) for p in paths]
    natural = {"colour": load(natural_paths, args.size)}
    natural["gray"] = load(natural_paths, args.size, gray=True)
    # Folds stratified by class: every fold trains on every class.
    fold_of = torch.empty(len(xray_paths), dtype=torch.long)
    for c in range(len(per_class)):
        members = (labels == c).nonzero().flatten()
        fold_of[members] = torch.arange(len(members)) % args.folds
    held: dict[str, list[torch.Tensor]] = {}
    outside: dict[str, dict[str, list[torch.Tensor]]] = {k: {} for k in natural}
    for fold in range(args.folds):
        train_mask = fold_of != fold
        model = train(xrays[train_mask], labels[train_mask], len(per_class), args.steps, args.seed)
        with torch.no_grad():
            features = pooled_features(model, normalise(xrays[train_mask]))
        fitted = fit_class_gaussians(features, labels[train_mask])
        for name, value in scores(model, xrays[~train_mask], fitted).items():
            held.setdefault(name, []).append(value)
        for kind, images in natural.items():
            for name, value in scores(model, images, fitted).items():
                outside[kind].setdefault(name, []).append(value)
        print(
            f"fold {fold}: trained on {int(train_mask.sum())} X-rays, shrinkage "
            f"{float(fitted['shrinkage']):.3f}"
        )
    print(
        f"\n{len(xray_paths)} X-rays ({', '.join(f'{len(p)} {f}' for p, f in zip(per_class, args.xray, strict=True))}) "
        f"vs {len(natural_paths)} natural images; {args.folds} folds, MobileNetV3-Small from scratch, "
        f"{args.steps} steps x 16 images at {args.size} px; {time.perf_counter() - start:.0f} s\n"
    )
    print("| score | AUROC vs colour photos | AUROC vs the same photos in gray |")
    print("|---|---|---|")
    for name in held:
        positives = torch.cat(held[name])
        row = []
        for kind in natural:
            negatives = torch.cat(outside[kind][name])
            target = torch.cat([torch.ones_like(positives), torch.zeros_like(negatives)]).long()
            row.append(float(BinaryAUROC()(torch.cat([positives, negatives]).float(), target)))
        print(f"| {name} | {row[0]:.3f} | {row[1]:.3f} |")


if __name__ == "__main__":
    main()
