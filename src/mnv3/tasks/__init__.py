"""LightningModules: one per task (classification now; detection and segmentation slot in here)."""

from mnv3.tasks.classification import ClassificationTask

# The head decides the task (conf/head/*.yaml `task:`); the entry points look tasks up here.
TASKS = {"classification": ClassificationTask}

__all__ = ["TASKS", "ClassificationTask"]
