"""The Triton interpreter's switch for the kernel test files: their kernel tests (``@interp``) run only with
TRITON_INTERPRET=1, i.e. in the one child pytest of tests/test_triton_interpreter.py, and skip in the parent run."""
from __future__ import annotations

import os

import pytest

INTERPRETING = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")
interp = pytest.mark.skipif(not INTERPRETING, reason="runs in the child pytest of tests/test_triton_interpreter.py")
