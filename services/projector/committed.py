"""What readers may know of the committed checkpoints without a DuckDB transaction of their own.

A seqlock per generation schema: its counter is odd while a fold's COMMIT into that schema
runs (the fold thread is the one writer), and the schema's checkpoints are updated on that
thread right after the COMMIT, before the counter is even again. A read of some schemas
that finds their counters even and unchanged after it ran saw exactly those checkpoints
(services/query/cursors.py `read_consistent`).

Only the COMMIT statement is inside: the counter used to stay odd for the whole batch
(decoding and folding too) and was shared by every projection and generation, so under a
light writer 132 of 200 reads took the transaction path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

__all__ = ["Committed"]


class Committed:
    def __init__(self) -> None:
        self._commits: dict[str, int] = {}
        self._by_schema: dict[str, dict[str, int]] = {}

    def start(self, schema: str, checkpoints: dict[str, int]) -> None:
        """A generation's checkpoints as the file holds them when its folding starts."""
        self._by_schema[schema] = dict(checkpoints)

    @contextmanager
    def committing(self, schema: str, stream: str, seq: int) -> Iterator[None]:
        """Around the COMMIT that folds `schema`'s `stream` up to `seq`."""
        self._commits[schema] = self._commits.get(schema, 0) + 1
        try:
            yield
            mine = self._by_schema.setdefault(schema, {})
            mine[stream] = max(mine.get(stream, 0), seq)
        finally:
            self._commits[schema] += 1

    def commits(self, schemas: Sequence[str]) -> tuple[int, ...]:
        return tuple(self._commits.get(s, 0) for s in schemas)

    def view(self, schemas: Sequence[str]) -> tuple[tuple[int, ...], dict[str, int]] | None:
        """(commit counters, lowest committed checkpoint per stream of `schemas`), or None
        while a fold is committing into one of them."""
        seen = self.commits(schemas)
        if any(c % 2 for c in seen):
            return None
        out: dict[str, int] = {}
        try:
            for schema in schemas:
                for stream, seq in tuple(self._by_schema.get(schema, {}).items()):
                    out[stream] = min(out.get(stream, seq), seq)
        except RuntimeError:  # the fold thread added a stream meanwhile: it is committing
            return None
        return seen, out
