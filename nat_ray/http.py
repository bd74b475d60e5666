"""One way to talk HTTP with retries: a ``requests`` session whose adapter is urllib3's ``Retry``.

Used by the teacher engine, the endpoint evaluation and the HTTP search backend, so that backoff,
``Retry-After`` and "hand back the last answer" behave the same everywhere.
"""

from __future__ import annotations

from collections.abc import Collection

import requests
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

RETRY_STATUSES = (429, 500, 502, 503, 504)


def retrying_session(
    retries: int,
    backoff_factor: float,
    statuses: Collection[int] = RETRY_STATUSES,
    methods: Collection[str] = ("GET", "POST"),
    pool_size: int | None = None,
) -> requests.Session:
    """A session that retries connection errors and ``statuses`` with exponential backoff.

    Args:
        retries: retries after the first attempt.
        backoff_factor: urllib3's backoff base in seconds (0, 2b, 4b, ... between attempts).
        statuses: answers that are retried; ``Retry-After`` is honoured.
        methods: methods retried (urllib3 skips POST by default; ours are idempotent).
        pool_size: connections kept per host, and the most in flight at once (callers block beyond
            it); None: requests' default pool.

    After the last retry the response itself is handed back (not an exception), so its status and
    body reach the caller's error message.
    """
    retry = Retry(
        total=retries,
        backoff_factor=backoff_factor,
        status_forcelist=tuple(statuses),
        allowed_methods=frozenset(methods),
        respect_retry_after_header=True,
        raise_on_status=False,
    )
    pool = {} if pool_size is None else {"pool_maxsize": pool_size, "pool_block": True}
    adapter = HTTPAdapter(max_retries=retry, **pool)
    session = requests.Session()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
