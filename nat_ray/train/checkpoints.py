"""Which training checkpoint a resume may trust, and names for new ones. No Ray, no torch.

Every checkpoint folder (``step_NNNNNN`` under the run folder) is sealed with
:func:`nat_ray.safe_files.seal_dir` once all ranks have written it, before Ray Train registers it.
A folder without its seal is a save that never finished; one whose files fail the seal was
damaged afterwards. Either way a resume skips it for the newest sound checkpoint before it (or a
fresh start when there is none), named in a warning.

Ray Train lists the checkpoints it registered in its own snapshot and refuses a run folder where
one of them is missing, so a damaged folder cannot simply be moved away: it is set aside
(``step_NNNNNN.damaged``, kept for a person) and an empty placeholder holding a note takes its
name until Ray Train's rotation deletes it. A checkpoint saved again at the same step gets a new
folder (``step_NNNNNN-1``), so that rotation never deletes a good checkpoint under an old name.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from nat_ray import safe_files

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
PLACEHOLDER_NOTE = "DAMAGED.txt"
_NAME = re.compile(r"^step_(\d+)(?:-(\d+))?$")


def checkpoint_order(path: str | Path) -> tuple[int, int] | None:
    """``(step, repeat)`` of a checkpoint folder name, or None for anything else (``.damaged``, files)."""
    match = _NAME.match(Path(path).name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def checkpoint_folders(run_dir: str | Path) -> list[Path]:
    """The run's checkpoint folders, newest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and checkpoint_order(p) is not None]
    return sorted(found, key=checkpoint_order, reverse=True)


def checkpoint_problems(folder: str | Path) -> list[str]:
    """What makes a checkpoint folder untrustworthy; empty for a sound one."""
    folder = Path(folder)
    if (folder / PLACEHOLDER_NOTE).is_file():
        return [(folder / PLACEHOLDER_NOTE).read_text().strip() or "set aside as damaged"]
    problems = safe_files.check_dir(folder, require_checksum=True)
    if problems and problems[0].endswith(f"has no {safe_files.DIR_CHECKSUMS}"):
        return ["no seal: the save did not finish"]
    if not problems and not (folder / STATE_FILE).is_file():
        return [f"no {STATE_FILE}"]
    return problems


def choose_checkpoint(run_dir: str | Path, latest: str | Path | None) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from: Ray Train's ``latest`` if sound, else the newest sound one before it.

    Args:
        run_dir: the run folder holding the ``step_*`` folders.
        latest: the checkpoint Ray Train restored (None: a fresh start, nothing is chosen).

    Returns:
        ``(folder or None for a fresh start, one line per checkpoint skipped: path and what is wrong)``.
    """
    if latest is None:
        return None, []
    latest = Path(latest)
    skipped = []
    problems = checkpoint_problems(latest)
    if not problems:
        return latest, []
    skipped.append(f"{latest}: {'; '.join(problems)}")
    newest = checkpoint_order(latest)
    for folder in checkpoint_folders(run_dir):
        if folder == latest or (newest is not None and checkpoint_order(folder) >= newest):
            continue
        problems = checkpoint_problems(folder)
        if not problems:
            return folder, skipped
        skipped.append(f"{folder}: {'; '.join(problems)}")
    return None, skipped


def set_aside_damaged(run_dir: str | Path) -> list[str]:
    """Set aside every damaged checkpoint folder of a run, leaving a placeholder under its name.

    Run by the driver before the workers start (one process, no race). Placeholders and sound
    folders are left alone.

    Returns:
        one line per folder set aside: its path, what is wrong, and where it went.
    """
    lines = []
    for folder in checkpoint_folders(run_dir):
        if (folder / PLACEHOLDER_NOTE).is_file():
            continue
        problems = checkpoint_problems(folder)
        if not problems:
            continue
        kept = safe_files.set_aside(folder)
        folder.mkdir()
        why = "; ".join(problems)
        (folder / PLACEHOLDER_NOTE).write_text(f"damaged ({why}); set aside as {kept.name}\n")
        lines.append(f"{folder}: {why}; set aside as {kept.name}")
    return lines


def new_checkpoint_name(run_dir: str | Path, step: int) -> str:
    """A folder name for the checkpoint after ``step`` steps that no earlier folder used."""
    run_dir = Path(run_dir)
    name = f"step_{step:06d}"
    repeat = 0
    while any((run_dir / n).exists() for n in (name, name + ".damaged")):
        repeat += 1
        name = f"step_{step:06d}-{repeat}"
    return name
