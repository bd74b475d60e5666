"""Served episodes in storage (``serve.capture``): the richest source of NAT's negatives is the traffic.

The capture location (a folder, or ``s3://...`` where replicas run on several nodes; see
:mod:`nat_ray.core.storage`) holds

- ``episodes/part-<replica>-<n>.parquet``: the trajectory rows (:mod:`nat_ray.core.records` schema, token
  ids per turn included), written whole or not at all; a replica keeps rows in memory and writes a part
  every ``serve.capture_flush_rows`` rows or ``serve.capture_flush_s`` seconds.
- ``journal/<replica>/<segment>/<episode id>``: an empty marker per episode a replica answered and has
  not written yet, made before the response leaves; a part written, its segments are removed.
  ``journal/<replica>/alive`` is touched every tick. A replica killed between two flushes leaves its
  markers behind; once its ``alive`` has gone stale, the replica running then (or the next to start)
  moves them to ``lost/<replica>/`` and logs how many episodes were lost, so loss is counted, never
  silent. (Object storage has no append: a marker per episode is one small PUT.)
- ``feedback/<replica>/<n>.json``: ``POST /v1/feedback``'s scores, one object each (older servers wrote
  ``feedback/<replica>.jsonl``: read too); the last one per id wins.
- ``secret``: the key of the episode ids' HMAC (:mod:`nat_ray.core.episode_ids`), made when the app is
  built, read by every replica and by the next server on the same location (so feedback survives
  restarts).

No Ray import: the ingress calls it from its replica, tests from plain processes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from nat_ray.config import NatRayConfig
from nat_ray.core import episode_ids, records
from nat_ray.core import nat_data as columns
from nat_ray.core.scoring import Score
from nat_ray.core.storage import Store, is_uri
from nat_ray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

EPISODES_DIR = "episodes"
JOURNAL_DIR = "journal"
LOST_DIR = "lost"
FEEDBACK_DIR = "feedback"
SECRET_FILE = "secret"
ALIVE = "alive"  # a replica's heartbeat, in its journal folder
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
    """``serve.capture_dir`` made absolute where the app is built (replicas start elsewhere), created, and
    given its id secret now: a location that cannot be written fails before Serve starts, and replicas
    starting together all read one secret (object storage has no create-if-absent).

    A ``FILE.py:fn`` redactor is made absolute too, and imported once here to check it.

    Raises:
        ConfigError: the location cannot be written; the redactor cannot be imported.
    """
    if not cfg.serve.capture:
        return cfg
    location = cfg.serve.capture_dir
    if not is_uri(location):
        location = str(Path(location).expanduser().resolve())
    try:
        capture_secret(location)
    except OSError as err:
        raise ConfigError(f"serve.capture_dir: cannot write {location}: {err}") from None
    redact = cfg.serve.capture_redact
    if redact is not None:
        target, _, name = redact.rpartition(":")
        if target.endswith(".py"):
            redact = f"{Path(target).expanduser().resolve()}:{name}"
        load_redactor(redact)
    serve_cfg = dataclasses.replace(cfg.serve, capture_dir=location, capture_redact=redact)
    return dataclasses.replace(cfg, serve=serve_cfg)


def replica_name() -> str:
    """A name no other replica, here or on another node, before or after a restart, will have."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:24]
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def capture_secret(folder: str | Path) -> bytes:
    """The location's id secret, made on first use (atomically on a local folder)."""
    store = Store(folder)
    store.makedirs()
    if not store.is_file(SECRET_FILE):
        store.create_new(SECRET_FILE, episode_ids.new_secret().hex().encode())
    try:
        return bytes.fromhex(store.read_text(SECRET_FILE).strip())
    except ValueError:
        raise DataError(
            f"{store.uri(SECRET_FILE)} is damaged (not hex); remove it to make a new one (old ids then get 404)"
        ) from None


def file_name(episode_id: str) -> str:
    """An episode id as a file name (ids this server issues already are one)."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", episode_id):
        return episode_id
    return "x" + records.config_hash({"id": episode_id})


def recover_lost(folder: str | Path, stale_s: float) -> int:
    """Count (and set aside in ``lost/``) the episodes of replicas that stopped before writing them.

    A live replica touches its ``alive`` every tick, so a journal untouched for ``stale_s`` belongs to a
    replica that is gone; one without markers is removed. Each marker is claimed by a move, so two
    replicas recovering at once count it once on a folder (in object storage a move is a copy and a
    delete: both may count it).
    """
    store = Store(folder)
    lost = 0
    now = time.time()
    for replica in store.dirs(JOURNAL_DIR):
        journal = f"{JOURNAL_DIR}/{replica}"
        entries = store.entries(journal, recursive=True)
        if not entries or now - max(mtime for _, mtime in entries) < stale_s:
            continue
        claimed = 0
        for name, _ in entries:
            if name.rsplit("/", 1)[-1] != ALIVE:
                claimed += store.move(name, f"{LOST_DIR}/{replica}/{name.rsplit('/', 1)[-1]}")
        store.delete_dir(journal)
        lost += _log_lost(claimed, replica, store.uri(f"{LOST_DIR}/{replica}"))
    for name, mtime in store.entries(JOURNAL_DIR, ".ids"):  # an older server's journal file
        if now - mtime < stale_s:
            continue
        try:
            ids = [line for line in store.read_text(name).splitlines() if line.strip()]
        except FileNotFoundError:
            continue
        base = name.rsplit("/", 1)[-1]
        if store.move(name, f"{LOST_DIR}/{base}") and ids:
            lost += _log_lost(len(ids), base.removesuffix(".ids"), store.uri(f"{LOST_DIR}/{base}"))
    return lost


def _log_lost(count: int, replica: str, where: str) -> int:
    if count:
        log.warning(
            "capture: %d episode(s) answered by replica %s were lost (it stopped before writing them); "
            "their ids are in %s",
            count,
            replica,
            where,
        )
    return count


class CaptureWriter:
    """One replica's captured episodes: kept in memory, written as Parquet parts, journalled until then.

    Thread-safe: the ingress adds rows from its event loop's worker threads and a ticker flushes. No
    lock is held across storage calls (a PUT to a bucket takes milliseconds): an episode's marker goes
    into the journal's current segment, and a flush starts a new segment and removes the old ones once
    their rows are in a part; a marker that lands in a segment a flush has just taken is written again
    in the new one.
    """

    def __init__(
        self,
        folder: str | Path,
        flush_rows: int,
        flush_s: float,
        replica: str | None = None,
        clock=time.monotonic,
    ) -> None:
        self.store = Store(folder)
        self.folder = self.store.location
        self.flush_rows = flush_rows
        self.flush_s = flush_s
        self.replica = replica or replica_name()
        self.store.makedirs(EPISODES_DIR)
        self.journal = f"{JOURNAL_DIR}/{self.replica}"
        self.store.touch(f"{self.journal}/{ALIVE}")
        self._rows: list[dict] = []
        self._segment = 0  # where new markers go
        self._segments: set[int] = set()  # those holding the markers of the kept rows
        self._lock = threading.Lock()  # the buffer and the segments
        self._write_lock = threading.Lock()  # one part written at a time
        self._clock = clock
        self._last_flush = clock()
        self._parts = 0
        self.written = 0

    @property
    def pending(self) -> int:
        return len(self._rows)

    def add(self, row: dict) -> None:
        """Keep ``row``; its id is journalled first, so a kill before it is written is counted as lost."""
        marker = file_name(row[columns.TRAJECTORY_ID])
        taken: set[int] = set()  # segments a flush took while this marker was being written
        while True:
            with self._lock:
                segment = self._segment
            self.store.touch(f"{self.journal}/{segment:06d}/{marker}")
            with self._lock:
                if segment == self._segment:
                    self._rows.append(row)
                    self._segments |= {segment} | taken  # a stray marker goes with the next flush
                    due = len(self._rows) >= self.flush_rows
                    break
            taken.add(segment)
        if due:
            self.flush()

    def tick(self) -> None:
        """Every second or so: write what waited ``flush_s``; otherwise mark the journal as alive."""
        if self._clock() - self._last_flush >= self.flush_s:
            self.flush()
        else:
            self.store.touch(f"{self.journal}/{ALIVE}")

    def flush(self) -> int:
        """Write the kept rows as one part; returns how many. On failure they stay kept (and journalled)."""
        with self._write_lock:
            with self._lock:
                rows, self._rows = self._rows, []
                segments, self._segments = self._segments, set()
                self._segment += 1
                self._last_flush = self._clock()
            self.store.touch(f"{self.journal}/{ALIVE}")
            if not rows:
                return 0
            name = f"part-{self.replica}-{self._parts + 1:06d}.parquet"
            try:
                records.write_rows(rows, f"{EPISODES_DIR}/{name}", store=self.store)
            except Exception:
                with self._lock:
                    self._rows[:0] = rows
                    self._segments |= segments
                log.exception("capture: writing %d episode(s) failed; kept for the next flush", len(rows))
                return 0
            self._parts += 1
            self.written += len(rows)
            for segment in sorted(segments):
                try:
                    self.store.delete_dir(f"{self.journal}/{segment:06d}")
                except OSError as err:  # written: a marker left behind would only be over-counted as lost
                    log.warning("capture: cannot clear journal segment %d: %s", segment, err)
        return len(rows)

    def close(self) -> None:
        """Write what is kept and remove the journal (nothing of this replica is left unwritten)."""
        self.flush()
        with self._lock:
            if not self._rows:
                self.store.delete_dir(self.journal)


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
    """One replica's feedback: an object per entry (synced to disk on a folder) written before the
    request is answered; nothing is ever rewritten."""

    def __init__(self, folder: str | Path, replica: str) -> None:
        self.store = Store(folder)
        self.prefix = f"{FEEDBACK_DIR}/{replica}"
        self.store.makedirs(self.prefix)
        self._lock = threading.Lock()
        self._count = 0

    def record(self, episode_id: str, score: float, answer: str | None = None) -> dict:
        entry = {"episode_id": episode_id, "score": check_score(score), "answer": answer, "at": time.time()}
        with self._lock:
            self._count += 1
            name = f"{self.prefix}/{time.time_ns():020d}-{self._count:06d}.json"
        self.store.write_text(name, json.dumps(entry) + "\n")
        return entry


def read_feedback(folder: str | Path) -> dict[str, dict]:
    """Every episode's latest feedback, ``{episode_id: {"score", "answer", "at"}}``; entries that do not
    parse (a torn line of an older server's log) are skipped and counted in a log line."""
    store = Store(folder)
    texts = store.read_texts(store.files(FEEDBACK_DIR, recursive=True))
    entries, bad = [], 0
    for text in texts:
        for line in text.splitlines():
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
            "feedback: %d entr(ies) under %s do not parse and were skipped", bad, store.uri(FEEDBACK_DIR)
        )
    latest: dict[str, dict] = {}
    for entry in sorted(entries, key=lambda e: float(e.get("at") or 0.0)):
        latest[entry["episode_id"]] = {k: entry.get(k) for k in ("score", "answer", "at")}
    return latest


def read_captured(folder: str | Path) -> list[dict]:
    """The captured episodes' rows (written parts only: a part being written is never read)."""
    return records.read_rows(EPISODES_DIR, store=Store(folder))


def has_captured(folder: str | Path) -> bool:
    """Whether ``folder`` is a capture location (a server's ``serve.capture_dir``: it holds the secret)."""
    store = Store(folder)
    return store.is_file(SECRET_FILE) or store.is_dir(EPISODES_DIR)
