"""Task quality: per CAB pattern a method x task table with ranks, the metric against length, the needle maps,
quality against training throughput, host-model options against the plain model (hybrid rescue), the probes and the
experiments (``sections.experiments``). Reads each run folder's quality rows (``attnbench.record.quality``). A row
run with host-model options is labelled ``method [options]`` so it is never merged with the plain model's."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from attnbench.record.quality import load_quality
from attnbench.record.schema import PATTERNS
from attnbench.report import plots
from attnbench.report.context import Context
from attnbench.report.formatting import fmt
from attnbench.report.maths import pareto_front
from attnbench.report.model import Cell, Section, Table, Text, plot
from attnbench.report.sections.experiments import experiment_blocks, option_blocks, options_label


DENSE_SHARE = 0.999  # a probe row whose method attended this share of the visible pairs is dense there


def quality_rows(ctx: Context) -> pd.DataFrame:
    """Every run's quality rows, labelled like the kernel rows (method, and the run when several are merged)."""
    frames = []
    for run in ctx.runs:
        frame = load_quality(run.path)
        if len(frame):
            frame = frame.assign(run_dir=run.name)
            frames.append(frame)
    if not frames:
        return pd.DataFrame()
    rows = superseded_by_fitted(pd.concat(frames, ignore_index=True))
    several = rows["run_dir"].nunique() > 1
    rows["options"] = rows["model_options"].map(options_label) if "model_options" in rows else ""
    with_options = rows["options"].map(lambda text: f" [{text}]" if text else "")
    rows["label"] = rows["method"].astype(str) + with_options + (" · " + rows["run_dir"] if several else "")
    rows["value"] = pd.to_numeric(rows["value"], errors="coerce").astype(float)
    rows["tokens_per_s"] = pd.to_numeric(rows["tokens_per_s"], errors="coerce").astype(float)
    rows["concurrent"] = pd.to_numeric(rows.get("concurrent"), errors="coerce").astype(float)
    rows["x"] = pd.to_numeric(rows["seq"], errors="coerce").astype(float)
    rows["reason"] = rows["reason"].fillna("").astype(str)
    return rows


FITTED_KEY = ["run_dir", "task", "method", "seq", "seed", "dtype", "model_options", "tf32"]


def superseded_by_fitted(rows: pd.DataFrame) -> pd.DataFrame:
    """Without the ``unsupported`` rows that a fitted case replaced: a run resumed with ``fit_method_options``
    keeps the rows its default-sized cases wrote ("method_options.halo.block: must be <= seq 64"), and the fitted
    case of the same task, method, length, seed and model options is a new case id with its own row. Both would
    count in a cell; the fitted one is the answer. Other statuses stay (a default-sized case that ran is a
    result of its own)."""
    if "fitted_options" not in rows or not len(rows):
        return rows
    fitted = rows["fitted_options"].fillna("").astype(str) != ""
    if not fitted.any():
        return rows
    key = [c for c in FITTED_KEY if c in rows]
    keys = rows[key].apply(lambda row: "|".join("" if pd.isna(v) else str(v) for v in row), axis=1)
    replaced = keys.isin(set(keys[fitted])) & ~fitted & (rows["status"] == "unsupported")
    return rows[~replaced].reset_index(drop=True)


def shared_device_note(rows: pd.DataFrame) -> str:
    """A caption's warning when some rows were trained beside others on one device (``attnbench train parallel=N``,
    column ``concurrent``): their throughput and wall times are not those of the method alone."""
    shared = rows["concurrent"] if "concurrent" in rows else pd.Series(dtype=float)
    many = shared[shared > 1]
    if not len(many):
        return ""
    return (f" {len(many)} of {len(rows)} row(s) ran with up to {int(many.max())} cases sharing the device (column "
            "`concurrent`, `attnbench train parallel=N`): their tokens/s and wall times are lower than alone; compare "
            "speed only between rows of equal `concurrent`.")


def split_unsupported(rows: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """(the rows of methods that have a row other than ``unsupported``, {label: its reasons} of the methods whose
    every row is ``unsupported``): those take no line of the pattern's table (a line of "unsupported" in every
    cell ranks nothing) but are named under it with why."""
    all_unsupported = (rows["status"] == "unsupported").groupby(rows["label"]).all()
    only = sorted(label for label, yes in all_unsupported.items() if yes)
    reasons = {label: "; ".join(sorted(set(rows.loc[rows["label"] == label, "reason"]) - {""}))
               for label in only}
    return rows[~rows["label"].isin(only)], reasons


def unsupported_note(reasons: dict[str, str], limit: int = 160) -> str:
    """The caption's sentence naming the methods that ran no case of the pattern, grouped by reason."""
    if not reasons:
        return ""
    by_reason: dict[str, list[str]] = {}
    for label, reason in reasons.items():
        by_reason.setdefault(reason[:limit] or "no reason recorded", []).append(label)
    parts = [f"{', '.join(labels)} ({reason})" for reason, labels in sorted(by_reason.items(), key=lambda kv: kv[1])]
    return f" Not in the table, every case `unsupported`: {'; '.join(parts)}."


def _direction(rows: pd.DataFrame) -> bool:
    return bool(rows["higher_is_better"].dropna().iloc[0]) if rows["higher_is_better"].notna().any() else True


def rank_table(rows: pd.DataFrame) -> tuple[list[str], list[list], dict]:
    """Method x task for one pattern. A cell: the metric's mean over every (length, seed) run of the task, with
    its rank among the methods that ran every one of them ok (CAB-style: 1 = best); a method with a failed run
    shows the worst status and is not ranked on that task. Last column: the mean rank over the tasks ranked."""
    tasks = sorted(rows["task"].unique())
    labels = sorted(rows["label"].unique())
    planned = rows.groupby("task").apply(lambda r: set(zip(r["x"], r["seed"])), include_groups=False)
    ranks: dict[str, dict[str, int]] = {label: {} for label in labels}
    means: dict[tuple[str, str], float] = {}
    for task in tasks:
        mine = rows[rows["task"] == task]
        complete = {}
        for label, runs in mine.groupby("label"):
            ok = runs[runs["status"] == "ok"]
            if set(zip(ok["x"], ok["seed"])) >= planned[task] and len(ok):
                complete[label] = float(ok["value"].mean())
            if len(ok):
                means[(label, task)] = float(ok["value"].mean())
        sign = 1.0 if _direction(mine) else -1.0
        for label, value in complete.items():  # ties share a rank: 1 + the methods strictly better
            ranks[label][task] = 1 + sum(sign * other > sign * value for other in complete.values())
    header = ["method", *[f"{t} ({rows[rows['task'] == t]['metric'].iloc[0]}{' ↑' if _direction(rows[rows['task'] == t]) else ' ↓'})"
                          for t in tasks], "mean rank"]
    table = []
    for label in labels:
        line = [label]
        for task in tasks:
            runs = rows[(rows["task"] == task) & (rows["label"] == label)]
            if runs.empty:
                line.append("")
                continue
            failed = runs[runs["status"] != "ok"]
            if task in ranks[label]:
                line.append(f"{fmt(means[(label, task)])} (#{ranks[label][task]})")
            elif len(failed):
                status = failed["status"].mode().iloc[0]
                partial = f"{fmt(means[(label, task)])}, " if (label, task) in means else ""
                line.append(Cell(f"{partial}{status} ×{len(failed)}", status, "; ".join(sorted(set(failed["reason"])))[:500]))
            else:
                line.append(fmt(means.get((label, task))))
        mean_rank = np.mean(list(ranks[label].values())) if ranks[label] else np.nan
        line.append(fmt(mean_rank) if ranks[label] else "")
        table.append(line)
    return header, table, ranks


SETUP_COLUMNS = (("pattern", "pattern"), ("x", "lengths"), ("d_model", "d_model"), ("layers", "layers"),
                 ("heads", "heads"), ("steps", "steps"), ("batch", "batch"), ("lr", "lr"), ("dtype", "dtype"))


def setup_table(rows: pd.DataFrame) -> Table | None:
    """What each task trained: the values its rows hold for the model and training settings (several values joined
    with " / "), so that a reader knows the budget behind every metric (a ranking at 400 steps is not one at
    convergence)."""
    trained = rows[rows["kind"] == "train"]
    if trained.empty:
        return None
    present = [(column, title) for column, title in SETUP_COLUMNS if column in trained]
    table = []
    for task, mine in trained.groupby("task"):
        cells = [task]
        for column, _ in present:
            values = sorted({v for v in mine[column].dropna()}, key=lambda v: (str(type(v)), v))
            if column == "x":
                text = " / ".join(plots.tokens(v) for v in values)
            else:
                text = " / ".join(fmt(v) if isinstance(v, float) else str(v) for v in values)
            cells.append(text or "—")
        table.append(cells)
    return Table(["task"] + [title for _, title in present], table,
                 "Training setup per task (every method of a task trains the same model and budget; only the "
                 "attention differs).", collapsed=True)


def noise_floor(rows: pd.DataFrame) -> list[dict]:
    """Per trained task at its longest length: the spread of the exact methods (column ``exact``: the same
    softmax attention through different kernels), the task's noise floor at this training budget - a difference
    between two methods smaller than it is not evidence - and the approximate methods outside that band.

    Only methods whose every seed there finished ok count, and only tasks with at least two such exact methods.
    Returns one dict per task: task, length, metric, higher, exact (names), low and high (the exact methods'
    means over seeds), seed_spread (the widest range across the exact methods of one seed), better and worse
    (approximate methods whose mean is outside the band, best first), inside (how many are within it)."""
    out = []
    trained = rows[rows["kind"] == "train"]
    for task, mine in trained.groupby("task"):
        at = mine[mine["x"] == mine["x"].max()]
        finished = at.groupby("method")["status"].agg(lambda s: bool((s == "ok").all()))
        at = at[at["method"].isin(finished[finished].index) & np.isfinite(at["value"])]
        exact_flag = at["exact"].fillna(False).astype(bool) if "exact" in at else pd.Series(False, index=at.index)
        exact = at[exact_flag]
        if exact["method"].nunique() < 2:
            continue
        higher = _direction(mine)
        means = exact.groupby("method")["value"].mean()
        low, high = float(means.min()), float(means.max())
        per_seed = exact.groupby("seed")["value"].agg(lambda v: float(v.max() - v.min()))
        others = at[~exact_flag].groupby("method")["value"].mean().sort_values(ascending=not higher)
        above, below = others[others > high], others[others < low]
        better, worse = (above, below) if higher else (below, above)
        out.append({"task": task, "length": float(at["x"].max()), "metric": str(mine["metric"].iloc[0]),
                    "higher": higher, "exact": sorted(means.index), "low": low, "high": high,
                    "seed_spread": float(per_seed.max()), "better": list(better.items()),
                    "worse": list(worse.items()), "inside": int(len(others) - len(better) - len(worse))})
    return out


def _noise_floor_block(rows: pd.DataFrame) -> list:
    floors = noise_floor(rows)
    if not floors:
        return []
    table = []
    for f in floors:
        arrow = "↑" if f["higher"] else "↓"
        better = ", ".join(f"{m} {fmt(v)}" for m, v in f["better"]) or "none"
        table.append([f["task"], plots.tokens(f["length"]), f"{f['metric']} {arrow}", len(f["exact"]),
                      f"{fmt(f['low'])} – {fmt(f['high'])}", fmt(f["seed_spread"]), better, f["inside"],
                      len(f["worse"])])
    return [Table(["task", "length", "metric", "exact methods", "their means (min – max)", "widest spread in a seed",
                   "approximate methods better than every exact one", "inside the band", "worse than every exact one"],
                  table, "Noise floor: the exact methods (the same softmax attention through different kernels) at "
                  "each task's longest length, means over seeds. Their spread is what training noise alone does to "
                  "the metric at this budget: a difference between two methods smaller than it is not evidence.")]


def _length_panels(rows: pd.DataFrame) -> list[plots.QualityPanel]:
    panels = []
    for task, mine in rows.groupby("task"):
        series = []
        for label, runs in mine.groupby("label"):
            ok = runs[runs["status"] == "ok"]
            stats = ok.groupby("x")["value"].agg(["mean", "min", "max"]).sort_index()
            failed_x = sorted(set(runs.loc[runs["status"] != "ok", "x"]) - set(stats.index))
            failed = [(x, runs[(runs["x"] == x) & (runs["status"] != "ok")]["status"].iloc[0]) for x in failed_x]
            series.append(plots.Series(label, stats.index.to_numpy(), stats["mean"].to_numpy(),
                                       stats["min"].to_numpy(), stats["max"].to_numpy(), failed))
        panels.append(plots.QualityPanel(f"{task} · {mine['pattern'].iloc[0]}", mine["metric"].iloc[0], series,
                                         _direction(mine)))
    return panels


def _needle_maps(rows: pd.DataFrame) -> tuple[list, list[str], list[str]] | None:
    needle = rows[(rows["task"] == "niah") & (rows["status"] == "ok") & rows["breakdown"].notna()]
    if needle.empty:
        return None
    cells: dict[str, dict[tuple[str, float], list[float]]] = {}
    depths: set[str] = set()
    for label, x, text in zip(needle["label"], needle["x"], needle["breakdown"]):
        for depth, value in json.loads(text).items():
            depths.add(depth)
            cells.setdefault(label, {}).setdefault((depth, x), []).append(float(value))
    depth_labels = sorted(depths, key=lambda d: float(d.split("=")[-1]))
    lengths = sorted(set(needle["x"]))
    maps = []
    for label in sorted(cells):
        grid = np.full((len(depth_labels), len(lengths)), np.nan)
        for (depth, x), values in cells[label].items():
            grid[depth_labels.index(depth), lengths.index(x)] = float(np.mean(values))
        maps.append((label, grid))
    return maps, depth_labels, [plots.tokens(x) for x in lengths]


def section_quality(ctx: Context) -> Section | None:
    rows = quality_rows(ctx)
    if rows.empty:
        return None
    section = Section("quality", "Task quality")
    trained = rows[rows["kind"] == "train"]
    probes = rows[rows["kind"] == "probe"]
    section.blocks.append(Text(
        "Small models trained from scratch on generated tasks (attnbench train), one per method, task, length and "
        "seed; the metric is measured on held-out or freshly drawn examples that are the same for every method of "
        "a seed. Per CAB pattern: a method × task table, each cell the mean over lengths and seeds, with the "
        "method's rank on the task among those whose every run finished ok (#1 = best); failed runs show their "
        "status (hover for the reason). ↑: higher is better, ↓: lower is better."))
    for pattern in PATTERNS:
        mine = trained[trained["pattern"] == pattern]
        if mine.empty:
            continue
        mine, none_ran = split_unsupported(mine)
        lengths = ", ".join(plots.tokens(x) for x in sorted(set(mine["x"])))
        seeds = mine["seed"].nunique()
        caption = f"{pattern}: lengths {lengths}; {seeds} seed(s)." + unsupported_note(none_ran)
        if mine.empty:
            section.blocks.append(Text(caption))
            continue
        header, table, _ = rank_table(mine)
        section.blocks.append(Table(header, table, caption))
    if len(trained):
        setup = setup_table(trained)
        if setup is not None:
            section.blocks.append(setup)
        section.blocks.extend(_noise_floor_block(trained))
        panels = _length_panels(trained)
        for start in range(0, len(panels), 6):
            section.blocks.append(plot(
                f"quality-length-{start}", "task metric against length",
                "Mean over seeds (band: min to max); x: a failed run, with its status.",
                plots.quality_lines, "Task metric against length", panels[start:start + 6],
                plots.Palette(rows["label"])))
    needle = _needle_maps(trained) if len(trained) else None
    if needle:
        maps, depth_labels, length_labels = needle
        section.blocks.append(plot("needle-maps", "needle accuracy by depth and length",
                                   "Exact-match accuracy of the needle's value by insertion depth (rows) and length "
                                   "(columns), mean over seeds.", plots.grid_maps,
                                   "Needle in a haystack: accuracy by depth × length", maps, depth_labels,
                                   length_labels, "exact match"))
    speed = trained[(trained["status"] == "ok") & np.isfinite(trained["tokens_per_s"])]
    if len(speed):
        table = []
        for (task, x), group in speed.groupby(["task", "x"]):
            means = group.groupby("label")[["value", "tokens_per_s"]].mean()
            higher = _direction(group)
            front = pareto_front(-means["tokens_per_s"], means["value"], higher_is_better=higher)
            for (label, row), on in zip(means.iterrows(), front):
                table.append([task, plots.tokens(x), label, fmt(row["value"]), fmt(row["tokens_per_s"]),
                              "yes" if on else ""])
        section.blocks.append(Table(["task", "length", "method", "metric (mean)", "training tokens/s", "on front"],
                                    table, "Quality against training throughput of the task model (the same model "
                                    "for every method): on the front, no other method is both faster and better."
                                    + shared_device_note(speed), collapsed=True))
    if len(trained):
        section.blocks.extend(option_blocks(trained))
        section.blocks.extend(_kernel_pareto_blocks(trained, ctx.kernel))
    if len(probes):
        table = []
        for row in probes.sort_values(["task", "x", "label", "seed"]).itertuples():
            shown = fmt(row.value) if row.status == "ok" else Cell(row.status, row.status, row.reason or None)
            breakdown = ""
            if row.status == "ok":
                shown_groups = {}
                for text in (row.breakdown, row.extras):
                    if isinstance(text, str) and text:
                        shown_groups.update(json.loads(text))
                share = shown_groups.get("attended_share")
                if isinstance(share, (int, float)) and share >= DENSE_SHARE and not bool(getattr(row, "exact", False)):
                    shown = Cell(f"{fmt(row.value)} (dense here)", None,
                                 f"the method attended {share:.1%} of the visible pairs at this length: its score "
                                 "is exact attention's, not a measure of its sparsity")
                breakdown = ", ".join(f"{k} {fmt(v)}" for k, v in shown_groups.items()
                                      if isinstance(v, (int, float)) and not isinstance(v, bool))
            table.append([row.task, plots.tokens(row.x), row.label, row.metric, shown, breakdown])
        section.blocks.append(Table(["probe", "length", "method", "metric", "value", "by group / secondary"], table,
                                    "Training-free probes of the attention call alone (no model). attended_share: "
                                    "the share of the visible pairs the method attended, where it counts them; "
                                    "'dense here': an approximate method that attended (nearly) every pair at this "
                                    "length, so its score says nothing of its sparsity."))
    section.blocks.extend(experiment_blocks(rows[rows["kind"] == "experiment"]))
    return section


# the kernel case a task's quality is joined to (see ``kernel_join``)
JOIN_MODE = "fwd_bwd"
JOIN_MASK = {"causal_self": "causal", "causal_cross": "causal", "noncausal_self": "full", "noncausal_cross": "full"}


def kernel_join(rows: pd.DataFrame, kernel: pd.DataFrame) -> list[dict]:
    """Per trained task: each method's task metric beside the same method's kernel time, and the Pareto front.

    The kernel case joined (documented in the report): the same method name, mode ``fwd_bwd`` (training runs
    forward and backward), the mask of the task's pattern (``causal`` for causal_self and causal_cross, ``full``
    for the noncausal patterns), status ok, one device, no context-parallel layout. Among the kernel runs, head
    shapes and key/value lengths, the (source, shape, length) at which the most of the task's methods have such a
    row is used; ties go to a length the task itself ran at (``seq_kv``), then to the longer length, then to the
    first source and shape by name. (A method measured only at other lengths - a 2-D method at square lengths,
    one whose backward failed the gate at some lengths - gets a note, and does not take the join from the rest.)
    The metric is each method's mean over seeds at the task's longest length (ok runs only). Methods without such a kernel row are listed with why.
    Returns one dict per task: task, pattern, metric, higher, length, mask, shape, source, ref_len and points
    (label, method, value, ms or NaN, note, on_front).
    """
    joins = []
    if kernel is None or kernel.empty:
        return joins
    ok_kernel = kernel[(kernel["status"] == "ok") & np.isfinite(kernel["ms_median"].astype(float))
                       & (kernel["mode"] == JOIN_MODE)]
    trained = rows[(rows["kind"] == "train") & (rows["status"] == "ok") & np.isfinite(rows["value"])]
    for task, mine in trained.groupby("task"):
        pattern = str(mine["pattern"].iloc[0])
        mask = JOIN_MASK.get(pattern)
        seq_kv = pd.to_numeric(mine["seq_kv"], errors="coerce").astype(float)
        longest = mine["x"].max()
        at = mine[mine["x"] == longest]
        metric_mean = at.groupby(["label", "method"])["value"].mean()
        methods = set(at["method"])
        candidates = ok_kernel[(ok_kernel["mask"] == mask) & ok_kernel["method"].isin(methods)]
        if candidates.empty:
            continue
        own_lengths = set(seq_kv.dropna())
        best, best_key = None, None
        for (source, shape), group in sorted(candidates.groupby(["source", "shape"]), key=lambda item: item[0]):
            for length, at_length in group.groupby("x"):
                key = (at_length["method"].nunique(), length in own_lengths, float(length))
                if best_key is None or key > best_key:  # strictly better: ties keep the first source by name
                    best, best_key = (source, shape, length, group), key
        if best is None:
            continue
        source, shape, ref_len, group = best
        times = group[group["x"] == ref_len].groupby("method")["ms_median"].median()
        points = []
        for (label, method), value in metric_mean.items():
            ms = float(times.get(method, np.nan))
            note = "" if np.isfinite(ms) else f"no ok {JOIN_MODE} {mask} kernel row at this shape and length"
            points.append({"label": label, "method": method, "value": float(value), "ms": ms, "note": note,
                           "on_front": False})
        timed = [p for p in points if np.isfinite(p["ms"])]
        if timed:
            higher = _direction(mine)
            front = pareto_front([p["ms"] for p in timed], [p["value"] for p in timed], higher_is_better=higher)
            for p, on in zip(timed, front):
                p["on_front"] = bool(on)
        joins.append({"task": task, "pattern": pattern, "metric": str(mine["metric"].iloc[0]),
                      "higher": _direction(mine), "length": longest, "mask": mask, "shape": shape,
                      "source": source, "ref_len": ref_len, "points": points})
    return joins


def _kernel_pareto_blocks(rows: pd.DataFrame, kernel: pd.DataFrame) -> list:
    joins = kernel_join(rows, kernel)
    if not joins:
        return []
    blocks = [Text(
        "Task quality against kernel speed: per task, each method's metric (mean over seeds at the task's longest "
        "length) against the same method's time per call in the kernel rows of these runs: mode fwd_bwd, the "
        "mask of the task's pattern (causal for the causal patterns, full for the noncausal ones), at the kernel "
        "run, head shape and key/value length where the most of the task's methods have an ok row (ties: a length "
        "the task ran at, then the longer one); a method without a row there is listed with a note. Dashed: the "
        "Pareto front (no other method is both faster and better on the task).")]
    panels, table = [], []
    palette = plots.Palette(rows["label"])
    for join in joins:
        timed = [p for p in join["points"] if np.isfinite(p["ms"])]
        front = np.array(sorted((p["ms"], p["value"]) for p in timed if p["on_front"])).reshape(-1, 2)
        arrow = "higher" if join["higher"] else "lower"
        panels.append(plots.ParetoPanel(
            f"{join['task']} · {join['pattern']} · {plots.tokens(join['length'])}\nkernel: {join['mask']} · "
            f"{JOIN_MODE} · {plots.tokens(join['ref_len'])}" + (f" · {join['source']}" if join["source"] else ""),
            f"{join['metric']} ({arrow} is better)",
            [plots.Points(p["label"], np.array([p["ms"]]), np.array([p["value"]])) for p in timed], front,
            log_y=False, label_front=True))  # a bounded metric: linear y; the front named on the axis
        for p in join["points"]:
            table.append([join["task"], plots.tokens(join["length"]), p["label"], fmt(p["value"]),
                          f"{join['mask']} · {JOIN_MODE} · {join['shape']} · {plots.tokens(join['ref_len'])}"
                          + (f" · {join['source']}" if join["source"] else ""),
                          fmt(p["ms"]) if np.isfinite(p["ms"]) else Cell("no kernel row", None, p["note"]),
                          "yes" if p["on_front"] else ""])
    for start in range(0, len(panels), 3):
        blocks.append(plot(f"quality-kernel-pareto-{start}", "task metric against kernel time per call",
                           "Dashed: the Pareto front (nothing is both faster and better on the task).",
                           plots.pareto, "Task quality against kernel time per call", panels[start:start + 3],
                           palette))
    blocks.append(Table(["task", "length", "method", "metric (mean)", "kernel case", "time (ms)", "on front"],
                        table, "Task quality beside the same method's kernel time per call."))
    return blocks
