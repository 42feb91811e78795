"""``attnbench``: sweeps through Hydra, and subcommands for everything else.

    attnbench [sweep=NAME] [key=value ...]      run a sweep (Hydra overrides; -m for multirun)
    attnbench list methods|masks|tasks          every method (available or not, and why), mask or task
    attnbench train [suite=NAME] [key=value ...] train small models on quality tasks (conf/train.yaml)
    attnbench report RUN [RUN ...]              report.md + report.html in the run folder
    attnbench compare BASE NEW                  per-case ratios, regressions beyond spread + threshold
    attnbench runs                              runs with date, device and case counts by status
    attnbench merge INTO FROM [FROM ...]        fold run folders written apart (device calls, nodes) into one
    attnbench masks list|show|time ...          mask catalogue, pictures, build times
    attnbench selfcheck                         the harness's timer against triton.testing.do_bench
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from attnbench import conf as _conf

CONF_DIR = Path(_conf.__file__).resolve().parent  # shipped as package data: works installed and editable


def _gpu_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def cmd_list(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="attnbench list", description="list registered methods, masks or tasks")
    parser.add_argument("what", choices=["methods", "masks", "tasks"])
    parser.add_argument("--plugins", nargs="*", default=[], help="modules or .py files to load first")
    args = parser.parse_args(argv)
    from attnbench.config.plugins import load_plugins

    load_plugins(args.plugins)
    if args.what == "tasks":
        from attnbench.tasks import TASKS

        print(f"{'task':16s} {'pattern':16s} {'metric':10s} {'kind':6s} {'available':10s} description / why unavailable")
        for name in sorted(TASKS):
            spec = TASKS[name]
            ok, why = spec.availability()
            cls = spec.cls
            print(f"{name:16s} {cls.pattern:16s} {cls.metric:10s} {cls.kind:6s} {'yes' if ok else 'no':10s} "
                  f"{spec.description if ok else why}")
        return 0
    if args.what == "masks":
        from attnbench.masks import MASKS

        for name in sorted(MASKS):
            cls = MASKS[name]
            kind = "causal" if cls.causal else "noncausal"
            print(f"{name:24s} {kind:10s} {cls.description or (cls.__doc__ or '').strip().splitlines()[0]}")
        return 0
    from attnbench.methods import METHODS

    print(f"{'method':16s} {'family':8s} {'available':10s} {'masks':28s} description / why unavailable")
    for name in sorted(METHODS):
        spec = METHODS[name]
        ok, why = spec.availability()
        caps = spec.caps
        mask_text = ",".join(sorted(caps.masks)) or "-"
        if caps.dense_mask:
            mask_text += " +dense"
        if caps.varlen:
            mask_text += " +varlen"
        print(f"{name:16s} {caps.family:8s} {'yes' if ok else 'no':10s} {mask_text:28s} {spec.description if ok else why}")
    return 0


def _subcommands():
    def lazy(module: str):
        def run(argv):
            import importlib

            return importlib.import_module(module).main(argv)

        return run

    return {
        "list": cmd_list,
        "train": train_main,
        "report": lazy("attnbench.report.document"),
        "compare": lazy("attnbench.report.compare"),
        "runs": lazy("attnbench.record.runs"),
        "merge": lazy("attnbench.record.merge"),
        "masks": lazy("attnbench.masks.cli"),
        "selfcheck": lazy("attnbench.measure.selfcheck"),
    }


def train_main(argv: list[str]) -> int:
    """``attnbench train [suite=NAME] [key=value ...]``: compose conf/train.yaml with Hydra's override grammar,
    then train and evaluate every case (``attnbench.execute.train``)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from attnbench.config.plan import ConfigError
    from attnbench.config.plugins import PluginError

    if any(a in ("-h", "--help") for a in argv):
        print(train_main.__doc__)
        print((CONF_DIR / "train.yaml").read_text())
        return 0
    if not any(a.split("=", 1)[0].lstrip("+~") == "suite" for a in argv):
        argv = [f"suite={'tasks_gpu' if _gpu_present() else 'tasks_cpu'}", *argv]
    command = "attnbench train " + " ".join(shlex.quote(a) for a in argv)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="attnbench_train"):
            cfg = compose(config_name="train", overrides=argv)
    except HydraException as exc:
        print(f"attnbench train: {exc}", file=sys.stderr)
        return 2
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    from attnbench.execute.train import run_train, summary_lines

    try:
        run_dir = run_train(plain, command)
    except (ConfigError, PluginError) as exc:
        print(f"attnbench train: {exc}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(run_dir)))
    print(f"wrote {run_dir / 'quality.parquet'}")
    return 0


def sweep_main(argv: list[str]) -> int:
    """Run Hydra with ``argv`` as its overrides (sweep=gpu is added when a GPU is visible and none is given)."""
    import hydra
    from omegaconf import OmegaConf

    from attnbench.config.plan import ConfigError
    from attnbench.config.plugins import PluginError

    if not any(a.split("=", 1)[0].lstrip("+~") == "sweep" for a in argv):
        argv = [f"sweep={'gpu' if _gpu_present() else 'smoke'}", *argv]
    command = "attnbench " + " ".join(shlex.quote(a) for a in argv)
    outcome = {"code": 0, "runs": []}

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def task(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        from attnbench.execute.runner import SweepInterrupted, run_sweep
        from attnbench.report.summary import print_summary

        if outcome.get("interrupted"):  # Ctrl-C / SIGTERM ends a multirun too: no later job starts
            return
        plain = OmegaConf.to_container(cfg, resolve=True)
        job_command = command
        hydra_cfg = HydraConfig.get()
        if str(hydra_cfg.mode) == "RunMode.MULTIRUN":
            job_command = "attnbench " + " ".join(shlex.quote(a) for a in hydra_cfg.overrides.task)
            if not plain.get("run_id"):
                from attnbench.execute.runner import default_run_id

                plain["run_id"] = f"{default_run_id()}-job{hydra_cfg.job.num}"
        from attnbench.cp.cluster import discover, run_external  # CP hook: ranks started by srun / torchrun

        ranks = discover()
        try:
            run_dir = run_external(plain, job_command, ranks) if ranks else run_sweep(plain, job_command)
        except (ConfigError, PluginError) as exc:
            print(f"attnbench: {exc}", file=sys.stderr)
            outcome["code"] = 2
            return
        except SweepInterrupted as exc:
            print(f"attnbench: {exc}", file=sys.stderr)
            outcome["code"] = exc.exit_code
            outcome["interrupted"] = True
            return
        if ranks and ranks.rank != 0:
            return
        outcome["runs"].append(run_dir)
        print_summary(run_dir)

    saved = sys.argv
    sys.argv = [saved[0], *argv]
    try:
        task()
    finally:
        sys.argv = saved
    return outcome["code"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        from attnbench.config.schema import describe_fields

        print("Sweep keys (conf/config.yaml and conf/sweep/*.yaml), with their defaults:")
        print(describe_fields())
        return 0
    commands = _subcommands()
    if argv and argv[0] in commands:
        return int(commands[argv[0]](argv[1:]) or 0)
    return sweep_main(argv)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
