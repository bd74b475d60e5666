"""Shared fixtures. The embedded model is converted once per machine (about 40 s the first time)."""

from __future__ import annotations

import os

import pytest

# Tests never reach the network: a hub lookup would otherwise retry for a minute before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def embedded_path() -> str:
    from nat_ray.models import ensure_embedded

    return str(ensure_embedded())


@pytest.fixture(scope="session")
def tokenizer(embedded_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_path)
