"""Shared test setup.

Tests use their own cache, kept between runs on one machine so that the `tiny` model and the default
model's float copy are built once; tests that check caching itself use a temporary Store.
"""
import os
from pathlib import Path

os.environ.setdefault("QKIT_CACHE", str(Path(__file__).resolve().parent / ".qkit-cache" / "test"))
# No test may reach a model hub, even by accident.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """The built-in tiny model, loaded once for the whole run."""
    from qkit.models import resolve_model

    return resolve_model("tiny")
