"""Train one model on one task with one attention method, and evaluate it: the quality of a method on a task.

``train_task(...)`` returns a :class:`Outcome` (status, reason, metric value, breakdown, wall time, tokens/s,
peak memory). It never returns a number it did not measure: a loss that becomes NaN or infinite ends the run as
``diverged`` (with the step); a run past its time budget ends as ``timeout``; a method that cannot run the
task's attention shape raises its builder's ``Unsupported`` (the caller records it). OOM and other exceptions
propagate to the caller, which classifies them.

Data: the training batches come from a generator seeded by (seed, "train"); the evaluation set from one seeded
by (task, length, seed, "eval") only, so every method of a seed is scored on the same examples.
"""
from __future__ import annotations

import contextlib
import math
import time
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from attnbench.methods.case import Case

from .model import build_model, count_parameters, method_parameters, task_case
from .registry import IGNORE, TASKS, Task


@dataclass
class Outcome:
    status: str  # ok, diverged, timeout
    reason: str | None = None
    value: float | None = None  # the task's metric on the evaluation set
    breakdown: dict = field(default_factory=dict)  # metric per group (e.g. needle depth)
    extras: dict = field(default_factory=dict)  # secondary metrics (e.g. sequence accuracy)
    final_loss: float | None = None
    steps_done: int = 0
    train_wall_s: float | None = None
    tokens_per_s: float | None = None
    peak_mem_mb: float | None = None
    parameters: int | None = None


def stream_seed(*parts) -> int:
    return zlib.crc32("|".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def attention_case(task: Task, method: str, batch: int, dtype: str, seed: int, device: str) -> Case:
    """The attention call of the task's model, as the harness describes a case."""
    heads = int(task.params["heads"])
    d_model = int(task.params["d_model"])
    return task_case(method=method, mask=task.mask_name, mask_name=task.mask_name, batch=batch, heads_q=heads,
                         heads_kv=heads, seq_q=task.seq_q, seq_kv=task.seq_kv, head_dim=d_model // heads, dtype=dtype,
                         mode="fwd_bwd", seed=seed, device=device)


def loss_of(task: Task, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if task.readout == "cls":
        return F.cross_entropy(logits.float(), targets)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


class Scores:
    """Accumulates the evaluation metric (and its breakdown per group) over batches."""

    def __init__(self, task: Task):
        self.task = task
        self.sums: dict = {}

    def _add(self, key, name, value, count):
        total = self.sums.setdefault(key, {}).setdefault(name, [0.0, 0])
        total[0] += float(value)
        total[1] += int(count)

    def add(self, logits: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor | None) -> None:
        task = self.task
        if task.readout == "cls":
            correct = (logits.argmax(-1) == targets).float()
            per_example = correct
            self._add("all", "token", correct.sum(), correct.numel())
        else:
            labelled = targets != IGNORE
            if task.metric == "bpc":
                nll = F.cross_entropy(logits.float().transpose(1, 2), targets.clamp_min(0), reduction="none")
                nll = nll * labelled
                self._add("all", "nll", nll.sum(), labelled.sum())
                per_example = None
            else:
                correct = (logits.argmax(-1) == targets) & labelled
                self._add("all", "token", correct.sum(), labelled.sum())
                seq_ok = (correct | ~labelled).all(dim=1).float()
                self._add("all", "sequence", seq_ok.sum(), seq_ok.numel())
                per_example = seq_ok if getattr(task, "match", "token") == "sequence" else None
                token_ok = correct.sum(1).float() / labelled.sum(1).clamp_min(1)
                per_example = per_example if per_example is not None else token_ok
        if groups is not None and per_example is not None:
            for group in groups.unique().tolist():
                chosen = groups == group
                self._add("groups", int(group), per_example[chosen].sum(), chosen.sum())

    def result(self) -> tuple[float, dict, dict]:
        task = self.task
        totals = {k: v[0] / max(1, v[1]) for k, v in self.sums.get("all", {}).items()}
        if task.metric == "bpc":
            value = totals["nll"] / math.log(2)
            extras = {}
        elif getattr(task, "match", "token") == "sequence":
            value, extras = totals["sequence"], {"token_accuracy": totals.get("token")}
        else:
            value = totals["token"]
            extras = {"sequence_accuracy": totals["sequence"]} if "sequence" in totals else {}
        names = task.group_names or []
        breakdown = {(names[g] if g < len(names) else str(g)): s / max(1, n)
                     for g, (s, n) in sorted(self.sums.get("groups", {}).items())}
        return value, breakdown, extras


def _lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def evaluate(task: Task, model, device, batch: int, seed: int) -> tuple[float, dict, dict]:
    gen = torch.Generator().manual_seed(stream_seed(task.name, task.seq, seed, "eval"))
    scores = Scores(task)
    model.eval()
    with torch.no_grad():
        for _ in range(int(task.params["eval_batches"])):
            data = task.sample(batch, gen, "eval").to(device)
            scores.add(model(data), data.targets, data.groups)
    model.train()
    return scores.result()


def matmul_precision(tf32: bool, device_type: str) -> str:
    """torch's float32 matmul precision for a training case: ``high`` (TF32 tensor cores) only when the case asks
    for TF32 on CUDA, else ``highest`` (full float32)."""
    return "high" if tf32 and device_type == "cuda" else "highest"


@contextlib.contextmanager
def float32_precision(tf32: bool, device_type: str):
    """torch's float32 matmul precision for one case (``matmul_precision``), restored afterwards. The setting is
    global, so it reaches a float32 method's own matmuls; every case kind runs inside it (training, and the
    experiments and probes that train or fit their own models)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision(bool(tf32), device_type))
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def train_task(task_name: str, params: dict, seq: int, method: str, seed: int = 0, dtype: str = "float32",
               device: str = "cpu", options: dict | None = None, method_params: dict | None = None,
               max_wall_s: float | None = None) -> Outcome:
    """Train ``method`` on ``task_name`` (``params``: the task's full parameters) at length ``seq``; evaluate."""
    task = TASKS[task_name].make(params, seq)
    device_t = torch.device(device)
    batch = int(task.params["batch"])
    steps = int(task.params["steps"])
    torch.manual_seed(stream_seed("init", seed))
    case = attention_case(task, method, batch, dtype, seed, device)
    options = dict(options or {})
    if task.grid is not None:
        options["grid"] = task.grid
    model = build_model(task, case, device_t, options, method_params or {})
    extra = method_parameters(model)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2] + extra
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": float(task.params["weight_decay"])},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=float(task.params["lr"]),
                                  betas=(0.9, 0.98))
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    # full float32 unless the case asks for TF32 (options["tf32"], the train config key): the setting is global, so
    # TF32 reaches a float32 method's own matmuls too (a delta rule's triangular solve), not only the model's layers
    with float32_precision(bool((options or {}).get("tf32")), device_t.type):
        return _loop(task, model, optimizer, trainable, batch, steps, seed, device_t, max_wall_s)


def _loop(task, model, optimizer, trainable, batch, steps, seed, device_t, max_wall_s) -> Outcome:
    gen = torch.Generator().manual_seed(stream_seed("train", seed))
    cuda = device_t.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device_t)
        torch.cuda.reset_peak_memory_stats(device_t)
    outcome = Outcome(status="ok", parameters=count_parameters(model))
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, int(task.params["warmup"]), float(task.params["lr"]))
        data = task.sample(batch, gen, "train").to(device_t)
        loss = loss_of(task, model(data), data.targets)
        value = float(loss.detach())  # one sync per step: a NaN is caught at the step it appears
        if not math.isfinite(value):
            outcome.status, outcome.reason = "diverged", f"training loss became {value} at step {step} of {steps}"
            break
        losses.append(value)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        outcome.steps_done = step + 1
        if max_wall_s is not None and time.perf_counter() - started > max_wall_s:
            if step + 1 < steps:
                outcome.status = "timeout"
                outcome.reason = f"training passed its time budget of {max_wall_s:.0f} s after {step + 1} of {steps} steps"
            break
    if cuda:
        torch.cuda.synchronize(device_t)
    wall = time.perf_counter() - started
    outcome.train_wall_s = wall
    if outcome.steps_done:
        outcome.tokens_per_s = outcome.steps_done * batch * task.seq_kv / wall
        tail = losses[-max(1, len(losses) // 10):]
        outcome.final_loss = sum(tail) / len(tail)
    if cuda:
        outcome.peak_mem_mb = torch.cuda.max_memory_allocated(device_t) / 2**20
    if outcome.status != "ok":
        return outcome
    value, breakdown, extras = evaluate(task, model, device_t, batch, seed)
    if not math.isfinite(value):
        outcome.status, outcome.reason = "diverged", f"evaluation metric is {value} (non-finite outputs)"
        return outcome
    report = getattr(model, "quality_extras", None)
    extras = {**extras, **(report() if report is not None else {})}
    outcome.value, outcome.breakdown, outcome.extras = value, breakdown, extras
    return outcome
