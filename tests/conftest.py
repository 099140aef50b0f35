"""Suite-wide settings: tests start from nothing cached between them."""
import pytest


@pytest.fixture(autouse=True)
def _no_zero_shot_cache(monkeypatch):
    """Every test scores zero-shot itself (tests of the cache turn it on with their own cache folder)."""
    monkeypatch.setenv("DELTATUNE_ZERO_SHOT_CACHE", "0")
