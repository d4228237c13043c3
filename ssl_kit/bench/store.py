"""The benchmark results store: one SQLite file that every suite appends to.

Each cell's rows go in one ``BEGIN IMMEDIATE`` transaction on a fresh connection in WAL mode, so a
crashed cell leaves no partial rows and several suites (processes) can write to the same file at
once without losing any: writers queue on the database lock (60 s busy timeout, then retries).
A cell has rows from one run only: ``add`` refuses a cell that already has rows, and a process
``claim``s a cell before running it (a lease kept fresh while it runs), so two processes on one
suite split its cells instead of running each twice.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import socket
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import ssl_kit

PACKAGES = ("torch", "torchvision", "torchaudio", "lightning", "timm", "lightly", "torchmetrics", "ssl_kit")
LOCK_RETRIES = 5
#: A claim not renewed for this long is free again (its process died without releasing it).
CLAIM_LEASE_S = 180.0

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    suite TEXT NOT NULL,
    cell TEXT NOT NULL,
    method TEXT NOT NULL,
    dataset TEXT NOT NULL,
    backbone TEXT NOT NULL,
    protocol TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL,  -- NULL: NaN (a diverged run), which SQLite cannot store
    seed INTEGER NOT NULL,
    config TEXT NOT NULL,  -- JSON
    wall_time_s REAL NOT NULL,
    throughput REAL,
    epochs REAL,
    versions TEXT,  -- JSON
    git_commit TEXT,
    hardware TEXT,
    created_at TEXT NOT NULL,
    fold TEXT  -- the cross-validation fold that was the test split; NULL: no cross-validation
)""",
    "CREATE INDEX IF NOT EXISTS results_suite_cell ON results (suite, cell)",
    """CREATE TABLE IF NOT EXISTS claims (
    suite TEXT NOT NULL,
    cell TEXT NOT NULL,
    owner TEXT NOT NULL,  -- claim_owner() of the process running the cell
    renewed_at REAL NOT NULL,  -- time.time()
    PRIMARY KEY (suite, cell)
)""",
)


@dataclass
class Result:
    """One metric of one benchmark cell (method config x dataset x protocol x seed)."""

    suite: str
    cell: str
    method: str
    dataset: str
    backbone: str
    protocol: str
    metric: str
    value: float
    seed: int
    config: dict
    wall_time_s: float
    throughput: float | None = None
    epochs: float | None = None
    versions: dict | None = None
    git_commit: str | None = None
    hardware: str | None = None
    created_at: str | None = None
    fold: str | None = None


COLUMNS = tuple(f.name for f in fields(Result))
#: Columns added after stores were written: added to an older store when it is opened for
#: writing, read as NULL (None) from one opened read-only.
LATER_COLUMNS = {"fold": "TEXT"}
JSON_COLUMNS = ("config", "versions")
INSERT = f"INSERT INTO results ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


@cache
def package_versions() -> dict[str, str | None]:
    """Python and the packages whose versions change results (None: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@cache
def git_commit() -> str | None:
    """HEAD of the ssl_kit checkout, ``-dirty`` with uncommitted changes to tracked files; None
    when ssl_kit is not imported from a git checkout of its own (e.g. an installed wheel)."""
    root = Path(ssl_kit.__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=30).stdout.strip()

    try:
        # A site-packages inside some other repository would otherwise report that repository.
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


@cache
def hardware() -> str:
    """The accelerators a result ran on: the CUDA devices, else the CPU cores and memory."""
    import torch  # deferred: the store and reports are usable without paying for torch

    if torch.cuda.is_available():
        names = Counter(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return " + ".join(f"{n} x {name}" for name, n in names.items())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else math.nan
    return f"{cores} x CPU ({_cpu_model()}), {memory_gib:.0f} GiB"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class ResultStore:
    """Benchmark results in an SQLite file, safe for concurrent writers in several processes."""

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        """``read_only``: an existing store, opened without writing (reports); a file that is not a
        results store is refused with its name."""
        self.path = Path(path)
        self.read_only = read_only
        if read_only:
            self.rows(suite="")  # fails here, naming the file, when it is not a readable store
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._retry(self._create)

    def _create(self) -> None:
        with self._connect() as connection:
            connection.execute("PRAGMA journal_mode = WAL")  # persistent; readers never block the writer
        with self._transaction() as connection:
            for statement in SCHEMA:
                connection.execute(statement)
            present = stored_columns(connection)
            for column, kind in LATER_COLUMNS.items():
                if column not in present:
                    connection.execute(f"ALTER TABLE results ADD COLUMN {column} {kind}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A fresh connection (never shared across processes or threads) that waits up to 60 s for
        the lock, in autocommit mode so that transactions are the explicit ``BEGIN IMMEDIATE`` ones."""
        target, uri = (f"file:{self.path}?mode=ro", True) if self.read_only else (str(self.path), False)
        with closing(sqlite3.connect(target, timeout=60, isolation_level=None, uri=uri)) as connection:
            connection.row_factory = sqlite3.Row
            yield connection

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed when the block succeeds, rolled back when it raises."""
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")  # takes the write lock now, not at the first write
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def add(self, results: Iterable[Result]) -> bool:
        """Appends the rows of one cell, all or none, and releases its claim; False (nothing
        written) when the cell already has rows, which another process wrote. The busy timeout
        makes a writer wait for another; "database is locked" that still escapes it (e.g. a WAL
        recovery) is retried."""
        created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        results = [
            replace(
                result,
                versions=result.versions if result.versions is not None else package_versions(),
                git_commit=result.git_commit if result.git_commit is not None else git_commit(),
                hardware=result.hardware if result.hardware is not None else hardware(),
                created_at=result.created_at or created_at,
            )
            for result in results
        ]
        return self._retry(lambda: self._insert(results))

    def _insert(self, results: list[Result]) -> bool:
        cells = {(result.suite, result.cell) for result in results}
        with self._transaction() as connection:
            if any(connection.execute("SELECT 1 FROM results WHERE suite = ? AND cell = ? LIMIT 1", cell).fetchone() for cell in cells):
                return False
            for result in results:
                connection.execute(INSERT, _encode(result))
            connection.executemany("DELETE FROM claims WHERE suite = ? AND cell = ?", cells)
        return True

    def claim(self, suite: str, cell: str, owner: str | None = None) -> str | None:
        """Takes the cell for ``owner`` (this process by default) unless it has rows or another
        live process holds it; returns None when taken, else who holds it (or ``"finished"``).
        A holder is dead when its lease ran out, or on this host when its process is gone."""
        owner = owner or claim_owner()

        def take() -> str | None:
            with self._transaction() as connection:
                if connection.execute("SELECT 1 FROM results WHERE suite = ? AND cell = ? LIMIT 1", (suite, cell)).fetchone():
                    return "finished"
                held = connection.execute("SELECT owner, renewed_at FROM claims WHERE suite = ? AND cell = ?", (suite, cell)).fetchone()
                if held is not None and held["owner"] != owner and _alive(held["owner"], held["renewed_at"]):
                    return held["owner"]
                connection.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?)", (suite, cell, owner, time.time()))
                return None

        return self._retry(take)

    def renew(self, suite: str, cell: str, owner: str | None = None) -> None:
        """Keeps a claim's lease fresh (called while the cell runs)."""
        owner = owner or claim_owner()
        self._retry(lambda: self._execute("UPDATE claims SET renewed_at = ? WHERE suite = ? AND cell = ? AND owner = ?", (time.time(), suite, cell, owner)))

    def release(self, suite: str, cell: str, owner: str | None = None) -> None:
        owner = owner or claim_owner()
        self._retry(lambda: self._execute("DELETE FROM claims WHERE suite = ? AND cell = ? AND owner = ?", (suite, cell, owner)))

    def _execute(self, statement: str, parameters: tuple) -> None:
        with self._transaction() as connection:
            connection.execute(statement, parameters)

    @staticmethod
    def _retry(write: Callable[[], Any]) -> Any:
        """Runs a write again, after a random back-off, when it met "database is locked"."""
        for attempt in range(LOCK_RETRIES):
            try:
                return write()
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or attempt == LOCK_RETRIES - 1:
                    raise
                time.sleep(random.uniform(0.1, 1.0) * 2**attempt)

    def finished_cells(self, suite: str) -> set[str]:
        """The cells of a suite with results, which a resumed suite skips."""
        with self._connect() as connection:
            return {row["cell"] for row in connection.execute("SELECT DISTINCT cell FROM results WHERE suite = ?", (suite,))}

    def rows(self, suite: str | None = None) -> list[dict]:
        """Every result (of one suite, or all) in insertion order, as ``Result`` fields."""
        where, parameters = ("WHERE suite = ?", (suite,)) if suite is not None else ("", ())
        try:
            with self._connect() as connection:
                present = stored_columns(connection)
                found = connection.execute(f"SELECT {', '.join(c for c in COLUMNS if c in present)} FROM results {where} ORDER BY id", parameters)
                return [_decode(row) for row in found]
        except sqlite3.DatabaseError as error:
            raise ValueError(f"{self.path} is not a readable ssl_kit results store ({error})") from error


def claim_owner() -> str:
    """Who runs a cell: one name for every rank of a DDP job. Under torchrun, the job's
    rendezvous address (shared by its ranks on every node, unique among live jobs); a rank that
    Lightning's launcher started, the rank-zero process that started it; else this process."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return f"torchrun:{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    pid = os.getppid() if os.environ.get("LOCAL_RANK", "0") != "0" else os.getpid()
    return f"{socket.gethostname()}:{pid}"


def _alive(owner: str, renewed_at: float) -> bool:
    if time.time() - renewed_at > CLAIM_LEASE_S:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's process: its lease decides
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _encode(result: Result) -> tuple:
    """The row of a result; raises (inside the transaction, rolling it back) when its config or
    versions are not JSON-serialisable."""
    row = asdict(result)
    for column in JSON_COLUMNS:
        row[column] = json.dumps(row[column])
    return tuple(row[column] for column in COLUMNS)


def stored_columns(connection: sqlite3.Connection) -> set[str]:
    """The columns the store's results table has (an older store lacks ``LATER_COLUMNS``)."""
    return {column["name"] for column in connection.execute("PRAGMA table_info(results)")}


def _decode(row: sqlite3.Row) -> dict:
    decoded = dict.fromkeys(LATER_COLUMNS) | dict(row)
    for column in JSON_COLUMNS:
        decoded[column] = json.loads(decoded[column])
    if decoded["value"] is None:
        decoded["value"] = math.nan
    return decoded
