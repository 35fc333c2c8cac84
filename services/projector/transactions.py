"""The fold's transactions: each batch's rows, rejects and checkpoint in one transaction,
committed at once while a feed is live, or held open across the batches of a catch-up.

Why hold: DuckDB writes a committed transaction's rows to the WAL, then again (compressed)
into the file at the next checkpoint; a transaction that fills whole row groups writes them
into the file once, at insert time, and its COMMIT is cheap. Bare insert + commit of prepared
attempt rows, 5,000 a batch, into a view with 16,384-row groups (docs/benchmarks.md, issue 19,
third round): with 2 KB panes, a COMMIT per batch 47k events/s and 23.6 µs of CPU per event;
one per 13 batches 128k and 9.0 µs; without panes 3.6 -> 2.4 µs.

So while a feed is far behind (the pipeline says `hold`), its batches go into one transaction
that commits after HOLD_ROWS rows or HOLD_S seconds, or as soon as a batch is not a catch-up
batch, the feed goes idle or stops, or any other write needs the fold thread (at most one
transaction is open: another feed's batch, `advance`, `trim` commit it first).

Exactly-once is unchanged: every batch writes its checkpoint in the transaction that holds its
rows, so a crash undoes both and the feed reads them again. A batch's progress (what queries
wait for, rejects published) moves when its transaction commits, not when it is folded: each
batch's `on_commit` is called then, whoever commits. A failure inside a held transaction undoes
every batch in it; they cannot be folded again one by one from memory (the pipeline keeps no
copy), so the feed is told to read again from its checkpoint (`CatchUpRolledBack`), and up to
the failed batch it commits batch by batch, where a batch that fails has today's fallbacks.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import duckdb
    from fleetlog.services.projector.store import ViewStore

__all__ = ["HOLD_ROWS", "HOLD_S", "CatchUpRolledBack", "FoldTransactions", "OnCommit"]

log = logging.getLogger("fleetlog.projector")

# A held transaction commits once it holds this many rows (8 row groups of ROW_GROUP_ROWS):
# past ~4 row groups the gain flattens (probe: 65k rows a commit 128k ev/s, 250k 136k).
HOLD_ROWS = 131_072
# ... or has been open this long: how far a caught-up reader of a view in catch-up may lag
# behind what the fold has done, and how much a crash makes the feed read again.
HOLD_S = 1.0

OnCommit = Callable[[BaseException | None], None]  # None: committed; else why it was undone
T = TypeVar("T")


class CatchUpRolledBack(Exception):
    """A held catch-up transaction failed and every batch in it was undone: the feed must read
    again from its committed checkpoint."""


def _no_hook(schema: str, stream: str, seq: int) -> AbstractContextManager[None]:
    return nullcontext()


class _Open:
    """The held transaction of one feed."""

    __slots__ = ("batches", "cur", "feed", "rows", "seq", "since", "waiting")

    def __init__(self, cur: duckdb.DuckDBPyConnection, feed: tuple[str, str]) -> None:
        self.cur = cur
        self.feed = feed
        self.batches = 0
        self.rows = 0
        self.seq = 0
        self.since = time.monotonic()
        self.waiting: list[OnCommit] = []


class FoldTransactions:
    """The view store's write transactions, all run on the projector's one fold thread."""

    def __init__(self, store: ViewStore) -> None:
        self.store = store
        self.write_lock = threading.Lock()
        # Wraps each COMMIT (schema, stream, checkpoint): the projector's seqlock for readers
        # (services/projector/committed.py), held around the COMMIT statement alone.
        self.around_commit: Callable[[str, str, int], AbstractContextManager[None]] = _no_hook
        self.last_commit = time.monotonic()
        self.held_commits = 0  # commits of transactions that held more than one batch
        self._open: _Open | None = None
        # feed -> the seq up to which it commits batch by batch (after a held transaction failed)
        self._no_hold: dict[tuple[str, str], int] = {}

    @property
    def holding(self) -> bool:
        """Whether a transaction is open (a CHECKPOINT would find it)."""
        return self._open is not None

    @property
    def held_batches(self) -> int:
        """Batches written into the open transaction (0 if none is open): while a batch is being
        written, the earlier ones a failure would undo with it."""
        return 0 if self._open is None else self._open.batches

    def run(
        self, schema: str, stream: str, seq: int, rows: int, write: Callable[[duckdb.DuckDBPyConnection], T],
        *, hold: bool = False, on_commit: OnCommit | None = None,
    ) -> T:
        """`write(cursor)` and the feed's checkpoint `seq` in its transaction; committed unless
        `hold` and the held transaction is still small and young. `on_commit` hears of the commit
        (or of the rollback that undid this batch after it was written)."""
        feed = (schema, stream)
        if self._open is not None and self._open.feed != feed:
            self.commit()
        with self.write_lock:
            tx = self._open
            if tx is None:
                tx = _Open(self.store.cursor(schema), feed)
                try:
                    tx.cur.execute("BEGIN")
                except BaseException:
                    tx.cur.close()
                    raise
                self._open = tx
            try:
                result = write(tx.cur)
                tx.cur.execute(
                    "UPDATE main.fleetlog_checkpoints SET seq = ?, updated_at = now()"
                    " WHERE schema_name = ? AND stream = ? AND seq < ?",
                    [seq, schema, stream, seq],
                )
            except BaseException as exc:
                self._open = None
                if not self._undo(tx, exc, seq):
                    raise
                raise CatchUpRolledBack(f"batch up to seq {seq} failed in a catch-up transaction: {exc!r}") from exc
            tx.batches += 1
            tx.rows += rows
            tx.seq = seq
            if on_commit is not None:
                tx.waiting.append(on_commit)
            if (hold and seq > self._no_hold.get(feed, 0) and tx.rows < HOLD_ROWS
                    and time.monotonic() - tx.since < HOLD_S):
                return result
            self._open = None
            self._commit(tx, mine=1)
        return result

    def commit(self) -> None:
        """Commit the held transaction, if any. A failure reaches its batches' `on_commit`,
        not the caller (another feed's batch, or a write that only needs the thread)."""
        with self.write_lock:
            tx, self._open = self._open, None
            if tx is not None:
                with contextlib.suppress(Exception):
                    self._commit(tx, mine=0)

    def commit_feed(self, schema: str, stream: str) -> None:
        """Commit the held transaction if it is this feed's (the feed went idle or stops)."""
        if self._open is not None and self._open.feed == (schema, stream):
            self.commit()

    def once(self, schema: str, write: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """`write(cursor)` in a transaction of its own (no checkpoint moves), the held one committed first."""
        self.commit()
        cur = self.store.cursor(schema)
        try:
            with self.write_lock:
                cur.execute("BEGIN")
                try:
                    result = write(cur)
                    cur.execute("COMMIT")
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
        finally:
            cur.close()
        return result

    def _commit(self, tx: _Open, mine: int) -> None:
        """COMMIT `tx`. `mine`: how many of its batches (the last ones) the caller answers for
        if it fails: 1 from `run` (that batch's fallbacks take over), 0 from `commit`."""
        schema, stream = tx.feed
        try:
            with self.around_commit(schema, stream, tx.seq):
                tx.cur.execute("COMMIT")
        except BaseException as exc:
            if not self._undo(tx, exc, tx.seq, mine=mine):
                raise
            raise CatchUpRolledBack(f"the COMMIT of a catch-up transaction failed: {exc!r}") from exc
        tx.cur.close()
        self.last_commit = time.monotonic()
        if tx.batches > 1:
            self.held_commits += 1
        _tell(tx.waiting, None)

    def _undo(self, tx: _Open, exc: BaseException, seq: int, *, mine: int = 0) -> bool:
        """Roll `tx` back. If it holds only the caller's own batches (`mine`): False, and the
        caller's error handling takes over (the batch's fallbacks may fold it again). Else True:
        its batches hear why, and the feed commits batch by batch up to `seq` when it reads
        them again."""
        with contextlib.suppress(Exception):
            tx.cur.execute("ROLLBACK")
        tx.cur.close()
        if tx.batches <= mine:
            tx.waiting.clear()
            return False
        self._no_hold[tx.feed] = max(self._no_hold.get(tx.feed, 0), seq)
        log.warning("catch-up transaction of %s on %s undone (%d batches, %d rows) by %r; reading again",
                    tx.feed[0], tx.feed[1], tx.batches, tx.rows, exc)
        _tell(tx.waiting, CatchUpRolledBack(f"the catch-up transaction holding this batch was undone: {exc!r}"))
        return True


def _tell(waiting: list[OnCommit], error: BaseException | None) -> None:
    for on_commit in waiting:
        try:
            on_commit(error)
        except Exception:  # a callback's failure must not undo a commit that happened
            log.exception("on_commit callback failed")
    waiting.clear()
