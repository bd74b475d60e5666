"""Shared fixtures. The embedded model is converted once per machine (about 40 s the first time)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def embedded_path() -> str:
    from nat_ray.models import ensure_embedded

    return str(ensure_embedded())


@pytest.fixture(scope="session")
def tokenizer(embedded_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_path)
