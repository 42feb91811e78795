"""The Triton kernels' CPU suites (tests/test_linear_triton.py, tests/test_simple_gla_triton.py,
tests/test_delta_triton.py, tests/test_tril_triton.py,
tests/test_wy_triton.py, tests/test_superlinear_search_triton.py), run in one child pytest with TRITON_INTERPRET=1.

TRITON_INTERPRET=1 must be set before triton is first imported (triton decorates its own library functions,
``tl.sum`` among them, in the mode it finds at import), and setting it in the pytest process would switch every
later test (the GPU ones included) to the interpreter. So, unless pytest itself was started with
TRITON_INTERPRET=1, those files' tests skip here and run in one child pytest (one interpreter start-up, torch's and
triton's imports, for all files); this test fails with the child's report when any test there fails, or when a
file ran no test at all.
"""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent
SUITES = ("test_linear_triton.py", "test_simple_gla_triton.py", "test_delta_triton.py", "test_tril_triton.py",
          "test_wy_triton.py", "test_superlinear_search_triton.py", "test_probsparse_triton.py")
from interpmark import INTERPRETING  # noqa: E402


@pytest.mark.slow  # ~1.5-2 min: the six suites in one child
@pytest.mark.skipif(INTERPRETING, reason="pytest runs under the interpreter already: the suites' tests run as they are")
def test_interpreter_suites(tmp_path):
    report = tmp_path / "junit.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
           *(str(HERE / name) for name in SUITES)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    passed = {name: 0 for name in SUITES}
    for case in ET.parse(report).iter("testcase"):
        if case.find("failure") is None and case.find("error") is None and case.find("skipped") is None:
            name = case.get("classname", "").rsplit(".", 1)[-1] + ".py"
            passed[name] = passed.get(name, 0) + 1
    # each file ran its tests in the child (a file whose tests all skipped there would pass unseen otherwise)
    assert all(passed[name] >= 10 for name in SUITES), (passed, done.stdout[-2000:])
