import os

import pytest

# Keep the suite predictable on small CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_xdist_auto_num_workers(config):
    """Workers for ``-n auto`` (pyproject's addopts): one per core, at most 8.

    Most of the suite's time is single-threaded Python (ONNX export, nvcc,
    subprocess CLI runs), so two workers on CI's 2 cores take about 0.67x the
    wall time of one (a fresh clone: 513 against 769 s). ``--dist loadfile`` keeps each file on one worker: its
    module fixtures (the shared dynamic export, the CUDA build) run once.
    ``pytest -n 0`` runs everything in this process."""
    return max(1, min(8, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolate_cache(tmp_path_factory, monkeypatch):
    """Generated datasets and hub models go to per-session caches, never to the user's home."""
    cache = tmp_path_factory.getbasetemp() / "ddetr-cache"
    monkeypatch.setenv("DDETR_CACHE", str(cache))
    # no test touches the network: an empty hub cache, offline (tests that need hub
    # models build a cache of their own, see hub_cache.py)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.getbasetemp() / "hf-empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def one_thread():
    """One intra-op thread: robust timing on a shared 2-core CI machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
