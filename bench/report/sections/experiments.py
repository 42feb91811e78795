"""Blocks of the task-quality section for the analysis experiments (issue 14): the rows of kind ``experiment``
(``icl_linreg_1layer_mh``, ``mqar_state_sweep``, ``rf_attention_probe`` and any later one) with their checks, one
compact table per known experiment for the numbers its row stores in ``breakdown`` / ``extras``, and the trained
rows run with host-model options (``hybrid_schedule``, ``qk_source``, ``readout``, ``qk_dim``) against the plain
model of the same method: Deconstructing Attention's hybrid rescue."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd

from attnbench.report import plots
from attnbench.report.formatting import fmt
from attnbench.report.model import Cell, Table, Text, plot


def _json(text) -> dict:
    if isinstance(text, str) and text:
        try:
            value = json.loads(text)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}
    return {}


def options_label(text) -> str:
    """``model_options`` JSON -> ``key=value, ...`` (empty for the plain model)."""
    options = _json(text)
    return ", ".join(f"{k}={v}" for k, v in sorted(options.items()))


def _check(passed, number=None, digits=3) -> Cell | str:
    shown = fmt(number, digits) if isinstance(number, (int, float)) and not isinstance(number, bool) else ""
    if passed is None:
        return shown
    return Cell(f"{'✓' if passed else '✗'} {shown}".strip(), "ok" if passed else "wrong",
                "check passed" if passed else "check failed")


def _status(row) -> Cell:
    return Cell(str(row.status), str(row.status), row.reason or None)


def _by_n(keys) -> list[str]:
    return sorted(keys, key=lambda k: float(re.sub(r"[^0-9.]", "", k.split("=")[-1]) or 0))


# ---- per experiment --------------------------------------------------------------------------------------------
def _icl(rows: pd.DataFrame) -> Table | None:
    header = ["length", "method", "seed", "MSE (L)", "MSE (max)", "ridge MSE", "KQ off-diag", "OV last entry",
              "|Σμ|/Σ|μ|", "closed-form R²", "multi beats single", "degrades less than linear"]
    table = []
    for row in rows.sort_values(["x", "label", "seed"]).itertuples():
        if row.status != "ok":
            table.append([plots.tokens(row.x), row.label, int(row.seed), _status(row)] + [""] * (len(header) - 4))
            continue
        extras, breakdown = _json(row.extras), _json(row.breakdown)
        checks, mech = extras.get("checks", {}), extras.get("mechanism", {})
        factors = _by_n(breakdown)
        table.append([
            plots.tokens(row.x), row.label, int(row.seed), fmt(row.value),
            f"{fmt(breakdown[factors[-1]])} ({factors[-1].split('@')[-1]})" if factors else "",
            fmt(extras.get("ridge_mse")),
            _check(checks.get("kq_offdiag_ratio<0.05"), mech.get("kq_offdiag_ratio")),
            _check(checks.get("ov_last_entry_ratio<0.05"), mech.get("ov_last_entry_ratio")),
            _check(checks.get("zero_sum_ratio<0.05"), mech.get("zero_sum_ratio")),
            _check(checks.get("closed_form_r2>0.99"), mech.get("closed_form_r2"), 4),
            _check(checks.get("multihead_beats_single")),
            _check(checks.get("degrades_less_than_linear")),
        ])
    return Table(header, table, "icl_linreg_1layer_mh: the learned mechanism of one layer of H-head attention on "
                 "in-context linear regression. Targets: KQ x-block off-diagonal / diagonal < 0.05, OV last row "
                 "besides μ < 0.05, |Σμ|/Σ|μ| < 0.05 (μ summing to ~0), the closed-form debiased-GD predictor "
                 "reproducing the model with R² > 0.99; multi-head MSE below single-head; MSE growing less than "
                 "linear attention's from L to the longest test length. ✓/✗: the check passed/failed.")


def _mqar_state(rows: pd.DataFrame) -> Table | None:
    dims = set()
    for row in rows.itertuples():
        dims.update(_json(row.breakdown))
    dims = _by_n(dims)
    header = ["length", "method", "seed", *[f"acc {n}" for n in dims], "state/layer (largest n)",
              "more state not worse"]
    table = []
    for row in rows.sort_values(["x", "label", "seed"]).itertuples():
        breakdown, extras = _json(row.breakdown), _json(row.extras)
        cells = [fmt(breakdown.get(n)) for n in dims]
        state = extras.get("state", {}).get(dims[-1], {}) if dims else {}
        if row.status != "ok" and not any(cells):
            cells = [_status(row)] + [""] * (len(dims) - 1) if dims else []
        table.append([plots.tokens(row.x), row.label, int(row.seed), *cells, _state_cell(row, state),
                      _check(extras.get("checks", {}).get("accuracy_not_worse_with_more_state"))
                      if row.status == "ok" else _status(row)])
    return Table(header, table, "mqar_state_sweep (the DSF protocol): MQAR accuracy at each per-head Q/K width n "
                 "at fixed d_model. State per layer, in numbers per sequence: measured from the method's own "
                 "recurrent decode state (feature maps, normalisers, slots and expansions as they are); "
                 "heads·seq·(n + d_v) for softmax's KV cache (exact methods); '—' for a method that declares no "
                 "recurrent decode (no formula stands in for it).")


def _mqar_state_seeds(rows: pd.DataFrame) -> Table | None:
    """Per method and length over its seeds: the median accuracy at each width with its range. A state-sweep run
    either learns MQAR or stays near chance (H200, full float32: a delta rule's seeds at n = 32 gave 0.13, 0.97,
    0.98), so one seed does not rank methods; shown only when some method has more than one seed."""
    if rows.groupby(["x", "label"])["seed"].nunique().max() < 2:
        return None
    dims = set()
    for row in rows.itertuples():
        dims.update(_json(row.breakdown))
    dims = _by_n(dims)
    header = ["length", "method", "seeds ok", *[f"median acc {n} [min–max]" for n in dims]]
    table = []
    for (x, label), mine in rows.sort_values(["x", "label", "seed"]).groupby(["x", "label"], sort=False):
        ok = mine[mine["status"] == "ok"]
        line = [plots.tokens(x), label, Cell(f"{len(ok)}/{len(mine)}", "ok" if len(ok) == len(mine) else "wrong",
                                             ", ".join(sorted({str(s) for s in mine["status"] if s != "ok"})) or None)]
        for n in dims:
            values = [v for v in (_json(b).get(n) for b in ok["breakdown"]) if isinstance(v, (int, float))]
            line.append(f"{fmt(float(np.median(values)))} [{fmt(min(values))}–{fmt(max(values))}]" if values else "")
        table.append(line)
    return Table(header, table, "mqar_state_sweep over seeds: the median accuracy of the seeds that finished "
                 "(ok rows) at each width, with the lowest and highest seed; seeds ok counts rows with status ok "
                 "(diverged, timeout, ... as the tip says).")


def _state_cell(row, state: dict):
    """The state figure of a sweep row, and where it comes from. Rows written before the measured figure
    (``state_per_layer``) existed carry only the nominal heads·n·d_v, shown as such."""
    if "state_source" in state:
        source = state["state_source"]
        if state.get("state_per_layer") is None:
            return Cell("—", "unsupported", source)
        return f"{fmt(state['state_per_layer'])} ({'KV cache' if source == 'kv_cache' else 'measured'})"
    exact = getattr(row, "exact", False)
    exact = bool(exact) if isinstance(exact, (bool, np.bool_)) else False
    size = state.get("kv_cache_per_layer" if exact else "linear_state_per_layer")
    return f"{fmt(size)} ({'KV cache' if exact else 'nominal heads·n·d_v'})" if size is not None else ""


def _rf(rows: pd.DataFrame) -> Table | None:
    header = ["length", "method", "seed", "target", "model"]
    keys, lines = set(), []
    for row in rows.itertuples():
        keys.update(key.split("/")[-1] for key in _json(row.breakdown))
    ns = _by_n(keys)
    header += [f"MSE/Var {n}" for n in ns] + ["key-permutation invariant"]
    for row in rows.sort_values(["x", "label", "seed"]).itertuples():
        breakdown, extras = _json(row.breakdown), _json(row.extras)
        if row.status != "ok":
            lines.append([plots.tokens(row.x), row.label, int(row.seed), _status(row), ""] + [""] * (len(ns) + 1))
            continue
        checks = extras.get("checks", {})
        pairs = sorted({tuple(k.split("/")[:2]) for k in breakdown})
        for target, model in pairs:
            below = checks.get(f"rfa_below_rfmlp[{target}]") if model == "rfa" else None
            shown = model if below is None else Cell(f"rfa ({'✓' if below else '✗'} below rfmlp)",
                                                     "ok" if below else "wrong")
            line = [plots.tokens(row.x), row.label, int(row.seed), target, shown]
            line += [fmt(breakdown.get(f"{target}/{model}/{n}")) for n in ns]
            line.append(_check(checks.get("key_permutation_invariant"), extras.get("permutation_rel_err"))
                        if model == "rfa" else "")
            lines.append(line)
    return Table(header, lines, "rf_attention_probe: test MSE / Var(target) of ridge on frozen random-QK attention "
                 "features (rfa) and on random ReLU features of the same count (rfmlp), per number of training "
                 "samples n; quadratic and cubic targets are key-permutation invariant, control is not.")


def _sparse_gin(rows: pd.DataFrame) -> Table | None:
    header = ["length", "method", "seed", "held-out recall@1", "frozen model", "training pairs", "edges per layer·sentence",
              "self-loop share", "λ0 = frozen", "cross-token messages"]
    table = []
    for row in rows.sort_values(["x", "label", "seed"]).itertuples():
        if row.status != "ok":
            table.append([plots.tokens(row.x), row.label, int(row.seed), _status(row)] + [""] * (len(header) - 4))
            continue
        extras = _json(row.extras)
        checks = extras.get("checks", {})
        table.append([plots.tokens(row.x), row.label, int(row.seed), fmt(row.value), fmt(extras.get("frozen_recall")),
                      fmt(extras.get("train_recall")), fmt(extras.get("edges_per_layer_sentence")),
                      fmt(extras.get("self_loop_share")), _check(checks.get("lambda0_is_base")),
                      _check(checks.get("messages_cross_tokens"))])
    return Table(header, table, "sparse_gin_minilm: the Sparse-GIN adapter trained on a frozen all-MiniLM-L6-v2; "
                 "paraphrase recall@1 on the held-out pairs against the frozen model's. A self-loop share of 1 is the "
                 "released code's graph (no token mixing).")


SPECIFIC = {"icl_linreg_1layer_mh": _icl, "mqar_state_sweep": _mqar_state, "rf_attention_probe": _rf,
            "sparse_gin_minilm": _sparse_gin}


def experiment_blocks(rows: pd.DataFrame) -> list:
    """The experiment rows: a summary (value, checks passed) and a table per known experiment."""
    if rows.empty:
        return []
    blocks = [Text(
        "Experiments (kind experiment): each task builds, trains or fits its own small model around the method and "
        "checks a paper's claim; a failed check is a finding about the method (or the paper), not a harness error.")]
    summary = []
    for row in rows.sort_values(["task", "x", "label", "seed"]).itertuples():
        checks = _json(row.extras).get("checks", {})
        failed = [name for name, ok in checks.items() if not ok]
        value = fmt(row.value) if row.status == "ok" else _status(row)
        passed = (Cell(f"{len(checks) - len(failed)}/{len(checks)}", "ok" if not failed else "wrong",
                       ", ".join(failed) or None) if checks else "")
        summary.append([row.task, plots.tokens(row.x), row.label, int(row.seed), row.metric, value, passed,
                        ", ".join(failed)])
    blocks.append(Table(["experiment", "length", "method", "seed", "metric", "value", "checks passed", "failed"],
                        summary, "Experiment rows: the task's metric and how many of its checks passed."))
    for task, mine in rows.groupby("task"):
        build = SPECIFIC.get(task)
        if build is not None:
            table = build(mine)
            if table is not None and table.rows:
                blocks.append(table)
        if task == "mqar_state_sweep":
            seeds = _mqar_state_seeds(mine)
            if seeds is not None:
                blocks.append(seeds)
            blocks.extend(_mqar_state_plot(mine))
    return blocks


def _mqar_state_plot(rows: pd.DataFrame) -> list:
    """Accuracy against the state per layer (the DSF figure), one line per method and length, median over seeds;
    only rows with a state figure (measured, or the KV cache) are drawn — the table lists the others."""
    points: dict[str, dict[float, list[float]]] = {}
    for row in rows[rows["status"] == "ok"].itertuples():
        breakdown, states = _json(row.breakdown), _json(row.extras).get("state", {})
        label = row.label if rows["x"].nunique() == 1 else f"{row.label} @ {plots.tokens(row.x)}"
        for n, accuracy in breakdown.items():
            size = (states.get(n) or {}).get("state_per_layer")
            if isinstance(size, (int, float)) and size > 0 and accuracy is not None:
                points.setdefault(label, {}).setdefault(float(size), []).append(float(accuracy))
    if not points:
        return []
    series = [plots.Series(label, np.array(sorted(by_size)), np.array([np.median(by_size[x]) for x in sorted(by_size)]))
              for label, by_size in sorted(points.items())]
    return [plot("mqar-state-sweep", "MQAR accuracy against state size per layer",
                 "mqar_state_sweep: accuracy against the state one layer keeps per sequence (log scale): the "
                 "measured recurrent state of linear/recurrent methods, the KV cache of exact attention; one point "
                 "per Q/K width n, median over seeds (runs learn the task or stay near chance: a mean would sit between).",
                 plots.state_accuracy, "MQAR accuracy against state size", series, plots.Palette(points))]


# ---- host-model options against the plain model -------------------------------------------------------------------
def option_rows(trained: pd.DataFrame) -> list[list]:
    """Per (task, length, method, options): the metric with the options and the plain model's over the same seeds,
    and the change signed so that positive is better. One seed: its value. Several: the median with the seeds'
    range and how many finished, and the change between medians. A small model either learns a task like MQAR
    or stays near chance (H200, float32, three seeds: sdpa_efficient 0.967 / 0.091 / 0.976), so a mean would sit
    between the two and rank methods by how many seeds failed."""
    if "options" not in trained or not (trained["options"] != "").any():
        return []
    table = []
    keys = ["task", "x", "method", "run_dir"]
    for (task, x, method, run_dir), group in trained[trained["options"] != ""].groupby(keys):
        plain_all = trained[(trained["task"] == task) & (trained["x"] == x) & (trained["method"] == method)
                            & (trained["run_dir"] == run_dir) & (trained["options"] == "")]
        higher = bool(group["higher_is_better"].dropna().iloc[0]) if group["higher_is_better"].notna().any() else True
        for options, runs in group.groupby("options"):
            plain = plain_all[plain_all["seed"].isin(set(runs["seed"]))]
            base, base_cell = _over_seeds(plain, "no plain run")
            value, value_cell = _over_seeds(runs, "")
            change = (value - base) * (1 if higher else -1)
            table.append([task, plots.tokens(x), method, options, base_cell, value_cell,
                          (f"{'+' if change >= 0 else ''}{fmt(change)}" if np.isfinite(change) else "")])
    return table


def _over_seeds(runs: pd.DataFrame, empty: str):
    """(the median of the ok runs' values or nan, its cell): one run shows its value; several show
    ``median [min–max] (ok/total)``; none ok shows the failure's status with the reasons as the tip."""
    if runs.empty:
        return np.nan, empty
    good = runs[runs["status"] == "ok"]["value"].dropna().astype(float)
    failed = runs[runs["status"] != "ok"]
    if good.empty:
        status = failed["status"].iloc[0]
        label = status if len(runs) == 1 else f"{status} {len(failed)}/{len(runs)}"
        return np.nan, Cell(label, status, "; ".join(sorted(set(failed["reason"].dropna())))[:500] or None)
    median = float(np.median(good))
    if len(runs) == 1:
        return median, fmt(median)
    text = f"{fmt(median)} [{fmt(good.min())}–{fmt(good.max())}] ({len(good)}/{len(runs)})"
    if failed.empty:
        return median, text
    return median, Cell(text, "wrong", "; ".join(f"seed {int(r.seed)}: {r.status}" for r in failed.itertuples()))


def option_blocks(trained: pd.DataFrame) -> list:
    table = option_rows(trained)
    if not table:
        return []
    declared = trained["exact"].fillna(False).astype(bool) if "exact" in trained else False
    exact = trained[(trained["options"] == "") & (trained["status"] == "ok") & declared]
    lines = []
    for (task, x), group in exact.groupby(["task", "x"]):
        best = group.groupby("method")["value"].median()
        lines.append(f"{task} at {plots.tokens(x)}: " + ", ".join(f"{m} {fmt(v)}" for m, v in best.items()))
    reference = (" Exact attention on the plain model, for reference: " + "; ".join(lines) + ".") if lines else ""
    return [Table(["task", "length", "method", "model options", "plain model", "with options", "change (+ = better)"],
                  table, "Host-model options against the plain model of the same method and seeds (same run); with "
                  "several seeds each cell is the median of the runs that finished, [lowest–highest], (ok/all), and "
                  "the change is between medians: "
                  "hybrid_schedule keeps standard attention in the listed layers (Deconstructing Attention's hybrid "
                  "rescue: does it recover what the method alone loses?); qk_source replaces Q and K by a fixed map; "
                  "readout changes the classification readout." + reference)]
