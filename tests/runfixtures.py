"""Synthetic run folders for the report, compare and runs tests (not a conftest: import what you need).

Times follow simple cost models so that curves have known shapes: dense exact methods grow as L^2 plus a
launch floor, the linear method as L, so their crossing length is known in closed form.
"""
from __future__ import annotations

import json
from pathlib import Path

from attnbench.record.schema import to_frame

H200 = "NVIDIA H200"
LENGTHS = (1024, 2048, 4096, 8192, 16384)
# method -> (family, exact, seconds-per-L^2 coefficient, seconds-per-L coefficient, floor in ms)
METHODS = {
    "sdpa": ("exact", True, 1.0e-11, 0.0, 0.02),
    "flex": ("exact", True, 1.3e-11, 0.0, 0.05),
    "eager": ("exact", True, 4.5e-11, 0.0, 0.03),
    "linear_attn": ("linear", False, 0.0, 8.0e-8, 0.1),
    "buggy": ("exact", True, 1.1e-11, 0.0, 0.02),
}
MASKS = {"causal": "causal_self", "full": "noncausal_self", "sliding_window(w=256)": "causal_self"}


def approx_err_of(length: int) -> float:
    """The fixture's approx_err of linear_attn: it drifts further from exact attention as the length grows."""
    return 0.01 * length / 1024


def model_ms(method: str, length: int, mode: str = "fwd") -> float:
    """Time per call from the method's cost model, ms (bwd costs 2.5x, fwd_bwd 3.5x)."""
    _, _, quadratic, linear, floor = METHODS[method]
    factor = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5, "decode": 0.1}[mode]
    return factor * (floor + 1e3 * (quadratic * length**2 + linear * length))


def make_row(run_id: str, method: str, mask: str, mode: str, length: int, status: str = "ok", *,
             ms: float | None = None, spread: float = 0.02, device: str = H200, batch: int = 1,
             heads: int = 16, head_dim: int = 128, dtype: str = "bf16", reason: str | None = None, **extra) -> dict:
    """One schema row; metrics are filled only when ``status`` is ok (empty otherwise, as the runner does)."""
    family, exact, *_ = METHODS.get(method, ("exact", True, 0, 0, 0))
    pattern = MASKS.get(mask, "causal_self")
    seq_q = 1 if mode == "decode" else length
    pairs = seq_q * length // (2 if pattern.startswith("causal") and mode != "decode" else 1)
    flops = 4.0 * pairs * heads * head_dim * batch * {"fwd": 1, "bwd": 2.5, "fwd_bwd": 3.5, "decode": 1}[mode]
    row = {
        "run_id": run_id, "case_id": f"{method}|{mask}|{mode}|{length}|{batch}|{heads}|{head_dim}|{dtype}",
        "method": method, "family": family, "exact": exact, "mask": mask, "mask_name": mask.split("(")[0],
        "pattern": pattern, "batch": batch, "heads_q": heads, "heads_kv": heads, "seq_q": seq_q, "seq_kv": length,
        "head_dim": head_dim, "dtype": dtype, "mode": mode, "layout": "single", "world_size": 1, "seed": 0,
        "status": status, "reason": reason if status != "ok" else None, "visible_pairs": pairs,
        "density": pairs / (seq_q * length), "flops": flops, "device": device, "timer": "cuda_events",
        "started_at": "2025-01-01T00:00:00Z",
    }
    if status != "ok" and reason is None:
        row["reason"] = f"{status} in synthetic fixture"
    if status == "ok":
        ms = model_ms(method, length, mode) if ms is None else ms
        bytes_moved = 2.0 * batch * heads * head_dim * (2 * seq_q + 2 * length)
        row.update(ms_median=ms, ms_p20=ms * (1 - spread), ms_p80=ms * (1 + spread), ms_min=ms * (1 - 2 * spread),
                   reps=50, compile_s=0.5, tflops=flops / (ms * 1e-3) / 1e12, bytes_moved=bytes_moved,
                   gbps=bytes_moved / (ms * 1e-3) / 1e9, peak_mem_mb=bytes_moved / 2**20 * (3 if exact else 2),
                   mem_above_inputs_mb=bytes_moved / 2**20, rel_err=1e-3, err_tol=4e-3, sm_clock_mhz=1980.0,
                   power_w=600.0, temp_c=55.0, wall_s=1.0)
    row.update(extra)
    return row


def env_for(run_id: str, device: str = H200, calibration: bool = True, **overrides) -> dict:
    env = {
        "run_id": run_id, "command": f"attnbench sweep=fixture run_id={run_id}", "started_at": "2025-01-01T00:00:00Z",
        "finished_at": "2025-01-01T01:00:00Z", "host": "gpu-host-1", "python": "3.11.2", "torch": "2.11.0",
        "triton": "3.6.0", "cuda": "13.0", "cudnn": "91000", "driver": "580.65", "git_sha": "abc1234",
        "git_dirty": False, "packages": {"torch": "2.11.0", "triton": "3.6.0", "numpy": "2.4.0"},
        "gpus": [{"name": device, "memory_mb": 143771, "sm_clock_max_mhz": 1980, "mem_clock_max_mhz": 2619,
                  "power_limit_w": 700}],
        "device": device,
        "calibration": {"matmul_bf16_tflops": 780.0, "copy_tbps": 3.9, "measured_at": "2025-01-01T00:00:05Z"}
        if calibration else None,
    }
    env.update(overrides)
    return env


def write_run(root: Path, run_id: str, rows: list[dict], env: dict | None = None, config: dict | None = None,
              formats: tuple[str, ...] = ("parquet", "csv")) -> Path:
    """A run folder ``root/run_id`` with rows in the given formats (parquet, csv, jsonl), env.json, config.yaml."""
    import yaml

    folder = Path(root) / run_id
    folder.mkdir(parents=True, exist_ok=True)
    frame = to_frame(rows)
    if "parquet" in formats:
        frame.to_parquet(folder / "rows.parquet", index=False)
    if "csv" in formats:
        frame.to_csv(folder / "rows.csv", index=False)
    if "jsonl" in formats:
        with open(folder / "rows.jsonl", "w") as out:
            for row in rows:
                out.write(json.dumps(row) + "\n")
    if env is not None:
        (folder / "env.json").write_text(json.dumps(env))
    if config is not None:
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def fixture_rows(run_id: str, device: str = H200, cp: bool = True, masks=tuple(MASKS),
                 modes=("fwd", "bwd"), approx: bool = False) -> list[dict]:
    """Rows holding every status (with the default masks and modes), plus context-parallel rows when asked.

    ok: sdpa, flex, linear_attn nearly everywhere; unsupported: linear_attn on sliding_window; wrong: buggy;
    oom: eager at 16k; timeout: eager bwd at 8k; error: flex at 16k on full; crashed: linear_attn fwd at 16k causal.
    ``approx``: linear_attn's ok rows carry approx_err (``approx_err_of``), the other rows an empty one.
    """
    rows = []
    for mask in masks:
        for mode in modes:
            for length in LENGTHS:
                for method in METHODS:
                    status, reason = "ok", None
                    if method == "linear_attn" and mask.startswith("sliding"):
                        status, reason = "unsupported", "linear_attn supports only full and causal masks"
                    elif method == "buggy":
                        status, reason = "wrong", "rel_err 0.31 above tolerance 0.004"
                    elif method == "eager" and length == 16384:
                        status, reason = "oom", "CUDA out of memory: tried to allocate 16.00 GiB"
                    elif method == "eager" and mode == "bwd" and length == 8192:
                        status, reason = "timeout", "case exceeded its 120 s timeout"
                    elif method == "flex" and mask == "full" and length == 16384:
                        status, reason = "error", "RuntimeError: recompile limit hit (no silent fallback)"
                    elif method == "linear_attn" and mask == "causal" and mode == "fwd" and length == 16384:
                        status, reason = "crashed", "worker died: SIGSEGV"
                    extra = {"approx_err": approx_err_of(length)} if approx and method == "linear_attn" \
                        and status == "ok" else {}
                    rows.append(make_row(run_id, method, mask, mode, length, status, reason=reason, device=device,
                                         **extra))
    if cp:
        for world in (2, 4, 8):
            for layout in ("ring", "ulysses"):
                ms = model_ms("sdpa", 65536) / world * (1.15 if layout == "ring" else 1.05)
                rows.append(make_row(run_id, "sdpa", "causal", "fwd", 65536, ms=ms, device=device, layout=layout,
                                     world_size=world, case_id=f"cp|{layout}|{world}",
                                     **cp_columns(ms, world, 65536, model_ms("sdpa", 65536))))
        # the same case on one device: the CP rows must stay out of its curve
        rows.append(make_row(run_id, "sdpa", "causal", "fwd", 65536, device=device))
    return rows


def cp_columns(ms: float, world: int, length: int, single_ms: float | None, *, skew: float = 0.1,
               heads: int = 16, head_dim: int = 128, efficiency: float | None = None) -> dict:
    """The CP columns of an ok row taking ``ms`` on ``world`` ranks: rank times spread linearly by ``skew``
    (the last rank is the slowest and sets ``ms``), bytes of a ring passing K and V (bf16) W-1 times, and
    speedup/efficiency against ``single_ms`` as the runner records them (``efficiency`` overrides the recorded
    one, to fake a runner that computed it wrong)."""
    ranks = [ms * (1 - skew * (world - 1 - r) / max(world - 1, 1)) for r in range(world)]
    comm = float(2 * 2 * length // world * heads * head_dim * (world - 1))
    columns = {"ms_rank_max": max(ranks), "ms_rank_mean": sum(ranks) / world,
               "imbalance": max(ranks) / (sum(ranks) / world), "rank_ms": ";".join(f"{t:.6g}" for t in ranks),
               "comm_bytes": comm, "comm_gbps": comm / (ms * 1e-3) / 1e9}
    if single_ms:
        columns.update(single_ms=single_ms, speedup=single_ms / ms,
                       efficiency=single_ms / ms / world if efficiency is None else efficiency)
    return columns


# layout -> overhead over perfect scaling (time on W devices = one-device time / W x overhead)
CP_LAYOUTS = {"ring(balance=zigzag)": 1.08, "usp(ulysses=2)": 1.04, "ring_allgather": 1.15}
CP_LENGTHS = (4096, 8192, 16384)


def cp_rows(run_id: str, *, impossible: bool = False, wrong_efficiency: bool = False) -> list[dict]:
    """A context-parallel run: one-device sdpa rows (full fwd_bwd at ``CP_LENGTHS``, causal at 16k) and per
    layout of ``CP_LAYOUTS``: full fwd_bwd at 8k and 16k on 2 and 4 ranks (so 4k tokens per device at 8k/W=2
    and 16k/W=4: weak scaling), causal fwd_bwd at 16k on 2 ranks; usp is unsupported on document(n=4) and
    ring_allgather times out on causal at 4 ranks.

    ``impossible``: usp's full 16k row on 2 ranks takes a third of the one-device time (speed-up 3 > 2);
    ``wrong_efficiency``: every recorded efficiency is the speed-up (not divided by the world size).
    """
    rows = []
    single = {}
    for mask, lengths in (("full", CP_LENGTHS), ("causal", (16384,))):
        for length in lengths:
            single[(mask, length)] = model_ms("sdpa", length, "fwd_bwd")
            rows.append(make_row(run_id, "sdpa", mask, "fwd_bwd", length))
    for layout, overhead in CP_LAYOUTS.items():
        cases = [("full", 8192, 2), ("full", 8192, 4), ("full", 16384, 2), ("full", 16384, 4), ("causal", 16384, 2)]
        for mask, length, world in cases:
            ms = single[(mask, length)] / world * overhead
            if impossible and layout.startswith("usp") and mask == "full" and length == 16384 and world == 2:
                ms = single[(mask, length)] / 3
            columns = cp_columns(ms, world, length, single[(mask, length)], skew=0.3 if mask == "causal" else 0.05)
            if wrong_efficiency:
                columns["efficiency"] = columns["speedup"]
            rows.append(make_row(run_id, "sdpa", mask, "fwd_bwd", length, ms=ms, layout=layout, world_size=world,
                                 case_id=f"cp|{layout}|{mask}|{length}|{world}", cp_balance="zigzag", **columns))
        if layout.startswith("usp"):
            rows.append(make_row(run_id, "sdpa", "document(n=4)", "fwd_bwd", 16384, "unsupported", layout=layout,
                                 world_size=2, case_id=f"cp|{layout}|document|16384|2",
                                 reason="usp: document masks need per-document balancing (not in this layout)"))
        if layout == "ring_allgather":
            rows.append(make_row(run_id, "sdpa", "causal", "fwd_bwd", 16384, "timeout", layout=layout, world_size=4,
                                 case_id=f"cp|{layout}|causal|16384|4", reason="rank 3 hung: 120 s timeout"))
    return rows


def write_fixture_run(root: Path, run_id: str = "fixture-run", device: str = H200, calibration: bool = True,
                      **kwargs) -> Path:
    """The standard fixture run folder (every status, and CP rows) under ``root``."""
    config = {"methods": list(METHODS), "masks": list(MASKS), "modes": ["fwd", "bwd"], "seq_lens": list(LENGTHS),
              "dtype": "bf16"}
    return write_run(root, run_id, fixture_rows(run_id, device, **kwargs), env_for(run_id, device, calibration),
                     config)


LARGE_MASKS = ("causal", "full", "sliding_window(w=256)", "document(n=4)")
LARGE_MODES = ("fwd", "bwd", "fwd_bwd", "decode")


def large_rows(run_id: str, methods: int = 8, lengths: int = 10, masks=LARGE_MASKS, modes=LARGE_MODES) -> list[dict]:
    """5,120 rows by default: 8 methods x 4 masks x 4 modes x 10 lengths x 4 head shapes, several statuses."""
    methods = [f"m{i}" for i in range(methods)]
    shapes = [(1, 16, 64), (1, 16, 128), (2, 32, 128), (4, 8, 256)]
    lengths = [256 * 2**i for i in range(lengths)]
    rows = []
    for i, method in enumerate(methods):
        for mask in masks:
            for mode in modes:
                for shape_index, (batch, heads, head_dim) in enumerate(shapes):
                    for length in lengths:
                        status = "ok"
                        if i == 7 and mask == "document(n=4)":
                            status = "unsupported"
                        elif length == lengths[-1] and i % 3 == 0:
                            status = "oom"
                        elif length == lengths[-2] and i == 5 and mode == "bwd":
                            status = ("error", "timeout", "crashed", "wrong")[shape_index]
                        ms = (0.01 + 1e-9 * (1 + i / 4) * length**2 * (1 + 0.1 * (i % 3)) * batch * heads / 16)
                        row = make_row(run_id, "sdpa", mask, mode, length, status, ms=ms, batch=batch, heads=heads,
                                       head_dim=head_dim)
                        row.update(method=method, family="exact" if i < 5 else "sparse", exact=i < 5,
                                   case_id=f"{method}|{mask}|{mode}|{length}|{batch}|{heads}|{head_dim}")
                        rows.append(row)
    return rows
