"""Quality rows: one per (method, task, length, seed) training run or training-free probe, whatever happened.

They live beside the kernel rows in the same run folder, in their own files: ``quality.jsonl`` (appended as each
run finishes, crash-safe), ``quality.parquet`` and ``quality.csv``. A metric that was not measured is empty,
never a sentinel; ``reason`` is non-empty for every status but ``ok``.
"""
from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path

from attnbench.record.schema import STATUSES as KERNEL_STATUSES

# diverged: the training loss became NaN or infinite (the step is in the reason)
STATUSES = (*KERNEL_STATUSES, "diverged")
FILES = ("quality.parquet", "quality.jsonl", "quality.csv")

QUALITY_COLUMNS: dict[str, tuple[str, str]] = {
    "run_id": ("string", "name of the run folder that holds the row"),
    "case_id": ("string", "first 16 hex digits of the SHA-1 of (task, method, seq, seed, dtype, the task's "
                          "parameters): equal runs get equal ids"),
    "kind": ("string", "train (a model trained and evaluated), probe (training-free, on the method alone) or experiment (the "
                     "task trains or fits its own small model around the method, e.g. icl_linreg_1layer_mh)"),
    "method": ("string", "registered attention method"),
    "family": ("string", "the method's declared family"),
    "exact": ("boolean", "the method declares exact attention"),
    "task": ("string", "registered task (attnbench list tasks)"),
    "pattern": ("string", "CAB pattern the task exercises: causal_self, noncausal_self, noncausal_cross, causal_cross"),
    "seq": ("Int64", "the task's length (tokens of a self task, source tokens of a cross task, pixels of an image)"),
    "seq_q": ("Int64", "query length of the attention calls, tokens"),
    "seq_kv": ("Int64", "key/value length of the attention calls, tokens"),
    "d_model": ("Int64", "model width"),
    "layers": ("Int64", "blocks (each: optional short convolution, the method's attention, optional MLP)"),
    "heads": ("Int64", "attention heads"),
    "model_options": ("string", "JSON object of the host model's options that were set (hybrid_schedule, qk_source, "
                                "readout, qk_dim); empty for the plain model"),
    "fitted_options": ("string", "JSON object of the method options the train planner fitted to the case's "
                                 "lengths (the train config key fit_method_options: the method's defaults did not "
                                 "fit, and the config did not set them); empty: the config's options or the "
                                 "method's defaults"),
    "steps": ("Int64", "training steps asked for"),
    "steps_done": ("Int64", "training steps completed (fewer after a divergence or a timeout)"),
    "batch": ("Int64", "sequences per training step (and per evaluation batch)"),
    "lr": ("Float64", "peak learning rate (AdamW, linear warm-up, cosine to 10 %)"),
    "seed": ("Int64", "seed of the initialisation and the training data; the evaluation data depends on it too, "
                      "never on the method"),
    "dtype": ("string", "dtype of q, k, v at the attention call (the model's weights are float32)"),
    "tf32": ("boolean", "float32 matmuls ran on TF32 tensor cores (CUDA; the train config key tf32), the model's "
                        "and a float32 method's own; false: full float32. Empty in rows written before the column: "
                        "their CUDA training used TF32, their CPU training full float32"),
    "metric": ("string", "accuracy (token, or exact sequence where the task says), bpc (bits per character), "
                         "recall or approx_err (probes)"),
    "higher_is_better": ("boolean", "direction of the metric"),
    "value": ("Float64", "the metric on the evaluation set (held out / freshly drawn), empty unless status ok"),
    "breakdown": ("string", "JSON object: the metric per group (e.g. needle depth, planted-key distance)"),
    "extras": ("string", "JSON object: secondary metrics (token or sequence accuracy)"),
    "final_loss": ("Float64", "mean training loss over the last 10 % of the steps done, nats"),
    "parameters": ("Int64", "trainable parameters of the model, including a method's own"),
    "train_wall_s": ("Float64", "wall time of the training steps (data, forward, backward, optimiser), s"),
    "tokens_per_s": ("Float64", "batch * seq_kv * steps_done / train_wall_s"),
    "peak_mem_mb": ("Float64", "CUDA allocator peak during training, MiB (empty on CPU)"),
    "concurrent": ("Int64", "cases the invocation ran at once at most (the train config key parallel; 1: one at a "
                            "time in the parent process): with more than 1, train_wall_s, tokens_per_s and wall_s "
                            "were measured while up to that many cases shared the device; empty in rows written "
                            "before the column existed"),
    "status": ("string", "ok, unsupported, wrong, oom, error, crashed, timeout or diverged"),
    "reason": ("string", "why, in words, for every status but ok"),
    "device": ("string", "device name (torch.cuda.get_device_name, or cpu)"),
    "host": ("string", "host name of the machine that ran it"),
    "git_sha": ("string", "commit of the attnbench checkout"),
    "git_dirty": ("boolean", "tracked files differed from that commit"),
    "wall_s": ("Float64", "wall time of the whole case (build, training, evaluation), s"),
    "started_at": ("string", "UTC time (ISO 8601) when the case started"),
}


def empty_row() -> dict:
    return {name: None for name in QUALITY_COLUMNS}


def to_frame(rows):
    import pandas as pd

    frame = pd.DataFrame(list(rows))
    for name, (dtype, _) in QUALITY_COLUMNS.items():
        if name not in frame:
            frame[name] = None
        frame[name] = frame[name].astype(dtype)
    extra = [c for c in frame.columns if c not in QUALITY_COLUMNS]
    return frame[list(QUALITY_COLUMNS) + extra]


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


class QualityStore:
    """``quality.jsonl`` of a run folder: append one row per finished case; ``done`` is the resume set."""

    def __init__(self, run_dir: Path, retry: tuple[str, ...] = ()):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "quality.jsonl"
        self._lock = threading.Lock()
        self.rows = read_jsonl(self.path)
        latest = {row["case_id"]: row["status"] for row in self.rows if row.get("case_id")}
        self.done = {case_id for case_id, status in latest.items() if status not in retry}

    def append(self, row: dict) -> None:
        row = {key: _clean(value) for key, value in row.items()}
        if row.get("status") not in STATUSES:
            raise ValueError(f"quality row has status {row.get('status')!r}, not one of {STATUSES}")
        if row["status"] != "ok" and not row.get("reason"):
            raise ValueError(f"quality row with status {row['status']!r} has no reason")
        if row["status"] == "ok" and row.get("value") is None:
            raise ValueError("quality row with status 'ok' has no value")
        with self._lock:
            if self.path.is_file():
                data = self.path.read_bytes()
                if data and not data.endswith(b"\n"):  # a crash mid-write: drop the partial line
                    self.path.write_bytes(data[: data.rfind(b"\n") + 1])
            with open(self.path, "a") as handle:
                handle.write(json.dumps(row, default=str) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            self.rows.append(row)
            self.done.add(row["case_id"])

    def frame(self):
        latest = {row["case_id"]: row for row in self.rows}
        return to_frame(latest.values())

    def finalize(self) -> Path:
        frame = self.frame()
        frame.to_parquet(self.run_dir / "quality.parquet", index=False)
        frame.to_csv(self.run_dir / "quality.csv", index=False)
        return self.run_dir / "quality.parquet"


def read_jsonl(path: Path, skipped: list[str] | None = None) -> list[dict]:
    """The rows of a ``quality.jsonl``; a line cut short by a crash (or not an object) is skipped, and named in
    ``skipped`` when given (``quality.jsonl:7: ...``)."""
    rows = []
    if not Path(path).is_file():
        return rows
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif skipped is not None:
            skipped.append(f"{Path(path).name}:{number}: unreadable line skipped")
    return rows


def load_quality(run_dir: Path):
    """The quality rows of a run folder (parquet, else jsonl with the latest row per case, else csv), typed;
    an empty frame when the folder has none."""
    import pandas as pd

    run_dir = Path(run_dir)
    parquet, jsonl, csv = (run_dir / name for name in FILES)
    if parquet.is_file():
        return to_frame(pd.read_parquet(parquet).to_dict("records"))
    if jsonl.is_file():
        latest = {}
        for row in read_jsonl(jsonl):
            latest[row.get("case_id") or id(row)] = row
        return to_frame(latest.values())
    if csv.is_file():
        frame = pd.read_csv(csv)
        return to_frame(frame.astype(object).where(frame.notna(), None).to_dict("records"))
    return to_frame([])
