"""The task registry: quality tasks, each a seeded offline generator with the model, loss and metric it needs.

A task is a class registered with :func:`register_task`. It declares the CAB attention pattern it exercises
(``causal_self``, ``noncausal_self``, ``noncausal_cross``, ``causal_cross``), its metric (and whether higher is
better), the model layout (``arch``: a decoder-only/encoder stack over one sequence, or a decoder that
cross-attends to an encoded source) and its default parameters, every one overridable from the config
(``task_options.<task>.<key>``). The trainer (``attnbench.tasks.train``) builds the model around any
registered attention method and runs the loop; the task only makes batches and says how they are read out.

    from attnbench.tasks import Batch, Task, register_task

    @register_task("my_task")
    class MyTask(Task):
        pattern = "causal_self"
        metric = "accuracy"
        defaults = {**Task.defaults, "seq_lens": [64], "vocab": 32}

        def sample(self, batch, generator, split):  # CPU tensors; split is "train" or "eval"
            ...
            return Batch(inputs=tokens, targets=labels)   # labels -100 where nothing is asked
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

PATTERNS = ("causal_self", "noncausal_self", "noncausal_cross", "causal_cross")
METRICS = ("accuracy", "bpc", "recall", "approx_err", "mse", "cosine")
# options of the host model every train task accepts (task_options.<task>.KEY or the global train key), absent
# from the parameters (and so from the case id) unless given: see attnbench.tasks.model
MODEL_OPTIONS = ("hybrid_schedule", "qk_source", "readout", "qk_dim")
IGNORE = -100  # target value that the loss and metric skip


class TaskParamError(ValueError):
    """A task parameter that is out of range; the message names ``task_options.<task>.<key>``."""


@dataclass
class Batch:
    """One batch, on the CPU (the trainer moves it).

    ``inputs``: long ``[B, L]`` (the sequence of a self task, the source of a cross task). ``targets``: long
    ``[B, Lt]`` per position (``IGNORE`` where nothing is asked) or ``[B]`` for a classification read from the
    first position. ``decoder_inputs``: cross tasks, long ``[B, Lq]`` (the previous outputs, teacher-forced).
    ``groups``: long ``[B]``, a bucket per example for a breakdown of the metric (e.g. the needle depth), named
    by ``Task.group_names``.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    decoder_inputs: torch.Tensor | None = None
    groups: torch.Tensor | None = None

    def to(self, device) -> "Batch":
        move = (lambda t: None if t is None else t.to(device, non_blocking=True))
        return Batch(move(self.inputs), move(self.targets), move(self.decoder_inputs), move(self.groups))


class Task:
    """Base class of a task. Subclasses set the class attributes and implement ``setup`` and ``sample``.

    ``kind``: ``train`` (the trainer fits a model), ``probe`` (training-free; ``probe(method, ...)`` does it) or
    ``experiment`` (the task builds, trains or fits its own model around the method in ``probe(method, ...)``).
    ``arch``: ``self`` (one sequence, the method is its self-attention) or ``cross`` (the method is the decoder's
    cross-attention over the encoded source). ``readout``: ``tokens`` (a prediction per position) or ``cls``
    (one class per sequence, read at position 0). ``requires``: modules the task needs (listed, never run,
    when missing). Instance attributes set by ``setup``: ``vocab`` (input ids), ``classes`` (output ids),
    ``seq_q`` and ``seq_kv`` (the attention lengths), ``decoder_vocab`` (cross), ``grid`` ((height, width) of a
    2-D layout, passed to methods in ``BuildContext.options["grid"]``), ``group_names``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    pattern: ClassVar[str] = "causal_self"
    metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    kind: ClassVar[str] = "train"
    arch: ClassVar[str] = "self"
    readout: ClassVar[str] = "tokens"
    pad_id: ClassVar[int | None] = None  # an input id that marks padding (masked by the pooled readouts)
    requires: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str] = "tasks"  # the attnbench extra that installs ``requires`` (named when unavailable)
    # model and training defaults every task has; a task adds its generator's parameters
    defaults: ClassVar[dict[str, Any]] = {
        "seq_lens": [64],  # the task's length axis (what "seq" means is the task's: tokens, pairs, pixels)
        "d_model": 64,
        "layers": 2,
        "heads": 2,
        "mlp": True,  # a feed-forward block after each mixer
        "conv": False,  # a short depthwise convolution before each mixer (Zoology's BaseConv), kernel 3
        "pos": "learned",  # learned absolute positions, or none
        "steps": 300,
        "batch": 32,
        "lr": 3e-3,
        "weight_decay": 0.1,
        "warmup": 30,
        "eval_batches": 4,
    }

    def __init__(self, params: dict, seq: int):
        self.params = dict(params)
        self.seq = int(seq)
        self.vocab = 0
        self.classes = 0
        self.decoder_vocab = 0
        self.seq_q = self.seq_kv = self.seq
        self.grid: tuple[int, int] | None = None
        self.group_names: list[str] | None = None
        self.setup()
        if self.kind == "train":
            from .model import check_model_options

            check_model_options(self)

    # ---- to implement ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Check the parameters (raise ``self.error(key, message)``) and set vocab, classes, lengths."""

    def sample(self, batch: int, generator: torch.Generator, split: str) -> Batch:
        raise NotImplementedError

    # ---- helpers ---------------------------------------------------------------------------------------------
    def error(self, key: str, message: str) -> TaskParamError:
        return TaskParamError(f"task_options.{self.name}.{key}: {message}")

    def int_param(self, key: str, minimum: int = 1) -> int:
        value = self.params.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def float_param(self, key: str, low: float = 0.0, high: float = float("inf")) -> float:
        value = self.params.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high):
            raise self.error(key, f"must be a number in [{low}, {high}], got {value!r}")
        return float(value)

    @property
    def mask_name(self) -> str:
        return "causal" if self.pattern.startswith("causal") else "full"


@dataclass
class TaskSpec:
    name: str
    cls: type
    description: str
    module: str

    @property
    def pattern(self) -> str:
        return self.cls.pattern

    def availability(self) -> tuple[bool, str]:
        for module in self.cls.requires:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                return False, f"needs module {module!r}, not importable here (pip install 'attnbench[{self.cls.extra}]')"
        return True, ""

    def make(self, params: dict, seq: int) -> Task:
        return self.cls(params, seq)


TASKS: dict[str, TaskSpec] = {}


def register_task(name: str, description: str = ""):
    """Class decorator registering a :class:`Task` subclass as task ``name``."""

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"register_task({name!r}): {cls!r} is not a Task subclass")
        if cls.pattern not in PATTERNS:
            raise ValueError(f"task {name!r}: pattern {cls.pattern!r} is not one of {PATTERNS}")
        if cls.metric not in METRICS:
            raise ValueError(f"task {name!r}: metric {cls.metric!r} is not one of {METRICS}")
        if name in TASKS and TASKS[name].module != cls.__module__:
            raise ValueError(f"task {name!r} is registered twice ({TASKS[name].module} and {cls.__module__})")
        cls.name = name
        text = description or cls.description or (cls.__doc__ or "").strip().splitlines()[0]
        TASKS[name] = TaskSpec(name=name, cls=cls, description=text, module=cls.__module__)
        return cls

    return decorate


def task_params(name: str, overrides: dict | None = None) -> dict:
    """The task's defaults with ``overrides`` applied; an unknown key raises naming it."""
    spec = TASKS[name]
    params = dict(spec.cls.defaults)
    for key, value in (overrides or {}).items():
        if value is None and key in MODEL_OPTIONS:
            continue
        if key not in params and not (key in MODEL_OPTIONS and spec.cls.kind == "train"):
            raise TaskParamError(f"task_options.{name}.{key}: unknown parameter; known: {', '.join(sorted(params))}")
        params[key] = value
    return params
