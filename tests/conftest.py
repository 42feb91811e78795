"""Shared fixtures: a small CPU sweep config and the faulty-method plugin; benchmarks off by default."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
FAULTY = str(TESTS / "plugins" / "faulty_methods.py")

@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test (tests that train or run many small ops): on a shared 2-core box two
    threads contend and run ~5x slower. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


os.environ.setdefault("ATTNBENCH_CACHE", str(TESTS.parent / ".pytest_cache" / "attnbench"))

BASE = {
    "methods": ["reference", "sdpa_math"],
    "masks": ["full", "causal"],
    "seq_lens": [32],
    "cross_lens": [],
    "batch": 1,
    "tokens": None,
    "heads_q": 2,
    "heads_kv": None,
    "head_dim": 16,
    "dtype": "float32",
    "modes": ["fwd"],
    "decode_queries": 1,
    "seed": 0,
    "device": "cpu",
    "plugins": [],
    "case_timeout_s": 120,
    "timing": {"budget_ms": 2, "warmup_ms": 0, "min_reps": 2, "max_reps": 3},
}


@pytest.fixture
def cfg(tmp_path):
    """A fresh, small, valid sweep config writing under tmp_path."""
    config = copy.deepcopy(BASE)
    config["results_dir"] = str(tmp_path / "results")
    config["run_id"] = "test"
    return config


@pytest.fixture
def faulty():
    return FAULTY


def benchmarks_enabled(config) -> bool:
    """True when pytest-benchmark is installed and asked to time (``--benchmark-enable``, or no
    ``--benchmark-disable``; pyproject's addopts disables it)."""
    try:
        return bool(config.getoption("benchmark_enable")) or not config.getoption("benchmark_disable")
    except ValueError:  # pytest-benchmark not installed: its options do not exist
        return False


def pytest_collection_modifyitems(config, items):
    """Skip every test that uses the ``benchmark`` fixture unless benchmarks are enabled: timings are read,
    never asserted, and never gate CI (run them with ``--benchmark-enable``)."""
    if benchmarks_enabled(config):
        return
    skip = pytest.mark.skip(reason="benchmark: run with --benchmark-enable")
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
