"""Tiny datasets written in their publishers' real on-disk layouts, for every test that reads one.

The data tests (``tests/data/``) check the loaders against these files; ``tests/test_experiments.py``
trains one step of each paper recipe on them. One copy, so a layout fix reaches both. The fakes keep
the traps of the real files: Kaggle's nested ``chest_xray/chest_xray`` and ``__MACOSX`` folders,
the NIH CSV's split header cells, trailing empty column and CRLF line ends, ImageNet's flat
validation folder with a CRLF label file, COCO's sparse category ids, Cityscapes' labelIds PNGs,
8-bit gray, 16-bit gray and RGBA files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mnv3.data.coco_annotations import coco_annotation_file

# --- any image ------------------------------------------------------------------------------------


def write_solid(
    path: Path,
    colour: tuple[int, ...] | int = (200, 30, 90),
    mode: str = "RGB",
    size: tuple[int, int] = (20, 16),
    **save_kwargs: object,
) -> Path:
    """Write a constant-colour image (converted to ``mode``) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode.startswith("I;16"):
        value = colour if isinstance(colour, int) else colour[0]
        image = Image.fromarray(np.full(size[::-1], value, dtype=np.uint16))
    else:
        rgb = colour if not isinstance(colour, int) else (colour,) * 3
        base_mode = "RGBA" if len(rgb) == 4 else "RGB"
        image = Image.new(base_mode, size, tuple(rgb))
        if mode != base_mode:
            image = image.convert(mode)
    image.save(path, **save_kwargs)
    return path


def write_csv(path: Path, lines: list[str], newline: str = "\r\n") -> Path:
    """Write lines byte-exact (no newline translation), ending in ``newline``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(line + newline for line in lines).encode())
    return path


# --- COCO 2017 ------------------------------------------------------------------------------------

# Sparse and out of order, as COCO's own ids (1..90 with gaps).
COCO_CATEGORIES = [
    {"id": 90, "name": "toothbrush"},
    {"id": 3, "name": "car"},
    {"id": 17, "name": "cat"},
]


def write_coco(
    root: Path,
    split: str,
    images: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    categories: list[dict[str, Any]] = COCO_CATEGORIES,
    write_files: bool = True,
) -> Path:
    """Write ``annotations/instances_<split>2017.json`` and a black PNG per listed image."""
    for number, ann in enumerate(annotations, start=1):
        ann.setdefault("id", number)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
    path = coco_annotation_file(root, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"images": images, "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(document))
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    if write_files:
        for image in images:
            Image.new("RGB", (image["width"], image["height"])).save(folder / image["file_name"])
    return path


def coco_image(image_id: int, width: int = 40, height: int = 30) -> dict[str, Any]:
    """An ``images`` entry of a COCO annotation file (``<id:04d>.png``)."""
    return {"id": image_id, "file_name": f"{image_id:04d}.png", "width": width, "height": height}


def write_tiny_coco(root: Path, images_per_split: int = 2) -> Path:
    """train2017 and val2017 of ``images_per_split`` 40x30 images, each with a car and a cat."""
    for split in ("train", "val"):
        images = [coco_image(i) for i in range(1, images_per_split + 1)]
        annotations = [
            {"image_id": i, "category_id": category, "bbox": bbox}
            for i in range(1, images_per_split + 1)
            for category, bbox in ((3, [2, 3, 16, 12]), (17, [20, 8, 14, 18]))
        ]
        write_coco(root, split, images, annotations)
    return root


# --- Cityscapes (leftImg8bit + gtFine labelIds) --------------------------------------------------

CITYSCAPES_FRAME = (32, 64)  # (H, W) of the tiny frames


def street_label(seed: int) -> np.ndarray:
    """A 32x64 labelIds map: sky over building over road, a car, and void (ego vehicle) at the bottom."""
    h, w = CITYSCAPES_FRAME
    rng = np.random.default_rng(seed)
    label = np.full((h, w), 23, dtype=np.uint8)
    label[8:16] = 11
    label[16:] = 7
    left = int(rng.integers(0, 40))
    label[18:26, left : left + 16] = 26
    label[30:] = 1
    return label


def write_frame(root: Path, split: str, city: str, stem: str, label: np.ndarray | None) -> Path:
    """Write ``<stem>_leftImg8bit.png`` (noise) and, unless None, its labelIds PNG."""
    image_dir = root / "leftImg8bit" / split / city
    label_dir = root / "gtFine" / split / city
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(len(stem)).integers(
        0, 256, (*CITYSCAPES_FRAME, 3), dtype=np.uint8
    )
    Image.fromarray(noise).save(image_dir / f"{stem}_leftImg8bit.png")
    if label is not None:
        Image.fromarray(label, mode="L").save(label_dir / f"{stem}_gtFine_labelIds.png")
    return image_dir / f"{stem}_leftImg8bit.png"


def write_tiny_cityscapes(root: Path) -> Path:
    """Two cities of two train frames each and one val city of two frames, labelIds only."""
    for i, (city, seq) in enumerate([("aachen", 0), ("aachen", 3), ("bremen", 1), ("bremen", 2)]):
        write_frame(root, "train", city, f"{city}_{seq:06d}_000019", street_label(i))
    for seq in range(2):
        write_frame(root, "val", "frankfurt", f"frankfurt_{seq:06d}_000294", street_label(10 + seq))
    return root


# --- ImageNet (ILSVRC2012) ------------------------------------------------------------------------

# Written out of order on purpose: labels follow the sorted wnids whatever the file order.
IMAGENET_CLASS_INDEX = {
    "2": ["n01484850", "great_white_shark"],
    "0": ["n01440764", "tench"],
    "1": ["n01443537", "goldfish"],
}
IMAGENET_WNIDS = ["n01440764", "n01443537", "n01484850"]
IMAGENET_NAMES = ["tench", "goldfish", "great_white_shark"]


def imagenet_val_name(i: int) -> str:
    """The file name of validation image ``i`` (1-based), as in the raw val archive."""
    return f"ILSVRC2012_val_{i:08d}.JPEG"


def write_tiny_imagenet(root: Path) -> Path:
    """Three classes, two training images each, a flat val of 4 images with a CRLF label file."""
    for wnid in IMAGENET_WNIDS:
        for i in range(2):
            write_solid(root / "train" / wnid / f"{wnid}_{i}.JPEG", (10, 10, 10), format="JPEG")
    labels = [2, 0, 1, 2]
    for i, label in enumerate(labels, start=1):
        write_solid(root / "val" / imagenet_val_name(i), (80 * label, 0, 0), format="JPEG")
    lines = "".join(f"{imagenet_val_name(i)} {lab}\r\n" for i, lab in enumerate(labels, start=1))
    (root / "val_labels.txt").write_bytes(lines.encode())
    (root / "imagenet_class_index.json").write_text(json.dumps(IMAGENET_CLASS_INDEX))
    return root


# --- Kaggle pediatric pneumonia (Kermany et al. 2018) ---------------------------------------------

# Real Kermany names: NORMAL files carry no patient id, PNEUMONIA files are person<N>_<kind>_<k>.
NORMAL_TRAIN = [f"IM-{i:04d}-0001.jpeg" for i in range(1, 5)] + ["NORMAL2-IM-0005-0001.jpeg"]
PNEUMONIA_TRAIN = [
    "person1_bacteria_1.jpeg",
    "person1_bacteria_2.jpeg",
    "person1_virus_3.jpeg",
    "person2_bacteria_4.jpeg",
    "person3_virus_5.jpeg",
    "person4_bacteria_6.jpeg",
    "person5_virus_7.jpeg",
]


def write_kaggle_pneumonia(root: Path) -> Path:
    """Kaggle's archive as extracted under ``root``: chest_xray/chest_xray/{train,val,test}, and
    __MACOSX debris."""
    data = root / "chest_xray" / "chest_xray"
    for name in NORMAL_TRAIN:
        write_solid(data / "train" / "NORMAL" / name, 60, mode="L")  # gray JPEG, as Kaggle's
    for name in PNEUMONIA_TRAIN:
        write_solid(data / "train" / "PNEUMONIA" / name, 190, mode="L")
    for split in ("val", "test"):
        write_solid(data / split / "NORMAL" / "NORMAL2-IM-1427-0001.jpeg", 60, mode="L")
        write_solid(data / split / "PNEUMONIA" / "person1946_bacteria_4874.jpeg", 190, mode="L")
    # macOS debris: AppleDouble twins, .DS_Store and a __MACOSX tree; none is an image of the set.
    (data / "train" / "NORMAL" / "._IM-0001-0001.jpeg").write_bytes(b"\x00\x05\x16\x07")
    (data / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    write_solid(root / "chest_xray" / "__MACOSX" / "chest_xray" / "train" / "NORMAL" / "x.jpeg")
    write_solid(data / "train" / "PNEUMONIA" / "__MACOSX" / "y.jpeg")
    return root


# --- NIH ChestX-ray14 (Wang et al. 2017) ----------------------------------------------------------

# The real header: the bracketed names hold unquoted commas, and a trailing empty column follows.
NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)


def nih_row(name: str, findings: str, follow_up: int, patient: int) -> str:
    """A ``Data_Entry_2017.csv`` line (multi-finding cells of odd patients quoted)."""
    if "|" in findings and patient % 2:
        findings = f'"{findings}"'  # a quoted field, as some re-exports write it
    return f"{name},{findings},{follow_up},{patient},58,M,PA,2682,2749,0.143,0.143,"


def write_nih_chestxray14(root: Path) -> Path:
    """Patients 1-8 in train_val (3 images each), 9-10 in test; official images_00N sub-folders."""
    rows = [NIH_HEADER]
    findings = ["Cardiomegaly", "No Finding", "Effusion|Mass|Hernia", "Pleural_Thickening"]
    train_val, test = [], []
    for patient in range(1, 11):
        for follow_up in range(3):
            name = f"{patient:08d}_{follow_up:03d}.png"
            rows.append(nih_row(name, findings[(patient + follow_up) % 4], follow_up, patient))
            (test if patient > 8 else train_val).append(name)
            folder = root / f"images_{1 + (patient > 5):03d}" / "images"
            if name == "00000001_000.png":
                write_solid(folder / name, 40000, mode="I;16")  # 16-bit gray
            elif name == "00000002_000.png":
                write_solid(folder / name, (90, 90, 90, 255))  # RGBA, as some re-exports
            else:
                write_solid(folder / name, 30 * (patient % 8), mode="L")
    write_csv(root / "Data_Entry_2017.csv", rows)
    write_csv(root / "train_val_list.txt", train_val)
    write_csv(root / "test_list.txt", test)
    return root
