"""tests/conftest.py's scheduling of the suite: slow tests first, and one CPU share per pytest-xdist worker."""
from __future__ import annotations

import os

import pytest

import conftest


class _Item:
    def __init__(self, name, slow=False, benchmark=False):
        self.name, self.slow, self.markers = name, slow, []
        self.fixturenames = ("benchmark",) if benchmark else ()

    def get_closest_marker(self, name):
        return object() if name == "slow" and self.slow else None

    def add_marker(self, marker):
        self.markers.append(marker)


class _Config:
    def getoption(self, name):
        return {"benchmark_enable": False, "benchmark_disable": True}[name]


def test_slow_tests_run_first_in_collection_order_and_benchmarks_skip():
    items = [_Item("a"), _Item("b", slow=True), _Item("c", benchmark=True), _Item("d", slow=True), _Item("e")]
    conftest.pytest_collection_modifyitems(_Config(), items)
    assert [i.name for i in items] == ["b", "d", "a", "c", "e"]
    assert [i.name for i in items if i.markers] == ["c"]


def test_the_thread_share_of_an_xdist_worker(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    assert conftest.xdist_thread_share() is None  # not under xdist: torch's own choice stays
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    for workers, share in (("2", 2), ("4", 1), ("8", 1), ("1", 4)):
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", workers)
        assert conftest.xdist_thread_share() == share


@pytest.mark.skipif(not os.environ.get("PYTEST_XDIST_WORKER"), reason="runs under pytest-xdist (make test)")
def test_this_worker_and_its_children_use_their_share():
    import torch

    share = conftest.xdist_thread_share()
    if conftest.CALLER_OMP_NUM_THREADS is None:
        assert os.environ["OMP_NUM_THREADS"] == str(share)  # what the processes this worker starts inherit
    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])
