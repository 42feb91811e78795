"""How long each mask takes to build its representations: ``attnbench masks time``.

The runner builds a case's BlockMask, block layout and visible-pair count outside the timed region, but they are
still paid once per case, so they must stay cheap at long lengths (the target: under 1 s at 128K tokens on the
H200). This module times them per mask on a chosen device: one untimed warm-up (CUDA context, kernel caches),
then ``repeats`` timed builds, each synchronised on CUDA, reported as median and min wall milliseconds.

Every mask yields a row: ``status`` is ``ok`` or ``error`` with the reason (bad length for the mask, out of
memory, ...); nothing is skipped silently.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from .registry import list_masks, make_mask

STAGES = ("visible_pairs", "block_layout", "block_mask")
FIELDS = ("mask", "seq_q", "seq_kv", "device", "status", "reason", "visible_pairs", "density",
          "computed_blocks", "total_blocks", *(f"{s}_ms_median" for s in STAGES),
          *(f"{s}_ms_min" for s in STAGES), "repeats")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[object, list[float]]:
    result = fn()  # warm-up, untimed
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return result, samples


def time_mask(entry, seq_q: int, seq_kv: int | None = None, device: str = "cpu", repeats: int = 5,
              block: int = 128) -> dict:
    """One row: build times of one mask's visible-pair count, block layout and BlockMask on ``device``."""
    if repeats < 1:
        raise ValueError(f"repeats: must be at least 1, got {repeats}")
    seq_kv = seq_q if seq_kv is None else seq_kv
    dev = torch.device(device)
    row: dict = {"mask": str(entry), "seq_q": seq_q, "seq_kv": seq_kv, "device": str(dev), "repeats": repeats,
                 "status": "ok", "reason": ""}
    try:
        spec = make_mask(entry)
        row["mask"] = spec.label
        spec.validate_lengths(seq_q, seq_kv)
        bound = spec.bind(seq_q, seq_kv).to(dev)
        pairs, t_pairs = _time(bound.visible_pairs, dev, repeats)
        layout, t_layout = _time(lambda: bound.block_layout(block, block), dev, repeats)
        _, t_mask = _time(lambda: bound.block_mask(dev, block), dev, repeats)
    except torch.cuda.OutOfMemoryError as exc:
        return {**row, "status": "oom", "reason": str(exc).splitlines()[0]}
    except Exception as exc:  # noqa: BLE001 - every mask yields a row with the reason
        return {**row, "status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    row.update(visible_pairs=pairs, density=pairs / float(seq_q * seq_kv),
               computed_blocks=layout.computed_blocks(), total_blocks=layout.num_q_blocks * layout.num_kv_blocks)
    for stage, samples in zip(STAGES, (t_pairs, t_layout, t_mask)):
        row[f"{stage}_ms_median"] = statistics.median(samples)
        row[f"{stage}_ms_min"] = min(samples)
    return row


def time_masks(entries: Iterable | None, seq_q: int, seq_kv: int | None = None, device: str = "cpu",
               repeats: int = 5, block: int = 128) -> list[dict]:
    entries = list(entries) if entries else list_masks()
    return [time_mask(e, seq_q, seq_kv, device, repeats, block) for e in entries]


def environment(device: str) -> dict:
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"torch": torch.__version__, "device_name": name, "threads": torch.get_num_threads()}


def write(rows: list[dict], path: str | Path, device: str) -> Path:
    """``.json`` (rows plus environment) or ``.csv``, by the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        import pandas as pd

        pd.DataFrame(rows, columns=list(FIELDS)).to_csv(path, index=False)
    else:
        path.write_text(json.dumps({"environment": environment(device), "rows": rows}, indent=1) + "\n")
    return path


def format_table(rows: list[dict]) -> str:
    head = f"{'mask':<44} {'status':<6} {'density':>8} {'pairs ms':>9} {'layout ms':>10} {'BlockMask ms':>13}"
    lines = [head]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['mask']:<44} {r['status']:<6} {r['reason']}")
            continue
        lines.append(f"{r['mask']:<44} {'ok':<6} {r['density']:>8.4f} {r['visible_pairs_ms_median']:>9.1f} "
                     f"{r['block_layout_ms_median']:>10.1f} {r['block_mask_ms_median']:>13.1f}")
    return "\n".join(lines)
