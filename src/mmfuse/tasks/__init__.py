"""Training tasks by name: what the trainer trains (see :class:`~mmfuse.tasks.base.Task`).

``create("vqa", **options)`` builds a task; ``available()`` lists the names. A new task subclasses
:class:`Task` and is added with :func:`register`.
"""

from __future__ import annotations

from typing import Any

from mmfuse.tasks.base import Batches, EvalOutput, StepOutput, Task
from mmfuse.tasks.classify import ClassifyTask
from mmfuse.tasks.vqa import VQATask

__all__ = ["Batches", "ClassifyTask", "EvalOutput", "StepOutput", "Task", "VQATask", "available", "create",
           "for_model", "register"]

_TASKS: dict[str, type[Task]] = {}
_BY_MODEL_TYPE: dict[str, str] = {}


def register(name: str, factory: type[Task]) -> None:
    """Make ``create(name, **options)`` build ``factory(**options)``; ``for_model`` finds it by model type."""
    _TASKS[name] = factory
    _BY_MODEL_TYPE.setdefault(factory.model_type, name)


def available() -> list[str]:
    return sorted(_TASKS)


def create(name: str, **options: Any) -> Task:
    """The task ``name``; options are its constructor's keyword arguments (e.g. ``label_smoothing``)."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {available()}")
    return _TASKS[name](**options)


def for_model(model: Any, **options: Any) -> Task:
    """The task that trains ``model`` (by its ``model_type``), e.g. to evaluate a saved run."""
    model_type = getattr(model, "model_type", None)
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(f"no task trains models of type {model_type!r}; tasks: {available()}")
    return create(_BY_MODEL_TYPE[model_type], **options)


register("vqa", VQATask)
register("classify", ClassifyTask)
