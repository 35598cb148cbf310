"""COCO detection loading, the detection presets and collate, and the generated COCO shapes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from data_writers import coco_image as image
from data_writers import write_coco
from mnv3.data.coco import (
    CocoDetection,
    DegenerateBoxWarning,
    coco_results,
    write_coco_results,
)
from mnv3.data.coco_annotations import coco_annotation_file, coco_classes, coco_has_split
from mnv3.data.collate import collate_detection
from mnv3.data.errors import DatasetError, MissingImageWarning, UnreadableImageWarning
from mnv3.data.presets import DetectionEvalPreset, DetectionTrainPreset
from mnv3.data.shapes_coco import category_id, generate_shapes_coco
from mnv3.data.transforms import RandomIoUCropWithBoxes

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)


def test_sparse_category_ids_map_to_contiguous_labels_and_back(tmp_path: Path) -> None:
    write_coco(
        tmp_path,
        "val",
        [image(7), image(8)],
        [
            {"image_id": 7, "category_id": 90, "bbox": [1, 2, 10, 5]},
            {"image_id": 7, "category_id": 3, "bbox": [20, 10, 5, 8]},
            {"image_id": 8, "category_id": 17, "bbox": [0, 0, 40, 30]},
        ],
    )
    assert coco_has_split(tmp_path, "val") and not coco_has_split(tmp_path, "train")
    assert coco_classes(tmp_path, "val") == (["3", "17", "90"], ["car", "cat", "toothbrush"])

    dataset = CocoDetection(tmp_path, "val")
    assert dataset.label_to_category_id == (0, 3, 17, 90)
    assert (dataset.num_categories, dataset.num_classes) == (3, 4)
    assert dataset.image_ids == [7, 8]
    sample = dataset[0]
    assert sample is not None
    assert sample["labels"].tolist() == [3, 1]
    assert sample["boxes"].tolist() == [[1, 2, 11, 7], [20, 10, 25, 18]]
    assert isinstance(sample["boxes"], tv_tensors.BoundingBoxes)
    assert tuple(sample["boxes"].canvas_size) == (30, 40) == sample["orig_size"]
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, 30, 40)

    # Predictions in labels come back as the file's own ids and [x, y, w, h] boxes.
    results = coco_results(
        [
            {
                "boxes": sample["boxes"],
                "scores": torch.tensor([0.9, 0.4]),
                "labels": sample["labels"],
            }
        ],
        [sample["image_id"]],
        dataset.label_to_category_id,
    )
    assert [(r["image_id"], r["category_id"], r["bbox"]) for r in results] == [
        (7, 90, [1.0, 2.0, 10.0, 5.0]),
        (7, 3, [20.0, 10.0, 5.0, 8.0]),
    ]
    out = write_coco_results(tmp_path / "out" / "detections.json", results)
    assert json.loads(out.read_text()) == results
    with pytest.raises(ValueError, match=r"labels must be in 1\.\.3"):
        coco_results(
            [{"boxes": [[0, 0, 1, 1]], "scores": [1.0], "labels": [0]}], [7], (0, 3, 17, 90)
        )


def test_evaluation_split_labels_with_the_training_categories(tmp_path: Path) -> None:
    write_coco(
        tmp_path, "val", [image(1)], [{"image_id": 1, "category_id": 17, "bbox": [0, 0, 4, 4]}]
    )
    dataset = CocoDetection(tmp_path, "val", category_ids=[3, 17, 90])
    sample = dataset[0]
    assert sample is not None and sample["labels"].tolist() == [2]
    with pytest.raises(
        DatasetError, match=r"category id\(s\) 17 that are not among the 2 training"
    ):
        CocoDetection(tmp_path, "val", category_ids=[3, 90])


def test_a_rewritten_annotation_file_is_read_again(tmp_path: Path) -> None:
    write_coco(tmp_path, "val", [image(1)], [])
    assert coco_classes(tmp_path, "val")[1] == ["car", "cat", "toothbrush"]
    write_coco(tmp_path, "val", [image(1)], [], categories=[{"id": 5, "name": "airplane!"}])
    assert coco_classes(tmp_path, "val") == (["5"], ["airplane!"])


def test_crowd_regions_are_evaluation_targets_but_not_training_targets(tmp_path: Path) -> None:
    write_coco(
        tmp_path,
        "train",
        [image(1)],
        [
            {"image_id": 1, "category_id": 3, "bbox": [1, 1, 8, 8], "area": 50.0},
            {"image_id": 1, "category_id": 17, "bbox": [5, 5, 30, 20], "iscrowd": 1, "area": 400.5},
        ],
    )
    sample = CocoDetection(tmp_path, "train", train=True)[0]
    assert sample is not None
    assert sample["labels"].tolist() == [1]
    assert sample["boxes"].tolist() == [[1, 1, 9, 9]]
    target = sample["eval_target"]
    assert target["labels"].tolist() == [1, 2]
    assert target["iscrowd"].tolist() == [0, 1] and target["iscrowd"].dtype == torch.int64
    assert target["boxes"].tolist() == [[1, 1, 9, 9], [5, 5, 35, 25]]
    # COCOeval sizes objects by the annotation's area (the mask's), not the box's.
    assert target["area"].tolist() == [50.0, 400.5] and target["area"].dtype == torch.float32


def test_boxes_outside_the_image_are_clipped_for_training_only(tmp_path: Path) -> None:
    write_coco(
        tmp_path,
        "val",
        [image(1)],
        [
            {"image_id": 1, "category_id": 3, "bbox": [30, 20, 20, 20]},
            {"image_id": 1, "category_id": 3, "bbox": [60, 5, 5, 5]},  # wholly outside
        ],
    )
    sample = CocoDetection(tmp_path, "val")[0]
    assert sample is not None
    assert sample["boxes"].tolist() == [[30, 20, 40, 30]]
    assert sample["eval_target"]["boxes"].tolist() == [[30, 20, 50, 40], [60, 5, 65, 10]]


def test_degenerate_boxes_are_dropped_and_counted_once(tmp_path: Path) -> None:
    write_coco(
        tmp_path,
        "train",
        [image(1), image(2)],
        [
            {"image_id": 1, "category_id": 3, "bbox": [1, 1, 0, 8]},
            {"image_id": 1, "category_id": 3, "bbox": [1, 1, 8, -2]},
            {"image_id": 1, "category_id": 90, "bbox": [2, 2, 3, 3]},
            {"image_id": 2, "category_id": 17, "bbox": [5, 5, 0, 0], "iscrowd": 1},
        ],
    )
    with pytest.warns(DegenerateBoxWarning, match=r"^3 box\(es\) with non-positive") as record:
        dataset = CocoDetection(tmp_path, "train", train=False)
    assert len([w for w in record if w.category is DegenerateBoxWarning]) == 1
    assert dataset.stats()["degenerate_boxes"] == 3
    first, second = dataset[0], dataset[1]
    assert first is not None and second is not None
    assert first["labels"].tolist() == [3] and first["eval_target"]["labels"].tolist() == [3]
    assert len(second["boxes"]) == 0 and len(second["eval_target"]["boxes"]) == 0
    assert second["boxes"].shape == (0, 4) and second["eval_target"]["boxes"].shape == (0, 4)


def test_images_without_boxes_are_kept_for_val_and_a_choice_for_train(tmp_path: Path) -> None:
    images = [image(1), image(2), image(3)]
    annotations = [
        {"image_id": 1, "category_id": 3, "bbox": [1, 1, 8, 8]},
        {"image_id": 3, "category_id": 3, "bbox": [1, 1, 8, 8], "iscrowd": 1},  # crowd only
    ]
    write_coco(tmp_path, "train", images, annotations)
    write_coco(tmp_path, "val", images, [dict(a) for a in annotations])

    dropping = CocoDetection(tmp_path, "train", train=True, keep_empty=False)
    assert dropping.image_ids == [1]
    assert dropping.stats() == {
        "images": 1,
        "boxes": 1,
        "crowd_boxes": 0,
        "missing_images": 0,
        "empty_images_dropped": 2,
        "degenerate_boxes": 0,
    }
    assert CocoDetection(tmp_path, "train", train=True, keep_empty=True).image_ids == [1, 2, 3]
    val = CocoDetection(tmp_path, "val", keep_empty=False)
    assert val.image_ids == [1, 2, 3]
    empty = val[1]
    assert empty is not None and empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_images_missing_on_disk_are_counted_reported_and_left_out(tmp_path: Path) -> None:
    images = [image(i) for i in range(1, 9)]
    write_coco(tmp_path, "val", images, [])
    for number in (2, 3, 4, 5, 6, 7):
        (tmp_path / "val2017" / f"{number:04d}.png").unlink()
    with pytest.warns(MissingImageWarning) as record:
        dataset = CocoDetection(tmp_path, "val")
    messages = [str(w.message) for w in record if w.category is MissingImageWarning]
    assert len(messages) == 1
    assert messages[0].startswith("6 of 8 images listed in")
    assert "(first: 0002.png, 0003.png, 0004.png, 0005.png, 0006.png)" in messages[0]
    assert dataset.image_ids == [1, 8] and dataset.stats()["missing_images"] == 6

    for leftover in (tmp_path / "val2017").iterdir():
        leftover.unlink()
    with pytest.raises(DatasetError, match=r"none of the 8 images listed in .* is under"):
        CocoDetection(tmp_path, "val")
    (tmp_path / "val2017").rmdir()
    with pytest.raises(
        DatasetError, match=r"image folder .*val2017 does not exist; expected a COCO"
    ):
        CocoDetection(tmp_path, "val")


def test_an_unreadable_image_is_skipped_with_a_warning(tmp_path: Path) -> None:
    write_coco(tmp_path, "val", [image(1)], [])
    (tmp_path / "val2017" / "0001.png").write_bytes(b"")
    dataset = CocoDetection(tmp_path, "val")
    with pytest.warns(UnreadableImageWarning, match="0001.png"):
        assert dataset[0] is None


_ONE_IMAGE_ONE_CATEGORY = (
    '{"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1, "name": "a"}]'
)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"is not json \("),
        ("[1, 2]", r"holds a json list, not an object with images, annotations, categories"),
        ('{"annotations": [], "categories": []}', r"lacks the list\(s\) images; expected COCO"),
        ('{"images": [], "categories": []}', r"lacks the list\(s\) annotations; expected"),
        ('{"images": [], "annotations": []}', r"lacks the list\(s\) categories; expected"),
        ('{"images": {}, "annotations": []}', r"lacks the list\(s\) images, categories;"),
        (
            '{"images": [{"id": 1}], "annotations": [], "categories": []}',
            r"images\[0\] lacks file_name; every entry of images needs id, file_name",
        ),
        (
            '{"images": [], "annotations": [{"id": 1, "image_id": 1, "category_id": 1,'
            ' "bbox": [0, 0, 1]}], "categories": [{"id": 1, "name": "a"}]}',
            r"annotations\[0\] has bbox=\[0, 0, 1\]; expected 4 numbers \[x, y, width, height\]",
        ),
        (
            '{"images": [], "annotations": [{"id": 4, "image_id": 1, "category_id": 1,'
            ' "bbox": [0, 0, 1, 1]}], "categories": [{"id": 1, "name": "a"}]}',
            r"annotation 4 names image_id 1, which is not in images",
        ),
        # Wrong json types: one sentence before pycocotools indexes the file.
        (
            _ONE_IMAGE_ONE_CATEGORY + ', "annotations": [{"id": 1, "image_id": 1,'
            ' "category_id": "1", "bbox": [0, 0, 1, 1]}]}',
            r'annotations\[0\] has category_id="1"; expected an integer',
        ),
        (
            _ONE_IMAGE_ONE_CATEGORY + ', "annotations": [{"id": 1, "image_id": null,'
            ' "category_id": 1, "bbox": [0, 0, 1, 1]}]}',
            r"annotations\[0\] has image_id=null; expected an integer",
        ),
        (
            _ONE_IMAGE_ONE_CATEGORY + ', "annotations": [{"id": [1], "image_id": 1,'
            ' "category_id": 1, "bbox": [0, 0, 1, 1]}]}',
            r"annotations\[0\] has id=\[1\]; expected an integer",
        ),
        (
            '{"images": [{"id": true, "file_name": "a.png"}], "annotations": [], "categories": []}',
            r"images\[0\] has id=true; expected an integer",
        ),
        (
            '{"images": [{"id": 1, "file_name": 7}], "annotations": [], "categories": []}',
            r"images\[0\] has file_name=7; expected a string",
        ),
        (
            _ONE_IMAGE_ONE_CATEGORY + ', "annotations": [{"id": 1, "image_id": 1,'
            ' "category_id": 1, "bbox": [0, "0", 1, 1]}]}',
            r'has bbox=\[0, "0", 1, 1\]; expected 4 numbers',
        ),
        (
            _ONE_IMAGE_ONE_CATEGORY + ', "annotations": [{"id": 1, "image_id": 1,'
            ' "category_id": 1, "bbox": [0, 0, 1, 1], "area": "big"}]}',
            r'has area="big"; expected a number',
        ),
        # Non-finite or impossible values: refused, never scored.
        (
            _ONE_IMAGE_ONE_CATEGORY + ', "annotations": [{"id": 9, "image_id": 1,'
            ' "category_id": 1, "bbox": [NaN, 0, 1, 1]}, {"id": 10, "image_id": 1,'
            ' "category_id": 1, "bbox": [Infinity, 0, 1, 1]}]}',
            r"annotation 9 \(annotations\[0\]\) has a bbox with a non-finite number .*; 2 ",
        ),
        (
            _ONE_IMAGE_ONE_CATEGORY + ', "annotations": [{"id": 3, "image_id": 1,'
            ' "category_id": 1, "bbox": [0, 0, 1, 1], "area": NaN}]}',
            r"annotation 3 \(annotations\[0\]\) has a non-finite area",
        ),
        (
            _ONE_IMAGE_ONE_CATEGORY + ', "annotations": [{"id": 3, "image_id": 1,'
            ' "category_id": 1, "bbox": [0, 0, 1, 1], "area": -4}]}',
            r"annotation 3 \(annotations\[0\]\) has a negative area",
        ),
    ],
)
def test_a_bad_annotation_file_is_one_sentence_naming_it(
    tmp_path: Path, content: str, message: str
) -> None:
    path = coco_annotation_file(tmp_path, "train")
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(DatasetError, match=message) as error:
        coco_classes(tmp_path)
    text = str(error.value)
    assert str(path) in text and "\n" not in text


def test_a_missing_annotation_file_names_the_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"instances_minival\.json does not exist; expected a"):
        CocoDetection(tmp_path, "minival")


# --- presets and collate ---


def bright_square_sample(
    box: tuple[int, int, int, int] = (40, 20, 70, 45), size: tuple[int, int] = (80, 120)
) -> dict[str, Any]:
    """A black image with one white rectangle and its box; a second box-less crowd in eval."""
    height, width = size
    pixels = torch.zeros((3, height, width), dtype=torch.uint8)
    x0, y0, x1, y1 = box
    pixels[:, y0:y1, x0:x1] = 255
    boxes = torch.tensor([box], dtype=torch.float32)
    return {
        "image": tv_tensors.Image(pixels),
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "labels": torch.tensor([2]),
        "image_id": 11,
        "orig_size": (height, width),
        "eval_target": {
            "boxes": boxes.clone(),
            "labels": torch.tensor([2]),
            "iscrowd": torch.tensor([0]),
            "area": torch.tensor([750.0]),
        },
    }


def bright_extent(image: torch.Tensor) -> list[float]:
    """The xyxy extent of the near-white pixels (the image normalised with mean and std 0.5).

    The zoom-out canvas is mid-grey (about 0 after normalisation), the background black (-1).
    """
    bright = (image > 0.5).all(dim=0)
    rows, cols = (
        torch.nonzero(bright.any(dim=1)).flatten(),
        torch.nonzero(bright.any(dim=0)).flatten(),
    )
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


@pytest.mark.parametrize("zoom_out", [False, True])
def test_train_preset_moves_boxes_with_the_pixels(zoom_out: bool) -> None:
    preset = DetectionTrainPreset(size=64, hflip_prob=1.0, iou_crop=True, zoom_out=zoom_out)
    torch.manual_seed(0)
    cropped = 0
    for _ in range(12):
        out = preset(bright_square_sample())
        assert out["image"].shape == (3, 64, 64) and out["image"].dtype == torch.float32
        assert out["labels"].tolist() == [2]
        # Bilinear resizing blurs the edge by about a pixel at most.
        assert out["boxes"].tolist()[0] == pytest.approx(bright_extent(out["image"]), abs=1.5)
        cropped += int(out["boxes"][0, 2] - out["boxes"][0, 0] > 64 * 30 / 120 + 1)
        assert out["eval_target"]["boxes"].tolist() == [[40, 20, 70, 45]]
        assert out["image_id"] == 11 and out["orig_size"] == (80, 120)
    if not zoom_out:
        assert cropped > 0  # the IoU crop enlarged the square at least once


def test_a_flip_mirrors_the_box() -> None:
    out = DetectionTrainPreset(size=64, hflip_prob=1.0, iou_crop=False)(bright_square_sample())
    # x: 120 - (70, 40) = (50, 80), then 120 -> 64 px; y: 80 -> 64 px.
    expected = [50 * 64 / 120, 20 * 64 / 80, 80 * 64 / 120, 45 * 64 / 80]
    assert out["boxes"].tolist()[0] == pytest.approx(expected, abs=1e-4)
    assert out["boxes"].tolist()[0] == pytest.approx(bright_extent(out["image"]), abs=1.0)


def test_sanitize_drops_boxes_and_only_their_training_labels() -> None:
    sample = bright_square_sample()
    # A second, thin box: under a pixel wide after resizing 120 -> 32 px.
    sample["boxes"] = tv_tensors.BoundingBoxes(
        torch.tensor([[40, 20, 70, 45], [5, 5, 7, 60]], dtype=torch.float32),
        format="XYXY",
        canvas_size=(80, 120),
    )
    sample["labels"] = torch.tensor([2, 3])
    out = DetectionTrainPreset(size=32, hflip_prob=0.0, iou_crop=False)(sample)
    assert out["labels"].tolist() == [2] and len(out["boxes"]) == 1
    assert out["eval_target"]["labels"].tolist() == [2]


def test_iou_crop_leaves_an_image_without_boxes_as_it_is() -> None:
    sample = bright_square_sample()
    sample["boxes"] = tv_tensors.BoundingBoxes(
        torch.zeros((0, 4)), format="XYXY", canvas_size=(80, 120)
    )
    sample["labels"] = torch.zeros((0,), dtype=torch.int64)
    out = RandomIoUCropWithBoxes()(sample)
    assert torch.equal(out["image"], sample["image"])
    result = DetectionTrainPreset(size=48, photometric=True, zoom_out=True)(sample)
    assert result["image"].shape == (3, 48, 48) and result["boxes"].shape == (0, 4)


def test_eval_preset_scales_boxes_and_keeps_the_original_target() -> None:
    out = DetectionEvalPreset(size=60, mean=(0.5,) * 3, std=(0.5,) * 3)(bright_square_sample())
    assert out["image"].shape == (3, 60, 60)
    assert out["boxes"].tolist() == [[20, 15, 35, 33.75]]
    assert out["image"].amax() == pytest.approx(1.0) and out["image"].amin() == pytest.approx(-1.0)
    assert out["eval_target"]["boxes"].tolist() == [[40, 20, 70, 45]]


def test_collate_detection_keeps_per_image_targets_and_counts_skipped() -> None:
    preset = DetectionEvalPreset(size=32)
    first = preset(bright_square_sample())
    second = preset(bright_square_sample(box=(0, 0, 10, 10)))
    second["image_id"] = 12
    batch = collate_detection([first, None, second, None])
    assert batch["image"].shape == (2, 3, 32, 32) and type(batch["image"]) is torch.Tensor
    assert [type(b) for b in batch["boxes"]] == [torch.Tensor, torch.Tensor]
    assert batch["boxes"][1].tolist()[0] == pytest.approx([0, 0, 32 / 12, 4])
    assert [lab.tolist() for lab in batch["labels"]] == [[2], [2]]
    assert batch["image_id"] == [11, 12] and batch["orig_size"] == [(80, 120), (80, 120)]
    assert batch["eval_target"][1]["boxes"].tolist() == [[0, 0, 10, 10]]
    assert batch["skipped"] == 2

    nothing = collate_detection([None, None])
    assert nothing["image"].shape == (0, 0, 0, 0) and nothing["boxes"] == []
    assert nothing["skipped"] == 2


def test_collate_detection_batches_through_a_data_loader(tmp_path: Path) -> None:
    write_coco(
        tmp_path,
        "val",
        [image(1), image(2, 50, 20), image(3)],
        [{"image_id": 2, "category_id": 3, "bbox": [1, 1, 8, 8]}],
    )
    (tmp_path / "val2017" / "0003.png").write_bytes(b"not a png")
    dataset = CocoDetection(tmp_path, "val", transform=DetectionEvalPreset(size=16))
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_detection)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        (batch,) = list(loader)
    assert batch["image"].shape == (2, 3, 16, 16)
    assert batch["skipped"] == 1 and batch["image_id"] == [1, 2]
    assert batch["boxes"][1].tolist()[0] == pytest.approx(
        [16 / 50, 16 / 20, 9 * 16 / 50, 9 * 16 / 20]
    )


# --- the generated COCO shapes ---

TINY = {"num_classes": 3, "train_images": 4, "val_images": 3, "image_size": 48, "max_objects": 3}


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_generated_shapes_are_deterministic_and_idempotent(tmp_path: Path) -> None:
    a = tree(generate_shapes_coco(tmp_path / "a", seed=5, **TINY))
    b = tree(generate_shapes_coco(tmp_path / "b", seed=5, **TINY))
    c = tree(generate_shapes_coco(tmp_path / "c", seed=6, **TINY))
    assert a == b
    assert a.keys() == c.keys()
    assert sum(name.endswith(".png") for name in a) == 7
    assert all(a[k] != c[k] for k in a if k.endswith(".png"))
    assert not list(tmp_path.glob(".*tmp*"))

    first = tmp_path / "a" / "train2017" / "000000.png"
    stamp = first.stat().st_mtime_ns
    generate_shapes_coco(tmp_path / "a", seed=5, **TINY)
    assert first.stat().st_mtime_ns == stamp
    with pytest.raises(DatasetError, match=r"different parameters \(seed differ"):
        generate_shapes_coco(tmp_path / "a", seed=7, **TINY)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match=r"without a manifest\.json"):
        generate_shapes_coco(foreign, **TINY)


def test_generated_shapes_read_through_the_coco_loader(tmp_path: Path) -> None:
    root = generate_shapes_coco(tmp_path / "s", seed=1, empty_val_images=2, **TINY)
    ids, names = coco_classes(root)
    assert ids == [str(category_id(i)) for i in range(3)] == ["1", "3", "5"]
    assert names == ["circle", "square", "triangle"]
    train = CocoDetection(root, "train", train=True)
    val = CocoDetection(root, "val")
    assert len(train) == 4 and len(val) == 3
    document = json.loads(coco_annotation_file(root, "val").read_text())
    with_boxes = {a["image_id"] for a in document["annotations"]}
    assert with_boxes <= {1} and {2, 3}.isdisjoint(with_boxes)  # the last two are empty

    for dataset in (train, val):
        for sample in (dataset[i] for i in range(len(dataset))):
            assert sample is not None and sample["image"].shape == (3, 48, 48)
            boxes, target = sample["boxes"], sample["eval_target"]
            assert len(boxes) <= 3 and set(sample["labels"].tolist()) <= {1, 2, 3}
            assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 48).all()
            widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            assert (widths >= 48 * 0.1).all() and (heights >= 48 * 0.1).all()
            # area is the visible mask's: never more than its box, never a sliver of it.
            box_area = widths * heights
            assert (target["area"] <= box_area + 1e-4).all()
            assert (target["area"] >= 0.15 * box_area).all()
    assert sum(len(train[i]["boxes"]) for i in range(4)) >= 4


def test_generated_boxes_are_tight_around_the_drawn_shape() -> None:
    from mnv3.data.shapes_coco import draw_detection_image

    for seed in range(4):
        rng = np.random.default_rng(seed)
        picture, objects = draw_detection_image(["square", "circle"], 64, 1, rng)
        (obj,) = objects
        x, y, w, h = obj["bbox"]
        pixels = np.asarray(picture, dtype=np.float64)
        inside = pixels[int(y + 1) : int(y + h - 1), int(x + 1) : int(x + w - 1)]
        # The shape fills at least half of its tight box with one flat colour (plus noise);
        # a box that missed the shape would see the background's gradient instead.
        centre = pixels[int(y + h / 2), int(x + w / 2)]
        close = np.linalg.norm(inside - centre, axis=-1) < 40
        assert close.mean() > 0.5
        # Tight: a 2-pixel strip inside each edge of the box touches the shape.
        whole = np.linalg.norm(pixels - centre, axis=-1) < 40
        x0, y0, x1, y1 = round(x), round(y), round(x + w), round(y + h)
        box = whole[y0:y1, x0:x1]
        assert box[:2].any() and box[-2:].any() and box[:, :2].any() and box[:, -2:].any()
