"""Ids for served episodes that any replica can recognise as the server's own without a lookup.

A served episode needs a name that two users asking the same question never share (the request's
``id`` hashes task, question and seed, so they would), that survives replicas and restarts, and that a
feedback request cannot forge: feedback for an id the server never issued is refused with 404. So an id
is a random nonce followed by an HMAC of it under a secret the replicas share (kept beside the captured
episodes); checking one is a hash, not a search of what was written.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

PREFIX = "ep"
_NONCE_BYTES = 12
_TAG_HEX = 20  # 80 bits of the HMAC: forging one id takes ~2^80 tries
_SHAPE = re.compile(rf"^{PREFIX}-([0-9a-f]{{{2 * _NONCE_BYTES}}})-([0-9a-f]{{{_TAG_HEX}}})$")
SECRET_BYTES = 32


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def _tag(secret: bytes, nonce: str) -> str:
    return hmac.new(secret, nonce.encode(), hashlib.sha256).hexdigest()[:_TAG_HEX]


def issue(secret: bytes) -> str:
    """A new id, ``ep-<nonce>-<tag>``: unique with overwhelming probability, whoever issues it."""
    nonce = secrets.token_hex(_NONCE_BYTES)
    return f"{PREFIX}-{nonce}-{_tag(secret, nonce)}"


def issued_with(episode_id: object, secret: bytes) -> bool:
    """Whether ``episode_id`` was issued under ``secret`` (any other text, of any type: False)."""
    if not isinstance(episode_id, str):
        return False
    match = _SHAPE.match(episode_id)
    return match is not None and hmac.compare_digest(match.group(2), _tag(secret, match.group(1)))
