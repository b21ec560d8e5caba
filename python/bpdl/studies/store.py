"""The study database: one SQLite file (WAL mode) holding one or more studies.

Tables (schema version 1)::

    bpdl_meta(key, value)            format = "bpdl-study-db", schema = 1
    studies(name, definition, status, owner, heartbeat, optimizer_state, state_info,
            next_seq, created, updated)
    trials(study, number, status, params, config, seed, objective, loss, folds, curves,
           error, attempts, ask_seq, tell_seq, created, started, finished, duration, worker)
                                     (started/finished/duration: the worker's clock)
    rejections(study, seq, params, error, created)
    test_runs(study, trial, seed, rank, status, test_acc, test_loss, error, attempts,
              started, finished, duration, worker)

Every change the runner makes after a step (finished trials, new trials, rejected proposals
and the optimiser snapshot that matches them) is one ``BEGIN IMMEDIATE`` transaction, so a
process killed at any instant leaves a database whose trials and optimiser state agree.
Several studies (different names) can share a file: each is its own rows, SQLite serialises
the writers (busy timeout 60 s), and a study being run by a live process is refused to a
second runner. A file that is not a bpdl study database is never modified.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bpdl.config import diff
from bpdl.errors import BPDLError, ConfigError

FORMAT = "bpdl-study-db"
SCHEMA_VERSION = 1
SQLITE_MAGIC = b"SQLite format 3\x00"
#: a runner on another host counts as dead when its heartbeat is older than this
HEARTBEAT_TIMEOUT_S = 120.0
HEARTBEAT_EVERY_S = 10.0

_SCHEMA = """
CREATE TABLE bpdl_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE studies (
    name TEXT PRIMARY KEY,
    definition TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'created',
    owner TEXT,
    heartbeat REAL,
    optimizer_state BLOB,
    state_info TEXT,
    next_seq INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE trials (
    study TEXT NOT NULL REFERENCES studies(name),
    number INTEGER NOT NULL,
    status TEXT NOT NULL,
    params TEXT NOT NULL,
    config TEXT NOT NULL,
    seed INTEGER NOT NULL,
    objective REAL,
    loss REAL,
    folds TEXT,
    curves TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 1,
    ask_seq INTEGER NOT NULL,
    tell_seq INTEGER,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    duration REAL,
    worker TEXT,
    PRIMARY KEY (study, number)
);
CREATE TABLE rejections (
    study TEXT NOT NULL REFERENCES studies(name),
    seq INTEGER NOT NULL,
    params TEXT NOT NULL,
    error TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (study, seq)
);
CREATE TABLE test_runs (
    study TEXT NOT NULL REFERENCES studies(name),
    trial INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    status TEXT NOT NULL,
    test_acc REAL,
    test_loss REAL,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 1,
    started REAL,
    finished REAL,
    duration REAL,
    worker TEXT,
    PRIMARY KEY (study, trial, seed)
);
"""
_TABLES = {"bpdl_meta", "studies", "trials", "rejections", "test_runs"}
_JSON_COLUMNS = {"params", "config", "folds", "curves", "definition", "state_info"}


class StudyDatabaseError(BPDLError, RuntimeError):
    """The database file cannot be used: not SQLite, not bpdl's, corrupted, busy."""


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _row_dict(cursor: sqlite3.Cursor, row: tuple) -> dict[str, Any]:
    out = {}
    for (name, *_), value in zip(cursor.description, row, strict=True):
        if name in _JSON_COLUMNS and isinstance(value, str):
            value = json.loads(value)
        out[name] = value
    return out


def _process_start_ticks(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    # fields[0] is the state (field 3 of stat); the start time is field 22
    if fields and fields[0] in ("Z", "X"):
        return "dead"
    return fields[19] if len(fields) > 19 else None


def owner_token() -> str:
    """``host:pid:start`` identifying this process."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_process_start_ticks(pid) or '?'}"


def _owner_alive(owner: str, heartbeat: float | None) -> bool:
    host, _, rest = owner.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname():
        return heartbeat is not None and time.time() - heartbeat < HEARTBEAT_TIMEOUT_S
    try:
        pid = int(pid_text)
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now_start = _process_start_ticks(pid)
    if now_start == "dead":
        return False
    return start in ("?", "") or now_start is None or now_start == start


class StudyStore:
    """An open study database. ``create=False`` refuses a missing file (reports).

    ``read_only=True`` (reports and comparisons) only reads: it leaves the file's journal
    mode as it is, so a committed database (journal mode DELETE) stays byte for byte the same
    after ``bpdl study report`` or ``compare``. A writer switches an existing file to WAL.
    """

    def __init__(self, path: str | os.PathLike, *, create: bool = True,
                 read_only: bool = False):
        if read_only and create:
            raise ValueError("StudyStore: read_only=True needs create=False")
        self.path = Path(path)
        self.read_only = read_only
        if self.path.is_dir():
            raise StudyDatabaseError(f"{self.path} is a folder; give a database file path "
                                     f"(e.g. studies/mine.db)")
        exists = self.path.exists() and self.path.stat().st_size > 0
        if not exists and not create:
            raise StudyDatabaseError(f"no study database at {self.path}; run `bpdl study run "
                                     f"--db {self.path} ...` first")
        if exists:
            with open(self.path, "rb") as f:
                head = f.read(len(SQLITE_MAGIC))
            if head != SQLITE_MAGIC:
                raise StudyDatabaseError(
                    f"{self.path} is not a bpdl study database (not an SQLite file: it starts "
                    f"with {head[:16]!r}); it may be corrupted or another program's file. bpdl "
                    f"leaves it untouched: choose another --db path")
        elif create:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise StudyDatabaseError(f"cannot create the folder of {self.path}: {err}") from err
        try:
            self.conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None,
                                        check_same_thread=False)
        except sqlite3.Error as err:
            raise StudyDatabaseError(f"cannot open {self.path}: {err}") from err
        self._lock = threading.RLock()
        try:
            self._check_or_create(exists)
        except sqlite3.DatabaseError as err:
            self.conn.close()
            raise StudyDatabaseError(f"{self.path} is corrupted ({err}); bpdl leaves it "
                                     f"untouched: restore a backup or choose another --db path"
                                     ) from err
        except BaseException:
            self.conn.close()
            raise

    # ---- opening ------------------------------------------------------------------------------

    def _check_or_create(self, exists: bool) -> None:
        c = self.conn
        if exists:
            check = c.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StudyDatabaseError(f"{self.path} is corrupted (SQLite integrity check: "
                                         f"{check}); bpdl leaves it untouched: restore a backup "
                                         f"or choose another --db path")
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables and self.read_only:
            raise StudyDatabaseError(f"{self.path} is an empty SQLite database, not a bpdl study "
                                     f"database; run `bpdl study run --db {self.path} ...` first")
        if not tables:
            mode = c.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StudyDatabaseError(f"{self.path}: SQLite refused WAL mode ({mode}); put the "
                                         f"database on a local file system")
            created_meanwhile = False
            with self.transaction():
                if {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}:
                    created_meanwhile = True  # by another process, between our two looks
                else:
                    # statement by statement: executescript would commit our open transaction
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            c.execute(statement)
                    c.executemany("INSERT INTO bpdl_meta VALUES (?, ?)",
                                  [("format", FORMAT), ("schema", str(SCHEMA_VERSION))])
            if created_meanwhile:
                return self._check_or_create(True)
        else:
            if "bpdl_meta" not in tables:
                raise StudyDatabaseError(
                    f"{self.path} is an SQLite database but not a bpdl study database (its "
                    f"tables: {', '.join(sorted(tables))}); bpdl leaves it untouched: choose "
                    f"another --db path")
            meta = dict(c.execute("SELECT key, value FROM bpdl_meta").fetchall())
            if meta.get("format") != FORMAT:
                raise StudyDatabaseError(f"{self.path} is not a bpdl study database (format "
                                         f"{meta.get('format')!r}); choose another --db path")
            if int(meta.get("schema", "0")) > SCHEMA_VERSION:
                raise StudyDatabaseError(f"{self.path} was written by a newer bpdl (schema "
                                         f"{meta['schema']} > {SCHEMA_VERSION}); upgrade bpdl")
            missing = _TABLES - tables
            if missing:
                raise StudyDatabaseError(f"{self.path} is damaged: table(s) {sorted(missing)} "
                                         f"are missing")
            if not self.read_only:
                c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=NORMAL")
        c.execute("PRAGMA foreign_keys=ON")

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def __enter__(self) -> StudyStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on any exception)."""
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            cur = self.conn.execute(sql, args)
            return [_row_dict(cur, row) for row in cur.fetchall()]

    # ---- studies ------------------------------------------------------------------------------

    def study_names(self) -> list[str]:
        return [r["name"] for r in self._query("SELECT name FROM studies ORDER BY created, name")]

    def study(self, name: str) -> dict[str, Any] | None:
        rows = self._query("SELECT name, definition, status, owner, heartbeat, state_info, "
                           "next_seq, created, updated FROM studies WHERE name = ?", (name,))
        return rows[0] if rows else None

    def create_or_check(self, name: str, definition: dict[str, Any]) -> bool:
        """Create study ``name`` or check that the stored one has ``definition``.

        Returns True when created. ConfigError naming every difference otherwise.
        """
        with self.transaction() as c:
            row = c.execute("SELECT definition FROM studies WHERE name = ?", (name,)).fetchone()
            if row is None:
                now = time.time()
                c.execute("INSERT INTO studies (name, definition, created, updated) "
                          "VALUES (?, ?, ?, ?)", (name, json.dumps(definition), now, now))
                return True
        stored = json.loads(row[0])
        differences = diff(stored, definition)
        if differences:
            raise ConfigError(
                f"{self.path} holds a study named {name!r} with a different definition; "
                f"refusing to mix them. Differences (stored -> requested): "
                f"{'; '.join(differences)}. Use the stored settings to resume it, or give this "
                f"study another --name or --db.")
        return False

    def claim(self, name: str) -> str:
        """Mark this process as the runner of ``name``; StudyDatabaseError if a live one is."""
        token = owner_token()
        with self.transaction() as c:
            owner, heartbeat = c.execute("SELECT owner, heartbeat FROM studies WHERE name = ?",
                                         (name,)).fetchone()
            if owner and owner != token and _owner_alive(owner, heartbeat):
                host, _, rest = owner.partition(":")
                raise StudyDatabaseError(
                    f"study {name!r} in {self.path} is being run by process "
                    f"{rest.split(':')[0]} on {host}; wait for it to finish or stop it (a "
                    f"stopped runner's study resumes when you rerun the command)")
            c.execute("UPDATE studies SET owner = ?, heartbeat = ?, updated = ? WHERE name = ?",
                      (token, time.time(), time.time(), name))
        return token

    def release(self, name: str, token: str) -> None:
        with self.transaction() as c:
            c.execute("UPDATE studies SET owner = NULL WHERE name = ? AND owner = ?",
                      (name, token))

    def set_status(self, name: str, status: str) -> None:
        with self.transaction() as c:
            c.execute("UPDATE studies SET status = ?, updated = ? WHERE name = ?",
                      (status, time.time(), name))

    def start_heartbeat(self, name: str, token: str) -> threading.Event:
        """Refresh the heartbeat of ``name`` every few seconds from a thread (own connection)
        until the returned event is set; runners on other hosts use it to detect a dead one."""
        stop = threading.Event()

        def beat() -> None:
            conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            try:
                while not stop.wait(HEARTBEAT_EVERY_S):
                    try:
                        conn.execute("UPDATE studies SET heartbeat = ? WHERE name = ? AND "
                                     "owner = ?", (time.time(), name, token))
                    except sqlite3.OperationalError:
                        pass  # busy for longer than the timeout: try again next beat
            finally:
                conn.close()

        threading.Thread(target=beat, name=f"bpdl-heartbeat-{name}", daemon=True).start()
        return stop

    def snapshot(self, name: str) -> tuple[bytes | None, dict[str, Any] | None]:
        with self._lock:
            row = self.conn.execute("SELECT optimizer_state, state_info FROM studies WHERE "
                                    "name = ?", (name,)).fetchone()
        if row is None:
            return None, None
        return row[0], (json.loads(row[1]) if row[1] else None)

    # ---- reading ------------------------------------------------------------------------------

    def trials(self, name: str) -> list[dict[str, Any]]:
        return self._query("SELECT * FROM trials WHERE study = ? ORDER BY number", (name,))

    def rejections(self, name: str) -> list[dict[str, Any]]:
        return self._query("SELECT * FROM rejections WHERE study = ? ORDER BY seq", (name,))

    def test_runs(self, name: str) -> list[dict[str, Any]]:
        return self._query("SELECT * FROM test_runs WHERE study = ? ORDER BY rank, seed",
                           (name,))

    # ---- writing (call inside ``with store.transaction() as c``) -------------------------------

    @staticmethod
    def insert_trial(c: sqlite3.Connection, name: str, number: int, params: dict, config: dict,
                     seed: int, ask_seq: int) -> None:
        c.execute("INSERT INTO trials (study, number, status, params, config, seed, ask_seq, "
                  "created, started) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?)",
                  (name, number, json.dumps(params), json.dumps(config), seed, ask_seq,
                   time.time(), time.time()))

    @staticmethod
    def restart_trial(c: sqlite3.Connection, name: str, number: int) -> None:
        c.execute("UPDATE trials SET attempts = attempts + 1, started = ? WHERE study = ? AND "
                  "number = ? AND status = 'running'", (time.time(), name, number))

    @staticmethod
    def finish_trial(c: sqlite3.Connection, name: str, number: int, outcome: dict[str, Any],
                     loss: float, tell_seq: int) -> None:
        cur = c.execute(
            "UPDATE trials SET status = ?, objective = ?, loss = ?, folds = ?, curves = ?, "
            "error = ?, tell_seq = ?, started = COALESCE(?, started), finished = ?, "
            "duration = ?, worker = ? WHERE study = ? AND number = ? AND status = 'running'",
            (outcome["status"], _finite_or_none(outcome.get("objective")), loss,
             json.dumps(outcome.get("folds", [])), json.dumps(outcome.get("curves", [])),
             outcome.get("error"), tell_seq, outcome.get("started"),
             outcome.get("finished", time.time()), outcome.get("duration"),
             outcome.get("worker"), name, number))
        if cur.rowcount != 1:
            raise StudyDatabaseError(f"trial {number} of study {name!r} was not running; another "
                                     f"process may be running this study")

    @staticmethod
    def insert_rejection(c: sqlite3.Connection, name: str, seq: int, params: dict,
                         error: str) -> None:
        c.execute("INSERT INTO rejections VALUES (?, ?, ?, ?, ?)",
                  (name, seq, json.dumps(params), error, time.time()))

    @staticmethod
    def save_snapshot(c: sqlite3.Connection, name: str, state: bytes | None,
                      info: dict[str, Any], next_seq: int) -> None:
        c.execute("UPDATE studies SET optimizer_state = ?, state_info = ?, next_seq = ?, "
                  "updated = ? WHERE name = ?",
                  (state, json.dumps(info), next_seq, time.time(), name))

    @staticmethod
    def insert_test_run(c: sqlite3.Connection, name: str, trial: int, seed: int,
                        rank: int) -> None:
        c.execute("INSERT INTO test_runs (study, trial, seed, rank, status, started) VALUES "
                  "(?, ?, ?, ?, 'running', ?) ON CONFLICT (study, trial, seed) DO UPDATE SET "
                  "attempts = attempts + 1, started = excluded.started",
                  (name, trial, seed, rank, time.time()))

    @staticmethod
    def finish_test_run(c: sqlite3.Connection, name: str, trial: int, seed: int,
                        outcome: dict[str, Any]) -> None:
        c.execute("UPDATE test_runs SET status = ?, test_acc = ?, test_loss = ?, error = ?, "
                  "started = COALESCE(?, started), finished = ?, duration = ?, worker = ? "
                  "WHERE study = ? AND trial = ? AND seed = ?",
                  (outcome["status"], _finite_or_none(outcome.get("test_acc")),
                   _finite_or_none(outcome.get("test_loss")), outcome.get("error"),
                   outcome.get("started"), outcome.get("finished", time.time()),
                   outcome.get("duration"),
                   outcome.get("worker"), name, trial, seed))
