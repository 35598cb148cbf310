"""What every config value must be: :data:`RULES`, a table a reader checks in one glance.

Each rule is a test and the words for it in the error sentence; :func:`mnv3.validate.check_values`
applies the table to whichever sections a config has, before any data is read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    """What a config value must be: a test, and the words for it in the error sentence."""

    expected: str
    test: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def integer(minimum: int) -> Rule:
    """An integer >= ``minimum`` (YAML booleans are not integers here)."""
    words = {1: "a positive integer", 0: "an integer >= 0"}.get(minimum, f"an integer >= {minimum}")
    return Rule(words, lambda v: _is_int(v) and v >= minimum)


def number(
    low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False
) -> Rule:
    """A finite number in an interval, e.g. ``number(0, low_open=True)`` for a positive one."""
    if high == math.inf:
        words = "a positive number" if low == 0 and low_open else f"a number >= {low:g}"
    else:
        words = (
            f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        )

    def test(v: Any) -> bool:
        if not _is_number(v):
            return False
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return above and below

    return Rule(words, test)


def one_of(*choices: Any) -> Rule:
    """One of a fixed set (compared exactly: ``1`` and ``True`` are different answers)."""
    words = "one of " + ", ".join(str(c) for c in choices)
    return Rule(words, lambda v: any(type(v) is type(c) and v == c for c in choices))


def optional(rule: Rule) -> Rule:
    """``null`` or what ``rule`` accepts."""
    return Rule(f"null or {rule.expected}", lambda v: v is None or rule.test(v))


def list_of(rule: Rule, length: int | None = None) -> Rule:
    """A list whose items all pass ``rule`` (of ``length`` items when given)."""
    count = f"{length} " if length else ""
    return Rule(
        f"a list of {count}values, each {rule.expected}",
        lambda v: (
            isinstance(v, list)
            and (length is None or len(v) == length)
            and all(rule.test(x) for x in v)
        ),
    )


def either(*rules: Rule) -> Rule:
    """What any of ``rules`` accepts."""
    return Rule(" or ".join(r.expected for r in rules), lambda v: any(r.test(v) for r in rules))


POSITIVE_INT = integer(1)
NON_NEGATIVE_INT = integer(0)
POSITIVE = number(0, low_open=True)
NON_NEGATIVE = number(0)
PROBABILITY = number(0, 1)
FRACTION = number(0, 1, high_open=True)  # momentum, dropout, smoothing: 1 would stop learning
BOOL = Rule("true or false", lambda v: isinstance(v, bool))
TEXT = Rule("a string", lambda v: isinstance(v, str) and v != "")


def _models() -> Rule:
    from mnv3.models import BACKBONES as MODELS

    return one_of(*MODELS)


def _datasets() -> Rule:
    from mnv3.data import DATASETS

    return one_of(*sorted(DATASETS))


def _builders(kind: str) -> Callable[[], Rule]:
    """One of the :data:`mnv3.models.MODELS` builders of ``kind`` (detector, segmenter)."""

    def rule() -> Rule:
        from mnv3.models import MODELS

        return one_of(*MODELS[kind])

    return rule


def _low_taps() -> Rule:
    """A feature tap name of the MobileNetV3 backbones (levels and inner taps)."""
    from mnv3.models.backbone import backbone_arch
    from mnv3.models.mobilenet import feature_taps, inner_feature_taps

    arch = backbone_arch("mobilenet_v3_small")
    return one_of(*(t.name for t in (*feature_taps(arch), *inner_feature_taps(arch))))


def _interpolation() -> Rule:
    names = ("nearest", "bilinear", "bicubic")  # mnv3.data.transforms.interpolation_mode
    return Rule("one of " + ", ".join(names), lambda v: isinstance(v, str) and v.lower() in names)


# key (fnmatch pattern) -> rule, or a function giving the rule when it needs an import. The first
# matching pattern decides; keys a config lacks are skipped; keys no pattern matches are free.
RULES: dict[str, Rule | Callable[[], Rule]] = {
    # data: mnv3.data.ClassificationDataModule and the generated datasets
    "data.dataset": _datasets,
    "data.batch_size": POSITIVE_INT,
    "data.image_size": POSITIVE_INT,
    "data.resize_size": optional(POSITIVE_INT),
    "data.num_workers": either(one_of("auto"), NON_NEGATIVE_INT),
    # cpu: mnv3.cpus.cpu_plan
    "cpu.threads": either(one_of("auto"), POSITIVE_INT),
    "cpu.interop_threads": either(one_of("auto"), POSITIVE_INT),
    "cpu.tune_threads": BOOL,
    "data.channels": one_of(1, 3),
    "data.interpolation": _interpolation,
    "data.auto_augment": optional(one_of("autoaugment", "trivialaugment", "xray")),
    "data.hflip_prob": PROBABILITY,
    "data.random_erase_prob": PROBABILITY,
    "data.min_scale": number(0, 1, low_open=True),
    "data.val_fraction": optional(FRACTION),  # 0 or null: the official val folder
    "data.holdout_per_class": optional(POSITIVE_INT),  # ImageNet: MnasNet's held-out split
    "data.*seed": NON_NEGATIVE_INT,
    "data.uncertain": one_of("ones", "zeros", "ignore"),
    "data.frontal_only": BOOL,
    # xray_csv: your own CSV (mnv3.data.xray_csv)
    "data.csv": optional(TEXT),
    "data.image_column": TEXT,
    "data.label_columns": either(TEXT, list_of(TEXT)),
    "data.classes": optional(list_of(either(TEXT, NON_NEGATIVE_INT))),  # 0 / 1 columns
    "data.multilabel": optional(BOOL),
    "data.*_column": optional(TEXT),
    "data.views": optional(either(TEXT, list_of(TEXT))),
    "data.test_fraction": optional(FRACTION),
    "data.drop_last": BOOL,
    "data.persistent_workers": BOOL,
    "data.pin_memory": optional(BOOL),
    "data.mean": list_of(number(0, 1)),
    "data.std": list_of(POSITIVE),
    "data.generate.num_classes": integer(2),
    "data.generate.train_per_class": POSITIVE_INT,
    "data.generate.*_per_class": NON_NEGATIVE_INT,
    "data.generate.image_size": integer(16),
    "data.generate.*_images": NON_NEGATIVE_INT,
    "data.generate.max_objects": POSITIVE_INT,
    "data.generate.height": integer(32),
    "data.generate.width": integer(32),
    # detection data (coco, shapes_coco): SSD augmentation switches
    "data.iou_crop": BOOL,
    "data.zoom_out": BOOL,
    "data.photometric": BOOL,
    "data.keep_empty": BOOL,
    # segmentation data (cityscapes, shapes_cityscapes)
    "data.crop_size": either(POSITIVE_INT, list_of(POSITIVE_INT, length=2)),
    "data.scale_range": list_of(POSITIVE, length=2),
    "data.eval_resize": optional(list_of(POSITIVE_INT, length=2)),
    "data.frame_size": list_of(POSITIVE_INT, length=2),
    "data.train_classes": optional(list_of(TEXT)),
    # backbone: mnv3.models.build_model arguments
    "backbone.name": _models,
    "backbone.width_mult": POSITIVE,
    "backbone.output_stride": one_of(8, 16, 32),
    "backbone.width_rounding": one_of("paper", "torchvision"),
    "backbone.minimal": BOOL,
    "backbone.reduced_tail": BOOL,
    "backbone.bn_momentum": optional(number(0, 1, low_open=True)),
    "backbone.in_channels": optional(one_of(1, 3)),
    "backbone.weights": optional(TEXT),
    # head
    "head.dropout": FRACTION,
    "head.label_smoothing": FRACTION,
    "head.class_weights": either(optional(one_of("balanced")), list_of(NON_NEGATIVE)),
    "head.weights": optional(TEXT),
    # classifier evaluation of binary / multi-label problems (mnv3.tasks.xray_report)
    "head.evaluation.bootstrap_resamples": NON_NEGATIVE_INT,
    "head.evaluation.bootstrap_seed": NON_NEGATIVE_INT,
    "head.evaluation.confidence_level": number(0, 1, low_open=True, high_open=True),
    "head.evaluation.sensitivities": list_of(number(0, 1, low_open=True)),
    "head.evaluation.calibration_bins": POSITIVE_INT,
    "head.evaluation.temperature_scaling": BOOL,
    # detection head (conf/head/ssdlite.yaml)
    "head.detector": _builders("detector"),
    "head.loss": one_of("softmax_hnm", "focal"),
    "head.score_thresh": PROBABILITY,
    "head.nms_thresh": PROBABILITY,
    "head.detections_per_img": POSITIVE_INT,
    "head.map_backend": one_of("pycocotools", "faster_coco_eval"),
    "head.box_images": NON_NEGATIVE_INT,
    # segmentation heads (conf/head/lraspp.yaml, raspp.yaml)
    "head.output_stride": optional(one_of(16, 32)),
    "head.inter_channels": POSITIVE_INT,
    "head.pool": one_of("paper", "global"),
    "head.segmenter": _builders("segmenter"),
    "head.low_tap": _low_taps,
    "head.mask_images": NON_NEGATIVE_INT,
    # optim: mnv3.tasks.optim.build_optimizer
    "optim.name": one_of("rmsprop_tf", "sgd", "adamw"),
    "optim.lr": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.momentum": FRACTION,
    "optim.decay": FRACTION,
    "optim.eps": POSITIVE,
    "optim.nesterov": BOOL,
    "optim.betas": list_of(FRACTION, length=2),
    "optim.reference_batch_size": optional(POSITIVE_INT),
    # scheduler: mnv3.tasks.optim.WarmupSchedule
    "scheduler.name": one_of("exponential", "cosine", "constant"),
    "scheduler.warmup_epochs": NON_NEGATIVE,
    "scheduler.warmup_start_factor": PROBABILITY,
    "scheduler.min_factor": PROBABILITY,
    "scheduler.decay_rate": number(0, 1, low_open=True),
    "scheduler.decay_epochs": POSITIVE,
    # callbacks (conf/callbacks/default.yaml)
    "callbacks.last_every_n_steps": POSITIVE_INT,
    "callbacks.progress_bar": one_of("auto", "rich", "tqdm", "plain", "none"),
    "callbacks.progress_every_n_steps": POSITIVE_INT,
    "callbacks.model_summary_depth": optional(NON_NEGATIVE_INT),
    "callbacks.lr_monitor": BOOL,
    "*callbacks.ood_quantile": optional(FRACTION),  # 0 or null: off
    "*callbacks.mahalanobis_quantile": optional(FRACTION),  # 0 or null: off
    "*callbacks.mahalanobis_max_images": integer(2),
    "*callbacks.gradcam_images": optional(NON_NEGATIVE_INT),
    "*callbacks.gradcam_every_n_epochs": POSITIVE_INT,
    # trainer: the few keys whose wrong values Lightning reports only as a traceback
    "trainer.max_epochs": optional(integer(-1)),  # -1: no limit (Lightning)
    "trainer.log_every_n_steps": optional(POSITIVE_INT),
    "trainer.accumulate_grad_batches": POSITIVE_INT,
    # top level: train.yaml, eval.yaml, explain.yaml, predict.yaml
    "seed": Rule("an integer", _is_int),
    "ema_decay": optional(number(0, 1, low_open=True, high_open=True)),
    "freeze_backbone_epochs": NON_NEGATIVE_INT,
    "backbone_lr_factor": NON_NEGATIVE,
    "channels_last": BOOL,
    "compile": BOOL,
    "test": BOOL,
    "split": one_of("val", "test"),
    "top_k": POSITIVE_INT,
    "progress_every_n_batches": POSITIVE_INT,
    "alpha": PROBABILITY,
    "ood_threshold": PROBABILITY,
}
# Sections whose keys the table covers; other top-level sections (paths, logger) are left alone.
SECTIONS = ("data", "cpu", "backbone", "head", "optim", "scheduler", "callbacks", "trainer")
