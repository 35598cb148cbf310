"""LightningModules, one per task; the head's config (`task:`) picks one from :data:`TASKS`."""

from collections.abc import Mapping
from typing import Any

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


def task_of_model(model: Any) -> str | None:
    """The task (a :data:`TASKS` key) whose network builder arguments ``model`` are, e.g. a
    checkpoint's ``hyper_parameters["model"]``; None when no task's marker key is in it.

    Each task's builder arguments carry a key of their own (:attr:`BaseTask.model_name_key`:
    ``detector``, ``segmenter``, ``name``), so every checkpoint ``mnv3.train`` ever wrote tells
    its task, and one of another task is named as such instead of failing on its tensors.
    """
    if not isinstance(model, Mapping):
        return None
    # The dense tasks first: their keys are specific, classification's "name" is generic.
    for name, task in sorted(TASKS.items(), key=lambda item: item[1].model_name_key == "name"):
        if task.model_name_key in model:
            return name
    return None


__all__ = [
    "TASKS",
    "BaseTask",
    "ClassificationTask",
    "DetectionTask",
    "SegmentationTask",
    "task_of_model",
]
