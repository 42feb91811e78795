"""Fraction of peak and roofline, per device with a measured calibration."""
from __future__ import annotations

from attnbench.report import plots
from attnbench.report.context import MODE_ORDER, Context, calibration_of
from attnbench.report.formatting import fmt, shown
from attnbench.report.model import Cell, Section, Table, Text, plot


def section_peak(ctx: Context) -> Section:
    """Throughput as a fraction of the measured peak, and a roofline per calibrated device."""
    section = Section("peak", "Fraction of peak and roofline")
    kernel = ctx.kernel
    for run in ctx.runs:
        calibration = calibration_of(run.env)
        name = f"{run.device} (run {run.name})"
        if calibration is None:
            section.blocks.append(Text(
                f"{name}: no calibration recorded for this device; fraction of peak and roofline are not shown."))
            continue
        peak, bandwidth = calibration
        measured_at = shown((run.env.get("calibration") or {}).get("measured_at"))
        section.blocks.append(Text(
            f"{name}: measured bf16 matmul peak {fmt(peak)} TFLOP/s, copy bandwidth {fmt(bandwidth)} TB/s "
            f"(measured {measured_at}); ridge point {fmt(peak / bandwidth)} FLOP/byte."))
        ok = kernel[(kernel["run_dir"] == run.name) & (kernel["status"] == "ok") & (kernel["tflops"] > 0)]
        roof = ok[(ok["flops"] > 0) & (ok["bytes_moved"] > 0)]
        panels = []
        for mode in sorted(roof["mode"].unique(), key=lambda m: MODE_ORDER.get(m, 9)):
            in_mode = roof[roof["mode"] == mode]
            points = [plots.Points(label, (r["flops"] / r["bytes_moved"]).to_numpy(), r["tflops"].to_numpy())
                      for label, r in in_mode.groupby("label")]
            panels.append((mode, points))
        if panels:
            section.blocks.append(plot(
                f"roofline-{run.name}", f"roofline of {name}",
                "Each point is one measured case; the line is min(peak, intensity × bandwidth).",
                plots.roofline, f"Roofline: {run.device}", panels, ctx.palette, peak, bandwidth))
        if len(ok):
            table = []
            for (label, mode), r in ok.groupby(["label", "mode"]):
                best = r.loc[r["peak_fraction"].idxmax()]
                above = ((r["peak_fraction"] > 1) & r["is_exact"]).sum()
                check = Cell(f"{above} cases above the peak", "wrong") if above else \
                    ("" if r["is_exact"].all() else "approximate: attention-equivalent rate")
                table.append([label, mode, fmt(r["peak_fraction"].median(), 2), fmt(best["peak_fraction"], 2),
                              f"{best['mask']} at {plots.tokens(best['x'])}", check])
            section.blocks.append(Table(["method", "mode", "median fraction", "best fraction", "best at", "check"],
                                        table, f"Achieved TFLOP/s over the measured peak, {name}. An exact method "
                                        "above 1 means a wrong FLOP count or timing; check those rows."))
    return section
