"""Quality tasks: seeded offline generators, the small models that host any registered attention method, the
train/eval loop and the task metrics (registry in ``attnbench.tasks.registry``). Importing this registers the
built-in tasks."""
from .registry import IGNORE, MODEL_OPTIONS, PATTERNS, TASKS, Batch, Task, TaskParamError, TaskSpec, register_task, task_params
from . import analysis, encoder, minilm, probe, recall, sequence, sparse_gin, transduction  # noqa: F401

__all__ = ["IGNORE", "MODEL_OPTIONS", "PATTERNS", "TASKS", "Batch", "Task", "TaskParamError", "TaskSpec", "register_task",
           "task_params"]
