"""LightningModules, one per task; the head's config (`task:`) picks one from :data:`TASKS`."""

from mnv3.tasks.base import BaseTask
from mnv3.tasks.classification import ClassificationTask
from mnv3.tasks.detection import DetectionTask
from mnv3.tasks.segmentation import SegmentationTask

# The head decides the task (conf/head/*.yaml `task:`); the entry points look tasks up here.
TASKS: dict[str, type[BaseTask]] = {
    "classification": ClassificationTask,
    "detection": DetectionTask,
    "segmentation": SegmentationTask,
}

__all__ = ["TASKS", "BaseTask", "ClassificationTask", "DetectionTask", "SegmentationTask"]
