"""Training throughput: our Lightning ClassificationTask vs a plain PyTorch loop over torchvision.

Both train the same architecture (MobileNetV3-Small / -Large, 1000 classes) at 224x224, batch 32,
on CPU, with AdamW, label smoothing 0.1, and the same pre-made batches held in memory, so the
numbers compare the training step itself (Lightning loop, metrics, logging, scheduler) and not
data loading (see bench_data.py for that). Rounds alternate which side runs first (the side that
runs first in a process pays for its allocator warm-up: a fixed order once showed ours at 0.88x
where an alternating order shows 1.0x), and glibc's malloc thresholds are pinned as in
bench_models.py; the median images/s per side is reported with the ratio ours / plain.

    python bench/bench_train.py --out bench/results [--steps 8] [--rounds 5] [--models small large]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torchvision
from common import write_results
from torch.utils.data import DataLoader, Dataset

from mnv3.tasks import ClassificationTask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import pin_malloc

BATCH, SIZE, CLASSES = 32, 224, 1000


class FixedBatches(Dataset):
    """``n`` pre-made batches served as already-collated dict batches (no decode, no copy)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.batches[i]


class StepTimer(pl.Callback):
    """Wall time of each training step after ``warmup`` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._start = warmup, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._start)


def make_batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randn(BATCH, 3, SIZE, SIZE, generator=g),
            "label": torch.randint(0, CLASSES, (BATCH,), generator=g),
            "skipped": 0,
        }
        for _ in range(n)
    ]


def ours_images_per_s(name: str, batches: list[dict[str, torch.Tensor]], warmup: int) -> float:
    task = ClassificationTask(
        model={"name": f"mobilenet_v3_{name}"},
        num_classes=CLASSES,
        optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
        scheduler={"name": "cosine", "warmup_epochs": 0},
        label_smoothing=0.1,
    )
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    loader = DataLoader(FixedBatches(batches), batch_size=None, shuffle=False)
    trainer.fit(task, train_dataloaders=loader)
    return BATCH / statistics.median(timer.times)


def plain_images_per_s(name: str, batches: list[dict[str, torch.Tensor]], warmup: int) -> float:
    model = getattr(torchvision.models, f"mobilenet_v3_{name}")(num_classes=CLASSES).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        loss = criterion(model(batch["image"]), batch["label"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return BATCH / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--models", nargs="+", default=["small", "large"], choices=["small", "large"]
    )
    parser.add_argument("--steps", type=int, default=8, help="measured steps per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--default-malloc", action="store_true", help="do not pin glibc's malloc thresholds"
    )
    args = parser.parse_args()
    allocator = "glibc default" if args.default_malloc else pin_malloc()
    torch.manual_seed(0)
    batches = make_batches(args.warmup + args.steps)

    rows = []
    for name in args.models:
        ours, plain = [], []
        for r in range(args.rounds):  # alternate the order so noise and warm-up hit both alike
            runs = [(ours, ours_images_per_s), (plain, plain_images_per_s)]
            for sink, fn in runs if r % 2 == 0 else runs[::-1]:
                sink.append(fn(name, batches, args.warmup))
        o, p = statistics.median(ours), statistics.median(plain)
        rows.append(
            {
                "model": f"MobileNetV3-{name.title()}",
                "ours_img_s": o,
                "plain_img_s": p,
                "ratio": o / p,
            }
        )
        print(
            f"{name}: ours {o:.1f} img/s, plain torchvision loop {p:.1f} img/s, ratio {o / p:.3f}",
            flush=True,
        )

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    lines = [
        f"Training throughput, CPU, batch {BATCH}, {SIZE}x{SIZE}, AdamW, in-memory batches; median of {args.rounds} rounds x {args.steps} steps.",
        "",
        "| model | ours: Lightning ClassificationTask (img/s) | plain PyTorch loop, torchvision model (img/s) | ratio ours/plain | goal >= 0.95 |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        verdict = "PASS" if r["ratio"] >= 0.95 else "MISS"
        lines.append(
            f"| {r['model']} | {r['ours_img_s']:.1f} | {r['plain_img_s']:.1f} | {r['ratio']:.3f} | {verdict} |"
        )
    lines += [
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads); allocator: {allocator}.",
        "Command: `python bench/bench_train.py --out bench/results`",
    ]
    text = "\n".join(lines)
    print(text)
    write_results(args.out, "bench_train", text, rows)


if __name__ == "__main__":
    main()
