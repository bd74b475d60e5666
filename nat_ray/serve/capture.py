"""Served episodes on disk (``serve.capture``): the richest source of NAT's negatives is the traffic.

The capture folder holds

- ``episodes/part-<replica>-<n>.parquet``: the trajectory rows (:mod:`nat_ray.core.records` schema, token
  ids per turn included), written whole or not at all; a replica keeps rows in memory and writes a part
  every ``serve.capture_flush_rows`` rows or ``serve.capture_flush_s`` seconds.
- ``journal/<replica>.ids``: the ids a replica answered but has not written yet, appended before the
  response leaves. A replica killed between two flushes leaves its journal behind; once it has gone
  stale, the replica running then (or the next to start) moves it to ``lost/`` and logs how many
  episodes were lost, so loss is counted, never silent.
- ``feedback/<replica>.jsonl``: ``POST /v1/feedback``'s scores, append-only; the last one per id wins.
- ``secret``: the key of the episode ids' HMAC (:mod:`nat_ray.core.episode_ids`), made by the first
  replica, read by the others and by the next server on the same folder (so feedback survives restarts).

No Ray import: the ingress calls it from its replica, tests from plain processes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from nat_ray import safe_files
from nat_ray.config import NatRayConfig
from nat_ray.core import episode_ids, records
from nat_ray.core import nat_data as columns
from nat_ray.core.scoring import Score
from nat_ray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

EPISODES_DIR = "episodes"
JOURNAL_DIR = "journal"
LOST_DIR = "lost"
FEEDBACK_DIR = "feedback"
SECRET_FILE = "secret"
UNLABELLED = columns.UNLABELLED  # the nat_class of a captured episode asked without a gold answer


def captured_row(
    episode,
    task,
    *,
    question: str,
    episode_id: str,
    model: str,
    gold,
    score: Score | None,
    started_at: str,
    config_hash: str,
    tool_versions: dict[str, str],
    tokenizer=None,
) -> dict:
    """The trajectory row of a served episode (:class:`nat_ray.core.react.Episode` of ``task``).

    Named by its ``episode_id``; its question by the request's id (``question_id``: the same question
    asked twice shares it). ``score`` is the verdict on the request's ``gold``
    (:func:`nat_ray.serve.api.gold_score`, made once for the response); without one ``nat_class`` is
    :data:`UNLABELLED` and the correctness columns are false until feedback or a judge labels it.
    """
    row = records.episode_row(
        episode,
        tokenizer,
        task=task.name,
        family=task.family,
        question_id=episode.id,
        question=question,
        gold="" if gold is None else gold,
        score=Score(correct_paper=False, correct_robust=False) if score is None else score,
        temperature=episode.sampling.temperature,
        sample_index=0,
        seed=episode.sampling.seed or 0,
        model=model,
        engine="serve",
        config_hash=config_hash,
        started_at=started_at,
        **task.lineage(tool_versions),
    )
    row[columns.TRAJECTORY_ID] = episode_id
    if score is None:
        row[columns.NAT_CLASS] = UNLABELLED
    return row


def load_redactor(spec: str | None) -> Callable[[str], str] | None:
    """``serve.capture_redact``'s function (``FILE.py:fn`` or ``module:fn``), or None.

    Raises:
        ConfigError: it cannot be imported or is not callable.
    """
    if spec is None:
        return None
    from nat_ray.tasks.task_file import import_callable

    fn = import_callable(spec, Path.cwd())
    if not callable(fn):
        raise ConfigError(f"serve.capture_redact: {spec} is not a function")
    return fn


def redacted(row: dict, redact: Callable[[str], str]) -> dict:
    """``row`` with ``redact`` applied to its question, gold, answer and every message; its token ids are
    dropped (they spell the text as served).

    Raises:
        ValueError: ``redact`` raised or returned something other than text (the row must not be written).
    """

    def one(text: str | None) -> str | None:
        if text is None:
            return None
        try:
            out = redact(text)
        except Exception as err:  # noqa: BLE001 - any failure of the user's function
            raise ValueError(f"{type(err).__name__}: {err}") from None
        if not isinstance(out, str):
            raise ValueError(f"it returned {type(out).__name__}, not text")
        return out

    new = dict(row)
    for key in (columns.QUESTION, columns.GOLD, columns.ANSWER):
        new[key] = one(row[key])
    for key in (columns.PROMPT, columns.TRAJECTORY):
        new[key] = [{"role": m["role"], "content": one(m["content"])} for m in row[key]]
    new[columns.TURN_PROMPT_IDS] = new[columns.TURN_COMPLETION_IDS] = None
    return new


def with_capture_resolved(cfg: NatRayConfig) -> NatRayConfig:
    """``serve.capture_dir`` made absolute where the app is built (replicas start elsewhere) and created
    now, so a folder that cannot be written fails before Serve starts.

    A ``FILE.py:fn`` redactor is made absolute too, and imported once here to check it.

    Raises:
        ConfigError: the folder cannot be created; the redactor cannot be imported.
    """
    if not cfg.serve.capture:
        return cfg
    folder = Path(cfg.serve.capture_dir).expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"serve.capture_dir: cannot create {folder}: {err}") from None
    redact = cfg.serve.capture_redact
    if redact is not None:
        target, _, name = redact.rpartition(":")
        if target.endswith(".py"):
            redact = f"{Path(target).expanduser().resolve()}:{name}"
        load_redactor(redact)
    serve_cfg = dataclasses.replace(cfg.serve, capture_dir=str(folder), capture_redact=redact)
    return dataclasses.replace(cfg, serve=serve_cfg)


def replica_name() -> str:
    """A name no other replica, here or on another node, before or after a restart, will have."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:24]
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def capture_secret(folder: str | Path) -> bytes:
    """The folder's id secret, made on first use; replicas starting together all read the same one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SECRET_FILE
    if not path.exists():
        staged = folder / f".{SECRET_FILE}.{secrets.token_hex(4)}"
        try:
            staged.write_text(episode_ids.new_secret().hex())
            os.chmod(staged, 0o600)
            try:
                os.link(staged, path)  # atomic, and refused when another replica got there first
            except FileExistsError:
                pass
        finally:
            staged.unlink(missing_ok=True)
    try:
        return bytes.fromhex(path.read_text().strip())
    except ValueError:
        raise DataError(
            f"{path} is damaged (not hex); remove it to make a new one (old ids then get 404)"
        ) from None


def recover_lost(folder: str | Path, stale_s: float) -> int:
    """Count (and set aside in ``lost/``) the episodes of replicas that stopped before writing them.

    A live replica touches its journal every tick, so a journal untouched for ``stale_s`` belongs to a
    replica that is gone; an empty one is removed.
    """
    journals = Path(folder) / JOURNAL_DIR
    lost = 0
    for journal in sorted(journals.glob("*.ids")) if journals.is_dir() else []:
        try:
            if time.time() - journal.stat().st_mtime < stale_s:
                continue
            ids = [line for line in journal.read_text().splitlines() if line.strip()]
            if not ids:
                journal.unlink()
                continue
            aside = Path(folder) / LOST_DIR
            aside.mkdir(exist_ok=True)
            os.replace(journal, aside / journal.name)
        except FileNotFoundError:  # another replica starting at the same moment took it
            continue
        lost += len(ids)
        log.warning(
            "capture: %d episode(s) answered by replica %s were lost (it stopped before writing them); "
            "their ids are in %s",
            len(ids),
            journal.stem,
            Path(folder) / LOST_DIR / journal.name,
        )
    return lost


class CaptureWriter:
    """One replica's captured episodes: kept in memory, written as Parquet parts, journalled until then.

    Thread-safe: the ingress adds rows from its event loop's worker threads and a ticker flushes.
    """

    def __init__(
        self,
        folder: str | Path,
        flush_rows: int,
        flush_s: float,
        replica: str | None = None,
        clock=time.monotonic,
    ) -> None:
        self.folder = Path(folder)
        self.flush_rows = flush_rows
        self.flush_s = flush_s
        self.replica = replica or replica_name()
        (self.folder / EPISODES_DIR).mkdir(parents=True, exist_ok=True)
        (self.folder / JOURNAL_DIR).mkdir(parents=True, exist_ok=True)
        self.journal_path = self.folder / JOURNAL_DIR / f"{self.replica}.ids"
        self._rows: list[dict] = []
        self._lock = threading.Lock()  # the buffer and the journal
        self._write_lock = threading.Lock()  # one part written at a time
        self._journal = open(self.journal_path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        self._clock = clock
        self._last_flush = clock()
        self._parts = 0
        self.written = 0

    @property
    def pending(self) -> int:
        return len(self._rows)

    def add(self, row: dict) -> None:
        """Keep ``row``; its id is journalled first, so a kill before it is written is counted as lost."""
        with self._lock:
            self._journal.write(row[columns.TRAJECTORY_ID] + "\n")
            self._journal.flush()
            self._rows.append(row)
            due = len(self._rows) >= self.flush_rows
        if due:
            self.flush()

    def tick(self) -> None:
        """Every second or so: write what waited ``flush_s``; otherwise mark the journal as alive."""
        if self._clock() - self._last_flush >= self.flush_s:
            self.flush()
        else:
            os.utime(self.journal_path)

    def flush(self) -> int:
        """Write the kept rows as one part; returns how many. On failure they stay kept (and journalled)."""
        with self._write_lock:
            with self._lock:
                rows, self._rows = self._rows, []
                self._last_flush = self._clock()
            if not rows:  # the journal holds only ids added since: nothing to rewrite, it is alive
                os.utime(self.journal_path)
                return 0
            name = f"part-{self.replica}-{self._parts + 1:06d}.parquet"
            try:
                records.write_rows(rows, self.folder / EPISODES_DIR / name)
            except Exception:
                with self._lock:
                    self._rows[:0] = rows
                log.exception("capture: writing %d episode(s) failed; kept for the next flush", len(rows))
                return 0
            self._parts += 1
            self.written += len(rows)
            with self._lock:
                self._rewrite_journal([r[columns.TRAJECTORY_ID] for r in self._rows])
        return len(rows)

    def _rewrite_journal(self, ids: list[str]) -> None:
        # Called with the lock held: the journal keeps only the ids not yet in a part.
        self._journal.close()
        with safe_files.staged_file(self.journal_path) as tmp:
            tmp.write_text("".join(i + "\n" for i in ids))
        self._journal = open(self.journal_path, "a", encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        """Write what is kept and remove the journal (nothing of this replica is left unwritten)."""
        self.flush()
        with self._lock:
            self._journal.close()
            if not self._rows:
                self.journal_path.unlink(missing_ok=True)


def stale_after(flush_s: float) -> float:
    """Seconds after which an untouched journal is a dead replica's (live ones touch theirs every tick)."""
    return max(30.0, 3 * flush_s)


class Ticker:
    """A daemon thread calling ``writer.tick()`` every ``interval_s`` until :meth:`stop`, and every
    ``recover_s`` :func:`recover_lost`: a replica that Serve restarts at once finds its dead
    predecessor's journal still fresh, so the loss is counted once the journal has gone stale."""

    def __init__(
        self, writer: CaptureWriter, interval_s: float = 1.0, recover_s: float | None = None
    ) -> None:
        self._stop = threading.Event()
        self._writer = writer
        self._interval_s = interval_s
        self._stale_s = stale_after(writer.flush_s)
        self._recover_s = self._stale_s / 2 if recover_s is None else recover_s
        self.lost = 0
        self._thread = threading.Thread(target=self._run, name="capture-ticker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last_recovery = time.monotonic()
        while not self._stop.wait(self._interval_s):
            try:
                self._writer.tick()
                if time.monotonic() - last_recovery >= self._recover_s:
                    last_recovery = time.monotonic()
                    self.lost += recover_lost(self._writer.folder, self._stale_s)
            except Exception:  # noqa: BLE001 - a full disk must not stop the ticker (flush logs it)
                log.exception("capture: tick failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def check_score(score: object) -> float:
    """A feedback score as a float in [0, 1].

    Raises:
        ValueError: anything else (booleans, NaN and out-of-range numbers included).
    """
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise ValueError(f"score must be a number in [0, 1], got {score!r}")
    if not 0.0 <= float(score) <= 1.0:
        raise ValueError(f"score must be in [0, 1], got {score!r}")
    return float(score)


class FeedbackLog:
    """One replica's append-only feedback file; each line is synced before the request is answered."""

    def __init__(self, folder: str | Path, replica: str) -> None:
        self.path = Path(folder) / FEEDBACK_DIR / f"{replica}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def record(self, episode_id: str, score: float, answer: str | None = None) -> dict:
        entry = {"episode_id": episode_id, "score": check_score(score), "answer": answer, "at": time.time()}
        line = json.dumps(entry) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as out:
            out.write(line)
            out.flush()
            os.fsync(out.fileno())
        return entry


def read_feedback(folder: str | Path) -> dict[str, dict]:
    """Every episode's latest feedback, ``{episode_id: {"score", "answer", "at"}}``; lines that do not
    parse (a replica killed mid-line) are skipped and counted in a log line."""
    entries, bad = [], 0
    for file in sorted((Path(folder) / FEEDBACK_DIR).glob("*.jsonl")):
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                entry["score"] = check_score(entry["score"])
                if not isinstance(entry["episode_id"], str):
                    raise TypeError("episode_id")
                entries.append(entry)
            except (ValueError, KeyError, TypeError):
                bad += 1
    if bad:
        log.warning(
            "feedback: %d line(s) under %s do not parse and were skipped", bad, Path(folder) / FEEDBACK_DIR
        )
    latest: dict[str, dict] = {}
    for entry in sorted(entries, key=lambda e: float(e.get("at") or 0.0)):
        latest[entry["episode_id"]] = {k: entry.get(k) for k in ("score", "answer", "at")}
    return latest


def read_captured(folder: str | Path) -> list[dict]:
    """The captured episodes' rows (written parts only: a part being written is never read)."""
    episodes = Path(folder) / EPISODES_DIR
    return records.read_rows(episodes) if episodes.is_dir() else []
