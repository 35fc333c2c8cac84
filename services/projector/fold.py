"""One batch of one projection: decode, fold, rejects and checkpoint in ONE transaction.

Validation is the typed decode (`decode`): an event that is oversize, not JSON, fails
the typed decoder, is of a type the projection does not fold, sits on the wrong
subject, has an unparseable `ts` or fails the projection's `validate()` becomes a
reject with its reason. A projection with a bulk path (`Projection.fold_raw`) gets the
raw payloads in one Arrow table instead and hands back to `decode` every row it cannot
vouch for; if the bulk fold fails, the batch is rolled back and folded decoded, and if
that fails, event by event (an event whose fold fails becomes a reject).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, NamedTuple

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.compute as pc
from fleetlog.projections import FoldReject, Projection, RejectEvent, StoredEvent
from fleetlog.projections._base import RawBatch, forgets, has_raw_fold
from fleetlog.schemas import encode_event as _encode_event
from fleetlog.schemas import event_decoder, parse_ts
from fleetlog.services.projector.store import ViewStore
from fleetlog.services.projector.stream_reader import StreamBatch
from fleetlog.services.projector.transactions import CatchUpRolledBack, FoldTransactions

__all__ = ["BatchFolder", "Landed", "Reject", "Staged"]

log = logging.getLogger("fleetlog.projector")

_Row = tuple[int, str, bytes]  # (stream seq, subject, payload)
# Batch payloads in Arrow: the system allocator reuses freed pages; pyarrow's default
# (mimalloc) returned them to the kernel and every batch page-faulted them in again.
_POOL = pa.system_memory_pool()


class Staged(NamedTuple):
    """A batch made ready for a projection's bulk path (`BatchFolder.prepare`)."""

    raw: RawBatch  # with what the projection's prepare_raw made of it
    payloads: pa.ChunkedArray  # the payloads as they came (for the decoder)


class Reject(NamedTuple):
    stream: str
    seq: int
    subject: str
    reason: str
    data: bytes


# Told when a batch's transaction commits (its rejects, None) or is undone (what it had, why).
Landed = Callable[[list[Reject], BaseException | None], None]


class BatchFolder:
    """Folds batches into the view store; one per projector (its lock serialises the writes)."""

    def __init__(self, store: ViewStore, max_event_bytes: int) -> None:
        self.store = store
        self.max_event_bytes = max_event_bytes
        self.tx = FoldTransactions(store)
        self.write_lock: threading.Lock = self.tx.write_lock
        self.bulk_batches = 0  # batches folded by a projection's fold_raw
        self.bulk_fallbacks = 0  # batches whose bulk prepare or fold_raw failed and were folded decoded
        self.decoded_rows = 0  # rows a fold_raw handed back to the decoder

    def decode(
        self, projection: Projection, stream: str, rows: Iterable[_Row]
    ) -> tuple[list[StoredEvent], list[Reject]]:
        """The decoder: validation is the typed decode, plus the envelope rules every event obeys."""
        stored: list[StoredEvent] = []
        rejects: list[Reject] = []
        seen: dict[str, list[bytes]] = {}  # event id (any letter case) -> the payloads of this batch
        decode = event_decoder.decode
        types = projection.event_types
        limit = self.max_event_bytes
        for seq, subject, data in rows:
            if len(data) > limit:
                rejects.append(Reject(stream, seq, subject, f"oversize: {len(data)} bytes > {limit}", data))
                continue
            try:
                event = decode(data)
            except msgspec.ValidationError as exc:
                rejects.append(Reject(stream, seq, subject, f"invalid event: {exc}", data))
                continue
            # Bad UTF-8 in a string raises UnicodeDecodeError; JSON nested past msgspec's depth limit
            # raises RecursionError, which escaped here and wedged the projector on that message.
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
                rejects.append(Reject(stream, seq, subject, f"not valid JSON: {exc}", data))
                continue
            if not isinstance(event, types):
                tag = type(event).__struct_config__.tag
                rejects.append(
                    Reject(stream, seq, subject, f"event type {tag!r} is not folded by {projection.name}", data)
                )
                continue
            expected = event.subject()
            if expected != subject:
                rejects.append(Reject(stream, seq, subject,
                                      f"subject mismatch: the payload belongs on {expected!r}", data))
                continue
            try:
                at = parse_ts(event.ts)
            except ValueError as exc:
                rejects.append(Reject(stream, seq, subject, str(exc), data))
                continue
            item = StoredEvent(stream, seq, subject, event, at)
            try:
                projection.validate(item)
            except RejectEvent as exc:
                rejects.append(Reject(stream, seq, subject, str(exc), data))
                continue
            except Exception as exc:  # a rule that trips on an odd value refuses that event, not the batch
                rejects.append(Reject(stream, seq, subject, f"invalid event: {type(exc).__name__}: {exc}", data))
                continue
            # An exact copy inside one batch (a retried publish) is dropped here; any other
            # message under a taken id goes to the fold, as it would from another batch, so
            # what a projection makes of it (attempts: a "duplicate id with a different body"
            # reject; a compacted family: the last write wins, as on a rebuild) never depends
            # on how the stream was cut into batches.
            key = event.id.lower()
            copies = seen.setdefault(key, [])
            if bytes(data) in copies:
                continue
            copies.append(bytes(data))
            stored.append(item)
        return stored, rejects

    def prepare(self, projection: Projection, stream: str, batch: StreamBatch) -> Staged | None:
        """The work of `apply` that reads nothing from the view: the payloads into Arrow and the
        projection's `prepare_raw` (e.g. decoding them into columns). Thread-safe, so the
        runtime runs it for batch N+1 on its own thread while batch N folds.

        The payloads stay in the reader's Arrow column (`batch.payloads`): no `bytes` per
        payload is made unless the decoder needs them.
        """
        if not has_raw_fold(projection):
            return None
        try:
            table, payloads = self._raw_table(batch)
        except Exception as exc:  # the batch is untouched: the decoder folds it event by event
            log.warning("bulk prepare of %d events failed (%r); folding them decoded", len(batch), exc)
            self.bulk_fallbacks += 1
            return None
        try:
            prepared = projection.prepare_raw(RawBatch(stream, table))
        except Exception as exc:  # fold_raw then works from the table alone
            log.warning("prepare of %d events failed (%s)", len(batch), exc)
            prepared = None
        return Staged(RawBatch(stream, table, prepared), payloads)

    def apply(
        self, projection: Projection, schema: str, stream: str, batch: StreamBatch,
        staged: Staged | Literal["unprepared"] | None = "unprepared", *,
        hold: bool = False, landed: Landed | None = None,
    ) -> list[Reject]:
        """Fold one batch exactly once: fold, rejects and checkpoint in one transaction.
        `staged`: what `prepare` made of the batch (None: fold it decoded; prepared here if not given).
        `hold`: more catch-up batches follow, the transaction may stay open for them
        (services/projector/transactions.py); `landed` hears when it commits or is undone.
        Raises CatchUpRolledBack if the batch failed in a transaction holding earlier ones."""
        last_seq = batch.last_seq
        forget = _forgetter(projection, batch.subjects, batch.seqs)
        tell = _Tell(landed)
        # A projection's bulk path takes every batch, however small: it has no fixed cost
        # beyond the decoder's own INSERT (attempts: no SQL parse stage since issue 19).
        if staged == "unprepared":
            staged = self.prepare(projection, stream, batch)
        if staged is not None:
            try:
                rejects = self._apply_raw(projection, schema, stream, batch, staged, forget, hold, tell)
                self.bulk_batches += 1
                return rejects
            except CatchUpRolledBack:
                raise
            except Exception as exc:
                self.bulk_fallbacks += 1
                log.warning("bulk fold of %d events failed (%s); folding them decoded", len(batch), exc)
                batch.data = staged.payloads.to_pylist()
        rows = zip(batch.seqs, batch.subjects, batch.data, strict=True)
        stored, rejects = self.decode(projection, stream, rows)
        try:
            rejects = self._commit(schema, stream, _folder(projection, stored), rejects, last_seq, forget,
                                   rows=len(batch), hold=hold, tell=tell)
        except CatchUpRolledBack:
            raise
        except Exception as exc:
            log.warning("fold of %d events failed (%s); retrying one by one", len(stored), exc)
            rejects = self._apply_one_by_one(projection, schema, stream, stored, rejects, last_seq, forget, tell)
        return rejects

    def _apply_raw(
        self, projection: Projection, schema: str, stream: str, batch: StreamBatch, staged: Staged,
        forget: _Forget | None, hold: bool, tell: _Tell,
    ) -> list[Reject]:
        """The projection's bulk path: raw payloads in one Arrow table, no object per event."""
        payloads = staged.payloads
        rejects: list[Reject] = []
        index: dict[int, int] = {}

        def decode(seqs: Sequence[int]) -> list[StoredEvent]:
            self.decoded_rows += len(seqs)
            if not index:
                index.update((seq, i) for i, seq in enumerate(batch.seqs))
            rows = ((seq, batch.subjects[index[seq]], payloads[index[seq]].as_py()) for seq in seqs)
            stored, found = self.decode(projection, stream, rows)
            rejects.extend(found)
            return stored

        def fold(cur: duckdb.DuckDBPyConnection) -> Sequence[FoldReject] | None:
            return projection.fold_raw(cur, staged.raw, decode)

        return self._commit(schema, stream, fold, rejects, batch.last_seq, forget, rows=len(batch), hold=hold,
                            tell=tell)

    def _raw_table(self, batch: StreamBatch) -> tuple[pa.Table, pa.ChunkedArray]:
        """seq, subject, data (text; NULL where oversize or not UTF-8: the decoder rejects those),
        and the payloads as they came.

        The payloads are the reader's Arrow column (`StreamBatch.payloads`), not copied: the
        cast to text only checks their UTF-8 (in C++, without the GIL) and shares its buffers.
        """
        data = batch.payloads
        try:
            text = pc.cast(data, pa.string(), memory_pool=_POOL)  # validates UTF-8
        except pa.ArrowInvalid:
            text = pa.chunked_array([pa.array([_utf8_or_none(d) for d in batch.data], pa.string())])
        oversize = pc.greater(pc.binary_length(data), self.max_event_bytes)
        if pc.any(oversize).as_py():
            text = pc.if_else(oversize, pa.scalar(None, pa.string()), text)
        table = pa.table(
            {
                "seq": pa.array(batch.seqs, pa.int64()),
                "subject": pa.array(batch.subjects, pa.string()),
                "data": text,
            }
        )
        return table, data

    def _apply_one_by_one(
        self,
        projection: Projection,
        schema: str,
        stream: str,
        stored: list[StoredEvent],
        rejects: list[Reject],
        last_seq: int,
        forget: _Forget | None,
        tell: _Tell,
    ) -> list[Reject]:
        """Slow path after a failed batch: an event whose fold fails becomes a reject."""
        out = list(rejects)
        self._commit(schema, stream, None, rejects, 0)  # checkpoint untouched (seq < 0 never holds)
        for item in stored:
            try:
                out.extend(self._commit(schema, stream, _folder(projection, [item]), [], item.seq))
            except Exception as exc:
                reject = Reject(stream, item.seq, item.subject, f"fold failed: {exc}", _encode_event(item.event))
                self._commit(schema, stream, None, [reject], item.seq)
                out.append(reject)
        self._commit(schema, stream, _forget_only(forget, out), [], last_seq, tell=tell, told=out)
        return out

    def _commit(
        self,
        schema: str,
        stream: str,
        fold: Callable[[duckdb.DuckDBPyConnection], Sequence[FoldReject] | None] | None,
        rejects: list[Reject],
        seq: int,
        forget: _Forget | None = None,
        *,
        rows: int = 0,
        hold: bool = False,
        tell: _Tell | None = None,
        told: list[Reject] | None = None,
    ) -> list[Reject]:
        """Fold + rejects + checkpoint in the feed's transaction (`FoldTransactions.run`);
        returns every reject. `tell` hears of the commit with `told` (default: these rejects).

        `fold(cursor)` may add decode-time rejects to `rejects` while it runs (the bulk
        path decodes inside the fold); the events it refuses are rejects too. `forget`
        gets the decode-time ones after the fold (`Projection.forget`).
        """
        out: list[Reject] = []

        def write(cur: duckdb.DuckDBPyConnection) -> None:
            refused = fold(cur) if fold is not None else None
            if forget is not None and rejects:
                forget(cur, rejects)
            out.extend(rejects)
            if refused:
                out.extend(
                    Reject(stream, item.seq, item.subject, reason, _encode_event(item.event))
                    for item, reason in refused
                )
            if out:
                self._insert_rejects(cur, stream, out)

        on_commit = tell.bind(out if told is None else told) if tell is not None else None
        self.tx.run(schema, stream, seq, rows, write, hold=hold, on_commit=on_commit)
        return out

    def advance(self, schema: str, stream: str, seq: int) -> None:
        """Move the checkpoint to `seq` with nothing to fold: the stream holds no message up to it."""
        self._commit(schema, stream, None, [], seq)

    def trim(self, projection: Projection, schema: str, stream: str, first_seq: int) -> int:
        """`Projection.trim` in its own transaction (retention: rows whose messages aged out)."""
        return self.tx.once(schema, lambda cur: projection.trim(cur, stream, first_seq))

    @staticmethod
    def _insert_rejects(cur: duckdb.DuckDBPyConnection, stream: str, rejects: list[Reject]) -> None:
        table = pa.table(
            {
                "stream": pa.array([r.stream for r in rejects], pa.string()),
                "seq": pa.array([r.seq for r in rejects], pa.int64()),
                "subject": pa.array([r.subject for r in rejects], pa.string()),
                "reason": pa.array([r.reason for r in rejects], pa.string()),
                "data": pa.array([r.data for r in rejects], pa.binary()),
            }
        )
        # read by name in the SQL below (a replacement scan: projections/_base.py)
        _fleetlog_rejects = table
        cur.execute(
            "INSERT INTO _rejects (stream, seq, subject, reason, data) "
            "SELECT stream, seq, subject, reason, data FROM _fleetlog_rejects"
            " WHERE seq NOT IN (SELECT seq FROM _rejects WHERE stream = ?)",
            [stream],
        )



_Forget = Callable[[duckdb.DuckDBPyConnection, Sequence[Reject]], None]


class _Tell:
    """A batch's `landed` callback, told once: by the transaction that holds its last write."""

    __slots__ = ("landed",)

    def __init__(self, landed: Landed | None) -> None:
        self.landed = landed

    def bind(self, rejects: list[Reject]) -> Callable[[BaseException | None], None] | None:
        landed = self.landed
        if landed is None:
            return None

        def on_commit(error: BaseException | None) -> None:
            landed(rejects, error)

        return on_commit


def _forgetter(projection: Projection, subjects: Sequence[str], seqs: Sequence[int]) -> _Forget | None:
    """`Projection.forget` for the subjects whose last message in the batch was rejected
    before the fold (a later valid message on the subject is folded and stands)."""
    if not forgets(projection):
        return None

    def forget(cur: duckdb.DuckDBPyConnection, early: Sequence[Reject]) -> None:
        last = dict(zip(subjects, seqs, strict=True))  # each subject's last message in the batch
        gone = sorted({(r.subject, r.seq) for r in early if last.get(r.subject) == r.seq})
        if gone:
            projection.forget(cur, gone)

    return forget


def _forget_only(forget: _Forget | None, rejects: list[Reject]) -> Callable[[duckdb.DuckDBPyConnection], None] | None:
    if forget is None:
        return None

    def run(cur: duckdb.DuckDBPyConnection) -> None:
        forget(cur, rejects)

    return run


def _folder(
    projection: Projection, stored: Sequence[StoredEvent]
) -> Callable[[duckdb.DuckDBPyConnection], Sequence[FoldReject] | None]:
    def fold(cur: duckdb.DuckDBPyConnection) -> Sequence[FoldReject] | None:
        return projection.fold(cur, stored) if stored else None

    return fold


def _utf8_or_none(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None
