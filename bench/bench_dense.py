"""Benchmark our dense-prediction models against torchvision's: SSDLite and LR-ASPP.

Run ``python bench/bench_dense.py --out bench/results`` (``make bench``); ``--quick`` is a smoke
run with a handful of calls per row; ``--rows ssd-large-320 lraspp-512x1024`` selects rows.

Every timed row runs ours and torchvision's *same network with the same weights*:
torchvision's model is built from scratch, its BatchNorm statistics are calibrated on random
images (an untrained detector's default statistics collapse its features to constants, and
thousands of anchors then tie on one score, so the top-k and NMS would be timed on degenerate
input), and its state dict is copied into ours through the project's key maps
(``from_torchvision_ssdlite`` / ``from_torchvision_segmentation``). Equal parameter counts and
equal outputs are asserted before timing, so the ratio compares implementations only.

- SSDLite 320, MobileNetV3-Large reduced tail (the paper's dagger row): ours
  ``ssdlite320(backbone="mobilenet_v3_large", num_classes=91, reduced_tail=True)`` vs
  ``torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None,
  weights_backbone=None, num_classes=91)``. "end to end" rows call both as a user does: a list
  with one float image in [0, 1] (resize to 320x320, scaling to [-1, 1], network, box decoding,
  per-class NMS, boxes scaled back to the image). "network" rows take the resized, normalised
  (1, 3, 320, 320) tensor and return the raw class logits and box regressions (ours: the tensor
  interface; torchvision: ``model.head(list(model.backbone(x).values()))``).
- SSDLite 320, MobileNetV3-Small reduced tail: torchvision has no builder for it, so the reference
  is assembled from torchvision's own SSDLite parts exactly as its Large builder does
  (``_mobilenet_extractor``, ``SSDLiteHead``, ``DefaultBoxGenerator``, ``SSD`` with its defaults).
- LR-ASPP, built as torchvision builds it (global gate pooling, full tail, OS16, the first
  stride-8 block as the 1/8 skip, 21 classes) vs ``lraspp_mobilenet_v3_large(weights=None,
  weights_backbone=None, num_classes=21)``, at Table 7's CPU(h) 512x1024 and CPU(f) 1024x2048.
  A tensor in, logits at the input size out (torchvision's ``["out"]``).

Timing: batch 1, ``torch.set_num_threads(1)``, eval, ``torch.inference_mode()``, interleaved
rounds of alternating order and a 95% bootstrap interval of the ratio over rounds, each row
capped at its own time budget (scaled by ``--budget-scale``): the whole run takes ~5 min on a
quiet 2-core machine. The machinery is bench_models.py's, shared through ``common.py``.

The paper's LR-ASPP configurations (Table 7 rows 8 and 11) have no torchvision counterpart;
they are reported ours-only with parameters and MAdds at 1024x2048 next to the paper's numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
import torchvision
from common import (
    BUSY_CORES,
    OtherLoad,
    add_timing_args,
    fmt_ms,
    fmt_ratio,
    load_average,
    machine_info,
    ratio_interval,
    resolve_timing_args,
    time_interleaved,
    write_results,
)
from torch import nn
from torchvision.models.detection import ssdlite as tv_ssdlite
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD
from torchvision.models.segmentation import lraspp_mobilenet_v3_large

from mnv3.cpus import pin_malloc
from mnv3.models import count_madds, count_params, lraspp, ssdlite320
from mnv3.models.detection import resize_and_normalize
from mnv3.models.detection.checkpoints import from_torchvision_ssdlite
from mnv3.models.segmentation import from_torchvision_segmentation

RATIO_GOAL = 1.05  # ours / torchvision latency, 1 thread, every timed row (issues 8 and 9)
DEFAULT_ROUNDS = 1000
DEFAULT_WARMUP = 5
QUICK_ROUNDS = 3
QUICK_WARMUP = 1
SSD_SIZE = (320, 320)
SSD_CLASSES = 91  # COCO's 90 + background, torchvision's and TensorFlow's
LRASPP_CLASSES = 21  # torchvision's COCO-with-VOC-labels head
# Calibration batches: enough pixels for stable BN statistics, small enough to take ~1 s.
CALIBRATION_SSD = (2, 3, *SSD_SIZE)
CALIBRATION_SEG = (2, 3, 256, 512)
MAX_DIFF = 1e-4  # ours vs torchvision outputs (scores, logits, boxes in pixels / 10)

Mode = Literal["end_to_end", "network"]


# --------------------------------------------------------------------------- model pairs


def calibrate_bn(model: nn.Module, run: Callable[[torch.Tensor], object], x: torch.Tensor) -> None:
    """Random BN affine parameters and running statistics measured by ``run(x)`` in train mode.

    Makes eval-mode outputs informative (distinct scores, non-constant logits), so parity checks
    mean something and post-processing works on the kind of input it sees in practice.
    """
    g = torch.Generator().manual_seed(0)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.weight.data.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.data.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average: the statistics of exactly this batch
    model.train()
    with torch.no_grad():
        run(x)
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    model.eval()


class TorchvisionSSDNetwork(nn.Module):
    """torchvision's SSD without its transform and post-processing: tensor in, raw outputs out."""

    def __init__(self, ssd: SSD) -> None:
        super().__init__()
        self.backbone, self.head = ssd.backbone, ssd.head

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(list(self.backbone(x).values()))


def torchvision_ssdlite(backbone: str, num_classes: int) -> SSD:
    """torchvision's SSDLite 320 from scratch with a reduced-tail MobileNetV3 ``backbone``.

    Large is torchvision's own builder. Small has no builder, so it is assembled from the same
    parts with the same arguments as ``ssdlite320_mobilenet_v3_large`` (torchvision 0.29).
    """
    if backbone == "mobilenet_v3_large":
        return torchvision.models.detection.ssdlite320_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=num_classes
        )
    if backbone != "mobilenet_v3_small":
        raise ValueError(f"no torchvision SSDLite reference for backbone {backbone!r}")
    norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    net = torchvision.models.mobilenet_v3_small(norm_layer=norm_layer, reduced_tail=True)
    tv_ssdlite._normal_init(net)
    extractor = tv_ssdlite._mobilenet_extractor(net, 6, norm_layer)  # 6: nothing frozen
    anchors = DefaultBoxGenerator([[2, 3]] * 6, min_ratio=0.2, max_ratio=0.95)
    channels = tv_ssdlite.det_utils.retrieve_out_channels(extractor, SSD_SIZE)
    head = tv_ssdlite.SSDLiteHead(
        channels, anchors.num_anchors_per_location(), num_classes, norm_layer
    )
    return SSD(
        extractor,
        anchors,
        SSD_SIZE,
        num_classes,
        head=head,
        score_thresh=0.001,
        nms_thresh=0.55,
        detections_per_img=300,
        topk_candidates=300,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


@dataclass
class Pair:
    """Our model and torchvision's with identical weights, both in eval mode."""

    ours: nn.Module
    ref: nn.Module
    kind: Literal["detection", "segmentation"]
    reference: str  # how the torchvision side is built, for the report
    ref_network: nn.Module = field(init=False)  # tensor in, raw outputs out

    def __post_init__(self) -> None:
        # One wrapper, in eval mode: a fresh one would be in train mode, and count_madds
        # restores a module's mode recursively, which would put ``ref`` back in train mode.
        network = TorchvisionSSDNetwork(self.ref) if self.kind == "detection" else self.ref
        self.ref_network = network.eval()


@functools.cache
def ssdlite_pair(backbone: str) -> Pair:
    """SSDLite 320 with a reduced-tail ``backbone``, ours and torchvision's."""
    torch.manual_seed(0)
    ref = torchvision_ssdlite(backbone, SSD_CLASSES)
    network = TorchvisionSSDNetwork(ref)
    calibrate_bn(ref, network, torch.rand(CALIBRATION_SSD) * 2 - 1)
    # Class-logit biases spread the scores, as a trained detector's are, so that top-k and NMS
    # see many candidates above the 0.001 threshold rather than a uniform softmax.
    for block in ref.head.classification_head.module_list:
        block[1].bias.data.normal_(0, 1.0)
    ours = ssdlite320(backbone=backbone, num_classes=SSD_CLASSES, reduced_tail=True)
    ours.load_state_dict(from_torchvision_ssdlite(ref.state_dict(), ours))
    if backbone == "mobilenet_v3_large":
        reference = (
            "torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, "
            "weights_backbone=None, num_classes=91)"
        )
    else:
        reference = (
            "torchvision's SSD(_mobilenet_extractor(mobilenet_v3_small(reduced_tail=True)), "
            "SSDLiteHead, DefaultBoxGenerator) with ssdlite320_mobilenet_v3_large's arguments"
        )
    return Pair(ours.eval(), ref.eval(), "detection", reference)


@functools.cache
def lraspp_pair() -> Pair:
    """LR-ASPP on MobileNetV3-Large built as torchvision builds it, ours and torchvision's."""
    torch.manual_seed(0)
    ref = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=LRASPP_CLASSES)
    calibrate_bn(ref, ref, torch.randn(CALIBRATION_SEG))
    ours = lraspp(
        backbone="mobilenet_v3_large",
        num_classes=LRASPP_CLASSES,
        pool="global",
        reduced_tail=False,
        output_stride=16,
        low_tap="C3_first",
    )
    ours.load_state_dict(from_torchvision_segmentation(ref.state_dict(), ours))
    reference = (
        "torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, "
        "weights_backbone=None, num_classes=21)"
    )
    return Pair(ours.eval(), ref.eval(), "segmentation", reference)


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    key: str  # the --rows name
    label: str
    pair: Callable[[], Pair]
    mode: Mode
    size: tuple[int, int]  # the input image's (h, w)
    budget_s: float  # time cap for this row's rounds (before --budget-scale)


ROWS: tuple[Row, ...] = (
    Row(
        "ssd-large-320",
        "SSDLite Large reduced, end to end",
        lambda: ssdlite_pair("mobilenet_v3_large"),
        "end_to_end",
        (320, 320),
        30.0,
    ),
    Row(
        "ssd-large-480x640",
        "SSDLite Large reduced, end to end",
        lambda: ssdlite_pair("mobilenet_v3_large"),
        "end_to_end",
        (480, 640),
        30.0,
    ),
    Row(
        "ssd-large-net",
        "SSDLite Large reduced, network only",
        lambda: ssdlite_pair("mobilenet_v3_large"),
        "network",
        SSD_SIZE,
        30.0,
    ),
    Row(
        "ssd-small-320",
        "SSDLite Small reduced, end to end",
        lambda: ssdlite_pair("mobilenet_v3_small"),
        "end_to_end",
        (320, 320),
        20.0,
    ),
    Row(
        "ssd-small-net",
        "SSDLite Small reduced, network only",
        lambda: ssdlite_pair("mobilenet_v3_small"),
        "network",
        SSD_SIZE,
        20.0,
    ),
    Row(
        "lraspp-512x1024",
        "LR-ASPP Large (torchvision's config)",
        lraspp_pair,
        "network",
        (512, 1024),
        45.0,
    ),
    Row(
        "lraspp-1024x2048",
        "LR-ASPP Large (torchvision's config)",
        lraspp_pair,
        "network",
        (1024, 2048),
        60.0,
    ),
)
ROWS_BY_KEY = {row.key: row for row in ROWS}


@dataclass(frozen=True)
class PaperRow:
    """A paper configuration without a torchvision counterpart: ours-only params and MAdds."""

    label: str
    build: Callable[[], nn.Module]
    call: str  # the builder call, for the report
    size: tuple[int, int]
    paper_params: float  # millions
    paper_madds: float  # billions


PAPER_ROWS: tuple[PaperRow, ...] = (
    PaperRow(
        "Table 7 row 8: LR-ASPP Large, RF2, F128, paper pool",
        lambda: lraspp(backbone="mobilenet_v3_large", num_classes=19, pool="paper"),
        'lraspp(backbone="mobilenet_v3_large", num_classes=19, pool="paper", '
        "inter_channels=128, reduced_tail=True)",
        (1024, 2048),
        1.51,
        9.74,
    ),
    PaperRow(
        "Table 7 row 11: LR-ASPP Small, RF2, F128, paper pool",
        lambda: lraspp(backbone="mobilenet_v3_small", num_classes=19, pool="paper"),
        'lraspp(backbone="mobilenet_v3_small", num_classes=19, pool="paper", '
        "inter_channels=128, reduced_tail=True)",
        (1024, 2048),
        0.47,
        2.90,
    ),
)


# --------------------------------------------------------------------------- one row


def detection_diff(
    got: Sequence[dict[str, torch.Tensor]], expected: Sequence[dict[str, torch.Tensor]]
) -> float:
    """Largest difference between two detectors' detections: scores, and boxes / 10 (pixels).

    Infinite when the detections differ in number or in labels (then no pairing is defined).
    """
    worst = 0.0
    for g, e in zip(got, expected, strict=True):
        if g["labels"].shape != e["labels"].shape or not torch.equal(g["labels"], e["labels"]):
            return float("inf")
        if len(g["labels"]) == 0:
            continue
        worst = max(
            worst,
            (g["scores"] - e["scores"]).abs().max().item(),
            (g["boxes"] - e["boxes"]).abs().max().item() / 10,
        )
    return worst


def candidates(
    pair: Pair, mode: Mode, size: tuple[int, int]
) -> tuple[Callable[[], Any], Callable[[], Any], Callable[[Any, Any], float], int]:
    """(ours, torchvision, output difference, detections per call or -1) for one row.

    The inputs are made here once, so every timed call reads the same tensor.
    """
    g = torch.Generator().manual_seed(0)
    if pair.kind == "segmentation":
        x = torch.randn(1, 3, *size, generator=g)
        ours, ref = pair.ours, pair.ref

        def seg_diff(a: torch.Tensor, b: torch.Tensor) -> float:
            return (a - b).abs().max().item()

        return (lambda: ours(x)), (lambda: ref(x)["out"]), seg_diff, -1
    image = torch.rand(3, *size, generator=g)
    if mode == "end_to_end":
        ours, ref = pair.ours, pair.ref
        with torch.inference_mode():
            count = len(ours([image])[0]["scores"])
        return (lambda: ours([image])), (lambda: ref([image])), detection_diff, count
    x = resize_and_normalize([image], SSD_SIZE)
    ours, network = pair.ours, pair.ref_network

    def raw_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        return max((a[k] - b[k]).abs().max().item() for k in ("cls_logits", "bbox_regression"))

    return (lambda: ours(x)), (lambda: network(x)), raw_diff, -1


@dataclass
class Result:
    row: Row
    reference: str
    params_ours: int
    params_ref: int
    madds_ours: int
    madds_ref: int
    madds_size: tuple[int, int]
    max_diff: float
    detections: int  # per call on the timed image, -1 where not a detector end to end
    ours_s: float  # medians
    ref_s: float
    ratio_ci: tuple[float, float]
    rounds: int
    other_load: float | None

    @property
    def ratio(self) -> float:
        return self.ours_s / self.ref_s


def madds_size(pair: Pair, row: Row) -> tuple[int, int]:
    """Where the network runs: SSDLite resizes every image to 320x320; LR-ASPP at the input."""
    return SSD_SIZE if pair.kind == "detection" else row.size


def bench_row(row: Row, rounds: int, warmup: int, budget_scale: float) -> Result:
    """Check that ours and torchvision's agree on this row, then time them interleaved."""
    pair = row.pair()
    params_ours, params_ref = count_params(pair.ours), count_params(pair.ref)
    if params_ours != params_ref:
        raise AssertionError(
            f"{row.label}: params differ (ours {params_ours:,} vs torchvision {params_ref:,}): "
            "the reference is not the same architecture"
        )
    size = madds_size(pair, row)
    madds_ours, madds_ref = count_madds(pair.ours, size), count_madds(pair.ref_network, size)
    torch.set_num_threads(1)
    run_ours, run_ref, diff, detections = candidates(pair, row.mode, row.size)
    with torch.inference_mode():
        max_diff = diff(run_ours(), run_ref())
    if not max_diff <= MAX_DIFF:
        raise AssertionError(f"{row.label} at {row.size}: ours and torchvision differ ({max_diff})")
    load = OtherLoad()
    load.start()
    times = time_interleaved(
        {"ours": run_ours, "ref": run_ref}, rounds, warmup, row.budget_s * budget_scale
    )
    other_load = load.stop()
    med = statistics.median
    return Result(
        row=row,
        reference=pair.reference,
        params_ours=params_ours,
        params_ref=params_ref,
        madds_ours=madds_ours,
        madds_ref=madds_ref,
        madds_size=size,
        max_diff=max_diff,
        detections=detections,
        ours_s=med(times["ours"]),
        ref_s=med(times["ref"]),
        ratio_ci=ratio_interval(times["ours"], times["ref"]),
        rounds=len(times["ours"]),
        other_load=other_load,
    )


# --------------------------------------------------------------------------- reporting


def size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def input_text(row: Row) -> str:
    if row.pair is lraspp_pair:
        return f"(1, 3, {row.size[0]}, {row.size[1]}) tensor"
    if row.mode == "end_to_end":
        return f"[one {size_text(row.size)} image in [0, 1]]"
    return f"(1, 3, {SSD_SIZE[0]}, {SSD_SIZE[1]}) tensor"


def markdown_table(results: Sequence[Result]) -> str:
    lines = [
        "| row | input | params (M) ours / tv | MAdds (M) ours / tv | 1T ours ms | 1T tv ms "
        f"| ours/tv [95% CI] | goal <= {RATIO_GOAL} |",
        "|---|---|---|---|---:|---:|---|---|",
    ]
    for r in results:
        lo, _ = r.ratio_ci
        verdict = "met" if r.ratio <= RATIO_GOAL else ("noise" if lo <= RATIO_GOAL else "MISSED")
        lines.append(
            f"| {r.row.label} | {input_text(r.row)} "
            f"| {r.params_ours / 1e6:.3f} / {r.params_ref / 1e6:.3f} "
            f"| {r.madds_ours / 1e6:.1f} / {r.madds_ref / 1e6:.1f} "
            f"| {fmt_ms(r.ours_s)} | {fmt_ms(r.ref_s)} | {fmt_ratio(r.ratio, r.ratio_ci)} "
            f"| {verdict} |"
        )
    return "\n".join(lines)


def paper_table(rows: Sequence[tuple[PaperRow, int, int]]) -> str:
    lines = [
        "| configuration (ours only) | params (M) ours / paper | MAdds (B) ours / paper | at |",
        "|---|---|---|---|",
    ]
    for p, params, madds in rows:
        lines.append(
            f"| {p.label} | {params / 1e6:.3f} / {p.paper_params:.2f} "
            f"| {madds / 1e9:.2f} / {p.paper_madds:.2f} | {size_text(p.size)} |"
        )
    return "\n".join(lines)


def markdown_report(
    results: Sequence[Result],
    paper: Sequence[tuple[PaperRow, int, int]],
    info: Sequence[tuple[str, str]],
    command: str,
    rounds: int,
    warmup: int,
    budget_scale: float,
    elapsed: float,
) -> str:
    machine = "\n".join(f"- {key}: {value}" for key, value in info)
    busy = any(r.other_load is not None and r.other_load > BUSY_CORES for r in results)
    busy_note = (
        f"\n**Warning: other processes used more than {BUSY_CORES} core while some row was timed "
        "(see Checks); latencies are noisy.**\n"
        if busy
        else ""
    )
    refs = "\n".join(sorted({f"- {r.row.label.split(',')[0]}: `{r.reference}`" for r in results}))
    checks = "\n".join(
        f"- {r.row.key}: max |ours - tv| {r.max_diff:.1e}"
        + (f" ({r.detections} detections)" if r.detections >= 0 else "")
        + f"; MAdds at {size_text(r.madds_size)}; {r.rounds} rounds (budget "
        f"{r.row.budget_s * budget_scale:.0f} s)"
        + (f"; other processes: {r.other_load:.2f} cores" if r.other_load is not None else "")
        for r in results
    )
    calls = "\n".join(f"- {p.label}: `{p.call}`" for p, _, _ in paper)
    return f"""# Dense prediction CPU benchmark: SSDLite and LR-ASPP, ours vs torchvision

Command: `{command}`
Date: {dt.datetime.now().astimezone().isoformat(timespec="seconds")}; total time {elapsed:.0f} s

{machine}
{busy_note}
Method: batch 1, `torch.set_num_threads(1)`, `model.eval()`, `torch.inference_mode()`,
`time.perf_counter()` per call; {warmup} warm-up calls each, then up to {rounds} rounds (each row
capped at its budget) in which ours and torchvision's run one call each, in alternating order,
GC paused. Medians in ms; `[95% CI]` is a bootstrap interval of the ratio over rounds. Both sides
have identical weights (torchvision's from-scratch init with calibrated BN statistics, copied into
ours), and their outputs are checked equal before timing. "end to end" = a list with one float
image in [0, 1], preprocessing + network + postprocessing, torchvision's API on both sides;
"network only" = the resized, normalised tensor in, raw class logits and box regressions out.
SSDLite MAdds are the network's at 320x320 (every image is resized to it); LR-ASPP's at the input.

{markdown_table(results)}

Torchvision references (same architecture; equal parameter counts asserted):
{refs}

Checks:
{checks}

The paper's configurations (no torchvision counterpart):

{paper_table(paper)}

{calls}
"""


def csv_record(r: Result) -> dict[str, object]:
    return {
        "row": r.row.key,
        "label": r.row.label,
        "mode": r.row.mode,
        "input": size_text(r.row.size),
        "reference": r.reference,
        "params_ours": r.params_ours,
        "params_tv": r.params_ref,
        "madds_ours": r.madds_ours,
        "madds_tv": r.madds_ref,
        "madds_at": size_text(r.madds_size),
        "ours_1t_ms": f"{r.ours_s * 1e3:.4f}",
        "tv_1t_ms": f"{r.ref_s * 1e3:.4f}",
        "ratio_1t": f"{r.ratio:.4f}",
        "ratio_1t_ci_lo": f"{r.ratio_ci[0]:.4f}",
        "ratio_1t_ci_hi": f"{r.ratio_ci[1]:.4f}",
        "max_abs_diff_tv": f"{r.max_diff:.3e}",
        "detections": r.detections,
        "rounds": r.rounds,
        "other_load_cores": "" if r.other_load is None else f"{r.other_load:.3f}",
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_args(parser, list(ROWS_BY_KEY), "--rows", DEFAULT_ROUNDS, DEFAULT_WARMUP)
    parser.add_argument("--no-paper", action="store_true", help="skip the paper rows' MAdds")
    parser.add_argument(
        "--budget-scale",
        type=float,
        default=1.0,
        help="multiply every row's time cap (default 1.0: ~5 min in all)",
    )
    args = parser.parse_args(argv)
    if args.budget_scale <= 0:
        parser.error(f"--budget-scale must be positive, got {args.budget_scale}")
    args.selected = resolve_timing_args(
        parser,
        args,
        args.rows,
        ROWS_BY_KEY,
        (DEFAULT_ROUNDS, QUICK_ROUNDS),
        (DEFAULT_WARMUP, QUICK_WARMUP),
    )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    threads_all = torch.get_num_threads()
    malloc = "glibc default" if args.default_malloc else pin_malloc()
    info = [*machine_info(threads_all), ("allocator", malloc)]
    start = time.perf_counter()
    results = []
    for row in args.selected:
        print(f"[bench] {row.key} ...", file=sys.stderr, flush=True)
        results.append(bench_row(row, args.rounds, args.warmup, args.budget_scale))
    torch.set_num_threads(threads_all)
    paper = []
    if not args.no_paper:
        for p in PAPER_ROWS:
            model = p.build().eval()
            paper.append((p, count_params(model), count_madds(model, p.size)))
    elapsed = time.perf_counter() - start
    info.append(("load average at end", load_average()))
    report = markdown_report(
        results, paper, info, command, args.rounds, args.warmup, args.budget_scale, elapsed
    )
    print(report)
    write_results(args.out, "bench_dense", report, [csv_record(r) for r in results])
    print(
        f"wrote {args.out / 'bench_dense.md'} and {args.out / 'bench_dense.csv'}", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
