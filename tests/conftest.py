"""Shared fixtures. The embedded model is converted once per machine (about 40 s the first time).

Plain helpers (free ports, a loopback HTTP server) live in ``tests/helpers.py``.
"""

from __future__ import annotations

import os
import shutil

import helpers  # tests/helpers.py
import pytest

# The per-module time table at the end of a long run (tests/suite_budget.py).
pytest_plugins = ["suite_budget"]

# Tests never reach the network: a hub lookup would otherwise retry for a minute before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(name="free_port")
def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (see :func:`helpers.free_port`)."""
    return helpers.free_port()


@pytest.fixture(scope="session")
def s3_bucket():
    """``s3://nat-ray-test`` on a real S3-compatible server started for the session (moto's server mode);
    this process's ``AWS_*`` environment points at it while the session lasts."""
    saved = {k: os.environ.get(k) for k in (*helpers.S3_ENV, "AWS_ENDPOINT_URL")}
    with helpers.s3_server("nat-ray-test") as env:
        os.environ.update(env)
        try:
            yield "s3://nat-ray-test"
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture(params=["folder", "s3"])
def location(request, tmp_path) -> str:
    """A fresh storage location: a folder here, then a prefix in the session's S3 bucket."""
    if request.param == "folder":
        return str(tmp_path)
    import uuid

    return f"{request.getfixturevalue('s3_bucket')}/{uuid.uuid4().hex}"


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
