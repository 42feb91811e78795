"""Environment: what produced each run (command, hardware, clocks, calibration, versions, configuration)."""
from __future__ import annotations

import pandas as pd

from attnbench.report.context import Context
from attnbench.report.formatting import NOT_RECORDED, fmt, shown
from attnbench.report.model import Code, Section, Table, Text


def section_environment(ctx: Context) -> Section:
    """What produced each run: command, hardware, clocks, calibration, software versions, configuration."""
    section = Section("environment", "Environment and command")
    for run in ctx.runs:
        env = run.env
        gpus = [g for g in env.get("gpus") or [] if isinstance(g, dict)]
        calibration = env.get("calibration") if isinstance(env.get("calibration"), dict) else None
        git = shown(env.get("git_sha"))
        if env.get("git_dirty"):
            git += " (uncommitted changes)"
        clocks = []
        for column, unit in (("sm_clock_mhz", "MHz SM clock"), ("power_w", "W"), ("temp_c", "°C")):
            values = pd.to_numeric(run.rows[column], errors="coerce").dropna()
            if len(values):
                clocks.append(f"{fmt(values.median())} {unit}")
        fields = [
            ("run", run.name), ("device", run.device), ("host", shown(env.get("host"))),
            ("started", shown(env.get("started_at"))), ("finished", shown(env.get("finished_at"))),
            ("driver", shown(env.get("driver"))), ("CUDA", shown(env.get("cuda"))), ("cuDNN", shown(env.get("cudnn"))),
            ("torch", shown(env.get("torch"))), ("triton", shown(env.get("triton"))),
            ("python", shown(env.get("python"))), ("git SHA", git),
            ("calibration", f"bf16 matmul {fmt(calibration.get('matmul_bf16_tflops'))} TFLOP/s, copy "
                            f"{fmt(calibration.get('copy_tbps'))} TB/s, "
                            f"measured {shown(calibration.get('measured_at'))}" if calibration else NOT_RECORDED),
            ("clocks while timing (median)", ", ".join(clocks) or NOT_RECORDED),
        ]
        section.blocks.append(Table(["field", run.name], [[k, v] for k, v in fields], f"Environment of {run.name}."))
        if gpus:
            section.blocks.append(Table(
                ["GPU", "name", "memory (MiB)", "max SM clock (MHz)", "max memory clock (MHz)", "power limit (W)"],
                [[str(i), shown(g.get("name")), shown(g.get("memory_mb")), shown(g.get("sm_clock_max_mhz")),
                  shown(g.get("mem_clock_max_mhz")), shown(g.get("power_limit_w"))] for i, g in enumerate(gpus)],
                f"GPUs of {run.name}."))
        else:
            section.blocks.append(Text(f"GPUs of {run.name}: {NOT_RECORDED}."))
        section.blocks.append(Text(f"Command that produced {run.name}:"))
        section.blocks.append(Code(shown(env.get("command"))))
        if run.config:
            section.blocks.append(Table(["key", "value"], [[k, shown(v)] for k, v in run.config.items()],
                                        f"Resolved configuration of {run.name} (config.yaml).", collapsed=True))
        else:
            section.blocks.append(Text(f"Configuration of {run.name}: {NOT_RECORDED}."))
        packages = env.get("packages") if isinstance(env.get("packages"), dict) else {}
        if packages:
            section.blocks.append(Table(["package", "version"], [[k, shown(v)] for k, v in sorted(packages.items())],
                                        f"Packages of {run.name}.", collapsed=True))
    return section
