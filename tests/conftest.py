"""Shared fixtures. The embedded model is converted once per machine (about 40 s the first time).

Plain helpers (free ports, a loopback HTTP server) live in ``tests/helpers.py``.
"""

from __future__ import annotations

import os
import shutil

import helpers  # tests/helpers.py
import pytest

# Tests never reach the network: a hub lookup would otherwise retry for a minute before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(name="free_port")
def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (see :func:`helpers.free_port`)."""
    return helpers.free_port()


@pytest.fixture(scope="session")
def embedded_path() -> str:
    from nat_ray.models import ensure_embedded

    return str(ensure_embedded())


@pytest.fixture(scope="session")
def tokenizer(embedded_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_path)


_FAILED_MODULES: set[str] = set()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        _FAILED_MODULES.add(item.module.__name__)
    return report


@pytest.fixture(scope="module", autouse=True)
def _free_module_folders(request, tmp_path_factory):
    """Remove the folders a module's fixtures made once the module passed.

    Module fixtures train and export models (a full fine-tune's checkpoints are over a gigabyte); kept
    to the end of the session, the suite's folders outgrew a CI machine's disk. A module with a failure
    keeps its folders for reading.
    """
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    if request.module.__name__ in _FAILED_MODULES:
        return
    for path in set(base.iterdir()) - before:
        if path.is_symlink():  # pytest's "<name>current" link to the numbered folder
            path.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)
