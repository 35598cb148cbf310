"""One latency table: every backbone and head on every deployment path, vs torchvision eager.

Run ``python bench/bench_deploy.py --out bench/results`` (``make bench``); ``--quick`` is a smoke
run with a few calls per path; ``--rows large small`` selects rows, ``--paths eager ort-fp32``
selects paths; ``--ckpt <run>/checkpoints/best.ckpt`` measures int8 top-1 on that classifier
(default: no accuracy section).

Rows: the classifier at 224 on every backbone (Large, Small, 0.75, minimal, reduced tail,
MobileNetV2), SSDLite 320 (Large / Small reduced, the paper's dagger rows) and LR-ASPP at
512x1024 (torchvision's Large configuration, the paper's Table 7 rows 8 and 11). Paths, each
built with ``mnv3.models`` / ``mnv3.deploy`` (nothing re-implemented here):

- ``eager``: our ``nn.Module``; ``torchvision``: torchvision's same architecture with the same
  weights (bench_models / bench_dense build both, equal parameter counts asserted);
- ``optimised``: ``optimize_for_inference(mode="freeze")`` (BN folded, NHWC, oneDNN Graph);
- ``ort-fp32`` / ``ort-int8``: ``export_onnx`` + onnxruntime, ``quantize_onnx`` (static QDQ,
  per-channel weights, MinMax calibration);
- ``torchao-int8``: ``quantize_ptq(backend="x86")`` (PT2E, ``X86InductorQuantizer``) +
  ``compile_int8`` (Inductor, freezing);
- ``pte-fp32`` / ``pte-int8``: ``export_pte`` (XNNPACK delegate; int8 with ``XNNPACKQuantizer``,
  SSDLite's box decoding and softmax kept in float) run by ExecuTorch's Python runtime;
- ``pt2-fp32`` / ``pt2-bf16``: ``export_pt2`` (``torch.export`` + AOTInductor with freezing, the
  successor of the TorchScript path) run by ``aoti_load_package``; bf16 weights and activations.

int8 latency rows are calibrated on random N(0, 1) images (the normalised input range; 24 per
classifier, 8 per dense row): latency does not depend on the scales. The accuracy section
calibrates on 32 images of the checkpoint's own val split and scores its test split.

Timing: batch 1 (``--batch 8``: every path built and timed at that batch, throughput in the
table; results as ``bench_deploy_b8.*``), interleaved rounds of alternating order (``common.time_interleaved``), medians,
95% bootstrap interval of each path's ratio to torchvision eager. Every row has a time budget
(export + timing, ``--budget-scale`` multiplies it): a path whose export would start after the
budget is spent is reported "n/a (budget)", so a quiet 2-core machine finishes in ~14 minutes
and a loaded one still ends. Export errors become "n/a" with the reason in a footnote.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from bench_dense import lraspp_pair, ssdlite_pair
from bench_models import ROWS_BY_KEY as MODEL_ROWS
from common import (
    BUSY_CORES,
    OtherLoad,
    add_timing_args,
    load_average,
    machine_info,
    ratio_interval,
    resolve_timing_args,
    time_interleaved,
    write_results,
)
from torch import nn

from mnv3.cpus import pin_malloc
from mnv3.deploy import (
    DetectorForExport,
    compile_int8,
    export_onnx,
    export_pt2,
    export_pte,
    fixed_batches,
    load_pt2,
    load_pte,
    onnx_session,
    quantize_onnx,
    quantize_ptq,
    run_onnx,
    run_pt2,
    run_pte,
)
from mnv3.models import (
    count_madds,
    count_params,
    lraspp,
    mobilenet_v3_large,
    mobilenet_v3_small,
    optimize_for_inference,
)
from mnv3.models.checkpoints import from_torchvision

DEFAULT_ROUNDS = 200
DEFAULT_WARMUP = 5
QUICK_ROUNDS = 4
QUICK_WARMUP = 1
PATHS = (
    "eager",
    "torchvision",
    "optimised",
    "ort-fp32",
    "ort-int8",
    "torchao-int8",
    "pte-fp32",
    "pte-int8",
    "pt2-fp32",
    "pt2-bf16",
)
INT8_PATHS = ("ort-int8", "torchao-int8", "pte-int8")
BF16_PATHS = ("pt2-bf16",)
FP32_PATHS = tuple(p for p in PATHS if p not in (*INT8_PATHS, *BF16_PATHS, "torchvision"))
FP32_GOAL, INT8_GOAL, TOP1_GOAL = 0.30, 0.15, 0.01  # Large classifier, batch 1, 1 thread
GOAL_ROW = "large"
CALIBRATION_CLS, CALIBRATION_DENSE = 24, 8  # random images for the latency rows' int8 paths
ACCURACY_CALIBRATION = 32  # val images for the accuracy section's int8 paths


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    """One network at one input size; ``build`` returns (ours, torchvision or None, reference)."""

    key: str
    label: str
    kind: str  # classification | detection | segmentation
    size: tuple[int, int]
    build: Callable[[], tuple[nn.Module, nn.Module | None, str]]
    budget_s: float  # export + timing cap before --budget-scale


def _classifier(
    key: str,
    ours: Callable[[], nn.Module] | None = None,
    ref: Callable[[], nn.Module] | None = None,
    reference: str = "",
) -> Callable[[], tuple[nn.Module, nn.Module | None, str]]:
    """A classifier pair with torchvision's random weights copied into ours."""

    def build() -> tuple[nn.Module, nn.Module | None, str]:
        torch.manual_seed(0)
        spec = MODEL_ROWS.get(key)
        mine = (ours or spec.build_ours)().eval()  # type: ignore[union-attr]
        theirs = (ref or spec.build_ref)().eval()  # type: ignore[union-attr]
        mine.load_state_dict(from_torchvision(theirs.state_dict(), mine))
        return mine, theirs, reference or spec.reference  # type: ignore[union-attr]

    return build


def _ssdlite(backbone: str) -> Callable[[], tuple[nn.Module, nn.Module | None, str]]:
    """SSDLite with box decoding in the graph (what ONNX exports) vs torchvision's network."""

    def build() -> tuple[nn.Module, nn.Module | None, str]:
        pair = ssdlite_pair(backbone)
        return DetectorForExport(pair.ours, (320, 320)).eval(), pair.ref_network, pair.reference

    return build


def _lraspp_tv() -> tuple[nn.Module, nn.Module | None, str]:
    pair = lraspp_pair()

    class Out(nn.Module):  # torchvision returns {"out": logits}
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m(x)["out"]

    return pair.ours, Out(pair.ref).eval(), pair.reference


def _lraspp_paper(backbone: str) -> Callable[[], tuple[nn.Module, nn.Module | None, str]]:
    def build() -> tuple[nn.Module, nn.Module | None, str]:
        torch.manual_seed(0)
        return lraspp(backbone=backbone, num_classes=19, pool="paper").eval(), None, "none"

    return build


CLS = (224, 224)
ROWS: tuple[Row, ...] = (
    Row("large", "Large 1.0", "classification", CLS, _classifier("large-1.0"), 150.0),
    Row("small", "Small 1.0", "classification", CLS, _classifier("small-1.0"), 110.0),
    Row("large-075", "Large 0.75", "classification", CLS, _classifier("large-0.75"), 30.0),
    Row("small-075", "Small 0.75", "classification", CLS, _classifier("small-0.75"), 30.0),
    Row(
        "large-minimal", "Large minimal", "classification", CLS, _classifier("large-minimal"), 30.0
    ),
    Row(
        "small-minimal", "Small minimal", "classification", CLS, _classifier("small-minimal"), 30.0
    ),
    Row(
        "large-reduced",
        "Large reduced tail",
        "classification",
        CLS,
        _classifier(
            "large-reduced",
            lambda: mobilenet_v3_large(reduced_tail=True),
            lambda: torchvision.models.mobilenet_v3_large(reduced_tail=True),
            "torchvision.models.mobilenet_v3_large(reduced_tail=True)",
        ),
        30.0,
    ),
    Row(
        "small-reduced",
        "Small reduced tail",
        "classification",
        CLS,
        _classifier(
            "small-reduced",
            lambda: mobilenet_v3_small(reduced_tail=True),
            lambda: torchvision.models.mobilenet_v3_small(reduced_tail=True),
            "torchvision.models.mobilenet_v3_small(reduced_tail=True)",
        ),
        30.0,
    ),
    Row("v2", "MobileNetV2 1.0", "classification", CLS, _classifier("v2-1.0"), 30.0),
    Row(
        "ssd-large",
        "SSDLite 320 Large reduced",
        "detection",
        (320, 320),
        _ssdlite("mobilenet_v3_large"),
        45.0,
    ),
    Row(
        "ssd-small",
        "SSDLite 320 Small reduced",
        "detection",
        (320, 320),
        _ssdlite("mobilenet_v3_small"),
        35.0,
    ),
    Row(
        "lraspp-tv",
        "LR-ASPP Large, torchvision config",
        "segmentation",
        (512, 1024),
        _lraspp_tv,
        60.0,
    ),
    Row(
        "lraspp-large",
        "LR-ASPP Large, Table 7 row 8",
        "segmentation",
        (512, 1024),
        _lraspp_paper("mobilenet_v3_large"),
        50.0,
    ),
    Row(
        "lraspp-small",
        "LR-ASPP Small, Table 7 row 11",
        "segmentation",
        (512, 1024),
        _lraspp_paper("mobilenet_v3_small"),
        40.0,
    ),
)
ROWS_BY_KEY = {row.key: row for row in ROWS}


# --------------------------------------------------------------------------- one row


@dataclass
class PathResult:
    """One path of one row: medians in seconds (None where not run) and the artifact size."""

    size_bytes: int | None = None
    t1: float | None = None
    tn: float | None = None
    ratio1_ci: tuple[float, float] | None = None
    ration_ci: tuple[float, float] | None = None
    note: str | None = None  # why a column is n/a
    build_s: float = 0.0


@dataclass
class RowResult:
    row: Row
    params: int
    madds: int
    reference: str
    batch: int = 1
    paths: dict[str, PathResult] = field(default_factory=dict)
    rounds_1t: int = 0
    rounds_nt: int = 0
    other_load: float | None = None
    elapsed_s: float = 0.0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence exporters' progress prints and warnings (errors still raise)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _state_bytes(module: nn.Module) -> int:
    """Bytes of ``torch.save(module.state_dict())``: the file an eager user ships."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.tell()


def _script_bytes(module: Any) -> int | None:
    if not isinstance(module, torch.jit.ScriptModule):
        return None
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return buffer.tell()


def _set_pte_threads(n: int) -> None:
    """Size ExecuTorch's process-wide XNNPACK threadpool; call before any program is loaded.

    Loaded XNNPACK delegates keep the pool they were created with: resetting it afterwards
    deadlocked the next ``execute`` (observed with executorch 1.5.1), so the .pte paths run
    with one pool size per process, 1 thread here (the goal column).
    """
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(n)


def bench_row(
    row: Row,
    paths: Sequence[str],
    rounds: int,
    warmup: int,
    threads_all: int,
    budget_s: float,
    workdir: Path,
    batch: int = 1,
) -> RowResult:
    """Build every requested path of ``row`` within its budget, then time them interleaved."""
    start = time.perf_counter()
    ours, ref, reference = row.build()
    x = torch.randn(batch, 3, *row.size, generator=torch.Generator().manual_seed(0))
    result = RowResult(row, count_params(ours), count_madds(ours, row.size), reference, batch)
    n_cal = CALIBRATION_CLS if row.kind == "classification" else CALIBRATION_DENSE
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(min(8, n_cal), 3, *row.size, generator=g) for _ in range(n_cal // 8)]
    if not calibration:
        calibration = [torch.randn(n_cal, 3, *row.size, generator=g)]
    torch.set_num_threads(1)
    one: dict[str, Callable[[], object]] = {}  # 1-thread candidates
    many: dict[str, Callable[[], object]] = {}  # all-threads candidates (set up per call)
    res = result.paths

    def spent() -> bool:
        return time.perf_counter() - start > budget_s

    stem = workdir / row.key
    onnx_path: Path | None = None
    for name in paths:
        res[name] = pr = PathResult()
        if name not in ("eager", "torchvision") and spent():
            pr.note = f"budget: the row's {budget_s:.0f} s were spent on the paths before it"
            continue
        t0 = time.perf_counter()
        try:
            with _quiet():
                _build_path(name, row, ours, ref, x, calibration, stem, onnx_path, one, many, pr)
            if name == "ort-fp32":
                onnx_path = stem.with_suffix(".onnx")
        except Exception as exc:  # an exporter failure is a table entry
            pr.note = _first_line(exc)
            one.pop(name, None)
            many.pop(name, None)
        pr.build_s = time.perf_counter() - t0

    load = OtherLoad()
    load.start()
    remaining = max(budget_s - (time.perf_counter() - start), 0.0)
    torch.set_num_threads(1)
    t1 = time_interleaved(one, rounds, warmup, max(remaining * 2 / 3, 1.0))
    torch.set_num_threads(threads_all)
    tn = time_interleaved(many, rounds, warmup, max(remaining / 3, 1.0)) if many else {}
    torch.set_num_threads(1)
    result.other_load = load.stop()
    ref_t1, ref_tn = t1.get("torchvision"), tn.get("torchvision")
    for name, times in t1.items():
        res[name].t1 = statistics.median(times)
        if ref_t1 is not None:
            res[name].ratio1_ci = ratio_interval(times, ref_t1)
    for name, times in tn.items():
        res[name].tn = statistics.median(times)
        if ref_tn is not None:
            res[name].ration_ci = ratio_interval(times, ref_tn)
    result.rounds_1t = len(next(iter(t1.values()), []))
    result.rounds_nt = len(next(iter(tn.values()), []))
    result.elapsed_s = time.perf_counter() - start
    return result


def _build_path(
    name: str,
    row: Row,
    ours: nn.Module,
    ref: nn.Module | None,
    x: torch.Tensor,
    calibration: list[torch.Tensor],
    stem: Path,
    onnx_path: Path | None,
    one: dict[str, Callable[[], object]],
    many: dict[str, Callable[[], object]],
    pr: PathResult,
) -> None:
    """Export / compile one path and register its 1-thread and all-threads callables."""
    if name == "eager":
        pr.size_bytes = _state_bytes(ours)
        one[name] = many[name] = lambda: ours(x)
    elif name == "torchvision":
        if ref is None:
            raise RuntimeError("torchvision has no builder for this configuration")
        pr.size_bytes = _state_bytes(ref)
        one[name] = many[name] = lambda: ref(x)
    elif name == "optimised":
        opt = optimize_for_inference(ours, mode="freeze", example_input=x)
        pr.size_bytes = _script_bytes(opt)
        cl = torch.channels_last
        one[name] = many[name] = lambda: opt(x.contiguous(memory_format=cl))
    elif name in ("ort-fp32", "ort-int8"):
        fp32 = stem.with_suffix(".onnx")
        if onnx_path is None:
            export_onnx(ours, fp32, x, dynamic_batch=False)
        path = fp32
        if name == "ort-int8":
            # The fixed-batch model takes feeds of its batch (quantize_onnx feeds each tensor
            # as given).
            feeds = fixed_batches(calibration, int(x.shape[0]))
            path = quantize_onnx(fp32, stem.with_name(stem.name + "_int8.onnx"), feeds, True)
        pr.size_bytes = path.stat().st_size
        s1 = onnx_session(path, threads=1)
        sn = onnx_session(path, threads=None)
        arr = x.numpy()
        one[name] = lambda: run_onnx(s1, arr)
        many[name] = lambda: run_onnx(sn, arr)
    elif name == "torchao-int8":
        converted = quantize_ptq(ours, x, calibration, "x86")
        pr.size_bytes = _state_bytes(converted)
        # Inductor fixes the OpenMP thread count of its kernels when it compiles: 1 here.
        compiled = compile_int8(converted)
        with torch.inference_mode():
            compiled(x)
        one[name] = lambda: compiled(x)
        pr.note = "all threads: not measured (Inductor compiles the thread count in; 1 thread)"
    elif name in ("pte-fp32", "pte-int8"):
        # SSDLite rows: ``ours`` is already the DetectorForExport the onnx paths time.
        quant = "int8" if name == "pte-int8" else None
        path = export_pte(ours, stem.with_name(f"{stem.name}_{name}.pte"), x, quant, calibration)
        pr.size_bytes = path.stat().st_size
        method = load_pte(path)
        one[name] = lambda: run_pte(method, x)
        pr.note = "all threads: not measured (one XNNPACK threadpool per process, 1 thread)"
    elif name in ("pt2-fp32", "pt2-bf16"):
        precision = "bf16" if name == "pt2-bf16" else None
        pt2 = export_pt2(ours, stem.with_name(f"{stem.name}_{name}.pt2"), x, precision, None, False)
        pr.size_bytes = pt2.stat().st_size
        runner = load_pt2(pt2)
        one[name] = lambda: run_pt2(runner, x)
        pr.note = "all threads: not measured (Inductor compiles the thread count in; 1 thread)"
    else:
        raise ValueError(f"unknown path {name!r}")


# --------------------------------------------------------------------------- physical limit


@dataclass
class Peak:
    """Per-core multiply-add peaks (MAC/s): derived from the CPU and measured in torch."""

    fp32_derived: float | None
    int8_derived: float | None
    fp32_measured: float
    int8_measured: float | None
    how: str


def cpu_flags_and_clock() -> tuple[set[str], float | None, str, int | None]:
    """(flags, clock in Hz, vendor, cpu family) from /proc/cpuinfo; empty where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set(), None, "", None
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    mhz = float(info["cpu MHz"]) * 1e6 if "cpu MHz" in info else None
    family = int(info["cpu family"]) if info.get("cpu family", "").isdigit() else None
    return set(info.get("flags", "").split()), mhz, info.get("vendor_id", ""), family


def measure_peak(quick: bool) -> Peak:
    """Derived and measured single-core multiply-add peaks, fp32 and int8.

    Derived: 2 FMA pipes x vector lanes x clock (fp32), and VNNI's 4 int8 MACs per 32-bit lane
    (``vpdpbusd``) for int8. AMD Zen 4 (family 25) executes 512-bit ops as two 256-bit halves,
    so its datapath counts as 256 bits. The clock is /proc/cpuinfo's (in a VM, the host's
    nominal clock; boost is unknown). Measured: a square sgemm / ``torch._int_mm`` at 1 thread.
    """
    flags, hz, vendor, family = cpu_flags_and_clock()
    if "avx512f" in flags and not (vendor == "AuthenticAMD" and family == 25):
        bits = 512
    elif "avx2" in flags or "fma" in flags:
        bits = 256
    else:
        bits = 128
    lanes = bits // 32
    fp32 = 2 * lanes * hz if hz else None
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    int8 = 2 * lanes * 4 * hz if hz and vnni else None
    how = (
        f"{bits}-bit FMA datapath x 2 pipes = {2 * lanes} fp32 MAC/cycle"
        + (f", VNNI {2 * lanes * 4} int8 MAC/cycle" if vnni else ", no VNNI")
        + (f", clock {hz / 1e9:.2f} GHz (/proc/cpuinfo)" if hz else ", clock unknown")
    )
    n = 1024 if quick else 2048
    torch.set_num_threads(1)
    a, b = torch.randn(n, n), torch.randn(n, n)

    def rate(fn: Callable[[], object]) -> float:
        fn()
        best = math.inf
        for _ in range(3):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return n**3 / best

    fp32_measured = rate(lambda: a @ b)
    try:
        ai = torch.randint(-128, 127, (n, n), dtype=torch.int8)
        bi = torch.randint(-128, 127, (n, n), dtype=torch.int8)
        int8_measured: float | None = rate(lambda: torch._int_mm(ai, bi))
    except RuntimeError:
        int8_measured = None
    return Peak(fp32, int8, fp32_measured, int8_measured, how)


# --------------------------------------------------------------------------- accuracy


@dataclass
class Accuracy:
    ckpt: str
    size: tuple[int, int]
    images: int
    top1: dict[str, float | None]
    notes: dict[str, str]


def measure_accuracy(ckpt: Path, workdir: Path) -> Accuracy:
    """Top-1 of a trained classifier on its test split: fp32 eager vs every int8 and bf16 path.

    The network and data module are the run's :class:`mnv3.trained_run.TrainedRun` ones, as
    ``mnv3.export`` opens them; int8 paths are calibrated on the first
    :data:`ACCURACY_CALIBRATION` images of the val split.
    """
    from mnv3.deploy import calibration_batches
    from mnv3.trained_run import TrainedRun

    run = TrainedRun.open(ckpt, key="--ckpt")
    if run.task_name != "classification":
        raise ValueError(f"--ckpt {ckpt} is a {run.task_name} model; expected a classifier")
    net = run.network
    datamodule = run.datamodule()
    calibration = calibration_batches(datamodule, ACCURACY_CALIBRATION, "val")
    dataset = datamodule.get_dataset("test")
    samples = [s for s in (dataset[i] for i in range(len(dataset))) if s is not None]
    images = torch.stack([s["image"] for s in samples])
    labels = torch.tensor([int(s["label"]) for s in samples])
    size = (int(images.shape[-2]), int(images.shape[-1]))
    x1 = images[:1]
    top1: dict[str, float | None] = {}
    notes: dict[str, str] = {}

    def score(logits: torch.Tensor) -> float:
        return float((logits.argmax(1) == labels).float().mean())

    def batched(fn: Callable[[torch.Tensor], torch.Tensor], bs: int = 32) -> torch.Tensor:
        return torch.cat([fn(images[i : i + bs]) for i in range(0, len(images), bs)])

    stem = workdir / "accuracy"
    torch.set_num_threads(os.cpu_count() or 1)
    with torch.inference_mode():
        top1["fp32 eager"] = score(batched(net))
    steps: dict[str, Callable[[], torch.Tensor]] = {}

    def ort(per_channel: bool | None) -> torch.Tensor:
        fp32 = stem.with_suffix(".onnx")
        if not fp32.exists():
            export_onnx(net, fp32, x1)
        path = fp32
        if per_channel is not None:
            suffix = "_pc" if per_channel else "_pt"
            path = quantize_onnx(
                fp32, stem.with_name(f"accuracy{suffix}.onnx"), calibration, per_channel
            )
        session = onnx_session(path)
        return batched(lambda b: torch.from_numpy(run_onnx(session, b)[0]))

    def torchao() -> torch.Tensor:
        compiled = compile_int8(quantize_ptq(net, x1, calibration, "x86"))
        with torch.inference_mode():
            return batched(compiled)

    def pte() -> torch.Tensor:
        path = export_pte(net, stem.with_name("accuracy_int8.pte"), x1, "int8", calibration)
        method = load_pte(path)
        return torch.cat([run_pte(method, images[i : i + 1]) for i in range(len(images))])

    steps["ort-fp32"] = lambda: ort(None)
    steps["ort-int8 (per-channel)"] = lambda: ort(True)
    steps["ort-int8 (per-tensor)"] = lambda: ort(False)

    def pt2(precision: str | None) -> torch.Tensor:
        path = export_pt2(net, stem.with_name(f"accuracy_{precision}.pt2"), x1, precision)
        runner = load_pt2(path)
        return batched(lambda b: run_pt2(runner, b))

    steps["torchao-int8"] = torchao
    steps["pte-int8"] = pte
    steps["pt2-fp32"] = lambda: pt2(None)
    steps["pt2-bf16"] = lambda: pt2("bf16")
    for name, fn in steps.items():
        try:
            with _quiet():
                top1[name] = score(fn())
        except Exception as exc:  # reported in the table
            top1[name] = None
            notes[name] = _first_line(exc)
    torch.set_num_threads(1)
    return Accuracy(str(ckpt), size, len(labels), top1, notes)


# --------------------------------------------------------------------------- reporting


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1e3:.2f}"


def _size(v: int | None) -> str:
    return "n/a" if v is None else f"{v / 2**20:.2f}"


def markdown_table(results: Sequence[RowResult], paths: Sequence[str], n: int) -> tuple[str, str]:
    """The latency table and its footnotes (one per distinct n/a reason)."""
    notes: dict[str, int] = {}

    def mark(note: str | None) -> str:
        if not note:
            return ""
        notes.setdefault(note, len(notes) + 1)
        return f"<sup>{notes[note]}</sup>"

    head = "| Row | Params M | MAdds M | Path | File MiB | 1T ms | 1T img/s | 1T / tv eager | " + (
        f"{n}T ms | {n}T / tv eager |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in results:
        for i, name in enumerate(paths):
            p = r.paths.get(name, PathResult(note="not selected (--paths)"))
            ref = r.paths.get("torchvision")
            r1 = (
                f"{p.t1 / ref.t1:.3f} [{p.ratio1_ci[0]:.2f}-{p.ratio1_ci[1]:.2f}]"
                if p.t1 and ref and ref.t1 and p.ratio1_ci
                else "n/a"
            )
            rn = (
                f"{p.tn / ref.tn:.3f} [{p.ration_ci[0]:.2f}-{p.ration_ci[1]:.2f}]"
                if p.tn and ref and ref.tn and p.ration_ci
                else "n/a"
            )
            first = i == 0
            lines.append(
                f"| {r.row.label if first else ''} "
                f"| {f'{r.params / 1e6:.3f}' if first else ''} "
                f"| {f'{r.madds / 1e6:.0f}' if first else ''} "
                f"| {name}{mark(p.note)} | {_size(p.size_bytes)} | {_ms(p.t1)} "
                f"| {f'{r.batch / p.t1:.1f}' if p.t1 else 'n/a'} | {r1} "
                f"| {_ms(p.tn)} | {rn} |"
            )
    foot = "\n".join(f"{k}. {note}" for note, k in notes.items())
    return "\n".join(lines), foot


def best(result: RowResult, names: Sequence[str]) -> tuple[str, float] | None:
    """The fastest of ``names`` at 1 thread: (path, median seconds)."""
    timed = [(n, result.paths[n].t1) for n in names if n in result.paths and result.paths[n].t1]
    return min(timed, key=lambda t: t[1]) if timed else None  # type: ignore[return-value,arg-type]


def goal_lines(results: Sequence[RowResult], accuracy: Accuracy | None) -> list[str]:
    row = next((r for r in results if r.row.key == GOAL_ROW), None)
    if row is None or not (row.paths.get("torchvision") and row.paths["torchvision"].t1):
        return [f"N/A: the goals need the {GOAL_ROW!r} row with its torchvision column"]
    if row.batch != 1:
        return [f"N/A: the goals are at batch 1 (this run: --batch {row.batch})"]
    tv = row.paths["torchvision"].t1
    lines = []
    bf16 = best(row, BF16_PATHS)
    if bf16 is not None:  # no goal: reported for the CPUs with native bf16
        lines.append(
            f"INFO: best bf16 path {bf16[0]} {bf16[1] / tv:.3f}x torchvision eager "  # type: ignore[operator]
            f"({bf16[1] * 1e3:.2f} ms)"
        )
    for label, names, goal in (("fp32", FP32_PATHS, FP32_GOAL), ("int8", INT8_PATHS, INT8_GOAL)):
        b = best(row, names)
        if b is None:
            lines.append(f"N/A: best {label} path <= {goal}x torchvision eager (none timed)")
            continue
        ratio = b[1] / tv  # type: ignore[operator]
        verdict = "PASS" if ratio <= goal else "MISS"
        lines.append(
            f"{verdict}: best {label} path <= {goal}x torchvision eager, {row.row.label}, batch 1, "
            f"1 thread: {b[0]} {ratio:.3f} ({b[1] * 1e3:.2f} ms vs {tv * 1e3:.2f} ms)"
        )
    if accuracy is None:
        lines.append("N/A: int8 / bf16 top-1 within 1 point of fp32 (no --ckpt given)")
    else:
        fp = accuracy.top1["fp32 eager"]
        for name, acc in accuracy.top1.items():
            if "int8" not in name and "bf16" not in name:
                continue
            if acc is None or fp is None:
                lines.append(f"N/A: {name} top-1 ({accuracy.notes.get(name, 'not measured')})")
                continue
            verdict = "PASS" if fp - acc <= TOP1_GOAL else "MISS"
            lines.append(
                f"{verdict}: {name} top-1 within 1 point of fp32: {acc * 100:.2f} vs "
                f"{fp * 100:.2f} ({(acc - fp) * 100:+.2f} points)"
            )
    return lines


def limit_lines(results: Sequence[RowResult], peak: Peak) -> list[str]:
    """MAdds / peak per row, and each timed path's latency as a multiple of that floor."""
    lines = [
        "| Row | MAdds M | fp32 floor ms (derived / sgemm) | int8 floor ms (VNNI / int_mm) | "
        "path: latency / fp32 or int8 floor (derived) |",
        "|---|---|---|---|---|",
    ]

    def floor(madds: int, rate: float | None) -> float | None:
        return madds / rate if rate else None

    for r in results:
        work = r.madds * r.batch
        f_d, f_m = floor(work, peak.fp32_derived), floor(work, peak.fp32_measured)
        i_d, i_m = floor(work, peak.int8_derived), floor(work, peak.int8_measured)
        parts = []
        for name in PATHS:
            p = r.paths.get(name)
            ref_floor = i_d if name in INT8_PATHS else f_d
            if p is not None and p.t1 and ref_floor:
                parts.append(f"{name} {p.t1 / ref_floor:.0f}x")
        lines.append(
            f"| {r.row.label} | {r.madds / 1e6:.0f} | {_ms(f_d)} / {_ms(f_m)} "
            f"| {_ms(i_d)} / {_ms(i_m)} | {', '.join(parts)} |"
        )
    return lines


def plot(results: Sequence[RowResult], paths: Sequence[str], png: Path) -> None:
    """Latency (1 thread) vs MAdds, one marker series per path, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = "osD^v<>xP*"
    for i, name in enumerate(paths):
        pts = [(r.madds / 1e6, r.paths[name].t1 * 1e3) for r in results if r.paths[name].t1]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.scatter(xs, ys, marker=markers[i % len(markers)], label=name, alpha=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("MAdds (millions)")
    batch = results[0].batch if results else 1
    ax.set_ylabel(f"latency, batch {batch}, 1 thread (ms)")
    ax.set_title("MobileNetV3 deployment paths: latency vs MAdds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def csv_records(results: Sequence[RowResult], paths: Sequence[str]) -> list[dict[str, object]]:
    """One CSV line per (row, path)."""
    records = []
    for r in results:
        ref = r.paths.get("torchvision")
        for name in paths:
            p = r.paths[name]
            records.append(
                {
                    "row": r.row.key,
                    "label": r.row.label,
                    "path": name,
                    "params": r.params,
                    "madds": r.madds,
                    "input": f"{r.row.size[0]}x{r.row.size[1]}",
                    "batch": r.batch,
                    "file_bytes": "" if p.size_bytes is None else p.size_bytes,
                    "t1_ms": "" if p.t1 is None else f"{p.t1 * 1e3:.4f}",
                    "ratio_1t_tv": f"{p.t1 / ref.t1:.4f}" if p.t1 and ref and ref.t1 else "",
                    "tn_ms": "" if p.tn is None else f"{p.tn * 1e3:.4f}",
                    "ratio_nt_tv": f"{p.tn / ref.tn:.4f}" if p.tn and ref and ref.tn else "",
                    "build_s": f"{p.build_s:.1f}",
                    "note": p.note or "",
                    "rounds_1t": r.rounds_1t,
                    "rounds_nt": r.rounds_nt,
                    "other_load_cores": "" if r.other_load is None else f"{r.other_load:.3f}",
                }
            )
    return records


def markdown_report(
    results: Sequence[RowResult],
    paths: Sequence[str],
    info: list[tuple[str, str]],
    command: str,
    peak: Peak,
    accuracy: Accuracy | None,
    elapsed: float,
    args: argparse.Namespace,
) -> str:
    n = int(dict(info).get("torch threads by default", "0"))
    table, foot = markdown_table(results, paths, n)
    machine = "\n".join(f"- {key}: {value}" for key, value in info)
    refs = "\n".join(f"- {r.row.label}: `{r.reference}`" for r in results)
    busy = [r for r in results if r.other_load is not None and r.other_load > BUSY_CORES]
    busy_note = (
        f"\n**Warning: other processes used the CPU while {len(busy)} of {len(results)} rows were "
        "timed (> 0.1 core on average; per row in the CSV): absolute milliseconds are noisy, "
        "the interleaved ratios much less so.**\n"
        if busy
        else ""
    )
    acc_text = ""
    if accuracy is not None:
        acc_rows = "\n".join(
            f"| {name} | {'n/a' if v is None else f'{v * 100:.2f}'} "
            f"| {accuracy.notes.get(name, '')} |"
            for name, v in accuracy.top1.items()
        )
        acc_text = f"""
## int8 and bf16 top-1 (checkpoint `{accuracy.ckpt}`)

Test split, {accuracy.images} images at {accuracy.size[0]}x{accuracy.size[1]}; int8 calibrated
on the first {ACCURACY_CALIBRATION} images of the val split.

| Path | top-1 % | note |
|---|---|---|
{acc_rows}
"""
    goals = "\n".join(f"- {line}" for line in goal_lines(results, accuracy))
    limits = "\n".join(limit_lines(results, peak))
    int8_m = "n/a" if peak.int8_measured is None else f"{peak.int8_measured / 1e9:.1f}"
    fp32_d = "n/a" if peak.fp32_derived is None else f"{peak.fp32_derived / 1e9:.1f}"
    int8_d = "n/a" if peak.int8_derived is None else f"{peak.int8_derived / 1e9:.1f}"
    return f"""# One latency table: every backbone, head and deployment path

Command: `{command}`
Date: {dt.datetime.now().astimezone().isoformat(timespec="seconds")}; total time {elapsed:.0f} s

{machine}
{busy_note}
Method: batch {results[0].batch if results else 1} (ms per batch; img/s = batch / 1T ms), random N(0, 1) input at the row's size, `torch.inference_mode()`; after
{args.warmup} warm-up calls, up to {args.rounds} interleaved rounds per thread setting (all
paths of a row, alternating order), capped by the row's budget (export + timing, x
{args.budget_scale} here). Medians in ms; `[95% CI]` bootstraps the ratio to torchvision's
eager model over rounds. "1T": 1 thread (torch, onnxruntime intra-op, the XNNPACK threadpool);
"{n}T": all. File: the artifact a user ships (eager / torchvision: `torch.save(state_dict)`;
optimised: `torch.jit.save`; onnx / pte / pt2 files; torchao: the converted graph's state dict, int8
weights). int8 latency rows are calibrated on random images (24 per classifier, 8 per dense row).
SSDLite rows time box decoding in the graph (`DetectorForExport`, what ONNX exports) against
torchvision's raw network (`head(backbone(x))`), so ours do a little more work; NMS is outside
every graph. LR-ASPP rows without a torchvision builder have no ratio.

{table}

{foot}

torchvision references (same architecture, same weights):
{refs}

## Physical limit

Peak multiply-adds per core: {peak.how}: fp32 {fp32_d} GMAC/s derived,
{peak.fp32_measured / 1e9:.1f} GMAC/s measured (sgemm, 1 thread); int8 {int8_d} GMAC/s derived,
{int8_m} GMAC/s measured (`torch._int_mm`, 1 thread). Floor = MAdds / peak; each path's 1-thread
latency as a multiple of the derived floor of its precision (bf16 paths: the fp32 floor):

{limits}

## Goals (this CPU, batch 1, 1 thread, Large classifier)

{goals}
{acc_text}"""


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_args(parser, list(ROWS_BY_KEY), "--rows", DEFAULT_ROUNDS, DEFAULT_WARMUP)
    parser.add_argument(
        "--paths", nargs="+", default=list(PATHS), choices=PATHS, help="paths to run (default all)"
    )
    parser.add_argument(
        "--budget-scale",
        type=float,
        default=1.0,
        help="multiply every row's time budget (export + timing); 10: everything, slowly",
    )
    parser.add_argument("--ckpt", type=Path, default=None, help="a trained classifier checkpoint")
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        help="images per call for every path (throughput rows; results as bench_deploy_b<N>)",
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where exported files go (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    args.row_list = resolve_timing_args(
        parser,
        args,
        args.rows,
        ROWS_BY_KEY,
        (DEFAULT_ROUNDS, QUICK_ROUNDS),
        (DEFAULT_WARMUP, QUICK_WARMUP),
    )
    if "torchvision" not in args.paths:
        args.paths = ["torchvision", *args.paths]  # every ratio needs it
    args.paths = [p for p in PATHS if p in args.paths]
    if args.batch < 1:
        parser.error(f"--batch {args.batch} is not a batch size; expected 1 or more")
    if args.ckpt is not None and not args.ckpt.is_file():
        parser.error(f"--ckpt {args.ckpt} is not a file; expected a Lightning .ckpt")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    threads_all = torch.get_num_threads()
    malloc = "glibc default" if args.default_malloc else pin_malloc()
    info = machine_info(threads_all)
    info.append(("allocator", malloc))
    import onnxruntime

    info.append(("onnxruntime", onnxruntime.__version__))
    if any(p.startswith("pte") for p in args.paths) or args.ckpt is not None:
        _set_pte_threads(1)
    start = time.perf_counter()
    peak = measure_peak(args.quick)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_deploy_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for row in args.row_list:
            print(f"[bench_deploy] {row.label} ...", file=sys.stderr, flush=True)
            budget = row.budget_s * args.budget_scale * (0.2 if args.quick else 1.0)
            results.append(
                bench_row(
                    row,
                    args.paths,
                    args.rounds,
                    args.warmup,
                    threads_all,
                    budget,
                    workdir,
                    args.batch,
                )
            )
            print(f"[bench_deploy]   {results[-1].elapsed_s:.0f} s", file=sys.stderr, flush=True)
        accuracy = None
        if args.ckpt is not None:
            print("[bench_deploy] int8 top-1 ...", file=sys.stderr, flush=True)
            accuracy = measure_accuracy(args.ckpt, workdir)
    torch.set_num_threads(threads_all)
    elapsed = time.perf_counter() - start
    info.append(("load average at end", load_average()))
    report = markdown_report(results, args.paths, info, command, peak, accuracy, elapsed, args)
    print(report)
    name = "bench_deploy" if args.batch == 1 else f"bench_deploy_b{args.batch}"
    write_results(args.out, name, report, csv_records(results, args.paths))
    plot(results, args.paths, args.out / f"{name}.png")
    print(f"wrote {args.out}/{name}.md, .csv and .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
