"""Load a file of ``scripts/`` by its path (``scripts/`` is no package): the tests of the summaries, of the
device-call ingestion and of the memory tools import the scripts they test this way."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """``scripts/NAME.py`` as a fresh module (executed on each call)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
