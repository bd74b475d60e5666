"""Shared fixtures. The embedded model is converted once per machine (about 40 s the first time).

Plain helpers (free ports, a loopback HTTP server) live in ``tests/helpers.py``.
"""

from __future__ import annotations

import os

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
