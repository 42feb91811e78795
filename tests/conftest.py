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


CALLER_OMP_NUM_THREADS = os.environ.get("OMP_NUM_THREADS")  # kept when set


def xdist_thread_share() -> int | None:
    """CPU threads per pytest-xdist worker (the CPUs this process may use over the number of workers, at least
    one), or None outside xdist."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if not os.environ.get("PYTEST_XDIST_WORKER") or workers < 1:
        return None
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, cpus // workers)


def pytest_configure(config):
    """Under pytest-xdist, each worker and every process it starts (sweep workers, CLI runs, the Triton
    interpreter's child pytest) gets its share of the CPUs: torch's intra-op threads and OMP_NUM_THREADS
    (inherited; one set by the caller is kept). Otherwise each of them starts a thread per core, and on CI's
    2 cores with 2 workers the spinning OpenMP threads contend: test_masks.py, test_masks_semantics.py,
    test_memory_scaling.py and test_sparse_methods.py took 41.6 s (73.5 s of CPU) at -n 2, 23.3 s (41.5 s)
    with one thread each. Without xdist nothing changes."""
    threads = xdist_thread_share()
    if threads is None:
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

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
    """Tests marked ``slow`` run first (otherwise in collection order), and every test that uses the
    ``benchmark`` fixture is skipped unless benchmarks are enabled: timings are read, never asserted, and never
    gate CI (run them with ``--benchmark-enable``).

    Slow first: pytest-xdist's worksteal hands each worker a contiguous half of the collection and an idle worker
    takes queued tests from the end of another's; a long test late in the collection (the Triton interpreter
    suites, ~2 min) started last and ran alone while the other worker idled. First, it runs beside the short ones
    (longest first: the usual rule for spreading jobs over workers)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: the order otherwise kept
    if benchmarks_enabled(config):
        return
    skip = pytest.mark.skip(reason="benchmark: run with --benchmark-enable")
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
