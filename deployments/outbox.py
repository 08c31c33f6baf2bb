"""A local, append-only outbox for usage events: SQLite on the ingress node's disk.

A usage event is written here before the response ends, and only then delivered to the ledger
store in the background (see ``deployments.billing``). A store outage therefore delays billing
instead of losing it, and an ingress crash or redeploy leaves the undelivered events in the file
for the next process on the node to deliver.

Durability: WAL journal with ``synchronous=NORMAL``. A committed ``put`` is in the WAL file (the
OS page cache at least) before it returns, so it survives the process being killed at any point;
it can be lost only if the whole machine loses power or the kernel crashes before the OS writes
it out. That is the failure we accept for a hot-path write that costs tens of microseconds.

Sharing: the ingress replicas of one node open the same file. SQLite serialises writers (a busy
timeout makes them wait instead of failing), and ``pending`` leases the rows it hands out, so two
drainers do not deliver the same event at once. A drainer that dies holding a lease only delays
those rows until it expires. Delivering twice is still harmless: the ledger's ``record`` is
idempotent by request id.

The path ``":memory:"`` gives a private, in-process outbox (no file): what the ``memory://``
store uses, whose ledger is the process's own memory and so cannot outlive it either.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

BUSY_TIMEOUT_S = 5.0
# Longer than delivering one batch takes, short enough that a crashed drainer's rows come back soon.
LEASE_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    request_id  TEXT PRIMARY KEY,
    event       TEXT NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0
)
"""


class Outbox:
    """Usage events keyed by request id, from ``put`` until the ledger has them (``done``).

    Synchronous on purpose: ``put`` runs on a request's exit path, possibly while its task is
    being cancelled, where nothing may be awaited. Every call is one short SQLite statement.
    """

    def __init__(self, path: str | Path, lease_s: float = LEASE_S) -> None:
        self.path = Path(path)
        self.lease_s = lease_s
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit, so each statement is its own durable transaction.
        self._db = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)

    def put(self, event: dict) -> None:
        """Store one event; a request id already stored (or being delivered) is left as it is."""
        self._db.execute("INSERT OR IGNORE INTO outbox (request_id, event) VALUES (?, ?)",
                         (event["request_id"], json.dumps(event)))

    def pending(self, limit: int = 100) -> list[dict]:
        """Up to ``limit`` undelivered events, oldest first, leased to this caller for ``lease_s``.

        Rows leased by another drainer are skipped until their lease runs out; ``release`` hands
        back the ones this caller could not deliver.
        """
        now = time.time()
        # One statement, so claiming is atomic across processes.
        rows = self._db.execute(
            "UPDATE outbox SET lease_until = ? WHERE rowid IN "
            "(SELECT rowid FROM outbox WHERE lease_until <= ? ORDER BY rowid LIMIT ?) "
            "RETURNING rowid, event", (now + self.lease_s, now, limit)).fetchall()
        return [json.loads(event) for _, event in sorted(rows)]

    def done(self, request_ids: Iterable[str]) -> None:
        """Forget delivered events."""
        self._db.execute("DELETE FROM outbox WHERE request_id IN (SELECT value FROM json_each(?))",
                         (json.dumps(list(request_ids)),))

    def release(self, request_ids: Iterable[str]) -> None:
        """Hand leased events back undelivered, so any drainer may take them at once."""
        self._db.execute("UPDATE outbox SET lease_until = 0 WHERE request_id IN (SELECT value FROM json_each(?))",
                         (json.dumps(list(request_ids)),))

    def count(self) -> int:
        """Events not yet delivered, leased or not, from every process sharing the file."""
        return self._db.execute("SELECT count(*) FROM outbox").fetchone()[0]

    def close(self) -> None:
        self._db.close()
