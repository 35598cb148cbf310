"""Benchmark our MobileNets against torchvision's: parameters, MAdds and CPU latency.

Run ``python bench/bench_models.py --out bench/results`` (``make bench``); ``--quick`` is a smoke
run with a handful of iterations; ``--models large-1.0 small-1.0`` selects rows.

For every row the torchvision reference is the *same architecture* as ours, so the latency
ratio compares implementations, not networks:

- Large / Small 1.0, MobileNetV2 and "Large 0.75 (torchvision rounding)" use torchvision's own
  builders;
- the paper-rounded 0.75 widths and the minimalistic models have no torchvision builder, so
  ``torchvision.models.mobilenetv3.MobileNetV3`` is built from our ArchSpec's concrete channels.

Equal parameter counts are asserted for every row, torchvision's random weights are copied
into ours (so both compute on the same numbers), and where the two are the same function the
logits are compared too.

Timing: batch 1, 3x224x224, eval, ``torch.inference_mode()``, ``time.perf_counter``. After a
warm-up, the candidates of a row run in rounds, alternating the order every round (A B C,
C B A, ...), so machine noise and cache effects hit all of them alike; the reported figure is
the median per candidate. The ours/torchvision ratio comes with a 95% bootstrap interval over
rounds, which says whether a small difference is real or noise. Each row is capped at
``--budget`` seconds (the run takes ~5.5 min on a quiet 2-core machine, at most ~8 min when
other processes compete), and the CPU time other processes used while a row was timed is
measured and reported, so a noisy run is flagged as such.

glibc malloc's mmap / trim thresholds are pinned (see :func:`pin_malloc`; ``--default-malloc``
turns that off): with the defaults, large activation buffers are returned to the OS and
faulted back in on every call, which made eager latencies depend on heap history by up to
+-8% between otherwise identical runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
from torchvision.models import mobilenetv3 as tv_mnv3

from mnv3.cpus import pin_malloc
from mnv3.models import (
    ArchSpec,
    count_madds,
    count_params,
    mobilenet_v2,
    mobilenet_v3_arch,
    mobilenet_v3_large,
    mobilenet_v3_small,
    optimize_for_inference,
)
from mnv3.models.checkpoints import from_torchvision
from mnv3.models.mobilenet import MobileNet

INPUT_SIZE = 224
DEFAULT_ROUNDS = 400
DEFAULT_WARMUP = 20
QUICK_ROUNDS = 8
QUICK_WARMUP = 3
# Time cap per row (s): 2/3 for the 1-thread rounds, 1/3 for all-threads. On a quiet 2-core
# machine the rounds finish well inside it; when other processes compete for the cores
# (all-threads runs then slow down 10-50x from OpenMP waits) it bounds the run instead.
DEFAULT_ROW_BUDGET = 50.0
EAGER_RATIO_GOAL = 1.02  # ours / torchvision eager, 1 thread, every row
OPT_RATIO_GOAL = 0.6  # optimised path / torchvision eager, Large 1.0, 1 thread
OPT_GOAL_ROW = "large-1.0"


def torchvision_from_arch(arch: ArchSpec) -> nn.Module:
    """torchvision's MobileNetV3 class with exactly our ArchSpec's channels.

    ``InvertedResidualConfig`` rescales every width by ``width_mult`` (rounded to 8); with 1.0
    and widths that are already multiples of 8 they pass through unchanged (checked below).
    torchvision fixes the last conv at 6x the last block's width and h-swish in the stem, last
    conv and head; the first is checked, the second is a known difference for minimal models.
    """
    acts = {"relu": "RE", "hswish": "HS"}
    setting = []
    for b in arch.blocks:
        if b.activation not in acts:
            raise ValueError(f"torchvision's MobileNetV3 has no {b.activation!r} blocks")
        cfg = tv_mnv3.InvertedResidualConfig(
            b.in_channels,
            b.kernel_size,
            b.expanded_channels,
            b.out_channels,
            b.use_se,
            acts[b.activation],
            b.stride,
            b.dilation,
            width_mult=1.0,
        )
        got = (cfg.input_channels, cfg.expanded_channels, cfg.out_channels)
        if got != (b.in_channels, b.expanded_channels, b.out_channels):
            raise ValueError(f"torchvision re-rounded block widths {got} of {b}")
        setting.append(cfg)
    if arch.last_channels != 6 * arch.blocks[-1].out_channels:
        raise ValueError("torchvision's MobileNetV3 needs last_channels == 6 x last block width")
    if arch.head_hidden_channels is None:
        raise ValueError("torchvision's MobileNetV3 needs a hidden head layer")
    return tv_mnv3.MobileNetV3(setting, arch.head_hidden_channels)


@dataclass(frozen=True)
class Row:
    key: str  # the --models name
    label: str
    build_ours: Callable[[], MobileNet]
    build_ref: Callable[[], nn.Module]
    reference: str  # how the torchvision reference is built
    same_function: bool = True  # False: same shapes, different activations (see footnote)


ROWS: tuple[Row, ...] = (
    Row(
        "large-1.0",
        "Large 1.0",
        lambda: mobilenet_v3_large(),
        lambda: torchvision.models.mobilenet_v3_large(),
        "torchvision.models.mobilenet_v3_large()",
    ),
    Row(
        "large-0.75",
        "Large 0.75",
        lambda: mobilenet_v3_large(width_mult=0.75),
        lambda: torchvision_from_arch(mobilenet_v3_arch("large", 0.75)),
        "MobileNetV3(our ArchSpec)",
    ),
    Row(
        "large-0.75-tv",
        "Large 0.75 (torchvision rounding)",
        lambda: mobilenet_v3_large(width_mult=0.75, width_rounding="torchvision"),
        lambda: torchvision.models.mobilenet_v3_large(width_mult=0.75),
        "torchvision.models.mobilenet_v3_large(width_mult=0.75)",
    ),
    Row(
        "small-1.0",
        "Small 1.0",
        lambda: mobilenet_v3_small(),
        lambda: torchvision.models.mobilenet_v3_small(),
        "torchvision.models.mobilenet_v3_small()",
    ),
    Row(
        "small-0.75",
        "Small 0.75",
        lambda: mobilenet_v3_small(width_mult=0.75),
        lambda: torchvision_from_arch(mobilenet_v3_arch("small", 0.75)),
        "MobileNetV3(our ArchSpec)",
    ),
    Row(
        "large-minimal",
        "Large minimal",
        lambda: mobilenet_v3_large(minimal=True),
        lambda: torchvision_from_arch(mobilenet_v3_arch("large", minimal=True)),
        "MobileNetV3(our ArchSpec)",
        same_function=False,
    ),
    Row(
        "small-minimal",
        "Small minimal",
        lambda: mobilenet_v3_small(minimal=True),
        lambda: torchvision_from_arch(mobilenet_v3_arch("small", minimal=True)),
        "MobileNetV3(our ArchSpec)",
        same_function=False,
    ),
    Row(
        "v2-1.0",
        "MobileNetV2 1.0",
        lambda: mobilenet_v2(),
        lambda: torchvision.models.mobilenet_v2(),
        "torchvision.models.mobilenet_v2()",
    ),
)
ROWS_BY_KEY = {row.key: row for row in ROWS}


@dataclass
class Result:
    row: Row
    params_ours: int
    params_ref: int
    madds_ours: int
    madds_ref: int
    max_abs_diff_ref: float | None  # ours vs torchvision logits (same weights), same-function rows
    max_abs_diff_opt: float  # optimised path vs ours eager
    rel_diff_opt: float  # the same, relative to max |ours logits|
    threads_all: int
    ours_1t: float  # medians, seconds
    ref_1t: float
    opt_1t: float
    ratio_1t_ci: tuple[float, float]
    ours_nt: float
    ref_nt: float
    ratio_nt_ci: tuple[float, float]
    rounds_1t: int  # rounds actually run (fewer than asked when the time cap was hit)
    rounds_nt: int
    other_load: float | None  # cores used by other processes while this row was timed

    @property
    def ratio_1t(self) -> float:
        return self.ours_1t / self.ref_1t

    @property
    def opt_ratio_1t(self) -> float:
        return self.opt_1t / self.ref_1t

    @property
    def ratio_nt(self) -> float:
        return self.ours_nt / self.ref_nt


# --------------------------------------------------------------------------- one row


def bench_row(
    row: Row, rounds: int, warmup: int, threads_all: int, opt_mode: str, budget_s: float
) -> Result:
    torch.manual_seed(0)
    ours = row.build_ours().eval()
    ref = row.build_ref().eval()

    params_ours, params_ref = count_params(ours), count_params(ref)
    if params_ours != params_ref:
        raise AssertionError(
            f"{row.label}: params differ (ours {params_ours:,} vs torchvision {params_ref:,}): "
            "the reference is not the same architecture"
        )
    # Same weights in both, so timing is not data dependent and outputs can be compared.
    ours.load_state_dict(from_torchvision(ref.state_dict(), ours))
    madds_ours, madds_ref = count_madds(ours, INPUT_SIZE), count_madds(ref, INPUT_SIZE)

    x = torch.randn(1, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours_out = ours(x)
        max_abs_diff_ref = (ours_out - ref(x)).abs().max().item() if row.same_function else None
    if max_abs_diff_ref is not None and max_abs_diff_ref > 1e-4:
        raise AssertionError(f"{row.label}: ours and torchvision differ by {max_abs_diff_ref:.2e}")

    torch.set_num_threads(1)
    optimized = optimize_for_inference(ours, mode=opt_mode, example_input=x)
    channels_last = torch.channels_last

    def run_opt() -> object:  # the optimised path takes NCHW input and pays its NHWC conversion
        return optimized(x.contiguous(memory_format=channels_last))

    with torch.inference_mode():
        max_abs_diff_opt = (run_opt() - ours_out).abs().max().item()  # type: ignore[operator]
        rel_diff_opt = max_abs_diff_opt / max(ours_out.abs().max().item(), 1e-12)
    if max_abs_diff_opt > 1e-4 or rel_diff_opt > 1e-3:
        raise AssertionError(f"{row.label}: optimised path differs by {max_abs_diff_opt:.2e}")

    load = OtherLoad()
    load.start()
    t1 = time_interleaved(
        {"ours": lambda: ours(x), "ref": lambda: ref(x), "opt": run_opt},
        rounds,
        warmup,
        budget_s * 2 / 3,
    )
    torch.set_num_threads(threads_all)
    tn = time_interleaved(
        {"ours": lambda: ours(x), "ref": lambda: ref(x)}, rounds, warmup, budget_s / 3
    )
    torch.set_num_threads(1)
    other_load = load.stop()
    med = statistics.median
    return Result(
        row=row,
        params_ours=params_ours,
        params_ref=params_ref,
        madds_ours=madds_ours,
        madds_ref=madds_ref,
        max_abs_diff_ref=max_abs_diff_ref,
        max_abs_diff_opt=max_abs_diff_opt,
        rel_diff_opt=rel_diff_opt,
        threads_all=threads_all,
        ours_1t=med(t1["ours"]),
        ref_1t=med(t1["ref"]),
        opt_1t=med(t1["opt"]),
        ratio_1t_ci=ratio_interval(t1["ours"], t1["ref"]),
        ours_nt=med(tn["ours"]),
        ref_nt=med(tn["ref"]),
        ratio_nt_ci=ratio_interval(tn["ours"], tn["ref"]),
        rounds_1t=len(t1["ours"]),
        rounds_nt=len(tn["ours"]),
        other_load=other_load,
    )


# --------------------------------------------------------------------------- reporting


def markdown_table(results: Sequence[Result]) -> str:
    n = results[0].threads_all if results else 0
    head = (
        "| Model | Params M ours / tv | MAdds M ours / tv "
        "| 1T ours ms | 1T tv ms | 1T ours/tv [95% CI] | 1T optimised ms | 1T opt/tv "
        f"| {n}T ours ms | {n}T tv ms | {n}T ours/tv [95% CI] |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in results:
        label = r.row.label + ("<sup>a</sup>" if not r.row.same_function else "")
        lines.append(
            f"| {label} | {r.params_ours / 1e6:.3f} / {r.params_ref / 1e6:.3f} "
            f"| {r.madds_ours / 1e6:.1f} / {r.madds_ref / 1e6:.1f} "
            f"| {fmt_ms(r.ours_1t)} | {fmt_ms(r.ref_1t)} | {fmt_ratio(r.ratio_1t, r.ratio_1t_ci)} "
            f"| {fmt_ms(r.opt_1t)} | {fmt_ratio(r.opt_ratio_1t)} "
            f"| {fmt_ms(r.ours_nt)} | {fmt_ms(r.ref_nt)} | {fmt_ratio(r.ratio_nt, r.ratio_nt_ci)} |"
        )
    return "\n".join(lines)


def goal_lines(results: Sequence[Result]) -> list[str]:
    lines = []
    for r in results:
        verdict = "PASS" if r.ratio_1t <= EAGER_RATIO_GOAL else "MISS"
        lo, hi = r.ratio_1t_ci
        noise = (
            " (within noise: the 95% CI reaches the goal)"
            if verdict == "MISS" and lo <= EAGER_RATIO_GOAL
            else ""
        )
        lines.append(
            f"{verdict}: eager ours/torchvision <= {EAGER_RATIO_GOAL} at 1 thread, {r.row.label}: "
            f"{r.ratio_1t:.3f} [95% CI {lo:.3f}-{hi:.3f}]{noise}"
        )
    opt = next((r for r in results if r.row.key == OPT_GOAL_ROW), None)
    if opt is None:
        lines.append(
            f"N/A: optimised path <= {OPT_RATIO_GOAL}x torchvision eager ({OPT_GOAL_ROW} not run)"
        )
    else:
        verdict = "PASS" if opt.opt_ratio_1t <= OPT_RATIO_GOAL else "MISS"
        lines.append(
            f"{verdict}: optimised path <= {OPT_RATIO_GOAL}x torchvision eager, {opt.row.label}, "
            f"batch 1, 1 thread: {opt.opt_ratio_1t:.3f} "
            f"({fmt_ms(opt.opt_1t)} ms vs {fmt_ms(opt.ref_1t)} ms; "
            f"{opt.ref_1t / opt.opt_1t:.2f}x faster than torchvision, "
            f"{opt.ours_1t / opt.opt_1t:.2f}x faster than our eager)"
        )
    return lines


def markdown_report(
    results: Sequence[Result],
    info: list[tuple[str, str]],
    command: str,
    opt_mode: str,
    rounds: int,
    warmup: int,
    budget_s: float,
    elapsed: float,
    busy: bool,
) -> str:
    refs = "\n".join(f"- {r.row.label}: `{r.row.reference}`" for r in results)
    checks = "\n".join(
        f"- {r.row.label}: params {r.params_ours:,} = {r.params_ref:,}; MAdds {r.madds_ours:,} / "
        f"{r.madds_ref:,}; max |ours - tv| logits "
        + (f"{r.max_abs_diff_ref:.1e}" if r.max_abs_diff_ref is not None else "n/a (footnote a)")
        + f"; max |optimised - ours| {r.max_abs_diff_opt:.1e} ({r.rel_diff_opt:.1e} relative)"
        + f"; rounds 1T / all-threads: {r.rounds_1t} / {r.rounds_nt}"
        + (f"; other processes: {r.other_load:.2f} cores" if r.other_load is not None else "")
        for r in results
    )
    goals = "\n".join(f"- {line}" for line in goal_lines(results))
    machine = "\n".join(f"- {key}: {value}" for key, value in info)
    busy_note = (
        "\n**Warning: other processes used the CPU while rows were timed (> 0.1 core on average "
        "for some row, see Checks); latencies, the all-threads columns above all, are noisy.**\n"
        if busy
        else ""
    )
    return f"""# MobileNet CPU benchmark: ours vs torchvision

Command: `{command}`
Date: {dt.datetime.now().astimezone().isoformat(timespec="seconds")}; total time {elapsed:.0f} s

{machine}
{busy_note}
Method: batch 1, 3x{INPUT_SIZE}x{INPUT_SIZE} input, `model.eval()`, `torch.inference_mode()`,
`time.perf_counter()` per call. {warmup} warm-up calls each, then up to {rounds} rounds (capped
at {budget_s:.0f} s per row) in which the candidates of a row run one call each, in alternating
order (A B C, C B A, ...), GC paused.
Figures are medians in ms; `[95% CI]` is a bootstrap interval of the ratio over rounds.
"1T" = `torch.set_num_threads(1)`; "{results[0].threads_all if results else "N"}T" = all
threads (torch's default). "optimised" = `mnv3.models.optimize_for_inference(model, mode="{opt_mode}")`
(BatchNorm folded, channels-last, TorchScript freeze + oneDNN Graph fusion for "freeze"),
timed from an NCHW input including its conversion to channels-last. Ours and torchvision run
with identical weights (torchvision's random init copied into ours).

{markdown_table(results)}

<sup>a</sup> Minimal models: torchvision's `MobileNetV3` class hard-codes h-swish in the stem
conv, the last 1x1 conv and the head's hidden layer, where the minimalistic models use ReLU
(as ours do). Shapes, parameters and MAdds are identical; the reference pays for three
h-swish ops instead of ReLU, a small bias in favour of ours on those rows.

Torchvision references (same architecture; equal parameter counts asserted):
{refs}

Checks:
{checks}

## Goals

{goals}
"""


def csv_record(r: Result) -> dict[str, object]:
    return {
        "model": r.row.label,
        "key": r.row.key,
        "reference": r.row.reference,
        "params_ours": r.params_ours,
        "params_tv": r.params_ref,
        "madds_ours": r.madds_ours,
        "madds_tv": r.madds_ref,
        "ours_1t_ms": f"{r.ours_1t * 1e3:.4f}",
        "tv_1t_ms": f"{r.ref_1t * 1e3:.4f}",
        "ratio_1t": f"{r.ratio_1t:.4f}",
        "ratio_1t_ci_lo": f"{r.ratio_1t_ci[0]:.4f}",
        "ratio_1t_ci_hi": f"{r.ratio_1t_ci[1]:.4f}",
        "opt_1t_ms": f"{r.opt_1t * 1e3:.4f}",
        "opt_over_tv_1t": f"{r.opt_ratio_1t:.4f}",
        "threads_all": r.threads_all,
        "ours_nt_ms": f"{r.ours_nt * 1e3:.4f}",
        "tv_nt_ms": f"{r.ref_nt * 1e3:.4f}",
        "ratio_nt": f"{r.ratio_nt:.4f}",
        "ratio_nt_ci_lo": f"{r.ratio_nt_ci[0]:.4f}",
        "ratio_nt_ci_hi": f"{r.ratio_nt_ci[1]:.4f}",
        "max_abs_diff_tv": "" if r.max_abs_diff_ref is None else f"{r.max_abs_diff_ref:.3e}",
        "max_abs_diff_opt": f"{r.max_abs_diff_opt:.3e}",
        "rel_diff_opt": f"{r.rel_diff_opt:.3e}",
        "rounds_1t": r.rounds_1t,
        "rounds_nt": r.rounds_nt,
        "other_load_cores": "" if r.other_load is None else f"{r.other_load:.3f}",
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_args(parser, list(ROWS_BY_KEY), "--models", DEFAULT_ROUNDS, DEFAULT_WARMUP)
    parser.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_ROW_BUDGET,
        help=f"time cap per row in seconds (default {DEFAULT_ROW_BUDGET:.0f})",
    )
    parser.add_argument(
        "--opt-mode",
        choices=("freeze", "compile", "eager"),
        default="freeze",
        help="optimize_for_inference mode for the optimised column (default freeze)",
    )
    args = parser.parse_args(argv)
    args.rows = resolve_timing_args(
        parser,
        args,
        args.models,
        ROWS_BY_KEY,
        (DEFAULT_ROUNDS, QUICK_ROUNDS),
        (DEFAULT_WARMUP, QUICK_WARMUP),
    )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    threads_all = torch.get_num_threads()  # the default: one per core
    malloc = "glibc default" if args.default_malloc else pin_malloc()
    info = machine_info(threads_all)
    info.append(("allocator", malloc))
    start = time.perf_counter()
    results = []
    for row in args.rows:
        print(f"[bench] {row.label} ...", file=sys.stderr, flush=True)
        results.append(
            bench_row(row, args.rounds, args.warmup, threads_all, args.opt_mode, args.budget)
        )
    torch.set_num_threads(threads_all)
    elapsed = time.perf_counter() - start
    info.append(("load average at end", load_average()))

    busy = any(r.other_load is not None and r.other_load > BUSY_CORES for r in results)
    report = markdown_report(
        results,
        info,
        command,
        args.opt_mode,
        args.rounds,
        args.warmup,
        args.budget,
        elapsed,
        busy,
    )
    print(report)
    write_results(args.out, "bench_models", report, [csv_record(r) for r in results])
    print(
        f"wrote {args.out / 'bench_models.md'} and {args.out / 'bench_models.csv'}", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
