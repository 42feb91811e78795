#!/usr/bin/env python3
"""Per-method figures of the linear-family runs (issue 10's closing note), as Markdown.

    python3 scripts/linear_summary.py RUN_DIR[=METHOD,...] ... [--fill RUN_DIR[=METHOD,...] ...] [--smoke SMOKE_RUN_DIR]
                                      [--min-fit 32768]

Several runs are merged (issue 10's measurements are spread over runs, one per kernel version): a run whose
rows are all ``decode`` is the decode run; of the others, each (method, mode) takes its rows from the run that
measured it last (the latest ``started_at``: a later run measured newer code; never lengths of two runs mixed
on one line), and a method run with ``impl`` other than its default is its own line (``performer
[impl=triton]``). A ``--fill`` run (lengths measured later with the same code, e.g. 256K / 512K added to a
sweep) adds its rows to the chosen line only at lengths that line lacks or where that line's row is not ``ok``
and older (a cell re-measured after a memory fix), and whole lines no other run has; the column ``runs`` then
names both. ``RUN_DIR=METHOD,...`` takes only those methods from that run. Runs measured with other options on purpose (num_warps 8, ...) are left out by not passing
them.

For each method and mode (fwd, fwd_bwd) over its ``ok`` rows: the log-log slope of time against length (a
least-squares fit over lengths >= --min-fit; 1 = linear, 2 = quadratic), the 1M-token figures (ms, TFLOP/s
attention-equivalent, peak memory) or the status and reason of the 1M row, the efficiency length against
``sdpa_cudnn`` causal ``fwd_bwd`` (the shortest length at which the method is at least as fast, interpolated
on the log-log curves; "<= L" when it is already faster at the shortest common length, "> L" when never),
and the ratio to the fla-core kernel of the same operator (own ms / fla ms) at each common length >= 32K.
Decode: per-step latency against context and its slope. Reads rows.parquet, or rows.jsonl when a run was
cut short.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd

from attnbench.report.maths import loglog_slope

FLA_OF = {"linear_attn": "fla_linear_attn", "linear_attn_triton": "fla_linear_attn", "simple_gla": "fla_simple_gla",
          "simple_gla_triton": "fla_simple_gla",
          "delta_rule": "fla_delta_rule", "gated_delta_rule": "fla_gated_delta_rule"}
YARDSTICK = "sdpa_cudnn"
MILLION = 1 << 20


def run_arg(text) -> tuple[Path, list[str] | None]:
    """``RUN_DIR`` or ``RUN_DIR=m1,m2`` -> (the run folder, the methods to keep or None for all)."""
    text = str(text)
    if "=" not in Path(text).name:
        return Path(text), None
    folder, _, names = text.rpartition("=")
    only = [name for name in names.split(",") if name]
    if not only:
        raise SystemExit(f"{text}: no method after '='")
    return Path(folder), only


def load(arg) -> pd.DataFrame:
    """A run's rows (the latest of each case). ``RUN_DIR=m1,m2`` keeps only those methods' rows: a run that
    re-measured a few methods after a fix (``h200-linear-mem-v2=lamamba``) supplies their lines alone."""
    run_dir, only = run_arg(arg)
    if (run_dir / "rows.parquet").exists():
        frame = pd.read_parquet(run_dir / "rows.parquet")
    elif (run_dir / "rows.jsonl").exists():
        rows = [json.loads(line) for line in (run_dir / "rows.jsonl").read_text().splitlines() if line.strip()]
        frame = pd.DataFrame(rows)
    else:
        raise SystemExit(f"{run_dir}: no rows.parquet or rows.jsonl")
    if "case_id" in frame:  # the latest row of each case (a resumed run may retry)
        frame = frame.drop_duplicates("case_id", keep="last")
    frame["run"] = run_dir.name
    if only is not None:
        unknown = sorted(set(only) - set(frame["method"]))
        if unknown:
            raise SystemExit(f"{arg}: no rows of {', '.join(unknown)} in {run_dir}")
        frame = frame[frame["method"].isin(only)].reset_index(drop=True)
    return frame


DEFAULT_IMPLS = ("chunked", "torch")
# the options that pick another code path (its own line), with their defaults: impl (the chunked form's kernel),
# solve (the delta rules' triangular solve: torch.linalg.solve_triangular by default), wy_backward (the fused
# pieces' backward), dot_precision (the own Triton kernels' dots: tf32 by default), softmax (nats_l's softmax form)
VARIANTS = {"impl": DEFAULT_IMPLS, "solve": ("torch",), "wy_backward": ("torch",), "dot_precision": ("tf32",),
            "softmax": ("auto",), "outputs": ("torch",), "wy_precision": ("tf32x3",), "stream": ("auto",)}


def klen(n) -> str:
    """A length as the tables write it: 32K for multiples of 1024, else the number (128, 512)."""
    n = int(n)
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def impl_label(method: str, options, variants=None) -> str:
    """``method``, or ``method [impl=X, solve=Y]`` naming the options of ``variants`` (default VARIANTS) that its
    row's method_options (JSON) set to other than their defaults."""
    try:
        chosen = options if isinstance(options, dict) else json.loads(options) if isinstance(options, str) and options \
            else {}
    except ValueError:
        chosen = {}
    if not isinstance(chosen, dict):
        chosen = {}
    parts = [f"{key}={chosen[key]}" for key, defaults in (VARIANTS if variants is None else variants).items()
             if chosen.get(key) not in (None, *defaults)]
    return f"{method} [{', '.join(parts)}]" if parts else method


def _loads(text) -> dict:
    try:
        value = json.loads(text) if isinstance(text, str) and text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def row_options(frame: pd.DataFrame) -> list[dict]:
    """Per row, the code paths it ran: the options the invocation set (``method_options``) overlaid by the options
    the method resolved (``resolved_options``: what an ``auto`` default or value chose, on rows made since the
    column; it names what ran, so it wins)."""
    none = pd.Series([None] * len(frame), index=frame.index)
    given = frame["method_options"] if "method_options" in frame else none
    resolved = frame["resolved_options"] if "resolved_options" in frame else none
    return [{**_loads(g), **_loads(r)} for g, r in zip(given, resolved)]


def labelled(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``method`` relabelled by :func:`impl_label` from :func:`row_options` (in place)."""
    frame["method"] = [impl_label(m, o) for m, o in zip(frame["method"], row_options(frame))]
    return frame


def merge(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The runs' rows as one frame, ``method`` relabelled by :func:`impl_label`; each (method, mode) takes all its
    rows from one run: the one that measured it last (latest ``started_at``; without it, the later run given).
    Not length by length: a line mixing kernel versions across lengths would give a slope and an efficiency
    length of neither."""
    for order, frame in enumerate(frames):
        frame["_run_order"] = order
    frame = labelled(pd.concat(frames, ignore_index=True, sort=False))
    started = frame["started_at"].fillna("") if "started_at" in frame else pd.Series([""] * len(frame))
    frame["_when"] = list(zip(started, frame["_run_order"]))
    latest = frame.groupby(["method", "mode"])["_when"].transform("max")
    chosen = frame["_run_order"] == [when[1] for when in latest]
    return frame[chosen].drop(columns=["_when", "_run_order"]).reset_index(drop=True)


def add_fill(frame: pd.DataFrame, fills: list[pd.DataFrame]) -> pd.DataFrame:
    """``frame`` (from :func:`merge`) plus the ``fills``' rows at the (method, mode, length) points it lacks,
    ``method`` relabelled the same way. A fill never replaces an ``ok`` point; a point that is not ``ok`` (an
    ``oom`` before a memory fix) gives way to a fill's row measured after it (later ``started_at``). Of two
    fills the first given wins a point both lack."""
    for fill in fills:
        fill = labelled(fill.copy())
        key = list(zip(frame["method"], frame["mode"], frame["seq_kv"]))
        started = frame["started_at"].fillna("") if "started_at" in frame else pd.Series([""] * len(frame))
        failed = {k: when for k, status, when in zip(key, frame["status"], started) if status != "ok"}
        have = set(key)
        fill_started = fill["started_at"].fillna("") if "started_at" in fill else pd.Series([""] * len(fill))
        fill_key = list(zip(fill["method"], fill["mode"], fill["seq_kv"]))
        redo = {k for k, when in zip(fill_key, fill_started) if k in failed and when > failed[k]}
        new = [k not in have or k in redo for k in fill_key]
        frame = frame[[k not in redo for k in key]]
        frame = pd.concat([frame, fill[new]], ignore_index=True, sort=False)
    return frame


# the state-form methods whose work has a standard count (issue 10: achieved rate against the measured ceilings)
LINEAR_STATE = ("linear_attn", "linear_attn_triton", "fla_linear_attn", "simple_gla", "simple_gla_triton",
                "fla_simple_gla")
DELTA_STATE = ("delta_rule", "gated_delta_rule", "fla_delta_rule", "fla_gated_delta_rule")
DEFAULT_CHUNK = 64
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def distrust_ungated(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows whose gradients were not gated (long cases, flag ``grads_not_gated``) on a (method, mode) line whose
    gate failed at another length (a ``wrong`` row): status ``ungated``, reason naming those lengths, so they
    leave the figures and show among the rows not ok (h200-linear-delta-fused-v2: the backward kernel was
    wrong at 8K and 32K, and its 128K-1M rows passed on the forward alone). Lines without a wrong row keep theirs."""
    frame = frame.copy()
    flags = frame["flags"].astype(str) if "flags" in frame else pd.Series([""] * len(frame), index=frame.index)
    for (method, mode), rows in frame.groupby(["method", "mode"]):
        wrong = rows[rows.status == "wrong"]
        if wrong.empty:
            continue
        at = ", ".join(klen(n) for n in sorted(set(wrong.seq_q)))
        bad = rows.index[(rows.status == "ok") & flags[rows.index].str.contains("grads_not_gated")]
        frame.loc[bad, "status"] = "ungated"
        frame.loc[bad, "reason"] = f"gradients not gated at this length; this line's gate failed (wrong) at {at}"
    return frame


def model_work(method: str, mode: str, d: int, chunk: int = DEFAULT_CHUNK) -> tuple[float, int] | None:
    """(FLOPs, tensors moved) per token and head of the chunked state form, or None for a method without a
    standard count. Linear attention and simple GLA, forward: the state's update and read ``4·d²`` plus the
    causal half of the intra-chunk scores and values ``C·2d``. The delta rules add the WY pieces (``k kᵀ``
    within the chunk, ``w = T·βk``, ``u = T·βv``, the inverse ``C²/3``) and ``w·S``: ``6·d² + 7·C·d + C²/3``.
    fwd_bwd counts the backward as twice the forward. Tensors: fwd reads q, k, v and writes o (4); fwd_bwd adds
    q, k, v, o, dO read and dq, dk, dv written (11): the minimum traffic, gates and state spills left out."""
    base = method.split(" [")[0]
    if base in LINEAR_STATE:
        flops = 4 * d * d + 2 * chunk * d
    elif base in DELTA_STATE:
        flops = 6 * d * d + 7 * chunk * d + chunk * chunk / 3
    else:
        return None
    return (flops, 4) if mode == "fwd" else (3 * flops, 11)


def ceilings(run_dir: Path) -> tuple[float | None, float | None]:
    """The run's measured bf16 matmul TFLOP/s and copy TB/s (env.json's calibration, the latest invocation's)."""
    path = Path(run_dir) / "env.json"
    if not path.exists():
        return None, None
    env = json.loads(path.read_text())
    env = env[-1] if isinstance(env, list) else env
    calibration = env.get("calibration") or {}
    return calibration.get("matmul_bf16_tflops"), calibration.get("copy_tbps")


def work_table(frame: pd.DataFrame, ceiling: dict) -> list[str]:
    """Achieved model TFLOP/s and minimum GB/s at each state-form line's longest ok length, as shares of the
    run's measured ceilings, and the bound: compute or memory where a share reaches 50 %, else neither (the
    sequential chunk scan's latency and the launches: what the profile runs show)."""
    out = ["| method | mode | length | ms | model TFLOP/s | of matmul | min GB/s | of copy | bound |",
           "|---|---|---|---|---|---|---|---|---|"]
    for method in sorted(set(frame.method)):
        for mode in ("fwd", "fwd_bwd"):
            rows = frame[(frame.method == method) & (frame["mode"] == mode) & (frame.status == "ok")]
            if rows.empty:
                continue
            r = rows.sort_values("seq_q").iloc[-1]
            if any(pd.isna(r.get(name)) for name in ("head_dim", "heads_q", "batch")):
                continue  # rows without their shape (hand-made test rows): no rate
            options = json.loads(r["method_options"]) if isinstance(r.get("method_options"), str) and r.get(
                "method_options") else {}
            work = model_work(method, mode, int(r.head_dim), int(options.get("chunk", DEFAULT_CHUNK)))
            if work is None:
                continue
            flops_tok, tensors = work
            token_heads = int(r.batch) * int(r.heads_q) * int(r.seq_q)
            seconds = float(r.ms_median) / 1e3
            tflops = flops_tok * token_heads / seconds / 1e12
            gbps = tensors * int(r.head_dim) * DTYPE_BYTES.get(str(r.dtype), 2) * token_heads / seconds / 1e9
            matmul, copy = ceiling.get(r["run"], (None, None))
            f_share = tflops / matmul if matmul else None
            b_share = gbps / (copy * 1e3) if copy else None
            if f_share is None or b_share is None:
                bound = "no calibration"
            elif max(f_share, b_share) >= 0.5:
                bound = "compute" if f_share >= b_share else "memory"
            else:
                bound = "neither (< 50 % of both)"
            out.append(f"| {method} | {mode} | {klen(int(r.seq_q))} | {fmt(float(r.ms_median))} | {fmt(tflops)} | "
                       f"{fmt(f_share * 100 if f_share is not None else None, '.1f')} % | {fmt(gbps, '.0f')} | "
                       f"{fmt(b_share * 100 if b_share is not None else None, '.1f')} % | {bound} |")
    return out


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(ms) against log(length) (attnbench.report.maths.loglog_slope, with this
    script's two-length minimum; the report's scaling section needs three)."""
    if not points:
        return None
    lengths, times = zip(*points)
    return loglog_slope(lengths, times, min_points=2)


def curve(frame: pd.DataFrame, method: str, mode: str, length="seq_q") -> dict[int, float]:
    rows = frame[(frame.method == method) & (frame["mode"] == mode) & (frame.status == "ok")]
    return {int(r[length]): float(r.ms_median) for _, r in rows.iterrows()}


def efficiency_length(own: dict[int, float], base: dict[int, float]) -> str:
    """The shortest length at which ``own`` is at least as fast as ``base`` (log-log interpolation)."""
    common = sorted(set(own) & set(base))
    if not common:
        return "n/a (no common lengths)"
    ratio = [(n, math.log(own[n] / base[n])) for n in common]
    if ratio[0][1] <= 0:
        return f"<= {klen(common[0])}"
    for (n0, r0), (n1, r1) in zip(ratio, ratio[1:]):
        if r1 <= 0:
            t = r0 / (r0 - r1)
            cross = math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))
            return f"~{cross / 1024:.1f}K"
    return f"> {klen(common[-1])}"


def fmt(x, spec=".3g"):
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def short_table(frame: pd.DataFrame, min_fit: int) -> list[str]:
    """Markdown rows ``| method | mode | 128: 5.63 ms, 512: 28 ms |`` for the lines whose longest ok length is
    below ``min_fit`` (their figures would otherwise appear nowhere in the summary)."""
    out = []
    for method in sorted(set(frame.method)):
        for mode in ("fwd", "fwd_bwd"):
            times = curve(frame, method, mode)
            if times and max(times) < min_fit:
                cells = ", ".join(f"{klen(n)}: {fmt(t)} ms" for n, t in sorted(times.items()))
                out.append(f"| {method} | {mode} | {cells} |")
    return ["| method | mode | ms per call |", "|---|---|---|", *out] if out else []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="run")
    parser.add_argument("--fill", action="append", default=[], metavar="run",
                        help="a run whose rows only fill lengths the chosen lines lack (repeatable)")
    parser.add_argument("--smoke")
    parser.add_argument("--min-fit", type=int, default=32768)
    args = parser.parse_args(argv)
    loaded = [load(Path(run)) for run in args.runs]
    decode = [f for f in loaded if len(f) and (f["mode"] == "decode").all()]
    timed = [f for f in loaded if not (len(f) and (f["mode"] == "decode").all())]
    if not timed:
        raise SystemExit("linear_summary: no run with fwd / fwd_bwd rows")
    frame = distrust_ungated(add_fill(merge(timed), [load(Path(run)) for run in args.fill]))
    names = ", ".join(Path(run).name for run in args.runs)
    if args.fill:
        names += " (filled from " + ", ".join(Path(run).name for run in args.fill) + ")"
    out = [f"# Linear family: {names}", ""]
    if len(timed) > 1:
        out += ["Merged: each method (and impl) and mode from the run that measured it last; column `runs` names "
                "it.", ""]
    base = curve(frame, YARDSTICK, "fwd_bwd")
    out += ["| method | mode | slope (>= %dK) | 1M ms | 1M TFLOP/s | 1M peak GiB | efficiency length vs %s fwd_bwd | own/fla at >= 32K | lengths ok | runs |"
            % (args.min_fit // 1024, YARDSTICK), "|---|---|---|---|---|---|---|---|---|---|"]
    for method in sorted(set(frame.method)):
        for mode in ("fwd", "fwd_bwd"):
            rows = frame[(frame.method == method) & (frame["mode"] == mode)]
            if rows.empty:
                continue
            times = curve(frame, method, mode)
            fit = slope([(n, t) for n, t in sorted(times.items()) if n >= args.min_fit])
            big = rows[rows.seq_q == MILLION]
            if not big.empty and big.iloc[0].status == "ok":
                r = big.iloc[0]
                ms, tf, mem = fmt(r.ms_median), fmt(r.get("tflops")), fmt(r.get("peak_mem_mb", float("nan")) / 1024)
            elif not big.empty:
                ms, tf, mem = f"{big.iloc[0].status}: {str(big.iloc[0].reason)[:60]}", "", ""
            else:
                ms, tf, mem = "not run", "", ""
            eff = efficiency_length(times, base) if mode == "fwd_bwd" and base and method != YARDSTICK else ""
            ratio = ""
            own = method.split(" [")[0]
            if own in FLA_OF:
                fla = curve(frame, FLA_OF[own], mode)
                common = [n for n in sorted(set(times) & set(fla)) if n >= 32768]
                ratio = ", ".join(f"{klen(n)}: {times[n] / fla[n]:.2f}x" for n in common)
                if not common:
                    fla_rows = frame[(frame.method == FLA_OF[own]) & (frame["mode"] == mode)]
                    if not fla_rows.empty and (fla_rows.status != "ok").all():
                        ratio = f"fla {fla_rows.iloc[0].status}: {str(fla_rows.iloc[0].reason)[:50]}"
            lengths = ", ".join(f"{klen(n)}" for n in sorted(times))
            runs = ", ".join(sorted(set(rows["run"])))
            out.append(f"| {method} | {mode} | {fmt(fit, '.2f')} | {ms} | {tf} | {mem} | {eff} | {ratio} | {lengths} | {runs} |")
    short = short_table(frame, args.min_fit)
    if short:
        out += ["", f"## Lines measured only below {klen(args.min_fit)}: ms per call at each ok length", "",
                "(cubic or direct-solve methods capped by their max_len, exact recurrences run as loops; the slope "
                "and 1M columns above have nothing to fit for them)", "", *short]
    folders = [run_arg(run)[0] for run in [*args.runs, *args.fill]]
    ceiling = {folder.name: ceilings(folder) for folder in folders}
    work = work_table(frame, ceiling)
    if len(work) > 2:
        out += ["", "## Work against the H200's measured ceilings (state-form methods, longest ok length)", "",
                "Model FLOPs and minimum bytes per token and head (`model_work` in this script: 4·d² + 2·C·d for "
                "linear attention and simple GLA, 6·d² + 7·C·d + C²/3 for the delta rules, fwd_bwd three times "
                "the forward; 4 tensors moved fwd, 11 fwd_bwd), against the run's calibration in env.json "
                "(bf16 matmul TFLOP/s, copy TB/s).", "", *work]
    bad = frame[~frame.status.isin(["ok"])]
    if not bad.empty:
        out += ["", "## Rows not ok", "", "| method | mode | seq | status | reason |", "|---|---|---|---|---|"]
        for _, r in bad.sort_values(["method", "mode", "seq_q"]).iterrows():
            out.append(f"| {r.method} | {r['mode']} | {r.seq_q} | {r.status} | {str(r.reason)[:110]} |")
    if decode:
        dec = merge(decode)
        out += ["", "## Decode: ms per step against context", ""]
        contexts = sorted(set(dec.seq_kv))
        out += ["| method | " + " | ".join(f"{klen(c)}" for c in contexts) + " | slope | state bytes/seq |",
                "|---" * (len(contexts) + 3) + "|"]
        for method in sorted(set(dec.method)):
            times = curve(dec, method, "decode", length="seq_kv")
            cells = [fmt(times.get(c)) or str(dec[(dec.method == method) & (dec.seq_kv == c)].status.tolist()[:1])
                     for c in contexts]
            state = dec[(dec.method == method) & dec.get("state_bytes", pd.Series(dtype=float)).notna()] \
                if "state_bytes" in dec else pd.DataFrame()
            state_txt = fmt(float(state.state_bytes.iloc[0]), ".0f") if not state.empty else "(KV cache)"
            out.append(f"| {method} | " + " | ".join(cells) + f" | {fmt(slope(sorted(times.items())), '.2f')} | {state_txt} |")
    if args.smoke:
        smoke = load(Path(args.smoke))
        out += ["", "## Smoke (4K): status per method and mode", "", "| method | mask | mode | status | rel_err | approx_err | reason |",
                "|---|---|---|---|---|---|---|"]
        for _, r in smoke.sort_values(["method", "mask", "mode"]).iterrows():
            out.append(f"| {r.method} | {r['mask']} | {r['mode']} | {r.status} | {fmt(r.get('rel_err'))} | "
                       f"{fmt(r.get('approx_err'))} | {'' if r.status == 'ok' else str(r.reason)[:90]} |")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
