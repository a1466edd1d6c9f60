import os

import pytest

# Keep the suite predictable on small CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _isolate_cache(tmp_path_factory, monkeypatch):
    """Generated datasets go to a per-session cache, never to the user's home."""
    cache = tmp_path_factory.getbasetemp() / "ddetr-cache"
    monkeypatch.setenv("DDETR_CACHE", str(cache))
