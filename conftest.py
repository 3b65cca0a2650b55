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


@pytest.fixture(autouse=True)
def _user_tasks_stay_in_their_test():
    """A user's tasks are registered for the process, as lm-eval's TaskManager does; a test's must not
    leak into the next test's task lists."""
    from qkit.evaluation import tasks

    before = dict(tasks.USER_TASKS)
    yield
    tasks.USER_TASKS.clear()
    tasks.USER_TASKS.update(before)


@pytest.fixture
def store_with_tiny(tiny):
    """A fresh Store at a given root, seeded with a copy of `tiny` so that it is not trained again."""
    import shutil

    from qkit.core.store import Store

    def make(root: Path) -> Store:
        shutil.copytree(tiny.path, Path(root) / tiny.path.parent.name / tiny.path.name)
        return Store(root)

    return make


@pytest.fixture
def refuse_loading(monkeypatch):
    """Call it, and from then on loading weights or a tokenizer fails the test (until the test ends, or the
    `monkeypatch.context()` passed as `patch` closes): for reruns whose results are all in the store, which
    should load neither."""
    def refuse_from_now_on(patch=monkeypatch) -> None:
        from qkit.models import loader
        from qkit.quant import methods

        def refuse(*args, **kwargs):
            raise AssertionError("a rerun whose results are all stored loaded weights or a tokenizer")

        for module, name in ((loader, "load_pretrained"), (loader, "load_tokenizer"), (methods, "load_quantized")):
            patch.setattr(module, name, refuse)

    return refuse_from_now_on


@pytest.fixture(scope="session")
def tiny():
    """The built-in tiny model, loaded once for the whole run."""
    from qkit.models import resolve_model

    return resolve_model("tiny")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests. On a shared 2-core box, oneshot ran up to 8x faster with one
    thread than with two while other processes were busy (AWQ on a 2-layer model: 37 s -> 4.4 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
