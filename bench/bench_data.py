"""Data-loading throughput: this project's pipeline against the classic PIL + transforms (v1) one.

Writes ``--num-images`` real JPEGs of ImageNet-like size and content into a temporary ImageFolder,
then times one epoch of the training preset (224 random resized crop + flip) and of the evaluation
preset (resize 256 + centre crop 224) through :class:`mnv3.data.DataModule` loaders
with 0, 1 and 2 workers, and the same loaders with PIL decoding and ``torchvision.transforms`` (v1)
as the reference. Prints a markdown table and writes ``bench_data.md`` / ``bench_data.csv``.

    python bench/bench_data.py --out bench/results
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from common import write_results
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as v1

from mnv3.data import IMAGENET_MEAN, IMAGENET_STD, DataModule, LabeledImageDataset

NUM_CLASSES = 8


def write_jpegs(root: Path, count: int, seed: int = 0) -> None:
    """ImageNet-like JPEGs: 500x375, smooth colour fields, a few edges and mild sensor noise.

    Pure noise would compress 3-4x worse than photographs and make decoding look slower than it
    is; this content lands near ImageNet's average file size (~110 kB).
    """
    rng = np.random.default_rng(seed)
    for i in range(count):
        low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        field = np.asarray(low.resize((500, 375), Image.Resampling.BICUBIC), dtype=np.float32)
        texture = Image.fromarray(rng.integers(0, 256, (188, 250, 3), dtype=np.uint8))
        detail = np.asarray(texture.resize((500, 375), Image.Resampling.BILINEAR), dtype=np.float32)
        pixels = 0.6 * field + 0.4 * detail + rng.normal(0.0, 8.0, field.shape)
        path = root / "train" / f"class_{i % NUM_CLASSES}" / f"{i:05d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


class PILReference(Dataset):
    """The classic pipeline: PIL decode, ``transforms`` v1 on PIL images, ToTensor, Normalize."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


def v1_presets(crop: int, resize: int) -> dict[str, Callable]:
    normalize = [v1.ToTensor(), v1.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return {
        "train": v1.Compose([v1.RandomResizedCrop(crop), v1.RandomHorizontalFlip(), *normalize]),
        "eval": v1.Compose([v1.Resize(resize), v1.CenterCrop(crop), *normalize]),
    }


def images_per_second(loader: DataLoader, count_batch: Callable[[object], int]) -> float:
    """Throughput of one full epoch, after a one-batch warm-up (worker start, lazy imports)."""
    next(iter(loader))  # with persistent workers, the next iter() reuses the started workers
    start = time.perf_counter()
    seen = sum(count_batch(batch) for batch in loader)
    return seen / (time.perf_counter() - start)


def run(
    num_images: int, batch_size: int, workers: Iterable[int], crop: int, repeats: int
) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_jpegs(root, num_images)
        sizes = [p.stat().st_size for p in root.rglob("*.JPEG")]
        print(
            f"wrote {num_images} JPEGs 500x375, mean {np.mean(sizes) / 1e3:.0f} kB, "
            f"in {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
        )
        for num_workers in workers:
            dm = DataModule(
                str(root),
                batch_size=batch_size,
                num_workers=num_workers,
                image_size=crop,
                val_split="train",  # evaluate on the same files: only the preset differs
                drop_last=False,
                pin_memory=False,
            )
            ours = {"train": dm.train_dataloader(), "eval": dm.val_dataloader()}
            train_set: LabeledImageDataset = dm.get_dataset("train")
            presets = v1_presets(crop, dm.eval_transform.resize_size)
            for split in ("train", "eval"):
                reference = DataLoader(
                    PILReference(train_set.samples, presets[split]),
                    batch_size=batch_size,
                    shuffle=split == "train",
                    num_workers=num_workers,
                    persistent_workers=num_workers > 0,
                )
                fast = slow = 0.0
                for _ in range(repeats):  # interleaved, best of: robust to a busy machine
                    fast = max(fast, images_per_second(ours[split], lambda b: len(b["label"])))
                    slow = max(slow, images_per_second(reference, lambda b: len(b[1])))
                rows.append(
                    {
                        "split": split,
                        "workers": num_workers,
                        "tv_io_v2": round(fast, 1),
                        "pil_v1": round(slow, 1),
                        "ratio": round(fast / slow, 2),
                    }
                )
                print(rows[-1], file=sys.stderr)
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Data loading, {args.num_images} JPEGs 500x375, batch {args.batch_size}, crop {args.crop}: "
        f"images/s, best of {args.repeats} epochs, each after a one-batch warm-up.",
        "",
        "| preset | workers | torchvision.io + v2 (mnv3) | PIL + transforms v1 | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['split']} | {r['workers']} | {r['tv_io_v2']:.0f} | {r['pil_v1']:.0f} | "
        f"{r['ratio']:.2f}x |"
        for r in rows
    ]
    lines += [
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"main-process torch threads {torch.get_num_threads()}; "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow "
        f"{PIL.__version__}, Python {platform.python_version()}.",
        f"Command: `python bench/bench_data.py {' '.join(sys.argv[1:])}`".rstrip(),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2, help="epochs per loader; the best counts")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads of the main process (DataLoader workers always use 1)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    # One thread makes workers=0 a one-core figure comparable to a worker's; more threads on a
    # busy machine mostly measure contention at torch's parallel-for barriers.
    torch.set_num_threads(args.threads)

    rows = run(args.num_images, args.batch_size, args.workers, args.crop, args.repeats)
    table = markdown(rows, args)
    print(table)
    write_results(args.out, "bench_data", table, rows)


if __name__ == "__main__":
    main()
