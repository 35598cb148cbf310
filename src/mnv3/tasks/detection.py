"""Object detection: the detector's loss, COCO mAP through torchmetrics, box pictures, and the
COCO results json; everything else comes from :class:`~mnv3.tasks.base.BaseTask`.

Validation runs the detector on the resized batch, scales the detections back into each image's
original pixels and scores them against the original annotations (crowd regions and COCO's
``area`` included), so the logged mAP is the number COCO's own evaluation gives.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.detection import MeanAveragePrecision

from mnv3.data.coco import COCO_SUMMARY_KEYS
from mnv3.errors import ConfigError
from mnv3.models.detection.builders import BACKBONE_LIMITS, use_reduced_tail
from mnv3.tasks.base import BaseTask, QATObjective
from mnv3.tasks.common import check_plain, log_images, save_figure
from mnv3.tasks.sharded_map import ShardedMeanAveragePrecision

log = logging.getLogger(__name__)


def coco_map_metric(backend: str = "pycocotools") -> MeanAveragePrecision:
    """COCO box mAP as the task scores validation and test: torchmetrics with COCOeval's own
    thresholds and per-class AP; one home for these arguments, so that a benchmark or a test
    scores exactly as training does.

    Args:
        backend: torchmetrics' COCO backend, ``"pycocotools"`` or ``"faster_coco_eval"``.
    """
    from mnv3.data.coco import COCO_IOU_THRESHOLDS, COCO_RECALL_THRESHOLDS

    # Sharded: DDP ranks may hold different numbers of images (an odd split over 2 ranks).
    metric = ShardedMeanAveragePrecision(
        box_format="xyxy",
        iou_type="bbox",
        backend=backend,
        class_metrics=True,
        # COCOeval's own thresholds: torchmetrics' float32 defaults move AP by up to 6e-4.
        iou_thresholds=list(COCO_IOU_THRESHOLDS),
        rec_thresholds=list(COCO_RECALL_THRESHOLDS),
    )
    # The detector keeps up to 300 boxes, COCO scores the best 100: expected, not a warning.
    metric.warn_on_many_detections = False
    return metric


def compute_coco_map(
    metric: MeanAveragePrecision, stage: str, verbose: bool = True
) -> dict[str, torch.Tensor]:
    """``metric.compute()`` between two log lines: what is scored before, mAP and seconds after.

    COCOeval over thousands of images takes minutes (torchmetrics#866; 5,000 images x 100
    detections in ``bench/bench_coco_scale.py``) while the progress bar stands still: the lines
    say the run is not hung. The counts are this process's (before a multi-GPU gather).
    """
    if not verbose:
        return metric.compute()
    images = len(metric.groundtruth_labels)
    detections = sum(int(labels.numel()) for labels in metric.detection_labels)
    log.info("%s: computing COCO mAP over %d images, %d detections ...", stage, images, detections)
    start = time.perf_counter()
    results = metric.compute()
    log.info(
        "%s: COCO mAP %.4f over %d images in %.1f s",
        stage,
        float(results["map"]),
        images,
        time.perf_counter() - start,
    )
    return results


class DetectionTask(BaseTask):
    """SSDLite (or any detector with ``loss`` / ``postprocess``) trained and scored by COCO mAP.

    Args:
        model: detector builder kwargs (:meth:`network_kwargs`): ``detector`` (a name of
            ``mnv3.models.MODELS["detector"]``, default ``"ssdlite320"``), ``backbone``,
            ``reduced_tail``, ``loss``...
        num_classes: object classes of the dataset, background excluded (the network predicts
            ``num_classes + 1`` scores: label 0 is the background).
        class_names: the object classes' names, label 1 first.
        label_to_category_id: label -> dataset category id (entry 0: background), for the COCO
            results json; None: labels are written as they are.
        map_backend: torchmetrics' COCO backend, ``"pycocotools"`` or ``"faster_coco_eval"``.
        box_images: validation images drawn with predicted and true boxes each epoch (0: none).
        box_score_thresh: predictions drawn on those pictures score at least this.
        Others: see :class:`~mnv3.tasks.base.BaseTask`.
    """

    monitor = "val/map"
    monitor_mode = "max"

    network_kind, default_network = "detector", "ssdlite320"
    model_name_key = "detector"
    architecture_keys: ClassVar[dict[str, str]] = {
        "detector": "head.detector",
        "backbone": "backbone.name",
        "width_mult": "backbone.width_mult",
        "reduced_tail": "backbone.reduced_tail",
    }

    def __init__(
        self,
        model: dict[str, Any],
        num_classes: int,
        optimizer: dict[str, Any],
        class_names: list[str] | None = None,
        label_to_category_id: list[int] | None = None,
        map_backend: str = "pycocotools",
        box_images: int = 4,
        box_score_thresh: float = 0.3,
        **shared: Any,
    ) -> None:
        super().__init__(model, num_classes, optimizer, **shared)
        check_plain({"class_names": class_names, "label_to_category_id": label_to_category_id})
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.class_names = class_names or [str(i) for i in range(1, num_classes + 1)]
        self.label_to_category_id = label_to_category_id
        self.box_images = int(box_images)
        self.box_score_thresh = float(box_score_thresh)
        self.val_map = coco_map_metric(map_backend)
        self.test_map = coco_map_metric(map_backend)
        self._results: list[dict[str, Any]] = []
        self._pictures: dict[str, Any] | None = None

    @staticmethod
    def network_classes(num_classes: int) -> int:
        return num_classes + 1  # label 0 is the background

    def load_weights(self, weights: str) -> Any:
        from mnv3.models.detection.checkpoints import load_ssdlite_weights

        # torchvision's COCO weights score by COCO category id: keep the data's categories.
        return load_ssdlite_weights(self.model, weights, category_ids=self.label_to_category_id)

    @classmethod
    def network_kwargs(cls, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The detector's arguments: the backbone group gives its backbone (``weights`` are
        ImageNet weights for the backbone only, the tail resolved as the builder resolves it),
        the head group the detector's own (loss, thresholds, whole-detector ``weights``)."""
        backbone, head = cls.checked_backbone(cfg, BACKBONE_LIMITS), dict(cfg["head"])
        try:
            reduced_tail = use_reduced_tail(
                backbone["name"], backbone.get("reduced_tail"), backbone.get("weights")
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        model: dict[str, Any] = {
            "detector": head.get("detector", "ssdlite320"),
            "backbone": backbone["name"],
            "width_mult": float(backbone.get("width_mult", 1.0)),
            "reduced_tail": reduced_tail,
            "backbone_weights": backbone.get("weights"),
            "weights": head.get("weights"),
            "loss": head.get("loss", "softmax_hnm"),
        }
        if backbone.get("bn_momentum") is not None:
            model["bn_momentum"] = float(backbone["bn_momentum"])
        if backbone.get("table") is not None:
            model["table"] = backbone["table"]
        for key in ("score_thresh", "nms_thresh", "detections_per_img", "topk_candidates"):
            if head.get(key) is not None:
                model[key] = head[key]
        return model

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], datamodule: Any) -> DetectionTask:
        """The task for ``head=ssdlite``: :meth:`network_kwargs` at the data's input size, and
        the data's classes and category ids."""
        head = cfg["head"]
        category_ids = getattr(datamodule, "classes", None)
        return cls(
            model={**cls.network_kwargs(cfg), "image_size": list(datamodule.input_size)},
            num_classes=datamodule.num_classes,
            class_names=list(datamodule.class_names),
            label_to_category_id=[0, *(int(c) for c in category_ids)] if category_ids else None,
            map_backend=str(head.get("map_backend", "pycocotools")),
            box_images=int(head.get("box_images", 4)),
            **cls.shared_kwargs(cfg),
        )

    # -- steps -----------------------------------------------------------------------------
    @staticmethod
    def _targets(batch: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
        return [
            {"boxes": boxes, "labels": labels}
            for boxes, labels in zip(batch["boxes"], batch["labels"], strict=True)
        ]

    def qat_objective(self, network: nn.Module, example: torch.Tensor) -> QATObjective:
        """The detector's network without box decoding (``DetectorNetwork``), trained on SSDLite's
        matching loss with the anchors of the example's input size."""
        from mnv3.deploy import DetectorNetwork

        with torch.no_grad():
            anchors = network.forward_batch(example)["anchors"]

        def loss(outputs: tuple[torch.Tensor, torch.Tensor], targets: Any) -> torch.Tensor:
            raw = {"cls_logits": outputs[0], "bbox_regression": outputs[1], "anchors": anchors}
            return network.loss(raw, targets)["loss"]

        return QATObjective(
            DetectorNetwork(network), loss, lambda b: (b["image"], self._targets(b))
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self.count_skipped(batch)
        images = batch["image"]
        if images.shape[0] == 0:  # every image of the batch was unreadable
            return None
        outputs = self.train_forward(images)
        losses = self.model.loss(outputs, self._targets(batch))
        loss = losses["loss"]
        self.check_finite(loss)
        bs = images.shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        self.log("train/loss_box", losses["bbox_regression"], on_epoch=True, batch_size=bs)
        self.log("train/loss_cls", losses["classification"], on_epoch=True, batch_size=bs)
        self.log_skipped(bs)
        return loss

    def _eval_step(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        self.count_skipped(batch)
        images = batch["image"]
        if images.shape[0] == 0:
            return
        outputs = self.net(evaluating=True)(self.prepare_images(images))
        input_size = (int(images.shape[-2]), int(images.shape[-1]))
        bs = images.shape[0]
        losses = self.model.loss(outputs, self._targets(batch))
        self.log(f"{stage}/loss", losses["loss"], prog_bar=stage == "val", batch_size=bs)
        sizes = [(int(h), int(w)) for h, w in batch["orig_size"]]
        detections = self.model.postprocess(outputs, sizes, input_size=input_size)
        metric = self.val_map if stage == "val" else self.test_map
        metric.update(detections, list(batch["eval_target"]))
        if self.predictions_dir is not None:
            self._collect_results(detections, batch["image_id"])
        if batch_idx == 0 and stage == "val" and self.box_images > 0:
            self._keep_pictures(images, outputs, batch, input_size)

    def _end_of_eval(self, stage: str) -> None:
        metric = self.val_map if stage == "val" else self.test_map
        world = self.trainer.world_size
        where = stage if world == 1 else f"{stage} (rank 0's share of {world} ranks)"
        results = compute_coco_map(metric, where, verbose=self.global_rank == 0)
        metric.reset()
        # compute() also returns per-class tensors: only scalars go to log_dict.
        self.log_dict(
            {f"{stage}/{k}": results[k].float() for k in COCO_SUMMARY_KEYS}, sync_dist=False
        )
        per_class = self._per_class_ap(results)
        for name, ap in per_class.items():
            self.log(f"{stage}/ap_class/{name}", ap)
        if self.predictions_dir is not None and not self.trainer.sanity_checking:
            self._write_results()
        if self.trainer.sanity_checking or self.global_rank != 0:
            return
        if stage == "test" or self.current_epoch + 1 == self.trainer.max_epochs:
            self._write_per_class(per_class, stage)
        if self._pictures is not None and stage == "val":
            path = self._draw_pictures(stage)
            log_images(self.loggers, f"{stage}/boxes", [path], step=self.global_step)
            self._pictures = None

    def _per_class_ap(self, results: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """AP (IoU 0.50:0.95) of every class present in the split, by class name."""
        classes = results.get("classes")
        per_class = results.get("map_per_class")
        if classes is None or per_class is None or per_class.ndim == 0:
            return {}
        found = {}
        for label, ap in zip(classes.tolist(), per_class.tolist(), strict=True):
            if 1 <= label <= self.num_classes and ap >= 0:  # -1: class absent from the split
                found[self.class_names[label - 1]] = float(ap)
        return found

    def _write_per_class(self, per_class: Mapping[str, float], stage: str) -> None:
        """The per-class AP table: logged as text and written to ``<run>/<stage>_per_class_ap.csv``."""
        if not per_class:
            return
        path = Path(self.trainer.default_root_dir) / f"{stage}_per_class_ap.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["class", "AP@[.50:.95]"])
            for name, ap in sorted(per_class.items(), key=lambda item: -item[1]):
                writer.writerow([name, f"{ap:.4f}"])
        lines = ", ".join(f"{n} {a:.3f}" for n, a in sorted(per_class.items()))
        log.info("%s per-class AP: %s (%s)", stage, lines, path)

    # -- COCO results json -------------------------------------------------------------------
    def _write_results(self) -> None:
        """Gather every rank's detections and write ``coco_results.json`` from rank 0."""
        from mnv3.data.coco import write_coco_results

        results, self._results = self._results, []
        if self.trainer.world_size > 1:
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, results)
            results = [r for part in gathered for r in part]
        if self.global_rank == 0 and self.predictions_dir is not None:
            path = write_coco_results(self.predictions_dir / "coco_results.json", results)
            log.info("COCO results json (%d detections): %s", len(results), path)

    def _collect_results(
        self, detections: Sequence[Mapping[str, torch.Tensor]], image_ids: Sequence[int]
    ) -> None:
        from mnv3.data.coco import coco_results

        cpu = [{k: v.detach().cpu() for k, v in d.items()} for d in detections]
        self._results += coco_results(cpu, [int(i) for i in image_ids], self.category_table)

    @property
    def category_table(self) -> list[int]:
        """Label -> the dataset's category id (entry 0: the background), what COCO results
        name classes by; labels themselves when the dataset has no ids of its own."""
        return self.label_to_category_id or list(range(self.num_classes + 1))

    def coco_categories(self) -> list[dict[str, Any]]:
        """The ``categories`` of a COCO dataset json for this detector's classes (``id``: the
        dataset's category id, ``name``), as pycocotools' ``loadRes`` needs them."""
        table = self.category_table
        return [
            {"id": int(table[label]), "name": name}
            for label, name in enumerate(self.class_names, start=1)
        ]

    # -- pictures ----------------------------------------------------------------------------
    def _keep_pictures(
        self,
        images: torch.Tensor,
        outputs: Mapping[str, torch.Tensor],
        batch: Mapping[str, Any],
        input_size: tuple[int, int],
    ) -> None:
        """Keep the first validation images with their detections in input-tensor pixels."""
        n = min(self.box_images, images.shape[0])
        first = {
            k: (v[:n] if k != "anchors" else v) for k, v in outputs.items() if torch.is_tensor(v)
        }
        detections = self.model.postprocess(first, [input_size] * n, input_size=input_size)
        self._pictures = {
            "images": images[:n].detach().float().cpu(),
            "detections": [{k: v.cpu() for k, v in d.items()} for d in detections],
            "boxes": [b.detach().cpu() for b in batch["boxes"][:n]],
            "labels": [lb.detach().cpu() for lb in batch["labels"][:n]],
        }

    def _draw_pictures(self, stage: str) -> Path:
        """True boxes (green) and predictions above ``box_score_thresh`` (red) side by side."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from torchvision.utils import draw_bounding_boxes

        assert self._pictures is not None
        datamodule = getattr(self.trainer, "datamodule", None)
        mean = torch.tensor(getattr(datamodule, "mean", (0.5, 0.5, 0.5))).view(-1, 1, 1)
        std = torch.tensor(getattr(datamodule, "std", (0.5, 0.5, 0.5))).view(-1, 1, 1)
        pics = self._pictures
        n = len(pics["images"])
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
        for i in range(n):
            image = ((pics["images"][i] * std + mean).clamp(0, 1) * 255).to(torch.uint8)
            det = pics["detections"][i]
            keep = det["scores"] >= self.box_score_thresh
            names = [self._name(int(lb)) for lb in pics["labels"][i]]
            drawn = image
            if len(names):
                drawn = draw_bounding_boxes(drawn, pics["boxes"][i], names, colors="lime", width=2)
            det_names = [
                f"{self._name(int(lb))} {s:.2f}"
                for lb, s in zip(det["labels"][keep], det["scores"][keep].tolist(), strict=True)
            ]
            if det_names:
                drawn = draw_bounding_boxes(drawn, det["boxes"][keep], det_names, colors="red")
            axes[0, i].imshow(drawn.permute(1, 2, 0).numpy())
            axes[0, i].axis("off")
        fig.suptitle(f"{stage} epoch {self.current_epoch}: true (green), predicted (red)")
        fig.tight_layout()
        root = Path(self.trainer.default_root_dir) / "plots"
        return save_figure(fig, root / f"{stage}_boxes_epoch{self.current_epoch:03d}.png")

    def _name(self, label: int) -> str:
        return self.class_names[label - 1] if 1 <= label <= self.num_classes else str(label)

    def callbacks(self, settings: Mapping[str, Any] | None) -> list[pl.Callback]:
        """No detection-only callbacks yet (box pictures are drawn by the task itself)."""
        return []
