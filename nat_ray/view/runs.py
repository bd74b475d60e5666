"""What a run folder holds, found once when the viewer opens it; nothing outside it is ever listed.

A run folder is whatever a stage wrote: a pipeline (``rollout/``, ``eval/<model>/``, ``train/``), a loop
(``rounds/<r>/rollout``, ``rounds/<r>/eval``, ``eval-base``), a rollout's or an evaluation's output
folder, or a folder of trajectory Parquet files. Every folder of trajectory files becomes a
:class:`Source`, named by its place in the run (``rounds/1/eval``, ``eval/nat``): rounds and variants are
sources. The page addresses sources, plots and training samples by their index in these lists, never
by a path, so no request can name a file the run did not list.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from nat_ray.core import nat_data
from nat_ray.errors import ConfigError
from nat_ray.paths import LOSS_SAMPLE_FILE, PARTS_DIR

# Beside trajectories a run keeps checkpoints, exports and tracking files: never walked into.
SKIP_DIRS = {"mlruns", "tensorboard", "export", "adapters", "stacked-adapter", "__pycache__", ".git"}
RESULTS_FILE = "results.md"


@dataclass(frozen=True)
class Source:
    """One folder of trajectory Parquet files.

    Attributes:
        key: what URLs carry (``s0``, ``s1``, ...).
        label: the folder's place in the run (``.`` for the run folder itself).
        files: its Parquet files.
        rows: trajectories in them (from the files' footers).
    """

    key: str
    label: str
    files: tuple[Path, ...]
    rows: int


@dataclass(frozen=True)
class RunFolder:
    """A run folder as the viewer shows it.

    Attributes:
        root: the folder, resolved.
        kind: ``loop``, ``pipeline`` or ``trajectories`` (a rollout, an evaluation, plain Parquet files).
        sources: its trajectory sources, in natural order of their labels.
        results: its ``results.md``, if it has one.
        plots: the ``*.png`` files directly in it.
        loss_samples: ``(label, path)`` of each training run's sample of examples and loss masks.
    """

    root: Path
    kind: str
    sources: list[Source]
    results: Path | None
    plots: list[Path] = field(default_factory=list)
    loss_samples: list[tuple[str, Path]] = field(default_factory=list)

    def source(self, key: str | None) -> Source | None:
        return next((s for s in self.sources if s.key == key), None)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.sources)


def natural_key(text: str) -> list:
    """``rounds/10`` after ``rounds/2``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
    except (OSError, ValueError):
        return False
    return True


def _trajectory_files(folder: Path, names: list[str], root: Path) -> list[Path]:
    """The folder's Parquet files that are trajectory files (by their schema) and lie inside the run."""
    import pyarrow.parquet as pq

    out = []
    for name in sorted(names):
        path = folder / name
        if not name.endswith(".parquet") or not _inside(path, root):
            continue
        try:
            names_in_file = pq.read_schema(path).names
        except Exception:  # noqa: BLE001 - an unreadable or half-written file is not listed
            continue
        if nat_data.TRAJECTORY_ID in names_in_file and nat_data.TRAJECTORY in names_in_file:
            out.append(path)
    return out


def _label(folder: Path, root: Path) -> str:
    rel = folder.relative_to(root)
    if rel.name == PARTS_DIR:
        rel = rel.parent
    return rel.as_posix() if rel.parts else "."


def open_run(path: str | Path) -> RunFolder:
    """Find the trajectory sources, results, plots and training samples of a run folder.

    Raises:
        ConfigError: the path is not a folder, or holds no trajectory file anywhere.
    """
    import pyarrow.parquet as pq

    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise ConfigError(
            f"{path} is not a folder: give a run folder (runs/<name>) or a folder of trajectories"
        )
    found: list[tuple[str, list[Path]]] = []
    samples: list[tuple[str, Path]] = []
    for folder, dirs, files in os.walk(root):  # symbolic links to folders are not followed
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith("step_")]
        here = Path(folder)
        parquet = _trajectory_files(here, files, root)
        if parquet:
            found.append((_label(here, root), parquet))
        if LOSS_SAMPLE_FILE in files and _inside(here / LOSS_SAMPLE_FILE, root):
            rel = here.relative_to(root).as_posix()
            samples.append((rel or ".", here / LOSS_SAMPLE_FILE))
    if not found:
        raise ConfigError(
            f"{root} holds no trajectory Parquet files (a rollout, evaluation, pipeline or loop run)"
        )
    found.sort(key=lambda item: natural_key(item[0]))
    sources = [
        Source(f"s{i}", label, tuple(files), sum(pq.read_metadata(f).num_rows for f in files))
        for i, (label, files) in enumerate(found)
    ]
    if (root / "rounds").is_dir():
        kind = "loop"
    elif (root / "manifest.json").is_file():
        kind = "pipeline"
    else:
        kind = "trajectories"
    results = root / RESULTS_FILE
    return RunFolder(
        root=root,
        kind=kind,
        sources=sources,
        results=results if results.is_file() else None,
        plots=sorted(p for p in root.glob("*.png") if _inside(p, root)),
        loss_samples=sorted(samples, key=lambda item: natural_key(item[0])),
    )
