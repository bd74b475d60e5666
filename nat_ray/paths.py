"""Where nat_ray finds data and keeps caches.

Data comes from, in order: an explicit path; ``$NAT_RAY_DATA_DIR``; a ``shared/data`` folder beside
or above the working directory or the package (the full benchmarks, when a checkout has them); and
last the small subsets shipped inside the package (``nat_ray/data``), so a fresh machine still runs.
Caches (converted models, search embeddings) live under ``$NAT_RAY_CACHE`` or ``~/.cache/nat_ray``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

# The folder of Parquet parts inside a rollout or evaluation output dir.
PARTS_DIR = "trajectories"
PROGRESS_FILE = "progress.txt"  # a training run's latest step line (nat_ray.train.worker.write_progress)
LOSS_SAMPLE_FILE = (
    "loss_sample.json"  # a training run's examples, token by token with their loss (nat-ray view)
)

PACKAGE_DATA_DIR = Path(__file__).resolve().parent / "data"


log = logging.getLogger(__name__)
_WARNED: set[str] = set()  # NAT_RAY_DATA_DIR values already warned about


def cache_dir() -> Path:
    """Root of nat_ray's on-disk caches (created on first use)."""
    root = Path(os.environ.get("NAT_RAY_CACHE", Path.home() / ".cache" / "nat_ray")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def shared_data_dir() -> Path | None:
    """The full benchmark data folder, if this machine has one (``$NAT_RAY_DATA_DIR`` or ``shared/data``)."""
    env = os.environ.get("NAT_RAY_DATA_DIR")
    if env:
        path = Path(env).expanduser()
        if path.is_dir():
            return path
        if env not in _WARNED:
            _WARNED.add(env)
            log.warning(
                "NAT_RAY_DATA_DIR=%s is not a folder: only the data shipped with nat_ray is used", env
            )
        return None
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data"
            if candidate.is_dir():
                return candidate
    return None


def data_dirs() -> list[Path]:
    """Folders searched for a relative data path, best first."""
    shared = shared_data_dir()
    return [d for d in (shared, PACKAGE_DATA_DIR) if d is not None]


def find_data_file(*relpaths: str) -> Path | None:
    """First existing file among ``relpaths`` in :func:`data_dirs`, trying every dir for each path in turn."""
    for rel in relpaths:
        for root in data_dirs():
            if (root / rel).is_file():
                return root / rel
    return None
